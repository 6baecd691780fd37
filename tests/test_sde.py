"""Reference sampler steps (dancegrpo_fast.sde) against float64 oracles written from the SPEC."""
import math

import pytest
import torch

import oracle
from dancegrpo_fast import (StepCoefficients, affine_step, dance_coefficients, dance_step,
                            ddim_coefficients, ddim_step, flow_grpo_coefficients, flow_grpo_step,
                            flow_sigmas, ode_coefficients, ode_step)

SHAPES = [(1, 4, 5, 7), (3, 4, 9, 11), (2, 3, 5, 6, 7)]  # B = 1, odd N, a video-like 5-D latent
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}


def random_flow_sigmas(batch, per_sample):
    sigmas = flow_sigmas(16, shift=3.0).double()
    if per_sample:
        idx = torch.randint(0, 16, (batch,))
        return sigmas[idx], sigmas[idx + 1]
    i = int(torch.randint(0, 16, ()))
    return float(sigmas[i]), float(sigmas[i + 1])


def as64(value, batch):
    return value.double() if isinstance(value, torch.Tensor) else torch.full((batch,), value, dtype=torch.float64)


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def test_flow_sigmas_matches_formula():
    for steps, shift in [(1, 1.0), (16, 3.0), (50, 5.0)]:
        s = flow_sigmas(steps, shift)
        base = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
        expect = shift * base / (1 + (shift - 1) * base)
        assert s.shape == (steps + 1,) and s.dtype == torch.float32
        assert torch.allclose(s.double(), expect, atol=1e-7)
        assert s[0] == 1 and s[-1] == 0 and (s[1:] < s[:-1]).all()


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_flow_sigmas_rejects_bad_num_steps(bad):
    with pytest.raises(ValueError, match="num_steps"):
        flow_sigmas(bad)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_sample", [False, True])
def test_dance_step_against_oracle(shape, dtype, per_sample):
    v = torch.randn(shape).to(dtype)
    x = torch.randn(shape).to(dtype)
    sigma, sigma_next = random_flow_sigmas(shape[0], per_sample)
    out = dance_step(v, x, sigma, sigma_next, eta=0.3)
    mean, std = oracle.dance_mean_std(v.double(), x.double(), as64(sigma, shape[0]), as64(sigma_next, shape[0]), 0.3)
    assert out.prev_sample.shape == shape and out.prev_sample.dtype == dtype
    assert out.log_prob.shape == (shape[0],) and out.log_prob.dtype == torch.float32
    assert rel_err(out.mean, mean) < TOL[dtype]
    assert torch.allclose(out.std.double(), std, rtol=1e-6)
    # scoring the sample it drew reproduces its log-prob; the oracle agrees
    lp = oracle.log_prob(out.prev_sample.double(), mean, std)
    assert torch.allclose(out.log_prob.double(), lp, atol=2e-4, rtol=1e-5)
    rescored = dance_step(v, x, sigma, sigma_next, 0.3, prev_sample=out.prev_sample)
    assert torch.equal(rescored.log_prob, out.log_prob)


@pytest.mark.parametrize("per_sample", [False, True])
def test_dance_step_scores_given_sample(per_sample):
    shape = (3, 4, 6, 5)
    v, x, xn = torch.randn(shape), torch.randn(shape), torch.randn(shape)
    sigma, sigma_next = random_flow_sigmas(3, per_sample)
    out = dance_step(v, x, sigma, sigma_next, 0.3, prev_sample=xn)
    mean, std = oracle.dance_mean_std(v.double(), x.double(), as64(sigma, 3), as64(sigma_next, 3), 0.3)
    assert torch.equal(out.prev_sample, xn)
    assert torch.allclose(out.log_prob.double(), oracle.log_prob(xn.double(), mean, std), rtol=1e-5, atol=1e-4)


def test_sampled_noise_has_the_step_std():
    shape = (2, 16, 64, 64)
    v, x = torch.randn(shape), torch.randn(shape)
    g = torch.Generator().manual_seed(0)
    out = dance_step(v, x, 0.8, 0.7, 0.3, generator=g)
    z = (out.prev_sample - out.mean) / out.std.view(-1, 1, 1, 1)
    n = z.numel()
    assert abs(float(z.mean())) < 6 / math.sqrt(n)
    assert abs(float(z.var()) - 1) < 6 * math.sqrt(2 / n)
    again = dance_step(v, x, 0.8, 0.7, 0.3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.prev_sample, out.prev_sample)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_sample", [False, True])
