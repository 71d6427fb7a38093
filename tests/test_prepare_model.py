"""``python -m personadual.prepare model``: a base model whose tokenizer has no mode tokens gets
them as single special tokens with embedding and LM-head rows initialised as the mean of the
tag text's sub-token rows; the folder loads in transformers, trains SFT through launch.py, and
vLLM then generates a mode token first."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from personadual.modes import MODE_TOKENS, mode_token_ids
from personadual.prepare.model import prepare_model
from personadual.prepare.tiny_models import build_base
from tests.helpers import SMOKE, run_launch

ROOT = Path(__file__).resolve().parent.parent


def build_base_without_mode_tokens(target: Path, *, padded_rows: int = 0, tied: bool = False) -> Path:
    """A Qwen3-architecture base like a downloaded one: chat special tokens and a chat
    template, but no mode tokens (the tag text is split into ordinary BPE pieces)."""
    return build_base(target, padded_rows=padded_rows, tied=tied)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return build_base_without_mode_tokens(tmp_path_factory.mktemp("base") / "base")


@pytest.fixture(scope="module")
def prepared(base_dir, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("prepared") / "model"
    result = subprocess.run([sys.executable, "-m", "personadual.prepare", "model", "--base", str(base_dir),
                             "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, json.loads(result.stdout.strip().splitlines()[-1])


def test_the_base_has_no_mode_tokens_and_the_run_would_refuse_it(base_dir):
    with pytest.raises(ValueError, match="add it as an additional special token"):
        mode_token_ids(AutoTokenizer.from_pretrained(base_dir))


def test_prepared_tokenizer_holds_each_mode_token_as_one_id_and_keeps_the_chat_template(base_dir, prepared):
    out, report = prepared
    base_tok, tok = AutoTokenizer.from_pretrained(base_dir), AutoTokenizer.from_pretrained(out)
    ids = mode_token_ids(tok)
    assert sorted(ids.values()) == [len(base_tok), len(base_tok) + 1]
    assert report["mode_token_ids"] == {m.token: i for m, i in ids.items()} and report["added"] == list(MODE_TOKENS)
    assert tok.chat_template == base_tok.chat_template and report["chat_template_kept"]
    messages = [{"role": "user", "content": "Who painted the harbour?"}]
    assert (tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            == base_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    # Text without the tags tokenises as before; a tag inside text is its one id.
    plain = "User persona: a sailor. Answer: blue"
    assert tok.encode(plain, add_special_tokens=False) == base_tok.encode(plain, add_special_tokens=False)
    tagged = tok.encode(f"{MODE_TOKENS[1]} Answer: blue", add_special_tokens=False)
    assert tagged[0] == tok.convert_tokens_to_ids(MODE_TOKENS[1])
    assert tok.decode(tagged).startswith(MODE_TOKENS[1])


def test_new_rows_are_the_mean_of_the_tag_texts_sub_token_rows_and_old_rows_are_unchanged(base_dir, prepared):
    out, report = prepared
    base_tok = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(out)
    rows = len(base_tok)
    assert model.get_input_embeddings().weight.shape[0] == rows + 2 == model.config.vocab_size
    for matrix, base_matrix in ((model.get_input_embeddings().weight, base.get_input_embeddings().weight),
                                (model.get_output_embeddings().weight, base.get_output_embeddings().weight)):
        assert torch.equal(matrix[:rows], base_matrix)
        for token in MODE_TOKENS:
            pieces = base_tok.encode(token, add_special_tokens=False)
            assert len(pieces) > 1 and report["subtoken_ids"][token] == pieces
            new_id = report["mode_token_ids"][token]
            torch.testing.assert_close(matrix[new_id], base_matrix[pieces].mean(dim=0))


def test_a_padded_embedding_matrix_keeps_its_size_and_the_new_ids_take_padding_rows(tmp_path):
    base = build_base_without_mode_tokens(tmp_path / "padded", padded_rows=64)
    report = prepare_model(base, tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert report.embedding_rows == model.get_input_embeddings().weight.shape[0] == report.vocab_size_before + 64
    assert sorted(report.mode_token_ids.values()) == [report.vocab_size_before, report.vocab_size_before + 1]


def test_tied_embeddings_stay_tied_with_the_new_rows_in_both(tmp_path):
    base = build_base_without_mode_tokens(tmp_path / "tied", tied=True)
    report = prepare_model(base, tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.tie_word_embeddings
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    base_rows = AutoModelForCausalLM.from_pretrained(base).get_input_embeddings().weight
    for token, pieces in report.subtoken_ids.items():
        torch.testing.assert_close(model.get_input_embeddings().weight[report.mode_token_ids[token]],
                                   base_rows[pieces].mean(dim=0))


def test_preparing_a_prepared_model_adds_nothing(prepared, tmp_path):
    out, report = prepared
    again = prepare_model(out, tmp_path / "again")
    assert again.added == [] and again.init == "none" and again.mode_token_ids == report["mode_token_ids"]


@pytest.mark.parametrize("case", ["out_exists", "base_not_a_model"])
def test_bad_arguments_exit_2_with_one_line_naming_the_flag(case, prepared, tmp_path):
    out, _ = prepared
    base, target = (out, out) if case == "out_exists" else (tmp_path, tmp_path / "x")
    result = subprocess.run([sys.executable, "-m", "personadual.prepare", "model", "--base", str(base),
                             "--out", str(target)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: --out:" if case == "out_exists" else "error: --base:")
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_prepared_model_trains_sft_and_vllm_then_generates_a_mode_token_first(prepared, tmp_path):
    out, _ = prepared
    result = run_launch("--config", str(SMOKE), f"model.path={out}", "algo.steps=0", "sft.steps=40",
                        "eval.baselines=false", "eval.two_turn_cases=0", "rollout.engine=vllm",
                        f"run.out_dir={tmp_path}", "run.name=prepared", timeout=880)
    assert result.returncode == 0, result.stderr[-4000:]
    run_dir = tmp_path / "prepared"
    summary = json.loads((run_dir / "summary.json").read_text())
    # The final eval is free-mode greedy generation by the vLLM engine: every response's
    # first generated token is one of the two mode ids.
    for setting, result_ in summary["eval"].items():
        if isinstance(result_, dict) and "no_mode_rate" in result_:
            assert result_["no_mode_rate"] == 0.0, (setting, result_)
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert samples and all(s["response"].startswith(MODE_TOKENS) and s["mode"] != "none" for s in samples)
    mode_token_ids(AutoTokenizer.from_pretrained(run_dir / "policy"))
