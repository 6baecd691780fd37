"""One attention backend for every attention layer of a policy's model.

diffusers' attention dispatcher (`dispatch_attention_fn`) runs attention on a named backend
(PyTorch SDPA `native`, flash-attn `flash`, FA3 `_flash_3`, xformers, ...). The DiT processors of
FLUX, Wan and HunyuanVideo route through it and take the backend `model.set_attention_backend`
sets; the older `AttnProcessor2_0` (SD 1.x's UNet, HunyuanVideo's token refiner) and
`JointAttnProcessor2_0` (SD3) call `F.scaled_dot_product_attention` themselves and silently ignore
it. `use_dispatching_processors` swaps those two for the processors below: the same math,
line for line, with the SDPA call replaced by the dispatcher, so that `set_backend` can give
every layer the backend and then check that every layer took it.

`auto` resolves per device: on CUDA, FA3 (`_flash_3`) on Hopper when flash_attn_interface is
installed, else flash-attn 2 (`flash`) when installed, else PyTorch SDPA (`native`); on any other
device `native`. Models that pass attention masks (HunyuanVideo pads its text tokens) get the
varlen flash variants, which take key-padding masks (the plain ones refuse any mask).
Hub-kernel backends (`flash_hub`, `_flash_3_hub`, ...) download a kernel, so only an explicit
setting picks them.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

AUTO = "auto"


class AttentionBackendError(RuntimeError):
    """The attention backend cannot be used here, or some attention layer did not take it."""


# --- which backend -------------------------------------------------------------------------------
def flash_attn_2_usable() -> bool:
    """flash-attn installed in a version diffusers' `flash` backend accepts."""
    from diffusers.utils import is_flash_attn_available, is_flash_attn_version

    return bool(is_flash_attn_available() and is_flash_attn_version(">=", "2.6.3"))


def flash_attn_3_usable() -> bool:
    """FlashAttention 3 (the `flash_attn_interface` module of its Hopper build) installed."""
    from diffusers.utils import is_flash_attn_3_available

    return bool(is_flash_attn_3_available())


def resolve_backend(name: str, device, masked: bool = False) -> str:
    """The diffusers backend name for the setting `name` on `device`. Only `auto` is resolved;
    masked: the model passes attention masks (then the flash choices are the varlen ones)."""
    if name != AUTO:
        return name
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return "native"
    index = device.index if device.index is not None else torch.cuda.current_device()
    if torch.cuda.get_device_capability(index)[0] == 9 and flash_attn_3_usable():
        return "_flash_varlen_3" if masked else "_flash_3"
    if flash_attn_2_usable():
        return "flash_varlen" if masked else "flash"
    return "native"


# --- dispatching processors ------------------------------------------------------------------
def _autocast_dtype(query: Tensor) -> Optional[torch.dtype]:
    """The dtype SDPA would run in under autocast: it is on autocast's lower-precision list, so
    the original processors' q, k, v (e.g. fp32 after an fp32 RMSNorm) are cast there. Backends
    such as flash-attn are not autocast ops and need the cast done for them."""
    device_type = query.device.type
    if device_type in ("cuda", "cpu", "xpu") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _dispatch(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor], backend) -> Tensor:
    """Attention of (B, S, H, D) q/k/v through diffusers' dispatcher -> (B, S, H, D)."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    dtype = _autocast_dtype(query)
    if dtype is not None:
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    return dispatch_attention_fn(query, key, value, attn_mask=attn_mask, dropout_p=0.0, is_causal=False,
                                 backend=backend)


class DispatchAttnProcessor:
    """diffusers' `AttnProcessor2_0` with its attention through `dispatch_attention_fn`.

    Same math: spatial norm, group norm, cross-attention norm, q/k norms, default 1/sqrt(d)
    scale (AttnProcessor2_0 ignores attn.scale too), output projection, residual and rescale."""

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Optional[Tensor] = None,
                 attention_mask: Optional[Tensor] = None, temb: Optional[Tensor] = None, *args, **kwargs) -> Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            # (B * heads, Lq or 1, Lk) -> (B, heads, Lq or 1, Lk), as SDPA takes it
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        query, key, value, head_dim = _heads(attn, query, attn.to_k(encoder_hidden_states),
                                             attn.to_v(encoder_hidden_states))

        out_dtype = query.dtype
        hidden_states = _dispatch(query, key, value, attention_mask, self._attention_backend)
        hidden_states = hidden_states.reshape(batch_size, -1, attn.heads * head_dim).to(out_dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _heads(attn, query: Tensor, key: Tensor, value: Tensor):
    """(B, S, heads * D) projections -> the dispatcher's (B, S, heads, D) layout, with the layer's
    q/k norms (they act on D alone); returns (query, key, value, D)."""
    batch_size = query.shape[0]
    head_dim = key.shape[-1] // attn.heads
    query = query.view(batch_size, -1, attn.heads, head_dim)
    key = key.view(batch_size, -1, attn.heads, head_dim)
    value = value.view(batch_size, -1, attn.heads, head_dim)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return query, key, value, head_dim


class DispatchJointAttnProcessor:
    """diffusers' `JointAttnProcessor2_0` (SD3's joint image + text attention, and its dual
    image-only attention) with its attention through `dispatch_attention_fn`. Same math."""

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Optional[Tensor] = None,
                 attention_mask: Optional[Tensor] = None, *args, **kwargs):
        residual = hidden_states
        batch_size = hidden_states.shape[0]
        query, key, value, head_dim = _heads(attn, attn.to_q(hidden_states), attn.to_k(hidden_states),
                                             attn.to_v(hidden_states))

        if encoder_hidden_states is not None:
            context_query = attn.add_q_proj(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim)
            context_key = attn.add_k_proj(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim)
            context_value = attn.add_v_proj(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim)
            if attn.norm_added_q is not None:
                context_query = attn.norm_added_q(context_query)
            if attn.norm_added_k is not None:
                context_key = attn.norm_added_k(context_key)
            # Image tokens first, then text tokens, along the sequence.
            query = torch.cat([query, context_query], dim=1)
            key = torch.cat([key, context_key], dim=1)
            value = torch.cat([value, context_value], dim=1)

        out_dtype = query.dtype
        hidden_states = _dispatch(query, key, value, None, self._attention_backend)
        hidden_states = hidden_states.reshape(batch_size, -1, attn.heads * head_dim).to(out_dtype)
        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = (hidden_states[:, :residual.shape[1]],
                                                    hidden_states[:, residual.shape[1]:])
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


def _replacements() -> Dict[type, type]:
    from diffusers.models.attention_processor import AttnProcessor2_0, JointAttnProcessor2_0

    return {AttnProcessor2_0: DispatchAttnProcessor, JointAttnProcessor2_0: DispatchJointAttnProcessor}


# --- layers, setting, checking --------------------------------------------------------------
def attention_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(name, module) of every attention layer of `model`: the modules diffusers'
    set_attention_backend walks (Attention, MochiAttention, AttentionModuleMixin)."""
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention, MochiAttention

    classes = (Attention, MochiAttention, AttentionModuleMixin)
    return [(name, module) for name, module in model.named_modules() if isinstance(module, classes)]


