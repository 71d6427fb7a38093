"""Each prompt computed once for all of its responses (``learner.shared_prefix``).

A DualGRPO group is one prompt and its 2n responses; the unshared micro-batch repeats the
prompt in every row, so most of the positions the learner computes are the same prompt again.
Here a group is packed into ONE row, ``prompt, response_1, ..., response_m``, with

- position ids that restart after the prompt for every response (each response sits at the
  positions it has in its own unshared row, so rotary embeddings see the same offsets);
- a 4D attention mask in which a prompt position sees the prompt causally and a response
  position sees the whole prompt plus its own response causally, never another response.

Every response position therefore attends to exactly the keys and values it attends to in the
unshared forward, and the prompt's keys and values are computed once and read by all of the
group's responses. It is one ordinary forward of the model, so ZeRO-2/3 and gradient
checkpointing see nothing new, and backward sums each response's gradient into the shared
prompt computation, which is the gradient of the unshared forward.

The logits come back in the unshared micro-batch's (B, K) frame (``source`` maps each column
to a packed position), so losses, masks and metrics downstream do not know the difference.
Rows of the same prompt token ids share a row whatever group they came from (the prompt's keys
and values depend only on its tokens); a group too long for the token budget, or split across
mini-batches or ranks, is packed in parts, each with its own copy of the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence

import torch

PROMPT, PADDING = 0, -1  # segment ids; response r of a packed row is segment r + 1


@dataclass
class PackedLayout:
    """How a micro-batch's rows were packed: one row per prompt, its responses after it."""

    position_ids: torch.Tensor  # (P, T)
    segments: torch.Tensor  # (P, T) PROMPT, response number (1-based) or PADDING
    keep: int  # logits kept per packed row (the last ``keep`` positions)
    source: torch.Tensor  # (B, K) flat index into the (P * keep) kept positions, per target column

    def to(self, device: str | torch.device) -> "PackedLayout":
        return replace(self, position_ids=self.position_ids.to(device), segments=self.segments.to(device),
                       source=self.source.to(device))

    def attention_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """(P, 1, T, T) additive mask: 0 where a query may attend to a key, the dtype's minimum
        elsewhere. A padding position attends to itself only, so no softmax row is empty."""
        query, key = self.segments.unsqueeze(2), self.segments.unsqueeze(1)
        width = self.segments.shape[1]
        causal = torch.ones(width, width, dtype=torch.bool, device=self.segments.device).tril()
        allowed = causal & (key != PADDING) & ((key == PROMPT) | (key == query))
        allowed |= torch.eye(width, dtype=torch.bool, device=self.segments.device) & (query == PADDING)
        mask = torch.zeros(allowed.shape, dtype=dtype, device=self.segments.device)
        return mask.masked_fill(~allowed, torch.finfo(dtype).min).unsqueeze(1)


@dataclass
class PackedRow:
    """One prompt and the shard indices of the responses packed after it."""

    prompt: tuple[int, ...]
    members: list[int]
    num_tokens: int


def pack_rows(prompts: Sequence[Sequence[int]], response_lengths: Sequence[int], max_tokens: int) -> list[PackedRow]:
    """Rows of samples sharing prompt token ids, in order of first appearance. A row holds at
    most ``max_tokens`` positions unless a single response already needs more; beyond that the
    prompt starts a new row (its keys and values are then computed once per row)."""
    rows: list[PackedRow] = []
    open_row: dict[tuple[int, ...], PackedRow] = {}
    for index, (prompt, length) in enumerate(zip(prompts, response_lengths)):
        key = tuple(prompt)
        row = open_row.get(key)
        if row is None or row.num_tokens + length > max_tokens:
            row = PackedRow(key, [], len(key))
            rows.append(row)
            open_row[key] = row
        row.members.append(index)
        row.num_tokens += length
    return rows


