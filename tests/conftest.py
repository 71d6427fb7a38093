"""Session-wide fixtures: the tiny model folder and the process settings of the real stack.

vLLM, DeepSpeed and Ray are imported at the top of the test modules that use them, so a
broken install fails the suite instead of skipping it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from actors.local_env import apply_process_env

apply_process_env()  # before anything imports ray: it reads the loopback setting at import


def pytest_collection_finish(session: pytest.Session) -> None:
    """One Ray head for the session's launch.py runs to join (tests/ray_head.py), when the
    collected tests include real-stack ones."""
    if any(item.get_closest_marker("slow") for item in session.items):
        from tests.ray_head import start_shared

        start_shared()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    from tests.ray_head import stop_shared

    stop_shared()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from personadual.tiny import build_tiny_model

    return build_tiny_model("tiny", cache_dir=tmp_path_factory.mktemp("tiny-cache"))


@pytest.fixture(scope="module")
def ray_cluster():
    """A loopback-only local Ray for one test module."""
    from actors import cluster

    cluster.connect(num_cpus=2)
    yield
    cluster.shutdown()


@pytest.fixture(scope="module")
def own_process_group():
    """Learners built in-process create a one-rank gloo group; end it with the module that made
    it so later modules start clean (use: ``pytestmark = pytest.mark.usefixtures(...)``).
    DeepSpeed's own destroy also drops the groups it cached: torch's alone leaves DeepSpeed
    holding dead groups, and the next module's learner fails in its first broadcast."""
    import deepspeed.comm as ds_comm
    import torch.distributed as dist

    created = not dist.is_initialized()
    yield
    if created and dist.is_initialized():
        if ds_comm.is_initialized():
            ds_comm.destroy_process_group()
        else:
            dist.destroy_process_group()
