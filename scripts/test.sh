#!/usr/bin/env bash
# The project's test command: sets up .venv (scripts/setup_env.sh) and runs the whole suite on
# the CPU, Triton kernels included (TRITON_INTERPRET=1). Extra arguments go to pytest.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/scripts/setup_env.sh"
venv="${VENV:-$repo/.venv}"
cd "$repo"
export TRITON_INTERPRET="${TRITON_INTERPRET-1}"
exec "$venv/bin/python" -m pytest -q -ra "$@"
