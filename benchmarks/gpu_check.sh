#!/usr/bin/env bash
# GPU validation in one go, within GPU_CHECK_BUDGET seconds (default 480: every step's time limit
# is cut to what is left of it, and the least important step, 5, comes last; parts timed on an
# H200 on 2026-12-01: the full-size FLUX benchmark with two variants 114 s, the step-loss
# benchmarks 19 s). Uses the python3 that holds a CUDA torch
# (no venv: GPU images ship torch and Triton); missing pure-Python packages (diffusers and what it
# needs) come as wheels in .whl/.
#
#   1. builds the CUDA extension against the machine's torch (TORCH_CUDA_ARCH_LIST, default 9.0)
#   2. tests on CUDA: compiled Triton kernels against the float64 reference, grouped noise CUDA
#      against CPU, the math tests, and the Triton compile check (tests/test_kernels_compile.py) on
#      the machine's own Triton
#   3. one training iteration of a full-size FLUX.1-dev transformer (random weights, bf16, LoRA):
#      this trainer as the preset sets it, with MixGRPO's SDE window (4 trained SDE steps,
#      second-order ODE steps outside), and the reference loop shape (benchmarks/bench_flux_iteration.py;
#      FLUX_VARIANTS picks others, e.g. trainer_batched; each variant holds its own 24 GB model)
#   4. step-loss benchmarks: fused vs eager vs torch.compile, time, fraction of the measured copy
#      bandwidth, peak memory (benchmarks/test_step_loss_bench.py)
#   5. --compile on the tiny model: eager vs compiled (per block), rollout and update
#      seconds per iteration, compile time, log-prob and weight differences (benchmarks/bench_compile.py)
#
#   bash benchmarks/gpu_check.sh [OUTDIR]      (default: $OUT if set, else benchmarks/results/gpu)
#
# At most 8 files land in OUTDIR (the device tool brings back 8): gpu_check.log (info.json's
# content included), build.log, tests.log, flux.log, flux_iteration_cuda.json, bench.log,
# step_loss_cuda.json, compile_cuda.json.
set -uo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-${OUT:-$repo/benchmarks/results/gpu}}"
mkdir -p "$out"
cd "$repo"
py="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
status=0
started=$(date +%s)

budget="${GPU_CHECK_BUDGET:-480}"
# limit MAX: the step's own limit, or what is left of the budget if that is less (at least 10 s).
limit() { local left=$(( budget - ($(date +%s) - started) )); [ "$left" -lt 10 ] && left=10; [ "$1" -lt "$left" ] && echo "$1" || echo "$left"; }

log() { echo "[gpu_check $(date -u +%H:%M:%S) +$(( $(date +%s) - started ))s] $*" | tee -a "$out/gpu_check.log"; }

log "device: $(nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv,noheader 2>&1)"
if ls .whl/*.whl >/dev/null 2>&1; then
    # Wheels of packages the GPU image lacks (diffusers, importlib_metadata), downloaded beforehand on a
    # machine with PyPI: pip download --no-deps --python-version 3.12 ... -d .whl diffusers==X importlib_metadata==Y
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        >>"$out/build.log" 2>&1 && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    log "carried wheels: $(cd .whl && ls *.whl | tr '\n' ' ')"
fi
log "versions: $("$py" -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)' 2>&1), $(nvcc --version 2>&1 | tail -1)"

log "1. building the extension with CUDA (TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0})"
if ! TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" DANCEGRPO_FAST_CUDA=1 \
        timeout "$(limit 240)" "$py" -m pip install --no-build-isolation --no-deps -e . >>"$out/build.log" 2>&1; then
    log "BUILD FAILED (see build.log)"; tail -30 "$out/build.log"; status=1
fi
"$py" -m dancegrpo_fast.info --json 2>&1 | tee -a "$out/gpu_check.log"
so=$(ls dancegrpo_fast/_C*.so 2>/dev/null | head -1)
[ -n "$so" ] && log "extension: $so; $(cuobjdump --list-elf "$so" 2>&1 | tr '\n' ' ')"

log "2. tests on CUDA (compiled Triton, CUDA extension, Triton compile check, attention auto vs SDPA under bf16)"
# No TRITON_INTERPRET here: the kernels compile for the GPU. The CPU-only tests run too.
timeout "$(limit 200)" "$py" -m pytest -q -ra -p no:cacheprovider tests/test_fused_ops_cuda.py tests/test_grouped_noise.py \
    tests/test_sde.py tests/test_grpo.py tests/test_kernels_compile.py tests/test_attention.py 2>&1 | tee "$out/tests.log" | tail -15
[ "${PIPESTATUS[0]}" -eq 0 ] || { log "TESTS FAILED"; status=1; }
# The compile check's table (registers, spills, shared memory, load widths) on this Triton.
timeout "$(limit 120)" "$py" -m pytest -q -s -p no:cacheprovider tests/test_kernels_compile.py >>"$out/tests.log" 2>&1 || true

log "3. one training iteration of a full-size FLUX.1-dev transformer: this trainer, with and without the SDE window, vs the reference loop shape"
timeout "$(limit 300)" "$py" benchmarks/bench_flux_iteration.py --group-size "${FLUX_GROUP_SIZE:-4}" --repeats "${FLUX_REPEATS:-1}" \
    --variants "${FLUX_VARIANTS:-trainer_preset,trainer_window,reference_loop}" \
    --output "$out/flux_iteration_cuda.json" 2>&1 | tee "$out/flux.log" | grep -v -E "truncated|Token indices" | tail -12
[ "${PIPESTATUS[0]}" -eq 0 ] || { log "FLUX ITERATION FAILED (see flux.log)"; status=1; }

log "4. benchmarks: fused step loss vs eager vs torch.compile"
timeout "$(limit 200)" "$py" -m pytest -q -p no:cacheprovider benchmarks/test_step_loss_bench.py --bench-device cuda \
    --bench-sizes "${BENCH_SIZES:-tiny,flux_720,hunyuan_480x53,hunyuan_720x1280x129}" \
    --results-dir "$out" 2>&1 | tee "$out/bench.log" | tail -8
[ "${PIPESTATUS[0]}" -eq 0 ] || { log "BENCHMARKS FAILED"; status=1; }
"$py" benchmarks/summarize.py "$out/step_loss_cuda.json" 2>&1 | tee -a "$out/gpu_check.log"
[ -f "$out/flux_iteration_cuda.json" ] && "$py" benchmarks/summarize.py "$out/flux_iteration_cuda.json" 2>&1 | tee -a "$out/gpu_check.log"

log "5. --compile on the tiny model: eager vs compiled (inductor), rollout/update time, compile time"
timeout "$(limit 420)" "$py" benchmarks/bench_compile.py --device cuda --iterations 3 --variants eager,blocks \
    --timeout 100 --output "$out/compile_cuda.json" 2>&1 | grep -v -E "Warning|warn" | tee -a "$out/bench.log" | tail -5
[ "${PIPESTATUS[0]}" -eq 0 ] || { log "COMPILE BENCHMARK FAILED (see bench.log)"; status=1; }

log "done (status $status); results in $out"
exit $status
