"""The public API is pinned, and the package layers import only downward."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import torch_dag as td

PUBLIC_API = [
    "SCHEMA_VERSION",
    "ConversionError",
    "DagError",
    "DagModule",
    "FinetuneReport",
    "FlopReport",
    "LoadError",
    "OnnxExportError",
    "Ref",
    "UnknownOpError",
    "VerifyError",
    "Vertex",
    "build_from_unstructured_module",
    "count_flops",
    "export_onnx",
    "factorize",
    "finetune",
    "flex",
    "known_ops",
    "load",
    "make_flexible",
    "passes",
    "prune",
    "pruning",
    "recalibrate_batchnorm",
    "register_module_op",
    "save",
    "verify",
]

PACKAGE = Path(td.__file__).parent
# what each layer may import from torch_dag: itself and the layers below it (DESIGN.md, "imports flow
# downward only"); anything else (serde, converters, analysis, passes, pruning, flex, cli, viz, the package
# top) is a violation
ALLOWED = {"core": {"core"}, "serde": {"core", "serde"}}


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
    assert {"analysis", "converters", "serde"} <= reached_layers(PACKAGE / "cli.py")


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layer_imports_nothing_above_it(layer):
    files = sorted((PACKAGE / layer).rglob("*.py"))
    assert files, f"no files in torch_dag/{layer}"
    offending = {
        str(path.relative_to(PACKAGE)): sorted(reached_layers(path) - ALLOWED[layer]) for path in files
    }
    assert not {name: layers for name, layers in offending.items() if layers}
