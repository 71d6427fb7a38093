"""Connecting to Ray: join RAY_ADDRESS when set, else a local cluster bound to loopback."""

from __future__ import annotations

import logging
import os
from typing import Any

from actors.local_env import apply_process_env, process_env

apply_process_env()

import ray  # noqa: E402  (after the environment it reads at import)

LOOPBACK = "127.0.0.1"


class ExposureError(RuntimeError):
    """A local cluster came up listening beyond loopback."""


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
        context = ray.init(address=address, runtime_env=runtime_env, log_to_driver=True,
                           logging_level=logging.WARNING)
    else:
        context = ray.init(
            # "local": a cluster of our own. Left out, Ray joins the last `ray start`ed cluster
            # or ray.cluster_utils.Cluster on this machine (its /tmp/ray/ray_current_cluster).
            address="local",
            num_cpus=num_cpus,
            include_dashboard=False,
            _node_ip_address=LOOPBACK,
            runtime_env=runtime_env,
            log_to_driver=True,
            logging_level=logging.WARNING,  # Ray's own start-up lines; warnings still show
        )
        exposed = sorted({node["NodeManagerAddress"] for node in ray.nodes()} - {LOOPBACK})
        if exposed:
            ray.shutdown()
            raise ExposureError(f"local Ray listens on {exposed}, not only {LOOPBACK}: `ray` was imported "
                                f"before actors.local_env.apply_process_env() ran")
    return {"address": context.address_info.get("gcs_address", "")}


def shutdown() -> None:
    if ray.is_initialized():
        ray.shutdown()
