"""A micro-batch through a model: its logits and the log-probabilities of its targets. The
reference, old-policy and training passes of a step, SFT and the sync probe all go through
``micro_batch_logprobs``, so a different way to compute them is one local change."""

from __future__ import annotations

from typing import Any

import torch

from learner.batch import MicroBatch
from learner.losses import token_logprobs
from learner.shared_prefix import forward_packed


def forward_logits(model: Any, batch: MicroBatch) -> torch.Tensor:
    """(B, K, V) logits aligned with ``batch.targets``; positions before the shortest
    prompt's last token are never projected onto the vocabulary. A shared-prefix micro-batch
    (learner/shared_prefix.py) runs its packed rows and maps their logits to the same frame."""
    if batch.layout is not None:
        return forward_packed(model, batch.input_ids, batch.layout, next(iter(model.parameters())).dtype)
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                logits_to_keep=batch.logits_to_keep, use_cache=False)
    return out.logits[:, :-1]


def micro_batch_logprobs(model: Any, batch: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (B, K, V), log p(target) (B, K)) of ``batch`` under ``model`` at temperature 1."""
    logits = forward_logits(model, batch)
    return logits, token_logprobs(logits, batch.targets)


def first_response_logprob(logprobs: torch.Tensor, batch: MicroBatch) -> torch.Tensor:
    """Log-probability of each real row's first response token (the mode token)."""
    if not batch.indices:
        return logprobs.new_zeros(0)
    first = batch.response_mask.argmax(dim=1)
    return logprobs.gather(1, first.unsqueeze(1)).squeeze(1)
