"""Data preparation throughput: ``prepare data`` on configs/recipe_tiny.yaml against a local
OpenAI-protocol server, with an empty cache at each teacher concurrency and then once more
with every call cached. Prints one JSON line per measurement: teacher rows per second, the
share of the wall time spent waiting on the endpoint (batches with calls outstanding), and
the same for the whole preparation.

    python bench/prepare.py [--server scripted|vllm] [--latency 0.2] [--concurrency 1 8]

``scripted``: tests/judge_server.py in its own process, every reply after ``--latency``
seconds (a stand-in for a remote API). ``vllm``: ``vllm.entrypoints.openai.api_server`` over
``--model`` on CPU, by default the tiny teacher of ``python -m personadual.prepare tiny-models``
(real generation of the replies it was trained to give).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests/ is not an installed package

from personadual.prepare.__main__ import teacher_scorer  # noqa: E402
from personadual.prepare.data import prepare_data  # noqa: E402
from personadual.prepare.recipe import load_recipe  # noqa: E402
from tests.judge_server import start_subprocess  # noqa: E402

KEY_ENV = "PERSONADUAL_TEACHER_KEY"


def start_scripted(latency_s: float) -> tuple[subprocess.Popen, str, str]:
    process, base_url = start_subprocess(latency_s)
    return process, base_url, "scripted"


def start_vllm(model: Path) -> tuple[subprocess.Popen, str, str]:
    if not (model / "config.json").is_file():
        raise SystemExit(f"--model: {model} is not a model folder "
                         f"(python -m personadual.prepare tiny-models --out models writes models/tiny_teacher)")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_HOST_IP": "127.0.0.1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
         "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "teacher", "--max-model-len", "1024",
         "--dtype", "float32", "--seed", "0", "--enforce-eager"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, stdin=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return process, f"http://127.0.0.1:{port}/v1", "vllm"
        except OSError:
            if process.poll() is not None:
                break
            time.sleep(1)
    process.kill()
    raise RuntimeError("vllm api_server did not become healthy")


def measure(base_url: str, concurrency: int, out: Path, label: str) -> dict[str, float | str | int]:
    recipe = load_recipe(ROOT / "configs" / "recipe_tiny.yaml", [
        f"out_dir={out}", f"teacher.base_url={base_url}", f"persona_writer.base_url={base_url}",
        f"reward.judge.base_url={base_url}", "teacher.model=teacher", "persona_writer.model=teacher",
        "reward.judge.model=teacher", "teacher.max_tokens=48", f"teacher.concurrency={concurrency}",
        f"persona_writer.concurrency={concurrency}"])
    judge = {**recipe.reward["judge"], "max_concurrency": concurrency}
    recipe = replace(recipe, reward={**recipe.reward, "judge": judge})
    start = time.perf_counter()
    manifests = prepare_data(recipe, teacher_scorer(recipe.reward, recipe.cache), progress=False)
    seconds = time.perf_counter() - start
    teacher = manifests["teacher"]["endpoint"]["teacher"]
    return {"bench": "prepare", "run": label, "concurrency": concurrency, "teacher_rows": manifests["teacher"]["rows"],
            "teacher_requests": teacher["requests"], "cache_hits": teacher["cache_hits"],
            "seconds": round(seconds, 3), "teacher_rows_per_s": round(manifests["teacher"]["rows"] / seconds, 2),
            "teacher_wait_share": round(teacher["wall_s"] / seconds, 3),
            "rows_written": sum(m["rows"] for m in manifests.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", choices=("scripted", "vllm"), default="scripted")
    parser.add_argument("--latency", type=float, default=0.2, help="scripted server: seconds per reply")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "tiny_teacher", help="vllm: the model served")
    args = parser.parse_args()
    os.environ.setdefault(KEY_ENV, "EMPTY")
    process, base_url, kind = start_scripted(args.latency) if args.server == "scripted" else start_vllm(args.model)
    try:
        with tempfile.TemporaryDirectory() as scratch:
            for concurrency in args.concurrency:
                out = Path(scratch) / f"c{concurrency}"
                print(json.dumps({"server": kind, **measure(base_url, concurrency, out, "empty cache")}), flush=True)
            cached = measure(base_url, args.concurrency[-1], out, "all cached")
            print(json.dumps({"server": kind, **cached}), flush=True)
    finally:
        if process.stdin is not None:
            process.stdin.close()
        process.terminate()
        process.wait(timeout=60)


if __name__ == "__main__":
    main()
