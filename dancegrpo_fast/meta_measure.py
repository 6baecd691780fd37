"""Measuring a model that runs on the meta device: the FLOPs it computes, the bytes its tensors
hold, and running it as a CUDA GPU would.

- `StepMeter` (a TorchDispatchMode), for real or meta tensors alike:
  `flops`: the FLOPs of every op with a formula in torch.utils.flop_counter (the registry
  FlopCounterMode counts with: matmuls, convolutions, attention, forward and backward). Counted
  here rather than under FlopCounterMode because its module tracker's backward hooks keep tensors
  alive through the backward (37 GiB more still alive at the end of a full-size FLUX backward,
  measured), which would spoil the byte counts;
  `live` / `peak`: bytes of the tensors created inside the region that are alive now / were at
  most. A tensor counts from the op that allocates its storage to the moment the last tensor
  sharing that storage is freed (a weakref finalizer on the storage); views and in-place results
  add nothing. That is the caching allocator's "allocated" figure without its rounding and
  fragmentation.
- `gpu_like_meta(dtype)` (a TorchFunctionMode): on meta tensors, what differs on a GPU.
  1. bfloat16 autocast, emulated: meta tensors have no autocast dispatch key, so the casts CUDA
     autocast makes are made here, at the same functions (PyTorch's CUDA autocast op lists: matmul-
     like ops and convolutions in the low dtype; norms, softmax, reductions, pow/exp/log in
     float32), and with autocast's cache of the casts of leaf tensors that require grad (the
     weights) inside `forward_region()`, the span of the trainer's `with torch.autocast(...)`
     (the cache dies with it). The casts are ordinary ops above autograd, so the tensors
     autograd saves have the dtypes they have on the GPU.
  2. Fused attention: on meta, scaled_dot_product_attention picks the math path, which
     materialises the (L x S) attention matrix and saves it for backward; on a GPU the trainer gets
     flash attention (half precision, no mask) or memory-efficient attention (a mask, or float32),
     which save the output and the log-sum-exp only. The same aten ops are called here; both have
     meta kernels, autograd formulas and FLOP formulas (torch.utils.flop_counter).
  Tensors on other devices pass through untouched.
  The autograd engine does not carry Python function modes into the backward pass, where
  gradient checkpointing recomputes its blocks; `gpu_like_checkpoint(autocast_dtype)` is
  diffusers' default checkpoint function (non-reentrant torch.utils.checkpoint) whose
  recomputation runs under a fresh gpu_like_meta region, as torch.utils.checkpoint re-enters
  autocast for it on a GPU.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Optional

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.flop_counter import flop_registry


def _tensors(values):
    """The tensors among values and inside their lists and tuples (aten ops nest no deeper)."""
    for value in values:
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (list, tuple)):
            yield from (v for v in value if isinstance(v, torch.Tensor))


class StepMeter(TorchDispatchMode):
    """FLOPs of the ops run inside the region (`flops`) and bytes of the tensors they allocated:
    alive now (`live`), at most (`peak`). See the module docstring."""

    def __init__(self):
        super().__init__()
        self.flops = 0
        self.live = 0
        self.peak = 0
        self._tracked = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.flops += int(formula(*args, **kwargs, out_val=out))
        inputs = {id(t.untyped_storage()) for t in _tensors((*args, *kwargs.values()))}
        for t in _tensors(out if isinstance(out, (tuple, list)) else (out,)):
            storage = t.untyped_storage()
            key = id(storage)
            # An output sharing an input's storage is a view or an in-place result: no new bytes.
            if key in inputs or key in self._tracked:
                continue
            size = storage.nbytes()
            self._tracked.add(key)
            self.live += size
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._release, key, size)
        return out

    def _release(self, key: int, size: int) -> None:
        self._tracked.discard(key)
        self.live -= size


# PyTorch's CUDA autocast lists (docs: "CUDA Ops that can autocast to float16 / float32"), by the
# names the functions and Tensor methods have in Python.
LOW_PRECISION_OPS = frozenset({
    "__matmul__", "__rmatmul__", "addbmm", "addmm", "addmv", "addr", "baddbmm", "bmm", "chain_matmul", "multi_dot",
    "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "linear", "matmul",
    "mm", "mv", "prelu", "scaled_dot_product_attention"})
FLOAT32_OPS = frozenset({
    "__pow__", "__rdiv__", "__rpow__", "__rtruediv__", "acos", "asin", "binary_cross_entropy_with_logits", "cosh",
    "cosine_embedding_loss", "cdist", "cosine_similarity", "cross_entropy", "cumprod", "cumsum", "dist", "erfinv",
    "exp", "expm1", "group_norm", "hinge_embedding_loss", "kl_div", "l1_loss", "layer_norm", "log", "log_softmax",
    "log10", "log1p", "log2", "margin_ranking_loss", "mse_loss", "multilabel_margin_loss", "multi_margin_loss",
    "nll_loss", "norm", "normalize", "pdist", "poisson_nll_loss", "pow", "prod", "reciprocal", "rsqrt", "sinh",
    "smooth_l1_loss", "soft_margin_loss", "softmax", "softmin", "softplus", "sum", "renorm", "tan",
    "triplet_margin_loss"})
HALF_DTYPES = (torch.float16, torch.bfloat16)


def _is_meta_float(t) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type == "meta" and t.is_floating_point()


class _GpuLikeMeta(TorchFunctionMode):
    def __init__(self, autocast_dtype: Optional[torch.dtype]):
        super().__init__()
        self.autocast_dtype = autocast_dtype
        self._cache = None  # a dict inside forward_region()

    @contextlib.contextmanager
    def forward_region(self):
        """The span of one autocast region: casts of weights are made once and kept until it ends."""
        self._cache = {}
        try:
            yield self
        finally:
            self._cache = None

    def _cast(self, t, dtype):
        if not _is_meta_float(t) or t.dtype == dtype or t.dtype == torch.float64:
            return t
        if self._cache is not None and dtype == self.autocast_dtype and t.is_leaf and t.requires_grad:
            # autocast's weight cache: one cast per weight for the whole region.
            key = id(t)
            cached = self._cache.get(key)
            if cached is None or cached[0]() is not t:
                cached = (weakref.ref(t), t.to(dtype))
                self._cache[key] = cached
            return cached[1]
        return t.to(dtype)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if self.autocast_dtype is not None:
            if name in LOW_PRECISION_OPS:
                args, kwargs = tree_map(lambda t: self._cast(t, self.autocast_dtype), (args, kwargs))
            elif name in FLOAT32_OPS and any(_is_meta_float(t) and t.dtype in HALF_DTYPES
                                             for t in tree_flatten((args, kwargs))[0]):
                args, kwargs = tree_map(lambda t: self._cast(t, torch.float32), (args, kwargs))
        if name == "scaled_dot_product_attention":
            fused = _fused_attention(*args, **kwargs)
            if fused is not None:
                return fused
        return func(*args, **kwargs)


def _fused_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                     enable_gqa=False):
    """The fused SDPA kernel a GPU runs for these meta inputs, or None to leave the call as it is
    (not meta, not (B, H, L, E), or grouped-query heads, which the fused kernels do not take)."""
    if not all(_is_meta_float(t) and t.dim() == 4 for t in (query, key, value)):
        return None
    if enable_gqa or query.shape[1] != key.shape[1]:
        return None
    if attn_mask is None and query.dtype in HALF_DTYPES and query.shape[-1] <= 256:
        return torch.ops.aten._scaled_dot_product_flash_attention(
            query, key, value, dropout_p, is_causal, return_debug_mask=False, scale=scale)[0]
    bias = None
    if attn_mask is not None:
        # The efficient kernel takes an additive bias in the query's dtype (SDPA converts a bool mask).
        bias = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device)
    compute_log_sumexp = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    return torch.ops.aten._scaled_dot_product_efficient_attention(
        query, key, value, bias, compute_log_sumexp, dropout_p, is_causal, scale=scale)[0]


def gpu_like_meta(autocast_dtype: Optional[torch.dtype] = torch.bfloat16) -> TorchFunctionMode:
    """Context: meta tensors computed as on a CUDA GPU (see the module docstring); autocast_dtype
    None runs without autocast (mixed_precision "no") and only routes attention. The context
    value has `forward_region()` for the autocast region's weight-cast cache."""
    return _GpuLikeMeta(autocast_dtype)


@contextlib.contextmanager
def _recompute_region(autocast_dtype):
    with gpu_like_meta(autocast_dtype) as mode, mode.forward_region():
        yield


def gpu_like_checkpoint(autocast_dtype: Optional[torch.dtype]):
    """A gradient_checkpointing_func for diffusers' enable_gradient_checkpointing: the default one
    (torch.utils.checkpoint, use_reentrant=False) with the recomputation under gpu_like_meta."""
    from torch.utils.checkpoint import checkpoint

    def context_fn():
        return contextlib.nullcontext(), _recompute_region(autocast_dtype)

    def checkpointed(module, *args):
        return checkpoint(module.__call__, *args, use_reentrant=False, context_fn=context_fn)

    return checkpointed


__all__ = ["StepMeter", "gpu_like_meta", "gpu_like_checkpoint", "LOW_PRECISION_OPS", "FLOAT32_OPS"]
