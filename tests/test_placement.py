"""Placement groups from the config (actors/placement.py) on a real local Ray: what each role
asks for, the early check naming the keys, the timeout's one-line error, removal."""

from __future__ import annotations

import time

import pytest
import ray
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

from actors.config import ConfigError, load_config
from actors.placement import Placement, PlacementError, check_fits, cluster_shape, plan_groups
from tests.helpers import SMOKE, run_launch


pytestmark = [pytest.mark.timeout(300)]


def test_plan_has_a_group_per_role_and_engine_with_the_configured_bundles():
    cfg = load_config(SMOKE, ["learner.num_ranks=2", "learner.num_gpus_per_rank=1",
                              "learner.resources={node_a: 1}", "rollout.num_engines=2",
                              "rollout.tensor_parallel_size=2", "rollout.num_gpus_per_engine=1",
                              "rollout.resources={node_b: 0.5}", "reward.num_workers=3",
                              "cluster.placement_strategy=SPREAD"])
    specs = {spec.name: spec for spec in plan_groups(cfg)}
    assert list(specs) == ["learner", "rollout_0", "rollout_1", "reward"]
    assert specs["learner"].bundles == [{"CPU": 1.0, "GPU": 1.0, "node_a": 1.0}] * 2
    assert specs["rollout_0"].bundles == specs["rollout_1"].bundles == [{"CPU": 0.5, "GPU": 1.0, "node_b": 0.5}] * 2
    assert specs["reward"].bundles == [{"CPU": 0.25}] * 3
    assert {spec.strategy for spec in specs.values()} == {"SPREAD"}


def test_early_check_names_the_keys_of_what_the_cluster_lacks():
    cfg = load_config(SMOKE, ["learner.resources={gpu_node: 1}"])
    one_node = {"CPU": 2.0, "memory": 1e9}
    with pytest.raises(ConfigError, match=r"needs 1 gpu_node \(.*learner\.num_cpus/gpus_per_rank, learner\.resources\).*has 0"):
        check_fits(plan_groups(cfg), one_node, [one_node])
    # Enough CPUs in total, but no node holds a whole learner bundle.
    cfg = load_config(SMOKE, ["learner.num_cpus_per_rank=3"])
    nodes = [{"CPU": 2.0}, {"CPU": 2.0}]
    with pytest.raises(ConfigError, match=r"no node can hold one bundle of the placement group 'learner' "
                                          r"\(1 x \{CPU: 3\}, PACK"):
        check_fits(plan_groups(cfg), {"CPU": 4.0}, nodes)
    check_fits(plan_groups(load_config(SMOKE)), {"CPU": 2.0}, [{"CPU": 2.0}])  # the smoke run fits 2 CPUs


@pytest.mark.slow
def test_groups_are_placed_with_the_strategy_and_removed(ray_cluster):
    cfg = load_config(SMOKE, ["cluster.placement_strategy=SPREAD"])
    specs = plan_groups(cfg)
    check_fits(specs, *cluster_shape())
    placement = Placement.create(specs, timeout_s=60)
    tables = [placement_group_table(group) for group in placement.groups]
    assert [t["strategy"] for t in tables] == ["SPREAD"] * 3
    assert [t["state"] for t in tables] == ["CREATED"] * 3
    assert [list(t["bundles"].values()) for t in tables] == [[{"CPU": 1.0}], [{"CPU": 0.5}], [{"CPU": 0.25}]]

    @ray.remote(num_cpus=0.5)
    def where() -> str:
        return ray.get_runtime_context().get_placement_group_id()

    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    engine_group = placement.engines()[0]
    assert ray.get(where.options(scheduling_strategy=PlacementGroupSchedulingStrategy(engine_group)).remote()) \
        == engine_group.id.hex()
    groups = list(placement.groups)
    placement.remove()
    assert [placement_group_table(group)["state"] for group in groups] == ["REMOVED"] * 3


@pytest.mark.slow
def test_a_group_that_cannot_be_placed_fails_in_one_line_naming_it(ray_cluster):
    """The totals fit the cluster, but another job holds the CPUs: no hang, a PlacementError
    naming the group and its bundles once the timeout passes, and nothing left reserved."""
    blocker = placement_group([{"CPU": 1.5}])
    ray.get(blocker.ready(), timeout=60)
    try:
        cfg = load_config(SMOKE, ["cluster.placement_timeout_s=3"])
        before = {g["placement_group_id"] for g in placement_group_table().values()}
        start = time.monotonic()
        with pytest.raises(PlacementError) as caught:
            Placement.create(plan_groups(cfg), timeout_s=cfg.cluster.placement_timeout_s)
        assert time.monotonic() - start < 60
        message = str(caught.value)
        assert "\n" not in message
        assert "placement group 'learner' (1 x {CPU: 1}, PACK" in message
        assert "not placed within 3 s (cluster.placement_timeout_s)" in message
        assert isinstance(caught.value, ConfigError)  # launch.py: exit 2
        created = [g for g in placement_group_table().values() if g["placement_group_id"] not in before]
        assert created and all(g["state"] == "REMOVED" for g in created)
    finally:
        remove_placement_group(blocker)


@pytest.mark.slow
def test_launch_exits_2_naming_the_key_when_no_node_has_the_resource(tmp_path):
    result = run_launch("--config", str(SMOKE), f"run.out_dir={tmp_path}", "cluster.num_cpus=2",
                        "rollout.resources={node_gpu_box: 1}", timeout=240, own_cluster=True)
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cluster: the run needs 1 node_gpu_box") and "rollout.resources" in last
