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
from dataclasses import dataclass, field
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


@dataclass
class WandbSettings:
    mode: str = "offline"  # offline | online | disabled
    project: str = "personadual"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    name: str | None = None  # default: the run folder's name


class RunTracker:
    """Appends one JSON object per record to metrics.jsonl and mirrors it to W&B.

    W&B keeps one monotonic history: every record is logged at its ``global_step`` (SFT
    steps, then RL steps counted on from the last SFT step; an eval at the step it follows),
    so nothing a later stage logs is dropped as "partial history" the way a stage step that
    restarts at 1 is. Records keep their stage's own ``step`` (and RL rows an ``rl_step``
    key for plotting against RL steps)."""

    def __init__(self, run_dir: Path, *, config: dict[str, Any], secret_env: Iterable[str],
                 wandb: WandbSettings | None = None, resume: bool = False) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.secrets = secret_values(secret_env)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.settings = wandb or WandbSettings()
        self._wandb = None
        self._last_step = -1
        if self.settings.mode != "disabled":
            import wandb as wandb_lib

            os.environ.setdefault("WANDB_SILENT", "true")
            self._wandb = wandb_lib.init(
                project=self.settings.project, entity=self.settings.entity, group=self.settings.group,
                tags=list(self.settings.tags) or None, name=self.settings.name or self.run_dir.name,
                dir=str(self.run_dir), mode=self.settings.mode, config=scrub(config, self.secrets),
                resume="allow" if resume else None, id=self.run_dir.name,
            )

    def describe(self) -> str:
        """Where the W&B run is, for the console."""
        if self._wandb is None:
            return "W&B: disabled (wandb.mode=disabled)"
        if self.settings.mode == "online":
            return f"W&B: {self._wandb.url}"
        return f"W&B (offline): {Path(self._wandb.dir).parent}"

    def sync_hint(self) -> str | None:
        """The command that uploads an offline run (None for online or disabled)."""
        if self._wandb is None or self.settings.mode != "offline":
            return None
        return f"wandb sync {Path(self._wandb.dir).parent}"

    def log(self, global_step: int, record: dict[str, Any]) -> None:
        record = scrub(_jsonable({"global_step": global_step, "timestamp": time.time(), **record}), self.secrets)
        with self.metrics_path.open("a") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        if self._wandb is not None:
            skip = {"global_step", "timestamp", "step"}
            flat = {k: v for k, v in _flatten(record).items()
                    if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool)}
            self._wandb_log(global_step, flat)

    def _wandb_log(self, global_step: int, values: dict[str, Any]) -> None:
        # W&B drops a row whose step is below one already logged; after a resume the steps
        # before the checkpoint are already there.
        if global_step < self._last_step:
            return
        self._last_step = global_step
        self._wandb.log(values, step=global_step)

    def log_samples(self, global_step: int, table: str, rows: list[dict[str, Any]]) -> None:
        """Sample rollouts: rows in samples.jsonl (with ``table``) and a W&B table ``table``
        (e.g. ``rollout/samples``, ``eval/samples``)."""
        rows = scrub(_jsonable(rows), self.secrets)
        with (self.run_dir / "samples.jsonl").open("a") as handle:
            for row in rows:
                handle.write(json.dumps({"global_step": global_step, "table": table, **row}, sort_keys=True) + "\n")
        if self._wandb is not None and rows:
            import wandb as wandb_lib

            columns = list(rows[0])
            # Numbers stay numbers and a missing value (a dropped sample's reward) stays None:
            # W&B types each column from its rows and refuses a "None" string in a number column.
            data = [[row.get(c) if row.get(c) is None or isinstance(row.get(c), (int, float)) else str(row[c])
                     for c in columns] for row in rows]
            self._wandb_log(global_step, {table: wandb_lib.Table(columns=columns, data=data)})

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json_atomic(self.run_dir / "summary.json", scrub(summary, self.secrets))
        if self._wandb is not None:
            for key, value in _flatten(_jsonable(summary)).items():
                if isinstance(value, (int, float)):
                    self._wandb.summary[key] = value

    def finish(self) -> None:
        """End the W&B run with its offline file complete on disk: ``finish`` alone returns
        while wandb's service process may still be writing it (read back at once, the file held
        only its header); ``teardown`` waits for that process to flush and exit."""
        if self._wandb is not None:
            import wandb as wandb_lib

            self._wandb.finish()
            self._wandb = None
            wandb_lib.teardown()


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


def last_eval(records: list[dict[str, Any]], tag: str) -> dict[str, Any] | None:
    """The result of the last eval ``records`` (``read_metrics``'s) logged with ``tag``
    ("sft", "final"), or None."""
    found = [r["eval"] for r in records if r.get("stage") == "eval" and r.get("tag") == tag and "eval" in r]
    return found[-1] if found else None
