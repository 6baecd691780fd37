"""One attention backend for every attention layer (dancegrpo_fast/policies/attention.py).

- Our dispatching processors equal diffusers' AttnProcessor2_0 / JointAttnProcessor2_0 on random
  float64 inputs, output and gradients (inputs and weights), with masks, norms, residuals.
- Each of the five families' tiny checkpoints, loaded by its policy with a backend that runs on
  the CPU: every attention layer reports the backend, and the model's output and parameter
  gradients equal the original processors' on PyTorch SDPA.
- auto's choice per device; a bad name is a one-line config error; a backend that cannot run
  here, or a layer that cannot take it, is a one-line error naming attention_backend.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from helpers.fixtures import _single_thread  # noqa: E402,F401  (fixtures)
from helpers.tiny_models import BUILDERS  # noqa: E402

from dancegrpo_fast.config import ATTENTION_BACKENDS, ModelConfig, SamplerConfig, TrainConfig  # noqa: E402
from dancegrpo_fast.policies import attention as attn_mod  # noqa: E402
from dancegrpo_fast.policies import build_policy  # noqa: E402
from dancegrpo_fast.policies.attention import (AttentionBackendError, DispatchAttnProcessor,  # noqa: E402
                                               DispatchJointAttnProcessor, resolve_backend, set_backend)

CPU_BACKENDS = ["native", "_native_math"]


@pytest.fixture(autouse=True)
def _restore_active_backend():
    """set_attention_backend also sets diffusers' process-wide active backend: put it back."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    before = _AttentionBackendRegistry._active_backend
    yield
    _AttentionBackendRegistry.set_active_backend(before)


# --- the processors against diffusers' originals ----------------------------------------------
def _grads(module, inputs, outputs, weights):
    loss = sum((o * w).sum() for o, w in zip(outputs, weights))
    params = [p for p in module.parameters()]
    return torch.autograd.grad(loss, [x for x in inputs if x.requires_grad] + params, allow_unused=True)


def _compare(module, original, ours, args_fn):
    """Forward + gradients of `module` under the original processor and ours, float64."""
    results = []
    for processor in (original, ours):
        module.set_processor(processor)
        torch.manual_seed(11)
        inputs, kwargs = args_fn()
        out = module(*inputs, **kwargs)
        outs = out if isinstance(out, tuple) else (out,)
        torch.manual_seed(12)
        weights = [torch.randn_like(o) for o in outs]
        results.append((outs, _grads(module, inputs, outs, weights)))
    (out_a, grad_a), (out_b, grad_b) = results
    assert len(out_a) == len(out_b)
    for a, b in zip(out_a, out_b):
        assert a.shape == b.shape
        assert a.abs().max() > 1e-3  # a real output, not an empty comparison
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    for a, b in zip(grad_a, grad_b):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", ["self_4d_group_norm_residual", "cross_norm_cross_additive_mask",
                                  "self_bool_mask_rms_qk"])
def test_dispatch_attn_processor_equals_attn_processor_2_0(backend, case):
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    if case == "self_4d_group_norm_residual":  # a VAE mid-block attention: (B, C, H, W) in
        module = Attention(query_dim=8, heads=2, dim_head=4, norm_num_groups=4, residual_connection=True,
                           rescale_output_factor=2.0, bias=True, upcast_softmax=True, _from_deprecated_attn_block=True)

        def args():
            return (torch.randn(2, 8, 3, 5, dtype=torch.float64, requires_grad=True),), {}
    elif case == "cross_norm_cross_additive_mask":  # a UNet cross-attention with a text-padding bias
        module = Attention(query_dim=8, cross_attention_dim=6, heads=2, dim_head=4, cross_attention_norm="layer_norm")

        def args():
            hidden = torch.randn(2, 7, 8, dtype=torch.float64, requires_grad=True)
            context = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
            keep = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
            bias = torch.zeros(2, 1, 5, dtype=torch.float64).masked_fill(~keep[:, None], -10000.0)
            return (hidden, context), {"attention_mask": bias}
    else:  # HunyuanVideo's token refiner: a (B, 1, S, S) bool mask
        module = Attention(query_dim=8, heads=2, dim_head=4, bias=True, qk_norm="rms_norm")

        def args():
            hidden = torch.randn(2, 6, 8, dtype=torch.float64, requires_grad=True)
            keep = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
            mask = (keep[:, None, None, :] & keep[:, None, :, None]).clone()
            mask[:, :, :, 0] = True
            return (hidden,), {"attention_mask": mask}
    module = module.double()
    for p in module.parameters():  # away from the identity-like initialisation of the norms
        p.data.add_(0.1 * torch.randn_like(p))
    ours = DispatchAttnProcessor()
    ours._attention_backend = backend
    _compare(module, AttnProcessor2_0(), ours, args)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", ["joint", "joint_context_pre_only", "image_only"])
