#!/usr/bin/env bash
# Checks, on a machine WITHOUT a GPU, that the CUDA build of dancegrpo_fast works (issue 11):
#
#   1 torch    a separate venv with the CUDA build of the pinned torch (2.13.0; its PyPI Linux
#              wheel is built with CUDA 13.0, which matches nvcc 13.x) -- a few GB of downloads
#   2 build    DANCEGRPO_FAST_CUDA=1 TORCH_CUDA_ARCH_LIST="8.0;9.0" \
#                pip install --no-build-isolation ".[test,train,rewards]"
#   3 check    `import dancegrpo_fast._C` without a GPU, `python -m dancegrpo_fast.info` says the
#              CUDA kernels are built, `cuobjdump --list-elf` on _C*.so lists sm_80 and sm_90
#   4 tests    the CPU test suite in that venv (TRITON_INTERPRET=1, as scripts/test.sh), run in
#              the snapshot of the repository that was built (see stage_sources)
#   5 triton   tests/test_kernels_compile.py (Triton kernels compiled for sm_80/sm_90 without a
#              GPU) under triton 3.6.0 + torch 2.11.0, the versions on the lent GPU machines;
#              in a second venv unless the first one already has triton 3.6
#
# Not part of CI (downloads several GB). Safe to rerun: existing venvs are reused, the package is
# rebuilt from scratch every run. Everything is logged to benchmarks/results/cuda_build.log; pip
# output goes to a temporary folder (its path is logged). Exits non-zero when any step fails.
#
#   bash scripts/check_cuda_build.sh
#
# Settings (environment variables):
#   DANCEGRPO_VENVS        folder holding both venvs (default ~/.cache/dancegrpo_fast/venvs)
#   CUDA_VENV              venv for steps 1-4 (default $DANCEGRPO_VENVS/cuda-torch)
#   TRITON_VENV            venv for step 5 (default $DANCEGRPO_VENVS/triton36)
#   TORCH_VERSION          torch for steps 1-4 (default 2.13.0)
#   TRITON_TORCH_VERSION   torch for step 5 (default 2.11.0, which pins triton 3.6.0)
#   TRITON_VERSION         triton for step 5 (default 3.6.0)
#   TORCH_CUDA_ARCH_LIST   archs to build (default "8.0;9.0")
#   REQUIRED_SMS           cubins that must be in _C*.so (default "sm_80 sm_90")
#   CUDA_HOME              CUDA toolkit (default: first of $CUDA_PATH, /usr/local/cuda, nvcc's
#                          folder that has bin/nvcc and include/cuda_runtime.h)
#   STEPS                  subset of "torch build check tests triton" to run (default all)
#   CUDA_BUILD_LOG         log file (default benchmarks/results/cuda_build.log)
#   PYTHON                 interpreter for new venvs (default python3)
set -uo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venvs="${DANCEGRPO_VENVS:-${XDG_CACHE_HOME:-$HOME/.cache}/dancegrpo_fast/venvs}"
cuda_venv="${CUDA_VENV:-$venvs/cuda-torch}"
triton_venv="${TRITON_VENV:-$venvs/triton36}"
torch_version="${TORCH_VERSION:-2.13.0}"
triton_torch_version="${TRITON_TORCH_VERSION:-2.11.0}"
triton_version="${TRITON_VERSION:-3.6.0}"
arch_list="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
required_sms="${REQUIRED_SMS:-sm_80 sm_90}"
steps="${STEPS:-torch build check tests triton}"
log_file="${CUDA_BUILD_LOG:-$repo/benchmarks/results/cuda_build.log}"
python="${PYTHON:-python3}"
extras="test,train,rewards"

mkdir -p "$(dirname "$log_file")"
exec > >(tee "$log_file") 2>&1
tee_pid=$!
tmp="$(mktemp -d "${TMPDIR:-/tmp}/dancegrpo_cuda_build.XXXXXX")"
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1

declare -A result=()
order=(torch build check tests triton)
failed=0
log() { echo "[check_cuda_build $(date -u +%H:%M:%S)] $*"; }
pass() { result[$1]="PASS${2:+ ($2)}"; log "$1: PASS${2:+ ($2)}"; }
fail() { result[$1]="FAIL: $2"; failed=1; log "$1: FAIL: $2"; }
skip() { result[$1]="SKIP: $2"; log "$1: SKIP: $2"; }
want() { [[ " $steps " == *" $1 "* ]]; }
finish() {
    echo
    echo "==== summary ($(date -u +%Y-%m-%dT%H:%M:%SZ)) ===="
    for s in "${order[@]}"; do printf '  %-7s %s\n' "$s" "${result[$s]:-not run$(want "$s" || echo " (not in STEPS)")}"; done
    echo "  log: $log_file; pip and build output: $tmp"
    echo "  overall: $([ "$failed" -eq 0 ] && echo PASS || echo FAIL)"
    exec >&- 2>&-
    wait "$tee_pid" 2>/dev/null
    exit "$failed"
}

