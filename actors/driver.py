"""The driver loop: SFT stage -> DualGRPO stage -> eval, on Ray actors.

One RL step (docs/ARCHITECTURE.md, "One RL step"): rollout actors generate forced-prefix groups, reward
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
from typing import Any, Sequence

import ray
from omegaconf import DictConfig, OmegaConf

from actors.config import ConfigError, section, to_container
from actors.console import StageProgress
from actors.step_metrics import RunClock, duration, eval_line, mode_prob_name, rollout_metrics, sample_row
from actors.learner_group import LearnerGroup, LearnerRankDied
from actors.placement import Placement, check_fits, cluster_shape, plan_groups
from actors.reward_pool import RewardPool
from actors.rollout_actor import create_rollout_actors, start_rollout_actor
from actors.supervision import EngineHung, EngineSupervisor, FaultLog, RunStopped, one_line
from actors.weight_sync import SyncVerification, WeightSync, WeightSyncError
from learner.batch import SftSample
from personadual.data import load_run_data, resolve_model
from personadual.evaluation import forced_mode_summary, mode_alignment, summarize
from personadual.group_filter import fill_batch
from personadual.modes import Mode
from personadual.prompts import format_question
from personadual.records import Prompt, Rollout, Scored
from personadual.report import method_label
from personadual.seeds import step_seeds
from personadual.tracking import RunTracker, WandbSettings, read_metrics, write_json_atomic
from personadual.world import two_turn_cases
from rewards.judge import JudgeError

log = logging.getLogger(__name__)
CHECKPOINTS = "checkpoints"
COMPLETE_MARKER = "COMPLETE"
REFERENCE_DIR = "reference"  # checkpoints/reference: the frozen KL reference, written once per run
SFT_LINE_EVERY = 10  # without a terminal, SFT steps (fast, many) print one line per ten
PROBE_PROMPTS = 4  # the fixed batch a weight-sync check asks every engine (rollout.verify_every)


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


@dataclass
class PendingGeneration:
    """A generation round in flight: each engine's ObjectRef (to its engine index)."""

    step: int = 0
    refs: dict[Any, int] = field(default_factory=dict)
    # Per engine index: the engine and its call, to generate again on a replacement if it dies.
    engines: dict[int, Any] = field(default_factory=dict)
    calls: dict[int, tuple[list[Prompt], dict[str, Any]]] = field(default_factory=dict)
    started: dict[Any, float] = field(default_factory=dict)  # each ObjectRef's submission (monotonic)

    def submit(self, index: int, engine: Any, chunk: list[Prompt], kwargs: dict[str, Any]) -> None:
        ref = engine.generate.remote(chunk, **kwargs)
        self.refs[ref] = index
        self.started[ref] = time.monotonic()
        self.engines[index], self.calls[index] = engine, (chunk, kwargs)


class StaleRolloutsError(RuntimeError):
    """Rollouts generated with weights more learner updates old than algo.max_staleness."""


def rollout_staleness(versions: Sequence[int], update_versions: Sequence[int]) -> list[int]:
    """Staleness, in learner updates, of rollouts generated with weight ``versions``: how many
    of the learner's RL updates (``update_versions``: the weight version after each) came
    after them. Counted in updates, not versions: one update may hold several optimizer steps."""
    return [sum(update > version for update in update_versions) for version in versions]


def check_staleness(step: int, versions: Sequence[int], update_versions: Sequence[int],
                    max_staleness: int) -> list[int]:
    """Each rollout's staleness; refuses the batch when any is staler than ``max_staleness``."""
    staleness = rollout_staleness(versions, update_versions)
    if max(staleness, default=0) > max_staleness:
        stale = sum(value > max_staleness for value in staleness)
        raise StaleRolloutsError(f"{stale} rollouts offered to RL step {step} are {max(staleness)} learner "
                                 f"updates old (weight version {min(versions)}, learner at "
                                 f"{update_versions[-1]}); algo.max_staleness={max_staleness}")
    return staleness


