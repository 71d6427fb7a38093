"""Side by side with TRL's GRPOTrainer: completions per second at equal work, interleaved runs.

Both sides train the same model files (built by `personadual/tiny.py`: "small26m", 26.2M
parameters, and "tiny", 0.85M) on the same work: 8 prompts x 8 completions per step, 16
sampled tokens, temperature 0.6, KL 0.04 (a reference model on both sides), fp32, one learner
process, one generator, lr 1e-4, one optimizer step per generation.

- Ours: `launch.py` with `configs/plain_world.yaml` and the work's overrides (bench/ours.py): Ray
  actors, the vLLM engine, forced-prefix DualGRPO (4 completions per mode).
- TRL: `GRPOTrainer` in an environment of its own (bench/.venv-trl: torch's CPU wheel and
  TRL with the versions it resolves; `--setup` creates it, pip must find `torch==2.13.0+cpu`:
  on other machines `PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu`). TRL runs
  as its defaults have it on a CPU: generation with transformers' `generate` in the training
  process (`use_vllm=False`, TRL's default; TRL's vLLM modes need a GPU), torch on every core;
  like ours, without activation checkpointing (TRL's GRPO default turns it on) and at a
  constant learning rate.
  Its prompts are the same world's training prompts, rendered by the same chat template; a
  reward of 1 for a completion that contains the gold answer (scoring costs next to nothing
  on either side).

Each round runs ours then TRL (`--rounds` rounds per model), each in a fresh process;
completions/s is a run's completions over its timed steps' wall time (warm-up steps and
start-up excluded); the figures are the medians over rounds, the ratio is ours over TRL.

    .venv/bin/python bench/peer_trl.py --setup            # once: creates bench/.venv-trl
    .venv/bin/python bench/peer_trl.py [--presets small26m tiny] [--steps 3] [--warmup 1] [--rounds 2]

Prints one JSON object. Targets: 26.2M >= 1.5x TRL, 0.85M >= 1.2x.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Only the standard library at the top: the TRL child imports this file from TRL's environment.
ROOT = Path(__file__).resolve().parent.parent
TRL_VENV = ROOT / "bench" / ".venv-trl"
TRL_REQUIREMENTS = ("torch==2.13.0+cpu", "trl==1.16.0")
TARGETS = {"small26m": 1.5, "tiny": 1.2}
LEARNING_RATE = 1e-4  # configs/plain_world.yaml's (and default.yaml's) algo-stage lr


def trl_python() -> Path:
    return TRL_VENV / "bin" / "python"


def setup_trl() -> None:
    """Create bench/.venv-trl (idempotent) with TRL and torch's CPU wheel."""
    if not trl_python().exists():
        base_python = getattr(sys, "_base_executable", sys.executable)  # not the project's venv
        subprocess.run([base_python, "-m", "venv", str(TRL_VENV)], check=True)
    subprocess.run([str(trl_python()), "-m", "pip", "install", "-q", *TRL_REQUIREMENTS], check=True)


