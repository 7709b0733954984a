"""Build the model already partitioned under ZeRO-3 (``deepspeed.zero.Init``), with the DDP build's weights.

Why: without it every process builds the whole model (fp32: 4 bytes per parameter on the host, then on
its GPU) and DeepSpeed partitions it only in ``deepspeed.initialize``; under ZeRO-3 each process keeps
1/N of the weights, so the start-up peak was the one moment that needed the full model N times per node.
Under :func:`zero3_build` each module's parameters are partitioned as soon as the module is constructed.

Two ways in, one per kind of start:

* **from scratch** (a ``--model.preset``): the model class is constructed inside ``zero.Init``; HF's weight
  initialisation (``PreTrainedModel.initialize_weights``, which every sub-model's ``post_init`` calls)
  is replaced, for the construction only, by :func:`_gathered_initialize_weights`: module by module, in
  HF's own order (children first), the module's parameters are gathered, rank 0 initialises them on the
  host and ``GatheredParameters(modifier_rank=0)`` broadcasts them as they are partitioned again.
  Tensors are created on the host (``zero.Init`` without its device override) so that the construction-
  time initialisers of ``nn.Linear``/``nn.Embedding`` draw from the CPU generator exactly as the plain
  build does.  Rank 0 thus draws the same numbers in the same order as a plain build with the same seed:
  the partitioned model holds, gathered, the plain build's weights, bit for bit (DDP parity).
* **continual** (``--model.init_from``): transformers' own ZeRO-3 path (``HfDeepSpeedConfig``):
  ``from_pretrained`` constructs under ``zero.Init``, rank 0 reads the checkpoint and each layer's
  tensors are broadcast as it is loaded; missing tensors (a fresh MLM head) are initialised gathered.

Freed host memory is handed back to the OS as the build goes (:func:`release_free_memory`).
Not for ZeRO stages 0-2 (they keep full weights on every rank): :func:`build_context` is a no-op there.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
from typing import Any, Iterator

import torch
from torch import nn


def is_partitioned(model: nn.Module) -> bool:
    """True when ``model``'s parameters are ZeRO-3 parameters (built under ``zero.Init``)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


@contextlib.contextmanager
def _on_host(params: list[torch.Tensor]) -> Iterator[None]:
    """Swap each (gathered) parameter's data for a host copy and back: initialisers then draw from the CPU
    generator, as the plain build's do, whatever the accelerator.  A no-op copy on a CPU accelerator."""
    kept = [p.data for p in params]
    for p in params:
        p.data = p.data.to("cpu")
    try:
        yield
    finally:
        for p, d in zip(params, kept):
            if p.data is not d:
                d.copy_(p.data)
                p.data = d


def _gathered_initialize_weights(self) -> None:
    """``PreTrainedModel.initialize_weights`` over ZeRO-3 partitioned parameters (see the module docstring).

    Same traversal as HF's ``smart_apply`` (children first; a nested PreTrainedModel dispatches its own
    ``_initialize_weights``), so rank 0 draws in the plain build's order; modules already initialised are
    skipped without a gather, exactly as ``_initialize_weights`` skips them."""
    import deepspeed
    from transformers import PreTrainedModel
    from transformers.initialization import guard_torch_init_functions

    rank0 = torch.distributed.get_rank() == 0
    custom = self.is_custom_code()

    def visit(module: nn.Module, fn) -> None:
        for child in module.children():
            visit(child, child._initialize_weights if isinstance(child, PreTrainedModel) else fn)
        if getattr(module, "_is_hf_initialized", False):
            return  # _initialize_weights would return at once
        # _init_weights may also write the direct children's parameters (e.g. a head's decoder bias)
        params = [*module.parameters(recurse=False),
                  *(p for c in module.children() for p in c.parameters(recurse=False))]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            with _on_host(params if rank0 else []):
                if rank0 or not any(hasattr(p, "ds_id") for p in params):
                    fn(module, custom)  # a module without partitioned tensors initialises everywhere
                else:
                    module._is_hf_initialized = True
        release_free_memory()

    with torch.no_grad(), guard_torch_init_functions():
        visit(self, self._initialize_weights)


def release_free_memory() -> None:
    """Hand the host memory of freed tensors back to the OS (glibc ``malloc_trim``; elsewhere a no-op).

    Building under ``zero.Init`` allocates and frees whole tensors module by module (construction, then the
    gathered initialisation); glibc keeps such freed blocks in its heap once its mmap threshold has grown,
    so without a trim the process's resident memory would grow by up to a model's size that it no longer
    uses - the very memory the partitioned build is meant to save."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC: Any = None  # the C library once looked up; False where it has no malloc_trim


@contextlib.contextmanager
def zero3_scratch(ds_config: dict[str, Any]) -> Iterator[None]:
    """Construct HF models partitioned, initialised as a plain build would be (call ``torch.manual_seed``
    first, as for the plain build).  Every process must enter it (construction is collective)."""
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import DeepSpeedTensorOverride
    from transformers import PreTrainedModel

    original = PreTrainedModel.initialize_weights
    PreTrainedModel.initialize_weights = _gathered_initialize_weights
    try:
        # no device override: construction-time initialisers draw on the host, like the plain build's
        with deepspeed.zero.Init(config_dict_or_path=ds_config, tensor_overrides=[DeepSpeedTensorOverride.dtype]):
            yield
    finally:
        PreTrainedModel.initialize_weights = original
        release_free_memory()


@contextlib.contextmanager
def zero3_loading(ds_config: dict[str, Any]) -> Iterator[None]:
    """Make transformers' ``from_pretrained`` construct under ``zero.Init`` and load rank 0's tensors."""
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    keep = HfDeepSpeedConfig(ds_config)  # transformers holds it by a weak reference: keep it alive here
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del keep
        release_free_memory()  # rank 0 read the whole checkpoint onto the host


def build_context(ds_config: dict[str, Any] | None, *, continual: bool):
    """The context to build the run's model in: ZeRO-3 partitioned (scratch or continual) or a no-op."""
    if ds_config is None or ds_config["zero_optimization"]["stage"] != 3:
        return contextlib.nullcontext()
    return zero3_loading(ds_config) if continual else zero3_scratch(ds_config)


def sync_buffers(model: nn.Module) -> None:
    """Broadcast rank 0's buffers (ZeRO-3 leaves buffers whole; only rank 0 ran the initialisers)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return
    for b in model.buffers():
        if b is not None and b.numel():
            torch.distributed.broadcast(b.data, src=0)
