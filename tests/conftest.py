"""Session-wide fixtures: the tiny model folder and the process settings of the real stack.

vLLM, DeepSpeed and Ray are imported at the top of the test modules that use them, so a
broken install fails the suite instead of skipping it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from actors.local_env import apply_process_env

apply_process_env()  # before anything imports ray: it reads the loopback setting at import


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
