"""GPU smoke test: the training path on CUDA for a few DualGRPO steps, with timings.

A random-init Qwen3 of Qwen3-0.6B's shape (``personadual.tiny`` preset, ~0.44B parameters)
goes through forced-prefix generation on CUDA (vLLM when it imports, else the HF engine),
exact-match rewards, a DeepSpeed ZeRO-2 bf16 DualGRPO step on CUDA with the KL reference,
and a bucketed weight sync into the engine after every step, then checks the engine holds
exactly the learner's weights. Each RL step is the driver's own (``personadual/rl_step.py``:
generate, score, learner step, sync), with an engine process and an in-process learner in
place of Ray actors. Each stage prints one JSON line; the last line sums up.

    bash scripts/gpu_smoke.sh                     # wraps this file (and carried wheels)
    python scripts/gpu_smoke.py --steps 3 --prompts 16 --n-per-mode 4

The engine runs in its own process, as in a real run. The sync goes over NCCL only when
learner and engine sit on different GPUs: NCCL refuses two ranks on one device, which the
last stage probes and reports, so on one GPU the sync uses the host-staged gloo transport
(the CPU path: the driver's sender, learner/weight_push.py, with its checksummed buckets and
the version carried by the finish, into the engine's receiver).
"""

from __future__ import annotations

import argparse
import importlib
import json
import multiprocessing as mp
import random
import sys
import time
import traceback
from dataclasses import asdict
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from learner.weight_push import WeightPusher, tensor_metas  # noqa: E402
from personadual.modes import Mode  # noqa: E402
from personadual.rl_step import RLStep  # noqa: E402
from personadual.tiny import PRESETS, build_tiny_model  # noqa: E402
from personadual.world import PersonaWorld, WorldConfig  # noqa: E402
from smoke_nccl import nccl_probe  # noqa: E402  (this script's folder is sys.path[0])

PRESET = "qwen3_0.6b_shape"
REPORT: dict[str, Any] = {"stages": {}, "not_run": {}}


def emit(stage: str, **fields: Any) -> None:
    line = {"stage": stage, **fields}
    REPORT["stages"][stage] = fields
    print(json.dumps(line, default=str), flush=True)


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in ("torch", "transformers", "deepspeed", "vllm", "ray"):
        try:
            found[name] = getattr(importlib.import_module(name), "__version__", "?")
        except Exception as error:  # noqa: BLE001 - any import failure means "not usable here"
            found[name] = None
            REPORT["not_run"].setdefault(name, f"does not import: {type(error).__name__}: {error}"[:200])
    return found


# ---- the rollout engine, in its own process -------------------------------------------------
def engine_process(conn: Connection, model_path: str, config_fields: dict[str, Any]) -> None:
    from rollout.config import RolloutConfig, SamplingConfig
    from rollout.engine import make_engine

    try:
        sampling = SamplingConfig(**config_fields.pop("sampling"))
        sleeps = config_fields.pop("sleep_between_phases", False)  # --schedule colocated
        engine = make_engine(model_path, RolloutConfig(**config_fields, sampling=sampling),
                             sleep_between_phases=sleeps)
        conn.send(("ok", {"engine": type(engine).__name__, "device": str(getattr(engine, "device", "cuda"))}))
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails the stage
        conn.send(("error", traceback.format_exc()))
        return
    while True:
        method, args, kwargs = conn.recv()
        if method == "stop":
            return
        try:
            if method == "weight_version":
                result = engine.weight_version
            elif method == "load_ipc":  # --schedule colocated on CUDA (scripts/smoke_colocated.py)
                from smoke_colocated import load_ipc

                result = load_ipc(engine, *args)
            elif method == "weight_sums":
                result = {name: float(p.detach().double().sum()) for name, p in engine.model.named_parameters()}
            else:
                result = getattr(engine, method)(*args, **kwargs)
            conn.send(("ok", result))
        except BaseException:  # noqa: BLE001
            conn.send(("error", traceback.format_exc()))


