"""The fused ops (dancegrpo_fast.ops) against autograd through the float64 reference.

Every test runs on both fast paths: the PyTorch twin and the Triton kernels (under the Triton
interpreter on the CPU: scripts/test.sh sets TRITON_INTERPRET=1).
"""
import math

import pytest
import torch

import oracle
from dancegrpo_fast import (StepCoefficients, dance_coefficients, ddim_coefficients,
                            flow_grpo_coefficients, flow_sigmas, fused_step_loss, ode_coefficients,
                            sde_step, step_log_prob)
from dancegrpo_fast import kernels

TRITON_CPU = kernels.triton_mode() == "interpreted"
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not TRITON_CPU, reason="Triton on the CPU needs TRITON_INTERPRET=1 (scripts/test.sh sets it)"))]

# B = 1; N not a multiple of the 1024-element block; N spanning several blocks and chunks.
SHAPES = [(1, 4, 5, 7), (3, 3, 7, 11), (5, 4, 33, 37), (2, 2, 3, 9, 13)]
GRAD_TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def coefficients(kind, batch):
    sigmas = flow_sigmas(16, 3.0)
    idx = torch.randint(0, 15, (batch,))
    if kind == "dance":
        return dance_coefficients(sigmas[idx], sigmas[idx + 1], 0.3, batch)
    if kind == "flow_grpo":
        return flow_grpo_coefficients(sigmas[idx], sigmas[idx + 1], 0.7, float(sigmas[1]), batch)
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    acp = torch.cumprod(1 - betas, 0)
    t = torch.randint(1, 50, (batch,)) * 20 + 1
    return ddim_coefficients(acp[t], acp[t - 20], 1.0, batch)


def make_case(shape, dtype=torch.float32, kind="dance", off_policy=0.02, with_ref=False):
    batch = shape[0]
    c = coefficients(kind, batch)
    v = torch.randn(shape).to(dtype)
    x = torch.randn(shape).to(dtype)
    # next latents drawn from the step itself, so log-probs and ratios are realistic
    mean = c.a.view((-1,) + (1,) * (len(shape) - 1)) * x.float() + c.b.view((-1,) + (1,) * (len(shape) - 1)) * v.float()
    xn = (mean + c.s.view((-1,) + (1,) * (len(shape) - 1)) * torch.randn(shape)).to(dtype)
    lp64 = oracle.log_prob(xn.double(), oracle.bc(c.a.double(), x) * x.double() + oracle.bc(c.b.double(), x) * v.double(), c.s.double())
    old = (lp64 + off_policy * torch.randn(batch, dtype=torch.float64)).float()
    adv = torch.randn(batch) * 3
    vref = (v.float() + 0.1 * torch.randn(shape)).to(dtype) if with_ref else None
    return v, x, xn, c, old, adv, vref


def reference_loss_and_grad(v, x, xn, c, old, adv, clip_range, adv_clip_max, vref=None, beta=0.0):
    v64 = v.detach().double().requires_grad_()
    loss, lp, kl = oracle.step_loss(v64, x.double(), xn.double(), c.a.double(), c.b.double(), c.s.double(),
                                    old.double(), adv.double(), clip_range, adv_clip_max,
                                    None if vref is None else vref.double(), beta)
    loss.backward()
    return loss.detach(), lp.detach(), kl.detach(), v64.grad


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["dance", "flow_grpo", "ddim"])
def test_fused_step_loss_matches_reference(backend, shape, kind):
    v, x, xn, c, old, adv, _ = make_case(shape, kind=kind)
    # a clip range that clips some samples and not others
    clip_range = 0.02
    v1 = v.clone().requires_grad_()
    out = fused_step_loss(v1, x, xn, c, old, adv, clip_range=clip_range, adv_clip_max=5.0, backend=backend)
    out.loss.backward()
    loss, lp, _, grad = reference_loss_and_grad(v, x, xn, c, old, adv, clip_range, 5.0)
    assert out.loss.shape == () and out.log_prob.dtype == torch.float32
    assert math.isclose(float(out.loss.detach()), float(loss), rel_tol=1e-4, abs_tol=1e-5)
    assert torch.allclose(out.log_prob.double(), lp, rtol=1e-5, atol=1e-4)
    ratio = torch.exp(lp - old.double())
    assert torch.allclose(out.ratio.double(), ratio, rtol=1e-4)
    assert torch.equal(out.clipped.bool(), (ratio - 1).abs() > clip_range)
    assert rel_err(v1.grad, grad) < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_step_loss_low_precision_model_output(backend, dtype):
    shape = (3, 4, 17, 19)
    v, x, xn, c, old, adv, _ = make_case(shape, dtype=dtype)
    x, xn = x.float(), xn.float()  # latents kept in float32, model output in bf16/fp16
    v1 = v.clone().requires_grad_()
    out = fused_step_loss(v1, x, xn, c, old, adv, clip_range=0.05, backend=backend)
    out.loss.backward()
    loss, lp, _, grad = reference_loss_and_grad(v, x, xn, c, old, adv, 0.05, 5.0)
    assert v1.grad.dtype == dtype
    assert torch.allclose(out.log_prob.double(), lp, rtol=1e-5, atol=1e-4)
    assert math.isclose(float(out.loss.detach()), float(loss), rel_tol=1e-4, abs_tol=1e-5)
    assert rel_err(v1.grad, grad) < GRAD_TOL[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 4, 5, 7), (4, 4, 33, 37)])
