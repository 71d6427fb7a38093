"""What a run prints: the libraries' chatter at warning level and above only, and one
progress display per stage (a bar on a terminal, one plain line per step otherwise, so
`ray job logs` and CI logs read well)."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, TextIO

QUIET_LOGGERS = ("vllm", "deepspeed", "DeepSpeed", "ray", "transformers", "torch.distributed", "filelock",
                 "urllib3", "httpx", "matplotlib", "wandb")


class _DropMessages(logging.Filter):
    def __init__(self, *fragments: str) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


def quiet_libraries() -> None:
    """Warnings and errors only from the libraries, in this process (Ray workers get the
    same through actors.local_env's VLLM_LOGGING_LEVEL and this call in the rollout actor).

    vLLM warns ``RotaryEmbedding: Failed to load weights`` after every in-place weight
    update: its layer-wise reload counts the rotary layer's ``cos_sin_cache`` buffer as a
    weight to load, but that buffer is computed from the config and no checkpoint (nor our
    sync) ever carries it, so vLLM keeps the one it has; the message is a false alarm."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(logging.WARNING)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    layerwise = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    if not any(isinstance(f, _DropMessages) for f in layerwise.filters):
        layerwise.addFilter(_DropMessages("RotaryEmbedding: Failed to load weights"))


class StageProgress:
    """A stage's progress: a tqdm bar on a TTY, else one line per ``every`` steps (and the
    last) with its metrics."""

    def __init__(self, name: str, total: int, initial: int = 0, stream: TextIO | None = None,
                 every: int = 1) -> None:
        self.name, self.total, self.done, self.every = name, total, initial, max(every, 1)
        self.stream = stream or sys.stdout  # with the eval lines, in order, for `ray job logs`
        self.start = time.monotonic()
        self._bar: Any = None
        if total > 0 and self.stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=name, file=self.stream, dynamic_ncols=True)

    def update(self, **shown: Any) -> None:
        self.done += 1
        text = {k: f"{v:.3f}" if isinstance(v, float) else str(v) for k, v in shown.items()}
        if self._bar is not None:
            self._bar.set_postfix(text, refresh=False)
            self._bar.update(1)
            return
        if self.done % self.every and self.done != self.total:
            return
        fields = " ".join(f"{k}={v}" for k, v in text.items())
        print(f"{self.name} step {self.done}/{self.total} {fields}", file=self.stream, flush=True)

    def write(self, line: str) -> None:
        """A line (an eval result) that does not break the bar."""
        if self._bar is not None:
            self._bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> "StageProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
