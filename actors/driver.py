"""The driver: SFT stage -> DualGRPO stage -> eval, on Ray actors. Orchestration only: the
set-up of the actors, the stage loops, checkpoint timing and stopping on faults. The jobs it
hands out: generation fan-out and engine replacement (actors/generation.py), evaluation
(actors/evaluation.py), the run's state on disk (actors/run_state.py), one RL step
(personadual/rl_step.py) and what each step reports (personadual/step_metrics.py).
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from pathlib import Path
from typing import Any

import ray
from omegaconf import DictConfig

from actors.config import section, to_container
from actors.console import StageProgress
from actors.evaluation import Evaluator
from actors.generation import GenerationFanOut, RLRollouts
from actors.learner_group import LearnerGroup, LearnerRankDied
from actors.mode_probe import ModeProbe
from actors.placement import Placement, check_fits, cluster_shape, plan_groups
from actors.reference_worker import ReferenceWorkerDied, reference_service_for_run
from actors.reward_pool import RewardPool
from actors.rollout_actor import engines_ready, launch_rollout_actors, start_rollout_actor
from actors.run_state import CheckpointStore, DataCursor, load_stages, open_tracker, rng_state
from actors.schedule import PhaseSwitch
from actors.supervision import EngineSupervisor, FaultLog, RunStopped, one_line, stop_if_diverged
from actors.threads import RunThreads, plan_for_run
from actors.weight_sync import WeightSyncError, weight_sync_for_run
from personadual.data import resolve_model
from personadual.evaluation import probe_prompts
from personadual.records import Scored
from personadual.report import method_label
from personadual.rl_step import RLStep
from personadual.step_metrics import (RunClock, duration, eval_line, rl_step_record, sft_step_record,
                                      training_samples)
from personadual.tracking import RunTracker, last_eval, read_metrics
from rewards.judge import JudgeError

__all__ = ["Driver"]

log = logging.getLogger(__name__)
SFT_LINE_EVERY = 10  # without a terminal, SFT steps (fast, many) print one line per ten
PROBE_PROMPTS = 4  # the fixed batch a weight-sync check asks every engine (rollout.verify_every)


class Driver:
    def __init__(self, cfg: DictConfig, run_dir: Path, *, resume: bool = False, restore: bool = False) -> None:
        """``resume``: continue this run (its W&B run too); ``restore``: a new run whose folder
        already holds the checkpoint to start from (``--init-from``)."""
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.resume = resume
        self.restore_checkpoint = resume or restore
        self.rng = random.Random(cfg.run.seed)
        self.tracker: RunTracker | None = None
        self.checkpoints = CheckpointStore(self.run_dir, keep_last=cfg.run.keep_last, hf_export=cfg.run.hf_export)
        self.faults = FaultLog(cfg.run.max_consecutive_failures)
        self._last_done: tuple[str, int, int] | None = None  # (stage, step, weight version) completed last
        self.started = False  # the actors are up: a failure now is the run's, not the input's

    # ---- set-up -------------------------------------------------------------------------
    def _build(self) -> None:
        cfg = self.cfg
        # Fail at once, naming the keys, when the actors cannot all be placed (Ray would
        # otherwise wait for resources that never come); the groups are created from this plan.
        groups = plan_groups(cfg)
        check_fits(groups, *cluster_shape())
        self.model_path = resolve_model(cfg.model.path, cfg.model.tiny_preset)
        self.placement = Placement.create(groups, timeout_s=cfg.cluster.placement_timeout_s)
        # Each actor's threads (actors/threads.py) and the schedule's phase changes (actors/schedule.py).
        self.threads = RunThreads(plan_for_run(cfg, self.placement), cfg.cluster.schedule)
        self.phases = PhaseSwitch(cfg.cluster.schedule)
        # The engines (vLLM's import, the slowest start-up on CPU) and the learner's ranks start
        # while this process loads the tokenizer and the data; the ranks are set up once the
        # data has given the stages' lengths.
        self.engines = launch_rollout_actors(
            self.model_path, section(cfg, "rollout"), threads=self.threads.plan.rollout,
            slots=[self.placement.engine_slot(i) for i in range(cfg.rollout.num_engines)],
            sleep_between_phases=self.phases.active)
        self.learner = LearnerGroup(section(cfg, "learner"), self.model_path, algo=section(cfg, "algo"),
                                    placement_group=self.placement.learner,
                                    rollout_temperature=cfg.rollout.sampling.temperature,
                                    threads=self.threads.plan.learner_sft, set_up=False)
        from transformers import AutoTokenizer  # 2-3 s of imports (torch's included), beside the actors' start

        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.data, self.sft_steps, self.rl_steps = load_stages(cfg, self.tokenizer)
        self.sft_cursor = DataCursor(cfg.run.seed, max(len(self.data.sft), 1))
        self.rl_cursor = DataCursor(cfg.run.seed + 1, len(self.data.train))
        self.learner.set_up(total_sft_steps=max(self.sft_steps, 1), total_rl_steps=max(self.rl_steps, 1))
        # The reward workers (2-3 s of imports) and W&B (its service process, 1-2 s) start while
        # the engines finish their set-up, which keeps only one core busy by then.
        self.rewards = RewardPool(section(cfg, "reward"), num_workers=cfg.reward.num_workers,
                                  num_cpus=cfg.reward.num_cpus_per_worker, placement_group=self.placement.reward,
                                  faults=self.faults, wait=False)
        self.tracker = open_tracker(cfg, self.run_dir, resume=self.resume)
        engines_ready(self.engines)
        self.reference = (reference_service_for_run(cfg, self.model_path, self.threads.plan.rollout[0],
                                                    self.placement.engine_slot(0))
                          if cfg.cluster.reference == "worker" else None)
        print(self.threads.read_back(self.learner, self.engines, self.reference), flush=True)
        self.rewards.wait_ready()
        self.weight_sync = weight_sync_for_run(cfg, self.learner, self.engines,
                                               list((self.data.eval or self.data.train)[:PROBE_PROMPTS]))
        self.supervisor = EngineSupervisor(self.engines, self.weight_sync, self._start_engine, self.faults)
        self.generation = GenerationFanOut(self.engines, self.rewards, self.supervisor, self.faults,
                                           generate_timeout_s=cfg.rollout.generate_timeout_s)
        self.mode_probe = ModeProbe(self.learner, self.tokenizer,
                                    probe_prompts(self.data.eval, cfg.eval.probe_per_setting, cfg.run.seed))
        self.evaluator = Evaluator(cfg, self.data, self.generation, self.rng, run_dir=self.run_dir,
                                   mode_probe=self.mode_probe)
        self.rl_rollouts = RLRollouts(self.generation, self.data.train, self.rl_cursor,
                                      prompts_per_step=cfg.algo.prompts_per_step, n_per_mode=cfg.algo.n_per_mode,
                                      forced_prefix=bool(cfg.algo.forced_prefix), run_seed=cfg.run.seed,
                                      filter_max_rounds=cfg.algo.filter_max_rounds if cfg.algo.filter_groups else None,
                                      reference=self.reference)
        self.rl_stepper = RLStep(self.rl_rollouts, self.phases.around(self.learner, self.engines), self.supervisor.sync,
                                 max_staleness=cfg.algo.max_staleness, total_steps=self.rl_steps)

    def _start_engine(self, index: int) -> Any:
        """A replacement for rollout engine ``index``, in that engine's placement bundle."""
        group, bundle = self.placement.engine_slot(index)
        config = dataclasses.replace(section(self.cfg, "rollout"), threads=self.threads.plan.rollout[index])
        return start_rollout_actor(self.model_path, config, index, group, bundle=bundle,
                                   sleep_between_phases=self.phases.active)

    # ---- stages -------------------------------------------------------------------------
    def _sft_step(self, step: int) -> dict[str, Any]:
        batch = [self.data.sft[i] for i in self.sft_cursor.take(self.cfg.sft.batch_size)]
        start = time.perf_counter()
        learner = self.learner.sft_step(batch)
        record = sft_step_record(learner, time.perf_counter() - start)
        record["perf"].update(self.threads.metrics("sft"))
        return record

    def evaluate(self, step: int, tag: str) -> dict[str, Any]:
        return self.evaluator.evaluate(step, tag, tracker=self.tracker, log_step=self._global_step("eval", step))

    def _rl_step(self, step: int) -> dict[str, Any]:
        """One DualGRPO step (personadual/rl_step.py) and its metrics record."""
        done = self.rl_stepper(step)
        self._log_training_samples(step, done.scored)
        record = rl_step_record(done.scored, done.learner_metrics, done.times, reward_counts=done.reward_counts,
                                sync=done.sync, staleness=done.staleness, weight_version=self.learner.weight_version)
        record["perf"].update(self.threads.metrics("rl"))
        return {**record, **self.rl_rollouts.step_metrics(), **self.phases.step_metrics()}

    def _log_training_samples(self, step: int, scored: list[Scored]) -> None:
        every = self.cfg.run.log_samples_every
        if self.tracker is not None and every and step % every == 0 and scored:
            self.tracker.log_samples(self._global_step("rl", step), "rollout/samples",
                                     training_samples(scored, self.cfg.run.seed, step, self.cfg.run.samples_per_log))

    def _global_step(self, stage: str, step: int) -> int:
        """The one monotonic step W&B logs at: SFT steps, then RL steps after the last SFT step."""
        return step if stage == "sft" else self.sft_steps + step

    # ---- checkpoints --------------------------------------------------------------------
    def _client_state(self, stage: str, step: int) -> dict[str, Any]:
        return {"stage": stage, "step": step, "sft_cursor": self.sft_cursor.state(),
                "rl_cursor": self.rl_rollouts.cursor_state or self.rl_cursor.state(),
                "driver_rng": rng_state(self.rng), "weight_version": self.learner.weight_version,
                "model_path": str(self.model_path)}

    def save(self, stage: str, step: int) -> Path:
        return self.checkpoints.save(self.learner, stage, step, self._client_state(stage, step))

    def latest_checkpoint(self) -> Path | None:
        return self.checkpoints.latest()

    # ---- the run ------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        from personadual.report import write_plots

        cfg = self.cfg
        try:
            self._build()
        except BaseException:
            if self.tracker is not None:  # opened before a later part of the start-up failed
                self.tracker.finish()
            raise
        self.started = True
        print(self.tracker.describe(), flush=True)
        summary: dict[str, Any] = {"run": self.run_dir.name, "eval": {}, "eval_history": [],
                                   "data_skipped": dict(self.data.skipped)}
        stage, done_step = (self.checkpoints.restore_latest(self.learner, sft_cursor=self.sft_cursor,
                                                            rl_cursor=self.rl_cursor, rng=self.rng)
                            if self.restore_checkpoint else ("start", 0))
        if stage != "start":
            self._last_done = (stage, done_step, self.learner.weight_version)
        sft_start = done_step if stage == "sft" else (self.sft_steps if stage == "rl" else 0)
        rl_start = done_step if stage == "rl" else 0
        clock = RunClock(self.sft_steps - sft_start, self.rl_steps - rl_start)
        try:
            with StageProgress("SFT", self.sft_steps, sft_start, every=SFT_LINE_EVERY) as progress:
                for step in range(sft_start + 1, self.sft_steps + 1):
                    metrics = self._sft_step(step)
                    self._last_done = ("sft", step, self.learner.weight_version)
                    metrics["perf"].update(clock.step_done("sft", metrics["timing_s"]["step"]))
                    self.tracker.log(self._global_step("sft", step), {"step": step, **metrics})
                    self._stop_if_diverged("sft", step, metrics["sft"])
                    progress.update(loss=float(metrics["sft"].get("loss", float("nan"))),
                                    stage_eta=duration(metrics["perf"]["stage_eta_s"]))
            if stage != "rl" and self.sft_steps > 0:
                self.save("sft", self.sft_steps)
                self._last_done = ("sft", self.sft_steps, self.learner.weight_version)
            self.supervisor.sync()
            if cfg.eval.at_start and rl_start == 0:
                result = self.evaluate(0, "sft")
                summary["eval_sft"] = result
                self.tracker.log(self._global_step("rl", 0), {"stage": "eval", "tag": "sft", "step": 0,
                                                              "eval": result})
                print(eval_line("sft", 0, result), flush=True)
            if self.reference is not None and rl_start < self.rl_steps:
                self.reference.load_from(self.learner)  # the learner freezes its reference; the worker gets a copy
            self.threads.enter_rl(self.learner)
            with StageProgress(method_label(to_container(cfg)), self.rl_steps, rl_start) as progress:
                for step in range(rl_start + 1, self.rl_steps + 1):
                    probe_due = step % cfg.eval.probe_every == 0 or step == self.rl_steps
                    metrics = {**self._rl_step(step), **self.faults.step_done(),
                               **(self.mode_probe.step_metrics() if probe_due else {})}
                    self._last_done = ("rl", step, self.learner.weight_version)
                    metrics["perf"].update(clock.step_done("rl", metrics["timing_s"]["step"]))
                    if cfg.run.eval_every and step % cfg.run.eval_every == 0 and step != self.rl_steps:
                        metrics["eval"] = self.evaluate(step, f"step_{step}")
                        progress.write(eval_line(f"step_{step}", step, metrics["eval"]))
                    self.tracker.log(self._global_step("rl", step), {"step": step, "rl_step": step, **metrics})
                    self._stop_if_diverged("rl", step, metrics["learner"])
                    progress.update(reward=metrics["reward/mean"] or 0.0,
                                    kl=float(metrics["learner"].get("kl", 0.0)),
                                    step_s=metrics["timing_s"]["step"],
                                    stage_eta=duration(metrics["perf"]["stage_eta_s"]))
                    if cfg.run.save_every and step % cfg.run.save_every == 0:
                        self.save("rl", step)
            final = self.evaluate(self.rl_steps, "final")
            self.tracker.log(self._global_step("rl", self.rl_steps),
                             {"stage": "eval", "tag": "final", "step": self.rl_steps, "eval": final})
            print(eval_line("final", self.rl_steps, final), flush=True)
            summary["eval"] = final
            self.save("rl", self.rl_steps)
            self.learner.save_hf(self.run_dir / "policy")
            summary["policy"] = str(self.run_dir / "policy")
            summary["eval_history"] = [r for r in read_metrics(self.run_dir) if r.get("stage") == "eval"]
            if "eval_sft" not in summary and (earlier := last_eval(summary["eval_history"], "sft")) is not None:
                summary["eval_sft"] = earlier  # resumed after the SFT eval: the metrics kept it
            summary["faults"] = self.faults.totals()
            self.tracker.write_summary(summary)
            write_plots(self.run_dir)
            return summary
        except (RunStopped, LearnerRankDied, WeightSyncError, ReferenceWorkerDied) as error:
            raise self._stopped(error) from None
        except JudgeError as error:
            # Policy "fail" stops the run like any fault it cannot get past (one line, exit 3,
            # a checkpoint of the last complete step); the failed step's scoring totals are kept.
            stage_done, step_done = self._last_done[:2] if self._last_done is not None else ("sft", 0)
            step = step_done + 1 if stage_done == "rl" else 1  # the RL step that failed
            self.tracker.log(self._global_step("rl", step), {"stage": "reward_failure", "step": step,
                                                             "error": str(error), "reward_counts": error.counts})
            raise self._stopped(error) from None
        finally:
            hint = self.tracker.sync_hint()
            self.tracker.finish()
            self.shutdown()
            if hint:
                print(f"W&B offline run saved; upload it with: {hint}", flush=True)

    def _stop_if_diverged(self, stage: str, step: int, learner_metrics: dict[str, Any]) -> None:
        stop_if_diverged(stage, step, learner_metrics, self.cfg.learner.max_consecutive_nonfinite,
                         self.learner.weight_version)

    def _stopped(self, error: BaseException) -> RunStopped:
        """The one-line RunStopped for a fault the run cannot get past, after checkpointing the
        last completed step when the learner is still there to save it."""
        saved = None
        if self._last_done is not None and not isinstance(error, LearnerRankDied):
            stage, step, version = self._last_done
            if stage == "rl" and self.learner.weight_version != version:
                step += 1  # the learner trained on the failed step's batch; only its sync failed
            try:
                saved = self.save(stage, step)
            except Exception as save_error:  # noqa: BLE001  (the stop's own cause is the message)
                log.error("no checkpoint after the stop: %s", one_line(save_error))
        latest = saved or self.latest_checkpoint()
        reason = str(error).strip().splitlines()[0] if str(error).strip() else one_line(error)
        return RunStopped(f"run stopped: {reason}; last complete checkpoint: {latest or 'none'}; "
                          f"continue with: python launch.py --resume {self.run_dir}")

    def shutdown(self) -> None:
        for thing in ("learner", "rewards", "reference"):
            handle = getattr(self, thing, None)
            if handle is not None:
                handle.shutdown()
        for engine in getattr(self, "engines", []):
            ray.kill(engine)
        placement = getattr(self, "placement", None)
        if placement is not None:
            placement.remove()

