"""The batch scorer: routes each response to its prompt's scorer and applies the judge's
failure policy, so one batch can mix exact match, multiple choice, math and judge tasks.

A failed judgement is never a silent 0: under ``fallback_exact_match`` it is scored by exact
match (status "fallback"), under ``drop`` it leaves the batch (status "dropped", no reward),
under ``fail`` the batch raises ``JudgeError`` carrying the batch's counts. Every outcome is
counted.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

from personadual.records import SCORE_STATUSES, Prompt, Rollout, Scored
from rewards.config import RewardConfig
from rewards.exact_match import ExactMatchScorer
from rewards.format import compose, single_line_answer
from rewards.judge import ApiKey, JudgeClient, JudgeError, Judgement
from rewards.multiple_choice import MultipleChoiceScorer
from rewards.normalize import clip, extract_answer

log = logging.getLogger(__name__)

# Present in every counts dict, so metrics keep the same keys from step to step.
BASE_COUNT_KEYS = ("total", *SCORE_STATUSES, "judge/requests", "judge/retries",
                   "judge/cache_hits", "judge/failures", "judge/retry_after_capped",
                   "multiple_choice/ambiguous")


class Scorer(Protocol):
    name: str

    def score(self, prompt: Prompt, response_text: str) -> tuple[float, dict[str, Any]]: ...


@dataclass
class Outcome:
    """A Scored record without its Rollout: what crosses process boundaries."""

    reward: float | None
    correct: bool
    status: str
    detail: dict[str, Any] = field(default_factory=dict)

    def attach(self, rollout: Rollout) -> Scored:
        return Scored(rollout, self.reward, self.correct, self.status, self.detail)


def _run(coroutine: Any) -> Any:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    coroutine.close()
    raise RuntimeError("called from a running event loop: await the *_async method instead")


class JudgeScorer:
    """The judge as a scorer. Its ``score`` raises ``JudgeError`` on a failed judgement:
    the failure policies live in ``BatchScorer``, which batches judge calls."""

    name = "judge"

    def __init__(self, config: RewardConfig, *, api_key: ApiKey | None = None) -> None:
        self.config = config
        self.client = JudgeClient(config.judge, api_key=api_key)

    def reward(self, prompt: Prompt, response_text: str, judgement: Judgement) -> tuple[float, dict[str, Any]]:
        assert judgement.verdict is not None
        detail: dict[str, Any] = {"scorer": self.name, "extracted": clip(judgement.verdict.extracted),
                                  "judge_cached": judgement.cached, "judge_attempts": judgement.attempts}
        extraction = extract_answer(response_text)
        return compose(self.config, correct=judgement.verdict.correct, extraction=extraction,
                       answer_ok=single_line_answer(extraction.answer), detail=detail)

    def score(self, prompt: Prompt, response_text: str) -> tuple[float, dict[str, Any]]:
        (judgement,), _ = _run(self.client.judge_many([(prompt, response_text)]))
        if judgement.verdict is None:
            raise JudgeError(prompt.id, judgement.error or "unknown", judgement.attempts)
        return self.reward(prompt, response_text, judgement)


class BatchScorer:
    """Scores a batch; returns one result per input, in order, and a flat counts dict:
    ``total``, per status (``ok``/``fallback``/``dropped``), ``scorer/<name>``, the judge's
    ``judge/requests``, ``judge/retries``, ``judge/cache_hits``, ``judge/failures``,
    ``judge/error/<kind>``, and ``math/error/<kind>``."""

    def __init__(self, config: RewardConfig, *, api_key: ApiKey | None = None) -> None:
        # Imported here, in the reward workers: sympy and math-verify cost the driver, which
        # imports this module for its records and counts only, half a second of start-up.
        from rewards.math_equiv import MathScorer

        self.config = config
        self.judge = JudgeScorer(config, api_key=api_key)
        self.exact_match = ExactMatchScorer(config)
        self.local: dict[str, Scorer] = {
            "exact_match": self.exact_match,
            "multiple_choice": MultipleChoiceScorer(config),
            "math": MathScorer(config),
        }

    def __repr__(self) -> str:
        return f"BatchScorer(judge={self.judge.client!r}, policy={self.config.judge.failure_policy!r})"

    def _after_failure(self, prompt: Prompt, text: str, judgement: Judgement) -> Outcome:
        detail: dict[str, Any] = {"judge_error": judgement.error, "judge_attempts": judgement.attempts}
        if judgement.raw:
            detail["judge_raw"] = judgement.raw
        if self.config.judge.failure_policy == "drop":
            return Outcome(None, False, "dropped", {"scorer": "judge", **detail})
        reward, fallback = self.exact_match.score(prompt, text)
        return Outcome(reward, fallback["correct"], "fallback", {**fallback, **detail})

    async def score_texts_async(self, items: Sequence[tuple[Prompt, str]]) -> tuple[list[Outcome], dict[str, int]]:
        """One Outcome per (prompt, response text), in order, and the counts."""
        counts: Counter[str] = Counter({key: 0 for key in BASE_COUNT_KEYS})
        counts["total"] = len(items)
        outcomes: list[Outcome | None] = [None] * len(items)
        judged = [i for i, (prompt, _) in enumerate(items) if prompt.scorer == "judge"]
        # Judge requests go out first and proceed while the local scorers run.
        judge_task = asyncio.ensure_future(self.judge.client.judge_many([items[i] for i in judged]))
        try:
            for index, (prompt, text) in enumerate(items):
                counts[f"scorer/{prompt.scorer}"] += 1
                if prompt.scorer == "judge":
                    continue
                reward, detail = self.local[prompt.scorer].score(prompt, text)
                if "math_error" in detail:
                    counts[f"math/error/{detail['math_error']}"] += 1
                if detail.get("ambiguous"):
                    counts["multiple_choice/ambiguous"] += 1
                outcomes[index] = Outcome(reward, detail["correct"], "ok", detail)
                await asyncio.sleep(0)  # let in-flight judge requests progress
            judgements, judge_counts = await judge_task
        finally:
            if not judge_task.done():  # a local scorer raised: do not leave requests behind
                judge_task.cancel()
                await asyncio.gather(judge_task, return_exceptions=True)
        counts.update(judge_counts)
        failures = [(i, j) for i, j in zip(judged, judgements) if j.verdict is None]
        failing = bool(failures) and self.config.judge.failure_policy == "fail"
        for index, judgement in zip(judged, judgements):
            prompt, text = items[index]
            if judgement.verdict is None:
                if failing:
                    continue
                outcomes[index] = self._after_failure(prompt, text, judgement)
            else:
                reward, detail = self.judge.reward(prompt, text, judgement)
                outcomes[index] = Outcome(reward, detail["correct"], "ok", detail)
        if failures:
            kinds = Counter(j.error for _, j in failures)
            log.warning("judge: %d of %d judgement(s) failed (%s); policy %s", len(failures), len(judged),
                        ", ".join(f"{k}: {n}" for k, n in sorted(kinds.items())),
                        self.config.judge.failure_policy)
        for outcome in outcomes:
            if outcome is not None:  # None: a failed judgement under "fail"
                counts[outcome.status] += 1
        if failing:
            # The batch's counts travel with the error: the step that stops still reports them.
            index, first = failures[0]
            raise JudgeError(items[index][0].id, first.error or "unknown", first.attempts, len(failures),
                             dict(counts))
        return outcomes, dict(counts)  # type: ignore[arg-type]

    def score_texts(self, items: Sequence[tuple[Prompt, str]]) -> tuple[list[Outcome], dict[str, int]]:
        return _run(self.score_texts_async(items))

    async def score_batch_async(self, rollouts: Sequence[Rollout]) -> tuple[list[Scored], dict[str, int]]:
        outcomes, counts = await self.score_texts_async([(r.prompt, r.text) for r in rollouts])
        return [outcome.attach(rollout) for outcome, rollout in zip(outcomes, rollouts)], counts

    def score_many(self, rollouts: Sequence[Rollout]) -> tuple[list[Scored], dict[str, int]]:
        """Synchronous: runs the async batch to completion (not from inside an event loop)."""
        return _run(self.score_batch_async(rollouts))


def merge_counts(parts: Sequence[dict[str, int]]) -> dict[str, int]:
    """Counts of several batches (or workers' chunks) summed key by key."""
    total: Counter[str] = Counter({key: 0 for key in BASE_COUNT_KEYS})
    for part in parts:
        total.update(part)
    return dict(total)
