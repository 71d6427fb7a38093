"""Table 1 over seeds: SFT once per seed, each method's RL branched from that seed's SFT
checkpoint, then the report (mean and spread per column, paired bootstrap intervals).

    python -m personadual.sweep --seeds 0 1 2 --methods dual grpo no_prefix dual_released \\
        [--out runs/sweep] [--config configs/default.yaml] [key=value ...]

Layout: ``OUT/seed_S/sft`` (``algo.steps=0``: its final eval is the SFT row) and
``OUT/seed_S/<method>`` (``launch.py --init-from OUT/seed_S/sft/checkpoints/sft_step_N``), each
run's console output beside it in ``<name>.log``; ``OUT/sweep.json`` records every run's
command and wall time; ``OUT/table1.md`` and ``OUT/plots/`` the report. Run it again after an
interruption: a finished run (its ``summary.json`` written) is not rerun, an unfinished one is
resumed (``launch.py --resume``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

# What each method changes in the config; every method sets both keys, so a user's override of
# them cannot turn one method into another.
METHOD_OVERRIDES: dict[str, tuple[str, ...]] = {
    "dual": ("algo.advantage=dual", "algo.forced_prefix=true"),
    "grpo": ("algo.advantage=grpo", "algo.forced_prefix=true"),
    "no_prefix": ("algo.advantage=dual", "algo.forced_prefix=false"),
    "dual_released": ("algo.advantage=dual_released", "algo.forced_prefix=true"),
}
SFT = "sft"
SWEEP_OWNS = ("run.seed", "run.out_dir", "run.name", "algo.advantage", "algo.forced_prefix")
LAUNCH = Path(__file__).resolve().parent.parent / "launch.py"
EXIT_BAD_INPUT = 2


class SweepError(RuntimeError):
    """A run of the sweep failed; the message names it and its log."""


@dataclass
class PlannedRun:
    seed: int
    name: str  # "sft" or a method
    run_dir: Path
    overrides: list[str]

    @property
    def finished(self) -> bool:
        return (self.run_dir / "summary.json").is_file()


@dataclass
class Sweep:
    out: Path
    seeds: list[int]
    methods: list[str]
    config: Path | None = None
    overrides: list[str] = field(default_factory=list)

    def seed_dir(self, seed: int) -> Path:
        return self.out / f"seed_{seed}"

    def plan(self) -> list[PlannedRun]:
        """Per seed: the SFT run, then each method's branch, in the order given."""
        runs = []
        for seed in self.seeds:
            common = [*self.overrides, f"run.seed={seed}", f"run.out_dir={self.seed_dir(seed)}"]
            runs.append(PlannedRun(seed, SFT, self.seed_dir(seed) / SFT,
                                   [*common, f"run.name={SFT}", "algo.steps=0", "eval.at_start=false"]))
            for method in self.methods:
                # eval.at_start=false: the SFT checkpoint's eval is the SFT run's own.
                runs.append(PlannedRun(seed, method, self.seed_dir(seed) / method,
                                       [*common, f"run.name={method}", "eval.at_start=false",
                                        *METHOD_OVERRIDES[method]]))
        return runs

    def command(self, run: PlannedRun) -> list[str]:
        base = [sys.executable, str(LAUNCH)]
        if run.run_dir.exists():
            return [*base, "--resume", str(run.run_dir)]
        config = ["--config", str(self.config)] if self.config is not None else []
        if run.name == SFT:
            return [*base, *config, *run.overrides]
        return [*base, *config, "--init-from", str(sft_checkpoint(self.seed_dir(run.seed) / SFT)), *run.overrides]


def sft_checkpoint(sft_run: Path) -> Path:
    found = sorted((sft_run / "checkpoints").glob("sft_step_*"), key=lambda p: int(p.name.rsplit("_", 1)[-1]))
    if not found:
        raise SweepError(f"{sft_run}: finished without an SFT checkpoint (is sft.steps 0?)")
    return found[-1]


