"""ptool's layers import only downward, and no modules import each other in a circle.

Walks every import in ``ptool/`` — module level and inside functions — with ``ast``. The layers
are the ones the README's "Layout" section draws; a unit may import from its own unit and from
lower tiers, never from a higher tier or a sibling of the same tier.
"""

from __future__ import annotations

import ast
import pathlib

import networkx as nx

ROOT = pathlib.Path(__file__).resolve().parents[1] / "ptool"

#: (tier, unit, module prefixes), bottom to top; units of one tier are siblings.
LAYERS = [
    (0, "core", ("ptool.errors", "ptool.options", "ptool.verify", "ptool.report", "ptool.progress",
                 "ptool.staging", "ptool.checkpoint", "ptool.inputs", "ptool.transformed",
                 "ptool.distributed")),
    (1, "ir", ("ptool.ir",)),
    (2, "ops", ("ptool.ops",)),
    (3, "passes", ("ptool.passes",)),
    (3, "frontends", ("ptool.frontends",)),
    (3, "backends", ("ptool.backends",)),
    (4, "pipeline", ("ptool.pipeline",)),
    (5, "api", ("ptool.api", "ptool.benchmark", "ptool.default_model", "ptool")),
    (6, "tune", ("ptool.tune",)),
    (7, "cli", ("ptool.cli",)),
]


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit_of(module: str) -> tuple[int, str]:
    """The layer a module belongs to: the longest matching prefix wins (``ptool`` itself last)."""
    best = None
    for tier, unit, prefixes in LAYERS:
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[0]):
                best = (len(prefix), tier, unit)
    assert best is not None, f"{module} is in no layer: add it to LAYERS and to the README's drawing"
    return best[1], best[2]


def imports_of(path: pathlib.Path, modules: set[str]) -> set[str]:
    """The ptool modules the file ``path`` of ``ptool/`` imports."""
    me = module_name(path)
    return imports_in(path.read_text(), me if path.name == "__init__.py" else me.rpartition(".")[0], modules)


def imports_in(source: str, package: str, modules: set[str]) -> set[str]:
    """The ptool modules ``source`` (a module of ``package``) imports, anywhere in it. A
    ``from pkg import name`` counts as ``pkg.name`` when that is a module, else as ``pkg``."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "ptool")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "ptool":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in modules else target)
    return found


def import_graph() -> nx.DiGraph:
    files = sorted(ROOT.rglob("*.py"))
    modules = {module_name(f) for f in files}
    graph = nx.DiGraph()
    for f in files:
        me = module_name(f)
        graph.add_node(me)
        for target in imports_of(f, modules):
            if target != me:
                graph.add_edge(me, target)
    return graph


def test_every_module_is_in_a_layer():
    for module in import_graph().nodes:
        unit_of(module)


def upward_edges(graph: nx.DiGraph) -> list[str]:
    """Imports that go up a tier, or across to a sibling unit of the same tier."""
    upward = []
    for src, dst in graph.edges:
        (tier_src, unit_src), (tier_dst, unit_dst) = unit_of(src), unit_of(dst)
        if unit_src != unit_dst and tier_dst >= tier_src:
            upward.append(f"{src} ({unit_src}) -> {dst} ({unit_dst})")
    return sorted(upward)


def test_imports_go_only_downward():
    upward = upward_edges(import_graph())
    assert not upward, "imports that go up a layer or across to a sibling:\n" + "\n".join(upward)


def test_no_import_cycles():
    graph = import_graph()
    # A package's __init__ importing its own modules is how packages work, not a cycle.
    graph.remove_edges_from([(a, b) for a, b in list(graph.edges) if b.startswith(a + ".")])
    cycles = [sorted(c) for c in nx.strongly_connected_components(graph) if len(c) > 1]
    assert not cycles, f"modules importing each other in a circle: {cycles}"


def test_the_readme_draws_the_same_layers():
    readme = (ROOT.parent / "README.md").read_text()
    drawing = readme[readme.index("## Layout"):]
    for _, unit, prefixes in LAYERS:
        assert unit in drawing, f"the README's Layout section does not name the '{unit}' layer"
        for prefix in prefixes:
            if prefix != "ptool":
                assert prefix.replace(".", "/") in drawing, f"the README's Layout section does not place {prefix}"


def test_the_walker_sees_imports_inside_functions_and_relative_ones():
    source = "def f():\n    from ptool.api import transform\n    import ptool.cli\n    from .quant import x\n"
    modules = {"ptool.api", "ptool.cli", "ptool.ops.quant"}
    assert imports_in(source, "ptool.ops", modules) == {"ptool.api", "ptool.cli", "ptool.ops.quant"}


def test_an_upward_or_sideways_import_is_caught():
    graph = nx.DiGraph([("ptool.ir.graph", "ptool.passes.base"),  # up
                        ("ptool.backends.tvm_backend", "ptool.frontends.loaders"),  # sideways
                        ("ptool.passes.base", "ptool.ir.graph"),  # down: fine
                        ("ptool.cli.tune", "ptool"),  # the package's facade, below the CLI: fine
                        ("ptool.errors", "ptool.report")])  # within core: fine
    assert upward_edges(graph) == ["ptool.backends.tvm_backend (backends) -> ptool.frontends.loaders (frontends)",
                                   "ptool.ir.graph (ir) -> ptool.passes.base (passes)"]
