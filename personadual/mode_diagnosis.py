"""Where a run's mode choice stands and how it moved: tables from the per-item eval files and
the learner's mode-token metrics.

    python -m personadual.mode_diagnosis runs/NAME [--by kind|pool]

- per eval (after SFT, every ``run.eval_every``, final) and persona setting x kind (or pool):
  items, mean logit gap (personalized minus general mode token at the first response
  position; greedy decoding picks personalized mode where it is > 0), the share choosing
  personalized mode, accuracy;
- per RL step: the fixed probe's P(personalized) per setting, the mode token's share of the
  logit gradient and of the tokens, its KL beside the other tokens'.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from personadual.evaluation import EVAL_SETTINGS, EVALS_DIR, read_eval_items
from personadual.tracking import read_metrics

EVAL_FILE = re.compile(r"(?P<tag>.+)_step_(?P<step>\d+)\.jsonl$")


def eval_files(run_dir: Path) -> list[tuple[int, str, Path]]:
    """(step, tag, path) of every per-item eval file, in step order (SFT's before step 0's)."""
    found = []
    for path in (run_dir / EVALS_DIR).glob("*.jsonl"):
        match = EVAL_FILE.match(path.name)
        if match:
            found.append((int(match["step"]), match["tag"], path))
    return sorted(found, key=lambda f: (f[0], f[1] != "sft"))


def gap_table(rows: list[dict[str, Any]], by: str) -> list[tuple[str, str, int, float, float, float]]:
    """(setting, group, items, mean logit gap, personalized share, accuracy) over the model's
    own choices, per setting and ``by`` (kind or pool), then per setting over all groups."""
    cells: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if row.get("forced") is None and row.get("logit_gap") is not None:
            cells[(row["setting"], str(row.get(by)))].append(row)
            cells[(row["setting"], "all")].append(row)
    table = []
    for setting in EVAL_SETTINGS:
        groups = sorted({g for s, g in cells if s == setting}, key=lambda g: (g == "all", g))
        for group in groups:
            items = cells[(setting, group)]
            table.append((setting, group, len(items), sum(r["logit_gap"] for r in items) / len(items),
                          sum(r["mode"] == "personalized" for r in items) / len(items),
                          sum(bool(r["correct"]) for r in items) / len(items)))
    return table


def format_diagnosis(run_dir: Path, by: str = "kind") -> str:
    lines = [f"Run {run_dir}"]
    for step, tag, path in eval_files(run_dir):
        lines += ["", f"eval {tag} (RL step {step}): logit gap = log p(personalized token) - log p(general token)",
                  f"| setting | {by} | items | mean logit gap | chose personalized | accuracy |",
                  "|---|---|---|---|---|---|"]
        for setting, group, count, gap, share, accuracy in gap_table(read_eval_items(path), by):
            lines.append(f"| {setting} | {group} | {count} | {gap:+.2f} | {share:.3f} | {accuracy:.3f} |")
    rl = [r for r in read_metrics(run_dir) if r.get("stage") == "rl"]
    if rl:
        header = ["step", *[f"P(pers) {s}" for s in EVAL_SETTINGS], "mode grad share", "mode token share",
                  "KL mode token", "KL other tokens", "KL pull / |A| (mode)"]
        lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for record in rl:
            learner = record.get("learner") or {}
            cells = [str(record["step"])]
            cells += [_fmt(record.get(f"mode/probe/{s}/p_personalized")) for s in EVAL_SETTINGS]
            cells += [_fmt(learner.get(f"mode_token/{k}")) for k in
                      ("grad_share", "token_share", "kl", "kl_other_tokens", "kl_pull_over_advantage")]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "-"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m personadual.mode_diagnosis", description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--by", choices=("kind", "pool"), default="kind")
    args = parser.parse_args(argv)
    if not (args.run / EVALS_DIR).is_dir():
        print(f"error: {args.run / EVALS_DIR}: missing (a run from before per-item evals?)", file=sys.stderr)
        return 2
    print(format_diagnosis(args.run, args.by))
    return 0


if __name__ == "__main__":
    sys.exit(main())
