"""Every commlab module imports only from its own floor or below, and no modules import each
other in a cycle. Imports inside functions count; imports under `if TYPE_CHECKING:` do not (they
never run). The package root (`commlab/__init__.py`: the version and the lazy public API) sits
outside the floors: anything may read `commlab.__version__`."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

import commlab

# Bottom to top. A module's floor is that of the longest prefix naming it.
FLOORS: list[list[str]] = [
    [  # foundation: imports no other commlab module (but the root's version)
        "commlab.config",
        "commlab.registry",
        "commlab.dist",
        "commlab.perf",
        "commlab.cluster",
        "commlab.checkpoint_format",
        "commlab.tags",
    ],
    ["commlab.data", "commlab.objectives"],
    ["commlab.probe", "commlab.rus"],  # read data's tasks
    ["commlab.tracking"],  # MLflow; logs R/U/S reports; never needs train/
    ["commlab.augment", "commlab.models"],
    ["commlab.train"],
    ["commlab.sweep"],
    ["commlab.pretrained", "commlab.jobs"],
    ["commlab.cli"],
]
ROOT = "commlab"
PACKAGE_DIR = Path(commlab.__file__).resolve().parent


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported commlab module
    line: int
    lazy: bool  # inside a function


@dataclass(frozen=True)
class Module:
    name: str
    is_package: bool
    text: str


def package_modules() -> list[Module]:
    out = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_package else parts)
        out.append(Module(name, is_package, path.read_text()))
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _Collector(ast.NodeVisitor):
    def __init__(self, module: Module, known: set[str]) -> None:
        self.module, self.known, self.depth = module, known, 0
        self.found: list[Import] = []

    def _add(self, target: str, node: ast.stmt) -> None:
        while target not in self.known and "." in target:  # `import a.b.name` -> a.b
            target = target.rsplit(".", 1)[0]
        if target in self.known and target not in (ROOT, self.module.name):
            self.found.append(Import(self.module.name, target, node.lineno, self.depth > 0))

    def visit_If(self, node: ast.If) -> None:
        for child in node.orelse if _is_type_checking(node.test) else [*node.body, *node.orelse]:
            self.visit(child)

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            here = self.module.name.split(".")
            keep = len(here) - node.level + (1 if self.module.is_package else 0)
            base = ".".join(here[:keep] + ([node.module] if node.module else []))
        for alias in node.names:  # `from pkg import submodule` imports pkg.submodule
            name = f"{base}.{alias.name}"
            self._add(name if name in self.known else base, node)


def imports(modules: list[Module]) -> list[Import]:
    known = {m.name for m in modules}
    out: list[Import] = []
    for m in modules:
        collector = _Collector(m, known)
        collector.visit(ast.parse(m.text))
        out += collector.found
    return out


def floor_of(module: str) -> int | None:
    matches = [
        (len(prefix), i)
        for i, prefixes in enumerate(FLOORS)
        for prefix in prefixes
        if module == prefix or module.startswith(prefix + ".")
    ]
    return max(matches)[1] if matches else None


def upward(found: list[Import]) -> list[str]:
    out = []
    for imp in found:
        src, dst = floor_of(imp.source), floor_of(imp.target)
        if src is not None and dst is not None and dst > src:
            out.append(f"{imp.source}:{imp.line} (floor {src}) imports {imp.target} (floor {dst})")
    return out


def cycles(found: list[Import]) -> list[list[str]]:
    """One cycle through each module that lies on one. A package's lazy import of its own
    modules is left out: that is how a registry loads its built-in entries on first use."""
    graph: dict[str, set[str]] = {}
    for imp in found:
        if imp.lazy and imp.target.startswith(imp.source + "."):
            continue
        graph.setdefault(imp.source, set()).add(imp.target)
    out: list[list[str]] = []
    seen: set[str] = set()
    for start in sorted(graph):
        stack = [(start, [start])]
        visited: set[str] = set()
        while stack:
            node, path = stack.pop()
            for nxt in sorted(graph.get(node, ())):
                if nxt == start and start not in seen:
                    out.append([*path, start])
                    seen.update(path)
                elif nxt not in visited:
                    visited.add(nxt)
                    stack.append((nxt, [*path, nxt]))
    return out


def test_every_module_has_a_floor():
    missing = [m.name for m in package_modules() if m.name != ROOT and floor_of(m.name) is None]
    assert not missing, f"add these modules to FLOORS: {missing}"


def test_no_upward_imports():
    assert upward(imports(package_modules())) == []


def test_no_import_cycles():
    assert cycles(imports(package_modules())) == []


@pytest.mark.parametrize(
    ("name", "text", "is_package"),
    [
        ("commlab.tracking.runs", "def f():\n    from commlab.train import loop\n", False),
        ("commlab.models.norm", "import commlab.sweep.run\n", False),
        ("commlab.data", "from .. import cli\n", True),
    ],
)
def test_an_upward_import_is_caught(name, text, is_package):
    modules = [m for m in package_modules() if m.name != name] + [Module(name, is_package, text)]
    assert len(upward(imports(modules))) == 1


def test_a_cycle_and_not_a_type_only_import_is_caught():
    fake = [
        Module("commlab.data.a", False, "from commlab.data import b\n"),
        Module("commlab.data.b", False, "def f():\n    import commlab.data.a\n"),
        Module("commlab.data.c", False, "from typing import TYPE_CHECKING\n"
               "if TYPE_CHECKING:\n    from commlab.cli import app\n"),
    ]  # fmt: skip
    modules = [*package_modules(), *fake]
    assert [c for c in cycles(imports(modules)) if "commlab.data.a" in c]
    assert not [i for i in imports(modules) if i.source == "commlab.data.c"]


# Which modules may import the heavy services (inside functions too): MLflow only through
# tracking/, Ray only where runs are connected, trained or swept.
SERVICES: dict[str, list[str]] = {
    "mlflow": ["commlab.tracking"],
    "ray": ["commlab.cluster", "commlab.train", "commlab.sweep"],
}


def service_imports(module: Module) -> list[tuple[str, int]]:
    """(service, line) for each import of a SERVICES package in `module`, TYPE_CHECKING aside."""
    out: list[tuple[str, int]] = []

    class Visitor(ast.NodeVisitor):
        def visit_If(self, node: ast.If) -> None:
            for child in (
                node.orelse if _is_type_checking(node.test) else [*node.body, *node.orelse]
            ):
                self.visit(child)

        def visit_Import(self, node: ast.Import) -> None:
            out.extend((a.name.split(".")[0], node.lineno) for a in node.names)

        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            if not node.level and node.module:
                out.append((node.module.split(".")[0], node.lineno))

    Visitor().visit(ast.parse(module.text))
    return [(pkg, line) for pkg, line in out if pkg in SERVICES]


def misplaced_services(modules: list[Module]) -> list[str]:
    return [
        f"{m.name}:{line} imports {pkg}"
        for m in modules
        for pkg, line in service_imports(m)
        if not any(m.name == p or m.name.startswith(p + ".") for p in SERVICES[pkg])
    ]


def test_mlflow_and_ray_are_imported_only_where_they_belong():
    assert misplaced_services(package_modules()) == []


def test_a_misplaced_service_import_is_caught():
    fake = [
        Module(
            "commlab.sweep.x", False, "def f():\n    from mlflow.tracking import MlflowClient\n"
        ),
        Module("commlab.models.x", False, "import ray.train\n"),
        Module("commlab.train.x", False, "import ray\n"),
    ]
    assert misplaced_services(fake) == [
        "commlab.sweep.x:2 imports mlflow",
        "commlab.models.x:1 imports ray",
    ]
