"""pytest-benchmark set-up for benchmarks/: device choice and the JSON summary.

    python -m pytest benchmarks/test_step_loss_bench.py --bench-device cpu
    python -m pytest benchmarks/test_step_loss_bench.py --bench-device cuda

After the run, benchmarks/results/step_loss_<device>.json holds each implementation's median
time and peak memory per size and the ratios against the fused op, all from the same run.
"""
import datetime
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

RECORDS = []


def pytest_addoption(parser):
    parser.addoption("--bench-device", default="cuda" if torch.cuda.is_available() else "cpu",
                     choices=["cpu", "cuda"], help="device to benchmark on")
    parser.addoption("--bench-sizes", default="tiny,flux_720,hunyuan_480x53",
                     help="comma-separated sizes from workloads.SIZES")
    parser.addoption("--results-dir", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.addoption("--bench-threads", type=int, default=0,
                     help="torch CPU threads (0: torch's default); 1 is steadier on a shared machine")


def pytest_configure(config):
    threads = config.getoption("--bench-threads", default=0)
    if threads:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def bench_device(request):
    device = request.config.getoption("--bench-device")
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return device


@pytest.fixture
def record():
    def add(**fields):
        RECORDS.append(fields)
    return add


def pytest_sessionfinish(session, exitstatus):
    if not RECORDS:
        return
    import workloads
    from dancegrpo_fast.info import backend_info

    device = RECORDS[0]["device"]
    summary = {}
    for rec in RECORDS:
        if rec["kind"] == "copy_bandwidth":
            summary["copy_bandwidth_GBps"] = rec["bytes_per_s"] / 1e9
            continue
        entry = summary.setdefault(rec["size"], {})
        entry[rec["impl"]] = {k: rec[k] for k in ("median_s", "peak_bytes", "min_bytes", "latent_f32_bytes", "grad_bytes", "kernel_s", "kernel_s_error") if k in rec}
    for size, entry in summary.items():
        if not isinstance(entry, dict) or "fused" not in entry:
            continue
        fused = entry["fused"]
        for impl, stats in entry.items():
            if impl != "fused":
                stats["speedup_of_fused"] = stats["median_s"] / fused["median_s"]
                stats["peak_memory_ratio_to_fused"] = stats["peak_bytes"] / max(fused["peak_bytes"], 1)
        # beyond the gradient, in units of one latent-sized float32 buffer (target: <= 1)
        for stats in entry.values():
            stats["extra_f32_buffers"] = (stats["peak_bytes"] - stats["grad_bytes"]) / stats["latent_f32_bytes"]
        fused["achieved_GBps"] = fused["min_bytes"] / fused["median_s"] / 1e9
        if "copy_bandwidth_GBps" in summary:
            fused["fraction_of_copy_bandwidth"] = fused["achieved_GBps"] / summary["copy_bandwidth_GBps"]
        if fused.get("kernel_s"):
            # device time only (no launch overhead): what the kernels themselves achieve
            fused["kernel_GBps"] = fused["min_bytes"] / fused["kernel_s"] / 1e9
            if "copy_bandwidth_GBps" in summary:
                fused["kernel_fraction_of_copy_bandwidth"] = fused["kernel_GBps"] / summary["copy_bandwidth_GBps"]
    out = {
        "device": workloads.device_name(device),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "backends": backend_info(),
        "results": summary,
        "notes": "median_s: forward + backward of one training step's loss; peak_bytes: peak "
                 "allocation beyond the inputs during it (the gradient included); min_bytes: "
                 "bytes a forward + backward must move at least (read v, x, x' twice, write dL/dv); "
                 "kernel_s (CUDA): summed GPU kernel time per forward + backward, from the profiler.",
    }
    results_dir = session.config.getoption("--results-dir")
    os.makedirs(results_dir, exist_ok=True)
    path = os.path.join(results_dir, f"step_loss_{device}.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
    print(f"\nwrote {path}")
