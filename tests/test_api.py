"""The public API is pinned, and the package layers import only downward."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

import torch_dag as td

PUBLIC_API = [
    "SCHEMA_VERSION",
    "ConversionError",
    "DagError",
    "DagModule",
    "FinetuneConfig",
    "FinetuneReport",
    "FlopReport",
    "Latency",
    "LatencyComparison",
    "LatencyTable",
    "LoadError",
    "OnnxExportError",
    "Ref",
    "TrainPruneConfig",
    "TrainPruneReport",
    "UnknownOpError",
    "VerifyError",
    "Vertex",
    "build_from_unstructured_module",
    "compare_latency",
    "count_flops",
    "export_onnx",
    "factorize",
    "finetune",
    "flex",
    "known_ops",
    "latency",
    "latency_table",
    "load",
    "make_flexible",
    "measure_latency",
    "nas",
    "passes",
    "prune",
    "pruning",
    "recalibrate_batchnorm",
    "register_module_op",
    "save",
    "steady_allocator",
    "train_prune",
    "verify",
]

PACKAGE = Path(td.__file__).parent
# the layers, bottom up: each may import itself and the layers below it (docs/ARCHITECTURE.md, "imports
# flow downward only"); anything else, the package top included, is a violation. A layer is a package
# (a folder) or a module (a file); only the package top, torch_dag/__init__.py, may import every layer.
LAYERS = [
    "core",
    "serde",
    "converters",
    "analysis",
    "passes",
    "pruning",
    "latency",
    "flex",
    "finetuning",
    "nas",
    "viz",
    "cli",
]
ALLOWED = {layer: set(LAYERS[: i + 1]) for i, layer in enumerate(LAYERS)}


def test_all_is_pinned():
    """Changing the public API is a decision: update this list with it."""
    assert td.__all__ == PUBLIC_API
    assert sorted(PUBLIC_API, key=isort_key) == PUBLIC_API


def isort_key(name: str) -> tuple[int, str]:
    """ruff's `__all__` order (RUF022): CONSTANTS, then Classes, then functions, each alphabetical."""
    return (0 if name.isupper() else 1 if name[0].isupper() else 2, name)


@pytest.mark.parametrize("name", PUBLIC_API)
def test_public_name_exists(name):
    assert getattr(td, name, None) is not None


def test_errors_share_one_base():
    for name in ("ConversionError", "LoadError", "UnknownOpError", "VerifyError"):
        assert issubclass(getattr(td, name), td.DagError)


def imported_modules(source: str, package: tuple[str, ...]) -> set[str]:
    """The torch_dag names a file imports, dotted and relative to torch_dag ('core.ops', 'serde.save'),
    'torch_dag' for the package itself; `package` is the file's package inside torch_dag (('core',) for
    core/ops.py, () for cli.py)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules = [(alias.name, ()) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level:
            assert node.level - 1 <= len(package), "relative import beyond torch_dag"
            base = ".".join(["torch_dag", *package[: len(package) - node.level + 1]])
            modules = [(f"{base}.{node.module}" if node.module else base, node.names)]
        elif isinstance(node, ast.ImportFrom):
            modules = [(node.module or "", node.names)]
        else:
            continue
        for module, aliases in modules:
            if module != "torch_dag" and not module.startswith("torch_dag."):
                continue
            relative = module.removeprefix("torch_dag").lstrip(".")
            if relative and aliases:  # `from .ops import op_name`, `from torch_dag.core import ops`
                found.add(relative)
                found.update(f"{relative}.{a.name}" for a in aliases)
            elif aliases:  # `from . import serde`, `from torch_dag import save`
                found.update(a.name for a in aliases)
            else:  # `import torch_dag.x`, `import torch_dag`
                found.add(relative or "torch_dag")
    return found


def reached_layers(path: Path) -> set[str]:
    """The first component of every torch_dag name the file imports: a layer, a top module, or a name."""
    package = path.relative_to(PACKAGE).parent.parts
    return {name.split(".")[0] for name in imported_modules(path.read_text(), package)}


@pytest.mark.parametrize(
    ("source", "package", "expected"),
    [
        ("from .ops import op_name", ("core",), {"core.ops", "core.ops.op_name"}),
        ("from . import ops", ("core",), {"core", "core.ops"}),
        ("from ..serde import save", ("passes",), {"serde", "serde.save"}),
        ("from .. import analysis", ("passes",), {"analysis"}),
        ("from . import converters, serde", (), {"converters", "serde"}),
        ("import torch_dag.pruning.rules", ("core",), {"pruning.rules"}),
        ("import torch_dag", ("core",), {"torch_dag"}),
        ("from torch_dag import flex", ("core",), {"flex"}),
        ("from torch_dag.cli import main", ("serde",), {"cli", "cli.main"}),
        ("def f():\n    from ..viz import draw", ("core",), {"viz", "viz.draw"}),
        ("import torch\nfrom torch import nn\nfrom typing import Any", ("core",), set()),
    ],
)
def test_import_parser(source, package, expected):
    assert imported_modules(source, package) == expected


def test_cli_reaches_the_layers_it_uses():
    assert {"analysis", "converters", "serde"} <= set().union(*map(reached_layers, layer_files("cli")))


def layer_files(layer: str) -> list[Path]:
    """The source files of a layer: a package's files, or the one module."""
    return (
        sorted((PACKAGE / layer).rglob("*.py")) if (PACKAGE / layer).is_dir() else [PACKAGE / f"{layer}.py"]
    )


