"""Give a base model the two mode tokens: ``python -m personadual.prepare model --base B --out O``.

A base model's tokenizer (Qwen3's included) has no ``[General_mode]`` / ``[Personalized_mode]``.
Each is added as ONE special token (never split, one id, so a response's mode is its first
token id), the input embeddings and the LM head get a row for each, and the folder is saved
in HF format with the base's chat template and generation config, loadable by ``launch.py``,
``transformers`` and vLLM.

Initialisation of a new token's rows (input embedding and, when untied, the LM head): the
mean of the rows of the sub-tokens the base tokenizer splits the tag's text into (e.g.
``[``, ``General``, ``_mode``, ``]``). The new token starts as "what the model already reads
in that text", which keeps its first logits in the range of the model's own rather than at
the random scale a fresh row would have. A model whose embedding matrix is padded past the
tokenizer (Qwen3: 151936 rows for 151669 tokens) keeps its size and the new ids take padding
rows; otherwise the matrices grow by the tokens added.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

from personadual.data import DataError
from personadual.modes import MODE_TOKENS, Mode, mode_token_ids

INIT_METHOD = "mean_of_subtokens"
MARKER = "personadual_prepare.json"


@dataclass(frozen=True)
class PreparedModel:
    out: str
    base: str
    mode_token_ids: dict[str, int]
    added: list[str]  # the tokens this call added ([] when the base already had both)
    init: str
    subtoken_ids: dict[str, list[int]]  # the rows each new token's initial row is the mean of
    embedding_rows: int
    vocab_size_before: int
    chat_template_kept: bool


def _has_mode_tokens(tokenizer: Any) -> bool:
    try:
        mode_token_ids(tokenizer)
    except ValueError:
        return False
    return True


def _load_base(base: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (base / "config.json").is_file():
        raise DataError(f"--base: {base} has no config.json (expected an HF model folder)")
    tokenizer = AutoTokenizer.from_pretrained(base)
    # The base's own dtype (bf16 for Qwen3), so the saved folder is the size of the base.
    model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    return tokenizer, model


def add_mode_tokens(tokenizer: Any, model: Any) -> tuple[list[str], dict[str, list[int]]]:
    """Add the missing mode tokens to ``tokenizer`` and give each a row in ``model``'s input
    embeddings and LM head, initialised as the mean of its text's sub-token rows. Returns the
    tokens added and the sub-token ids each was initialised from."""
    import torch

    missing = [mode.token for mode in Mode
               if tokenizer.convert_tokens_to_ids(mode.token) in (None, tokenizer.unk_token_id)
               or tokenizer.encode(mode.token, add_special_tokens=False)
               != [tokenizer.convert_tokens_to_ids(mode.token)]]
    if not missing:
        return [], {}
    # Split the tags BEFORE adding them, while the tokenizer still sees their plain text.
    pieces = {token: tokenizer.encode(token, add_special_tokens=False) for token in missing}
    for token, ids in pieces.items():
        if not ids:
            raise DataError(f"--base: the tokenizer encodes {token!r} to no tokens")
    tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
    rows_before = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows_before:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    inputs = model.get_input_embeddings().weight
    output_layer = model.get_output_embeddings()
    tied = output_layer is not None and output_layer.weight.data_ptr() == inputs.data_ptr()
    with torch.no_grad():
        for token, ids in pieces.items():
            new_id = tokenizer.convert_tokens_to_ids(token)
            inputs[new_id] = inputs[ids].float().mean(dim=0).to(inputs.dtype)
            if output_layer is not None and not tied:
                head = output_layer.weight
                head[new_id] = head[ids].float().mean(dim=0).to(head.dtype)
                bias = getattr(output_layer, "bias", None)
                if bias is not None:
                    bias[new_id] = bias[ids].float().mean().to(bias.dtype)
    return missing, pieces


def prepare_model(base: str | Path, out: str | Path, *, overwrite: bool = False) -> PreparedModel:
    """The base model at ``base`` with both mode tokens, saved to ``out`` (written beside it
    and renamed into place, so a crash never leaves a half-written model folder)."""
    base, out = Path(base).expanduser(), Path(out).expanduser()
    if out.exists() and not overwrite:
        raise DataError(f"--out: {out} already exists (pass --overwrite to replace it)")
    tokenizer, model = _load_base(base)
    template_before = tokenizer.chat_template
    vocab_before = len(tokenizer)
    added, pieces = add_mode_tokens(tokenizer, model)
    ids = mode_token_ids(tokenizer)  # one id each, round-tripping through encode
    model.config.vocab_size = model.get_input_embeddings().weight.shape[0]
    with staged_folder(out) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        report = PreparedModel(
            out=str(out), base=str(base), mode_token_ids={m.token: i for m, i in ids.items()},
            added=added, init=INIT_METHOD if added else "none", subtoken_ids=pieces,
            embedding_rows=int(model.config.vocab_size), vocab_size_before=vocab_before,
            chat_template_kept=_saved_template(staging) == template_before)
        if not report.chat_template_kept:
            raise DataError(f"--base: the chat template of {base} did not survive saving")
        (staging / MARKER).write_text(json.dumps(asdict(report), indent=2, sort_keys=True) + "\n")
    return report


@contextmanager
def staged_folder(target: Path) -> Iterator[Path]:
    """A hidden sibling of ``target`` to write into; when the block ends without an error it
    replaces ``target``, so a crash never leaves a half-written model folder."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        yield staging
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _saved_template(folder: Path) -> str | None:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder).chat_template


__all__ = ["MODE_TOKENS", "PreparedModel", "add_mode_tokens", "prepare_model"]