def test_dispatch_joint_processor_equals_joint_attn_processor_2_0(backend, case):
    from diffusers.models.attention_processor import Attention, JointAttnProcessor2_0

    joint = case != "image_only"
    module = Attention(query_dim=16, cross_attention_dim=None, added_kv_proj_dim=16 if joint else None, dim_head=8,
                       heads=2, out_dim=16, context_pre_only=case == "joint_context_pre_only", bias=True,
                       qk_norm="rms_norm", eps=1e-6).double()
    for p in module.parameters():
        p.data.add_(0.1 * torch.randn_like(p))

    def args():
        hidden = torch.randn(2, 9, 16, dtype=torch.float64, requires_grad=True)
        if not joint:
            return (hidden,), {}
        return (hidden, torch.randn(2, 4, 16, dtype=torch.float64, requires_grad=True)), {}
    ours = DispatchJointAttnProcessor()
    ours._attention_backend = backend
    _compare(module, JointAttnProcessor2_0(), ours, args)


def test_processor_sees_backend_it_is_given(monkeypatch):
    """The processor hands its own backend to the dispatcher (not the process-wide one)."""
    from diffusers.models import attention_dispatch
    from diffusers.models.attention_processor import Attention

    seen = []
    real = attention_dispatch.dispatch_attention_fn

    def spy(*args, backend=None, **kwargs):
        seen.append(backend)
        return real(*args, backend=backend, **kwargs)

    monkeypatch.setattr(attention_dispatch, "dispatch_attention_fn", spy)
    module = Attention(query_dim=8, heads=2, dim_head=4)
    processor = DispatchAttnProcessor()
    processor._attention_backend = "_native_math"
    module.set_processor(processor)
    module(torch.randn(1, 3, 8))
    assert seen == ["_native_math"]


# --- every family, every layer ----------------------------------------------------------------
# Attention layers of each tiny checkpoint (tests/helpers/tiny_models.py): FLUX 1 double + 1
# single block; SD3 1 joint block; the SD UNet's self + cross attention in 4 transformers (1 down,
# 1 mid, 2 up); HunyuanVideo 1 refiner + 1 double + 1 single block; Wan self + cross attention.
FAMILY_LAYERS = {"flux": 2, "sd3": 1, "sd": 8, "hunyuan_video": 3, "wan": 2}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def family_folder(request, tmp_path_factory):
    family = request.param
    return family, BUILDERS[family](tmp_path_factory.mktemp(family) / "model")


def _policy(family, folder, backend, device="cpu"):
    video = family in ("hunyuan_video", "wan")
    options = ModelConfig(family=family, path=str(folder), attention_backend=backend, height=16, width=16,
                          num_frames=5 if video else 1, max_sequence_length=16, mixed_precision="no")
    return build_policy(options, SamplerConfig(name="ddim" if family == "sd" else "dance"), device)


def _output_and_grads(policy, module, latents, timesteps, cond):
    module.zero_grad(set_to_none=True)
    module.requires_grad_(True)
    out = policy._call_model(module, latents, timesteps, cond)
    torch.manual_seed(5)
    (out * torch.randn_like(out)).sum().backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    module.requires_grad_(False)
    return out.detach(), grads