# pip with its noise in $tmp/pip-<name>.log: the log gets one line, or the tail on failure.
# The pip config of some machines adds --find-links folders holding a "+cpu" torch, which pip
# prefers over the plain PyPI version for torch==X (a local version label sorts higher); the
# callers below therefore ask for torch===X (exact version string, so never X+cpu).
pip_quiet() {
    local py="$1" name="$2"; shift 2
    local out="$tmp/pip-$name.log"
    if "$py" -m pip install "$@" >"$out" 2>&1; then
        local done_line
        done_line="$(grep -E '^Successfully installed' "$out" | tail -1 | cut -c1-300)"
        log "pip $name: ok (${done_line:-nothing to install}) [$out]"
        return 0
    fi
    log "pip $name: FAILED; compiler/pip errors, then the last lines of $out:"
    grep -E "error:|Error|FAILED:" "$out" | grep -v -E "subprocess-exited-with-error|failed-wheel-build" \
        | head -20 | sed 's/^/    /'
    echo "    ..."
    grep -v "is ignored: it is neither a file nor a directory" "$out" | tail -12 | sed 's/^/    /'
    return 1
}

# a venv's python; callers run it from $tmp, so that the installed package is the one imported
venv_py() { "$1/bin/python" "${@:2}"; }
torch_ok() {  # venv wanted-version [need-cuda]
    [ -x "$1/bin/python" ] && (cd "$tmp" && venv_py "$1" -c "
import sys, torch
sys.exit(0 if torch.__version__.split('+')[0] == '$2' and (torch.version.cuda or not '${3:-}') else 1)" 2>/dev/null)
}
make_venv() {
    if [ ! -x "$1/bin/python" ]; then
        log "creating venv $1"
        mkdir -p "$(dirname "$1")" && "$python" -m venv "$1" || return 1
    else
        log "reusing venv $1"
    fi
}

# A snapshot of the repository (sources and tests) in a folder of the venv, taken when the build
# starts. The build (build/, *.egg-info) and the test run happen there: they neither write into
# nor read from the working tree (whose build/ and in-place _C*.so belong to the CPU .venv), every
# run starts from a clean build folder, and the tests always match the code that was built even
# while the working tree is being edited.
stage_sources() {
    local stage="$1/.dancegrpo_fast_src"
    rm -rf "$stage" && mkdir -p "$stage" || return 1
    tar -C "$repo" --exclude='*.so' --exclude='__pycache__' --exclude='*.egg-info' --exclude='.pytest_cache' \
        -cf - pyproject.toml setup.py README.md csrc dancegrpo_fast tests | tar -C "$stage" -xf - || return 1
    echo "$stage"
}

# torch's CUDA build imported without numpy or a driver warns; not worth the log's space
noise="Failed to initialize NumPy|_conversion_method_template|No CUDA runtime is found"

# pytest's output in full to $tmp/pytest-<name>.log; to the log only the progress lines and the
# short summary (-ra), not the tracebacks. Returns pytest's exit code; sets $last (its last line).
run_pytest() {
    local name="$1" dir="$2"; shift 2
    local out="$tmp/pytest-$name.log"
    : >"$out"
    (cd "$dir" && "$@") >"$out" 2>&1 &
    local pid=$!
    tail -n +1 -f --pid="$pid" "$out" 2>/dev/null \
        | awk '/short test summary info/ {s = 1} s || /^[.sFExX]+ *(\[ *[0-9]+%\])?$/ {print; fflush()}'
    wait "$pid"
    local rc=$?
    last="$(grep -E '^=*.*(passed|failed|error|no tests ran).* in [0-9.]+s' "$out" | tail -1 | tr -d '=' | xargs)"
    log "full pytest output: $out"
    return "$rc"
}

log "repository $repo ($(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo '?'), \
$(git -C "$repo" status --porcelain 2>/dev/null | wc -l) changed paths)"
log "host: $(uname -srm), $(nproc) CPUs, GPU: $(nvidia-smi -L 2>/dev/null | head -1 || true)$(command -v nvidia-smi >/dev/null || echo none)"
log "steps: $steps; venvs: $cuda_venv, $triton_venv; temp: $tmp"

# ---- CUDA toolkit ----------------------------------------------------------------------------
cuda_home=""
nvcc_dir="$(dirname "$(dirname "$(readlink -f "$(command -v nvcc 2>/dev/null || echo /nonexistent/bin/nvcc)")")")"
for c in "${CUDA_HOME:-}" "${CUDA_PATH:-}" /usr/local/cuda "$nvcc_dir"; do
    if [ -n "$c" ] && [ -x "$c/bin/nvcc" ] && [ -f "$c/include/cuda_runtime.h" ]; then cuda_home="$c"; break; fi
done
if [ -z "$cuda_home" ]; then
    log "no CUDA toolkit found (CUDA_HOME, CUDA_PATH, /usr/local/cuda, nvcc on PATH): cannot build"
    for s in "${order[@]}"; do want "$s" && [ "$s" != triton ] && fail "$s" "no CUDA toolkit (nvcc)"; done
    finish
fi
export CUDA_HOME="$cuda_home"
nvcc_release="$("$cuda_home/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\),.*/\1/p')"
log "CUDA_HOME=$cuda_home; nvcc $nvcc_release ($("$cuda_home/bin/nvcc" --version | tail -1)); \
host compiler: $(${CXX:-c++} --version 2>/dev/null | head -1)"
log "TORCH_CUDA_ARCH_LIST=\"$arch_list\"; required cubins: $required_sms"

