"""The driver loop: SFT stage -> DualGRPO stage -> eval, on Ray actors.

One RL step (DESIGN.md section 2): rollout actors generate forced-prefix groups, reward
workers score each engine's rollouts as soon as that engine finishes, the learner group
computes DualGRPO advantages and takes a step, and the new weights go to every engine.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from omegaconf import DictConfig, OmegaConf

from actors.config import ConfigError, section, to_container
from actors.learner_group import LearnerGroup
from actors.reward_pool import RewardPool
from actors.rollout_actor import create_rollout_actors
from actors.weight_sync import WeightSync
from learner.batch import SftSample
from personadual.data import load_run_data, resolve_model
from personadual.evaluation import forced_mode_summary, mode_alignment, summarize
from personadual.modes import Mode
from personadual.prompts import format_question
from personadual.records import Prompt, Rollout, Scored
from personadual.tracking import RunTracker, read_metrics, write_json_atomic
from personadual.world import two_turn_cases

log = logging.getLogger(__name__)
CHECKPOINTS = "checkpoints"
COMPLETE_MARKER = "COMPLETE"


@dataclass
class DataCursor:
    """Where a stage is in its data, reshuffled each epoch from (seed, epoch); saved in
    checkpoints so a resumed run takes the same batches."""

    seed: int
    size: int
    epoch: int = 0
    position: int = 0
    order: list[int] = field(default_factory=list)

    def _shuffle(self) -> None:
        self.order = list(range(self.size))
        random.Random(self.seed * 100_003 + self.epoch).shuffle(self.order)

    def take(self, count: int) -> list[int]:
        if not self.order:
            self._shuffle()
        taken: list[int] = []
        while len(taken) < count:
            if self.position >= self.size:
                self.epoch, self.position = self.epoch + 1, 0
                self._shuffle()
            taken.append(self.order[self.position])
            self.position += 1
        return taken

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def restore(self, state: dict[str, int]) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self._shuffle()


def _rng_state(rng: random.Random) -> list[Any]:
    """The driver RNG's state as JSON-safe lists (checkpoints hold no pickles)."""
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def stage_steps(steps: int, epochs: float, dataset_size: int, batch_size: int) -> int:
    """A stage's optimizer steps: ``steps`` when set, else enough for ``epochs`` passes."""
    if steps > 0 or epochs <= 0:
        return steps
    return math.ceil(epochs * dataset_size / batch_size)


def _progress_key(record: dict[str, Any]) -> tuple[int, int]:
    """Order of a metrics record in a run: SFT steps, the post-SFT eval, then RL steps."""
    if record.get("stage") == "sft":
        return (0, record["step"])
    if record.get("stage") == "eval" and record.get("tag") == "sft":
        return (1, 0)
    return (2, record["step"])


def zero_variance_fraction(scored: list[Scored]) -> dict[str, float]:
    """Fraction of groups (and of each mode's sub-groups) whose rewards are all equal:
    they carry no signal for the policy gradient."""
    by_group: dict[str, list[float]] = {}
    by_mode: dict[tuple[str, int], list[float]] = {}
    for item in scored:
        if item.reward is None:
            continue
        by_group.setdefault(item.rollout.group_id, []).append(item.reward)
        if item.rollout.mode is not None:
            by_mode.setdefault((item.rollout.group_id, int(item.rollout.mode)), []).append(item.reward)

    def flat(groups: dict[Any, list[float]]) -> float:
        if not groups:
            return 0.0
        return sum(max(v) - min(v) < 1e-9 for v in groups.values()) / len(groups)

    return {"group": flat(by_group), "mode_group": flat(by_mode)}


