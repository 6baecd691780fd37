#!/usr/bin/env bash
# Creates (or refreshes) the project's virtual environment and installs the package with its
# compiled extension. Run by scripts/test.sh and scripts/run.sh; safe to run again (a stamp file
# skips the install when nothing it depends on changed).
#
# It prints a few lines; pip's and the compiler's output goes to $VENV/setup.log. On a failure it
# prints the end of that log and its path.
#
#   VENV=path    where the venv lives (default: .venv in the repository)
#   PYTHON=exe   the Python that creates the venv (default: python3)
#   TORCH_SPEC   the torch requirement (default: torch==2.13.0, whichever build pip's indexes
#                offer: PyPI's Linux wheel is the CUDA build, which also runs on a CPU)
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VENV:-$repo/.venv}"
python="${PYTHON:-python3}"
torch_spec="${TORCH_SPEC:-torch==2.13.0}"
started=$(date +%s)

mkdir -p "$venv"
venv="$(cd "$venv" && pwd)"
log="$venv/setup.log"

# Runs a step with its output in the log; on failure says which step, shows the log's tail, stops.
step() {
    local what="$1"; shift
    echo "== $what: $*" >>"$log"
    if ! "$@" >>"$log" 2>&1; then
        echo "[setup] FAILED while $what. Last lines of $log:" >&2
        tail -n 25 "$log" | sed 's/^/    /' >&2
        echo "[setup] full log: $log" >&2
        exit 1
    fi
}

if [ ! -x "$venv/bin/python" ]; then
    : >"$log"
    echo "[setup] creating a virtual environment in $venv (details: $log)"
    step "creating the virtual environment" "$python" -m venv "$venv"
fi
vpy="$venv/bin/python"

# The stamp covers everything that changes what gets installed or compiled.
stamp_src="$(cat "$repo/pyproject.toml" "$repo/setup.py" "$repo"/csrc/* 2>/dev/null; echo "$torch_spec")"
stamp="$(printf '%s' "$stamp_src" | sha256sum | cut -d' ' -f1)"
if [ -f "$venv/.dancegrpo_fast_stamp" ] && [ "$(cat "$venv/.dancegrpo_fast_stamp")" = "$stamp" ] \
        && "$vpy" -c "import dancegrpo_fast" 2>/dev/null; then
    echo "[setup] environment up to date ($venv)"
    exit 0
fi

pipi() { "$vpy" -m pip install --disable-pip-version-check --no-input "$@"; }
echo "== $(date -u '+%Y-%m-%d %H:%M:%S UTC') installing into $venv" >>"$log"
echo "[setup] installing $torch_spec, numpy and the build tools (a few minutes the first time)"
# setuptools >= 77 reads the SPDX license of pyproject.toml. numpy comes before the build: torch
# imports it when the extension compiles, and warns "Failed to initialize NumPy" without it.
step "installing the build tools" pipi --upgrade pip "setuptools>=77" wheel ninja
step "installing torch and numpy" pipi "$torch_spec" numpy
echo "[setup] compiling the extension and installing dancegrpo_fast with its test, train, reward and wandb extras"
# --no-build-isolation: compile against the torch installed above, not a freshly downloaded one.
step "installing dancegrpo_fast" pipi --no-build-isolation -e "$repo[test,train,rewards,wandb]"
step "checking the installed package" "$vpy" -m dancegrpo_fast.info
echo "$stamp" > "$venv/.dancegrpo_fast_stamp"
summary="$("$vpy" -c '
from dancegrpo_fast.info import backend_info
i = backend_info(attention=False); e = i["extension"]  # the check above printed the attention table
print("torch", i["torch"] + ",", "triton", i.get("triton_version", "unavailable") + ",",
      "extension", ("built" + (" with CUDA" if e["cuda"] else "")) if e["built"] else "NOT built (PyTorch fallback)")
' 2>>"$log")" || summary="see $log"
echo "[setup] ready in $(( $(date +%s) - started )) s: $summary"
