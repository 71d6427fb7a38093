"""Where an RL step's time goes, and how close each component runs to the machine's raw speed.

Runs RL steps through the real launch path (bench/ours.py: 8 prompts x 8 completions, 16
sampled tokens, temperature 0.6, KL 0.04, fp32, one learner rank, one engine) and prints one
JSON object with:

- the phase breakdown of a step (median over the timed steps; seconds and share): generate,
  score, reference, train, sync, and orchestration (the step's wall time outside them);
- rollout / raw vLLM: the generate phase's sampled tokens/s (best timed step) against a bare
  `vllm.LLM.generate` of the same requests (the same prompts, forced mode tokens, n, tokens
  and temperature) on this machine's cores, in a fresh process with vLLM's own defaults, no
  seeds and no log-probs (best of --reps); beside it the same bare call on the LLM our
  engine builds, with the sampling parameters it sends (what is left is our path around it);
- sync / raw gloo: the bytes of a sync over the sync phase's seconds, against one
  preallocated flat buffer of the same bytes broadcast between two processes through a gloo
  group of the same kind (personadual/weight_wire.py);
- learner / matmul: the train phase's FLOP/s (6 x matmul parameters x the real token
  positions the learner processed, i.e. forward and backward; a shared prompt once per
  packed row, padding left out) against torch's fp32 matmul rate on this CPU, measured here
  with --matmul-threads threads on the model's own MLP shape;

each beside its target (rollout >= 0.8, sync >= 0.5, learner >= 0.7).

    .venv/bin/python bench/step.py [--preset small26m] [--steps 3] [--warmup 1] [--reps 5]

Every part runs in a process of its own, one after the other, so none slows another; the
cores are shared with whatever else runs, so compare within one invocation.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Run as a script, bench/ comes first on sys.path and bench/rollout.py would shadow rollout/.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

from bench.ours import (COMPLETIONS_PER_PROMPT, KL_COEF, PRESET_SIZES, PROMPTS_PER_STEP,  # noqa: E402
                        SAMPLED_TOKENS, TEMPERATURE, OurRun, machine, run_ours)

PHASES = ("generate", "score", "reference", "train", "sync")
NOT_PHASES = {"step", "idle", "train_old_logprob"}  # the whole, the rest, and a part of train
TARGETS = {"rollout_over_raw_vllm": 0.8, "sync_over_raw_gloo": 0.5, "learner_over_matmul": 0.7}


# ---- children: each measurement in a fresh process ---------------------------------------
def raw_vllm(preset: str, reps: int, options: str) -> dict:
    """Bare ``LLM.generate`` on the step's requests: best and median sampled tokens/s over
    ``reps``. ``options``: ``defaults`` (vLLM's own engine options and plain sampling
    parameters: no seeds, no log-probs) or ``ours`` (the LLM our engine builds, driven with
    the sampling parameters it sends: seeded, log-probs on; what is left of the gap is the
    rollout path around the call: request planning, rollouts, Ray, the driver)."""
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from personadual.tiny import build_tiny_model
    from personadual.world import PersonaWorld, WorldConfig
    from rollout.config import RolloutConfig, SamplingConfig
    from rollout.requests import PromptCodec

    model_path = build_tiny_model(preset)
    prompts = PersonaWorld(WorldConfig(seed=0)).train_prompts()[:PROMPTS_PER_STEP]
    seeds = list(range(len(prompts)))
    if options == "ours":
        from rollout.vllm_engine import VllmEngine

        engine = VllmEngine(model_path, RolloutConfig(sampling=SamplingConfig(
            temperature=TEMPERATURE, max_response_tokens=SAMPLED_TOKENS + 1)))
        llm, codec = engine.llm, engine.codec
        requests = codec.plan(prompts, forced=True, n=COMPLETIONS_PER_PROMPT // 2, seeds=seeds)
        params = [engine._sampling_params(r, greedy=False) for r in requests]
    else:
        codec = PromptCodec(AutoTokenizer.from_pretrained(model_path), model_path, max_model_len=512,
                            max_response_tokens=SAMPLED_TOKENS + 1)
        requests = codec.plan(prompts, forced=True, n=COMPLETIONS_PER_PROMPT // 2)
        params = [SamplingParams(n=r.n, temperature=TEMPERATURE, max_tokens=r.max_new_tokens,
                                 stop_token_ids=codec.stop_token_ids, detokenize=False) for r in requests]
        llm = LLM(model=str(model_path), dtype="float32", max_model_len=512, enforce_eager=True,
                  distributed_executor_backend="uni", seed=0)
    inputs = [TokensPrompt(prompt_token_ids=r.input_token_ids(codec.mode_ids)) for r in requests]
    llm.generate(inputs, params, use_tqdm=False)  # warm-up
    rates = []
    for _ in range(reps):
        llm.reset_prefix_cache()  # as after every weight sync in a run
        start = time.perf_counter()
        outputs = llm.generate(inputs, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        rates.append(sum(len(c.token_ids) for out in outputs for c in out.outputs) / seconds)
    return {"tokens_per_s": max(rates), "tokens_per_s_median": statistics.median(rates),
            "completions": sum(r.n for r in requests)}


def raw_gloo_rank(rank: int, port: int, nbytes: int, reps: int) -> dict:
    """One rank of a two-process broadcast of one preallocated flat buffer of ``nbytes``."""
    import torch

    from personadual.weight_wire import open_transfer_group

    group = open_transfer_group("127.0.0.1", port, rank, 2, 120.0)
    buffer = torch.full((nbytes,), rank, dtype=torch.uint8)
    group.broadcast(buffer, 0).wait()  # warm-up: connections, first touch of the pages
    seconds = []
    for _ in range(reps):
        group.barrier().wait()
        start = time.perf_counter()
        group.broadcast(buffer, 0).wait()
        seconds.append(time.perf_counter() - start)
    return {"seconds": min(seconds), "seconds_median": statistics.median(seconds)}


def matmul_rate(preset: str, threads: int, reps: int) -> dict:
    """fp32 GFLOP/s of torch.mm on ``threads`` threads, on the model's MLP shape (2048 tokens)."""
    import torch

    from personadual.tiny import PRESETS

    torch.set_num_threads(threads)
    config = PRESETS[preset]
    a = torch.randn(2048, config.hidden_size)
    b = torch.randn(config.hidden_size, config.intermediate_size)
    flops = 2 * a.shape[0] * a.shape[1] * b.shape[1]
    torch.mm(a, b)
    seconds = []
    for _ in range(max(reps, 3) * 4):
        start = time.perf_counter()
        torch.mm(a, b)
        seconds.append(time.perf_counter() - start)
    return {"gflops": flops / min(seconds) / 1e9, "gflops_median": flops / statistics.median(seconds) / 1e9,
            "threads": torch.get_num_threads(), "shape": [a.shape[0], a.shape[1], b.shape[1]]}