vpy="$cuda_venv/bin/python"
# ---- 1 torch -------------------------------------------------------------------------------
if want torch; then
    if make_venv "$cuda_venv"; then
        if torch_ok "$cuda_venv" "$torch_version" cuda; then
            log "torch $torch_version (CUDA build) already installed"
        else
            pip_quiet "$vpy" base --upgrade pip setuptools wheel ninja \
                && pip_quiet "$vpy" torch "torch===$torch_version"
        fi
        versions="$(cd "$tmp" && venv_py "$cuda_venv" -c "
import torch, triton
print(torch.__version__, torch.version.cuda or 'none', triton.__version__)" 2>/dev/null)"
        read -r t_ver t_cuda t_triton <<<"$versions"
        log "venv $cuda_venv: torch ${t_ver:-?} (torch.version.cuda ${t_cuda:-?}), triton ${t_triton:-?}, nvcc $nvcc_release"
        if [ -z "$versions" ]; then
            fail torch "torch $torch_version could not be installed or imported (see $tmp/pip-torch.log)"
        elif [ "$t_cuda" = none ]; then
            fail torch "torch $t_ver is a CPU build (torch.version.cuda is None)"
        elif [ "${t_cuda%%.*}" != "${nvcc_release%%.*}" ]; then
            # torch.utils.cpp_extension refuses to build when the CUDA major versions differ
            fail torch "torch is built with CUDA $t_cuda but nvcc is $nvcc_release (major versions must match)"
        else
            note="torch $t_ver, CUDA $t_cuda"
            [ "$t_cuda" != "$nvcc_release" ] && note="$note; nvcc $nvcc_release: minor mismatch, allowed"
            pass torch "$note"
        fi
    else
        fail torch "could not create $cuda_venv"
    fi
fi

# ---- 2 build -------------------------------------------------------------------------------
so=""
if want build; then
    if [[ "${result[torch]:-PASS}" != PASS* ]]; then
        skip build "no CUDA torch (step torch failed)"
    elif stage="$(stage_sources "$cuda_venv")"; then
        "$vpy" -m pip uninstall -y -q dancegrpo_fast >/dev/null 2>&1
        log "building: DANCEGRPO_FAST_CUDA=1 TORCH_CUDA_ARCH_LIST=\"$arch_list\" pip install -v --no-build-isolation \".[$extras]\" (in a snapshot of the repository: $stage)"
        start=$SECONDS
        if (cd "$stage" && DANCEGRPO_FAST_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch_list" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
                pip_quiet "$vpy" build -v --no-build-isolation ".[$extras]"); then
            gencode="$(grep -o -- '-gencode[= ]arch=compute_[0-9a-z]*,code=[a-z_0-9]*' "$tmp/pip-build.log" | sort -u | tr '\n' ' ')"
            log "nvcc arch flags used: ${gencode:-none found in the build output}"
            grep -E "warning" "$tmp/pip-build.log" | grep -v -E "is ignored: it is neither|Failed to initialize NumPy|byte-compiling is disabled" \
                | sort -u | head -10 | sed 's/^/    build warning: /'
            so="$(cd "$tmp" && venv_py "$cuda_venv" -c \
                "import importlib.util as u; print(u.find_spec('dancegrpo_fast._C').origin)" 2>/dev/null)"
            if [ -n "$so" ] && [ -f "$so" ]; then
                # also in place in the snapshot, for the tests (their subprocesses import the
                # package from the snapshot through PYTHONPATH)
                cp "$so" "$stage/dancegrpo_fast/"
                pass build "$((SECONDS - start)) s; $so"
            else
                fail build "installed, but no dancegrpo_fast/_C*.so in $cuda_venv"
            fi
        else
            fail build "pip install failed (see $tmp/pip-build.log)"
        fi
    else
        fail build "could not copy the sources"
    fi
