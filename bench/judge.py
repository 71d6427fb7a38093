"""Judge throughput: judged responses per second against the local test judge server with
200 ms injected latency, at concurrency 1, 8 and 64, beside the ideal (concurrency / latency).

The server runs in its own process (tests/judge_server.py), so its event loop does not
share this process's GIL with the client being measured. Cache off: every response is paid.

    python bench/judge.py [--latency 0.2] [--concurrency 1 8 64] [--min-requests 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests/ is not an installed package

from rewards.config import JudgeConfig  # noqa: E402
from rewards.judge import ApiKey, JudgeClient  # noqa: E402
from tests.judge_server import make_prompt, start_subprocess  # noqa: E402


def measure(base_url: str, concurrency: int, requests: int, latency_s: float, round_index: int) -> dict[str, float]:
    config = JudgeConfig(base_url=base_url, model="judge-test", api_key_env="", max_concurrency=concurrency,
                         cache=False, timeout_s=30.0, max_retries=0)
    client = JudgeClient(config, api_key=ApiKey("EMPTY"))
    items = [(make_prompt(i, scorer="judge"), f"round {round_index} response {i}. Answer: teal")
             for i in range(requests)]
    start = time.perf_counter()
    judgements, counts = asyncio.run(client.judge_many(items))
    seconds = time.perf_counter() - start
    failures = sum(j.verdict is None for j in judgements)
    per_second = requests / seconds
    ideal = concurrency / latency_s
    return {"concurrency": concurrency, "requests": requests, "seconds": round(seconds, 3),
            "judged_per_s": round(per_second, 2), "ideal_per_s": round(ideal, 2),
            "ratio_to_ideal": round(per_second / ideal, 3), "failures": failures,
            "http_requests": counts["judge/requests"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=0.2, help="server delay per request, seconds")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--min-requests", type=int, default=64,
                        help="requests per level: max(this, 4 x concurrency)")
    args = parser.parse_args()
    server, base_url = start_subprocess(args.latency)
    try:
        measure(base_url, 8, 16, args.latency, -1)  # warm-up: imports, first connections
        results = [measure(base_url, c, max(args.min_requests, 4 * c), args.latency, i)
                   for i, c in enumerate(args.concurrency)]
    finally:
        assert server.stdin is not None
        server.stdin.close()
        server.wait(timeout=30)
    print(json.dumps({"bench": "judge", "latency_s": args.latency, "server": "tests/judge_server.py (own process)",
                      "results": results}, indent=2))


if __name__ == "__main__":
    main()