def rollout_metrics(scored: list[Scored]) -> dict[str, Any]:
    kept = [s for s in scored if s.status != "dropped"]
    metrics: dict[str, Any] = {"samples": len(scored), "kept": len(kept)}
    for mode in Mode:
        rewards = [s.reward for s in kept if s.rollout.mode is mode]
        name = mode.name.lower()
        metrics[f"reward/{name}"] = sum(rewards) / len(rewards) if rewards else None
        metrics[f"mode_rate/{name}"] = sum(s.rollout.mode is mode for s in scored) / max(len(scored), 1)
    metrics["reward/mean"] = sum(s.reward for s in kept) / len(kept) if kept else None
    metrics["accuracy"] = sum(s.correct for s in kept) / len(kept) if kept else None
    metrics["mode_rate/none"] = sum(s.rollout.mode is None for s in scored) / max(len(scored), 1)
    metrics["response_tokens/mean"] = (
        sum(len(s.rollout.response_token_ids) for s in scored) / max(len(scored), 1))
    metrics["truncated_fraction"] = sum(s.rollout.finish_reason == "length" for s in scored) / max(len(scored), 1)
    metrics["zero_variance"] = zero_variance_fraction(kept)
    return metrics


class Driver:
    def __init__(self, cfg: DictConfig, run_dir: Path, *, resume: bool = False) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.resume = resume
        self.rng = random.Random(cfg.run.seed)
        self.tracker: RunTracker | None = None

    # ---- set-up -------------------------------------------------------------------------
    def _check_resources(self) -> None:
        """Fail at once, naming the keys, when the actors cannot all be placed: Ray would
        otherwise wait for resources that never come."""
        cfg = self.cfg
        need = {
            "CPU": cfg.learner.num_ranks * cfg.cluster.learner_cpus
            + cfg.rollout.num_engines * cfg.rollout.num_cpus_per_engine
            + cfg.cluster.reward_workers * cfg.cluster.reward_cpus,
            "GPU": cfg.learner.num_ranks * cfg.cluster.learner_gpus
            + cfg.rollout.num_engines * cfg.rollout.num_gpus_per_engine * cfg.rollout.tensor_parallel_size,
        }
        have = ray.cluster_resources()
        for resource, amount in need.items():
            if amount > have.get(resource, 0.0) + 1e-9:
                raise ConfigError(
                    f"cluster: the run needs {amount:g} {resource} (learner.num_ranks x cluster.learner_"
                    f"{resource.lower()}s + rollout engines + reward workers), the cluster has "
                    f"{have.get(resource, 0.0):g}")

    def _build(self) -> None:
        from transformers import AutoTokenizer

        cfg = self.cfg
        self._check_resources()
        self.model_path = resolve_model(cfg.model.path, cfg.model.tiny_preset)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.data = load_run_data(
            cfg.data.source, self.tokenizer, world_seed=cfg.data.world_seed,
            train_files=list(cfg.data.train_files), eval_files=list(cfg.data.eval_files),
            sft_files=list(cfg.data.sft_files), skip_invalid=cfg.data.skip_invalid,
            max_eval_prompts=cfg.data.max_eval_prompts, max_prompt_tokens=cfg.data.max_prompt_tokens,
            max_sft_tokens=cfg.sft.max_length)
        if any(self.data.skipped.values()):
            log.warning("data rows skipped: %s", self.data.skipped)
        self.sft_steps = stage_steps(cfg.sft.steps, cfg.sft.epochs, len(self.data.sft), cfg.sft.batch_size)
        self.rl_steps = stage_steps(cfg.algo.steps, cfg.algo.epochs, len(self.data.train), cfg.algo.prompts_per_step)
        if self.sft_steps and not self.data.sft:
            raise ConfigError("sft.steps: the SFT stage has no data (set data.sft_files, or sft.steps=0)")
        if self.rl_steps and not self.data.train:
            raise ConfigError("algo.steps: the RL stage has no prompts (set data.train_files, or algo.steps=0)")
        self.sft_cursor = DataCursor(cfg.run.seed, max(len(self.data.sft), 1))
        self.rl_cursor = DataCursor(cfg.run.seed + 1, len(self.data.train))
        self.learner = LearnerGroup(section(cfg, "learner"), self.model_path,
                                    algo=section(cfg, "algo"), total_sft_steps=max(self.sft_steps, 1),
                                    total_rl_steps=max(self.rl_steps, 1),
                                    num_cpus_per_rank=cfg.cluster.learner_cpus,
                                    num_gpus_per_rank=cfg.cluster.learner_gpus)
        self.engines = create_rollout_actors(self.model_path, section(cfg, "rollout"))
        self.rewards = RewardPool(section(cfg, "reward"), num_workers=cfg.cluster.reward_workers,
                                  num_cpus=cfg.cluster.reward_cpus)
        backends = set(ray.get([engine.weight_transfer_backend.remote() for engine in self.engines]))
        if len(backends) != 1 or None in backends:
            raise RuntimeError(f"rollout engines report weight-transfer backends {sorted(map(str, backends))}; "
                               f"set rollout.weight_transfer_backend")
        self.weight_sync = WeightSync(self.learner, self.engines, backend=backends.pop(),
                                      bucket_bytes=cfg.learner.bucket_bytes,
                                      timeout_s=cfg.learner.collective_timeout_s)

    # ---- stages -------------------------------------------------------------------------
    def _sft_step(self, step: int) -> dict[str, Any]:
        batch = [self.data.sft[i] for i in self.sft_cursor.take(self.cfg.sft.batch_size)]
        start = time.perf_counter()
        metrics = self.learner.sft_step([SftSample(e.prompt_token_ids, e.response_token_ids) for e in batch])
        metrics["time/train"] = time.perf_counter() - start
        return metrics

    def _generate_and_score(self, prompts: list[Prompt], *, forced: bool, n: int,
                            greedy: bool = False, modes: list[Mode] | None = None,
                            histories: list[list[dict[str, str]]] | None = None,
                            ) -> tuple[list[Scored], dict[str, float], dict[str, int]]:
        """Generate on every engine and score each engine's output as soon as it arrives."""
        start = time.perf_counter()
        engines = len(self.engines)
        chunks = [(prompts[i::engines], histories[i::engines] if histories else None) for i in range(engines)]
        pending = {engine.generate.remote(chunk, forced=forced, n=n, greedy=greedy, modes=modes, histories=hist): i
                   for i, (engine, (chunk, hist)) in enumerate(zip(self.engines, chunks)) if chunk}
        score_refs = []
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            rollouts: list[Rollout] = ray.get(done[0])
            pending.pop(done[0])
            score_refs.append(self.rewards.submit(rollouts))
        generated = time.perf_counter()
        scored, counts = self.rewards.collect(score_refs)
        finished = time.perf_counter()
        return scored, {"generate": generated - start, "score": finished - generated}, counts

    def _two_turn_alignment(self) -> dict[str, float]:
        """The paper's RQ6: a second turn whose best mode differs from the first turn's, under
        one persona; the rate at which the model picks the second turn's best mode."""
        world = self.data.world
        cases = two_turn_cases(world, count=self.cfg.eval.two_turn_cases, seed=self.cfg.run.seed)
        greedy = self.cfg.eval.greedy
        first, _, _ = self._generate_and_score([c.first for c in cases], forced=False, n=1, greedy=greedy)
        by_id = {s.rollout.prompt.id: s.rollout for s in first}
        histories = [[{"role": "user", "content": format_question(c.first.question, c.first.choices)},
                      {"role": "assistant", "content": by_id[c.first.id].text}] for c in cases]
        second, _, _ = self._generate_and_score([c.second for c in cases], forced=False, n=1, greedy=greedy,
                                                histories=histories)
        cases_by_id = {c.second.id: c for c in cases}
        return mode_alignment((cases_by_id[s.rollout.prompt.id].order, s, world.best_mode(s.rollout.prompt))
                              for s in second)

    def evaluate(self, step: int, tag: str) -> dict[str, Any]:
        start = time.perf_counter()
        scored, _, counts = self._generate_and_score(self.data.eval, forced=False, n=1,
                                                     greedy=self.cfg.eval.greedy)
        result = summarize(scored)
        result["reward_counts"] = counts
        if tag in ("sft", "final") and self.cfg.eval.baselines:
            forced, _, _ = self._generate_and_score(self.data.eval, forced=True, n=1, greedy=self.cfg.eval.greedy)
            result["baselines"] = forced_mode_summary(forced)
            if self.data.world is not None and self.cfg.eval.two_turn_cases:
                result["two_turn_alignment"] = self._two_turn_alignment()
        result["time"] = time.perf_counter() - start
        if self.tracker is not None:
            shown = self.rng.sample(scored, min(self.cfg.eval.samples_logged, len(scored)))
            self.tracker.log_samples(step, [{
                "tag": tag, "prompt_id": s.rollout.prompt.id, "persona": s.rollout.prompt.persona or "",
                "question": s.rollout.prompt.question, "response": s.rollout.text,
                "mode": s.rollout.mode.name if s.rollout.mode is not None else "none",
                "reward": s.reward, "correct": s.correct} for s in shown])
        return result

    def _rl_step(self, step: int) -> dict[str, Any]:
        cfg = self.cfg
        step_start = time.perf_counter()
        prompts = [self.data.train[i] for i in self.rl_cursor.take(cfg.algo.prompts_per_step)]
        forced = bool(cfg.algo.forced_prefix)
        n = cfg.algo.n_per_mode if forced else 2 * cfg.algo.n_per_mode
        scored, times, counts = self._generate_and_score(prompts, forced=forced, n=n)
        stale = [s for s in scored if s.rollout.weight_version < self.learner.weight_version - cfg.algo.max_staleness]
        if stale:
            raise RuntimeError(f"{len(stale)} rollouts came from weight version "
                               f"{min(s.rollout.weight_version for s in stale)}, learner is at "
                               f"{self.learner.weight_version} (algo.max_staleness={cfg.algo.max_staleness})")
        learner_metrics = self.learner.policy_step(scored)
        times["reference"] = learner_metrics.pop("time/reference", 0.0)
        times["train"] = learner_metrics.pop("time/train", 0.0)
        sync = self.weight_sync.sync()
        times["sync"] = sync["seconds"]
        total = time.perf_counter() - step_start
        times["idle"] = max(0.0, total - sum(times.values()))
        times["step"] = total
        return {"stage": "rl", **rollout_metrics(scored), "reward_counts": counts,
                "learner": learner_metrics, "sync": sync, "time": times,
                "weight_version": self.learner.weight_version}

    # ---- checkpoints --------------------------------------------------------------------
    def _client_state(self, stage: str, step: int) -> dict[str, Any]:
        return {"stage": stage, "step": step, "sft_cursor": self.sft_cursor.state(),
                "rl_cursor": self.rl_cursor.state(), "driver_rng": _rng_state(self.rng),
                "weight_version": self.learner.weight_version, "model_path": str(self.model_path)}

    def save(self, stage: str, step: int) -> Path:
        root = self.run_dir / CHECKPOINTS
        final = root / f"{stage}_step_{step}" if stage == "sft" else root / f"step_{step}"
        if (final / COMPLETE_MARKER).exists():
            return final
        staging = root / f".tmp-{final.name}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        state = self._client_state(stage, step)
        self.learner.save_checkpoint(staging, state)
        write_json_atomic(staging / "driver_state.json", state)
        (staging / COMPLETE_MARKER).write_text("")
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)  # the step folder appears only complete
        return final

    def latest_checkpoint(self) -> Path | None:
        root = self.run_dir / CHECKPOINTS
        complete = [p for p in root.glob("*step_*") if (p / COMPLETE_MARKER).exists()] if root.exists() else []
        if not complete:
            return None
        def order(path: Path) -> tuple[int, int]:
            state = json.loads((path / "driver_state.json").read_text())
            return (0 if state["stage"] == "sft" else 1, state["step"])
        return max(complete, key=order)

    def _restore(self) -> tuple[str, int]:
        checkpoint = self.latest_checkpoint()
        if checkpoint is None:
            return "start", 0
        state = json.loads((checkpoint / "driver_state.json").read_text())
        self.learner.load_checkpoint(checkpoint)
        self.sft_cursor.restore(state["sft_cursor"])
        self.rl_cursor.restore(state["rl_cursor"])
        version, internal, gauss = state["driver_rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self._truncate_metrics(state["stage"], state["step"])
        log.info("resumed from %s", checkpoint)
        return state["stage"], state["step"]

    def _truncate_metrics(self, stage: str, step: int) -> None:
        """Drop metric lines written after the checkpoint, so resumed steps are not doubled."""
        limit = _progress_key({"stage": stage, "step": step})
        kept = [r for r in read_metrics(self.run_dir) if _progress_key(r) <= limit]
        path = self.run_dir / "metrics.jsonl"
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
        tmp.replace(path)

    # ---- the run ------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        from personadual.report import write_plots

        cfg = self.cfg
        self._build()
        self.tracker = RunTracker(self.run_dir, config=to_container(cfg),
                                  secret_env=[cfg.reward.judge.api_key_env],
                                  wandb_mode=cfg.run.wandb_mode, wandb_project=cfg.run.wandb_project,
                                  resume=self.resume)
        summary: dict[str, Any] = {"run": self.run_dir.name, "eval": {}, "eval_history": [],
                                   "data_skipped": dict(self.data.skipped)}
        stage, done_step = self._restore() if self.resume else ("start", 0)
        sft_start = done_step if stage == "sft" else (self.sft_steps if stage == "rl" else 0)
        rl_start = done_step if stage == "rl" else 0
        try:
            from tqdm import tqdm

            with tqdm(total=self.sft_steps, initial=sft_start, desc="SFT", disable=self.sft_steps == 0) as bar:
                for step in range(sft_start + 1, self.sft_steps + 1):
                    metrics = self._sft_step(step)
                    self.tracker.log(step, {"stage": "sft", **metrics})
                    bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.3f}")
                    bar.update(1)
            if stage != "rl" and self.sft_steps > 0:
                self.save("sft", self.sft_steps)
            self.weight_sync.sync()
            if cfg.eval.at_start and rl_start == 0:
                result = self.evaluate(0, "sft")
                summary["eval_sft"] = result
                self.tracker.log(0, {"stage": "eval", "tag": "sft", "eval": result})
            with tqdm(total=self.rl_steps, initial=rl_start, desc="DualGRPO") as bar:
                for step in range(rl_start + 1, self.rl_steps + 1):
                    metrics = self._rl_step(step)
                    if cfg.run.eval_every and step % cfg.run.eval_every == 0 and step != self.rl_steps:
                        metrics["eval"] = self.evaluate(step, f"step_{step}")
                    self.tracker.log(step, metrics)
                    bar.set_postfix(reward=f"{metrics['reward/mean'] or 0:.3f}",
                                    step_s=f"{metrics['time']['step']:.1f}")
                    bar.update(1)
                    if cfg.run.save_every and step % cfg.run.save_every == 0:
                        self.save("rl", step)
            final = self.evaluate(self.rl_steps, "final")
            self.tracker.log(self.rl_steps, {"stage": "eval", "tag": "final", "eval": final})
            summary["eval"] = final
            self.save("rl", self.rl_steps)
            self.learner.save_hf(self.run_dir / "policy")
            summary["policy"] = str(self.run_dir / "policy")
            summary["eval_history"] = [r for r in read_metrics(self.run_dir) if r.get("stage") == "eval"]
            self.tracker.write_summary(summary)
            write_plots(self.run_dir)
            return summary
        finally:
            self.tracker.finish()
            self.shutdown()

    def shutdown(self) -> None:
        for thing in ("learner", "rewards"):
            handle = getattr(self, thing, None)
            if handle is not None:
                handle.shutdown()
        for engine in getattr(self, "engines", []):
            ray.kill(engine)


def prepare_run_dir(cfg: DictConfig) -> Path:
    name = cfg.run.name or time.strftime("%Y%m%d-%H%M%S")
    run_dir = Path(cfg.run.out_dir) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / "config.yaml")
    return run_dir
