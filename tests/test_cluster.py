"""A local run's Ray listens on loopback only, with token authentication on."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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


def test_local_ray_keeps_token_auth_on_and_refuses_a_wrong_token():
    """Ray 2.60 turns token auth on for a local cluster unless RAY_AUTH_MODE says otherwise;
    nothing of ours may say otherwise. A client holding the cluster's token joins; one with
    another token is refused."""
    from ray._private.authentication.authentication_utils import is_token_auth_enabled

    cluster.connect(num_cpus=1)
    try:
        assert is_token_auth_enabled() and os.environ["RAY_AUTH_MODE"] == "token"
        gcs = ray.get_runtime_context().gcs_address
        join = f"import ray; ray.init(address='{gcs}'); print('joined', ray.cluster_resources()['CPU'])"
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
        own = subprocess.run([sys.executable, "-c", join], env=env, capture_output=True, text=True, timeout=120)
        assert own.returncode == 0 and "joined 1.0" in own.stdout, own.stderr[-2000:]
        # A refused client tries the GCS once a second, 20 times by default; two tries show
        # the refusal (RAY_gcs_server_port_wait_time_s sets that count in ray._private.node).
        wrong = subprocess.run([sys.executable, "-c", join],
                               env={**env, "RAY_AUTH_TOKEN": "0" * 32, "RAY_gcs_server_port_wait_time_s": "2"},
                               capture_output=True, text=True, timeout=120)
        assert wrong.returncode != 0 and "Failed to connect" in wrong.stderr, wrong.stdout
    finally:
        cluster.shutdown()


def test_nothing_of_ours_turns_ray_token_auth_off():
    root = Path(__file__).resolve().parent.parent
    sources = [p for folder in ("actors", "learner", "rollout", "rewards", "personadual", "configs", "scripts", ".ci")
               for p in (root / folder).rglob("*") if p.is_file() and p.suffix in (".py", ".yaml", ".sh", "")]
    sources += [root / "launch.py"]
    assert len(sources) > 20
    offenders = [str(p) for p in sources if "RAY_AUTH_MODE" in p.read_text(errors="replace")
                 and "disabled" in p.read_text(errors="replace").split("RAY_AUTH_MODE", 1)[1][:40]]
    assert offenders == []
