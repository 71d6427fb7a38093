"""The run folder (docs/ARCHITECTURE.md, "The run folder") and what is logged to it and to W&B.

Secrets never reach the run folder: configs carry only the NAME of the environment
variable that holds a key, and every value written here is also scrubbed of the values
of the secret environment variables the config names.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Iterable

REDACTED = "***"


def secret_values(env_names: Iterable[str]) -> list[str]:
    return [os.environ[name] for name in env_names if os.environ.get(name)]


def scrub(value: Any, secrets: list[str]) -> Any:
    """``value`` with every occurrence of a secret replaced, recursively."""
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, REDACTED)
        return value
    if isinstance(value, dict):
        return {k: scrub(v, secrets) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [scrub(v, secrets) for v in value]
    return value


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value


def write_json_atomic(path: Path, payload: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_jsonable(payload), indent=2, sort_keys=True))
    os.replace(tmp, path)


class RunTracker:
    """Appends one JSON object per step to metrics.jsonl and mirrors it to W&B."""

    def __init__(self, run_dir: Path, *, config: dict[str, Any], secret_env: Iterable[str],
                 wandb_mode: str = "offline", wandb_project: str = "personadual",
                 resume: bool = False) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.secrets = secret_values(secret_env)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self._wandb = None
        if wandb_mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self._wandb = wandb.init(
                project=wandb_project, name=self.run_dir.name, dir=str(self.run_dir), mode=wandb_mode,
                config=scrub(config, self.secrets), resume="allow" if resume else None,
                id=self.run_dir.name,
            )

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        record = scrub(_jsonable({"step": step, "time": time.time(), **metrics}), self.secrets)
        with self.metrics_path.open("a") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        if self._wandb is not None:
            flat = {k: v for k, v in _flatten(record).items() if isinstance(v, (int, float))}
            self._wandb.log(flat, step=step)

    def log_samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        """A table of sample rollouts (W&B table, and samples.jsonl in the run folder)."""
        rows = scrub(_jsonable(rows), self.secrets)
        with (self.run_dir / "samples.jsonl").open("a") as handle:
            for row in rows:
                handle.write(json.dumps({"step": step, **row}, sort_keys=True) + "\n")
        if self._wandb is not None and rows:
            import wandb

            columns = sorted(rows[0])
            table = wandb.Table(columns=columns, data=[[str(row.get(c, "")) for c in columns] for row in rows])
            self._wandb.log({"eval/samples": table}, step=step)

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json_atomic(self.run_dir / "summary.json", scrub(summary, self.secrets))
        if self._wandb is not None:
            for key, value in _flatten(_jsonable(summary)).items():
                if isinstance(value, (int, float)):
                    self._wandb.summary[key] = value

    def finish(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "/"))
        else:
            flat[name] = value
    return flat


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
