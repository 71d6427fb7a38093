"""One run of launch.py under a schedule, with each actor's CPU use sampled: wall time,
per-phase means of the RL steps, and how busy the learner and the engine kept the cores.

    flock /tmp/personadual-heavy.lock .venv/bin/python bench/schedules.py --name serial -- cluster.schedule=serial
    flock /tmp/personadual-heavy.lock .venv/bin/python bench/schedules.py --name before -- \\
        learner.threads=1 rollout.threads=1       # Ray's one thread per actor, as before threads per role

Prints one JSON object (and writes it under --out). CPU is sampled with psutil every
--interval seconds over the processes Ray names ``ray::LearnerActor*``, ``ray::RolloutActor*`` and
``ray::ReferenceWorker*`` (100 = one core busy; ``both_cpu_mean`` sums all three);
``cpu_rl_stage`` covers the samples from the eval after SFT to the final eval.
``reference_worker_s`` is the reference worker's compute per step (``cluster.reference=worker``),
beside the learner's step when pipelined; ``reference`` is the learner's own reference pass.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
ROLES = {"learner": "LearnerActor", "rollout": "RolloutActor", "reference": "ReferenceWorker"}
PHASES = ("generate", "score", "reference_wait", "reference", "train", "sync", "generate_next", "idle", "step")


class CpuSampler:
    """Per-role CPU percent of Ray's actor processes, sampled in a thread."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.samples: list[tuple[float, dict[str, float]]] = []
        self._stop = threading.Event()
        self._procs: dict[int, tuple[str, psutil.Process]] = {}
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _refresh(self) -> None:
        for proc in psutil.process_iter(["pid", "name", "cmdline"]):
            if proc.pid in self._procs:
                continue
            title = " ".join(proc.info.get("cmdline") or []) or proc.info.get("name") or ""
            for role, marker in ROLES.items():
                if f"ray::{marker}" in title:
                    proc.cpu_percent(None)  # the first call only starts the measurement
                    self._procs[proc.pid] = (role, proc)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._refresh()
            busy = {role: 0.0 for role in ROLES}
            for pid, (role, proc) in list(self._procs.items()):
                try:
                    busy[role] += proc.cpu_percent(None)
                except psutil.Error:
                    self._procs.pop(pid)
            self.samples.append((time.monotonic(), busy))

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self, start: float | None, end: float | None) -> dict[str, Any]:
        window = [busy for t, busy in self.samples if (start is None or t >= start) and (end is None or t <= end)]
        if not window:
            return {}
        totals = [sum(b.values()) for b in window]
        return {"samples": len(window),
                **{f"{role}_cpu_mean": round(statistics.fmean(b[role] for b in window), 1) for role in ROLES},
                "both_cpu_mean": round(statistics.fmean(totals), 1),
                "fraction_over_150": round(sum(t >= 150 for t in totals) / len(totals), 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True)
    # The README's schedule figures ran the plain world's 40 RL steps (the default config then).
    parser.add_argument("--config", default=str(ROOT / "configs" / "plain_world.yaml"))
    parser.add_argument("--out", default="/tmp/personadual-bench-schedules")
    parser.add_argument("--interval", type=float, default=0.5)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(ROOT / "launch.py"), "--config", args.config, f"run.out_dir={out}",
               f"run.name={args.name}", *args.overrides]
    sampler = CpuSampler(args.interval)
    sampler.start()
    begin = time.monotonic()
    marks: dict[str, float] = {}
    log = (out / f"{args.name}.log").open("w")
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True)
    assert process.stdout is not None
    for line in process.stdout:
        log.write(line)
        if line.startswith("schedule:"):
            marks.setdefault("built", time.monotonic())
        elif line.startswith("eval sft"):  # the eval after SFT: the RL stage starts
            marks.setdefault("rl_start", time.monotonic())
        elif line.startswith("eval final"):
            marks.setdefault("rl_end", time.monotonic())
    code = process.wait()
    wall = time.monotonic() - begin
    sampler.stop()
    run_dir = out / args.name
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rl = [r for r in records if r["stage"] == "rl"]
    sft = [r for r in records if r["stage"] == "sft"]
    steady = rl[1:] or rl  # step 1 carries the engines' first-generation warm-up
    phases = {phase: round(statistics.fmean(r["timing_s"].get(phase, 0.0) for r in steady), 3) for phase in PHASES}
    result = {
        "name": args.name, "overrides": args.overrides, "exit_code": code, "wall_s": round(wall, 1),
        "sft_s": round(sum(r["timing_s"]["step"] for r in sft), 1),
        "rl_s": round(sum(r["timing_s"]["step"] for r in rl), 1),
        "rl_steps": len(rl), "rl_step_mean_s (steps 2..)": phases.pop("step"), "rl_phase_mean_s (steps 2..)": phases,
        "rl_step_sd_s (steps 2..)": round(statistics.pstdev(r["timing_s"]["step"] for r in steady), 3),
        "reference_worker_s (steps 2..)": round(statistics.fmean(r.get("reference", {}).get("worker_s", 0.0)
                                                                 for r in steady), 3),
        "threads": {k: v for k, v in (rl or sft or [{}])[-1].get("perf", {}).items() if k.startswith("threads/")},
        "cpu_rl_stage": sampler.summary(marks.get("rl_start"), marks.get("rl_end")),
        "cpu_whole_run": sampler.summary(None, None),
    }
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return code


if __name__ == "__main__":
    sys.exit(main())