class EngineHandle:
    """Calls into the engine process; ``call`` waits, ``send``/``reply`` split a call
    whose far end blocks in a collective that this process must join."""

    def __init__(self, model_path: Path, config_fields: dict[str, Any], timeout_s: float) -> None:
        context = mp.get_context("spawn")
        self.conn, child = context.Pipe()
        self.timeout_s = timeout_s
        self.process = context.Process(target=engine_process, args=(child, str(model_path), config_fields),
                                       daemon=True)
        self.process.start()
        self.info = self.reply()

    def send(self, method: str, *args: Any, **kwargs: Any) -> None:
        self.conn.send((method, args, kwargs))

    def reply(self) -> Any:
        if not self.conn.poll(self.timeout_s):
            raise TimeoutError(f"rollout engine: no answer within {self.timeout_s:.0f} s")
        status, value = self.conn.recv()
        if status != "ok":
            raise RuntimeError(f"rollout engine failed:\n{value}")
        return value

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        self.send(method, *args, **kwargs)
        return self.reply()

    def stop(self) -> None:
        if self.process.is_alive():
            self.send("stop")
            self.process.join(30)
        if self.process.is_alive():
            self.process.kill()


# ---- the weight sync: the driver's own sequence (learner/weight_push.py) ---------------------
class EngineProcessClient:
    """The engine process as the control plane of ``WeightPusher`` (one engine, one worker)."""

    def __init__(self, engine: EngineHandle) -> None:
        self.engine = engine

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self.engine.call("init_weight_transfer_engine", init_info)

    def start_weight_update(self) -> None:
        self.engine.call("start_weight_update")

    def update_weights(self, update_info: dict[str, Any]) -> None:
        self.engine.call("update_weights", update_info)

    def finish_weight_update(self, weight_version: int | None = None,
                             checksums: list[int | None] | None = None) -> None:
        self.engine.call("finish_weight_update", weight_version, checksums)


class Sync:
    """Learner rank 0 -> the engine process: one transfer group of its own, checksummed
    buckets, the version carried by the finish."""

    def __init__(self, learner: Any, engine: EngineHandle, bucket_bytes: int, timeout_s: float) -> None:
        from learner.distributed import LOOPBACK, free_port

        self.learner = learner
        self.pusher = WeightPusher.connect(EngineProcessClient(engine), master_address=LOOPBACK,
                                           master_port=free_port(), world_size=2, bucket_bytes=bucket_bytes,
                                           timeout_s=timeout_s)
        self.metas = tensor_metas(learner.weight_metadata())

    def push(self) -> dict[str, float]:
        # copy=False: each tensor is packed into its bucket before the next one is read.
        return self.pusher.push(self.metas, self.learner.full_weights(device="cpu", copy=False),
                                version=self.learner.weight_version)


# ---- the pieces of one RL step (personadual/rl_step.py runs them, as the driver does) --------
class SmokeRollouts:
    """``RolloutSource`` over the engine process: each step's prompts drawn from ``rng``,
    forced-prefix groups, exact-match rewards plus a personalized-mode bonus."""

    def __init__(self, engine: EngineHandle, prompts: list[Any], count: int, n_per_mode: int) -> None:
        from rewards.config import RewardConfig
        from rewards.exact_match import ExactMatchScorer

        self.engine, self.prompts, self.count, self.n_per_mode = engine, prompts, count, n_per_mode
        self.rng = random.Random(0)
        self.scorer = ExactMatchScorer(RewardConfig())

    def start(self, step: int) -> dict[str, Any]:
        batch = self.rng.sample(self.prompts, self.count)
        pending = {"step": step, "sent": time.perf_counter()}
        self.engine.send("generate", batch, forced=True, n=self.n_per_mode)
        return pending

    def wait(self, pending: dict[str, Any]) -> None:
        if "rollouts" not in pending:
            pending["rollouts"] = self.engine.reply()
            pending["generated"] = time.perf_counter()

    def finish(self, pending: dict[str, Any]) -> tuple[list[Any], dict[str, float], dict[str, int]]:
        from personadual.records import Scored

        self.wait(pending)
        scored = []
        for rollout in pending["rollouts"]:
            reward, _detail = self.scorer.score(rollout.prompt, rollout.text)
            # A random-init model answers nothing right, so every advantage would be 0 and no
            # weight would move: the smoke also rewards the personalized mode, which gives
            # the inter-mode advantage (and the beta-weighted mode token) a signal.
            reward += float(rollout.mode is Mode.PERSONALIZED)
            scored.append(Scored(rollout, reward, reward >= 1.0))
        times = {"generate": pending["generated"] - pending["sent"], "score": time.perf_counter() - pending["generated"]}
        return scored, times, {}


