"""The package's layers point one way: no module imports a layer above its own, and no two
subpackages import each other (directly or through others).

Every module of ``src/fiber_plugins`` is parsed with ``ast``; every import counts (relative and
absolute, at the top, inside functions and under ``TYPE_CHECKING``). Each module belongs to a
*unit*: its subpackage (``samplers``, ``adapters``, ...) or, for a module at the top, its own
name (``errors``, ``grid``, ``demo``; ``__init__`` for the package itself). The rank table below
is the architecture, also described in docs/concepts.md ("Layers").
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "fiber_plugins"
ROOT = Path(__file__).resolve().parents[1] / "src" / PACKAGE

# lower ranks never import higher ones
RANKS = {
    # base: import nothing of the package but each other
    "errors": 0,
    "_utils": 0,
    "images": 0,
    "weights": 0,
    "grid": 0,  # the sample grid drawing (FiberResult.save_grid, benchmarks, report)
    "filters": 0,  # the Fourier low-pass filter (noise optimisation, evaluation)
    # the central abstraction and the models it is used with; never each other
    "objectives": 1,
    "priors": 1,
    "data": 1,
    # adapters only build objectives
    "adapters": 2,
    # consumers of objectives and priors
    "samplers": 3,
    "training": 3,
    "zoo": 4,
    "evaluation": 5,
    "specs": 5,  # the subject / target grammar (CLI, plans, Python)
    "reporting": 6,
    "attribution": 6,
    # entry points
    "cli": 7,
    "jobs": 7,  # plans, stores' execution, launchers (the CLI's run / plan commands)
    "demo": 7,
    "color_mnist_bench": 7,  # the benchmark: shipped models, samplers and metrics together
    "__init__": 7,
}
# units of one rank that may import each other (one way; the cycle check still applies)
SAME_RANK_ALLOWED = {0, 7}
# units held tighter than their rank: besides the base (rank 0) they may import only these
ONLY = {"adapters": {"objectives"}}  # adapters build objectives, nothing else


def _module_name(path: Path) -> tuple[str, bool]:
    """(dotted module name, whether it is a package's ``__init__``)."""
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts = parts[:-1]
    return ".".join(parts), is_package


def _modules() -> dict[str, Path]:
    return {_module_name(p)[0]: p for p in sorted(ROOT.rglob("*.py"))}


def _unit(dotted: str, modules: dict[str, Path]) -> str | None:
    """The unit of a module or of a name imported from the package (None: not ours)."""
    parts = dotted.split(".")
    if parts[0] != PACKAGE:
        return None
    if len(parts) == 1:
        return "__init__"
    if f"{PACKAGE}.{parts[1]}" in modules:
        return parts[1]
    return "__init__"  # a name defined in the package's __init__ (``from fiber_plugins import x``)


def _imports(path: Path, text: str | None = None) -> list[tuple[str, int]]:
    """Every (absolute dotted target, line) that the module at ``path`` imports (``text``: its
    source, default read from ``path``); ``from X import a`` is reported as ``X.a`` (a submodule
    or a name of X)."""
    name, is_package = _module_name(path)
    package = name.split(".") if is_package else name.split(".")[:-1]
    source = path.read_text() if text is None else text
    found = []
    for node in ast.walk(ast.parse(source, filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found += [(f"{module}.{alias.name}", node.lineno) for alias in node.names]
    return found


def _graph() -> tuple[dict[tuple[str, str], list[str]], list[str]]:
    """Edges between units -> where they come from ("module:line"), and units not in RANKS."""
    modules = _modules()
    edges: dict[tuple[str, str], list[str]] = {}
    unknown = []
    for name, path in modules.items():
        source = _unit(name, modules)
        if source not in RANKS:
            unknown.append(f"{name} (unit {source!r})")
            continue
        for target_name, line in _imports(path):
            target = _unit(target_name, modules)
            if target is None or target == source:
                continue
            edges.setdefault((source, target), []).append(f"{name}:{line}")
    return edges, unknown


def _cycles(edges) -> list[list[str]]:
    """Strongly connected components with more than one unit (Tarjan)."""
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_module_belongs_to_a_ranked_unit():
    _, unknown = _graph()
    assert not unknown, (
        "modules outside the rank table (add their subpackage to RANKS in this test and to "
        "docs/concepts.md):\n  " + "\n  ".join(unknown)
    )


def test_no_module_imports_a_higher_layer():
    edges, _ = _graph()
    bad = []
    for (source, target), where in sorted(edges.items()):
        if source not in RANKS or target not in RANKS:
            continue
        rs, rt = RANKS[source], RANKS[target]
        upward = rt > rs or (rt == rs and rs not in SAME_RANK_ALLOWED)
        outside = source in ONLY and rt > 0 and target not in ONLY[source]
        if upward or outside:
            why = "" if upward else f" (it may import only {sorted(ONLY[source])} and the base)"
            bad.append(
                f"{source} (rank {rs}) imports {target} (rank {rt}){why} at {', '.join(where)}"
            )
    assert not bad, "imports that point up or sideways:\n  " + "\n  ".join(bad)


def test_no_cycle_between_subpackages():
    edges, _ = _graph()
    cycles = _cycles(edges)
    lines = []
    for component in cycles:
        inside = [
            f"{a} -> {b} at {', '.join(where)}"
            for (a, b), where in sorted(edges.items())
            if a in component and b in component
        ]
        lines.append(" <-> ".join(component) + ":\n    " + "\n    ".join(inside))
    assert not cycles, "import cycles between units:\n  " + "\n  ".join(lines)


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("from ..samplers.result import FiberResult", ("samplers",)),
        ("from .. import zoo", ("zoo",)),
        ("from .. import __version__", ("__init__",)),
        ("import fiber_plugins.reporting.report", ("reporting",)),
        ("def f():\n    from ..evaluation.metrics import diversity", ("evaluation",)),
        ("from .metrics import diversity", ("evaluation",)),
    ],
)
def test_the_checker_sees_every_kind_of_import(code, expected):
    """The parser resolves relative, absolute and function-level imports to units (checked on
    source parsed as if it were fiber_plugins/evaluation/probe.py)."""
    probe = ROOT / "evaluation" / "probe.py"
    modules = _modules()
    units = {_unit(t, modules) for t, _ in _imports(probe, code)}
    assert units == set(expected)


def test_a_violation_is_reported_readably(monkeypatch):
    """An upward import (objectives -> samplers) and the cycle it closes are both reported."""
    real_imports = _imports

    def with_violation(path: Path):
        found = real_imports(path)
        if path == ROOT / "objectives" / "base.py":
            found.append((f"{PACKAGE}.samplers.engine", 1))
        return found

    monkeypatch.setitem(globals(), "_imports", with_violation)
    with pytest.raises(AssertionError, match=r"objectives \(rank 1\) imports samplers \(rank 3\)"):
        test_no_module_imports_a_higher_layer()
    with pytest.raises(AssertionError, match=r"objectives <-> .*samplers"):
        test_no_cycle_between_subpackages()


def test_an_adapter_importing_a_prior_is_reported(monkeypatch):
    real_imports = _imports

    def with_violation(path: Path):
        found = real_imports(path)
        if path == ROOT / "adapters" / "timm.py":
            found.append((f"{PACKAGE}.priors.load_prior", 7))
        return found

    monkeypatch.setitem(globals(), "_imports", with_violation)
    with pytest.raises(
        AssertionError, match=r"adapters \(rank 2\) imports priors .*may import only"
    ):
        test_no_module_imports_a_higher_layer()
