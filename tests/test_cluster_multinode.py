"""Two simulated nodes on one machine (ray.cluster_utils.Cluster, every node on 127.0.0.1):
the learner pinned to one node and the rollout engine to the other through custom node
resources in the config; SFT and two DualGRPO steps with weight sync between the nodes; the
engine ends on the learner's weight version with the learner's weights."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import ray
import torch
import vllm  # noqa: F401  (a broken install fails here, not skips)
from ray.cluster_utils import Cluster

from actors import cluster as local_cluster
from actors.config import load_config
from actors.driver import Driver
from tests.helpers import free_port

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def two_nodes():
    """Head node {node_a} and a worker node {node_b}. Ray's session files (and the cluster
    address Cluster() records for `ray.init()`) go to a private temp dir, so no other Ray user
    on this machine joins this cluster by accident; a short path keeps socket names legal."""
    temp = Path(tempfile.mkdtemp(prefix="pdmn", dir="/tmp"))
    (temp / "ray").mkdir()
    saved_tmpdir = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = str(temp)
    common = {"node_ip_address": local_cluster.LOOPBACK, "temp_dir": str(temp / "ray"), "include_dashboard": False}
    nodes = None
    try:
        nodes = Cluster(initialize_head=True, head_node_args={
            **common, "num_cpus": 2, "resources": {"node_a": 1}, "dashboard_agent_listen_port": free_port()})
        nodes.add_node(**common, num_cpus=1, resources={"node_b": 1}, dashboard_agent_listen_port=free_port())
        nodes.wait_for_nodes()
        local_cluster.connect(address=nodes.address)
        yield nodes
    finally:
        local_cluster.shutdown()
        if nodes is not None:
            nodes.shutdown()
        if saved_tmpdir is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = saved_tmpdir
        shutil.rmtree(temp, ignore_errors=True)


def _node_with(resource: str) -> str:
    matches = [n["NodeID"] for n in ray.nodes() if n["Alive"] and resource in n["Resources"]]
    assert len(matches) == 1, ray.nodes()
    return matches[0]


def _engine_tensors(engine) -> dict[str, torch.Tensor]:
    """The vLLM worker's parameters that stay readable on CPU (embeddings and norms: its linear
    layers are repacked for oneDNN and read back empty)."""
    model = engine.llm.llm_engine.model_executor.driver_worker.worker.model_runner.get_model()
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.numel() > 0}


def _engine_prompt_logprobs(engine, token_ids: list[int]) -> list[float]:
    from vllm import SamplingParams

    out = engine.llm.generate([{"prompt_token_ids": token_ids}],
                              SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0), use_tqdm=False)
    return [step[token].logprob for step, token in zip(out[0].prompt_logprobs[1:], token_ids[1:])]


def _learner_tensors(learner) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in learner.full_weights("cpu")}


def _learner_prompt_logprobs(learner, token_ids: list[int]) -> list[float]:
    with torch.no_grad():
        logits = learner.engine.module(input_ids=torch.tensor([token_ids]), use_cache=False).logits[0, :-1]
        picked = torch.log_softmax(logits.float(), dim=-1).gather(1, torch.tensor(token_ids[1:])[:, None])
    return picked[:, 0].tolist()


def _initial_prompt_logprobs(model_path: str, token_ids: list[int]) -> list[float]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([token_ids])).logits[0, :-1]
        picked = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(token_ids[1:])[:, None])
    return picked[:, 0].tolist()


def test_learner_and_engine_on_different_nodes_train_and_sync(two_nodes, tmp_path):
    assert {n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]} == {local_cluster.LOOPBACK}
    cfg = load_config(ROOT / "configs" / "smoke.yaml", [
        f"run.out_dir={tmp_path}", "run.name=two_nodes", "sft.steps=2", "algo.steps=2", "eval.baselines=false",
        "learner.resources={node_a: 1}", "rollout.resources={node_b: 1}",
        "cluster.placement_strategy=SPREAD"])
    driver = Driver(cfg, tmp_path / "two_nodes")
    try:
        driver._build()
        groups = list(driver.placement.groups)
        node_a, node_b = _node_with("node_a"), _node_with("node_b")
        engine, = driver.engines
        learner_node = driver.learner.call(lambda learner: ray.get_runtime_context().get_node_id())[0]
        engine_node = ray.get(engine.ready.remote())["node"]
        assert learner_node == node_a and engine_node == node_b and node_a != node_b

        for step in (1, 2):
            driver._sft_step(step)
        driver.weight_sync.sync()
        before = ray.get(engine.get_weight_version.remote())
        metrics = [driver._rl_step(step) for step in (1, 2)]
        assert [m["staleness"]["max"] for m in metrics] == [0, 0]

        version = ray.get(engine.get_weight_version.remote())
        assert version == driver.learner.weight_version == before + 2 == metrics[-1]["sync"]["version"]
        assert all(m["sync"]["bytes"] > 0 for m in metrics)
        engine_tensors = ray.get(engine.call.remote(_engine_tensors))
        learner_tensors = driver.learner.call(_learner_tensors)[0]
        assert len(engine_tensors) >= 3 and set(engine_tensors) <= set(learner_tensors)
        for name, tensor in engine_tensors.items():
            assert torch.equal(tensor, learner_tensors[name]), name
        # The repacked linear layers, through what they compute: the engine scores a sequence as
        # the learner does, and unlike the model both started from (so the check can fail).
        token_ids = driver.tokenizer.encode(driver.data.eval[0].question)[:24]
        engine_lp = torch.tensor(ray.get(engine.call.remote(_engine_prompt_logprobs, token_ids)))
        learner_lp = torch.tensor(driver.learner.call(_learner_prompt_logprobs, token_ids)[0])
        initial_lp = torch.tensor(_initial_prompt_logprobs(driver.model_path, token_ids))
        assert torch.allclose(engine_lp, learner_lp, atol=1e-4), (engine_lp - learner_lp).abs().max()
        assert (initial_lp - learner_lp).abs().max() > 1e-2
        assert not torch.equal(engine_tensors["model.embed_tokens.weight"],
                               _initial_embedding(driver.model_path))
    finally:
        driver.shutdown()
    assert [ray.util.placement_group_table(g)["state"] for g in groups] == ["REMOVED"] * 3


def _initial_embedding(model_path: str) -> torch.Tensor:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for file in Path(model_path).glob("*.safetensors"):
        tensors.update(load_file(file))
    return tensors["model.embed_tokens.weight"]