# ---- the TRL side (runs in bench/.venv-trl) ------------------------------------------------
def trl_child(model_path: str, prompts_file: str, steps: int, warmup: int, work: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    rows = [json.loads(line) for line in Path(prompts_file).read_text().splitlines() if line.strip()]
    dataset = Dataset.from_list(rows)

    def contains_gold(completions, gold, **_):
        return [1.0 if any(g and g.lower() in c.lower() for g in golds) else 0.0
                for c, golds in zip(completions, gold)]

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.seconds: list[float] = []
            self._start = 0.0

        def on_step_begin(self, *_args, **_kwargs):
            self._start = time.perf_counter()

        def on_step_end(self, *_args, **_kwargs):
            self.seconds.append(time.perf_counter() - self._start)

    per_step = work["prompts_per_step"] * work["completions_per_prompt"]
    with tempfile.TemporaryDirectory(prefix="trl-") as out:
        config = GRPOConfig(
            output_dir=out, per_device_train_batch_size=per_step, gradient_accumulation_steps=1,
            num_generations=work["completions_per_prompt"], max_completion_length=work["sampled_tokens"],
            temperature=work["temperature"], beta=work["kl_coef"], learning_rate=LEARNING_RATE,
            max_steps=warmup + steps, use_vllm=False, use_cpu=True, bf16=False, fp16=False,
            # As ours: no activation checkpointing (TRL turns it on by default; it costs a second
            # forward pass in the backward) and a constant learning rate.
            gradient_checkpointing=False, lr_scheduler_type="constant",
            logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, seed=0,
            dataloader_num_workers=0)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        timer = StepTimer()
        trainer = GRPOTrainer(model=model, reward_funcs=contains_gold, args=config, train_dataset=dataset,
                              processing_class=tokenizer, callbacks=[timer])
        start = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - start
    timed = timer.seconds[warmup:]
    return {"completions_per_s": per_step * len(timed) / sum(timed), "step_s": statistics.median(timed),
            "train_wall_s": wall, "torch_threads": torch.get_num_threads(), "steps": len(timer.seconds),
            "use_vllm": False}


# ---- the driver (runs in the project's environment) ----------------------------------------
def write_prompts(preset: str, path: Path) -> str:
    """The world's training prompts rendered with the model's chat template, one JSON per line;
    returns the model folder."""
    from transformers import AutoTokenizer

    from personadual.prompts import render_prompt
    from personadual.tiny import build_tiny_model
    from personadual.world import PersonaWorld, WorldConfig

    model_path = build_tiny_model(preset)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    with path.open("w") as handle:
        for prompt in PersonaWorld(WorldConfig(seed=0)).train_prompts():
            handle.write(json.dumps({"prompt": render_prompt(tokenizer, prompt), "gold": list(prompt.gold)}) + "\n")
    return str(model_path)


def run_trl(model_path: str, prompts_file: Path, steps: int, warmup: int, work: dict, timeout_s: float) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update({"TOKENIZERS_PARALLELISM": "false", "WANDB_DISABLED": "true", "HF_HUB_OFFLINE": "1"})
    command = [str(trl_python()), __file__, "--trl-child", model_path, str(prompts_file), str(steps), str(warmup),
               json.dumps(work)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"TRL run failed ({done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setup", action="store_true", help="create bench/.venv-trl and exit")
    parser.add_argument("--presets", nargs="+", default=["small26m", "tiny"], choices=sorted(TARGETS))
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run (the run length)")
    parser.add_argument("--warmup", type=int, default=1, help="steps per run before timing starts")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved (ours, TRL) pairs per model")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds one run may take")
    parser.add_argument("--trl-child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trl_child:
        model_path, prompts_file, steps, warmup, work = args.trl_child
        print(json.dumps(trl_child(model_path, prompts_file, int(steps), int(warmup), json.loads(work))))
        return
    if args.setup:
        setup_trl()
        return
    if not trl_python().exists():
        sys.exit("bench/peer_trl.py: TRL's environment is missing: run `bench/peer_trl.py --setup` first")

    # Run as a script, bench/ comes first on sys.path and bench/rollout.py would shadow rollout/.
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
    sys.path.insert(0, str(ROOT))
    from bench.ours import (COMPLETIONS_PER_PROMPT, KL_COEF, PRESET_SIZES, PROMPTS_PER_STEP, SAMPLED_TOKENS,
                            TEMPERATURE, machine, run_ours)

    work = {"prompts_per_step": PROMPTS_PER_STEP, "completions_per_prompt": COMPLETIONS_PER_PROMPT,
            "sampled_tokens": SAMPLED_TOKENS, "temperature": TEMPERATURE, "kl_coef": KL_COEF}
    load_at_start = round(os.getloadavg()[0], 2)
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-peer-") as scratch:
        for preset in args.presets:
            prompts_file = Path(scratch) / f"{preset}.jsonl"
            model_path = write_prompts(preset, prompts_file)
            ours, trl = [], []
            for _ in range(args.rounds):
                ours.append(run_ours(preset, steps=args.steps, warmup=args.warmup, out_dir=Path(scratch),
                                     timeout_s=args.timeout).completions_per_s)
                trl.append(run_trl(model_path, prompts_file, args.steps, args.warmup, work, args.timeout))
                print(json.dumps({"model": preset, "ours": ours[-1], "trl": trl[-1]}), file=sys.stderr, flush=True)
            ours_rate = statistics.median(ours)
            trl_rate = statistics.median(t["completions_per_s"] for t in trl)
            results[preset] = {"parameters": PRESET_SIZES[preset],
                               "ours_completions_per_s": round(ours_rate, 2),
                               "trl_completions_per_s": round(trl_rate, 2),
                               "ours_over_trl": round(ours_rate / trl_rate, 3), "target": TARGETS[preset],
                               "meets": ours_rate / trl_rate >= TARGETS[preset],
                               "ours_rounds": [round(r, 2) for r in ours],
                               "trl_rounds": [round(t["completions_per_s"], 2) for t in trl],
                               "trl_torch_threads": trl[-1]["torch_threads"]}
    print(json.dumps({
        "benchmark": "completions/s against TRL GRPOTrainer at equal work, interleaved runs",
        "work": {**work, "precision": "fp32", "learner_processes": 1, "generators": 1, "lr": LEARNING_RATE,
                 "timed_steps": args.steps, "warmup_steps": args.warmup, "rounds": args.rounds,
                 "trl_generation": "transformers generate in the trainer process (use_vllm=False, TRL's default)",
                 "statistic": "median over rounds of completions over timed steps' wall time"},
        "machine": machine(load_at_start),
        "results": results,
    }, indent=1))


if __name__ == "__main__":
    main()