def test_flow_grpo_step_against_oracle(shape, dtype, per_sample):
    sigmas = flow_sigmas(10, 3.0)
    batch = shape[0]
    if per_sample:
        idx = torch.randint(0, 10, (batch,))
        idx[0] = 0  # include sigma == 1, where sigma_max replaces sigma in the denominator
        sigma, sigma_next = sigmas[idx].double(), sigmas[idx + 1].double()
    else:
        sigma, sigma_next = 1.0, float(sigmas[1])
    v, x, xn = (torch.randn(shape).to(dtype) for _ in range(3))
    out = flow_grpo_step(v, x, sigma, sigma_next, 0.7, float(sigmas[1]), prev_sample=xn)
    mean, std = oracle.flow_grpo_mean_std(v.double(), x.double(), as64(sigma, batch), as64(sigma_next, batch), 0.7, float(sigmas[1]))
    assert rel_err(out.mean, mean) < 1e-5
    assert torch.allclose(out.std.double(), std, rtol=1e-6)
    assert torch.allclose(out.log_prob.double(), oracle.log_prob(xn.double(), mean, std), rtol=1e-5, atol=1e-4)


def ddim_alphas(batch, per_sample, num_steps=50):
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    acp = torch.cumprod(1 - betas, 0)
    t = torch.randint(1, num_steps, (batch if per_sample else 1,)) * (1000 // num_steps) + 1
    prev = t - 1000 // num_steps
    ab, abp = acp[t], acp[prev]
    if per_sample:
        return ab, abp
    return float(ab), float(abp)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_sample", [False, True])
def test_ddim_step_against_oracle(shape, dtype, per_sample):
    batch = shape[0]
    ab, abp = ddim_alphas(batch, per_sample)
    eps, x, xn = (torch.randn(shape).to(dtype) for _ in range(3))
    out = ddim_step(eps, x, ab, abp, eta=1.0, prev_sample=xn)
    mean, std = oracle.ddim_mean_std(eps.double(), x.double(), as64(ab, batch), as64(abp, batch), 1.0)
    assert rel_err(out.mean, mean) < 1e-5
    assert torch.allclose(out.std.double(), std, rtol=1e-5)
    assert torch.allclose(out.log_prob.double(), oracle.log_prob(xn.double(), mean, std), rtol=1e-4, atol=1e-3)


def test_ddim_step_matches_diffusers_scheduler():
    """Our DDIM mean is diffusers' DDIMScheduler.step with the noise term removed."""
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                    clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    sched.set_timesteps(50)
    x, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = int(sched.timesteps[10])
    prev_t = t - 1000 // 50
    ab = float(sched.alphas_cumprod[t])
    abp = float(sched.alphas_cumprod[prev_t]) if prev_t >= 0 else float(sched.final_alpha_cumprod)
    zero_noise = torch.zeros_like(x)
    expect = sched.step(eps, t, x, eta=1.0, variance_noise=zero_noise).prev_sample
    ours = ddim_step(eps, x, ab, abp, eta=1.0)
    assert torch.allclose(ours.mean, expect, atol=1e-5)


@pytest.mark.parametrize("kind", ["dance", "flow_grpo", "ddim", "ode"])
def test_coefficient_form_equals_step_form(kind):
    """(a, b, s) describe exactly the step: affine_step(a, b, s) == the sampler's own step."""
    batch, shape = 4, (4, 4, 7, 9)
    v, x, xn = (torch.randn(shape) for _ in range(3))
    sigmas = flow_sigmas(16, 3.0)
    idx = torch.randint(0, 15, (batch,))
    sigma, nxt = sigmas[idx].double(), sigmas[idx + 1].double()
    if kind == "dance":
        coeffs = dance_coefficients(sigma, nxt, 0.3, batch)
        step = dance_step(v, x, sigma, nxt, 0.3, prev_sample=xn)
    elif kind == "flow_grpo":
        coeffs = flow_grpo_coefficients(sigma, nxt, 0.7, float(sigmas[1]), batch)
        step = flow_grpo_step(v, x, sigma, nxt, 0.7, float(sigmas[1]), prev_sample=xn)
    elif kind == "ddim":
        ab, abp = ddim_alphas(batch, True)
        coeffs = ddim_coefficients(ab, abp, 1.0, batch)
        step = ddim_step(v, x, ab, abp, 1.0, prev_sample=xn)
    else:
        coeffs = ode_coefficients(sigma, nxt, batch)
        step = ode_step(v, x, sigma, nxt)
        xn = None
    affine = affine_step(v, x, coeffs, prev_sample=xn)
    assert rel_err(affine.mean, step.mean) < 1e-5
    assert torch.allclose(affine.std, step.std, rtol=1e-6)
    if kind == "ode":
        assert step.log_prob is None and affine.log_prob is None
        assert torch.equal(step.std, torch.zeros(batch))
    else:
        assert torch.allclose(affine.log_prob, step.log_prob, rtol=1e-5, atol=1e-4)


def test_log_prob_is_differentiable_wrt_model_output():
    v = torch.randn(2, 3, 5, 5, dtype=torch.float32, requires_grad=True)
    x, xn = torch.randn(2, 3, 5, 5), torch.randn(2, 3, 5, 5)
    out = dance_step(v, x, 0.6, 0.5, 0.3, prev_sample=xn)
    out.log_prob.sum().backward()
    # d log_prob / d v = b (x' - mu) / (N s^2)
    c = dance_coefficients(0.6, 0.5, 0.3, 2)
    expect = (c.b.view(-1, 1, 1, 1) * (xn - out.mean.detach()) / (75 * c.s.view(-1, 1, 1, 1) ** 2))
    assert torch.allclose(v.grad, expect, rtol=1e-4, atol=1e-6)


def test_deterministic_step_has_no_log_prob():
    """DDIM with coinciding alphas (steps_offset=0, set_alpha_to_one=False at t=0) has s == 0."""
    v, x, xn = (torch.randn(2, 4, 4, 4) for _ in range(3))
    with pytest.raises(ValueError, match="deterministic"):
        ddim_step(v, x, 0.99, 0.99, 1.0, prev_sample=xn)
    sampled = ddim_step(v, x, 0.99, 0.99, 1.0)  # sampling is fine: the mean, no log-prob
    assert sampled.log_prob is None and torch.equal(sampled.prev_sample, sampled.mean)
    out = ode_step(v, x, 0.5, 0.4)
    assert out.log_prob is None


@pytest.mark.parametrize("fn,kwargs", [
    (dance_step, dict(sigma=0.5, sigma_next=0.4, eta=-0.1)),
    (ddim_step, dict(alpha_bar=0.5, alpha_bar_prev=0.6, eta=-1.0)),
    (flow_grpo_step, dict(sigma=0.5, sigma_next=0.4, noise_level=-0.7, sigma_max=0.9)),
])
def test_negative_eta_is_an_error(fn, kwargs):
    v, x = torch.randn(2, 3), torch.randn(2, 3)
    with pytest.raises(ValueError, match="eta|noise_level"):
        fn(v, x, **kwargs)


def test_shape_mismatch_errors_name_the_argument():
    x = torch.randn(2, 4, 4)
    with pytest.raises(ValueError, match="model_output shape"):
        dance_step(torch.randn(2, 4, 5), x, 0.5, 0.4, 0.3)
    with pytest.raises(ValueError, match="prev_sample"):
        dance_step(torch.randn(2, 4, 4), x, 0.5, 0.4, 0.3, prev_sample=torch.randn(3, 4, 4))
    with pytest.raises(ValueError, match="sigma must be a float or a tensor of shape"):
        dance_step(torch.randn(2, 4, 4), x, torch.tensor([0.5, 0.4, 0.3]), 0.2, 0.3)
    with pytest.raises(ValueError, match="sigma_next must lie"):
        dance_step(torch.randn(2, 4, 4), x, 0.5, 0.6, 0.3)
    with pytest.raises(ValueError, match="eta=2.0 is too large"):
        ddim_step(torch.randn(2, 4, 4), x, 0.5, 0.6, 2.0)


def test_step_coefficients_helpers():
    c = dance_coefficients(torch.tensor([0.9, 0.5, 0.3]), torch.tensor([0.8, 0.4, 0.2]), 0.3, 3)
    assert isinstance(c, StepCoefficients) and c.batch_size == 3
    assert c.a.dtype == c.b.dtype == c.s.dtype == torch.float32
    sub = c.index(torch.tensor([2, 0]))
    assert torch.equal(sub.a, c.a[[2, 0]]) and not sub.is_deterministic
    assert ode_coefficients(0.5, 0.4, 2).is_deterministic


def test_step_kind_is_known_on_the_cpu_and_carried():
    """The SDE/ODE distinction is computed once on the CPU, so device code never syncs for it."""
    c = dance_coefficients(0.5, 0.4, 0.3, 3)
    assert c.kind == "sde"
    assert c.to("cpu").kind == "sde" and c.index([0, 2]).kind == "sde"
    assert ode_coefficients(0.5, 0.4, 2).kind == "ode"
    mixed = StepCoefficients(torch.ones(2), torch.ones(2), torch.tensor([0.0, 0.1]))
    assert mixed.kind == "mixed" and mixed.index([1]).step_kind() == "sde"
