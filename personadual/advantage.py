"""DualGRPO advantages (docs/ARCHITECTURE.md, "The objective"): pure, vectorised torch functions.

``groups`` holds a prompt index per response, never positions: a reordered batch keeps
its groups. A plain-loop reference of every estimator lives in tests/ and is checked
against these on random inputs. Estimators register by name (``algo.advantage``); the
names are declared torch-free in ``personadual/estimators.py`` for config validation.
Responses without a valid mode (``NO_MODE``) are handled here only: ``batch_advantages``
centres them on their whole group and ``token_advantages`` gives them no prefix weight.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from personadual.estimators import ADVANTAGE_ESTIMATORS, ADVANTAGE_SCALES, NO_MODE

# (rewards (N,), modes (N,) of 0/1, groups (N,)) -> (N,) sequence advantages.
Estimator = Callable[[Tensor, Tensor, Tensor], Tensor]
_ESTIMATORS: dict[str, Estimator] = {}


def register_advantage_estimator(name: str) -> Callable[[Estimator], Estimator]:
    """Register ``fn(rewards, modes, groups)`` as ``algo.advantage: name``."""
    if name not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"advantage estimator {name!r}: declare it in personadual/estimators.py "
                         f"(config validation reads the names there)")

    def register(fn: Estimator) -> Estimator:
        if name in _ESTIMATORS:
            raise ValueError(f"advantage estimator {name!r}: registered twice")
        _ESTIMATORS[name] = fn
        return fn
    return register


def advantage_estimator(name: str) -> Estimator:
    if name not in _ESTIMATORS:
        raise ValueError(f"algo.advantage: expected one of {list(_ESTIMATORS)}, got {name!r}")
    return _ESTIMATORS[name]


def _dense_group_index(groups: Tensor) -> tuple[Tensor, int]:
    unique, inverse = torch.unique(groups, return_inverse=True)
    return inverse, int(unique.numel())


def _segment_mean(values: Tensor, segment: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """Mean of ``values`` per segment id and the number of members of each segment."""
    sums = torch.zeros(count, dtype=values.dtype, device=values.device).index_add_(0, segment, values)
    sizes = torch.zeros(count, dtype=values.dtype, device=values.device).index_add_(
        0, segment, torch.ones_like(values))
    return sums / sizes.clamp_min(1), sizes


def _check(rewards: Tensor, *others: Tensor) -> None:
    if rewards.dim() != 1:
        raise ValueError(f"rewards: expected shape (N,), got {tuple(rewards.shape)}")
    for other in others:
        if other.shape != rewards.shape:
            raise ValueError(f"expected shape {tuple(rewards.shape)}, got {tuple(other.shape)}")


def _mode_means(rewards: Tensor, modes: Tensor, groups: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per response: its (group, mode) mean, the (group, other mode) mean, and whether the
    group holds the other mode at all."""
    if modes.numel() and not bool(((modes == 0) | (modes == 1)).all()):
        raise ValueError("modes: expected 0 (general) or 1 (personalized) for every response")
    group_index, group_count = _dense_group_index(groups)
    cell = group_index * 2 + modes.long()
    cell_mean, cell_size = _segment_mean(rewards, cell, group_count * 2)
    other_cell = group_index * 2 + (1 - modes.long())
    return cell_mean[cell], cell_mean[other_cell], cell_size[other_cell] > 0


@register_advantage_estimator("dual")
def dual_grpo_advantages(rewards: Tensor, modes: Tensor, groups: Tensor, *,
                         inter: bool = True) -> Tensor:
    """A_i = (r_i - mean_{g,m}) + (mean_{g,m} - mean_{g,other}) when inter and the group
    holds both modes, else r_i - mean_{g,m}. The sum is r_i - mean of the other mode."""
    _check(rewards, modes, groups)
    rewards = rewards.float()
    own_mean, other_mean, has_other = _mode_means(rewards, modes, groups)
    intra = rewards - own_mean
    if not inter:
        return intra
    return intra + torch.where(has_other, own_mean - other_mean, torch.zeros_like(own_mean))


def grpo_advantages(rewards: Tensor, groups: Tensor) -> Tensor:
    """Plain GRPO centering, r_i - mean over the whole group (the w/o-DualAdv ablation)."""
    _check(rewards, groups)
    rewards = rewards.float()
    group_index, group_count = _dense_group_index(groups)
    mean, _ = _segment_mean(rewards, group_index, group_count)
    return rewards - mean[group_index]