def test_fused_step_loss_with_kl(backend, shape):
    v, x, xn, c, old, adv, vref = make_case(shape, with_ref=True)
    v1 = v.clone().requires_grad_()
    out = fused_step_loss(v1, x, xn, c, old, adv, clip_range=0.02, ref_model_output=vref, kl_beta=0.5, backend=backend)
    out.loss.backward()
    loss, _, kl, grad = reference_loss_and_grad(v, x, xn, c, old, adv, 0.02, 5.0, vref, 0.5)
    assert math.isclose(float(out.loss.detach()), float(loss), rel_tol=1e-4, abs_tol=1e-5)
    assert torch.allclose(out.kl.double(), kl, rtol=1e-4, atol=1e-7)
    assert rel_err(v1.grad, grad) < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_on_policy_ratio_is_exactly_one(backend):
    """old_log_prob computed by the same op at the same parameters: ratio == 1 exactly and the
    loss is -mean(clamp(A))."""
    shape = (6, 4, 9, 13)
    v, x, xn, c, _, _, _ = make_case(shape)
    adv = torch.randn(6) * 4
    first = fused_step_loss(v, x, xn, c, torch.zeros(6), adv, backend=backend)
    out = fused_step_loss(v.clone().requires_grad_(), x, xn, c, first.log_prob, adv, backend=backend)
    assert torch.equal(out.ratio, torch.ones(6))
    assert not out.clipped.any()
    # float32 sums of 6 values up to 5 in different orders: a few 1e-7 apart
    assert math.isclose(float(out.loss.detach()), float(-adv.clamp(-5, 5).mean()), rel_tol=1e-6, abs_tol=3e-6)
    # step_log_prob is bit-identical to the fused op's log-prob: usable as "old" for later steps
    lp = step_log_prob(v, x, xn, c, backend=backend)
    assert torch.equal(lp, first.log_prob)
    # old_log_prob=None: on-policy inside the op, same loss and gradient, ratio exactly 1
    v_a, v_b = v.clone().requires_grad_(), v.clone().requires_grad_()
    given = fused_step_loss(v_a, x, xn, c, lp, adv, backend=backend)
    implicit = fused_step_loss(v_b, x, xn, c, None, adv, backend=backend)
    given.loss.backward()
    implicit.loss.backward()
    assert torch.equal(implicit.ratio, torch.ones(6))
    assert torch.equal(implicit.loss, given.loss) and torch.equal(v_a.grad, v_b.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    shape = (3, 4, 12, 10)
    v, x, xn, c, old, adv, _ = make_case(shape)
    vt = v.transpose(2, 3).contiguous().transpose(2, 3).requires_grad_()  # same values, strided
    assert not vt.is_contiguous()
    out = fused_step_loss(vt, x.transpose(2, 3).contiguous().transpose(2, 3), xn, c, old, adv, clip_range=0.02, backend=backend)
    out.loss.backward()
    loss, _, _, grad = reference_loss_and_grad(v, x, xn, c, old, adv, 0.02, 5.0)
    assert math.isclose(float(out.loss.detach()), float(loss), rel_tol=1e-4, abs_tol=1e-5)
    assert rel_err(vt.grad, grad) < 1e-4


def test_gradcheck_float64_torch_path():
    shape = (3, 2, 3, 5)
    v, x, xn, c, old, adv, vref = make_case(shape, with_ref=True, off_policy=0.001)
    v64 = v.double().requires_grad_()
    args = (x.double(), xn.double(), c, old.double(), adv.double())

    def loss_fn(v_in):
        return fused_step_loss(v_in, *args, clip_range=0.2, ref_model_output=vref.double(), kl_beta=0.3, backend="torch").loss

    def lp_fn(v_in):
        return step_log_prob(v_in, x.double(), xn.double(), c, backend="torch")

    assert torch.autograd.gradcheck(loss_fn, (v64,), eps=1e-6, atol=1e-6)
    assert torch.autograd.gradcheck(lp_fn, (v64,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_log_prob_matches_reference(backend, dtype):
    shape = (4, 3, 21, 17)
    v, x, xn, c, _, _, _ = make_case(shape, dtype=dtype)
    v1 = v.clone().requires_grad_()
    weights = torch.randn(4)
    lp = step_log_prob(v1, x, xn, c, backend=backend)
    (lp * weights).sum().backward()
    v64 = v.double().requires_grad_()
    mean = oracle.bc(c.a.double(), x) * x.double() + oracle.bc(c.b.double(), x) * v64
    lp64 = oracle.log_prob(xn.double(), mean, c.s.double())
    (lp64 * weights.double()).sum().backward()
    assert torch.allclose(lp.double(), lp64, rtol=1e-5, atol=1e-4)
    assert rel_err(v1.grad, v64.grad) < GRAD_TOL[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sde_step_with_given_noise(backend, dtype):
    shape = (3, 4, 9, 31)
    c = coefficients("dance", 3)
    v, x, noise = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype), torch.randn(shape)
    out = sde_step(v, x, c, noise=noise, backend=backend)
    mean = oracle.bc(c.a.double(), x) * x.double() + oracle.bc(c.b.double(), x) * v.double()
    expect = mean + oracle.bc(c.s.double(), x) * noise.double()
    assert out.prev_sample.dtype == dtype and out.prev_sample.shape == shape
    assert torch.allclose(out.prev_sample.double(), expect, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-5)
    # the log-prob scores the stored (rounded) sample
    assert torch.allclose(out.log_prob.double(), oracle.log_prob(out.prev_sample.double(), mean, c.s.double()), rtol=1e-5, atol=1e-4)
    # the training-side log-prob of that sample agrees
    assert torch.allclose(step_log_prob(v, x, out.prev_sample, c, backend=backend), out.log_prob, rtol=1e-6, atol=2e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sde_step_seeded_is_reproducible(backend):
    shape = (4, 4, 8, 8)
    c = coefficients("dance", 4)
    v, x = torch.randn(shape), torch.randn(shape)
    seeds = torch.tensor([11, 12, 13, 11])
    a = sde_step(v, x, c, seeds=seeds, step_index=3, backend=backend)
    b = sde_step(v, x, c, seeds=seeds, step_index=3, backend=backend)
    other = sde_step(v, x, c, seeds=seeds, step_index=4, backend=backend)
    assert torch.equal(a.prev_sample, b.prev_sample)
    assert not torch.allclose(a.prev_sample, other.prev_sample)
    # a sample's noise depends only on its seed and step: rows 0 and 3 share a seed
    noise = (a.prev_sample - (oracle.bc(c.a, x) * x + oracle.bc(c.b, x) * v)) / oracle.bc(c.s, x)
    assert torch.allclose(noise[0], noise[3], atol=1e-4)
    alone = sde_step(v[2:3], x[2:3], c.index(slice(2, 3)), seeds=seeds[2:3], step_index=3, backend=backend)
    assert torch.allclose(alone.prev_sample[0], a.prev_sample[2], atol=1e-6)


@pytest.mark.skipif(not TRITON_CPU, reason="needs TRITON_INTERPRET=1")
def test_sde_step_seeded_noise_same_on_triton_and_torch():
    shape = (3, 4, 9, 31)
    c = coefficients("flow_grpo", 3)
    v, x = torch.randn(shape), torch.randn(shape)
    seeds = torch.tensor([5, -7, 2**40 + 3])
    t = sde_step(v, x, c, seeds=seeds, step_index=2, backend="triton")
    p = sde_step(v, x, c, seeds=seeds, step_index=2, backend="torch")
    assert torch.allclose(t.prev_sample, p.prev_sample, atol=1e-5)
    assert torch.allclose(t.log_prob, p.log_prob, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sde_step_deterministic(backend):
    shape = (2, 4, 5, 5)
    c = ode_coefficients(0.6, 0.5, 2)
    v, x = torch.randn(shape), torch.randn(shape)
    out = sde_step(v, x, c, backend=backend)
    assert out.log_prob is None
    assert torch.allclose(out.prev_sample, x - 0.1 * v, atol=1e-6)


def test_fused_ops_error_messages():
    shape = (2, 4, 5, 5)
    v, x, xn, c, old, adv, _ = make_case(shape)
    with pytest.raises(ValueError, match="model_output shape"):
        fused_step_loss(v[:, :3], x, xn, c, old, adv)
    with pytest.raises(ValueError, match=r"prev_sample \(next latents\) shape"):
        fused_step_loss(v, x, xn[:1], c, old, adv)
    with pytest.raises(ValueError, match=r"coeffs.a must have shape \(2,\)"):
        fused_step_loss(v, x, xn, coefficients("dance", 3), old, adv)
    with pytest.raises(ValueError, match="deterministic"):
        fused_step_loss(v, x, xn, ode_coefficients(0.5, 0.4, 2), old, adv)
    with pytest.raises(ValueError, match="deterministic"):
        step_log_prob(v, x, xn, ode_coefficients(0.5, 0.4, 2))
    with pytest.raises(ValueError, match="advantages must be finite"):
        fused_step_loss(v, x, xn, c, old, torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match=r"old_log_prob must be a tensor of shape \(2,\)"):
        fused_step_loss(v, x, xn, c, old[:1], adv)
    with pytest.raises(ValueError, match="kl_beta > 0 needs ref_model_output"):
        fused_step_loss(v, x, xn, c, old, adv, kl_beta=0.1)
    with pytest.raises(ValueError, match="a stochastic step needs noise or seeds"):
        sde_step(v, x, c)
    with pytest.raises(ValueError, match="noise shape"):
        sde_step(v, x, c, noise=torch.randn(2, 4, 5))
    with pytest.raises(ValueError, match="backend must be one of"):
        fused_step_loss(v, x, xn, c, old, adv, backend="cuda")
    with pytest.raises(TypeError, match="coeffs must be a StepCoefficients"):
        fused_step_loss(v, x, xn, (c.a, c.b, c.s), old, adv)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_keeps_no_latent_sized_float32_temporaries(backend):
    """What the fused op saves for backward: the inputs themselves (or views of them) and
    per-sample vectors. Autograd through the reference saves several float32 latent copies."""
    shape = (4, 4, 16, 16)
    v, x, xn, c, old, adv, _ = make_case(shape, dtype=torch.bfloat16)
    v = v.requires_grad_()
    inputs = {t.untyped_storage().data_ptr() for t in (v, x, xn)}
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fused_step_loss(v, x, xn, c, old, adv, backend=backend).loss.backward()
    for t in saved:
        assert t.untyped_storage().data_ptr() in inputs or t.numel() <= shape[0], (
            f"saved a new {t.dtype} tensor of shape {tuple(t.shape)}")


@pytest.mark.parametrize("block", [100, 700, 5000])
def test_torch_path_blocking(monkeypatch, block):
    """The PyTorch twin works on blocks (whole rows, or column pieces of long rows): results do not
    depend on the block size."""
    from dancegrpo_fast.kernels import step_loss_torch

    shape = (3, 4, 15, 17)  # 1020 elements per row
    v, x, xn, c, old, adv, vref = make_case(shape, with_ref=True)
    noise = torch.randn(shape)
    v_ref_grad = v.clone().requires_grad_()
    expect = fused_step_loss(v_ref_grad, x, xn, c, old, adv, clip_range=0.02, ref_model_output=vref, kl_beta=0.2, backend="torch")
    expect.loss.backward()
    expect_step = sde_step(v, x, c, noise=noise, backend="torch")
    monkeypatch.setattr(step_loss_torch, "ROW_BLOCK_ELEMENTS", block)
    v1 = v.clone().requires_grad_()
    out = fused_step_loss(v1, x, xn, c, old, adv, clip_range=0.02, ref_model_output=vref, kl_beta=0.2, backend="torch")
    out.loss.backward()
    step = sde_step(v, x, c, noise=noise, backend="torch")
    assert torch.allclose(out.loss.detach(), expect.loss.detach(), rtol=1e-5, atol=1e-6)
    assert rel_err(v1.grad, v_ref_grad.grad) < 1e-5  # norm-wise: the KL term can cancel elementwise
    assert torch.equal(step.prev_sample, expect_step.prev_sample)
    assert torch.allclose(step.log_prob, expect_step.log_prob, rtol=1e-6)