def verify_tolerance(cfg: DictConfig) -> float:
    """rollout.verify_tolerance, or its default for the run's precisions (rollout/config.py)."""
    if cfg.rollout.verify_tolerance is not None:
        return float(cfg.rollout.verify_tolerance)
    learner_fp32 = cfg.learner.precision == "fp32" or (cfg.learner.precision == "auto"
                                                        and cfg.learner.num_gpus_per_rank == 0)
    return 0.01 if cfg.rollout.dtype == "float32" and learner_fp32 else 0.25


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
        self._next_generation: PendingGeneration | None = None  # step+1's rollouts in flight (pipelined)
        self._rl_cursor_state: dict[str, int] | None = None  # the RL data position after the last step's prompts
        self._rl_versions: list[int] = []  # the learner's weight version after each RL step of this process
        self.faults = FaultLog(cfg.run.max_consecutive_failures)
        self._last_done: tuple[str, int, int] | None = None  # (stage, step, weight version) completed last
        self.started = False  # the actors are up: a failure now is the run's, not the input's

    # ---- set-up -------------------------------------------------------------------------
    def _build(self) -> None:
        from transformers import AutoTokenizer

        cfg = self.cfg
        # Fail at once, naming the keys, when the actors cannot all be placed (Ray would
        # otherwise wait for resources that never come); the groups are created from this plan.
        groups = plan_groups(cfg)
        check_fits(groups, *cluster_shape())
        self.model_path = resolve_model(cfg.model.path, cfg.model.tiny_preset)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.data = load_run_data(
            cfg.data.source, self.tokenizer, world_seed=cfg.data.world_seed,
            world_sft_aligned_kinds=cfg.data.world_sft_aligned_kinds,
            train_files=list(cfg.data.train_files), eval_files=list(cfg.data.eval_files),
            sft_files=list(cfg.data.sft_files), skip_invalid=cfg.data.skip_invalid,
            max_eval_prompts=cfg.data.max_eval_prompts, max_prompt_tokens=cfg.data.max_prompt_tokens,
            max_sft_tokens=cfg.sft.max_length, balance_settings=cfg.data.balance_settings)
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
        self.placement = Placement.create(groups, timeout_s=cfg.cluster.placement_timeout_s)
        self.learner = LearnerGroup(section(cfg, "learner"), self.model_path,
                                    algo=section(cfg, "algo"), total_sft_steps=max(self.sft_steps, 1),
                                    total_rl_steps=max(self.rl_steps, 1),
                                    placement_group=self.placement.learner,
                                    rollout_temperature=cfg.rollout.sampling.temperature)
        self.engines = create_rollout_actors(self.model_path, section(cfg, "rollout"),
                                             placement_groups=self.placement.engines())
        self.rewards = RewardPool(section(cfg, "reward"), num_workers=cfg.reward.num_workers,
                                  num_cpus=cfg.reward.num_cpus_per_worker, placement_group=self.placement.reward,
                                  faults=self.faults)
        backends = set(ray.get([engine.weight_transfer_backend.remote() for engine in self.engines]))
        if len(backends) != 1 or None in backends:
            raise RuntimeError(f"rollout engines report weight-transfer backends {sorted(map(str, backends))}; "
                               f"set rollout.weight_transfer_backend")
        probe = (self.data.eval or self.data.train)[:PROBE_PROMPTS]
        self.weight_sync = WeightSync(self.learner, self.engines, backend=backends.pop(),
                                      bucket_bytes=cfg.learner.bucket_bytes,
                                      timeout_s=cfg.learner.collective_timeout_s,
                                      verification=SyncVerification(cfg.rollout.verify_every,
                                                                    verify_tolerance(cfg), list(probe)))
        self.supervisor = EngineSupervisor(self.engines, self.weight_sync, self._start_engine, self.faults)

    def _start_engine(self, index: int) -> Any:
        """A replacement for rollout engine ``index``, in that engine's placement group."""
        return start_rollout_actor(self.model_path, section(self.cfg, "rollout"), index,
                                   self.placement.engines()[index])

    # ---- stages -------------------------------------------------------------------------
    def _sft_step(self, step: int) -> dict[str, Any]:
        batch = [self.data.sft[i] for i in self.sft_cursor.take(self.cfg.sft.batch_size)]
        start = time.perf_counter()
        learner = self.learner.sft_step([SftSample(e.prompt_token_ids, e.response_token_ids) for e in batch])
        seconds = time.perf_counter() - start
        learner.pop("time/train", None)
        return {"stage": "sft", "sft": learner, "timing_s": {"train": seconds, "step": seconds},
                "perf": {"train_tokens_per_s": float(learner.get("tokens", 0.0)) / max(seconds, 1e-9)}}

    def _start_generation(self, prompts: list[Prompt], *, forced: bool, n: int, greedy: bool = False,
                          modes: list[Mode] | None = None, histories: list[list[dict[str, str]]] | None = None,
                          seeds: list[int] | None = None) -> "PendingGeneration":
        """Send each engine its share of the prompts; returns at once."""
        engines = len(self.engines)
        pending = PendingGeneration()
        for i, engine in enumerate(self.engines):
            chunk = prompts[i::engines]
            if chunk:
                kwargs = dict(forced=forced, n=n, greedy=greedy, modes=modes,
                              histories=histories[i::engines] if histories else None,
                              seeds=seeds[i::engines] if seeds is not None else None)
                pending.submit(i, engine, chunk, kwargs)
        return pending

    def _rerun(self, pending: PendingGeneration, ref: Any, error: BaseException) -> None:
        """Engine ``pending.refs[ref]`` died or hung: replace it (actors/supervision.py) and send
        its replacement the same call, same seeds, so the samples are the ones it would have made."""
        index = pending.refs.pop(ref)
        pending.started.pop(ref, None)
        engine = self.supervisor.replace(index, pending.engines[index], error)
        chunk, kwargs = pending.calls[index]
        pending.submit(index, engine, chunk, kwargs)

    def _overdue(self, pending: PendingGeneration) -> tuple[list[Any], float | None]:
        """The calls still running past rollout.generate_timeout_s, and the seconds until the
        next deadline of the others. A finished call is never late, however long ago it was
        sent (a pipelined generation waits out the learner's step)."""
        if not pending.refs:
            return [], None
        limit = self.cfg.rollout.generate_timeout_s
        _, refs = ray.wait(list(pending.refs), num_returns=len(pending.refs), timeout=0)
        now = time.monotonic()
        late = [ref for ref in refs if now - pending.started[ref] >= limit]
        rest = [pending.started[ref] + limit - now for ref in refs if ref not in late]
        return late, (max(0.0, min(rest)) if rest else None)

    def _replace_hung(self, pending: PendingGeneration, late: list[Any]) -> None:
        limit = self.cfg.rollout.generate_timeout_s
        for ref in late:
            index = pending.refs[ref]
            self.faults.event("generate_timeouts")
            log.warning("rollout engine %d: no answer within rollout.generate_timeout_s=%g s; replacing it",
                        index, limit)
            self._rerun(pending, ref, EngineHung(f"rollout engine {index} generated for more than "
                                                 f"rollout.generate_timeout_s={limit:g} s"))

    def _wait_generation(self, pending: PendingGeneration) -> None:
        """Wait until every engine's call is done (results left in place), replacing an engine
        that hangs past rollout.generate_timeout_s and rerunning its call."""
        while True:
            late, next_deadline = self._overdue(pending)
            if late:
                self._replace_hung(pending, late)
                continue
            waiting = list(pending.refs)
            _, not_ready = ray.wait(waiting, num_returns=len(waiting), timeout=next_deadline)
            if not not_ready:
                return

    def _finish_generation(self, pending: "PendingGeneration",
                           ) -> tuple[list[Scored], dict[str, float], dict[str, int]]:
        """Score each engine's output as soon as it arrives; the scored rollouts in engine order."""
        wait_start = time.perf_counter()
        score_refs: dict[int, Any] = {}
        while pending.refs:
            late, next_deadline = self._overdue(pending)
            if late:  # a hung engine: killed, replaced, its call run again (same seeds)
                self._replace_hung(pending, late)
                continue
            done, _ = ray.wait(list(pending.refs), num_returns=1, timeout=next_deadline)
            if not done:
                continue
            try:
                rollouts: list[Rollout] = ray.get(done[0])
            except ray.exceptions.RayActorError as error:
                # A dead engine is replaced (actors/supervision.py) and its prompts generated again.
                self._rerun(pending, done[0], error)
                continue
            index = pending.refs.pop(done[0])
            pending.started.pop(done[0], None)
            score_refs[index] = self.rewards.submit(rollouts)
        generated = time.perf_counter()
        # Engine order, not arrival order: the learner's batch must not depend on timing.
        scored, counts = self.rewards.collect([score_refs[i] for i in sorted(score_refs)])
        finished = time.perf_counter()
        return scored, {"generate": generated - wait_start, "score": finished - generated}, counts

    def _generate_and_score(self, prompts: list[Prompt], *, forced: bool, n: int,
                            greedy: bool = False, modes: list[Mode] | None = None,
                            histories: list[list[dict[str, str]]] | None = None,
                            seeds: list[int] | None = None,
                            ) -> tuple[list[Scored], dict[str, float], dict[str, int]]:
        """Generate on every engine and score each engine's output as soon as it arrives."""
        return self._finish_generation(self._start_generation(prompts, forced=forced, n=n, greedy=greedy,
                                                              modes=modes, histories=histories, seeds=seeds))

    def _seeds(self, stage: str, step: int, count: int, greedy: bool = False) -> list[int] | None:
        """Per-prompt sampling seeds of one generation round (None when greedy)."""
        return None if greedy else step_seeds(self.cfg.run.seed, stage, step, count)

    def _two_turn_alignment(self, step: int, tag: str) -> dict[str, float]:
        """The paper's RQ6: a second turn whose best mode differs from the first turn's, under
        one persona; the rate at which the model picks the second turn's best mode."""
        world = self.data.world
        cases = two_turn_cases(world, count=self.cfg.eval.two_turn_cases, seed=self.cfg.run.seed)
        greedy = self.cfg.eval.greedy
        first, _, _ = self._generate_and_score([c.first for c in cases], forced=False, n=1, greedy=greedy,
                                               seeds=self._seeds(f"{tag}/two_turn_first", step, len(cases), greedy))
        by_id = {s.rollout.prompt.id: s.rollout for s in first}
        histories = [[{"role": "user", "content": format_question(c.first.question, c.first.choices)},
                      {"role": "assistant", "content": by_id[c.first.id].text}] for c in cases]
        second, _, _ = self._generate_and_score([c.second for c in cases], forced=False, n=1, greedy=greedy,
                                                histories=histories,
                                                seeds=self._seeds(f"{tag}/two_turn_second", step, len(cases), greedy))
        cases_by_id = {c.second.id: c for c in cases}
        return mode_alignment((cases_by_id[s.rollout.prompt.id].order, s, world.best_mode(s.rollout.prompt))
                              for s in second)

    def evaluate(self, step: int, tag: str) -> dict[str, Any]:
        start = time.perf_counter()
        greedy, count = self.cfg.eval.greedy, len(self.data.eval)
        scored, _, counts = self._generate_and_score(self.data.eval, forced=False, n=1, greedy=greedy,
                                                     seeds=self._seeds(f"{tag}/free", step, count, greedy))
        result = summarize(scored)
        result["reward_counts"] = counts
        if tag in ("sft", "final") and self.cfg.eval.baselines:
            forced, _, _ = self._generate_and_score(self.data.eval, forced=True, n=1, greedy=greedy,
                                                    seeds=self._seeds(f"{tag}/forced", step, count, greedy))
            result["baselines"] = forced_mode_summary(forced)
            if self.data.world is not None and self.cfg.eval.two_turn_cases:
                result["two_turn_alignment"] = self._two_turn_alignment(step, tag)
        result["timing_s"] = time.perf_counter() - start
        if self.tracker is not None:
            shown = self.rng.sample(scored, min(self.cfg.eval.samples_logged, len(scored)))
            self.tracker.log_samples(self._global_step("eval", step), "eval/samples",
                                     [{"tag": tag, **sample_row(s)} for s in shown])
        return result

    def _start_rl_generation(self, step: int) -> PendingGeneration:
        cfg = self.cfg
        prompts = [self.data.train[i] for i in self.rl_cursor.take(cfg.algo.prompts_per_step)]
        forced = bool(cfg.algo.forced_prefix)
        n = cfg.algo.n_per_mode if forced else 2 * cfg.algo.n_per_mode
        pending = self._start_generation(prompts, forced=forced, n=n, seeds=self._seeds("rl", step, len(prompts)))
        pending.step = step
        return pending

    def _rl_step(self, step: int) -> dict[str, Any]:
        """One DualGRPO step. With algo.max_staleness >= 1 the engines generate step+1's
        rollouts (on the weights they hold, one update behind once trained) while the learner
        trains on this step's; the weights go out once that generation is done."""
        cfg = self.cfg
        step_start = time.perf_counter()
        pending = self._next_generation if self._next_generation is not None else self._start_rl_generation(step)
        self._next_generation = None
        assert pending.step == step, f"rollouts of step {pending.step} offered to step {step}"
        scored, times, counts = self._finish_generation(pending)
        filter_metrics: dict[str, float] = {}
        if cfg.algo.filter_groups:
            scored, filter_metrics = self._filter_groups(step, scored, times, counts)
        staleness = check_staleness(step, [s.rollout.weight_version for s in scored], self._rl_versions,
                                    cfg.algo.max_staleness)
        self._rl_cursor_state = self.rl_cursor.state()  # what a checkpoint of this step resumes from
        if cfg.algo.max_staleness >= 1 and step < self.rl_steps:
            self._next_generation = self._start_rl_generation(step + 1)
        learner_metrics = self.learner.policy_step(scored)
        self._rl_versions.append(self.learner.weight_version)
        times["reference"] = learner_metrics.pop("time/reference", 0.0)
        times["train"] = learner_metrics.pop("time/train", 0.0)
        if self._next_generation is not None:
            # The engines finish the next rollouts before they take the new weights.
            wait_start = time.perf_counter()
            self._wait_generation(self._next_generation)
            times["generate_next"] = time.perf_counter() - wait_start
        sync = self.supervisor.sync()
        times["sync"] = sync["seconds"]
        total = time.perf_counter() - step_start
        times["idle"] = max(0.0, total - sum(times.values()))
        times["step"] = total
        times["train_old_logprob"] = learner_metrics.pop("time/old_logprob", 0.0)  # part of train
        self._log_training_samples(step, scored)
        generated = sum(len(s.rollout.response_token_ids) for s in scored)
        perf = {"tokens_per_s": generated / max(times["generate"], 1e-9),
                "train_tokens_per_s": float(learner_metrics.get("tokens", 0.0)) / max(times["train"], 1e-9)}
        mode_probs = {mode_prob_name(key): learner_metrics[key]
                      for key in learner_metrics if key.startswith("mode_token_prob")}
        return {"stage": "rl", **rollout_metrics(scored), **filter_metrics,
                **{f"mode/{k}": v for k, v in mode_probs.items()},
                "reward_counts": counts, "learner": learner_metrics, "sync": sync, "timing_s": times, "perf": perf,
                "weight_version": self.learner.weight_version,
                "staleness": {"max": max(staleness, default=0),
                              "mean": sum(staleness) / len(staleness) if staleness else 0.0,
                              "rollout_weight_version": min((s.rollout.weight_version for s in scored), default=0)}}

    def _filter_groups(self, step: int, scored: list[Scored], times: dict[str, float],
                       counts: dict[str, int]) -> tuple[list[Scored], dict[str, float]]:
        """Dynamic sampling: the step's groups with a reward spread, topped up by further rounds
        of fresh prompts (their generate/score seconds and reward counts added to the step's)."""
        cfg = self.cfg
        forced = bool(cfg.algo.forced_prefix)
        n = cfg.algo.n_per_mode if forced else 2 * cfg.algo.n_per_mode

        def generate(round_index: int, count: int) -> list[Scored]:
            prompts = [self.data.train[i] for i in self.rl_cursor.take(count)]
            more, round_times, round_counts = self._generate_and_score(
                prompts, forced=forced, n=n, seeds=self._seeds(f"rl-fill{round_index}", step, len(prompts)))
            for key, value in round_times.items():
                times[key] = times.get(key, 0.0) + value
            for key, value in round_counts.items():
                counts[key] = counts.get(key, 0) + value
            return more

        kept, found = fill_batch(scored, target_groups=cfg.algo.prompts_per_step,
                                 max_rounds=cfg.algo.filter_max_rounds, generate=generate)
        return kept, found.metrics()

    def _log_training_samples(self, step: int, scored: list[Scored]) -> None:
        every = self.cfg.run.log_samples_every
        if self.tracker is None or not every or step % every or not scored:
            return
        # Its own generator: which samples are shown changes nothing else the run draws.
        shown = random.Random(f"{self.cfg.run.seed}/samples/{step}").sample(
            scored, min(self.cfg.run.samples_per_log, len(scored)))
        self.tracker.log_samples(self._global_step("rl", step), "rollout/samples",
                                 [{"rl_step": step, **sample_row(s)} for s in shown])

    def _global_step(self, stage: str, step: int) -> int:
        """The one monotonic step W&B logs at: SFT steps, then RL steps after the last SFT step."""
        return step if stage == "sft" else self.sft_steps + step

    # ---- checkpoints --------------------------------------------------------------------
    def _client_state(self, stage: str, step: int) -> dict[str, Any]:
        return {"stage": stage, "step": step, "sft_cursor": self.sft_cursor.state(),
                "rl_cursor": self._rl_cursor_state or self.rl_cursor.state(), "driver_rng": _rng_state(self.rng),
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
        self.learner.save_checkpoint(staging, state, reference_dir=root / REFERENCE_DIR)
        if stage == "rl" and self.cfg.run.hf_export:
            self.learner.save_hf(staging / "hf")
        write_json_atomic(staging / "driver_state.json", state)
        (staging / COMPLETE_MARKER).write_text("")
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)  # the step folder appears only complete
        if stage == "rl":
            self._drop_old_checkpoints()
        return final

    def _drop_old_checkpoints(self) -> None:
        """Keep the newest ``run.keep_last`` complete RL checkpoints (the SFT one and the
        shared reference stay: a resume into RL needs neither, but they are the stage's result)."""
        keep = self.cfg.run.keep_last
        root = self.run_dir / CHECKPOINTS
        if not keep:
            return
        steps = sorted((int(p.name.split("_")[-1]), p) for p in root.glob("step_*")
                       if (p / COMPLETE_MARKER).exists())
        for _, path in steps[:-keep]:
            # The marker goes first: a folder half deleted is never taken for a checkpoint.
            (path / COMPLETE_MARKER).unlink()
            shutil.rmtree(path, ignore_errors=True)

    def latest_checkpoint(self) -> Path | None:
        root = self.run_dir / CHECKPOINTS
        complete = ([p for p in root.glob("*step_*") if not p.name.startswith(".") and (p / COMPLETE_MARKER).exists()]
                    if root.exists() else [])
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
        print(f"resumed from {checkpoint}", flush=True)
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
        self.started = True
        self.tracker = RunTracker(self.run_dir, config=to_container(cfg),
                                  secret_env=[cfg.reward.judge.api_key_env],
                                  wandb=WandbSettings(**OmegaConf.to_container(cfg.wandb)), resume=self.resume)
        print(self.tracker.describe(), flush=True)
        summary: dict[str, Any] = {"run": self.run_dir.name, "eval": {}, "eval_history": [],
                                   "data_skipped": dict(self.data.skipped)}
        stage, done_step = self._restore() if self.restore_checkpoint else ("start", 0)
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
            with StageProgress(method_label(to_container(cfg)), self.rl_steps, rl_start) as progress:
                for step in range(rl_start + 1, self.rl_steps + 1):
                    metrics = {**self._rl_step(step), **self.faults.step_done()}
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
            summary["faults"] = self.faults.totals()
            self.tracker.write_summary(summary)
            write_plots(self.run_dir)
            return summary
        except (RunStopped, LearnerRankDied, WeightSyncError) as error:
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
        """A skipped update (non-finite loss or gradients) leaves the weights as they were;
        ``learner.max_consecutive_nonfinite`` of them in a row stop the run, and ``_stopped``
        checkpoints this step: the last good weights."""
        skipped = int(learner_metrics.get("skipped_updates", 0))
        in_a_row = int(learner_metrics.get("consecutive_skipped_updates", 0))
        if skipped:
            log.warning("%s step %d: %d update(s) skipped for a non-finite loss or gradients (%d in a row)",
                        stage, step, skipped, in_a_row)
        limit = self.cfg.learner.max_consecutive_nonfinite
        if in_a_row >= limit:
            raise RunStopped(f"{stage} step {step}: {in_a_row} updates in a row had a non-finite loss or "
                             f"gradients and were skipped (learner.max_consecutive_nonfinite={limit}); "
                             f"the weights are the last good ones (weight version {self.learner.weight_version})")

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
        for thing in ("learner", "rewards"):
            handle = getattr(self, thing, None)
            if handle is not None:
                handle.shutdown()
        for engine in getattr(self, "engines", []):
            ray.kill(engine)
        placement = getattr(self, "placement", None)
        if placement is not None:
            placement.remove()


def prepare_run_dir(cfg: DictConfig) -> Path:
    name = cfg.run.name or time.strftime("%Y%m%d-%H%M%S")
    run_dir = Path(cfg.run.out_dir) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / "config.yaml")
    return run_dir
