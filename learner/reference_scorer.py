"""The frozen KL reference outside the learner: log-probs of a generated batch's responses,
computed where generation ran (actors/reference_worker.py), so the learner's step skips its
reference pass.

The numbers must be the learner's own, so the batch meets the model exactly as in the
learner's step: the same rank shards (``shard_members``), mini-batch chunks and micro-batches
(``plan_step_micro_batches``, shared prefix on or off) and the same forward
(``micro_batch_logprobs``). With the same weights and thread count the result is the
learner's bit for bit; a sample the learner drops (no reward) only changes its neighbours'
micro-batch shapes, which moves their log-probs by float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from transformers import AutoModelForCausalLM

from learner.batch import PolicySample, plan_step_micro_batches, shard_members
from learner.forward import micro_batch_logprobs


@dataclass(frozen=True)
class ReferencePlan:
    """How the learner cuts a step's batch (its config and ``algo.mini_batches``)."""

    num_ranks: int
    mini_batches: int
    micro_batch_tokens: int
    shared_prefix: bool


class ReferenceScorer:
    """A reference model and the learner's way of cutting a batch."""

    def __init__(self, model_path: str | Path, plan: ReferencePlan, *, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> None:
        self.plan = plan
        self.device = torch.device(device)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
        model.config.use_cache = False
        model.requires_grad_(False)
        self.model = model.to(self.device).eval()
        self.pad_token_id = int(model.config.pad_token_id or 0)
        self.loaded = False  # the reference's weights arrived (until then: the model file's)

    def load(self, state: dict[str, torch.Tensor]) -> None:
        """The reference's weights, every tensor by HF name (``Learner.reference_weights``)."""
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"reference weights: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")
        self.loaded = True

    @torch.no_grad()
    def response_logprobs(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[list[float]]:
        """log p_ref(response token) for each (prompt ids, response ids), planned as the
        learner plans the batch these pairs make, in this order."""
        samples = [PolicySample(list(prompt), list(response), 0.0, -1, 0.0) for prompt, response in pairs]
        found: list[list[float]] = [[] for _ in samples]
        plan = self.plan
        for rank in range(plan.num_ranks):
            members = shard_members(samples, rank, plan.num_ranks, by_prompt=plan.shared_prefix)
            part = [samples[i] for i in members]
            for micro in plan_step_micro_batches(part, mini_batches=plan.mini_batches,
                                                 micro_batch_tokens=plan.micro_batch_tokens,
                                                 pad_token_id=self.pad_token_id, shared_prefix=plan.shared_prefix):
                for mb in micro:
                    mb = mb.to(self.device)
                    logprobs = micro_batch_logprobs(self.model, mb)[1]
                    for row, index in enumerate(mb.indices):
                        found[members[index]] = logprobs[row][mb.response_mask[row] > 0].tolist()
        return found
