"""Fused step loss (forward + backward) vs the reference code's eager loss and its torch.compile.

See conftest.py for the options and the JSON summary it writes.
"""
import os
import subprocess
import sys

import pytest

import workloads

IMPLS = ["fused", "eager", "compiled"]


def pytest_generate_tests(metafunc):
    if "size" in metafunc.fixturenames:
        sizes = metafunc.config.getoption("--bench-sizes").split(",")
        metafunc.parametrize("size", sizes)


@pytest.mark.parametrize("impl", IMPLS)
def test_step_loss(benchmark, bench_device, record, size, impl, request):
    case = workloads.make_case(size, bench_device)
    run = lambda: workloads.forward_backward(impl, case)  # noqa: E731
    for _ in range(3):  # warm-up: compilation, autotuning, allocator
        run()
    benchmark.group = f"step_loss/{size}"
    benchmark.pedantic(run, rounds=10 if bench_device == "cpu" else 50, iterations=1)
    extra = {}
    if bench_device == "cuda":
        case.model_output.grad = None
        peak = workloads.peak_memory_bytes(run, bench_device)
        try:
            extra["kernel_s"] = workloads.device_kernel_seconds(run)
        except Exception as exc:  # the profiler's API differs between torch versions
            extra["kernel_s_error"] = repr(exc)
    else:
        script = os.path.join(os.path.dirname(__file__), "peak_memory.py")
        peak = int(subprocess.run([sys.executable, script, "--device", "cpu", "--size", size, "--impl", impl,
                                   "--threads", str(request.config.getoption("--bench-threads"))],
                                  check=True, capture_output=True, text=True).stdout.split()[-1])
    record(device=bench_device, kind="step_loss", size=size, impl=impl,
           median_s=benchmark.stats.stats.median, peak_bytes=peak,
           min_bytes=workloads.minimal_bytes(case), latent_f32_bytes=case.numel * 4,
           grad_bytes=case.model_output.numel() * case.model_output.element_size(), **extra)


def test_fused_matches_eager(bench_device, size):
    """The benchmark compares like with like: same loss and gradient (bf16 tolerance)."""
    case = workloads.make_case(size, bench_device)
    # The eager step runs in bf16, so its log-prob differs from the float32 one by more than the
    # default clip range of 1e-4: with that range the two would clip different samples. Compare
    # the unclipped gradients.
    case.clip_range = 0.5
    workloads.forward_backward("eager", case)
    eager_grad = case.model_output.grad.float().clone()
    workloads.forward_backward("fused", case)
    fused_grad = case.model_output.grad.float()
    err = (fused_grad - eager_grad).norm() / eager_grad.norm()
    # The eager code rounds the step to bf16 before the log-prob, the fused op keeps float32, so
    # they differ by bf16 rounding of x' - mu (a few percent), not more.
    assert err < 0.25, f"relative gradient difference {err:.3g}"


def test_copy_bandwidth(bench_device, record):
    record(device=bench_device, kind="copy_bandwidth", bytes_per_s=workloads.copy_bandwidth(bench_device))
