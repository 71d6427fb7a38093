"""The DualGRPO policy step on one learner rank, in four steps:

1. plan: this rank's shard in ``algo.mini_batches`` mini-batches of micro-batches (padded to
   the same count on every rank), each micro-batch's per-token advantages;
2. reference: the frozen reference's log-probs of every micro-batch (for the KL term);
3. update: ``algo.ppo_epochs`` passes, one optimizer step per mini-batch;
4. reduce: the metric sums, all-reduced across ranks into the step's metrics.

Old log-probabilities are this learner's own, before the update: with one step per batch
they ARE the current ones (ratio 1, detached, the clipped objective's gradient still flows);
otherwise a no-grad pass computes them first.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from learner import distributed
from learner.batch import (MicroBatch, PolicyBatch, PolicySample, micro_batch_advantages,
                           plan_step_micro_batches)
from learner.forward import first_response_logprob, micro_batch_logprobs
from learner.mode_diagnostics import TERMS as MODE_TERMS, mode_token_metrics, mode_token_terms
from learner.losses import (MismatchSums, logprob_mismatch, policy_loss, rollout_correction_weights,
                            token_entropy, token_logprobs)
from personadual.algo_config import AlgoConfig
from personadual.evaluation import EVAL_SETTINGS
from personadual.modes import Mode

if TYPE_CHECKING:
    from learner.engine import Learner

SUM_KEYS = ("loss", "pg", "kl", "clipped", "ratio", "tokens", "entropy", "padded", "positions", "correction",
            "corrected", "sampled")
MISMATCH_SLOTS = ("general", "personalized", "none")


@dataclass
class StepPlan:
    """One rank's shard of a policy step, as the update passes run it."""

    samples: list[PolicySample]
    plans: list[list[MicroBatch]]  # per mini-batch, its micro-batches (indices into ``samples``)
    totals: list[int]  # per mini-batch, its response tokens over ALL ranks (the loss denominator)
    advantages: list[list[torch.Tensor]]  # per micro-batch, (B, K) per-token advantages


def policy_step(learner: Learner, batch: PolicyBatch) -> dict[str, float]:
    """DualGRPO on this rank's shard of ``batch``: ``algo.mini_batches`` optimizer steps per
    pass, ``algo.ppo_epochs`` passes; a collective over the learner ranks."""
    learner._enter_stage("rl")
    start = time.perf_counter()
    plan = plan_step(learner, batch)
    reference_start = time.perf_counter()
    learner.engine.eval()
    reference, from_batch = reference_logprobs(learner.reference, plan.plans, learner.device)
    reference_time = time.perf_counter() - reference_start
    sums = StepSums(plan.samples, learner.algo, batch.sampling_temperature, learner.device)
    updates = update(learner, plan, reference, sums)
    learner.steps["rl"] += 1
    train_time = time.perf_counter() - start - reference_time
    metrics = reduce(sums, updates, plan, learner.algo, {
        "time/reference": reference_time,
        "time/train": train_time,
        "time/old_logprob": updates.old_logprob_s,  # part of time/train
        "reference_from_batch": float(from_batch),  # 1: the reference worker's log-probs were used
        "weight_version": float(learner.weight_version),
        **learner._skip_metrics(updates.skipped)})
    metrics.update(batch.stats)
    return metrics


def plan_step(learner: Learner, batch: PolicyBatch) -> StepPlan:
    samples = batch.samples
    algo = learner.algo
    plans = [[mb.to(learner.device) for mb in plan] for plan in plan_step_micro_batches(
        samples, mini_batches=algo.mini_batches, micro_batch_tokens=learner.config.micro_batch_tokens,
        pad_token_id=learner.pad_token_id, shared_prefix=learner.config.shared_prefix)]
    totals = learner._lockstep(plans)
    if sum(totals) == 0:
        raise ValueError("policy step: the batch holds no response tokens")
    advantages = [[micro_batch_advantages(samples, mb, prefix_tokens=algo.prefix_tokens, beta=algo.beta)
                   for mb in plan] for plan in plans]
    return StepPlan(samples, plans, totals, advantages)


@torch.no_grad()
def reference_logprobs(reference: Any, plans: list[list[MicroBatch]],
                       device: torch.device) -> tuple[list[list[torch.Tensor | None]], bool]:
    """The frozen reference's log-probs of each micro-batch (None everywhere without one), and
    whether they came with the batch. They do when a reference worker scored every row of every
    rank (actors/reference_worker.py); else every rank computes them here, all micro-batches
    alike, since a partitioned (ZeRO-3) reference's forward is a collective."""
    if reference is None:
        return [[None] * len(plan) for plan in plans], False
    given = all(mb.reference_logprobs is not None for plan in plans for mb in plan if mb.indices)
    flag = torch.tensor([float(given)], device=device)
    if bool(distributed.all_reduce(flag, dist.ReduceOp.MIN).item()):
        # a padded micro-batch (no rows: nothing masked in) needs only the right shape
        return [[mb.reference_logprobs if mb.indices else torch.zeros_like(mb.response_mask)
                 for mb in plan] for plan in plans], True
    return [[micro_batch_logprobs(reference, mb)[1] for mb in plan] for plan in plans], False


