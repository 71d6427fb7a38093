"""Where a weight sync's time goes, on both ends, as in a run: one DeepSpeed learner rank and
one vLLM engine as Ray actors (two threads each, as the serial schedule gives them on this
2-core machine), the model personadual/tiny.py builds, the run's bucket size, the run's
WeightSync (actors/weight_sync.py).

Timers are wrapped around the functions each process runs (in the actors, through their
``call``), so nothing of this lives in the code paths themselves; every timer is summed per
sync (median over the timed syncs), and the wall clock of each process (one machine) lines
the two ends up.

    .venv/bin/python bench/sync_profile.py [--preset small26m] [--syncs 5] [--warmup 1] [--socket]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

TIMES: dict[str, list[float]] = {}  # per process: label -> seconds of each call since the last collect


def _wrap(owner, attr: str, label: str) -> bool:
    original = getattr(owner, attr, None)
    if original is None or getattr(original, "_timed", False):
        return False
    if isinstance(original, (staticmethod, classmethod)):
        return False

    @functools.wraps(original)
    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            TIMES.setdefault(label, []).append(time.perf_counter() - start)

    timed._timed = True
    setattr(owner, attr, timed)
    return True


def _wrap_generator(owner, attr: str, label: str) -> None:
    """Time spent inside the generator's ``next`` (waiting for what it yields), per item."""
    original = getattr(owner, attr)
    if getattr(original, "_timed", False):
        return

    @functools.wraps(original)
    def timed(*args, **kwargs):
        iterator = original(*args, **kwargs)
        while True:
            start = time.perf_counter()
            try:
                item = next(iterator)
            except StopIteration:
                TIMES.setdefault(label, []).append(time.perf_counter() - start)
                return
            TIMES.setdefault(label, []).append(time.perf_counter() - start)
            outside = time.perf_counter()
            yield item
            TIMES.setdefault(label + ".consumer", []).append(time.perf_counter() - outside)

    timed._timed = True
    setattr(owner, attr, timed)


def _collect(_owner=None) -> dict[str, list[float]]:
    out = {k: list(v) for k, v in TIMES.items()}
    TIMES.clear()
    return out


def instrument_engine(engine) -> list[str]:
    """Timers in the engine's process (vLLM worker in-process: the uni executor)."""
    from vllm.model_executor.layers import linear, utils
    from vllm.model_executor.model_loader import reload
    from vllm.model_executor.model_loader.reload import layerwise, meta

    import personadual.weight_wire as wire
    from rollout import transfer_gloo

    done = []
    for attr in ("start_weight_update", "update_weights", "finish_weight_update", "_reset_prefix_cache",
                 "_received_updates"):
        done += [f"engine.{attr}"] * _wrap(engine, attr, f"engine.{attr}")
    for attr in ("start_weight_update", "finish_weight_update", "receive_weights"):
        done += [f"gloo.{attr}"] * _wrap(transfer_gloo.GlooWeightTransferEngine, attr, f"gloo.{attr}")
    _wrap_generator(transfer_gloo, "receive_buckets", "recv.next")
    for module, attr in ((reload, "initialize_layerwise_reload"), (reload, "finalize_layerwise_reload"),
                         (layerwise, "_layerwise_process"), (layerwise, "materialize_layer"),
                         (layerwise, "_copy_and_restore_kernel_tensors"), (layerwise, "restore_layer_on_meta"),
                         (meta, "materialize_meta_tensor"), (utils, "dispatch_cpu_unquantized_gemm"),
                         (wire, "bucket_checksum"), (wire, "_acknowledge"), (transfer_gloo, "repack_cpu_lm_head"),
                         (linear.UnquantizedLinearMethod, "process_weights_after_loading")):
        done += [f"{module.__name__}.{attr}"] * _wrap(module, attr, f"{module.__name__.rsplit('.', 1)[-1]}.{attr}")
    import vllm._custom_ops as ops

    _wrap(ops, "create_onednn_mm", "ops.create_onednn_mm")
    worker = engine.llm.llm_engine.model_executor.driver_worker.worker
    done += ["model.load_weights"] * _wrap(worker.model_runner.get_model(), "load_weights", "model.load_weights")
    return done


