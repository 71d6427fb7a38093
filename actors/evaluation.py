"""Evaluation on the rollout engines: free-mode accuracy on the eval prompts, and after SFT
and at the end the forced single-mode baselines and the two-turn mode alignment; each eval's
outcomes per item (with the learner's mode-token probe) in ``evals/``."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from actors.generation import GenerationFanOut, sampling_seeds
from actors.mode_probe import ModeProbe
from personadual.data import RunData
from personadual.evaluation import forced_mode_summary, item_rows, mode_alignment, summarize, write_eval_items
from personadual.records import Scored
from personadual.prompts import format_question
from personadual.step_metrics import sample_row
from personadual.tracking import RunTracker
from personadual.two_turn import two_turn_cases


class Evaluator:
    """``cfg``'s ``eval`` section over ``data.eval``; eval samples shown are drawn from ``rng``
    (the driver's, saved in checkpoints). With ``run_dir``, each eval's items are written to
    ``run_dir/evals/``, with ``mode_probe``'s log-probs of every eval prompt beside them."""

    def __init__(self, cfg: DictConfig, data: RunData, generation: GenerationFanOut, rng: random.Random, *,
                 run_dir: Path | None = None, mode_probe: ModeProbe | None = None) -> None:
        self.cfg = cfg
        self.data = data
        self.generation = generation
        self.rng = rng
        self.run_dir = run_dir
        self.mode_probe = mode_probe

    def _seeds(self, stage: str, step: int, count: int, greedy: bool) -> list[int] | None:
        return sampling_seeds(self.cfg.run.seed, stage, step, count, greedy)

    def evaluate(self, step: int, tag: str, *, tracker: RunTracker | None = None,
                 log_step: int = 0) -> dict[str, Any]:
        """The eval of RL step ``step`` (``tag``: sft, step_N, final); its samples go to
        ``tracker``'s ``eval/samples`` table at ``log_step``."""
        start = time.perf_counter()
        greedy, count = self.cfg.eval.greedy, len(self.data.eval)
        scored, _, counts = self.generation.generate_and_score(
            self.data.eval, forced=False, n=1, greedy=greedy, seeds=self._seeds(f"{tag}/free", step, count, greedy))
        result = summarize(scored)
        result["reward_counts"] = counts
        forced: list[Scored] = []
        if tag in ("sft", "final") and self.cfg.eval.baselines:
            forced, _, _ = self.generation.generate_and_score(
                self.data.eval, forced=True, n=1, greedy=greedy,
                seeds=self._seeds(f"{tag}/forced", step, count, greedy))
            result["baselines"] = forced_mode_summary(forced)
            if self.data.world is not None and self.cfg.eval.two_turn_cases:
                result["two_turn_alignment"] = self._two_turn_alignment(step, tag)
        probe = self.mode_probe.logprobs(self.data.eval) if self.mode_probe is not None else None
        if probe is not None:
            result["probe"] = self.mode_probe.summary(probe)
        if self.run_dir is not None:
            write_eval_items(self.run_dir, tag, step, item_rows(scored + forced, kinds=self.data.world, probe=probe))
        result["timing_s"] = time.perf_counter() - start
        if tracker is not None:
            shown = self.rng.sample(scored, min(self.cfg.eval.samples_logged, len(scored)))
            tracker.log_samples(log_step, "eval/samples", [{"tag": tag, **sample_row(s)} for s in shown])
        return result

    def _two_turn_alignment(self, step: int, tag: str) -> dict[str, float]:
        """The paper's RQ6: a second turn whose best mode differs from the first turn's, under
        one persona; the rate at which the model picks the second turn's best mode."""
        world = self.data.world
        cases = two_turn_cases(world, count=self.cfg.eval.two_turn_cases, seed=self.cfg.run.seed)
        greedy = self.cfg.eval.greedy
        first, _, _ = self.generation.generate_and_score(
            [c.first for c in cases], forced=False, n=1, greedy=greedy,
            seeds=self._seeds(f"{tag}/two_turn_first", step, len(cases), greedy))
        by_id = {s.rollout.prompt.id: s.rollout for s in first}
        histories = [[{"role": "user", "content": format_question(c.first.question, c.first.choices)},
                      {"role": "assistant", "content": by_id[c.first.id].text}] for c in cases]
        second, _, _ = self.generation.generate_and_score(
            [c.second for c in cases], forced=False, n=1, greedy=greedy, histories=histories,
            seeds=self._seeds(f"{tag}/two_turn_second", step, len(cases), greedy))
        cases_by_id = {c.second.id: c for c in cases}
        return mode_alignment((cases_by_id[s.rollout.prompt.id].order, s, world.best_mode(s.rollout.prompt))
                              for s in second)
