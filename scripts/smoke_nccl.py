"""The GPU smoke's NCCL probe: whether two NCCL ranks can share one GPU on this box (the
weight broadcast's NCCL path needs a learner rank and an engine to do so when colocated)."""

from __future__ import annotations

import datetime
import multiprocessing as mp
import time
from typing import Any

import torch
import torch.distributed as dist


def _nccl_rank(rank: int, port: int, results: Any) -> None:
    try:
        torch.cuda.set_device(0)
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                                timeout=datetime.timedelta(seconds=60))
        value = torch.ones(1, device="cuda")
        dist.all_reduce(value)
        torch.cuda.synchronize()
        results.put((rank, "ok", float(value.item())))
        dist.destroy_process_group()
    except BaseException as error:  # noqa: BLE001 - the outcome is what this probe reports
        results.put((rank, "error", f"{type(error).__name__}: {error}"[:300]))


def nccl_probe(timeout_s: float) -> dict[str, Any]:
    """Two NCCL ranks on one GPU all-reduce a one: the outcome of each, or that they hung."""
    from learner.distributed import free_port

    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    start = time.perf_counter()
    workers = [context.Process(target=_nccl_rank, args=(rank, port, results), daemon=True) for rank in range(2)]
    for worker in workers:
        worker.start()
    outcomes = []
    deadline = time.monotonic() + timeout_s
    while len(outcomes) < 2 and time.monotonic() < deadline:
        try:
            outcomes.append(results.get(timeout=max(0.1, deadline - time.monotonic())))
        except Exception:  # noqa: BLE001 - queue.Empty: the deadline passed
            break
    for worker in workers:
        worker.join(5)
        if worker.is_alive():
            worker.kill()
    return {"seconds": round(time.perf_counter() - start, 2),
            "outcomes": sorted(outcomes) or "no answer (hung) within the timeout"}
