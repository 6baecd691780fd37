#!/usr/bin/env bash
# Checks the version floors of pyproject.toml: creates a fresh virtual environment, installs every
# declared requirement at exactly its floor (">=X" becomes "==X"; unpinned ones at their newest),
# and runs the fast tests that exercise those packages against the checkout (PYTHONPATH, no
# install, so the extension already built in dancegrpo_fast/ is used when its torch matches).
#
#   bash scripts/check_floors.sh [LOG]     (default LOG: benchmarks/results/floors.log)
#
#   PYTHON=exe        the Python that creates the venv (default: python3)
#   FLOORS_VENV=path  where the venv goes (default: a new temporary folder, removed at the end)
#   TORCH_SPEC=spec   torch to install instead of the floor, e.g. torch==2.13.0 on a machine whose
#                     indexes have no CPU build of the floor torch (PyPI's Linux wheels are CUDA
#                     builds with several GB of nvidia-* dependencies); the log says which ran
#   FLOORS_TESTS="tests/a.py tests/b.py"   the tests to run (default: the list below)
#   FLOORS_NOTE=text  a note written at the top of the log (e.g. what this machine could not check)
set -uo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
log="${1:-$repo/benchmarks/results/floors.log}"
python="${PYTHON:-python3}"
venv="${FLOORS_VENV:-$(mktemp -d /tmp/dancegrpo_floors.XXXXXX)/venv}"
tests="${FLOORS_TESTS:-tests/test_flux_packing.py tests/test_policies.py tests/test_config.py tests/test_sde.py
    tests/test_grpo.py tests/test_fused_ops.py tests/test_tiny_model.py tests/test_rewards_models.py
    tests/test_compile.py}"
mkdir -p "$(dirname "$log")"
: >"$log"
say() { echo "[floors $(date -u +%H:%M:%S)] $*" | tee -a "$log"; }

# The floors, read from pyproject.toml (project dependencies and every extra).
requirements=$("$python" - "$repo/pyproject.toml" <<'EOF'
import re, sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
specs = list(project["dependencies"])
for extra in project["optional-dependencies"].values():
    specs += extra
pinned = {}
for spec in specs:
    match = re.fullmatch(r"([A-Za-z0-9_.\-]+)\s*(>=\s*([0-9][^,;\s]*))?", spec.strip())
    if not match:
        sys.exit(f"check_floors: cannot read the requirement {spec!r} (expected 'name' or 'name>=version')")
    name, floor = match.group(1).lower(), match.group(3)
    pinned[name] = f"{name}=={floor}" if floor else pinned.get(name, name)
print(" ".join(pinned.values()))
EOF
) || { say "FAILED reading pyproject.toml"; exit 1; }
torch_floor=$(tr ' ' '\n' <<<"$requirements" | grep '^torch==')
torch_spec="${TORCH_SPEC:-$torch_floor}"
others=$(tr ' ' '\n' <<<"$requirements" | grep -v '^torch==' | tr '\n' ' ')
[ -n "${FLOORS_NOTE:-}" ] && say "note: $FLOORS_NOTE"
say "declared floors: $requirements"
[ "$torch_spec" != "$torch_floor" ] && say "NOTE: torch installed as $torch_spec instead of the floor $torch_floor (TORCH_SPEC)"

say "creating $venv"
"$python" -m venv "$venv" >>"$log" 2>&1 || { say "FAILED creating the venv"; exit 1; }
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
say "installing $torch_spec"
"${pip[@]}" install "$torch_spec" >>"$log" 2>&1 || { say "FAILED installing $torch_spec"; exit 1; }
# torch stays as installed (-c keeps the resolver from replacing it) while the floors go in.
"$venv/bin/python" -c "import torch; print('torch==' + torch.__version__.split('+')[0])" >"$venv/torch-constraint.txt" \
    || { say "FAILED importing the installed torch"; exit 1; }
say "installing the floors: $others"
# shellcheck disable=SC2086
"${pip[@]}" install -c "$venv/torch-constraint.txt" $others >>"$log" 2>&1 || { say "FAILED installing the floors"; exit 1; }
say "installed: $("${pip[@]}" list --format=freeze 2>/dev/null | grep -iE '^(torch|numpy|triton|diffusers|transformers|peft|safetensors|huggingface.hub|tokenizers|pytest|pytest.benchmark)==' | tr '\n' ' ')"

cd "$repo"
say "running: pytest $(echo $tests)"
# shellcheck disable=SC2086
PYTHONPATH="$repo" TRITON_INTERPRET=1 timeout "${FLOORS_TIMEOUT:-1500}" "$venv/bin/python" -m pytest -q -ra \
    -p no:cacheprovider $tests >>"$log" 2>&1
status=$?
tail -n 15 "$log" | grep -E "passed|failed|error" | tail -1 | sed 's/^/  /'
say "tests finished with status $status"
[ -z "${FLOORS_VENV:-}" ] && rm -rf "$(dirname "$venv")"
exit $status
