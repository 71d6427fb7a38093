"""What the learner trains on: samples, the scored batch with its advantages, rank shards,
and micro-batches sized by token count.

Sequence advantages are computed once over the WHOLE scored batch (groups by prompt id,
never by position) before it is split across ranks, so sharding cannot change them.
Everything here is plain Python and torch: batches cross process boundaries as lists.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field, replace
from typing import Sequence, TypeVar

import torch

from learner.shared_prefix import PackedLayout, frame_sources, pack_rows, packed_inputs
from personadual.advantage import batch_advantages, token_advantages
from personadual.estimators import NO_MODE
from personadual.evaluation import EVAL_SETTINGS, setting_of
from personadual.modes import Mode
from personadual.records import Scored


@dataclass
class SftSample:
    prompt_token_ids: list[int]
    response_token_ids: list[int]  # the mode token first; the only tokens that carry loss

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError("SftSample.prompt_token_ids: must not be empty")
        if not self.response_token_ids:
            raise ValueError("SftSample.response_token_ids: must not be empty")

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.response_token_ids)


@dataclass
class PolicySample:
    prompt_token_ids: list[int]
    response_token_ids: list[int]
    advantage: float  # the sequence advantage; per-token weights are applied in the step
    mode: int  # 0 general, 1 personalized, -1 no valid mode (no beta-weighted prefix then)
    reward: float
    # The engine's sampling log-prob of each response token (empty: unknown), and whether the
    # first response token (the mode token) was forced rather than sampled.
    engine_logprobs: list[float] = field(default_factory=list)
    forced: bool = False
    setting: int = -1  # index in personadual.evaluation.EVAL_SETTINGS of the prompt's setting; -1: unknown
    # The frozen reference's log-prob of each response token, when a reference worker computed
    # them beside generation (actors/reference_worker.py); empty: the learner computes them.
    reference_logprobs: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.engine_logprobs and len(self.engine_logprobs) != len(self.response_token_ids):
            raise ValueError(f"PolicySample.engine_logprobs: {len(self.engine_logprobs)} for "
                             f"{len(self.response_token_ids)} response tokens")
        if self.reference_logprobs and len(self.reference_logprobs) != len(self.response_token_ids):
            raise ValueError(f"PolicySample.reference_logprobs: {len(self.reference_logprobs)} for "
                             f"{len(self.response_token_ids)} response tokens")

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.response_token_ids)


@dataclass
class PolicyBatch:
    samples: list[PolicySample]
    # Whole-batch statistics, computed before sharding (identical on every rank).
    stats: dict[str, float] = field(default_factory=dict)
    # The temperature the engines sampled at: their log-probs are of the tempered distribution,
    # so the learner tempers its own the same way to compare them (mismatch, correction).
    sampling_temperature: float = 1.0

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def response_tokens(self) -> int:
        return sum(len(s.response_token_ids) for s in self.samples)


def build_policy_batch(scored: Sequence[Scored], *, advantage: str = "dual", scale: str = "none",
                       sampling_temperature: float = 1.0) -> PolicyBatch:
    """The kept samples of a scored batch with their sequence advantages.

    Dropped samples (no reward) are left out before advantages are computed, so they shift
    no group mean. Free-mode responses without a valid mode enter as ``NO_MODE`` (centred on
    their whole group by ``batch_advantages``). ``advantage`` and ``scale`` are ``algo``'s.
    """
    kept = [s for s in scored if s.status != "dropped"]
    if not kept:
        raise ValueError("policy batch: every sample was dropped; nothing to train on")
    for item in kept:
        if not item.rollout.response_token_ids:
            raise ValueError(f"policy batch: prompt {item.rollout.prompt.id!r} has an empty response")
    group_index: dict[str, int] = {}
    groups = torch.tensor([group_index.setdefault(s.rollout.group_id, len(group_index)) for s in kept])
    rewards = torch.tensor([float(s.reward) for s in kept], dtype=torch.float64)
    modes = torch.tensor([NO_MODE if s.rollout.mode is None else int(s.rollout.mode) for s in kept])
    advantages = batch_advantages(advantage, rewards, modes, groups, scale=scale)
    samples = [PolicySample(list(s.rollout.prompt_token_ids), list(s.rollout.response_token_ids),
                            float(a), int(m), float(s.reward), engine_logprobs=list(s.rollout.response_logprobs),
                            forced=bool(s.rollout.forced), setting=EVAL_SETTINGS.index(setting_of(s.rollout.prompt)),
                            reference_logprobs=list(s.rollout.reference_logprobs))
               for s, a, m in zip(kept, advantages.tolist(), modes.tolist())]
    stats: dict[str, float] = {"samples": float(len(samples)), "dropped": float(len(scored) - len(kept)),
                               "reward/mean": float(rewards.mean()),
                               "advantage/abs_mean": float(advantages.abs().mean())}
    for mode in Mode:  # a mode no response carries gets no reward entry (not NaN)
        chosen = modes == int(mode)
        stats[f"samples/{mode.name.lower()}"] = float(chosen.sum())
        if bool(chosen.any()):
            stats[f"reward/{mode.name.lower()}"] = float(rewards[chosen].mean())
    return PolicyBatch(samples, stats, sampling_temperature)


T = TypeVar("T")


def shard_indices(lengths: Sequence[int], world_size: int) -> list[list[int]]:
    """Indices per rank, balanced by token count: longest first, each to the rank holding
    the fewest tokens so far (ties to the lowest rank). Deterministic, so every rank derives
    the same plan; each rank's indices are kept in batch order."""
    if world_size < 1:
        raise ValueError(f"world_size: must be >= 1, got {world_size}")
    heap = [(0, rank) for rank in range(world_size)]
    assigned: list[list[int]] = [[] for _ in range(world_size)]
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        load, rank = heapq.heappop(heap)
        assigned[rank].append(index)
        heapq.heappush(heap, (load + lengths[index], rank))
    return [sorted(indices) for indices in assigned]


