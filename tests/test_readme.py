"""Every code block of README.md is exercised, so the README cannot drift from the code.

- ```python blocks run as pasted, each in a fresh interpreter in an empty folder.
- ```bash blocks: every `python -m dancegrpo_fast.X` (also under torchrun) names a module that
  runs with `--help`, and every `--option` the README passes to it is one of its options; every
  `scripts/*.sh` or `benchmarks/*.sh` a block runs exists.
- The `tiny.evaluate` command of the README prints the base score the README quotes.
- Relative links of README.md point at files that exist (and at headings that exist, for links
  with an anchor).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"


def code_blocks(text: str, language: str) -> list:
    """The bodies of the fenced blocks opened with ```<language>."""
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.S | re.M)


def shell_commands(block: str) -> list:
    """The commands of a bash block: comments dropped, backslash continuations joined."""
    joined = re.sub(r"\\\n\s*", " ", block)
    commands = []
    for line in joined.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", line).strip()
        if line:
            commands.append(line)
    return commands


def module_invocations(commands: list) -> dict:
    """{module: set of --options the README passes to it} for every `-m dancegrpo_fast.X`."""
    found = {}
    for command in commands:
        match = re.search(r"-m (dancegrpo_fast(?:\.\w+)*)(.*)$", command)
        if match:
            options = set(re.findall(r"(?:^|\s)(--[A-Za-z_][\w-]*)", match.group(2)))
            found.setdefault(match.group(1), set()).update(options)
    return found


def env_for_subprocess() -> dict:
    env = dict(os.environ)
    # The package of this checkout, whatever the current folder (the blocks run in tmp_path).
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


README_TEXT = README.read_text()
PYTHON_BLOCKS = code_blocks(README_TEXT, "python")
BASH_BLOCKS = code_blocks(README_TEXT, "bash")
BASH_COMMANDS = [c for block in BASH_BLOCKS for c in shell_commands(block)]
MODULES = module_invocations(BASH_COMMANDS)


def test_readme_has_the_blocks_this_test_reads():
    # If the fences change (```py, indented blocks), this test must be taught to find them.
    assert PYTHON_BLOCKS, "README.md has no ```python block"
    assert len(BASH_BLOCKS) >= 3, "README.md has fewer ```bash blocks than expected"
    assert {"dancegrpo_fast.train", "dancegrpo_fast.info", "dancegrpo_fast.tiny.evaluate"} <= set(MODULES)
    assert any("scripts/test.sh" in c for c in BASH_COMMANDS)


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_python_block_runs_as_pasted(index, tmp_path):
    block = PYTHON_BLOCKS[index]
    result = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, env=env_for_subprocess(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, (f"README python block {index} failed:\n{block}\n"
                                    f"--- stderr ---\n{result.stderr[-3000:]}")


def _help(module: str):
    return subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, env=env_for_subprocess(),
                          capture_output=True, text=True, timeout=120)


def test_bash_blocks_name_modules_that_accept_their_options():
    """`python -m X --help` exits 0 for every module of the bash blocks, and each --option the
    README passes is in that help (modules with no options of their own, like info, are only run)."""
    modules = sorted(MODULES)
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(modules, pool.map(_help, modules)))
    problems = []
    for module in modules:
        result = results[module]
        if result.returncode != 0:
            problems.append(f"python -m {module} --help exited {result.returncode}: {result.stderr[-1500:]}")
            continue
        for option in sorted(MODULES[module]):
            if not re.search(rf"(^|[\s\[,]){re.escape(option)}\b", result.stdout):
                problems.append(f"README passes {option} to python -m {module}, which does not list it in --help")
    assert not problems, "\n".join(problems)


def test_bash_blocks_name_scripts_that_exist():
    scripts = sorted({m for c in BASH_COMMANDS for m in re.findall(r"\b((?:scripts|benchmarks)/[\w./-]+\.(?:sh|py))", c)})
    assert scripts, "no scripts named in README bash blocks"
    missing = [s for s in scripts if not (REPO / s).is_file()]
    assert not missing, f"README bash blocks name scripts that do not exist: {missing}"


def _anchors(markdown: str) -> set:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    anchors = set()
    for heading in re.findall(r"^#+\s+(.*)$", markdown, re.M):
        anchors.add(re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-"))
    return anchors


def test_readme_links_point_at_files_and_headings_that_exist():
    problems = []
    for target in re.findall(r"\]\(([^)\s]+)\)", README_TEXT):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        file = README if not path else REPO / path
        if not file.exists():
            problems.append(f"{target}: {path} does not exist")
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file.read_text()):
            problems.append(f"{target}: no heading with anchor #{anchor} in {path or 'README.md'}")
    assert not problems, "\n".join(problems)
    assert "shared/SPEC.md" not in README_TEXT, "users have no ../shared: link docs/math.md instead"


def test_readme_evaluate_command_reproduces_the_quoted_base_score():
    """The README's `tiny.evaluate` command, run as written, prints the held-out score the README
    quotes for the shipped base model, mean and fully-correct rate (the trainer's iteration-0
    numbers). About 30 s."""
    command = next(c for c in BASH_COMMANDS if "dancegrpo_fast.tiny.evaluate" in c)
    quoted = float(re.search(r"shipped base model scores \*\*([0-9.]+)\*\*", README_TEXT).group(1))
    args = command.split()
    assert args[:3] == ["python", "-m", "dancegrpo_fast.tiny.evaluate"], command
    env = env_for_subprocess()
    env.pop("TRITON_INTERPRET", None)  # as a user runs it (the interpreter would only be slower)
    result = subprocess.run([sys.executable] + args[1:], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = json.loads(result.stdout[result.stdout.index("{"):])
    score = printed["score"]
    # Quoted to 3 decimals; a little slack for float differences between CPUs.
    assert abs(score - quoted) <= 0.0015, f"README quotes {quoted}, `{command}` prints {score:.4f}"
    quoted_fc = float(re.search(r'"fully correct" rate\) in \*\*([0-9.]+)\*\*', README_TEXT).group(1))
    # A rate over 512 samples: one sample is 0.002, so a float difference flipping one sample passes.
    assert abs(printed["fully_correct"] - quoted_fc) <= 0.0025, \
        f"README quotes fully correct {quoted_fc}, `{command}` prints {printed['fully_correct']:.4f}"
