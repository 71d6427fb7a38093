"""Throughput of the DualGRPO step: ZeRO-2 vs ZeRO-3, 1 vs 2 ranks, tiny vs ~20M-parameter model,
each prompt repeated per response or computed once per group (learner.shared_prefix).

Runs the real path (a LearnerGroup of Ray actors on gloo or NCCL, DeepSpeed, the frozen
reference, token-count micro-batches) on a synthetic scored batch and prints one JSON
object. Each configuration takes warm-up steps first (the first also builds the reference).

    .venv/bin/python bench/learner.py                       # every configuration, CPU
    .venv/bin/python bench/learner.py --models tiny --ranks 1 --steps 3
    # the default run's shapes (16 prompts x 8 responses, ~41 prompt and ~17 response tokens):
    .venv/bin/python bench/learner.py --stages 2 --ranks 1 --prompts 16 --prompt-tokens 41 \
        --response-tokens 17 --micro-batch-tokens 4096 --shared-prefix off on
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from actors import cluster  # noqa: E402
from actors.learner_group import LearnerGroup  # noqa: E402
from learner.batch import build_policy_batch, micro_batches, shard  # noqa: E402
from learner.config import LearnerConfig, OptimConfig  # noqa: E402
from personadual.algo_config import AlgoConfig  # noqa: E402
from personadual.modes import Mode, mode_token_ids  # noqa: E402
from personadual.records import Prompt, Rollout, Scored  # noqa: E402
from personadual.tiny import PRESETS, build_tiny_model  # noqa: E402


def synthetic_batch(vocab: int, mode_ids: dict[Mode, int], prompts: int, per_mode: int, prompt_tokens: int,
                    response_tokens: int, seed: int) -> list[Scored]:
    """Forced-prefix groups: ``per_mode`` responses per mode per prompt, lengths varying
    +-50% around the given means, rewards in {0, 0.5, 1}."""
    rng = random.Random(seed)
    scored = []
    for p in range(prompts):
        prompt = Prompt(id=f"bench-{seed}-{p}", question="q", persona=None, persona_setting="none",
                        task_type="objective", gold=("a",), scorer="exact_match")
        prompt_ids = [rng.randrange(10, vocab) for _ in range(rng.randint(prompt_tokens // 2, prompt_tokens * 3 // 2))]
        for mode in Mode:
            for i in range(per_mode):
                length = rng.randint(response_tokens // 2, response_tokens * 3 // 2)
                response = [mode_ids[mode]] + [rng.randrange(10, vocab) for _ in range(length - 1)]
                rollout = Rollout(prompt, prompt_ids, response, [0.0] * len(response), "", mode, True, "stop", 0, i)
                reward = rng.choice([0.0, 0.5, 1.0])
                scored.append(Scored(rollout, reward, reward == 1.0))
    return scored


def _threads(_learner) -> int:
    return torch.get_num_threads()


def positions_processed(scored: list[Scored], ranks: int, micro_batch_tokens: int, shared_prefix: bool) -> int:
    """Token positions one forward pass over the batch computes (real tokens of the rows fed to
    the model, over every rank's micro-batches): the same plan the learner makes."""
    batch = build_policy_batch(scored)
    return sum(int(mb.attention_mask.sum()) for rank in range(ranks)
               for mb in micro_batches(shard(batch, rank, ranks, by_prompt=shared_prefix).samples,
                                       micro_batch_tokens, shared_prefix=shared_prefix))


def run_one(model_dir: Path, *, zero_stage: int, ranks: int, steps: int, warmup: int, batches: list[list[Scored]],
            micro_batch_tokens: int, cpus: float, gpus: float, precision: str, shared_prefix: bool) -> dict:
    config = LearnerConfig(zero_stage=zero_stage, num_ranks=ranks, num_cpus_per_rank=cpus / ranks,
                           num_gpus_per_rank=gpus, precision=precision, shared_prefix=shared_prefix,
                           micro_batch_tokens=micro_batch_tokens, optim=OptimConfig(lr=1e-5, total_steps=100))
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    group = LearnerGroup(config, model_dir, algo=AlgoConfig())
    startup = time.perf_counter() - start
    try:
        threads = group.call(_threads)
        for step in range(warmup):
            group.policy_step(batches[step % len(batches)])
        walls, metrics = [], []
        for step in range(steps):
            t0 = time.perf_counter()
            metrics.append(group.policy_step(batches[(warmup + step) % len(batches)]))
            walls.append(time.perf_counter() - t0)
    finally:
        group.shutdown()
    response_tokens = [m["tokens"] for m in metrics]
    total_tokens = [sum(len(s.rollout.prompt_token_ids) + len(s.rollout.response_token_ids)
                        for s in batches[(warmup + i) % len(batches)]) for i in range(steps)]
    positions = [positions_processed(batches[(warmup + i) % len(batches)], ranks, micro_batch_tokens, shared_prefix)
                 for i in range(steps)]
    return {
        "zero_stage": zero_stage, "ranks": ranks, "shared_prefix": shared_prefix, "torch_threads_per_rank": threads,
        "positions_per_pass": statistics.median(positions),
        "response_tokens_per_s": sum(response_tokens) / sum(walls),
        "total_tokens_per_s": sum(total_tokens) / sum(walls),
        "step_s": statistics.median(walls),
        "reference_s": statistics.median(m["time/reference"] for m in metrics),
        "train_s": statistics.median(m["time/train"] for m in metrics),
        # Of the positions the rows hold, the share that is padding.
        "padding_fraction": 1 - sum(positions) / max(sum(m["padded_tokens"] for m in metrics), 1),
        "startup_s": startup,
        # 1-minute load average around the run: other work on shared cores skews the timings.
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "small20m"], choices=sorted(PRESETS))
    parser.add_argument("--stages", nargs="+", type=int, default=[2, 3])
    parser.add_argument("--ranks", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step (each gets 2 x per-mode responses)")
    parser.add_argument("--per-mode", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--response-tokens", type=int, default=64)
    parser.add_argument("--micro-batch-tokens", type=int, default=2048)
    parser.add_argument("--cpus", type=float, default=float(os.cpu_count() or 1), help="CPUs shared by the ranks")
    parser.add_argument("--gpus-per-rank", type=float, default=0.0)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--shared-prefix", nargs="+", default=["on"], choices=["off", "on"],
                        help="learner.shared_prefix settings to run (off: each prompt repeated per response)")
    args = parser.parse_args()

    cluster.connect(num_cpus=max(1, int(args.cpus)))
    results = []
    try:
        for preset in args.models:
            model_dir = build_tiny_model(preset)
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
            params = sum(v.numel() for v in _safetensors(model_dir).values())
            batches = [synthetic_batch(len(tokenizer), mode_token_ids(tokenizer), args.prompts, args.per_mode,
                                       args.prompt_tokens, args.response_tokens, seed) for seed in range(2)]
            for stage in args.stages:
                for ranks in args.ranks:
                    for shared in args.shared_prefix:
                        row = run_one(model_dir, zero_stage=stage, ranks=ranks, steps=args.steps, warmup=args.warmup,
                                      batches=batches, micro_batch_tokens=args.micro_batch_tokens, cpus=args.cpus,
                                      gpus=args.gpus_per_rank, precision=args.precision,
                                      shared_prefix=shared == "on")
                        results.append({"model": preset, "parameters": params, **row})
                        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    finally:
        cluster.shutdown()
    print(json.dumps({
        "benchmark": "learner.dualgrpo_step",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "batch": {"prompts": args.prompts, "responses_per_prompt": 2 * args.per_mode,
                  "mean_prompt_tokens": args.prompt_tokens, "mean_response_tokens": args.response_tokens,
                  "micro_batch_tokens": args.micro_batch_tokens, "steps_timed": args.steps, "warmup": args.warmup},
        "results": results,
    }, indent=1))


def _safetensors(model_dir: Path) -> dict:
    tensors = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


if __name__ == "__main__":
    main()