def packed_inputs(rows: Sequence[PackedRow], responses: Sequence[Sequence[int]], pad_token_id: int,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[dict[int, int]]]:
    """Right-padded packed rows: input ids, 2D real-token mask, position ids, segments, and per
    row where each member's response starts (shard index -> packed position)."""
    width = max(row.num_tokens for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    real = torch.zeros((len(rows), width), dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    segments = torch.full((len(rows), width), PADDING, dtype=torch.long)
    starts: list[dict[int, int]] = []
    for r, row in enumerate(rows):
        prompt = len(row.prompt)
        input_ids[r, :prompt] = torch.tensor(row.prompt)
        position_ids[r, :prompt] = torch.arange(prompt)
        segments[r, :prompt] = PROMPT
        at, found = prompt, {}
        for number, member in enumerate(row.members, start=1):
            response = responses[member]
            found[member] = at
            input_ids[r, at:at + len(response)] = torch.tensor(list(response))
            position_ids[r, at:at + len(response)] = torch.arange(prompt, prompt + len(response))
            segments[r, at:at + len(response)] = number
            at += len(response)
        real[r, :at] = 1
        starts.append(found)
    return input_ids, real, position_ids, segments, starts


def frame_sources(rows: Sequence[PackedRow], starts: Sequence[dict[int, int]], indices: Sequence[int],
                  prompt_lengths: Sequence[int], response_lengths: Sequence[int], frame_start: int,
                  frame_width: int, width: int) -> tuple[torch.Tensor, int]:
    """For each sample in ``indices`` (the unshared frame's rows) and each of its ``frame_width``
    target columns, the flat index of the packed position whose logits predict that target,
    and how many trailing positions per packed row must be kept.

    Column j of an unshared row predicts its position ``frame_start + 1 + j`` from the position
    before: the prompt's last position for the first response token, the previous response
    token after that. Columns that score no response token (a longer prompt's tail, padding)
    point at the row's last prompt position: their logits are finite and masked out."""
    first_needed = min(len(row.prompt) - 1 for row in rows)
    keep = width - first_needed
    row_of = {member: r for r, row in enumerate(rows) for member in row.members}
    source = torch.empty((len(indices), frame_width), dtype=torch.long)
    for b, index in enumerate(indices):
        r = row_of[index]
        prompt, response, start = prompt_lengths[index], response_lengths[index], starts[r][index]
        prompt_last = prompt - 1
        # Unshared position predicting column j is frame_start + j.
        unshared = torch.arange(frame_start, frame_start + frame_width)
        packed = torch.full_like(unshared, prompt_last)
        in_response = (unshared >= prompt) & (unshared < prompt + response - 1)
        packed[in_response] = start + unshared[in_response] - prompt
        source[b] = r * keep + packed - first_needed
    return source, keep


def forward_packed(model: Any, input_ids: torch.Tensor, layout: PackedLayout, dtype: torch.dtype) -> torch.Tensor:
    """(B, K, V) logits in the unshared frame from one forward over the packed rows."""
    out = model(input_ids=input_ids, attention_mask=layout.attention_mask(dtype), position_ids=layout.position_ids,
                logits_to_keep=layout.keep, use_cache=False)
    return to_unshared_frame(out.logits, layout)


def to_unshared_frame(packed_logits: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
    """The packed rows' kept logits (P, keep, V) as (B, K, V) in the unshared frame.

    The prompt's last position predicts the first token of every response in its row, so
    ``source`` names it several times and the backward sums several gradients into it.
    Advanced indexing's backward (``index_put_`` with accumulate) does that sum on CPU with
    atomic adds from every thread, in whatever order the threads arrive: the same batch gave
    gradients different in their last bits from run to run, and a whole run parted from its
    repeat (docs/ARCHITECTURE.md, "Reproducible runs"). ``index_select``'s backward
    (``index_add_``) adds in index order."""
    flat = packed_logits.reshape(-1, packed_logits.shape[-1])
    return flat.index_select(0, layout.source.reshape(-1)).view(*layout.source.shape, flat.shape[-1])