def use_dispatching_processors(model: nn.Module) -> int:
    """Swap every AttnProcessor2_0 / JointAttnProcessor2_0 of `model` (exact classes: a subclass
    may compute something else) for its dispatching twin. Returns how many were swapped."""
    replacements = _replacements()
    swapped = 0
    for _, module in attention_layers(model):
        new = replacements.get(type(module.processor))
        if new is not None:
            module.set_processor(new())
            swapped += 1
    return swapped


@dataclass
class AttentionReport:
    """Which backend the attention layers of one model run on."""

    backend: str
    total: int
    using: int
    others: Dict[str, int] = field(default_factory=dict)  # "<processor class>: <its backend>" -> layers

    @property
    def complete(self) -> bool:
        return self.total > 0 and self.using == self.total

    def __str__(self) -> str:
        return f"{self.backend} ({self.using}/{self.total} layers)"


def _backend_of(processor) -> Optional[str]:
    backend = getattr(processor, "_attention_backend", None)
    return getattr(backend, "value", backend)


def attention_report(model: nn.Module, backend: str) -> AttentionReport:
    """How many of `model`'s attention layers have `backend` set on their processor."""
    layers = attention_layers(model)
    using = 0
    others: Counter = Counter()
    for _, module in layers:
        found = _backend_of(module.processor)
        if found == backend:
            using += 1
        else:
            kind = "does not dispatch" if not hasattr(module.processor, "_attention_backend") else f"backend {found}"
            others[f"{type(module.processor).__name__} ({kind})"] += 1
    return AttentionReport(backend, len(layers), using, dict(others))


def set_backend(model: nn.Module, backend: str, what: str = "model") -> AttentionReport:
    """Give every attention layer of `model` the diffusers backend `backend` (already resolved
    from auto) and check that all of them took it. Raises AttentionBackendError, one line naming
    the setting, when the backend cannot run here or some layer did not take it."""
    import logging

    use_dispatching_processors(model)
    # set_attention_backend warns on every call that the dispatcher is experimental.
    diffusers_logger = logging.getLogger("diffusers.models.modeling_utils")
    level = diffusers_logger.level
    diffusers_logger.setLevel(logging.ERROR)
    try:
        model.set_attention_backend(backend)
    except Exception as error:
        message = " ".join(str(error).split())
        raise AttentionBackendError(
            f"attention_backend {backend!r} is not usable here: {message}; use attention_backend=native "
            f"(PyTorch SDPA) or auto, or install what it needs (pip install 'dancegrpo_fast[flash]' for flash, "
            f"'dancegrpo_fast[xformers]' for xformers)") from error
    finally:
        diffusers_logger.setLevel(level)
    report = attention_report(model, backend)
    if not report.complete:
        missing = ", ".join(f"{n} x {kind}" for kind, n in sorted(report.others.items()))
        raise AttentionBackendError(
            f"attention_backend {backend!r}: only {report.using} of {report.total} attention layers of the {what} "
            f"({type(model).__name__}) took it; the others: {missing or 'none found'}")
    return report


__all__ = ["AUTO", "AttentionBackendError", "AttentionReport", "DispatchAttnProcessor", "DispatchJointAttnProcessor",
           "attention_layers", "attention_report", "resolve_backend", "set_backend", "use_dispatching_processors"]
