"""Full tensors out of a (possibly ZeRO-3 partitioned) module, by name, in size-bounded buckets.

Names are the module's state-dict names, i.e. the HF checkpoint names that vLLM's
``load_weights`` expects (``model.layers.0.self_attn.q_proj.weight``, ``lm_head.weight``).
EVERY persistent tensor is listed, tied duplicates included: an update that lacks
``lm_head.weight`` silently keeps the old head in vLLM (docs/ARCHITECTURE.md, "The real stack on CPU").

Under ZeRO-3, gathering is a collective: every rank must iterate in lockstep.
"""

from __future__ import annotations

import math
from typing import Iterator

import deepspeed
import torch
from torch import nn

from personadual.weight_buckets import TensorMeta, plan_buckets


def is_partitioned(tensor: torch.Tensor) -> bool:
    return hasattr(tensor, "ds_id")


def full_shape(tensor: torch.Tensor) -> tuple[int, ...]:
    return tuple(tensor.ds_shape) if is_partitioned(tensor) else tuple(tensor.shape)


def named_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return list(module.state_dict(keep_vars=True).items())


def metadata(module: nn.Module) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """(name, dtype, full shape) of every tensor, without gathering anything."""
    return [(name, tensor.dtype, full_shape(tensor)) for name, tensor in named_tensors(module)]


def full_tensor_buckets(module: nn.Module, bucket_bytes: int, *, device: torch.device | str | None = None,
                        copy: bool = True) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Buckets of (name, full tensor copy); each bucket's partitioned parameters are gathered
    together (one collective per bucket, not per parameter) and released before it is yielded.
    ``copy=False`` hands out an unpartitioned tensor already on ``device`` as is (a detached
    view of the live parameter): only for a consumer done with it before the next update."""
    tensors = named_tensors(module)
    metas = [TensorMeta(name, str(t.dtype).removeprefix("torch."), full_shape(t)) for name, t in tensors]
    for bucket in plan_buckets(metas, bucket_bytes):
        members = [tensors[i] for i in bucket]
        unique: dict[int, torch.Tensor] = {id(t): t for _, t in members if is_partitioned(t)}
        with deepspeed.zero.GatheredParameters(list(unique.values()), modifier_rank=None, enabled=bool(unique)):
            out = [(name, _copy(tensor, device, always=copy)) for name, tensor in members]
        yield out


def full_tensors(module: nn.Module, bucket_bytes: int, *, device: torch.device | str | None = None,
                 copy: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    for bucket in full_tensor_buckets(module, bucket_bytes, device=device, copy=copy):
        yield from bucket


def copy_weights(source: nn.Module, target: nn.Module, bucket_bytes: int) -> None:
    """Copy every tensor of ``source`` into the same-named tensor of ``target`` (either may be
    ZeRO-3 partitioned; a collective then)."""
    targets = dict(named_tensors(target))
    for bucket in full_tensor_buckets(source, bucket_bytes):
        params = {id(targets[name]): targets[name] for name, _ in bucket if is_partitioned(targets[name])}
        # modifier_rank=0: rank 0's copy is re-partitioned; every rank holds the same values anyway.
        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0, enabled=bool(params)):
            with torch.no_grad():
                for name, tensor in bucket:
                    targets[name].data.copy_(tensor.to(targets[name].device, targets[name].dtype))


def _copy(tensor: torch.Tensor, device: torch.device | str | None, *, always: bool = True) -> torch.Tensor:
    detached = tensor.detach()
    if math.prod(detached.shape) == 0 and is_partitioned(tensor):
        raise RuntimeError("weight export: a partitioned parameter was not gathered")
    # A gathered partition is released when its bucket is done: that one is always copied.
    return detached.to(device or detached.device, copy=always or is_partitioned(tensor))