@pytest.mark.parametrize("backend", ["_native_math", "native"])
def test_every_attention_layer_of_every_family_takes_the_backend(family_folder, backend):
    from diffusers.models.attention_dispatch import attention_backend

    family, folder = family_folder
    policy = _policy(family, folder, backend)
    layers = attn_mod.attention_layers(policy.model)
    assert len(layers) == FAMILY_LAYERS[family]
    assert policy.attention.backend == backend
    assert policy.attention.using == policy.attention.total == len(layers)
    for name, module in layers:
        assert attn_mod._backend_of(module.processor) == backend, (name, type(module.processor).__name__)
    assert str(policy.attention) == f"{backend} ({len(layers)}/{len(layers)} layers)"

    # The default path: the same weights with diffusers' own processors on PyTorch SDPA.
    reference = type(policy.model).from_pretrained(str(Path(folder) / policy.model_component)).eval()
    assert not any(isinstance(m.processor, (DispatchAttnProcessor, DispatchJointAttnProcessor))
                   for _, m in attn_mod.attention_layers(reference))
    cond = policy.encode(["a red cat", "a blue dog"])
    latents = torch.randn(2, *policy.latent_shape())
    timesteps = torch.tensor([0.9, 0.4]) * policy.timestep_scale
    if family == "sd":
        timesteps = torch.tensor([751.0, 251.0])
    out, grads = _output_and_grads(policy, policy.model, latents, timesteps, cond)
    with attention_backend("native"):
        out_ref, grads_ref = _output_and_grads(policy, reference, latents, timesteps, cond)
    assert out.abs().max() > 1e-4
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-5)
    assert grads.keys() == grads_ref.keys() and grads
    attention_grads = 0
    for name, g in grads.items():
        torch.testing.assert_close(g, grads_ref[name], rtol=1e-3, atol=1e-5, msg=name)
        attention_grads += ".to_q." in name and g.abs().max() > 0
    assert attention_grads, "no gradient reached the attention projections"


def test_unusable_backend_and_a_layer_that_cannot_take_it_fail_in_one_line(family_folder):
    family, folder = family_folder
    if family != "sd":
        pytest.skip("one family suffices for the error paths")
    from diffusers.models.attention_processor import AttnProcessor
    from diffusers.utils import is_flash_attn_available

    if not is_flash_attn_available():  # flash-attn is not installed on the CPU test machines
        with pytest.raises(AttentionBackendError) as info:
            _policy(family, folder, "flash")
        message = str(info.value)
        assert "\n" not in message and "attention_backend 'flash'" in message and "flash-attn" in message

    policy = _policy(family, folder, "native")
    first = attn_mod.attention_layers(policy.model)[0][1]
    first.set_processor(AttnProcessor())  # the pre-2.0 processor: computes its own attention
    with pytest.raises(AttentionBackendError) as info:
        set_backend(policy.model, "_native_math", what="unet")
    message = str(info.value)
    total = policy.attention.total
    assert "\n" not in message
    assert f"only {total - 1} of {total} attention layers of the unet" in message
    assert "AttnProcessor (does not dispatch)" in message


# --- choosing and validating ------------------------------------------------------------------
def test_auto_resolves_per_device(monkeypatch):
    assert resolve_backend("auto", "cpu") == "native"
    assert resolve_backend("auto", "meta", masked=True) == "native"
    assert resolve_backend("_native_math", "cpu") == "_native_math"  # only auto is resolved
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    state = {"capability": (9, 0), "fa3": True, "fa2": True}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: state["capability"])
    monkeypatch.setattr(attn_mod, "flash_attn_3_usable", lambda: state["fa3"])
    monkeypatch.setattr(attn_mod, "flash_attn_2_usable", lambda: state["fa2"])
    cuda = torch.device("cuda", 0)
    assert resolve_backend("auto", cuda) == "_flash_3"  # Hopper with FA3
    assert resolve_backend("auto", cuda, masked=True) == "_flash_varlen_3"
    state["capability"] = (8, 0)  # A100: FA3 is Hopper-only
    assert resolve_backend("auto", cuda) == "flash"
    assert resolve_backend("auto", cuda, masked=True) == "flash_varlen"
    state["fa2"] = False
    assert resolve_backend("auto", cuda) == "native"
    state["capability"], state["fa3"] = (9, 0), False
    assert resolve_backend("auto", cuda) == "native"


