"""Reads an offline W&B run's ``.wandb`` file back, with wandb's own protobuf definitions.

wandb 0.31 ships no Python reader of its transaction log any more. The file is a LevelDB-style
log: a 7-byte header (``:W&B``, magic 0xBEE1, version 0), then 32 KiB blocks of chunks, each
``crc32 (4) | length (2) | type (1) | data``; a record is one FULL chunk or FIRST, MIDDLE...,
LAST; its data is a serialized ``wandb_internal_pb2.Record``."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BLOCK = 32 * 1024
FILE_HEADER = struct.Struct("<4sHB")
CHUNK_HEADER = struct.Struct("<IHB")
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


@dataclass
class HistoryRow:
    step: int
    values: dict[str, Any] = field(default_factory=dict)


def records(path: Path) -> list[Any]:
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    ident, magic, version = FILE_HEADER.unpack_from(data, 0)
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), (ident, magic, version)
    position, pending, out = FILE_HEADER.size, b"", []
    while position + CHUNK_HEADER.size <= len(data):
        left_in_block = BLOCK - position % BLOCK
        if left_in_block < CHUNK_HEADER.size:  # block tail too short for a header: padding
            position += left_in_block
            continue
        _, length, kind = CHUNK_HEADER.unpack_from(data, position)
        chunk = data[position + CHUNK_HEADER.size: position + CHUNK_HEADER.size + length]
        position += CHUNK_HEADER.size + length
        if kind == 0 and length == 0:  # zero padding at a block's end
            position += BLOCK - position % BLOCK if position % BLOCK else 0
            continue
        if kind in (FULL, FIRST):
            pending = chunk
        else:
            pending += chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def history(path: Path) -> list[HistoryRow]:
    """The run's history rows, in order, each with its step and its keys' decoded values."""
    rows = []
    for record in records(path):
        if record.WhichOneof("record_type") != "history":
            continue
        row = HistoryRow(step=int(record.history.step.num))
        for item in record.history.item:
            key = "/".join(item.nested_key) if item.nested_key else item.key
            row.values[key] = json.loads(item.value_json)
        rows.append(row)
    return rows


def wandb_file(run_dir: Path) -> Path:
    files = sorted(Path(run_dir).rglob("*.wandb"))
    assert len(files) == 1, files
    return files[0]