class SmokeLearner:
    """``PolicyLearner`` over the in-process learner: the policy batch built as the learner
    group builds it, and the GPU's queue drained so the step's time is the step's."""

    def __init__(self, learner: Any, algo: Any) -> None:
        self.learner, self.algo = learner, algo

    @property
    def weight_version(self) -> int:
        return self.learner.weight_version

    def policy_step(self, scored: list[Any]) -> dict[str, Any]:
        from learner.batch import build_policy_batch

        metrics = self.learner.policy_step(build_policy_batch(scored, advantage=self.algo.advantage,
                                                              scale=self.algo.scale))
        if self.learner.device.type == "cuda":
            torch.cuda.synchronize()
        return metrics


def rl_steps(args: argparse.Namespace, model_path: Path) -> bool:
    from learner.config import LearnerConfig, OptimConfig
    from learner.engine import Learner
    from personadual.algo_config import AlgoConfig

    engine_kind = "vllm" if REPORT["versions"]["vllm"] and args.device == "cuda" else "hf"
    if engine_kind == "hf" and args.device == "cuda":
        REPORT["not_run"]["vllm_engine"] = "vllm does not import on this machine: the HF engine generated instead"
    sampling = {"temperature": 0.6, "max_response_tokens": args.max_response_tokens, "seed": 0}
    on_gpu = args.device == "cuda"
    engine_fields = {"engine": engine_kind, "num_gpus_per_engine": 1.0 if on_gpu else 0.0,
                     "dtype": "bfloat16" if on_gpu else "float32",
                     "gpu_memory_utilization": 0.3, "max_model_len": 512, "weight_transfer_backend": "gloo",
                     "sampling": sampling, "sleep_between_phases": args.schedule == "colocated"}
    start = time.perf_counter()
    engine = EngineHandle(model_path, dict(engine_fields), args.timeout_s)
    emit("engine_start", seconds=round(time.perf_counter() - start, 2), **engine.info)

    start = time.perf_counter()
    config = LearnerConfig(zero_stage=2, precision="auto", micro_batch_tokens=32768,
                           collective_timeout_s=args.timeout_s,
                           optim=OptimConfig(lr=args.lr, schedule="constant", total_steps=args.steps))
    algo = AlgoConfig(n_per_mode=args.n_per_mode, advantage="dual", kl_coef=0.04, beta=2.0)
    learner = Learner(config, model_path, algo=algo, device=args.device)
    emit("learner_start", seconds=round(time.perf_counter() - start, 2), backend=dist.get_backend(),
         precision=learner.precision, zero_stage=config.zero_stage,
         parameters=sum(p.numel() for p in learner.engine.module.parameters()),
         gpu_memory_gib=round(torch.cuda.memory_allocated() / 2**30, 2) if on_gpu else None)

    start = time.perf_counter()
    colocated = args.schedule == "colocated"
    if colocated and on_gpu:  # one GPU for both: the weights go by CUDA IPC, not through the host
        from smoke_colocated import IpcSync

        sync, transport = IpcSync(learner, engine), "cuda ipc"
    else:
        sync, transport = Sync(learner, engine, bucket_bytes=64 << 20, timeout_s=args.timeout_s), "gloo (host-staged)"
        if colocated:
            REPORT["not_run"]["cuda_ipc"] = "no CUDA device: the colocated smoke syncs through the host"
    first = sync.push()
    emit("sync_start", seconds=round(time.perf_counter() - start, 2), transport=transport, schedule=args.schedule,
         first_push_s=round(first["seconds"], 3), bytes=int(first["bytes"]))

    initial_sums = weight_sums(learner)
    rollouts = SmokeRollouts(engine, PersonaWorld(WorldConfig()).train_prompts(), args.prompts, algo.n_per_mode)
    policy: Any = SmokeLearner(learner, algo)
    if colocated:  # the engine sleeps while the learner holds the device
        from smoke_colocated import EnginesAsleepLearner

        policy = EnginesAsleepLearner(policy, engine)
    rl_step = RLStep(rollouts, policy, sync.push, max_staleness=0, total_steps=args.steps)
    for step in range(1, args.steps + 1):
        done = rl_step(step)
        engine_version = engine.call("weight_version")
        times, metrics, scored = done.times, done.learner_metrics, done.scored
        tokens = sum(len(s.rollout.response_token_ids) for s in scored)
        emit("rl_step", step=step, samples=len(scored), response_tokens=tokens,
             reward_mean=round(sum(s.reward for s in scored) / len(scored), 4),
             loss=round(metrics["loss"], 5), mode_token_prob_personalized=round(
                 metrics.get("mode_token_prob/personalized", float("nan")), 5), kl=round(metrics["kl"], 6),
             grad_norm=round(metrics["grad_norm"], 4), generate_s=round(times["generate"], 3),
             score_s=round(times["score"], 3), reference_s=round(times["reference"], 3),
             train_s=round(times["train"], 3), sync_s=round(done.sync["seconds"], 3),
             sync_bytes=int(done.sync["bytes"]), generate_tokens_per_s=round(tokens / times["generate"], 1),
             learner_version=learner.weight_version, engine_version=engine_version,
             step_s=round(times["step"], 3), engine_slept=policy.slept[-1] if colocated else None,
             gpu_free_gib_while_engine_slept=round(metrics.get("gpu_free_gib_while_engine_slept", float("nan")), 2),
             gpu_peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if on_gpu else None)
        if engine_version != learner.weight_version:
            raise RuntimeError(f"step {step}: engine at weight version {engine_version}, "
                               f"learner at {learner.weight_version}")

    learner_sums = weight_sums(learner)
    changed = sum(initial_sums[name] != value for name, value in learner_sums.items())
    ok = changed > 0
    if engine_kind == "hf":
        engine_sums = engine.call("weight_sums")
        mismatched = [name for name, value in learner_sums.items() if engine_sums.get(name) != value]
        ok = ok and not mismatched and learner_sums.keys() <= engine_sums.keys()
        emit("weights_equal", ok=ok, tensors=len(learner_sums), changed_by_training=changed,
             mismatched=mismatched[:5])
    else:
        emit("weights_changed", ok=ok, tensors=len(learner_sums), changed_by_training=changed)
    engine.stop()
    learner.close()
    return ok


