"""The mode-token probe: how likely the policy is to open a response with each mode token,
read from the learner's weights (not from sampled rollouts), on a fixed set of prompts.

Greedy eval rates move only when a prompt's logit gap changes sign; the probe shows the
probability itself moving, step by step, for every persona setting."""

from __future__ import annotations

from typing import Any, Sequence

from personadual.evaluation import probe_summary
from personadual.modes import Mode, mode_token_ids
from personadual.prompts import render_prompt
from personadual.records import Prompt


def _learner_response_logprobs(learner: Any, pairs: list[tuple[list[int], list[int]]]) -> list[list[float]]:
    return learner.response_logprobs(pairs)


def mode_token_logprobs(learner_group: Any, tokenizer: Any,
                        prompts: Sequence[Prompt]) -> list[tuple[float, float]]:
    """(log p(general token), log p(personalized token)) at the first response position of
    each prompt, under the learner's current weights at temperature 1. A collective: every
    learner rank scores the same pairs (ZeRO-3 gathers the parameters)."""
    if not prompts:
        return []
    ids = mode_token_ids(tokenizer)
    pairs: list[tuple[list[int], list[int]]] = []
    for prompt in prompts:
        prompt_ids = tokenizer.encode(render_prompt(tokenizer, prompt), add_special_tokens=False)
        pairs += [(prompt_ids, [ids[Mode.GENERAL]]), (prompt_ids, [ids[Mode.PERSONALIZED]])]
    found = learner_group.call(_learner_response_logprobs, pairs)[0]
    return [(found[2 * i][0], found[2 * i + 1][0]) for i in range(len(prompts))]


class ModeProbe:
    """The learner's mode-token log-probs on any prompts, and the per-step metrics on the
    fixed ``probe_set`` (``personadual.evaluation.probe_prompts``)."""

    def __init__(self, learner_group: Any, tokenizer: Any, probe_set: Sequence[Prompt]) -> None:
        self.learner_group, self.tokenizer, self.probe_set = learner_group, tokenizer, list(probe_set)

    def logprobs(self, prompts: Sequence[Prompt]) -> dict[str, tuple[float, float]]:
        """Per prompt id: (log p(general token), log p(personalized token))."""
        return dict(zip((p.id for p in prompts), mode_token_logprobs(self.learner_group, self.tokenizer, prompts)))

    def summary(self, logprobs: dict[str, tuple[float, float]]) -> dict[str, dict[str, float]]:
        """The probe set's per-setting means, from log-probs that cover it."""
        return probe_summary(self.probe_set, [logprobs[p.id] for p in self.probe_set])

    def step_metrics(self) -> dict[str, float]:
        """``mode/probe/<setting>/p_personalized`` and ``.../logit_gap`` on the probe set."""
        if not self.probe_set:
            return {}
        return {f"mode/probe/{setting}/{name}": value
                for setting, values in self.summary(self.logprobs(self.probe_set)).items()
                for name, value in values.items()}
