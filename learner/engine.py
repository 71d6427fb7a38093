"""The learner: one DeepSpeed engine per rank, an SFT step and a DualGRPO policy step
(learner/policy_step.py), checkpoints (learner/checkpoint.py) and the weights' export.

One instance per data-parallel rank, in-process (no Ray: ``actors/learner_group.py`` wraps
it). Every public method except the metadata ones is a collective over the learner ranks:
all ranks call it together, each with its own shard.

One optimizer step = one call. Its loss is the SUM of per-token losses over the step's
response tokens divided by their count across ALL ranks and micro-batches
(docs/ARCHITECTURE.md, "Loss and weight-sync rules"); DeepSpeed averages gradients over
ranks, so each rank's loss is scaled by the world size before backward. Micro-batches are
sized by padded token count; ranks with fewer run empty ones so the ZeRO collectives inside forward/backward stay in lockstep.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import deepspeed
import torch
import torch.distributed as dist
from torch.optim.lr_scheduler import LambdaLR
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.integrations.deepspeed import HfDeepSpeedConfig

from learner import distributed, weights
from learner.batch import MicroBatch, PolicyBatch, PolicySample, SftSample, micro_batches
from learner.checkpoint import load_learner, publish, save_learner, staging_dir
from learner.config import LearnerConfig
from learner.forward import first_response_logprob, micro_batch_logprobs
from learner.losses import sft_loss
from learner.optim import deepspeed_config, lr_lambda, param_groups
from learner.policy_step import policy_step
from personadual.algo_config import AlgoConfig

log = logging.getLogger(__name__)
STAGES = ("sft", "rl")


class Learner:
    def __init__(self, config: LearnerConfig, model_path: str | Path, *, algo: AlgoConfig | None = None,
                 rank: int = 0, world_size: int = 1, device: str = "cpu") -> None:
        """``config``: how to train; ``algo``: the objective (its defaults when None)."""
        self.config = config
        self.algo = algo if algo is not None else AlgoConfig()
        self.model_path = str(model_path)  # a local folder or a hub id
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.precision = config.resolved_precision(device)
        self.dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        backend = distributed.backend_for(device)
        if not dist.is_initialized():
            if world_size != 1:
                raise RuntimeError("Learner: initialise torch.distributed before creating a multi-rank learner")
            distributed.init_process_group(rank=0, world_size=1, master_address=distributed.LOOPBACK,
                                           master_port=distributed.free_port(), backend=backend,
                                           timeout_s=config.collective_timeout_s)
        elif (dist.get_rank(), dist.get_world_size()) != (rank, world_size):
            raise RuntimeError(f"Learner: torch.distributed is rank {dist.get_rank()} of {dist.get_world_size()}, "
                               f"not rank {rank} of {world_size}")
        distributed.init_deepspeed_comm(backend, config.collective_timeout_s)
        torch.manual_seed(0 if config.seed is None else config.seed)

        self.zero3 = config.zero_stage == 3
        self._ds_config = deepspeed_config(config, world_size=world_size, precision=self.precision)
        # Kept alive for the learner's lifetime: while it exists, transformers builds models
        # partitioned (zero.Init), here and for the reference model.
        self._hf_ds_config = HfDeepSpeedConfig(self._ds_config) if self.zero3 else None
        model = self._load_model(self.model_path)
        if config.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model),
                                                    config=self._ds_config)
        self.pad_token_id = int(model.config.pad_token_id or 0)
        self.stage: str | None = None
        self.weight_version = 0
        self.steps = {stage: 0 for stage in STAGES}
        self.reference: torch.nn.Module | None = None
        self.consecutive_skipped = 0  # updates skipped in a row (non-finite loss or gradients)

    # ---- set-up -------------------------------------------------------------------------
    def _load_model(self, path: str | Path) -> torch.nn.Module:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype)
        model.config.use_cache = False
        return model if self.zero3 else model.to(self.device)

    def _enter_stage(self, stage: str) -> None:
        """A new stage starts with a fresh optimizer state and its own schedule; the RL stage
        also freezes the current policy as its KL reference (the SFT result, as in the paper)."""
        if self.stage == stage:
            return
        start = time.perf_counter()
        self._reset_optimizer(stage)
        if stage == "rl" and self.algo.kl_coef > 0:
            self._build_reference(None)
        self.stage = stage
        log.info("learner rank %d: %s stage from weight version %d (set-up %.1f s)", self.rank, stage,
                 self.weight_version, time.perf_counter() - start)

    def _reset_optimizer(self, stage: str) -> None:
        optim = self.config.sft_optim if stage == "sft" else self.config.optim
        basic = self.engine.basic_optimizer
        basic.state.clear()
        for group in basic.param_groups:
            group.update(lr=optim.lr, initial_lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                         weight_decay=optim.weight_decay if group.get("decay", True) else 0.0)
        self.engine.lr_scheduler = LambdaLR(basic, lr_lambda(optim))

    def _build_reference(self, path: Path | None) -> None:
        """The frozen reference: loaded from ``path``, else a copy of the current policy.
        Under ZeRO-3 it is partitioned too (a DeepSpeed inference engine)."""
        self.reference = None
        reference = self._load_model(path or self.model_path)
        reference.requires_grad_(False)
        if path is None and self.weight_version > 0:
            weights.copy_weights(self.engine.module, reference, self.config.bucket_bytes)
        if self.zero3:
            ref_config = {key: self._ds_config[key] for key in
                          ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
                           "zero_optimization", "bf16", "steps_per_print")}
            reference, _, _, _ = deepspeed.initialize(model=reference, config=ref_config)
        reference.eval()
        self.reference = reference

    # ---- forward helpers ----------------------------------------------------------------
    def _plan(self, samples: Sequence[SftSample | PolicySample], *, shared_prefix: bool = False,
              ) -> list[MicroBatch]:
        """Micro-batches on this rank's device; ``shared_prefix``: each prompt computed once."""
        return [mb.to(self.device) for mb in micro_batches(samples, self.config.micro_batch_tokens,
                                                           self.pad_token_id, shared_prefix=shared_prefix)]

    def _empty_micro_batch(self) -> MicroBatch:
        ids = torch.full((1, 2), self.pad_token_id, dtype=torch.long, device=self.device)
        return MicroBatch(ids, torch.ones_like(ids), 0, ids[:, 1:], torch.zeros((1, 1), device=self.device), [])

    def _lockstep(self, plans: list[list[MicroBatch]]) -> list[int]:
        """Pad every plan to the longest across ranks; return each plan's global token count."""
        counts = torch.tensor([len(p) for p in plans], dtype=torch.long, device=self.device)
        tokens = torch.tensor([sum(mb.num_response_tokens for mb in p) for p in plans], dtype=torch.long,
                              device=self.device)
        distributed.all_reduce(counts, dist.ReduceOp.MAX)
        distributed.all_reduce(tokens)
        for plan, count in zip(plans, counts.tolist()):
            plan.extend(self._empty_micro_batch() for _ in range(count - len(plan)))
        return tokens.tolist()

    def _backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss * self.world_size, scale_wrt_gas=False)

    def _optimizer_step(self, loss_finite: bool) -> float | None:
        """Apply the accumulated gradients: the gradient norm, or None when the update was
        skipped on every rank because the loss or the gradients were not finite on some rank
        (weights, optimizer state, LR schedule and weight version then stay as they were).

        DeepSpeed's ZeRO optimizers (stages 1-3; fp32 and bf16) and its bf16 optimizer check
        the global gradient norm themselves, across ranks, and on inf/NaN skip the step and
        clear the gradients (``engine.skipped_steps`` counts it). Without them (ZeRO-0 in fp32:
        a plain torch optimizer, which would write NaNs into the weights) the gradients are
        checked here and ``engine.step()`` is not called. Either way the ranks' non-finite
        flags are all-reduced, so every rank decides alike."""
        checks_itself = hasattr(self.engine.optimizer, "overflow")  # DeepSpeed's own test of the same
        local = not loss_finite or (not checks_itself and not all(
            bool(torch.isfinite(p.grad).all()) for p in self.engine.module.parameters() if p.grad is not None))
        flag = torch.tensor([float(local)], device=self.device)
        nonfinite = bool(distributed.all_reduce(flag, dist.ReduceOp.MAX).item())
        if nonfinite and not checks_itself:
            self.engine.zero_grad()
            applied = False
        else:
            skipped_before = self.engine.skipped_steps
            self.engine.step()
            applied = self.engine.skipped_steps == skipped_before
            if applied and nonfinite:
                raise RuntimeError("learner: DeepSpeed applied an update whose loss was not finite")
        if not applied:
            self.consecutive_skipped += 1
            if self.rank == 0:
                log.warning("learner: %s update skipped at weight version %d: non-finite loss or gradients "
                            "(%d in a row)", self.stage, self.weight_version, self.consecutive_skipped)
            return None
        self.consecutive_skipped = 0
        self.weight_version += 1
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def _skip_metrics(self, skipped: int) -> dict[str, float]:
        return {"skipped_updates": float(skipped), "consecutive_skipped_updates": float(self.consecutive_skipped)}

    def _lr(self) -> float:
        return float(self.engine.basic_optimizer.param_groups[0]["lr"])

    # ---- SFT ----------------------------------------------------------------------------
    def sft_step(self, samples: Sequence[SftSample]) -> dict[str, float]:
        """One optimizer step of next-token loss on response tokens (mode token included) over
        this rank's shard; prompt tokens carry no loss."""
        self._enter_stage("sft")
        start = time.perf_counter()
        self.engine.train()
        plan = self._plan(samples)
        (total,) = self._lockstep([plan])
        if total == 0:
            raise ValueError("sft step: the batch holds no response tokens")
        lr = self._lr()
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # loss, mode nll, mode count, padded tokens
        loss_finite = True
        for batch in plan:
            logprobs = micro_batch_logprobs(self.engine, batch)[1]
            loss = sft_loss(logprobs, batch.response_mask, denominator=total)
            loss_finite &= bool(torch.isfinite(loss.detach()))
            self._backward(loss)
            first = first_response_logprob(logprobs.detach(), batch)
            sums += torch.stack([loss.detach().double(), -first.sum().double(),
                                 torch.tensor(float(first.numel()), dtype=torch.float64, device=self.device),
                                 torch.tensor(float(batch.input_ids.numel() if batch.indices else 0),
                                              dtype=torch.float64, device=self.device)])
        grad_norm = self._optimizer_step(loss_finite)
        self.steps["sft"] += 1
        distributed.all_reduce(sums)
        loss_sum, mode_nll, mode_count, padded = sums.tolist()
        return {"loss": loss_sum, "mode_token_loss": mode_nll / max(mode_count, 1.0),
                "grad_norm": float("nan") if grad_norm is None else grad_norm,
                "lr": lr, "tokens": float(total), "padded_tokens": padded, "samples": mode_count,
                "time/train": time.perf_counter() - start, "weight_version": float(self.weight_version),
                **self._skip_metrics(int(grad_norm is None))}

    # ---- DualGRPO -----------------------------------------------------------------------
    def policy_step(self, batch: PolicyBatch) -> dict[str, float]:
        """DualGRPO on this rank's shard (learner/policy_step.py: plan, reference, update, reduce)."""
        return policy_step(self, batch)

    @torch.no_grad()
    def response_logprobs(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[list[float]]:
        """log p(response token) under the current policy (temperature 1) for each (prompt ids,
        response ids) pair: what an engine serving these weights reports for greedy answers.
        A collective under ZeRO-3: every rank calls it with the same pairs."""
        samples = [SftSample(list(prompt), list(response)) for prompt, response in pairs]
        found: list[list[float]] = [[] for _ in samples]
        self.engine.eval()
        for batch in self._plan(samples):
            logprobs = micro_batch_logprobs(self.engine, batch)[1]
            for row, index in enumerate(batch.indices):
                found[index] = logprobs[row][batch.response_mask[row] > 0].tolist()
        return found

    # ---- weights ------------------------------------------------------------------------
    def weight_metadata(self) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        """(name, dtype, full shape) of every tensor a weight sync sends; no collective."""
        return weights.metadata(self.engine.module)

    def full_weights(self, device: str | torch.device | None = None,
                     copy: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor, full, by HF name (a collective under ZeRO-3: all ranks iterate);
        what a weight sync sends; ``copy=False``: see ``weights.full_tensor_buckets``."""
        return weights.full_tensors(self.engine.module, self.config.bucket_bytes, device=device, copy=copy)

    def reference_weights(self, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """The frozen KL reference's full tensors by HF name, for a reference worker; entering
        the RL stage first freezes it (the current policy, or a checkpoint's reference). A
        collective under ZeRO-3; rank 0 returns them, the other ranks an empty dict."""
        self._enter_stage("rl")
        if self.reference is None:
            return {}
        unwrapped = getattr(self.reference, "module", self.reference)
        state = dict(weights.full_tensors(unwrapped, self.config.bucket_bytes, device=device))
        return state if self.rank == 0 else {}

    def _write_hf(self, module: torch.nn.Module, target: Path, *, tokenizer: bool) -> None:
        """``module``'s full weights as an HF folder at ``target`` (rank 0 writes; collective)."""
        unwrapped = getattr(module, "module", module)  # a DeepSpeed engine prefixes names with "module."
        state = dict(weights.full_tensors(unwrapped, self.config.bucket_bytes, device="cpu"))
        if self.rank == 0:
            unwrapped.save_pretrained(target, state_dict=state, safe_serialization=True)
            if tokenizer:
                AutoTokenizer.from_pretrained(self.model_path).save_pretrained(target)
        del state

    def save_hf(self, path: str | Path) -> None:
        """The policy as an HF folder (model + tokenizer) that transformers and vLLM load;
        ``path`` appears only complete."""
        final = Path(path)
        staging = staging_dir(final)
        if self.rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
            final.parent.mkdir(parents=True, exist_ok=True)
        self._write_hf(self.engine.module, staging, tokenizer=True)
        if self.rank == 0:
            publish(staging, final)
        distributed.barrier()

    # ---- checkpoints (learner/checkpoint.py) ---------------------------------------------
    def save_checkpoint(self, path: str | Path, client_state: dict[str, Any],
                        reference_dir: str | Path | None = None) -> None:
        save_learner(self, path, client_state, reference_dir)

    def load_checkpoint(self, path: str | Path) -> dict[str, Any]:
        return load_learner(self, path)

    def close(self) -> None:
        """Drop the engines (and the ZeRO-3 marker transformers reads)."""
        self.reference = None
        self.engine = None
        self._hf_ds_config = None


