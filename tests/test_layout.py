"""The import graph follows the pipeline (docs/ARCHITECTURE.md): every import, at the top of a
module or inside a function, points to the module's own stage or an earlier one, and no chain of
imports comes back to where it started."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Stage order, earliest first. A module belongs to the first entry its name starts with.
# `merger.methods.specs` departs from its package: it is data (no torch) the recipe validates against
# and the widget draws from, so it sits with the facts; the methods' functions come after the plan.
STAGES = (
    (
        "facts",
        (
            "merger.errors",
            "merger.dtypes",
            "merger.architecture",
            "merger.limits",
            "merger.locks",
            "merger.sizes",
            "merger.host",
            "merger.methods.specs",
        ),
    ),
    ("recipe", ("merger.recipe",)),
    ("sources", ("merger.sources",)),
    ("plan", ("merger.plan",)),
    ("methods", ("merger.methods",)),
    ("build", ("merger.build",)),
    ("generate", ("merger.generate",)),
    ("chat", ("merger.chat",)),
    ("lens", ("merger.lens",)),
    ("runtime", ("merger.runtime",)),
    ("eval", ("merger.eval",)),
    ("interfaces", ("merger.__main__", "ui", "app")),
)
PACKAGE_DOCS = {"merger", "merger.methods"}  # packages whose __init__ holds only a docstring


def module_files() -> dict[str, Path]:
    files = [*ROOT.glob("merger/**/*.py"), *ROOT.glob("ui/*.py"), ROOT / "app.py"]
    modules = {}
    for path in files:
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return modules


MODULES = module_files()


def stage_of(module: str) -> int:
    for index, (_, prefixes) in enumerate(STAGES):
        if any(module == p or module.startswith(f"{p}.") for p in prefixes):
            return index
    if module in PACKAGE_DOCS:
        return 0
    raise AssertionError(f"{module} is in no stage: add it to STAGES and docs/ARCHITECTURE.md")


def imports_of(module: str) -> set[str]:
    """The project modules `module` imports anywhere in its text (top level, functions, TYPE_CHECKING)."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, `level` - 1 packages up
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            names = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        for name in names:
            while name and name not in MODULES:  # `import merger.plan.counts` also names its packages
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


GRAPH = {module: imports_of(module) for module in MODULES}


def test_every_module_has_a_stage():
    for module in MODULES:
        stage_of(module)


def test_no_import_points_to_a_later_stage():
    upward = [
        f"{module} ({STAGES[stage_of(module)][0]}) imports {target} ({STAGES[stage_of(target)][0]})"
        for module, targets in GRAPH.items()
        for target in targets
        if stage_of(target) > stage_of(module)
    ]
    assert upward == []


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as the modules along it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_the_import_graph_has_no_cycle():
    cycle = find_cycle(GRAPH)
    assert cycle is None, " -> ".join(cycle)


@pytest.mark.parametrize(
    "graph, expected",
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
        ({"a": {"a"}}, ["a", "a"]),
    ],
)
def test_find_cycle_finds_what_it_must(graph, expected):
    assert find_cycle(graph) == expected


def test_an_import_inside_a_function_counts(tmp_path, monkeypatch):
    """The walk reads function-level imports too: an upward one hidden in a function is found."""
    fake = tmp_path / "fake.py"
    fake.write_text("def f():\n    from merger.runtime.builds import build\n")
    monkeypatch.setitem(MODULES, "merger.recipe.fake", fake)
    assert "merger.runtime.builds" in imports_of("merger.recipe.fake")


def test_the_preview_path_never_imports_torch():
    """`params` and the page's counts read metadata only (DESIGN.md): planning and counting a recipe
    imports neither torch nor transformers."""
    code = (
        "import sys; import merger.plan, merger.plan.counts, merger.plan.placement, merger.recipe.mergekit_yaml, "
        "merger.sources.catalog, merger.dtypes, merger.architecture; "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_page_starts_without_torch():
    """The app's module imports no torch: the model code loads in the background after start-up
    (merger.runtime.startup), so every stage the page imports at the top stays torch-free."""
    code = "import sys, app; print(sorted(m for m in ('torch', 'transformers.modeling_utils') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