def instrument_learner(learner) -> list[str]:
    import personadual.weight_wire as wire
    from learner import weight_push

    for module, attr in ((wire, "pack_into"), (wire, "bucket_checksum"), (wire, "_acknowledge"),
                         (weight_push, "send_buckets")):
        _wrap(module, attr, f"send.{attr}")
    _wrap_generator(weight_push, "_checked", "send.source_next")
    return ["ok"]


def summarise(rounds: list[dict[str, list[float]]]) -> dict[str, dict[str, float]]:
    labels = sorted({k for r in rounds for k in r})
    out = {}
    for label in labels:
        totals = [sum(r.get(label, [])) for r in rounds]
        counts = [len(r.get(label, [])) for r in rounds]
        out[label] = {"s": round(statistics.median(totals), 4), "calls": statistics.median(counts)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small26m")
    parser.add_argument("--syncs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bucket-bytes", type=int, default=None)
    parser.add_argument("--verify-every", type=int, default=0)
    parser.add_argument("--socket", action="store_true",
                        help="learner.sync_shared_memory=false: the buckets through gloo's socket")
    args = parser.parse_args()

    from actors import cluster  # first: it sets the environment Ray reads at its import

    import ray
    import torch

    from actors.learner_group import LearnerGroup
    from actors.rollout_actor import create_rollout_actors
    from actors.weight_sync import SyncVerification, WeightSync
    from learner.config import LearnerConfig
    from personadual.algo_config import AlgoConfig
    from personadual.tiny import build_tiny_model
    from rollout.config import RolloutConfig, SamplingConfig

    from bench import sync_profile as me  # by reference in the actors (one TIMES per process)

    model_dir = build_tiny_model(args.preset)
    cluster.connect(num_cpus=2)
    learner_config = LearnerConfig(num_cpus_per_rank=1.0, threads=args.threads, precision="fp32",
                                   sync_shared_memory=not args.socket)
    bucket_bytes = args.bucket_bytes or learner_config.bucket_bytes
    learner = LearnerGroup(learner_config, model_dir, algo=AlgoConfig(kl_coef=0.0))
    engines = create_rollout_actors(model_dir, RolloutConfig(num_cpus_per_engine=1.0, threads=args.threads,
                                                             sampling=SamplingConfig(max_response_tokens=8)))
    sync = WeightSync(learner, engines, backend="gloo", bucket_bytes=bucket_bytes, timeout_s=120.0,
                      verification=SyncVerification(args.verify_every, 1e-2, []))
    print(json.dumps({"engine_timers": ray.get(engines[0].call.remote(me.instrument_engine))}), file=sys.stderr)
    learner.call(me.instrument_learner)

    def move(lrn, seed):
        torch.manual_seed(seed)
        with torch.no_grad():
            for parameter in lrn.engine.module.parameters():
                parameter.mul_(1.0 + 1e-3 * seed)

    driver, engine_side, learner_side = [], [], []
    for index in range(args.warmup + args.syncs):
        learner.call(move, index)
        ray.get(engines[0].call.remote(me._collect))
        learner.call(me._collect)
        start = time.time()
        stats = sync.sync()
        end = time.time()
        if index < args.warmup:
            continue
        engine_side.append(ray.get(engines[0].call.remote(me._collect)))
        learner_side.append(learner.call(me._collect)[0])
        driver.append({**stats, "driver_wall_s": end - start})
    print(json.dumps({
        "preset": args.preset, "bucket_bytes": bucket_bytes, "threads": args.threads, "syncs": args.syncs,
        "shared_memory": not args.socket,
        "driver": {k: round(statistics.median(float(d[k]) for d in driver), 4) for k in driver[0]},
        "learner": summarise(learner_side), "engine": summarise(engine_side),
        "engine_per_call_last": {k: [round(v, 4) for v in vals] for k, vals in engine_side[-1].items()
                                 if len(vals) <= 12},
    }, indent=1))
    for engine in engines:
        ray.kill(engine)
    learner.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main()
