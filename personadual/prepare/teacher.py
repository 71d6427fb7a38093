"""Teacher trajectories in both modes for the SFT prompts (the paper's appendix B.1).

For each prompt the teacher is asked ``samples_per_mode`` times in general mode and, when the
prompt has a persona, as many times in personalized mode; each reply becomes a response that
starts with its mode token, and is scored against the prompt's gold answer by the run's own
scorers (passed in as ``score``, so this module stays free of the reward room).
``personadual.benchmarks.sft_selection`` then keeps the better mode by the paper's rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from personadual.benchmarks.sft_selection import TeacherRow
from personadual.modes import Mode
from personadual.prepare.calls import CachedChat, ChatRequest
from personadual.prompts import ANSWER_PREFIX, PERSONA_PREFIX, format_question
from personadual.records import Prompt

ANSWER_LINE = (f"Reason briefly, then end with one line '{ANSWER_PREFIX} <answer>' "
               f"(for lettered options, the letter).")
MODE_INSTRUCTIONS = {
    Mode.GENERAL: "Answer the user's question objectively, from facts and reasoning alone, "
                  "without relying on who the user is. " + ANSWER_LINE,
    Mode.PERSONALIZED: "Answer the user's question for this user: use what their persona tells "
                       "you about them where it helps. " + ANSWER_LINE,
}

# (prompt, response) pairs -> whether each is correct, and the scorers' counts (judge requests,
# fallbacks, failures by kind...) for the manifest.
Score = Callable[[Sequence[tuple[Prompt, str]]], tuple[list[bool], dict[str, int]]]


@dataclass(frozen=True)
class TeacherAsk:
    prompt: Prompt
    mode: Mode
    sample: int

    def request(self) -> ChatRequest:
        system = MODE_INSTRUCTIONS[self.mode]
        if self.prompt.persona is not None:
            system = f"{system}\n\n{PERSONA_PREFIX} {self.prompt.persona}"
        return ChatRequest((("system", system),
                            ("user", format_question(self.prompt.question, self.prompt.choices))),
                           seed=self.sample)


def plan_asks(prompts: Sequence[Prompt], samples_per_mode: int) -> list[TeacherAsk]:
    """Both modes for a prompt with a persona; general mode only without one (the paper's
    rule can pick nothing else for it)."""
    asks = []
    for prompt in prompts:
        modes = (Mode.GENERAL, Mode.PERSONALIZED) if prompt.persona is not None else (Mode.GENERAL,)
        if prompt.task_type == "personalized":
            modes = (Mode.PERSONALIZED,)
        asks.extend(TeacherAsk(prompt, mode, sample) for mode in modes for sample in range(samples_per_mode))
    return asks


def teacher_rows(prompts: Sequence[Prompt], chat: CachedChat, score: Score, *,
                 samples_per_mode: int = 1, progress: bool = True) -> tuple[list[TeacherRow], dict[str, int]]:
    """Scored teacher trajectories, in prompt, mode, sample order (empty replies count as
    wrong), and the scorers' counts."""
    asks = plan_asks(prompts, samples_per_mode)
    replies = chat.replies([a.request() for a in asks], progress=progress)
    responses = [f"{ask.mode.token} {reply}" for ask, reply in zip(asks, replies)]
    correct, counts = score([(ask.prompt, response) for ask, response in zip(asks, responses)])
    return [TeacherRow(ask.prompt.question.strip(), ask.prompt.persona, ask.mode, response,
                       bool(ok) and bool(reply.strip()), ask.prompt.id)
            for ask, reply, response, ok in zip(asks, replies, responses, correct)], counts