def child(args: list[str], timeout_s: float = 900.0) -> dict:
    from actors.local_env import process_env

    env = {**os.environ, **process_env(), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, __file__, "--child", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"bench/step.py child {args} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def raw_gloo(nbytes: int, reps: int) -> dict:
    from tests.helpers import free_port

    port = str(free_port())
    from actors.local_env import process_env

    env = {**os.environ, **process_env(), "PYTHONPATH": str(ROOT)}
    receiver = subprocess.Popen([sys.executable, __file__, "--child", "gloo", "1", port, str(nbytes), str(reps)],
                                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        return child(["gloo", "0", port, str(nbytes), str(reps)], timeout_s=300)
    finally:
        receiver.wait(timeout=60)


# ---- the report ---------------------------------------------------------------------------
def matmul_parameters(preset: str) -> int:
    """Parameters that multiply activations (every weight but the input embedding's lookup)."""
    from safetensors import safe_open

    from personadual.tiny import build_tiny_model

    total = 0
    for file in sorted(build_tiny_model(preset).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                shape = handle.get_slice(name).get_shape()
                if name != "model.embed_tokens.weight" and len(shape) == 2:  # norms are elementwise
                    total += math.prod(shape)
    return total


def breakdown(run: OurRun) -> dict:
    step = run.median("step")
    # Phases a schedule adds (e.g. generate_next: waiting for the next step's rollouts) are
    # listed by their own names; "idle" is recomputed below as orchestration.
    extra = sorted({key for row in run.rows for key in row["timing_s"]} - set(PHASES) - NOT_PHASES)
    phases = {phase: run.median(phase) for phase in (*PHASES, *extra)}
    phases["orchestration"] = max(0.0, step - sum(phases.values()))
    return {"step_s": round(step, 3),
            "phases_s": {k: round(v, 4) for k, v in phases.items()},
            "phases_share": {k: round(v / step, 4) for k, v in phases.items()}}


def report(preset: str, run: OurRun, vllm: dict[str, dict], gloo: dict, matmul: dict,
           args: argparse.Namespace) -> dict:
    rows = run.rows
    # Sampled tokens/s of each timed step's generate phase (the forced mode token is not sampled).
    step_rates = [row["samples"] * (row["response_length/mean"] - 1) / float(row["timing_s"]["generate"])
                  for row in rows]
    rollout_rate = statistics.median(step_rates)
    raw = vllm["defaults"]
    sync_bytes = statistics.median(float(row["sync"]["bytes"]) for row in rows)
    sync_rate = sync_bytes / run.median("sync")
    gloo_rate = sync_bytes / gloo["seconds"]
    # Real positions (a shared prompt once per packed row; padding left out): the useful work.
    # The padded rows' positions, which the matmuls also run over, are reported beside them.
    padded = statistics.median(float(row["learner"]["padded_tokens"]) for row in rows)
    positions = statistics.median(float(row["learner"].get("positions", padded)) for row in rows)
    params = matmul_parameters(preset)
    train_flops = 6 * params * positions / run.median("train")
    # Best against best: on shared cores the least disturbed step and repetition (a median of
    # five repetitions can land on three disturbed ones); the medians are reported beside.
    ratios = {"rollout_over_raw_vllm": max(step_rates) / raw["tokens_per_s"],
              "sync_over_raw_gloo": sync_rate / gloo_rate,
              "learner_over_matmul": train_flops / (matmul["gflops"] * 1e9)}
    return {
        "model": preset, "parameters": PRESET_SIZES.get(preset, preset), "matmul_parameters": params,
        **breakdown(run),
        "components": {
            "rollout": {"ours_sampled_tokens_per_s": round(max(step_rates), 1), "ours_median": round(rollout_rate, 1),
                        "raw_vllm_sampled_tokens_per_s": round(raw["tokens_per_s"], 1),
                        "raw_vllm_median": round(raw["tokens_per_s_median"], 1),
                        # The LLM our engine builds, with our sampling parameters, called bare.
                        "raw_vllm_our_options": round(vllm["ours"]["tokens_per_s_median"], 1),
                        "raw_vllm_our_options_best": round(vllm["ours"]["tokens_per_s"], 1)},
            "sync": {"bytes": int(sync_bytes), "ours_s": round(run.median("sync"), 4),
                     # Inside the learner's round: engines' start, buckets on the wire and loaded,
                     # engines' finish; the rest of ours_s is the driver's call to the learner.
                     **{f"ours_{key}": round(statistics.median(float(row["sync"].get(key, 0.0)) for row in rows), 4)
                        for key in ("start_s", "transfer_s", "finish_s")},
                     "raw_gloo_s": round(gloo["seconds"], 4), "raw_gloo_median_s": round(gloo["seconds_median"], 4),
                     "ours_gb_per_s": round(sync_rate / 1e9, 3), "raw_gloo_gb_per_s": round(gloo_rate / 1e9, 3)},
            "learner": {"token_positions": positions, "padded_positions": padded,
                        "train_gflops": round(train_flops / 1e9, 2),
                        "train_gflops_padded": round(6 * params * padded / run.median("train") / 1e9, 2),
                        "matmul_gflops": round(matmul["gflops"], 2), "matmul_gflops_median": round(
                            matmul["gflops_median"], 2), "matmul_threads": matmul["threads"],
                        "matmul_shape": matmul["shape"]},
        },
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
        "targets": TARGETS,
        "meets": {k: ratios[k] >= TARGETS[k] for k in TARGETS},
        "launch_wall_s": round(run.wall_s, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", nargs="+", default=["small26m"], choices=sorted(PRESET_SIZES),
                        help="model(s) built by personadual/tiny.py")
    parser.add_argument("--steps", type=int, default=3, help="timed RL steps (the run length)")
    parser.add_argument("--warmup", type=int, default=1, help="RL steps run first and not timed")
    parser.add_argument("--reps", type=int, default=5, help="repetitions of each raw measurement")
    parser.add_argument("--matmul-threads", type=int, default=2)
    parser.add_argument("--out-dir", type=Path, default=None, help="where the runs go (default: a temp dir)")
    parser.add_argument("--extra", nargs="*", default=[], help="more launch.py overrides for our run")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "vllm":
            result = raw_vllm(rest[0], int(rest[1]), rest[2])
        elif kind == "gloo":
            result = raw_gloo_rank(*(int(v) for v in rest))
        else:
            result = matmul_rate(rest[0], int(rest[1]), int(rest[2]))
        print(json.dumps(result))
        return

    load_at_start = round(os.getloadavg()[0], 2)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-step-") as scratch:
        out_dir = args.out_dir or Path(scratch)
        for preset in args.preset:
            run = run_ours(preset, steps=args.steps, warmup=args.warmup, out_dir=out_dir, extra=args.extra)
            vllm = {options: child(["vllm", preset, str(args.reps), options]) for options in ("defaults", "ours")}
            sync_bytes = int(statistics.median(float(row["sync"]["bytes"]) for row in run.rows))
            gloo = raw_gloo(sync_bytes, args.reps)
            matmul = child(["matmul", preset, str(args.matmul_threads), str(args.reps)])
            results.append(report(preset, run, vllm, gloo, matmul, args))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    print(json.dumps({
        "benchmark": "one RL step: phases and component ratios",
        "work": {"prompts_per_step": PROMPTS_PER_STEP, "completions_per_prompt": COMPLETIONS_PER_PROMPT,
                 "sampled_tokens": SAMPLED_TOKENS, "temperature": TEMPERATURE, "kl_coef": KL_COEF,
                 "precision": "fp32", "learner_ranks": 1, "engines": 1, "timed_steps": args.steps,
                 "warmup_steps": args.warmup, "statistic": "median over timed steps; raw parts: best of reps"},
        "machine": machine(load_at_start),
        "results": results,
    }, indent=1))


if __name__ == "__main__":
    main()
