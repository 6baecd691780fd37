"""Workloads shared by the benchmarks: the fused op and the eager baseline written the way the
reference DanceGRPO code computes a training step's loss.

Sizes (B, latent shape):
  tiny           B=4,  16 x 32 x 32
  flux_720       B=12, 16 x 90 x 90       (FLUX.1-dev at 720x720: VAE latent 90x90, 16 channels)
  hunyuan_480x53 B=2,  16 x 14 x 60 x 60  (HunyuanVideo 480x480, 53 frames: 14 latent frames)
  hunyuan_720x1280x129 B=2, 16 x 33 x 90 x 160 (HunyuanVideo 720x1280, 129 frames; GPU runs)
"""
from __future__ import annotations

import math
import platform
from dataclasses import dataclass

import torch

from dancegrpo_fast import dance_coefficients, flow_sigmas, fused_step_loss

SIZES = {
    "tiny": (4, (16, 32, 32)),
    "flux_720": (12, (16, 90, 90)),
    "hunyuan_480x53": (2, (16, 14, 60, 60)),
    # HunyuanVideo 720x1280, 129 frames (33 latent frames): 30 MB per bf16 tensor, past the L2 of
    # any GPU, so the kernels' bandwidth shows rather than the cache's.
    "hunyuan_720x1280x129": (2, (16, 33, 90, 160)),
}
ETA, CLIP_RANGE, ADV_CLIP_MAX = 0.3, 1e-4, 5.0


@dataclass
class StepLossCase:
    model_output: torch.Tensor   # requires grad, model dtype
    latents: torch.Tensor
    next_latents: torch.Tensor
    sigma: float
    sigma_next: float
    old_log_prob: torch.Tensor
    advantages: torch.Tensor
    clip_range: float = CLIP_RANGE
    coefficients: object = None  # the step's (a, b, s), precomputed as a trainer's schedule holds them

    @property
    def numel(self) -> int:
        return self.latents.numel()


def make_case(size: str, device: str, dtype=torch.bfloat16) -> StepLossCase:
    batch, shape = SIZES[size]
    gen = torch.Generator(device="cpu").manual_seed(0)
    sigmas = flow_sigmas(16, 3.0)
    sigma, sigma_next = float(sigmas[5]), float(sigmas[6])

    def randn(*s):
        return torch.randn(*s, generator=gen).to(device=device, dtype=dtype)

    v = randn(batch, *shape).requires_grad_()
    x = randn(batch, *shape)
    c = dance_coefficients(sigma, sigma_next, ETA, batch)
    mean = c.a.view((-1,) + (1,) * len(shape)).to(device) * x.float() + c.b.view((-1,) + (1,) * len(shape)).to(device) * v.detach().float()
    xn = (mean + c.s.view((-1,) + (1,) * len(shape)).to(device) * torch.randn(mean.shape, generator=gen).to(device)).to(dtype)
    old = torch.zeros(batch, device=device)
    adv = torch.randn(batch, generator=gen).to(device)
    case = StepLossCase(v, x, xn, sigma, sigma_next, old, adv, coefficients=c.to(device))
    # realistic old log-probs: near the current ones, so ratios are near 1
    with torch.no_grad():
        lp = eager_log_prob(case)
    case.old_log_prob = (lp + 1e-5 * torch.randn(batch, generator=gen).to(device)).detach()
    return case


def eager_log_prob(case: StepLossCase) -> torch.Tensor:
    """The reference code's flux_step: the step in the model dtype, then cast for the log-prob."""
    v, x = case.model_output, case.latents
    sigma, sigma_next = case.sigma, case.sigma_next
    dsigma = sigma_next - sigma
    prev_sample_mean = x + dsigma * v
    pred_original_sample = x - sigma * v
    std_dev_t = ETA * math.sqrt(sigma - sigma_next)
    score_estimate = -(x - pred_original_sample * (1 - sigma)) / sigma**2
    log_term = -0.5 * ETA**2 * score_estimate
    prev_sample_mean = prev_sample_mean + log_term * dsigma
    log_prob = (-((case.next_latents.detach().to(torch.float32) - prev_sample_mean.to(torch.float32)) ** 2)
                / (2 * std_dev_t**2)) - math.log(std_dev_t) - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi)))
    return log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