def test_every_file_is_in_a_layer():
    placed = {path for layer in LAYERS for path in layer_files(layer)} | {PACKAGE / "__init__.py"}
    stray = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if p not in placed)
    assert not stray, f"files in no layer: {stray}; put their package or module in LAYERS, in test_api.py"


@pytest.mark.parametrize("layer", LAYERS)
def test_layer_imports_nothing_above_it(layer):
    """Imports inside functions count too: a lazy import upward is still a dependency upward."""
    files = layer_files(layer)
    assert all(path.exists() for path in files), f"no files in torch_dag/{layer}"
    offending = {
        str(path.relative_to(PACKAGE)): sorted(reached_layers(path) - ALLOWED[layer]) for path in files
    }
    assert not {name: layers for name, layers in offending.items() if layers}


def module_name(path: Path) -> str:
    """torch_dag/flex/model.py -> 'flex.model'; a package's __init__.py is the package: 'flex'."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def top_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """The imports a module runs when it is imported: not those in functions or under `if TYPE_CHECKING`."""
    found: list[ast.Import | ast.ImportFrom] = []
    todo: list[ast.stmt] = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.If):
            todo += node.orelse if is_type_checking(node.test) else [*node.body, *node.orelse]
        elif isinstance(node, ast.Try):
            todo += [*node.body, *node.orelse, *node.finalbody, *(s for h in node.handlers for s in h.body)]
        elif isinstance(node, ast.With):
            todo += node.body
    return found


def import_graph(layer: str) -> nx.DiGraph:
    """Module -> the modules of the same layer it imports when it is imported (an edge per import)."""
    files = {module_name(path): path for path in layer_files(layer)}
    graph = nx.DiGraph()
    graph.add_nodes_from(files)
    for name, path in files.items():
        package = path.relative_to(PACKAGE).parent.parts
        for node in top_level_imports(ast.parse(path.read_text())):
            for alias in node.names:  # one name at a time: `from . import a, b` loads modules a and b
                single = (
                    ast.Import([alias])
                    if isinstance(node, ast.Import)
                    else ast.ImportFrom(node.module, [alias], node.level)
                )
                names = imported_modules(ast.unparse(single), package)
                imported = max(names, key=len, default="")  # x.y for `from .x import y`, x for `import x`
                while imported not in files and "." in imported:  # y is a name in module x, not a module
                    imported = imported.rsplit(".", 1)[0]
                if imported in files and imported != name:
                    graph.add_edge(name, imported)
    return graph


@pytest.mark.parametrize("layer", [layer for layer in LAYERS if (PACKAGE / layer).is_dir()])
def test_no_import_cycle_inside_a_package(layer):
    cycles = sorted(nx.simple_cycles(import_graph(layer)))
    assert not cycles, f"torch_dag/{layer} has import cycles (module-level imports): {cycles}"


def test_import_graph_sees_a_cycle():
    graph = nx.DiGraph([("a", "b"), ("b", "a")])
    assert list(nx.simple_cycles(graph))
    assert ("core.ops", "core.traits") in import_graph("core").edges


def test_core_names_no_flex_concept():
    """The core knows nothing above it: no identifier or string (docstrings and comments aside) says flex;
    flexible layers reach the core through `LayerProxy` and `register_custom_op`."""
    offending = []
    for path in layer_files("core"):
        tree = ast.parse(path.read_text())
        docstrings = {
            id(node.body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and node.body
            and isinstance(node.body[0], ast.Expr)
        }
        for node in ast.walk(tree):
            words = [
                getattr(node, field, None) for field in ("id", "attr", "name", "arg", "asname", "module")
            ]
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                words.append(node.value)
            offending += [
                f"{path.name}:{node.lineno} {w!r}"
                for w in words
                if isinstance(w, str) and "flex" in w.lower()
            ]
    assert not offending