def _has_checkpoint(run_dir: Path) -> bool:
    return any((path / "COMPLETE").is_file() for path in (run_dir / "checkpoints").glob("*step_*"))


def run_sweep(sweep: Sweep) -> list[dict]:
    """Every planned run not yet finished, one after the other; returns the sweep's record
    (also written to ``OUT/sweep.json`` after each run)."""
    sweep.out.mkdir(parents=True, exist_ok=True)
    record_path = sweep.out / "sweep.json"
    record: list[dict] = json.loads(record_path.read_text()) if record_path.is_file() else []
    for run in sweep.plan():
        label = f"seed {run.seed} {run.name}"
        if run.finished:
            print(f"{label}: finished before, kept ({run.run_dir})", flush=True)
            continue
        if run.name != SFT and run.run_dir.exists() and not _has_checkpoint(run.run_dir):
            # A branch that stopped before its copy of the SFT checkpoint was complete.
            shutil.rmtree(run.run_dir)
        command = sweep.command(run)
        log_path = run.run_dir.parent / f"{run.name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        print(f"{label}: running (log: {log_path})", flush=True)
        start = time.perf_counter()
        with log_path.open("a") as log:
            log.write(f"$ {' '.join(command)}\n")
            log.flush()
            code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
        seconds = time.perf_counter() - start
        record.append({"seed": run.seed, "run": run.name, "run_dir": str(run.run_dir), "command": command,
                       "exit_code": code, "wall_s": round(seconds, 1)})
        record_path.write_text(json.dumps(record, indent=2) + "\n")
        if code != 0 or not run.finished:
            tail = log_path.read_text().strip().splitlines()[-1:] or [""]
            raise SweepError(f"{label}: launch.py exited {code} ({tail[0]}); see {log_path}; "
                             f"run the sweep again to resume it")
        print(f"{label}: done in {seconds / 60:.1f} min", flush=True)
    return record


def _parse(argv: Sequence[str] | None) -> Sweep:
    parser = argparse.ArgumentParser(prog="python -m personadual.sweep", description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHOD_OVERRIDES), metavar="METHOD",
                        help=f"any of {', '.join(METHOD_OVERRIDES)}")
    parser.add_argument("--out", type=Path, default=Path("runs/sweep"))
    parser.add_argument("--config", type=Path, default=None, help="launch.py's --config (default: its own)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="passed to every launch.py run")
    args = parser.parse_args(argv)
    unknown = [m for m in args.methods if m not in METHOD_OVERRIDES]
    if unknown:
        parser.exit(EXIT_BAD_INPUT, f"error: --methods: {unknown[0]!r} is not one of {', '.join(METHOD_OVERRIDES)}\n")
    if len(set(args.seeds)) != len(args.seeds) or len(set(args.methods)) != len(args.methods):
        parser.exit(EXIT_BAD_INPUT, "error: --seeds and --methods take each value once\n")
    for override in args.overrides:
        key = override.split("=", 1)[0]
        if "=" not in override:
            parser.exit(EXIT_BAD_INPUT, f"error: {override!r}: overrides are key=value\n")
        if key in SWEEP_OWNS:
            parser.exit(EXIT_BAD_INPUT, f"error: {key}: set by the sweep (--seeds, --out, --methods)\n")
    if args.config is not None and not args.config.is_file():
        parser.exit(EXIT_BAD_INPUT, f"error: --config {args.config}: no such file\n")
    return Sweep(args.out.resolve(), args.seeds, args.methods, args.config, list(args.overrides))


def main(argv: Sequence[str] | None = None) -> int:
    from personadual.sweep_report import report_sweep

    sweep = _parse(argv)
    start = time.perf_counter()
    try:
        run_sweep(sweep)
    except SweepError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"sweep: every run finished ({(time.perf_counter() - start) / 60:.1f} min this call)", flush=True)
    return report_sweep(sweep.out, sweep.seeds, [SFT, *sweep.methods])


if __name__ == "__main__":
    sys.exit(main())