class StepSums:
    """A step's metric sums on this rank, reduced across ranks by ``reduce``."""

    def __init__(self, samples: list[PolicySample], algo: AlgoConfig, sampling_temperature: float,
                 device: torch.device) -> None:
        self.samples, self.algo, self.temperature, self.device = samples, algo, sampling_temperature, device
        self.sums = {key: torch.zeros((), dtype=torch.float64, device=device) for key in SUM_KEYS}
        # [setting, mode] -> (sum, count) of the mode token's probability; the last setting row
        # collects samples of unknown setting, so rows summed give the whole batch's.
        self.mode_prob = torch.zeros(len(EVAL_SETTINGS) + 1, 2, 2, dtype=torch.float64, device=device)
        self.mismatch = torch.zeros(4, 3, dtype=torch.float64, device=device)  # abs sum, count, max, over
        self.mode_terms = torch.zeros(len(MODE_TERMS), dtype=torch.float64, device=device)  # learner/mode_diagnostics.py

    def _row_modes(self, mb: MicroBatch) -> torch.Tensor:
        return torch.tensor([self.samples[i].mode for i in mb.indices], dtype=torch.long, device=self.device)

    def behaviour(self, logits: torch.Tensor, mb: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The policy-before-update's log-probs of the tempered distribution the engine sampled
        from, beside the engine's own; their gap, per mode, is a metric, and their ratio the
        rollout correction's weight. Unknown engine log-probs: sampled_mask is 0 there."""
        tempered = token_logprobs(logits.detach() / self.temperature, mb.targets)
        if mb.engine_logprobs is None or not mb.indices:
            return tempered, torch.zeros_like(tempered)
        found = logprob_mismatch(tempered, mb.engine_logprobs, mb.sampled_mask, self._row_modes(mb),
                                 threshold=self.algo.mismatch_threshold)
        self.mismatch[0] += found.abs_sum
        self.mismatch[1] += found.count
        self.mismatch[2] = torch.maximum(self.mismatch[2], found.max)
        self.mismatch[3] += found.over
        return tempered, mb.sampled_mask

    def correction(self, logits: torch.Tensor, mb: MicroBatch) -> torch.Tensor | None:
        """The rollout correction's per-token weights (None when ``algo.correction`` is none);
        the mismatch is measured either way."""
        tempered, sampled = self.behaviour(logits, mb)
        if self.algo.correction == "none" or mb.engine_logprobs is None:
            return None
        return rollout_correction_weights(tempered, mb.engine_logprobs, sampled, kind=self.algo.correction,
                                          cap=self.algo.rollout_correction_cap)

    def observe(self, logits: torch.Tensor, logprobs: torch.Tensor, mb: MicroBatch) -> None:
        """Entropy and mode-token probability of the policy before the update."""
        self.sums["entropy"] += (token_entropy(logits) * mb.response_mask).sum().double()
        self.sums["padded"] += float(mb.input_ids.numel() if mb.indices else 0)
        # The real (non-padding) positions the rows hold: a shared prompt counts once per packed row.
        self.sums["positions"] += float(mb.attention_mask.sum() if mb.indices else 0)
        if mb.indices:
            first = first_response_logprob(logprobs, mb).exp().double()
            for row, index in enumerate(mb.indices):
                mode, setting = self.samples[index].mode, self.samples[index].setting
                if mode >= 0:
                    self.mode_prob[setting, mode, 0] += first[row]
                    self.mode_prob[setting, mode, 1] += 1

    def corrected(self, correction: torch.Tensor, mb: MicroBatch) -> None:
        self.sums["correction"] += (correction * mb.sampled_mask).sum().double()
        self.sums["corrected"] += ((correction != 1.0).float() * mb.sampled_mask).sum().double()
        self.sums["sampled"] += mb.sampled_mask.sum().double()

    def loss(self, parts: Any, mb: MicroBatch) -> None:
        self.sums["loss"] += parts.loss.detach().double()
        self.sums["pg"] += parts.pg_sum.double()
        self.sums["kl"] += parts.kl_sum.double()
        self.sums["clipped"] += parts.clipped_sum.double()
        self.sums["ratio"] += parts.ratio_sum.double()
        self.sums["tokens"] += float(mb.num_response_tokens)


@dataclass
class Updates:
    """What the update passes did: the LR of each optimizer step, the applied steps' gradient
    norms, the steps skipped for a non-finite loss or gradients, the old log-prob pass's seconds."""

    lrs: list[float]
    grad_norms: list[float]
    skipped: int
    old_logprob_s: float


def update(learner: Learner, plan: StepPlan, reference: list[list[torch.Tensor | None]],
           sums: StepSums) -> Updates:
    """``algo.ppo_epochs`` passes over the mini-batches, one optimizer step each."""
    algo = learner.algo
    single_pass = algo.ppo_epochs == 1 and algo.mini_batches == 1
    old_start = time.perf_counter()
    old: list[list[torch.Tensor]] = []
    corrections: list[list[torch.Tensor | None]] = []
    if not single_pass:
        with torch.no_grad():
            for micro in plan.plans:
                old.append([])
                corrections.append([])
                for mb in micro:
                    logits, logprobs = micro_batch_logprobs(learner.engine, mb)
                    sums.observe(logits, logprobs, mb)
                    old[-1].append(logprobs)
                    corrections[-1].append(sums.correction(logits, mb))
    old_time = time.perf_counter() - old_start

    learner.engine.train()
    lrs, grad_norms = [], []
    skipped = 0
    # FAULT INJECTION (tests only): rank 0's loss times NaN, so the other ranks learn of it
    # only through the all-reduced flag.
    poison = learner.rank == 0 and learner.steps["rl"] + 1 in learner.config.fault_nan_loss_at_rl_steps
    for epoch in range(algo.ppo_epochs):
        for index, micro in enumerate(plan.plans):
            lrs.append(learner._lr())
            loss_finite = True
            for position, mb in enumerate(micro):
                logits, logprobs = micro_batch_logprobs(learner.engine, mb)
                if single_pass:
                    sums.observe(logits.detach(), logprobs.detach(), mb)
                    correction = sums.correction(logits, mb)
                else:
                    correction = corrections[index][position]
                old_logprobs = logprobs.detach() if single_pass else old[index][position]
                parts = policy_loss(logprobs, old_logprobs, reference[index][position],
                                    plan.advantages[index][position], mb.response_mask,
                                    clip_range=algo.clip_range, kl_coef=algo.kl_coef,
                                    denominator=max(plan.totals[index], 1), correction=correction)
                if correction is not None:
                    sums.corrected(correction, mb)
                if epoch == 0 and mb.indices:
                    sums.mode_terms += mode_token_terms(logits.detach(), logprobs.detach(), reference[index][position],
                                                        plan.advantages[index][position], mb.response_mask,
                                                        kl_coef=algo.kl_coef)
                del logits
                if poison:
                    parts.loss = parts.loss * float("nan")
                loss_finite &= bool(torch.isfinite(parts.loss.detach()))
                learner._backward(parts.loss)
                sums.loss(parts, mb)
            grad_norm = learner._optimizer_step(loss_finite)
            if grad_norm is None:
                skipped += 1
            else:
                grad_norms.append(grad_norm)
    return Updates(lrs, grad_norms, skipped, old_time)


def reduce(sums: StepSums, updates: Updates, plan: StepPlan, algo: AlgoConfig,
           step_fields: dict[str, float]) -> dict[str, float]:
    """The step's metrics over every rank (a collective); ``step_fields`` (timings, weight
    version, skipped updates) go in after the loss metrics."""
    keys = list(sums.sums)
    reduced = distributed.all_reduce(torch.cat([torch.stack([sums.sums[k] for k in keys]), sums.mode_prob.flatten(),
                                                sums.mismatch[[0, 1, 3]].flatten()]))
    values = dict(zip(keys, reduced[:len(keys)].tolist()))
    prob_cells = sums.mode_prob.numel()
    per_setting = reduced[len(keys):len(keys) + prob_cells].view_as(sums.mode_prob)
    prob = per_setting.sum(0).tolist()
    mismatch_sums = reduced[len(keys) + prob_cells:].view(3, 3).tolist()
    mismatch_max = distributed.all_reduce(sums.mismatch[2].clone(), dist.ReduceOp.MAX).tolist()
    mode_terms = distributed.all_reduce(sums.mode_terms.clone()).tolist()
    updates_per_step = algo.updates_per_step
    tokens = max(values["tokens"], 1.0)
    first_pass_tokens = float(sum(plan.totals))
    grad_norms = updates.grad_norms
    metrics: dict[str, float] = {
        "loss": values["loss"] / updates_per_step,
        "pg_loss": values["pg"] / tokens,
        "kl": values["kl"] / tokens,
        "clip_fraction": values["clipped"] / tokens,
        "ratio_mean": values["ratio"] / tokens,
        "entropy": values["entropy"] / first_pass_tokens,
        "grad_norm": sum(grad_norms) / len(grad_norms) if grad_norms else float("nan"),  # applied updates
        "lr": updates.lrs[0],
        "updates": float(updates_per_step),
        "tokens": first_pass_tokens,
        "padded_tokens": values["padded"],
        "positions": values["positions"],
        **step_fields,
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
    metrics.update(mismatch_metrics(MismatchSums(*(torch.tensor(v) for v in mismatch_sums[:2]),
                                                 torch.tensor(mismatch_max), torch.tensor(mismatch_sums[2]))))
    if algo.correction != "none" and values["sampled"]:
        metrics["rollout_correction/weight_mean"] = values["correction"] / values["sampled"]
        metrics["rollout_correction/corrected_fraction"] = values["corrected"] / values["sampled"]
    metrics.update(mode_token_metrics(mode_terms))
    return metrics


def mismatch_metrics(found: MismatchSums) -> dict[str, float]:
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