def _group_mean_std(rewards: Tensor, groups: Tensor) -> tuple[Tensor, Tensor]:
    """Per response: its group's mean reward and unbiased std (as torch.std in the released
    trainer; a singleton group has std 0)."""
    group_index, group_count = _dense_group_index(groups)
    mean, size = _segment_mean(rewards, group_index, group_count)
    # Two passes: E[x^2] - E[x]^2 cancels catastrophically in float32 for nearly equal
    # rewards (a std of 0 where the spread is tiny but real).
    centred_sq, _ = _segment_mean((rewards - mean[group_index]).square(), group_index, group_count)
    var = centred_sq * size / (size - 1).clamp_min(1)
    return mean[group_index], var.sqrt()[group_index]


@register_advantage_estimator("dual_released")
def released_dual_advantages(rewards: Tensor, modes: Tensor, groups: Tensor, *,
                             eps: float = 1e-6) -> Tensor:
    """The authors' released variant: GRPO advantages normalised by the group std over all
    2n responses (A), then intra = A_i - mean of its own mode's A and inter = A_i - mean of
    the other mode's A, summed. A group holding one mode gets intra only."""
    _check(rewards, modes, groups)
    rewards = rewards.float()
    mean, std = _group_mean_std(rewards, groups)
    normalised = (rewards - mean) / (std + eps)
    own_mean, other_mean, has_other = _mode_means(normalised, modes, groups)
    intra = normalised - own_mean
    inter = torch.where(has_other, normalised - other_mean, torch.zeros_like(normalised))
    return intra + inter


def scale_by_group_std(advantages: Tensor, rewards: Tensor, groups: Tensor, *,
                       eps: float = 1e-6) -> Tensor:
    """Optional std normalisation (``algo.scale: group_std``); off by default, as in the paper."""
    _check(rewards, advantages, groups)
    _, std = _group_mean_std(rewards.float(), groups)
    return advantages / (std + eps)


@register_advantage_estimator("grpo")
def _grpo_estimator(rewards: Tensor, modes: Tensor, groups: Tensor) -> Tensor:
    return grpo_advantages(rewards, groups)


def sequence_advantages(kind: str, rewards: Tensor, modes: Tensor, groups: Tensor) -> Tensor:
    """The ``algo.advantage`` estimator named ``kind``, over responses that all hold a mode."""
    return advantage_estimator(kind)(rewards, modes, groups)


def token_advantages(seq_adv: Tensor, response_mask: Tensor, *, prefix_tokens: int = 1,
                     beta: float = 2.0, modes: Tensor | None = None) -> Tensor:
    """(N, T) per-token advantages: seq_adv over the response tokens, the first
    ``prefix_tokens`` unmasked response positions of each row times beta, zero elsewhere.
    A row whose mode is ``NO_MODE`` has no mode token, so none of its tokens is weighted."""
    if response_mask.dim() != 2 or seq_adv.shape != response_mask.shape[:1]:
        raise ValueError(f"expected seq_adv (N,) and response_mask (N, T), got "
                         f"{tuple(seq_adv.shape)} and {tuple(response_mask.shape)}")
    if modes is not None and modes.shape != seq_adv.shape:
        raise ValueError(f"modes: expected shape {tuple(seq_adv.shape)}, got {tuple(modes.shape)}")
    mask = response_mask.to(seq_adv.dtype if seq_adv.is_floating_point() else torch.float32)
    position = torch.cumsum(response_mask.long(), dim=1)  # 1-based index among unmasked tokens
    is_prefix = (position <= prefix_tokens) & response_mask.bool()
    if modes is not None:
        is_prefix &= (modes != NO_MODE).to(is_prefix.device).unsqueeze(1)
    weight = torch.where(is_prefix, torch.full_like(mask, beta), mask)
    return seq_adv.to(mask.dtype).unsqueeze(1) * weight


def batch_advantages(kind: str, rewards: Tensor, modes: Tensor, groups: Tensor, *,
                     scale: str = "none") -> Tensor:
    """Sequence advantages for a scored batch. ``modes`` is ``NO_MODE`` where a (free-mode)
    response declared no valid mode: those are centred on their whole group (plain GRPO),
    since no mode mean applies to them; the rest use the configured estimator among themselves."""
    _check(rewards, modes, groups)
    rewards = rewards.float()
    valid = modes != NO_MODE
    advantages = grpo_advantages(rewards, groups)
    if bool(valid.any()):
        advantages[valid] = sequence_advantages(kind, rewards[valid], modes[valid], groups[valid])
    if scale == "group_std":
        return scale_by_group_std(advantages, rewards, groups)
    if scale != "none":
        raise ValueError(f"algo.scale: expected one of {list(ADVANTAGE_SCALES)}, got {scale!r}")
    return advantages


_unimplemented = sorted(set(ADVANTAGE_ESTIMATORS) - set(_ESTIMATORS))
if _unimplemented:
    raise ImportError(f"advantage estimators declared in personadual/estimators.py without an "
                      f"implementation: {_unimplemented}")
