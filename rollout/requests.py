"""What both engines share: turning Prompts into generation requests, and samples into Rollouts.

A request is one rendered prompt, optionally followed by a forced mode token, asking for
``n`` samples. Forced-prefix sampling makes one request per (prompt, mode); free mode one
per prompt. Rollouts come back grouped by prompt id, in the order the prompts were given,
with ``sample_index`` unique within a prompt id (a prompt listed twice continues its count).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from personadual.modes import Mode, mode_of_token_ids, mode_token_ids
from personadual.prompts import render_prompt
from personadual.records import Prompt, Rollout
from personadual.seeds import derive_seed

# Forced mode tokens were not sampled, so they carry no sampling logprob. The learner
# recomputes every response token's logprob under the current policy (the mode token
# included), so nothing downstream reads this placeholder as a probability.
FORCED_TOKEN_LOGPROB = 0.0


@dataclass(frozen=True)
class GenerationRequest:
    prompt: Prompt
    prompt_token_ids: list[int]  # the rendered chat prompt, without any forced token
    mode: Mode | None  # the forced mode; None: the model picks (free mode)
    n: int
    first_sample_index: int
    max_new_tokens: int  # tokens to sample after the forced token, if any
    # Seeds this request's sampling (its n samples draw seed, seed + 1, ... in vLLM);
    # None: the engine's own random stream.
    seed: int | None = None

    def input_token_ids(self, mode_ids: dict[Mode, int]) -> list[int]:
        """What the engine is fed: the forced mode token goes at the end of the prompt."""
        if self.mode is None:
            return list(self.prompt_token_ids)
        return [*self.prompt_token_ids, mode_ids[self.mode]]


@dataclass(frozen=True)
class Sample:
    """One sequence an engine produced for a request (tokens after the engine's input)."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # stop | length | abort


class PromptCodec:
    """Tokenizer-side facts both engines need: mode ids, stop ids, prompt tokens, decoding."""

    def __init__(self, tokenizer: Any, model_path: str | Path, *, max_model_len: int,
                 max_response_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.mode_ids = mode_token_ids(tokenizer)  # asserts each is one special id that round-trips
        self.stop_token_ids = stop_token_ids(tokenizer, model_path)
        self.max_model_len = max_model_len
        self.max_response_tokens = max_response_tokens

    def plan(self, prompts: Sequence[Prompt], *, forced: bool, n: int,
             histories: Sequence[Sequence[dict[str, str]]] | None = None,
             modes: Sequence[Mode] | None = None, seeds: Sequence[int] | None = None) -> list[GenerationRequest]:
        """``seeds``: one per prompt; each request's seed derives from its prompt's seed and
        its first sample index (personadual/seeds.py)."""
        if n < 1:
            raise ValueError(f"generate: n must be >= 1, got {n}")
        if histories is not None and len(histories) != len(prompts):
            raise ValueError(f"generate: {len(histories)} histories for {len(prompts)} prompts")
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"generate: {len(seeds)} seeds for {len(prompts)} prompts")
        if modes is not None and not forced:
            raise ValueError("generate: modes only restricts forced-prefix sampling (forced=True)")
        forced_modes = [Mode(m) for m in (modes if modes is not None else list(Mode))] if forced else [None]
        if forced and (not forced_modes or len(set(forced_modes)) != len(forced_modes)):
            raise ValueError(f"generate: modes must be distinct and non-empty, got {modes!r}")
        next_index: dict[str, int] = {}
        requests: list[GenerationRequest] = []
        for position, prompt in enumerate(prompts):
            if not isinstance(prompt, Prompt):
                raise TypeError(f"generate: prompts[{position}] is a {type(prompt).__name__}, not a Prompt")
            history = histories[position] if histories is not None else ()
            text = render_prompt(self.tokenizer, prompt, history)
            prompt_ids = self.tokenizer.encode(text, add_special_tokens=False)
            room = self.max_model_len - len(prompt_ids) - (1 if forced else 0)
            if room < 1:
                raise ValueError(f"prompt {prompt.id!r}: {len(prompt_ids)} tokens leave no room to "
                                 f"generate within rollout.max_model_len={self.max_model_len}")
            budget = self.max_response_tokens - (1 if forced else 0)
            for mode in forced_modes:
                first = next_index.get(prompt.id, 0)
                seed = derive_seed(seeds[position], first) if seeds is not None else None
                requests.append(GenerationRequest(prompt, prompt_ids, mode, n, first, min(budget, room), seed))
                next_index[prompt.id] = first + n
        return requests

    def rollout(self, request: GenerationRequest, sample: Sample, offset: int, *,
                weight_version: int) -> Rollout:
        """The Rollout of one sample: a forced mode token becomes the first response token."""
        if len(sample.logprobs) != len(sample.token_ids):
            raise RuntimeError(f"engine returned {len(sample.logprobs)} logprobs for "
                               f"{len(sample.token_ids)} tokens")
        if request.mode is not None:
            response = [self.mode_ids[request.mode], *sample.token_ids]
            logprobs = [FORCED_TOKEN_LOGPROB, *sample.logprobs]
            mode: Mode | None = request.mode
        else:
            response = list(sample.token_ids)
            logprobs = list(sample.logprobs)
            mode = mode_of_token_ids(response, self.mode_ids)  # None when the model chose none
        shown = response[:-1] if sample.finish_reason == "stop" and response[-1] in self.stop_token_ids else response
        return Rollout(
            prompt=request.prompt,
            prompt_token_ids=list(request.prompt_token_ids),
            response_token_ids=response,
            response_logprobs=[float(x) for x in logprobs],
            text=self.tokenizer.decode(shown, skip_special_tokens=False),
            mode=mode,
            forced=request.mode is not None,
            finish_reason=sample.finish_reason,
            weight_version=weight_version,
            sample_index=request.first_sample_index + offset,
        )

    def rollouts(self, requests: Sequence[GenerationRequest], samples: Sequence[Sequence[Sample]], *,
                 weight_version: int) -> list[Rollout]:
        """Rollouts of every request, grouped by prompt id in first-appearance order."""
        if len(samples) != len(requests):
            raise RuntimeError(f"engine answered {len(samples)} of {len(requests)} requests")
        groups: dict[str, list[Rollout]] = {}
        for request, request_samples in zip(requests, samples):
            if len(request_samples) != request.n:
                raise RuntimeError(f"prompt {request.prompt.id!r}: engine returned "
                                   f"{len(request_samples)} samples, asked for {request.n}")
            group = groups.setdefault(request.prompt.id, [])
            group.extend(self.rollout(request, sample, offset, weight_version=weight_version)
                         for offset, sample in enumerate(request_samples))
        return [rollout for group in groups.values() for rollout in group]


def stop_token_ids(tokenizer: Any, model_path: str | Path) -> list[int]:
    """End-of-turn ids: the tokenizer's eos, <|im_end|> when the vocabulary has it, and the
    model's generation_config eos ids (Qwen3 lists both <|im_end|> and <|endoftext|>)."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != getattr(tokenizer, "unk_token_id", None):
        ids.add(im_end)
    ids.update(_generation_config_eos(model_path))
    if not ids:
        raise ValueError(f"{model_path}: the tokenizer has no eos token and no <|im_end|>; "
                         "responses could never stop")
    return sorted(ids)


def _generation_config_eos(model_path: str | Path) -> list[int]:
    from transformers import GenerationConfig

    try:
        eos = GenerationConfig.from_pretrained(str(model_path)).eos_token_id
    except OSError:  # the folder has no generation_config.json
        return []
    if eos is None:
        return []
    return [int(x) for x in (eos if isinstance(eos, (list, tuple)) else [eos])]