def shard(batch: PolicyBatch | Sequence[SftSample], rank: int, world_size: int, *, by_prompt: bool = False):
    """This rank's part of a batch (a PolicyBatch keeps the whole-batch stats). ``by_prompt``
    keeps the samples of one prompt on one rank (balanced by the positions they take packed,
    learner/shared_prefix.py), so each prompt is computed once in the whole step."""
    samples = batch.samples if isinstance(batch, PolicyBatch) else list(batch)
    part = [samples[i] for i in shard_members(samples, rank, world_size, by_prompt=by_prompt)]
    return replace(batch, samples=part) if isinstance(batch, PolicyBatch) else part


def shard_members(samples: Sequence[SftSample | PolicySample], rank: int, world_size: int, *,
                  by_prompt: bool = False) -> list[int]:
    """The indices of ``samples`` that ``shard`` gives rank ``rank``, in batch order."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank: expected 0 <= rank < {world_size}, got {rank}")
    if by_prompt:
        units: dict[tuple[int, ...], list[int]] = {}
        for index, sample in enumerate(samples):
            units.setdefault(tuple(sample.prompt_token_ids), []).append(index)
        members = list(units.values())
        sizes = [len(samples[m[0]].prompt_token_ids) + sum(len(samples[i].response_token_ids) for i in m)
                 for m in members]
        return sorted(i for unit in shard_indices(sizes, world_size)[rank] for i in members[unit])
    return shard_indices([s.num_tokens for s in samples], world_size)[rank]


def split_even(items: Sequence[T], parts: int) -> list[list[T]]:
    """``parts`` consecutive chunks whose sizes differ by at most one (some may be empty)."""
    size, extra = divmod(len(items), parts)
    chunks, start = [], 0
    for part in range(parts):
        end = start + size + (1 if part < extra else 0)
        chunks.append(list(items[start:end]))
        start = end
    return chunks


def plan_micro_batches(lengths: Sequence[int], micro_batch_tokens: int) -> list[list[int]]:
    """Group indices so each group's padded size (members x longest member) fits
    ``micro_batch_tokens``; similar lengths go together to waste little padding. A sequence
    longer than the budget goes alone."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    groups: list[list[int]] = []
    for index in order:
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= micro_batch_tokens:
            groups[-1].append(index)
        else:
            groups.append([index])
    return groups


