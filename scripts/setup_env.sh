#!/usr/bin/env bash
# Creates (or refreshes) the project's virtual environment and installs the package with its
# compiled extension. Sourced by scripts/test.sh and scripts/run.sh; safe to run again (a stamp
# file skips the install when nothing it depends on changed).
#
#   VENV=path    where the venv lives (default: .venv in the repository)
#   TORCH_SPEC   the torch requirement (default: torch==2.13.0, the CPU build, when no NVIDIA GPU
#                is visible; with a GPU the same version, whose PyPI build has CUDA)
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VENV:-$repo/.venv}"
python="${PYTHON:-python3}"
torch_spec="${TORCH_SPEC:-torch==2.13.0}"

if [ ! -x "$venv/bin/python" ]; then
    echo "[setup] creating virtual environment in $venv"
    "$python" -m venv "$venv"
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

pipq() { "$vpy" -m pip install --disable-pip-version-check -q "$@"; }
echo "[setup] installing $torch_spec and build tools"
pipq --upgrade pip setuptools wheel ninja
pipq "$torch_spec"
echo "[setup] installing dancegrpo_fast (compiling its extension) with test, train and reward extras"
# --no-build-isolation: compile against the torch installed above, not a freshly downloaded one.
pipq --no-build-isolation -e "$repo[test,train,rewards]"
echo "$stamp" > "$venv/.dancegrpo_fast_stamp"
"$vpy" -m dancegrpo_fast.info