def test_config_backend_names_are_diffusers_names():
    """The built-in list config.py validates against is diffusers' AttentionBackendName (a newer
    diffusers' extra names are still accepted by looking them up)."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    assert set(ATTENTION_BACKENDS) == {b.value for b in AttentionBackendName}
    assert TrainConfig().model.attention_backend == "auto"


@pytest.mark.parametrize("bad", ["flashy", "sdpa", "FLASH", ""])
def test_bad_backend_is_a_one_line_config_error(bad):
    config = TrainConfig.from_dict({"model_family": "tiny", "attention_backend": bad})
    with pytest.raises(ValueError) as info:
        config.validate()
    message = str(info.value)
    assert "\n" not in message and message.startswith("attention_backend must be auto or one of")
    assert repr(bad) in message and "_native_math" in message
    for good in ("auto", "native", "flash", "_flash_3", "xformers"):
        TrainConfig.from_dict({"model_family": "tiny", "attention_backend": good}).validate()


# --- what the user is told ------------------------------------------------------------------
def test_info_says_each_published_model_s_backend_and_layers():
    """python -m dancegrpo_fast.info: auto on this CPU machine is PyTorch SDPA on every attention
    layer of each published architecture (built on meta; layer counts from the architectures'
    configs: FLUX.1-dev 19 double + 38 single blocks, SD3.5 medium 24 joint + 13 dual-attention
    blocks, SD 1.4's 16 transformers x 2, HunyuanVideo 2 refiner + 20 double + 40 single blocks,
    Wan 14B 40 blocks x 2)."""
    from dancegrpo_fast.info import attention_info

    found = attention_info(torch.device("cpu"))
    expected = {"flux": 57, "sd3": 37, "sd": 32, "hunyuan_video": 62, "wan": 80}
    assert {f: (e["backend"], e["using"], e["layers"]) for f, e in found.items()} == \
        {f: ("native", n, n) for f, n in expected.items()}


def test_start_block_names_the_attention_backend():
    from dancegrpo_fast.run_report import start_block

    config = TrainConfig.from_dict({"model_family": "sd", "sampler": "ddim", "attention_backend": "auto"})
    text = start_block(config, "cpu", 1, 0, ["hps"], "torch", "native (8/8 layers)")
    assert "  attention   native (8/8 layers) (attention_backend=auto)" in text.splitlines()
    assert "attention" not in start_block(config, "cpu", 1, 0, ["hps"], "torch")


@pytest.mark.cuda
@pytest.mark.parametrize("family", ["flux", "sd"])
def test_auto_on_cuda_matches_sdpa_under_bf16_autocast(family, tmp_path):
    """On a GPU: `auto` (flash-attn / FA3 when installed) under the trainer's bf16 autocast gives
    the output and gradients of PyTorch SDPA within bf16 tolerance. Skipped on CPU machines."""
    from diffusers.models.attention_dispatch import attention_backend

    folder = BUILDERS[family](tmp_path / "model")
    policy = _policy(family, folder, "auto", device="cuda")
    reference = type(policy.model).from_pretrained(str(Path(folder) / policy.model_component)).to("cuda").eval()
    assert policy.attention.using == policy.attention.total
    print(f"{family}: auto -> {policy.attention}")
    cond = policy.encode(["a red cat", "a blue dog"])
    latents = torch.randn(2, *policy.latent_shape(), device="cuda")
    timesteps = (torch.tensor([751.0, 251.0]) if family == "sd" else torch.tensor([0.9, 0.4]) * policy.timestep_scale).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, grads = _output_and_grads(policy, policy.model, latents, timesteps, cond)
        with attention_backend("native"):
            out_ref, grads_ref = _output_and_grads(policy, reference, latents, timesteps, cond)
    torch.testing.assert_close(out.float(), out_ref.float(), rtol=5e-2, atol=5e-2)
    for name, g in grads.items():
        torch.testing.assert_close(g.float(), grads_ref[name].float(), rtol=1e-1, atol=5e-2, msg=name)