fi

# ---- 3 check -------------------------------------------------------------------------------
if want check; then
    [ -z "$so" ] && so="$(cd "$tmp" && venv_py "$cuda_venv" -c \
        "import importlib.util as u; print(u.find_spec('dancegrpo_fast._C').origin)" 2>/dev/null)"
    if [ -z "$so" ] || [ ! -f "$so" ]; then
        fail check "no built dancegrpo_fast._C in $cuda_venv"
    else
        problems=()
        # a) import without a GPU (CUDA_VISIBLE_DEVICES hides any GPU of this machine)
        log "import dancegrpo_fast._C with CUDA_VISIBLE_DEVICES=''"
        import_text="$(cd "$tmp" && CUDA_VISIBLE_DEVICES="" venv_py "$cuda_venv" -c "
import torch, dancegrpo_fast, dancegrpo_fast._C as C
print('dancegrpo_fast from', dancegrpo_fast.__file__)
print('_C from', C.__file__, '| has_cuda():', C.has_cuda(), '| torch.cuda.is_available():', torch.cuda.is_available())
print('CPU call philox_normal_scalar(1, 0) =', C.philox_normal_scalar(1, 0))
assert C.has_cuda(), '_C was compiled without its CUDA kernel'
" 2>&1)" || problems+=("import dancegrpo_fast._C failed or _C.has_cuda() is False")
        echo "$import_text" | grep -v -E "$noise" | sed 's/^/  /'
        # b) python -m dancegrpo_fast.info
        log "python -m dancegrpo_fast.info"
        info_text="$(cd "$tmp" && CUDA_VISIBLE_DEVICES="" venv_py "$cuda_venv" -m dancegrpo_fast.info 2>&1)"
        echo "$info_text" | grep -v -E "$noise" | sed 's/^/  /'
        echo "$info_text" | grep -q -E "extension _C +built, CUDA kernels: yes" \
            || problems+=("dancegrpo_fast.info does not report 'extension _C built, CUDA kernels: yes'")
        # c) cubins in the shared object
        cuobjdump=""
        for c in "$cuda_home/bin/cuobjdump" "$(command -v cuobjdump 2>/dev/null)" \
                "$("$vpy" -c 'import os, triton; print(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump"))' 2>/dev/null)"; do
            if [ -n "$c" ] && [ -x "$c" ]; then cuobjdump="$c"; break; fi
        done
        if [ -z "$cuobjdump" ]; then
            problems+=("no cuobjdump (CUDA toolkit or triton/backends/nvidia/bin)")
        else
            log "$cuobjdump --list-elf $(basename "$so") ($("$cuobjdump" --version | tail -1))"
            elf="$("$cuobjdump" --list-elf "$so" 2>&1)"
            echo "$elf" | sed 's/^/  /'
            log "$cuobjdump --list-ptx $(basename "$so")"
            "$cuobjdump" --list-ptx "$so" 2>&1 | sed 's/^/  /'
            for sm in $required_sms; do
                echo "$elf" | grep -q -E "\.${sm}\.cubin\$" || problems+=("no $sm cubin in $(basename "$so")")
            done
        fi
        if [ "${#problems[@]}" -eq 0 ]; then
            pass check "imports without a GPU, CUDA kernels built, cubins: $required_sms"
        else
            fail check "$(printf '%s; ' "${problems[@]}" | sed 's/; $//')"
        fi
    fi
fi

# ---- 4 tests -------------------------------------------------------------------------------
# In the snapshot of step build (its package folder holds the _C*.so just built), as
# scripts/test.sh runs them in the repository.
if want tests; then
    stage="$cuda_venv/.dancegrpo_fast_src"
    if [[ "${result[build]:-PASS}" != PASS* ]]; then
        skip tests "nothing built (step build did not pass)"
    elif ! ls "$stage"/dancegrpo_fast/_C*.so >/dev/null 2>&1 || [ ! -d "$stage/tests" ]; then
        fail tests "no built snapshot in $stage (run step build)"
    else
        where="$(cd "$stage" && "$vpy" -c "
