"""The import graph of training/ and analysis/ against docs/architecture.md: each outside system has one room, the
engine imports none of them, and no module-level imports go in a circle.

Read from the source with ``ast`` (nothing is imported), so a rule names the file and the import that breaks it.
``python tests/test_architecture.py [ROOT]`` prints the graph, a line per module, and any broken rule.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("training", "analysis")
ENTRY_POINTS = {"training.__main__"}  # `python -m training` is the command line itself, like the console script

# The engine: the round loop and what it runs. It receives plain values and hands results to callbacks.
ENGINE = {f"training.{name}" for name in ("rounds", "client", "aggregate", "strategy", "executor", "distributed",
                                          "divergence", "federation", "checkpoint", "evaluate", "lora")}
NEVER_IN_ENGINE = ("mlflow", "optuna", "docker", "training.tracking", "training.tune", "training.tune_tracking",
                   "training.registry", "training.promote")
# arithmetic over state dicts: nothing from training but aggregate
PURE = {"training.aggregate", "training.strategy", "training.divergence"}
# Each outside system's room: the only modules that may import it (module level or inside a function).
ROOMS = {
    "torch.distributed": {"training.distributed"},
    "docker": {"training.launch"},
    "peft": {"training.lora"},
    "optuna": {"training.tune", "training.tune_tracking", "training.optuna_storage"},
    "mlflow": {"training.tracking", "training.tune_tracking", "training.registry", "training.promote",
               "training.store", "training.optuna_storage", "analysis.report"},
}
# Imported by commands that need no model (`fedtune --help`, `fedtune report`), like every module of analysis/: they
# must not load torch or transformers (seconds of start-up) at import.
TORCH_FREE = {"training.callbacks", "training.tracking", "training.cli"}
HEAVY = ("torch", "transformers")


@dataclass
class Module:
    name: str
    path: Path
    top: dict[str, int] = field(default_factory=dict)  # imported name -> line, at import time (module level)
    lazy: dict[str, int] = field(default_factory=dict)  # in a function (when it runs) or under TYPE_CHECKING (never)

    def imports(self) -> dict[str, int]:
        return {**self.lazy, **self.top}


def _imported(node: ast.Import | ast.ImportFrom, package: str, known: set[str]) -> list[str]:
    """The dotted names an import statement loads: ``from training import tune`` is the module training.tune,
    ``from torch import distributed`` the package torch.distributed, ``from x.y import f`` the module x.y."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:  # relative: from the importing module's package, one level up per extra dot
        base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], *([base] if base else [])])
    submodules = [f"{base}.{alias.name}" for alias in node.names]
    if base.startswith(PACKAGES):
        ours = [name for name in submodules if name in known]
        return ours if len(ours) == len(submodules) else [base, *ours]
    return [base, *submodules]  # outside our packages a name may be a module (torch.distributed): keep both


def _type_checking(node: ast.AST) -> bool:
    """``if TYPE_CHECKING:`` (or ``typing.TYPE_CHECKING``): imports for annotations only, never run."""
    test = getattr(node, "test", None) if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, package: str, known: set[str], found: Module, deferred: bool = False) -> None:
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            target = found.lazy if deferred else found.top
            for name in _imported(node, package, known):
                target.setdefault(name, node.lineno)
        _imports(node, package, known, found,
                 deferred or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                 or _type_checking(node))


