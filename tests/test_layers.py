"""The layering of docs/ARCHITECTURE.md ("Layers"), read from the source: imports point down
personadual/ <- rollout/, rewards/, learner/ <- actors/ <- launch.py, only actors/ imports Ray,
and the rooms never import each other."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import ROOT

ROOMS = ("rollout", "rewards", "learner")
# The one entry point inside personadual/ that sits above the rooms (docs/ARCHITECTURE.md).
ENTRY_POINTS = {Path("personadual/prepare/__main__.py")}


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split(".")[0])
    return found


def _modules(package: str) -> list[Path]:
    return sorted(p.relative_to(ROOT) for p in (ROOT / package).rglob("*.py"))


def test_each_package_imports_only_the_layers_below_it():
    wrong = []
    for package, forbidden in [("personadual", {"actors", "launch", "ray", *ROOMS}),
                               *[(room, {"actors", "launch", "ray", *(set(ROOMS) - {room})}) for room in ROOMS],
                               ("actors", {"launch"})]:
        for path in _modules(package):
            if path in ENTRY_POINTS:
                continue
            bad = _imports(ROOT / path) & forbidden
            if bad:
                wrong.append(f"{path}: {sorted(bad)}")
    assert not wrong, wrong


def test_the_layer_check_sees_a_wrong_import(tmp_path):
    # Near miss: the same check on a module that imports upward must flag it.
    module = tmp_path / "m.py"
    module.write_text("import ray\nfrom actors.driver import Driver\nfrom personadual import modes\n")
    assert _imports(module) & {"actors", "ray"} == {"actors", "ray"}


def _top_level_imports(path: Path, modules: set[str]) -> set[str]:
    """The ``modules`` that ``path`` imports when it is loaded (not inside functions or
    ``if TYPE_CHECKING:``); ``from package import module`` imports the module."""
    found: set[str] = set()
    for node in ast.parse(path.read_text(), str(path)).body:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            submodules = {f"{node.module}.{alias.name}" for alias in node.names} & modules
            found.update(submodules if len(submodules) == len(node.names) else {node.module, *submodules})
    return found & modules


def test_no_two_modules_import_each_other_at_load_time():
    paths = [p for package in ("personadual", *ROOMS, "actors") for p in _modules(package)]
    names = {".".join(p.with_suffix("").parts).removesuffix(".__init__"): p for p in paths}
    graph = {name: _top_level_imports(ROOT / path, set(names)) - {name} for name, path in names.items()}
    cycles = []

    def visit(name: str, trail: list[str]) -> None:
        if name in trail:
            cycles.append(trail[trail.index(name):] + [name])
            return
        for target in sorted(graph[name]):
            if target not in done:
                visit(target, trail + [name])
        done.add(name)

    done: set[str] = set()
    for name in sorted(graph):
        visit(name, [])
    assert not cycles, cycles[:3]
