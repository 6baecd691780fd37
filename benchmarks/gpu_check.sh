#!/usr/bin/env bash
# GPU validation in one go (under 8 minutes on an H100/H200): builds the CUDA extension against
# the machine's torch, runs the test suite on CUDA (compiled Triton kernels against the reference,
# grouped_noise CUDA against CPU), runs the benchmarks, and leaves everything in one folder.
#
#   bash benchmarks/gpu_check.sh [OUTDIR]      (default: $OUT if set, else benchmarks/results/gpu)
#
# Uses the python3 that holds a CUDA torch (no venv: the GPU image ships torch and triton).
set -uo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-${OUT:-$repo/benchmarks/results/gpu}}"
mkdir -p "$out"
cd "$repo"
py="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
status=0

log() { echo "[gpu_check $(date -u +%H:%M:%S)] $*" | tee -a "$out/gpu_check.log"; }

log "device: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1)"
log "building the extension with CUDA"
if ! DANCEGRPO_FAST_CUDA=1 "$py" -m pip install --no-build-isolation --no-deps -e . >"$out/build.log" 2>&1; then
    log "BUILD FAILED (see build.log)"; tail -30 "$out/build.log"; status=1
fi
"$py" -m dancegrpo_fast.info --json > "$out/info.json" 2>&1
cat "$out/info.json"

log "tests on CUDA (compiled Triton, CUDA extension)"
# No TRITON_INTERPRET here: the kernels compile for the GPU. The CPU-only tests run too.
timeout 240 "$py" -m pytest -q -x -p no:cacheprovider tests/test_fused_ops_cuda.py tests/test_grouped_noise.py \
    tests/test_sde.py tests/test_grpo.py --junitxml="$out/tests.xml" 2>&1 | tee "$out/tests.log" | tail -25
[ "${PIPESTATUS[0]}" -eq 0 ] || { log "TESTS FAILED"; status=1; }

log "benchmarks: fused step loss vs eager vs torch.compile"
timeout 240 "$py" -m pytest -q -p no:cacheprovider benchmarks/test_step_loss_bench.py --bench-device cuda \
    --results-dir "$out" --benchmark-json="$out/step_loss_pytest_benchmark.json" 2>&1 | tee "$out/bench.log" | tail -30
[ "${PIPESTATUS[0]}" -eq 0 ] || { log "BENCHMARKS FAILED"; status=1; }

"$py" benchmarks/summarize.py "$out/step_loss_cuda.json" 2>&1 | tee -a "$out/gpu_check.log"
log "done (status $status); results in $out"
exit $status