def module_name(root: Path, path: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def graph(root: Path = ROOT) -> dict[str, Module]:
    """Every module of training/ and analysis/ under ``root`` with what it imports."""
    paths = sorted(path for package in PACKAGES for path in (root / package).glob("*.py"))
    known = {module_name(root, path) for path in paths}
    modules = {}
    for path in paths:
        found = modules[module_name(root, path)] = Module(module_name(root, path), path)
        package = found.name if path.name == "__init__.py" else found.name.rpartition(".")[0]
        _imports(ast.parse(path.read_text(), str(path)), package, known, found)
    return modules


def _hits(imports: dict[str, int], prefix: str) -> list[str]:
    """``name (line N)`` per import statement of ``prefix`` or one of its submodules."""
    lines: dict[int, str] = {}
    for name, line in sorted(imports.items(), key=lambda item: len(item[0])):
        if name == prefix or name.startswith(prefix + "."):
            lines.setdefault(line, name)
    return [f"{name} (line {line})" for line, name in sorted(lines.items())]


def _internal(modules: dict[str, Module], name: str) -> set[str]:
    return {target for target in modules[name].top if target in modules and target != name}


def find_cycle(modules: dict[str, Module]) -> list[str]:
    """One circle of module-level imports between our modules (``[a, b, a]``), or ``[]``."""
    state: dict[str, str] = {}  # name -> "open" while on the path, "done" after

    def visit(name: str, path: list[str]) -> list[str]:
        state[name] = "open"
        for target in sorted(_internal(modules, name)):
            if state.get(target) == "open":
                return [*path[path.index(target):], name, target] if target in path else [name, target]
            if target not in state:
                cycle = visit(target, [*path, name])
                if cycle:
                    return cycle
        state[name] = "done"
        return []

    for name in sorted(modules):
        if name not in state:
            cycle = visit(name, [])
            if cycle:
                return cycle
    return []


def loaded_at_import(modules: dict[str, Module], name: str) -> dict[str, list[str]]:
    """Every name that importing ``name`` loads through module-level imports, with the chain that loads it."""
    chains, queue = {name: [name]}, [name]
    while queue:
        current = queue.pop(0)
        for target in sorted(modules[current].top):
            if target not in chains:
                chains[target] = [*chains[current], target]
                if target in modules:
                    queue.append(target)
    return chains


def violations(modules: dict[str, Module]) -> dict[str, list[str]]:
    """Rule -> what breaks it, one line each; every list is empty when the code keeps docs/architecture.md."""
    broken: dict[str, list[str]] = {rule: [] for rule in RULES}
    cycle = find_cycle(modules)
    if cycle:
        broken["no-cycle"].append(" -> ".join(cycle))
    for name, module in sorted(modules.items()):
        imports = module.imports()
        if name not in ENTRY_POINTS:
            broken["nothing-imports-cli"] += [f"{name}: {hit}" for hit in _hits(imports, "training.cli")]
        if name in ENGINE:
            for forbidden in NEVER_IN_ENGINE:
                broken["engine-never"] += [f"{name}: {hit}" for hit in _hits(imports, forbidden)]
        if name in PURE:
            broken["pure-arithmetic"] += [f"{name}: {target} (line {line})" for target, line in sorted(imports.items())
                                          if target.startswith("training") and target != "training.aggregate"]
        for system, room in ROOMS.items():
            if name not in room:
                broken[f"room-{system}"] += [f"{name}: {hit}" for hit in _hits(imports, system)]
    for name in sorted(TORCH_FREE | {n for n in modules if n.startswith("analysis")}):
        if name in modules:
            chains = loaded_at_import(modules, name)
            for heavy in HEAVY:  # the shortest chain that loads it
                found = [chain for target, chain in chains.items() if target.split(".")[0] == heavy]
                if found:
                    broken["torch-free"].append(f"{name}: {' -> '.join(min(found, key=len))}")
    return broken


RULES = ("no-cycle", "nothing-imports-cli", "engine-never", "pure-arithmetic", *(f"room-{s}" for s in ROOMS),
         "torch-free")


@pytest.mark.parametrize("rule", RULES)
def test_import_graph_keeps_the_rule(rule):
    broken = violations(graph())[rule]
    assert not broken, f"{rule} (docs/architecture.md):\n" + "\n".join(broken)


# One injected import per rule: the line that must make exactly that rule fail, so no rule can pass vacuously.
INJECTED = {
    "no-cycle": ("training/aggregate.py", "import training.divergence"),  # divergence imports aggregate
    "nothing-imports-cli": ("training/train.py", "def _f():\n    from training import cli"),
    "engine-never": ("training/rounds.py", "def _f():\n    import training.tracking"),
    "pure-arithmetic": ("training/divergence.py", "from training.config import Config"),
    "room-torch.distributed": ("training/client.py", "from torch import distributed"),
    "room-docker": ("training/cli.py", "def _f():\n    import docker.errors"),
    "room-peft": ("training/rounds.py", "def _f():\n    from peft import LoraConfig"),
    "room-optuna": ("training/train.py", "def _f():\n    from optuna.trial import TrialState"),
    "room-mlflow": ("training/config.py", "import mlflow"),
    "torch-free": ("analysis/run_metrics.py", "from training import features"),
}


@pytest.mark.parametrize("rule", RULES)
def test_rule_catches_an_injected_import(rule, tmp_path):
    for package in PACKAGES:
        (tmp_path / package).mkdir()
        for path in (ROOT / package).glob("*.py"):
            (tmp_path / package / path.name).write_text(path.read_text())
    before = violations(graph(tmp_path))
    where, line = INJECTED[rule]
    with (tmp_path / where).open("a") as file:
        file.write(f"\n{line}\n")
    after = violations(graph(tmp_path))
    assert len(after[rule]) > len(before[rule]), f"{rule} missed `{line}` in {where}"
    assert any(module_name(tmp_path, tmp_path / where) in found for found in after[rule]) or rule == "no-cycle"


# dvc.yaml's stages that list their code file by file, and the module their command runs (after training/cli.py)
STAGE_CODE = {"prepare": "training.prepare", "prepare-raw": "training.prepare", "partition": "training.prepare",
              "report": "analysis.report"}


def code_files(modules: dict[str, Module], entry: str) -> set[str]:
    """The files ``fedtune`` runs for ``entry``: training/cli.py, which parses the command, and ``entry`` with what
    it imports at any depth (module level or in a function) and the packages those sit in."""
    seen, queue = {entry}, [entry]
    while queue:
        name = queue.pop()
        packages = [".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)]
        for target in [*modules[name].imports(), *packages]:
            if target in modules and target not in seen:
                seen.add(target)
                queue.append(target)
    return {"training/cli.py"} | {modules[name].path.relative_to(ROOT).as_posix() for name in seen}


@pytest.mark.parametrize("stage", sorted(STAGE_CODE))
def test_stage_lists_the_modules_its_command_runs(stage):
    """Editing a module the stage runs reruns it; editing any other module does not."""
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]
    listed = {dep for dep in spec.get("do", spec)["deps"] if dep.endswith(".py")}
    wanted = code_files(graph(), STAGE_CODE[stage])
    assert listed == wanted, f"dvc.yaml {stage}: add {sorted(wanted - listed)}, drop {sorted(listed - wanted)}"


def main(root: Path = ROOT) -> int:
    modules = graph(root)
    for name, module in sorted(modules.items()):
        top = sorted(t.removeprefix("training.") for t in _internal(modules, name))
        lazy = sorted(t.removeprefix("training.") for t in module.lazy if t in modules and t not in module.top)
        systems = ("torch", "transformers", "mlflow", "optuna", "docker", "datasets")
        outside = sorted({t.split(".")[0] + ("" if t in module.top else "(lazy)") for t in module.imports()
                          if t.split(".")[0] in systems} - {t.split(".")[0] + "(lazy)" for t in module.top})
        print(f"{name:26} -> {' '.join(top) or '-'}" + (f"  | lazy: {' '.join(lazy)}" if lazy else "")
              + (f"  | outside: {' '.join(outside)}" if outside else ""))
    broken = {rule: found for rule, found in violations(modules).items() if found}
    for rule, found in broken.items():
        print(f"BROKEN {rule}:\n  " + "\n  ".join(found))
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT))
