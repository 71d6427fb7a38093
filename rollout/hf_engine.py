"""The transformers rollout engine: the same interface over ``model.generate``.

For tiny CPU runs, where it skips vLLM's start-up and scheduling, and as an independent
cross-check of the vLLM engine (same codec, same stop ids, same logprob definition: the
log-probability under the distribution sampled from, after temperature and top-p).

Requests with equal budgets are batched, left-padded, each expanded to ``n`` sequences.
Randomness comes from torch's global generator, seeded once at start-up, or for a batch of
seeded requests from their seeds (the global stream is then left as it was).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from personadual.modes import Mode
from personadual.records import Prompt, Rollout
from personadual.seeds import derive_seed
from personadual.weight_buckets import BucketBuffers, SharedBuckets, TensorMeta
from personadual.weight_wire import ReceivedUpdate, open_transfer_group, receive_buckets
from rollout.config import RolloutConfig
from rollout.engine import check_received, parse_version
from rollout.requests import GenerationRequest, PromptCodec, Sample
from rollout.weights import NamedTensors, as_list, check_names

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Sequences generated at once; bounds the left-padded batch's memory.
MAX_BATCH_SEQUENCES = 256


class HfEngine:
    def __init__(self, model_path: str | Path, config: RolloutConfig, *, engine_index: int = 0) -> None:
        config.validate()
        self.config = config
        self.model_path = Path(model_path)
        self.weight_version = 0
        self.device = torch.device("cuda" if config.num_gpus_per_engine > 0 and torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_path))
        self.model = AutoModelForCausalLM.from_pretrained(
            str(model_path), dtype=TORCH_DTYPES[config.dtype]).to(self.device).eval()
        self.codec = PromptCodec(self.tokenizer, model_path, max_model_len=config.max_model_len,
                                 max_response_tokens=config.sampling.max_response_tokens)
        self.pad_token_id = self.tokenizer.pad_token_id
        if self.pad_token_id is None:
            self.pad_token_id = self.codec.stop_token_ids[0]
        torch.manual_seed(config.sampling.engine_seed(engine_index))
        self._parameters = dict(self.model.named_parameters())  # tied weights appear once
        self._aliases = set(self.model.state_dict()) - set(self._parameters)
        self._group = None
        self._asleep = False
        self._updating = False
        self._received = ReceivedUpdate()
        self._buffers = BucketBuffers()  # reused by every update
        self._shared = SharedBuckets()  # the sender's buckets, mapped, when it is on this host
        self.last_receive_s = 0.0

    def sleep(self) -> bool:
        """On a GPU: the model moves to host memory and the device's cache is emptied, so a
        colocated learner has the device; on CPU there is nothing to give up."""
        if self.device.type != "cuda" or self._asleep:
            return False
        self.model.to("cpu")
        torch.cuda.empty_cache()
        self._asleep = True
        return True

    def wake_up(self) -> None:
        if self._asleep:
            self.model.to(self.device)
            self._asleep = False

    # ---- generation ---------------------------------------------------------------------
    def generate(self, prompts: Sequence[Prompt], *, forced: bool, n: int,
                 greedy: bool = False, histories: Sequence[Sequence[dict[str, str]]] | None = None,
                 modes: Sequence[Mode] | None = None, seeds: Sequence[int] | None = None) -> list[Rollout]:
        requests = self.codec.plan(prompts, forced=forced, n=n, histories=histories, modes=modes, seeds=seeds)
        samples: list[list[Sample] | None] = [None] * len(requests)
        by_budget: dict[int, list[int]] = {}
        for index, request in enumerate(requests):
            by_budget.setdefault(request.max_new_tokens, []).append(index)
        per_batch = max(1, MAX_BATCH_SEQUENCES // n)
        for budget, indices in by_budget.items():
            for start in range(0, len(indices), per_batch):
                chunk = indices[start:start + per_batch]
                for index, result in zip(chunk, self._generate_batch([requests[i] for i in chunk], n, budget, greedy)):
                    samples[index] = result
        return self.codec.rollouts(requests, samples, weight_version=self.weight_version)

    @torch.no_grad()
    def _generate_batch(self, requests: list[GenerationRequest], n: int, budget: int,
                        greedy: bool) -> list[list[Sample]]:
        inputs = [r.input_token_ids(self.codec.mode_ids) for r in requests]
        width = max(len(ids) for ids in inputs)
        input_ids = torch.full((len(inputs), width), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(inputs), width), dtype=torch.long)
        for row, ids in enumerate(inputs):  # left padding: every prompt ends where sampling starts
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            attention[row, width - len(ids):] = 1
        sampling = self.config.sampling
        stops = self.codec.stop_token_ids
        if greedy:
            generation = GenerationConfig(do_sample=False, num_return_sequences=n, max_new_tokens=budget,
                                          eos_token_id=stops, pad_token_id=self.pad_token_id,
                                          output_scores=True, return_dict_in_generate=True)
        else:
            # Every knob set explicitly: generate() fills unset ones from the model's
            # generation_config, then transformers' defaults (top_k=50), which vLLM would not apply.
            generation = GenerationConfig(
                do_sample=True, num_return_sequences=n, max_new_tokens=budget, min_new_tokens=0,
                temperature=sampling.temperature, top_p=sampling.top_p, top_k=0, min_p=0.0, typical_p=1.0,
                repetition_penalty=1.0, no_repeat_ngram_size=0, eos_token_id=stops,
                pad_token_id=self.pad_token_id, output_scores=True, return_dict_in_generate=True)
        seeds = [r.seed for r in requests]
        seeded = not greedy and None not in seeds
        # generate() draws from torch's global generator: a seeded batch gets it seeded from its
        # requests' seeds (the same batch, the same samples), then restored.
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [], enabled=seeded):
            if seeded:
                torch.manual_seed(derive_seed(*seeds))
            out = self.model.generate(input_ids=input_ids.to(self.device),
                                      attention_mask=attention.to(self.device), generation_config=generation)
        new_tokens = out.sequences[:, width:].cpu()
        # scores: the processed (temperature, top-p) logits each token was drawn from.
        logprobs = torch.stack([torch.log_softmax(s.float(), dim=-1) for s in out.scores], dim=1).cpu()
        stop_set = set(stops)
        results: list[list[Sample]] = []
        for row in range(len(requests)):
            group: list[Sample] = []
            for k in range(n):
                seq = row * n + k
                tokens: list[int] = []
                finish = "length"
                for token in new_tokens[seq].tolist():
                    tokens.append(token)
                    if token in stop_set:
                        finish = "stop"
                        break
                picked = logprobs[seq, torch.arange(len(tokens)), torch.tensor(tokens)].tolist()
                group.append(Sample(tokens, [float(x) for x in picked], finish))
            results.append(group)
        return results

    # ---- weights ------------------------------------------------------------------------
    def load_weights(self, named_tensors: NamedTensors, version: int | None = None) -> int:
        named = as_list(named_tensors)
        check_names((name for name, _ in named), set(self._parameters), aliases=self._aliases)
        new_version = self.weight_version + 1 if version is None else parse_version(version, self.weight_version)
        self._copy_in(named)
        self.weight_version = new_version
        return new_version

    @torch.no_grad()
    def _copy_in(self, named: list[tuple[str, torch.Tensor]]) -> None:
        state = self.model.state_dict()  # references to the live parameters
        for name, tensor in named:
            target = state[name]
            if tuple(tensor.shape) != tuple(target.shape):
                raise ValueError(f"load_weights: {name}: shape {tuple(tensor.shape)}, "
                                 f"engine has {tuple(target.shape)}")
            target.copy_(tensor)

    def update_weight_version(self, version: int) -> int:
        self.weight_version = parse_version(version, self.weight_version)
        return self.weight_version

    # ---- the weight-transfer control plane, receiving like rollout/transfer_gloo.py ------
    def num_workers(self) -> int:
        return 1

    def weight_transfer_backend(self) -> str | None:
        return None if self.config.weight_transfer_backend == "none" else "gloo"

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        if self.weight_transfer_backend() is None:
            raise RuntimeError("rollout.weight_transfer_backend is none: no transfer group")
        self._updating = False  # a new group after a failed sync: an update cut short is abandoned
        self._group = open_transfer_group(init_info["master_address"], int(init_info["master_port"]),
                                          int(init_info["rank_offset"]), int(init_info["world_size"]),
                                          float(init_info.get("timeout_s", 300.0)))

    def start_weight_update(self) -> None:
        if self._updating:
            raise RuntimeError("start_weight_update called while a weight update is already active")
        self._updating = True

    def update_weights(self, update_info: dict[str, Any] | list[dict[str, Any]]) -> None:
        """Receive one broadcast update (every tensor, in buckets) and copy it in bucket by
        bucket. The weight version is set by ``finish_weight_update`` or
        ``update_weight_version``, as for the vLLM engine."""
        if not self._updating or self._group is None:
            raise RuntimeError("update_weights needs init_weight_transfer_engine and start_weight_update first")
        info = update_info[0] if isinstance(update_info, list) else update_info
        metas = [TensorMeta(n, d, tuple(s)) for n, d, s in zip(info["names"], info["dtype_names"], info["shapes"])]
        check_names((m.name for m in metas), set(self._parameters), aliases=self._aliases)
        start = time.perf_counter()
        for named in receive_buckets(self._group, metas, int(info["bucket_bytes"]), self._received, self._buffers,
                                     checksums=bool(info.get("checksums", True)), breaks=info.get("breaks", ()),
                                     shared_path=info.get("shared_path"), shared=self._shared):
            self._copy_in(named)
        self.last_receive_s = time.perf_counter() - start

    def finish_weight_update(self, weight_version: str | int | None = None,
                             checksums: Sequence[int | None] | None = None) -> None:
        if not self._updating:
            raise RuntimeError("finish_weight_update called without a matching start_weight_update")
        self._updating = False
        check_received(self._received, checksums)
        if weight_version is not None:
            self.update_weight_version(weight_version)

    def loaded_tensors(self) -> list[str]:
        return list(self._received.loaded)

    def shutdown_weight_transfer_engine(self) -> None:
        self._group = None

    def shutdown(self) -> None:
        self._group = None
