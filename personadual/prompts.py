"""The chat prompt for a question, with or without a persona, and forced-mode prompts.

The persona travels in the system message; the question (with its lettered options, if
any) is the user turn. Forced-prefix sampling appends the mode token right after the
assistant header, so it becomes the first response token.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence

from personadual.modes import Mode
from personadual.records import Prompt, option_letters

ANSWER_PREFIX = "Answer:"
PERSONA_PREFIX = "User persona:"


class ChatTokenizer(Protocol):
    def apply_chat_template(self, conversation: list[dict[str, str]], **kwargs: Any) -> Any: ...


def format_question(question: str, choices: Sequence[str] | None) -> str:
    if not choices:
        return question
    options = "\n".join(f"{letter}. {text}" for letter, text in zip(option_letters(len(choices)), choices))
    return f"{question}\n{options}"


def build_messages(prompt: Prompt, history: Sequence[dict[str, str]] = ()) -> list[dict[str, str]]:
    """Chat messages for one prompt; ``history`` holds earlier turns of a multi-turn chat."""
    messages: list[dict[str, str]] = []
    if prompt.persona is not None:
        messages.append({"role": "system", "content": f"{PERSONA_PREFIX} {prompt.persona}"})
    messages.extend(history)
    messages.append({"role": "user", "content": format_question(prompt.question, prompt.choices)})
    return messages


def render_prompt(tokenizer: ChatTokenizer, prompt: Prompt,
                  history: Sequence[dict[str, str]] = ()) -> str:
    """The prompt text up to and including the assistant header (generation starts here)."""
    return tokenizer.apply_chat_template(
        build_messages(prompt, history), tokenize=False, add_generation_prompt=True
    )


def forced_prompt(rendered_prompt: str, mode: Mode) -> str:
    """The prompt followed by a mode token: sampling continues after the forced mode."""
    return rendered_prompt + mode.token


def format_response(mode: Mode, reasoning: str, answer: str) -> str:
    """A response in the trained format: mode token, reasoning, then the final answer line."""
    reasoning = reasoning.strip()
    body = f"{reasoning} {ANSWER_PREFIX} {answer}" if reasoning else f"{ANSWER_PREFIX} {answer}"
    return f"{mode.token} {body}"