import dancegrpo_fast._C as C; print(C.__file__, 'has_cuda:', C.has_cuda())" 2>/dev/null | tail -1)"
        log "test suite: cd $stage && TRITON_INTERPRET=1 $vpy -m pytest -q -ra -p no:cacheprovider tests/"
        log "  (snapshot of $repo taken at the build; _C: ${where:-not importable})"
        start=$SECONDS
        run_pytest suite "$stage" env TRITON_INTERPRET=1 "$vpy" -m pytest -q -ra -p no:cacheprovider tests/
        rc=$?
        if [ "$rc" -ne 0 ]; then
            fail tests "pytest exit code $rc: ${last:-see $tmp/pytest-suite.log}"
        elif [[ "$where" != "$stage"/*"has_cuda: True" ]]; then
            fail tests "passed, but not with the CUDA build of _C (${where:-not importable})"
        else
            pass tests "${last:-?} ($((SECONDS - start)) s)"
        fi
    fi
fi

# ---- 5 triton ------------------------------------------------------------------------------
# The kernels must also compile under the triton on the lent GPU machines (3.6.0, which comes
# with torch 2.11.0); torch 2.13.0 pins triton 3.7.1, so this usually needs a second venv.
if want triton; then
    test_file="tests/test_kernels_compile.py"
    t_venv="$triton_venv"
    cuda_triton="$( [ -x "$vpy" ] && cd "$tmp" && venv_py "$cuda_venv" -c 'import triton; print(triton.__version__)' 2>/dev/null)"
    if [[ -n "$cuda_triton" && "$cuda_triton" == "$triton_version"* && "${result[build]:-PASS}" == PASS* ]]; then
        log "the torch $torch_version venv already has triton $cuda_triton: reusing it"
        t_venv="$cuda_venv"
    fi
    tpy="$t_venv/bin/python"
    t_stage="$t_venv/.dancegrpo_fast_src"  # the snapshot the test runs in
    ok=1
    if [ "$t_venv" != "$cuda_venv" ]; then
        make_venv "$t_venv" || ok=0
        if [ "$ok" -eq 1 ]; then
            if torch_ok "$t_venv" "$triton_torch_version" && (cd "$tmp" && venv_py "$t_venv" -c \
                    "import sys, triton; sys.exit(triton.__version__ != '$triton_version')" 2>/dev/null); then
                log "torch $triton_torch_version and triton $triton_version already installed"
            else
                { pip_quiet "$tpy" triton-base --upgrade pip setuptools wheel \
                    && pip_quiet "$tpy" triton-torch "torch===$triton_torch_version" "triton==$triton_version"; } || ok=0
            fi
        fi
        if [ "$ok" -eq 1 ]; then
            # the package itself (Python only: the compile test needs no extension)
            if stage_sources "$t_venv" >/dev/null; then
                "$tpy" -m pip uninstall -y -q dancegrpo_fast >/dev/null 2>&1
                (cd "$t_stage" && DANCEGRPO_FAST_NO_EXTENSION=1 pip_quiet "$tpy" triton-package --no-build-isolation ".[test]") || ok=0
            else
                ok=0
            fi
        fi
    fi
    versions="$( [ -x "$tpy" ] && cd "$tmp" && venv_py "$t_venv" -c "
import torch, triton
print(torch.__version__, torch.version.cuda or 'none', triton.__version__)" 2>/dev/null)"
    log "venv $t_venv: torch/torch.version.cuda/triton: ${versions:-not importable}"
    if [ "$ok" -ne 1 ] || [ -z "$versions" ]; then
        fail triton "could not set up $t_venv (see $tmp/pip-triton-*.log)"
    elif [ "$(echo "$versions" | cut -d' ' -f3)" != "$triton_version" ]; then
        fail triton "$t_venv has triton $(echo "$versions" | cut -d' ' -f3), not $triton_version"
    elif [ ! -f "$t_stage/$test_file" ]; then
        skip triton "$test_file does not exist yet (venv $t_venv is ready; rerun with STEPS=triton)"
    else
        log "cd $t_stage && $tpy -m pytest -q -ra -p no:cacheprovider $test_file  (TRITON_INTERPRET unset)"
        run_pytest triton "$t_stage" env -u TRITON_INTERPRET "$tpy" -m pytest -q -ra -p no:cacheprovider "$test_file"
        rc=$?
        if [ "$rc" -eq 0 ] && [[ "$last" == *passed* ]]; then
            pass triton "triton $triton_version: ${last}"
        elif [ "$rc" -eq 0 ]; then
            fail triton "no test passed (all skipped?): $last"
        else
            fail triton "pytest exit code $rc: ${last:-see $tmp/pytest-triton.log}"
        fi
    fi
fi

finish
