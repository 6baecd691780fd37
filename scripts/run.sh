#!/usr/bin/env bash
# The main job on its built-in default: sets up .venv (scripts/setup_env.sh), then runs
# `python -m dancegrpo_fast.train` with any arguments given here (none: the built-in default).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/scripts/setup_env.sh"
venv="${VENV:-$repo/.venv}"
cd "$repo"
exec "$venv/bin/python" -m dancegrpo_fast.train "$@"
