"""The package's import structure: data flows one way (prompts -> rollout -> rewards ->
advantages -> update), so imports only go down the layers below. Checked statically over every
module's imports (those inside functions included): no cycles, nothing imports the trainer, the
reward and policy layers never import the tiny task, and only the tiny task names itself."""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

PACKAGE = Path(__file__).resolve().parents[1] / "dancegrpo_fast"

# Lowest first. A module may import modules of its own layer or of layers below it.
LAYERS: List[List[str]] = [
    ["sde", "noise", "trajectory", "distributed", "logging_utils", "wandb_logging", "config", "kernels",
     "meta_measure", "sharded_checkpoint", "sde_window"],
    ["schedules", "ops", "grpo", "ddpo", "multistep"],
    ["policies", "rewards", "checkpoint", "reports", "prompts"],
    ["rollout", "output_lock", "run_report"],
    ["update", "evaluator", "model_setup", "export"],
    ["tiny", "pretrain_tiny", "plan", "dry_run", "architectures", "info"],
    ["train"],
    ["__init__"],
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def package_modules() -> Dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts}


def imports_of(path: Path, modules: Dict[str, Path]) -> Set[str]:
    """Package modules `path` imports (resolving relative imports; `from X import name` counts
    as importing X.name when that is a module)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                root = ".".join(base + ([node.module] if node.module else []))
            else:
                root = node.module or ""
            targets = [f"{root}.{alias.name}" if f"{root}.{alias.name}" in modules else root for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph() -> Dict[str, Set[str]]:
    modules = package_modules()
    return {name: imports_of(path, modules) for name, path in modules.items()}


def layer_of(module: str) -> int:
    first = module.split(".")[1] if "." in module else "__init__"
    for index, layer in enumerate(LAYERS):
        if first in layer:
            return index
    raise AssertionError(f"module {module} is in no layer of tests/test_layering.py: place it")


def test_every_module_has_a_layer_and_imports_only_downwards():
    wrong = []
    for module, targets in graph().items():
        for target in targets:
            if layer_of(target) > layer_of(module):
                wrong.append(f"{module} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)})")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycles():
    edges = graph()
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    cycles = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in edges[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in edges:
        if node not in index:
            visit(node)
    assert not cycles, f"import cycles: {cycles}"


def test_nothing_imports_the_trainer_and_lower_layers_do_not_import_the_tiny_task():
    edges = graph()
    assert [m for m, targets in edges.items() if "dancegrpo_fast.train" in targets] == []
    for module, targets in edges.items():
        if module.startswith(("dancegrpo_fast.rewards", "dancegrpo_fast.policies")):
            assert not any(t.startswith("dancegrpo_fast.tiny") for t in targets), (module, targets)


def test_only_the_tiny_task_knows_it_is_tiny():
    """No `family == "tiny"` branches outside dancegrpo_fast/tiny: the task comes in as data (its
    preset) like a user's own."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.relative_to(PACKAGE).parts[0] in ("tiny", "pretrain_tiny.py"):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if ('== "tiny"' in line or "== 'tiny'" in line) and not line.lstrip().startswith("#"):
                offenders.append(f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