@dataclass
class MicroBatch:
    """Right-padded sequences and the response positions, in the frame of the logits kept:
    column j of ``targets``/``response_mask`` is the token at position ``start + 1 + j``,
    predicted from position ``start + j``."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    start: int  # first position whose logits are needed (shortest prompt - 1)
    targets: torch.Tensor  # (B, K) token ids to score
    response_mask: torch.Tensor  # (B, K) 1 on response tokens
    indices: list[int]  # which samples of the shard the rows are
    # Policy samples only: the engine's sampling log-probs (B, K), and 1 on the response tokens
    # the engine sampled (not the forced mode token; none where the engine's are unknown).
    engine_logprobs: torch.Tensor | None = None
    sampled_mask: torch.Tensor | None = None
    # Shared-prefix micro-batches only: ``input_ids``/``attention_mask`` are then the packed
    # rows (one per prompt, learner/shared_prefix.py) and this maps them to the frame above.
    layout: PackedLayout | None = None
    # Policy samples only: the reference's log-probs (B, K) when every row came with them.
    reference_logprobs: torch.Tensor | None = None

    @property
    def logits_to_keep(self) -> int:
        return self.layout.keep if self.layout is not None else self.input_ids.shape[1] - self.start

    @property
    def num_response_tokens(self) -> int:
        return int(self.response_mask.sum())

    def to(self, device: str | torch.device) -> "MicroBatch":
        def moved(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.to(device)

        return replace(self, input_ids=self.input_ids.to(device), attention_mask=self.attention_mask.to(device),
                       targets=self.targets.to(device), response_mask=self.response_mask.to(device),
                       engine_logprobs=moved(self.engine_logprobs), sampled_mask=moved(self.sampled_mask),
                       reference_logprobs=moved(self.reference_logprobs),
                       layout=None if self.layout is None else self.layout.to(device))


def collate(samples: Sequence[SftSample | PolicySample], indices: list[int], pad_token_id: int = 0) -> MicroBatch:
    rows = [samples[i] for i in indices]
    width = max(r.num_tokens for r in rows)
    start = min(len(r.prompt_token_ids) for r in rows) - 1
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    response_mask = torch.zeros((len(rows), width), dtype=torch.float32)
    policy = all(isinstance(r, PolicySample) for r in rows)
    engine_logprobs = torch.zeros((len(rows), width), dtype=torch.float32) if policy else None
    sampled_mask = torch.zeros((len(rows), width), dtype=torch.float32) if policy else None
    with_reference = policy and all(r.reference_logprobs for r in rows)
    reference = torch.zeros((len(rows), width), dtype=torch.float32) if with_reference else None
    for row, sample in enumerate(rows):
        prompt, response = len(sample.prompt_token_ids), len(sample.response_token_ids)
        input_ids[row, :prompt + response] = torch.tensor(sample.prompt_token_ids + sample.response_token_ids)
        attention_mask[row, :prompt + response] = 1
        response_mask[row, prompt:prompt + response] = 1
        if policy and sample.engine_logprobs:
            engine_logprobs[row, prompt:prompt + response] = torch.tensor(sample.engine_logprobs)
            # A forced mode token was never sampled: it has no behaviour probability.
            sampled_mask[row, prompt + (1 if sample.forced else 0):prompt + response] = 1
        if reference is not None:
            reference[row, prompt:prompt + response] = torch.tensor(sample.reference_logprobs)
    return MicroBatch(input_ids, attention_mask, start, input_ids[:, start + 1:], response_mask[:, start + 1:],
                      list(indices),
                      engine_logprobs[:, start + 1:] if policy else None,
                      sampled_mask[:, start + 1:] if policy else None,
                      reference_logprobs=reference[:, start + 1:] if reference is not None else None)


def micro_batches(samples: Sequence[SftSample | PolicySample], micro_batch_tokens: int,
                  pad_token_id: int = 0, *, shared_prefix: bool = False) -> list[MicroBatch]:
    """The micro-batches of ``samples``. With ``shared_prefix`` the samples of one prompt are
    packed into one row (its prompt computed once; learner/shared_prefix.py) and the budget
    counts packed positions; a group is split only when its row alone would pass the budget."""
    if not shared_prefix:
        plan = plan_micro_batches([s.num_tokens for s in samples], micro_batch_tokens)
        return [collate(samples, group, pad_token_id) for group in plan]
    prompts = [s.prompt_token_ids for s in samples]
    responses = [s.response_token_ids for s in samples]
    prompt_lengths = [len(p) for p in prompts]
    response_lengths = [len(r) for r in responses]
    rows = pack_rows(prompts, response_lengths, micro_batch_tokens)
    batches = []
    for group in plan_micro_batches([row.num_tokens for row in rows], micro_batch_tokens):
        chosen = [rows[i] for i in group]
        indices = [member for row in chosen for member in row.members]
        frame = collate(samples, indices, pad_token_id)
        input_ids, real, position_ids, segments, starts = packed_inputs(chosen, responses, pad_token_id)
        source, keep = frame_sources(chosen, starts, indices, prompt_lengths, response_lengths, frame.start,
                                     frame.targets.shape[1], input_ids.shape[1])
        batches.append(replace(frame, input_ids=input_ids, attention_mask=real,
                               layout=PackedLayout(position_ids, segments, keep, source)))
    return batches


def plan_step_micro_batches(samples: Sequence[PolicySample], *, mini_batches: int, micro_batch_tokens: int,
                            pad_token_id: int, shared_prefix: bool) -> list[list[MicroBatch]]:
    """One rank's shard as a policy step runs it: ``mini_batches`` consecutive chunks, each in
    micro-batches whose ``indices`` point into ``samples``. The learner and the reference
    worker both plan with this, so a batch meets the model in the same shapes on both."""
    chunks = split_even(list(range(len(samples))), mini_batches)
    plans = [micro_batches([samples[i] for i in chunk], micro_batch_tokens, pad_token_id,
                           shared_prefix=shared_prefix) for chunk in chunks]
    for chunk, plan in zip(chunks, plans):  # indices relative to their chunk -> into the shard
        for mb in plan:
            mb.indices = [chunk[i] for i in mb.indices]
    return plans


def per_row(values: Sequence[float], batch: MicroBatch, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A per-sample value for each row of a micro-batch."""
    return torch.tensor([values[i] for i in batch.indices], dtype=dtype)



def micro_batch_advantages(samples: Sequence[PolicySample], batch: MicroBatch, *, prefix_tokens: int,
                           beta: float) -> torch.Tensor:
    """(B, K) per-token advantages of a micro-batch's rows: the sequence advantage on every
    response token, the first ``prefix_tokens`` (the mode token) times beta (none for a
    response without a valid mode: ``token_advantages``)."""
    if not batch.indices:
        return torch.zeros_like(batch.response_mask)
    device = batch.response_mask.device
    seq = torch.tensor([samples[i].advantage for i in batch.indices], dtype=torch.float32, device=device)
    modes = torch.tensor([samples[i].mode for i in batch.indices], device=device)
    return token_advantages(seq, batch.response_mask, prefix_tokens=prefix_tokens, beta=beta, modes=modes)