def weight_sums(learner: Any) -> dict[str, float]:
    return {name: float(t.double().sum()) for name, t in learner.full_weights(device="cpu")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n-per-mode", type=int, default=4)
    parser.add_argument("--max-response-tokens", type=int, default=48)
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument("--timeout-s", type=float, default=180.0)
    parser.add_argument("--no-nccl-probe", action="store_true")
    # colocated: the engine sleeps while the learner trains and the weights go by CUDA IPC
    # (scripts/smoke_colocated.py), as cluster.schedule=colocated does on a Ray cluster.
    parser.add_argument("--schedule", default="serial", choices=("serial", "colocated"))
    parser.add_argument("--preset", default=PRESET, choices=sorted(PRESETS))
    # cpu: the same stages on a CPU-only machine (tests/test_gpu_smoke_script.py runs it so).
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    args = parser.parse_args()
    begin = time.perf_counter()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device is visible to torch (--device cpu runs the CPU path)", file=sys.stderr)
        return 2
    REPORT["versions"] = versions()
    if args.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        emit("environment", gpu=props.name, gpus=torch.cuda.device_count(),
             gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
             nccl=".".join(map(str, torch.cuda.nccl.version())), **REPORT["versions"])
    else:
        emit("environment", gpu=None, threads=torch.get_num_threads(), **REPORT["versions"])

    start = time.perf_counter()
    model_path = build_tiny_model(args.preset)
    emit("model", preset=args.preset, seconds=round(time.perf_counter() - start, 2), path=str(model_path),
         config={k: v for k, v in asdict(PRESETS[args.preset]).items() if k != "world"})

    ok = False
    if REPORT["versions"]["deepspeed"] is None:
        REPORT["not_run"]["rl_steps"] = "deepspeed does not import: no learner"
    else:
        try:
            ok = rl_steps(args, model_path)
        except BaseException:  # noqa: BLE001 - reported, then the probe still runs
            emit("rl_steps_failed", error=traceback.format_exc()[-2000:])
    if args.device == "cuda" and not args.no_nccl_probe:
        emit("nccl_two_ranks_one_gpu", **nccl_probe(timeout_s=90.0))
    emit("summary", ok=ok, seconds=round(time.perf_counter() - begin, 1), not_run=REPORT["not_run"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
