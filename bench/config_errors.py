"""How long `launch.py` takes to reject each bad input (wall seconds, median of --repeats).

    python bench/config_errors.py [--repeats 3]

Every case must exit 2 with one line and leave no run folder; the table is what the README's
"Bad input" section quotes. Speed is measured here, never asserted in tests.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CASES = {
    "unknown key": ["algo.stepz=3"],
    "value out of range": ["algo.steps=-1"],
    "scalar for a list key": ["data.source=files", "data.train_files=prompts.jsonl"],
    "data file missing": ["data.source=files", "data.train_files=[{tmp}/missing.jsonl]"],
    "SFT data missing": ["data.source=files", "data.train_files=[{tmp}/train.jsonl]"],
    "model.path missing": ["model.path={tmp}/no-such-model"],
    "unreachable hub id": ["model.path=personadual-bench/no-such-model"],
    "too big for the cluster": ["cluster.num_cpus=1", "rollout.num_engines=3"],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "train.jsonl").write_text(json.dumps({
            "id": "p1", "question": "Q?", "persona": None, "persona_setting": "none", "task_type": "objective",
            "gold": ["a"], "scorer": "exact_match"}) + "\n")
        for name, overrides in CASES.items():
            seconds, out = [], Path(tmp) / "runs"
            for _ in range(args.repeats):
                start = time.perf_counter()
                result = subprocess.run([sys.executable, str(ROOT / "launch.py"), "--config",
                                         str(ROOT / "configs/smoke.yaml"), f"run.out_dir={out}",
                                         *[o.format(tmp=tmp) for o in overrides]],
                                        cwd=ROOT, capture_output=True, text=True, timeout=120)
                seconds.append(time.perf_counter() - start)
                lines = result.stderr.strip().splitlines()
                assert result.returncode == 2 and len(lines) == 1 and not out.exists(), (name, result.stderr)
            rows[name] = {"seconds": round(statistics.median(seconds), 2), "error": lines[0][:120]}
    for name, row in rows.items():
        print(f"{name:26s} {row['seconds']:5.2f} s  {row['error']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
