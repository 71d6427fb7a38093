"""Checking a full weight update (HF parameter names, full tensors) against the engine's names.

An update that misses a tensor would leave part of the engine on old weights, and vLLM
only logs that ("Failed to load weights"), so every update is checked against the names
the engine was built from before anything is loaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Mapping

import torch
from safetensors import safe_open

NamedTensors = Iterable[tuple[str, torch.Tensor]] | Mapping[str, torch.Tensor]


def as_list(named_tensors: NamedTensors) -> list[tuple[str, torch.Tensor]]:
    items = named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors
    out = [(str(name), tensor) for name, tensor in items]
    for name, tensor in out:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"load_weights: {name}: expected a tensor, got {type(tensor).__name__}")
    return out


def check_names(names: Iterable[str], expected: set[str], *, aliases: set[str] = frozenset()) -> None:
    """Every expected name present once, nothing unknown (``aliases`` may be sent or not)."""
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"load_weights: tensor {name!r} sent twice")
        seen.add(name)
    missing = sorted(expected - seen)
    unknown = sorted(seen - expected - set(aliases))
    if missing:
        raise ValueError(f"load_weights: update lacks {len(missing)} tensor(s), e.g. {missing[:3]}; "
                         "send every tensor (a partial update would keep old weights)")
    if unknown:
        raise ValueError(f"load_weights: {len(unknown)} unknown tensor(s), e.g. {unknown[:3]}")


def checkpoint_names(model_path: str | Path) -> set[str] | None:
    """Tensor names in a model folder's safetensors files (headers only), or None without any."""
    files = sorted(Path(model_path).glob("*.safetensors"))
    if not files:
        return None
    names: set[str] = set()
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            names.update(handle.keys())
    return names


def tied_word_embeddings(model_path: str | Path) -> bool:
    config = json.loads((Path(model_path) / "config.json").read_text())
    text_config = config.get("text_config", config)
    return bool(text_config.get("tie_word_embeddings", config.get("tie_word_embeddings", False)))
