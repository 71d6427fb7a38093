"""A local run's Ray listens on loopback only."""

from __future__ import annotations

import psutil
import pytest
import ray

from actors import cluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def test_local_ray_binds_loopback_only():
    cluster.connect(num_cpus=1)
    try:
        assert {node["NodeManagerAddress"] for node in ray.nodes()} == {"127.0.0.1"}
        assert ray.get(ray.remote(lambda: ray.util.get_node_ip_address()).remote()) == "127.0.0.1"
        gcs = ray.get_runtime_context().gcs_address  # this cluster's processes name it
        ray_pids = {p.pid for p in psutil.process_iter(["cmdline"]) if gcs in " ".join(p.info["cmdline"] or [])}
        listening = [c.laddr.ip for c in psutil.net_connections(kind="inet")
                     if c.status == psutil.CONN_LISTEN and c.pid in ray_pids]
        assert listening and all(ip in ("127.0.0.1", "::ffff:127.0.0.1") for ip in listening), listening
    finally:
        cluster.shutdown()