def eager_step_loss(case: StepLossCase) -> torch.Tensor:
    """The reference training loop's loss: ratio, clamp, max as separate ops."""
    new_log_prob = eager_log_prob(case)
    ratio = torch.exp(new_log_prob - case.old_log_prob)
    advantages = torch.clamp(case.advantages, -ADV_CLIP_MAX, ADV_CLIP_MAX)
    unclipped_loss = -advantages * ratio
    clipped_loss = -advantages * torch.clamp(ratio, 1.0 - case.clip_range, 1.0 + case.clip_range)
    return torch.mean(torch.maximum(unclipped_loss, clipped_loss))


def fused_loss(case: StepLossCase, backend=None) -> torch.Tensor:
    return fused_step_loss(case.model_output, case.latents, case.next_latents, case.coefficients, case.old_log_prob,
                           case.advantages, case.clip_range, ADV_CLIP_MAX, backend=backend).loss


_compiled = {}


def compiled_step_loss(case: StepLossCase) -> torch.Tensor:
    fn = _compiled.get("fn")
    if fn is None:
        fn = _compiled["fn"] = torch.compile(eager_step_loss)
    return fn(case)


IMPLEMENTATIONS = {"fused": fused_loss, "eager": eager_step_loss, "compiled": compiled_step_loss}


def forward_backward(impl: str, case: StepLossCase) -> None:
    case.model_output.grad = None
    IMPLEMENTATIONS[impl](case).backward()
    if case.model_output.is_cuda:
        torch.cuda.synchronize()


def peak_memory_bytes(fn, device: str) -> int:
    """Peak bytes allocated while fn runs, beyond what was allocated before it.

    CUDA: the caching allocator's statistics. CPU: the process's resident-set high-water mark
    (reset through /proc/self/clear_refs) with glibc told to serve every allocation over 64 KiB
    by mmap, so that freed tensors leave the resident set at once and the peak is the peak of
    live tensors.
    """
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    serve_large_allocations_by_mmap()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    base = _proc_status_bytes("VmRSS:")
    fn()
    return _proc_status_bytes("VmHWM:") - base


def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def serve_large_allocations_by_mmap() -> None:
    """Make glibc map (and unmap on free) every allocation over 64 KiB, and hand back the free
    heap it holds, so that the resident set follows the live tensors."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    m_mmap_threshold = -3  # mallopt parameter; a fixed value also stops glibc's dynamic threshold
    libc.mallopt(m_mmap_threshold, 64 * 1024)
    libc.malloc_trim(0)


def minimal_bytes(case: StepLossCase) -> int:
    """Fewest bytes a forward + backward must move: read v, x, x' twice, write dL/dv once."""
    elt = case.latents.element_size()
    return 7 * case.numel * elt


def copy_bandwidth(device: str, nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth in bytes/s, counting bytes read plus written."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    if device == "cuda":
        import triton.testing

        ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
        return 2 * nbytes / (ms * 1e-3)
    import time

    dst.copy_(src)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / sorted(times)[len(times) // 2]


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def device_kernel_seconds(fn, repeats: int = 20):
    """CUDA only: the GPU time of fn's kernels per call (sum of kernel durations from the
    profiler), without the host-side launch overhead that wall-clock timing includes. None if
    the profiler gives no kernel events."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    total_us = 0.0
    for event in prof.events():
        if getattr(event, "device_type", None) == DeviceType.CUDA:
            total_us += getattr(event, "device_time", None) or getattr(event, "cuda_time", 0.0)
    return total_us * 1e-6 / repeats if total_us > 0 else None
