"""The learner: one DeepSpeed engine per rank, an SFT step and a DualGRPO policy step.

One instance per data-parallel rank, in-process (no Ray: ``actors/learner_group.py`` wraps
it). Every public method except the metadata ones is a collective over the learner ranks:
all ranks call it together, each with its own shard.

One optimizer step = one call. Its loss is the SUM of per-token losses over the step's
response tokens divided by their count across ALL ranks and micro-batches
(docs/ARCHITECTURE.md, "Loss and weight-sync rules"); DeepSpeed averages gradients over
ranks, so each rank's loss is scaled by the world size before backward. Micro-batches are sized by padded token count; ranks with fewer
run empty ones so the ZeRO collectives inside forward/backward stay in lockstep.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator, Sequence

import deepspeed
import torch
import torch.distributed as dist
from torch.optim.lr_scheduler import LambdaLR
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.integrations.deepspeed import HfDeepSpeedConfig

from learner import distributed, weights
from learner.batch import (MicroBatch, PolicyBatch, PolicySample, SftSample, micro_batch_advantages, micro_batches,
                           split_even)
from learner.checkpoint import (LEARNER_DIR, publish, read_json, rng_state, set_rng_state, staging_dir,
                                weights_only_loads, write_json)
from learner.config import LearnerConfig, OptimConfig
from learner.losses import (MismatchSums, logprob_mismatch, policy_loss, rollout_correction_weights, sft_loss,
                            token_entropy, token_logprobs)
from learner.shared_prefix import forward_packed
from personadual.algo_config import AlgoConfig
from personadual.evaluation import EVAL_SETTINGS
from personadual.fault_hooks import fault_point
from personadual.modes import Mode

log = logging.getLogger(__name__)
STAGES = ("sft", "rl")
DS_TAG = "state"


def lr_lambda(optim: OptimConfig):
    """Multiplier of the peak rate at optimizer step ``step`` (0-based): linear warm-up from 0,
    then cosine or linear decay to 0 at ``total_steps``, or constant."""
    warmup = int(math.ceil(optim.warmup_ratio * optim.total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if optim.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, optim.total_steps - warmup))
        if optim.schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def forward_logits(model: Any, batch: MicroBatch) -> torch.Tensor:
    """(B, K, V) logits aligned with ``batch.targets``; positions before the shortest
    prompt's last token are never projected onto the vocabulary."""
    if batch.layout is not None:
        return forward_packed(model, batch.input_ids, batch.layout, next(iter(model.parameters())).dtype)
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                logits_to_keep=batch.logits_to_keep, use_cache=False)
    return out.logits[:, :-1]


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
        self._ds_config = self._deepspeed_config()
        # Kept alive for the learner's lifetime: while it exists, transformers builds models
        # partitioned (zero.Init), here and for the reference model.
        self._hf_ds_config = HfDeepSpeedConfig(self._ds_config) if self.zero3 else None
        model = self._load_model(self.model_path)
        if config.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=_param_groups(model),
                                                    config=self._ds_config)
        self.pad_token_id = int(model.config.pad_token_id or 0)
        self.stage: str | None = None
        self.weight_version = 0
        self.steps = {stage: 0 for stage in STAGES}
        self.reference: torch.nn.Module | None = None
        self.consecutive_skipped = 0  # updates skipped in a row (non-finite loss or gradients)

    # ---- set-up -------------------------------------------------------------------------
    def _deepspeed_config(self) -> dict[str, Any]:
        cfg = self.config
        zero: dict[str, Any] = {"stage": cfg.zero_stage}
        if self.zero3:
            # Without 0, parameters smaller than the threshold stay whole on every rank:
            # with small models nothing would be partitioned (docs/ARCHITECTURE.md, "The real stack on CPU").
            zero["stage3_param_persistence_threshold"] = 0
        optim = cfg.optim
        return {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            "train_batch_size": self.world_size,
            # We own the accumulation boundary: a step holds as many micro-batches as its
            # tokens need, and engine.step() closes it.
            "managed_gradient_accumulation": False,
            "gradient_clipping": cfg.max_grad_norm,
            "zero_optimization": zero,
            "bf16": {"enabled": self.precision == "bf16"},
            # torch's AdamW: DeepSpeed's FusedAdam costs a 139 s JIT build on CPU
            # (docs/ARCHITECTURE.md, "The real stack on CPU").
            "optimizer": {"type": "AdamW", "params": {"lr": optim.lr, "betas": list(optim.betas), "eps": optim.eps,
                                                      "weight_decay": optim.weight_decay, "torch_adam": True}},
            "steps_per_print": 1 << 30,
            "wall_clock_breakdown": False,
        }

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
            logprobs = token_logprobs(forward_logits(self.engine, batch), batch.targets)
            loss = sft_loss(logprobs, batch.response_mask, denominator=total)
            loss_finite &= bool(torch.isfinite(loss.detach()))
            self._backward(loss)
            first = _first_response_logprob(logprobs.detach(), batch)
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
    @torch.no_grad()
    def _reference_logprobs(self, plans: list[list[MicroBatch]]) -> list[list[torch.Tensor | None]]:
        if self.reference is None:
            return [[None] * len(plan) for plan in plans]
        return [[token_logprobs(forward_logits(self.reference, mb), mb.targets) for mb in plan] for plan in plans]

    def policy_step(self, batch: PolicyBatch) -> dict[str, float]:
        """DualGRPO on this rank's shard: ``mini_batches`` optimizer steps per pass,
        ``ppo_epochs`` passes. Old log-probabilities are this learner's own, before the
        update: with one step per batch they ARE the current ones (ratio 1, detached, the
        clipped objective's gradient still flows); otherwise a no-grad pass computes them."""
        cfg, algo = self.config, self.algo
        self._enter_stage("rl")
        start = time.perf_counter()
        samples = batch.samples
        chunks = split_even(list(range(len(samples))), algo.mini_batches)
        plans = [self._plan([samples[i] for i in chunk], shared_prefix=cfg.shared_prefix) for chunk in chunks]
        # micro-batch indices are relative to their chunk; make them index the shard.
        for chunk, plan in zip(chunks, plans):
            for mb in plan:
                mb.indices = [chunk[i] for i in mb.indices]
        totals = self._lockstep(plans)
        if sum(totals) == 0:
            raise ValueError("policy step: the batch holds no response tokens")
        advantages = [[micro_batch_advantages(samples, mb, prefix_tokens=algo.prefix_tokens, beta=algo.beta)
                       for mb in plan] for plan in plans]

        ref_start = time.perf_counter()
        self.engine.eval()
        reference = self._reference_logprobs(plans)
        reference_time = time.perf_counter() - ref_start

        # Metric sums, reduced across ranks at the end.
        sums = {key: torch.zeros((), dtype=torch.float64, device=self.device) for key in
                ("loss", "pg", "kl", "clipped", "ratio", "tokens", "entropy", "padded", "correction", "corrected",
                 "sampled")}
        # [setting, mode] -> (sum, count) of the mode token's probability; the last setting row
        # collects samples of unknown setting, so rows summed give the whole batch's.
        mode_prob = torch.zeros(len(EVAL_SETTINGS) + 1, 2, 2, dtype=torch.float64, device=self.device)

        mismatch = torch.zeros(4, 3, dtype=torch.float64, device=self.device)  # abs sum, count, max, over

        def row_modes_of(mb: MicroBatch) -> torch.Tensor:
            return torch.tensor([samples[i].mode for i in mb.indices], dtype=torch.long, device=self.device)

        def behaviour(logits: torch.Tensor, mb: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
            """The policy-before-update's log-probs of the tempered distribution the engine sampled
            from, beside the engine's own; their gap, per mode, is a metric, and their ratio the
            rollout correction's weight. Unknown engine log-probs: sampled_mask is 0 there."""
            tempered = token_logprobs(logits.detach() / batch.sampling_temperature, mb.targets)
            if mb.engine_logprobs is None or not mb.indices:
                return tempered, torch.zeros_like(tempered)
            found = logprob_mismatch(tempered, mb.engine_logprobs, mb.sampled_mask, row_modes_of(mb),
                                     threshold=algo.mismatch_threshold)
            mismatch[0] += found.abs_sum
            mismatch[1] += found.count
            mismatch[2] = torch.maximum(mismatch[2], found.max)
            mismatch[3] += found.over
            return tempered, mb.sampled_mask

        def correction_of(tempered: torch.Tensor, sampled: torch.Tensor, mb: MicroBatch) -> torch.Tensor | None:
            if algo.correction == "none" or mb.engine_logprobs is None:
                return None
            return rollout_correction_weights(tempered, mb.engine_logprobs, sampled, kind=algo.correction,
                                              cap=algo.rollout_correction_cap)

        def observe(logits: torch.Tensor, logprobs: torch.Tensor, mb: MicroBatch) -> None:
            """Entropy and mode-token probability of the policy before the update."""
            sums["entropy"] += (token_entropy(logits) * mb.response_mask).sum().double()
            sums["padded"] += float(mb.input_ids.numel() if mb.indices else 0)
            if mb.indices:
                first = _first_response_logprob(logprobs, mb).exp().double()
                for row, index in enumerate(mb.indices):
                    mode, setting = samples[index].mode, samples[index].setting
                    if mode >= 0:
                        mode_prob[setting, mode, 0] += first[row]
                        mode_prob[setting, mode, 1] += 1

        single_pass = algo.ppo_epochs == 1 and algo.mini_batches == 1
        old_start = time.perf_counter()
        old: list[list[torch.Tensor]] = []
        corrections: list[list[torch.Tensor | None]] = []
        if not single_pass:
            with torch.no_grad():
                for plan in plans:
                    old.append([])
                    corrections.append([])
                    for mb in plan:
                        logits = forward_logits(self.engine, mb)
                        logprobs = token_logprobs(logits, mb.targets)
                        observe(logits, logprobs, mb)
                        old[-1].append(logprobs)
                        corrections[-1].append(correction_of(*behaviour(logits, mb), mb))
        old_time = time.perf_counter() - old_start

        self.engine.train()
        lrs, grad_norms = [], []
        skipped = 0
        # FAULT INJECTION (tests only): rank 0's loss times NaN, so the other ranks learn of it
        # only through the all-reduced flag.
        poison = self.rank == 0 and self.steps["rl"] + 1 in cfg.fault_nan_loss_at_rl_steps
        for epoch in range(algo.ppo_epochs):
            for index, plan in enumerate(plans):
                lrs.append(self._lr())
                loss_finite = True
                for position, mb in enumerate(plan):
                    logits = forward_logits(self.engine, mb)
                    logprobs = token_logprobs(logits, mb.targets)
                    if single_pass:
                        observe(logits.detach(), logprobs.detach(), mb)
                        correction = correction_of(*behaviour(logits, mb), mb)
                    else:
                        correction = corrections[index][position]
                    old_logprobs = logprobs.detach() if single_pass else old[index][position]
                    parts = policy_loss(logprobs, old_logprobs, reference[index][position], advantages[index][position],
                                        mb.response_mask, clip_range=algo.clip_range, kl_coef=algo.kl_coef,
                                        denominator=max(totals[index], 1), correction=correction)
                    if correction is not None:
                        sums["correction"] += (correction * mb.sampled_mask).sum().double()
                        sums["corrected"] += ((correction != 1.0).float() * mb.sampled_mask).sum().double()
                        sums["sampled"] += mb.sampled_mask.sum().double()
                    del logits
                    if poison:
                        parts.loss = parts.loss * float("nan")
                    loss_finite &= bool(torch.isfinite(parts.loss.detach()))
                    self._backward(parts.loss)
                    sums["loss"] += parts.loss.detach().double()
                    sums["pg"] += parts.pg_sum.double()
                    sums["kl"] += parts.kl_sum.double()
                    sums["clipped"] += parts.clipped_sum.double()
                    sums["ratio"] += parts.ratio_sum.double()
                    sums["tokens"] += float(mb.num_response_tokens)
                grad_norm = self._optimizer_step(loss_finite)
                if grad_norm is None:
                    skipped += 1
                else:
                    grad_norms.append(grad_norm)
        self.steps["rl"] += 1
        train_time = time.perf_counter() - start - reference_time

        keys = list(sums)
        reduced = distributed.all_reduce(torch.cat([torch.stack([sums[k] for k in keys]), mode_prob.flatten(),
                                                    mismatch[[0, 1, 3]].flatten()]))
        values = dict(zip(keys, reduced[:len(keys)].tolist()))
        prob_cells = mode_prob.numel()
        per_setting = reduced[len(keys):len(keys) + prob_cells].view_as(mode_prob)
        prob = per_setting.sum(0).tolist()
        mismatch_sums = reduced[len(keys) + prob_cells:].view(3, 3).tolist()
        mismatch_max = distributed.all_reduce(mismatch[2].clone(), dist.ReduceOp.MAX).tolist()
        updates = algo.updates_per_step
        tokens = max(values["tokens"], 1.0)
        first_pass_tokens = float(sum(totals))
        metrics: dict[str, float] = {
            "loss": values["loss"] / updates,
            "pg_loss": values["pg"] / tokens,
            "kl": values["kl"] / tokens,
            "clip_fraction": values["clipped"] / tokens,
            "ratio_mean": values["ratio"] / tokens,
            "entropy": values["entropy"] / first_pass_tokens,
            "grad_norm": sum(grad_norms) / len(grad_norms) if grad_norms else float("nan"),  # applied updates
            "lr": lrs[0],
            "updates": float(updates),
            "tokens": first_pass_tokens,
            "padded_tokens": values["padded"],
            "time/reference": reference_time,
            "time/train": train_time,
            "time/old_logprob": old_time,  # part of time/train
            "weight_version": float(self.weight_version),
            **self._skip_metrics(skipped),
        }
        # Probability the policy gives each response's mode token (forced or chosen); a
        # metric is left out, not NaN, when no response carries that mode.
        total_mode = prob[0][1] + prob[1][1]
        if total_mode:
            metrics["mode_token_prob"] = (prob[0][0] + prob[1][0]) / total_mode
        for mode in Mode:
            if prob[mode][1]:
                metrics[f"mode_token_prob/{mode.name.lower()}"] = prob[mode][0] / prob[mode][1]
            for setting, name in enumerate(EVAL_SETTINGS):  # which mode each persona setting leans to
                total, count = per_setting[setting, mode].tolist()
                if count:
                    metrics[f"mode_token_prob/{name}/{mode.name.lower()}"] = total / count
        metrics.update(_mismatch_metrics(MismatchSums(*(torch.tensor(v) for v in mismatch_sums[:2]),
                                                      torch.tensor(mismatch_max), torch.tensor(mismatch_sums[2]))))
        if algo.correction != "none" and values["sampled"]:
            metrics["rollout_correction/weight_mean"] = values["correction"] / values["sampled"]
            metrics["rollout_correction/corrected_fraction"] = values["corrected"] / values["sampled"]
        metrics.update(batch.stats)
        return metrics

    @torch.no_grad()
    def response_logprobs(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[list[float]]:
        """log p(response token) under the current policy (temperature 1) for each (prompt ids,
        response ids) pair: what an engine serving these weights reports for greedy answers.
        A collective under ZeRO-3: every rank calls it with the same pairs."""
        samples = [SftSample(list(prompt), list(response)) for prompt, response in pairs]
        found: list[list[float]] = [[] for _ in samples]
        self.engine.eval()
        for batch in self._plan(samples):
            logprobs = token_logprobs(forward_logits(self.engine, batch), batch.targets)
            for row, index in enumerate(batch.indices):
                found[index] = logprobs[row][batch.response_mask[row] > 0].tolist()
        return found

    # ---- weights ------------------------------------------------------------------------
    def weight_metadata(self) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        """(name, dtype, full shape) of every exported tensor; no collective."""
        return weights.metadata(self.engine.module)

    def full_weights(self, device: str | torch.device | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor, full, by HF name (a collective under ZeRO-3: all ranks iterate)."""
        return weights.full_tensors(self.engine.module, self.config.bucket_bytes, device=device)

    def export_weights(self, bucket_bytes: int | None = None, *, device: str | torch.device | None = None,
                       ) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """Buckets of (name, full tensor) of at most ``bucket_bytes`` (one larger tensor goes
        alone), in vLLM ``load_weights`` names; a collective under ZeRO-3."""
        return weights.full_tensor_buckets(self.engine.module, bucket_bytes or self.config.bucket_bytes,
                                           device=device)

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

    # ---- checkpoints --------------------------------------------------------------------
    def save_checkpoint(self, path: str | Path, client_state: dict[str, Any],
                        reference_dir: str | Path | None = None) -> None:
        """Model, optimizer, scheduler, step counters, RNG, the reference (in the RL stage) and
        the caller's ``client_state`` (JSON: e.g. the data position), under ``path/learner``,
        which appears only complete.

        The reference is frozen for the whole RL stage, so with ``reference_dir`` it is written
        there once (skipped when already complete) and the checkpoint only names it, instead of
        a full copy of the model in every checkpoint."""
        final = Path(path) / LEARNER_DIR
        staging = staging_dir(final)
        if self.rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        distributed.barrier()
        self.engine.save_checkpoint(str(staging / "deepspeed"), tag=DS_TAG, save_latest=False)
        fault_point("save", f"rank{self.rank}")  # tests crash a save here: written, not yet published
        write_json(staging / f"rng_rank{self.rank}.json", rng_state())
        reference_link = None
        if self.reference is not None and reference_dir is not None:
            shared = Path(reference_dir)
            if not (shared / "config.json").is_file():  # published whole, so present means complete
                if self.rank == 0:
                    shutil.rmtree(staging_dir(shared), ignore_errors=True)
                    shared.parent.mkdir(parents=True, exist_ok=True)
                self._write_hf(self.reference, staging_dir(shared), tokenizer=False)
                if self.rank == 0:
                    publish(staging_dir(shared), shared)
            reference_link = os.path.relpath(shared, final)
        elif self.reference is not None:
            self._write_hf(self.reference, staging / "reference", tokenizer=False)
        distributed.barrier()
        if self.rank == 0:
            write_json(staging / "client_state.json", client_state)
            write_json(staging / "learner_state.json", {
                "stage": self.stage, "weight_version": self.weight_version, "steps": self.steps,
                "world_size": self.world_size, "zero_stage": self.config.zero_stage, "precision": self.precision,
                "has_reference": self.reference is not None, "reference_dir": reference_link,
                "config": asdict(self.config), "algo": asdict(self.algo)})
            publish(staging, final)
        distributed.barrier()

    def load_checkpoint(self, path: str | Path) -> dict[str, Any]:
        """Restore what ``save_checkpoint`` wrote; returns its ``client_state``."""
        root = Path(path) / LEARNER_DIR
        if not root.is_dir():
            raise FileNotFoundError(f"checkpoint {path}: no learner state ({root} is missing)")
        state = read_json(root / "learner_state.json")
        if (state["world_size"], state["zero_stage"]) != (self.world_size, self.config.zero_stage):
            raise ValueError(f"checkpoint {path}: saved by {state['world_size']} ranks at ZeRO-{state['zero_stage']}, "
                             f"this learner has {self.world_size} at ZeRO-{self.config.zero_stage}")
        stage = state["stage"]
        if stage is not None:
            self._reset_optimizer(stage)
        self.reference = None
        if state["has_reference"]:
            linked = state.get("reference_dir")
            reference = (root / linked).resolve() if linked else root / "reference"
            if not (reference / "config.json").is_file():
                raise FileNotFoundError(f"checkpoint {path}: its reference model {reference} is missing")
            self._build_reference(reference)
        with weights_only_loads(self.engine):
            self.engine.load_checkpoint(str(root / "deepspeed"), tag=DS_TAG, load_optimizer_states=True,
                                        load_lr_scheduler_states=True)
        self.stage = stage
        self.weight_version = int(state["weight_version"])
        self.steps = {key: int(value) for key, value in state["steps"].items()}
        rng_file = root / f"rng_rank{self.rank}.json"
        if rng_file.is_file():
            set_rng_state(read_json(rng_file))
        return read_json(root / "client_state.json")

    def close(self) -> None:
        """Drop the engines (and the ZeRO-3 marker transformers reads)."""
        self.reference = None
        self.engine = None
        self._hf_ds_config = None


def _param_groups(model: torch.nn.Module) -> list[dict[str, Any]]:
    """Weight decay on matrices only (not norms or biases); ``decay`` marks the group."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if len(weights.full_shape(p)) >= 2]
    rest = [p for p in params if len(weights.full_shape(p)) < 2]
    groups = [{"params": decay, "decay": True}]
    if rest:
        groups.append({"params": rest, "decay": False, "weight_decay": 0.0})
    return groups


MISMATCH_SLOTS = ("general", "personalized", "none")


def _mismatch_metrics(found: MismatchSums) -> dict[str, float]:
    """mismatch/<mode>/{mean,max,over_fraction} over the engine-sampled tokens of each mode
    (a mode without sampled tokens is left out, not NaN), and the same over all modes."""
    metrics: dict[str, float] = {}
    for index, name in enumerate(MISMATCH_SLOTS):
        count = float(found.count[index])
        if count:
            metrics[f"mismatch/{name}/mean"] = float(found.abs_sum[index]) / count
            metrics[f"mismatch/{name}/max"] = float(found.max[index])
            metrics[f"mismatch/{name}/over_fraction"] = float(found.over[index]) / count
    total = float(found.count.sum())
    if total:
        metrics["mismatch/mean"] = float(found.abs_sum.sum()) / total
        metrics["mismatch/max"] = float(found.max.max())
        metrics["mismatch/over_fraction"] = float(found.over.sum()) / total
    return metrics


def _first_response_logprob(logprobs: torch.Tensor, batch: MicroBatch) -> torch.Tensor:
    """Log-probability of each real row's first response token (the mode token)."""
    if not batch.indices:
        return logprobs.new_zeros(0)
    first = batch.response_mask.argmax(dim=1)
    return logprobs.gather(1, first.unsqueeze(1)).squeeze(1)

