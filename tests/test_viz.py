"""Visualization: DOT that graphviz accepts, well-formed SVG naming every vertex, clusters, escaping, HTML."""

from __future__ import annotations

import re
import shutil
import xml.etree.ElementTree as ET

import pytest
import torch
from torch import nn

import torch_dag as td
from tests.zoo import ZOO, make
from torch_dag import viz
from torch_dag.core import ops
from torch_dag.core.dag import Vertex
from torch_dag.core.template import Ref

needs_dot = pytest.mark.skipif(
    shutil.which("dot") is None, reason="graphviz `dot` is not installed (apt-get install -y graphviz)"
)
SVG = "{http://www.w3.org/2000/svg}"


def convert(name: str) -> tuple[td.DagModule, tuple]:
    model, inputs = make(name)
    return td.build_from_unstructured_module(model, inputs), inputs


def svg_titles(path) -> dict[str, set[str]]:
    """Parse the SVG (fails on malformed XML) and return the <title> texts of nodes, clusters and edges."""
    titles: dict[str, set[str]] = {"node": set(), "cluster": set(), "edge": set()}
    for group in ET.parse(path).getroot().iter(f"{SVG}g"):
        if group.get("class") in titles:
            titles[group.get("class")].add(group.find(f"{SVG}title").text)
    return titles


def nested_dag(depth: int = 2) -> td.DagModule:
    """x -> block(x) -> relu, where block is a DagModule nesting another `depth - 1` levels deep."""
    inner = td.DagModule(["x"], [Vertex("fc", nn.Linear(4, 4), (Ref("x"),))], Ref("fc"))
    for _ in range(depth - 1):
        inner = td.DagModule(
            ["x"],
            [Vertex("pre", nn.Linear(4, 4), (Ref("x"),)), Vertex("block", inner, (Ref("pre"),))],
            Ref("block"),
        )
    vertices = [Vertex("block", inner, (Ref("x"),)), Vertex("act", nn.ReLU(), (Ref("block"),))]
    return td.DagModule(["x"], vertices, Ref("act"), input_meta={"x": {"shape": [2, 4], "dtype": "float32"}})


def test_op_family_table_names_known_ops_once():
    listed = [op for _, ops_text in viz.OP_FAMILIES.values() for op in ops_text.split()]
    assert len(listed) == len(set(listed)), "an op is listed in two families"
    assert set(listed) <= set(td.known_ops()), set(listed) - set(td.known_ops())
    assert set(viz.CONFIG_TEXT) <= set(td.known_ops())


@pytest.mark.parametrize(
    ("module", "text"),
    [
        (nn.Conv2d(64, 128, 3, 2), "Conv2d 64->128 k3 s2"),
        (nn.Conv2d(32, 32, (3, 1), groups=32), "Conv2d 32->32 k3x1 dw"),
        (nn.ConvTranspose2d(8, 4, 2, 2, groups=2), "ConvTranspose2d 8->4 k2 s2 g2"),
        (nn.Linear(5, 7), "Linear 5->7"),
        (nn.MaxPool2d(3, 2), "MaxPool2d k3 s2"),
        (nn.AdaptiveAvgPool2d((7, 7)), "AdaptiveAvgPool2d -> 7"),
        (nn.GroupNorm(4, 16), "GroupNorm 16 g4"),
        (nn.LayerNorm([8]), "LayerNorm 8"),
        (nn.ReLU(), "ReLU"),
        (nn.MultiheadAttention(32, 4), "MultiheadAttention 32 h4"),
        (nn.GELU("tanh"), "GELU tanh"),
    ],
)
def test_config_text(module, text):
    dag = td.DagModule(["x"], [Vertex("v", module, (Ref("x"),))], Ref("v"))
    assert f'<font point-size="8">{text.replace(">", "&gt;")}</font>' in viz.to_dot(dag)


@needs_dot
@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_svg_names_every_vertex(name, tmp_path):
    dag, inputs = convert(name)
    path = viz.render(dag, tmp_path / f"{name}.svg", inputs)
    titles = svg_titles(path)["node"]
    assert {v.name for v in dag} | set(dag.input_names) | {"<output>"} <= titles
    report = td.count_flops(dag, *inputs)
    heaviest = max(report.flops, key=report.flops.get)
    if report.flops[heaviest]:  # the FLOPs share is shown on the heaviest vertex
        share = f"{100 * report.flops[heaviest] / report.total_flops:.1f}%"
        assert share in viz.to_dot(dag, inputs)


def test_dot_without_inputs_uses_recorded_shapes():
    dag, _ = convert("residual")
    text = viz.to_dot(dag)
    assert "Conv2d 16-&gt;16 k3" in text and "2x16x16x16" in text and "%</font>" not in text
    assert text.count("{") == text.count("}") and all(f'"{v.name}" [' in text for v in dag)


def test_nested_dag_becomes_clusters():
    dag = nested_dag(depth=2)
    x = torch.randn(2, 4)
    torch.testing.assert_close(dag(x), torch.relu(dag["block"].module(x)))
    text = viz.to_dot(dag, x)
    assert 'subgraph "cluster_block" {' in text and 'subgraph "cluster_block/block" {' in text
    # edges go from the outer input into the inner vertices and out of the innermost one
    assert '"x" -> "block/pre";' in text and '"block/pre" -> "block/block/fc";' in text
    assert '"block/block/fc" -> "act";' in text


@needs_dot
def test_nested_dag_svg(tmp_path):
    dag = nested_dag(depth=2)
    titles = svg_titles(viz.render(dag, tmp_path / "nested.svg", torch.randn(2, 4)))
    assert titles["cluster"] == {"cluster_block", "cluster_block/block"}
    assert {"block/pre", "block/block/fc", "act"} <= titles["node"]
    assert {"x->block/pre", "block/block/fc->act"} <= titles["edge"]


class Odd(nn.Module):
    def forward(self, x):
        return x


def odd_dag(monkeypatch) -> td.DagModule:
    """A DAG with an op name and a module path full of characters DOT, HTML and XML treat specially."""
    spec = ops.ModuleOpSpec('Odd<"op">&\\', Odd, ())
    monkeypatch.setitem(ops.MODULE_OPS, Odd, spec)
    vertex = Vertex("odd", Odd(), (Ref("x"),), meta={"module_path": 'blocks["a<b>"]\\n&amp;'})
    return td.DagModule(["x"], [vertex], Ref("odd"))


def test_labels_are_escaped(monkeypatch):
    text = viz.to_dot(odd_dag(monkeypatch))
    assert "Odd&lt;&quot;op&quot;&gt;&amp;\\" in text  # HTML-like label
    assert 'tooltip="blocks[\\"a<b>\\"]\\\\n&amp;amp;\\n' in text  # quoted string


@needs_dot
def test_escaped_labels_render(monkeypatch, tmp_path):
    path = viz.render(odd_dag(monkeypatch), tmp_path / "odd.svg")
    root = ET.parse(path).getroot()
    texts = {t.text for t in root.iter(f"{SVG}text")}
    assert 'Odd<"op">&\\' in texts
    link = next(a for a in root.iter(f"{SVG}a") if a.get("{http://www.w3.org/1999/xlink}title"))
    assert link.get("{http://www.w3.org/1999/xlink}title").startswith('blocks["a<b>"]\\n&amp;\n')


@needs_dot
def test_png(tmp_path):
    dag = nested_dag()
    assert viz.render(dag, tmp_path / "n.png", fmt="png").read_bytes().startswith(b"\x89PNG")


@needs_dot
@pytest.mark.parametrize("name", ["attention", "multi_input_outputs"])
def test_html_is_self_contained(name, tmp_path):
    dag, inputs = convert(name)
    page = viz.to_html(dag, tmp_path / "page.html", inputs).read_text()
    assert page.count("<svg") == 1 and "<?xml" not in page and "<!DOCTYPE svg" not in page
    assert not re.search(r"<(script|link|img|iframe)\b[^>]*\b(src|href)\s*=", page)
    assert "http" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "").replace(
        'xmlns:xlink="http://www.w3.org/1999/xlink"', ""
    )
    assert 'id="q"' in page and 'addEventListener("wheel"' in page
    report = td.count_flops(dag, *inputs)
    kmapp = f"{report.kmapp:.2f}" if report.kmapp is not None else "n/a"
    assert f"<td>kmapp</td><td class=n>{kmapp}</td>" in page
    svg = page[page.index("<svg") : page.index("</svg>") + len("</svg>")]
    assert {v.name for v in dag} <= {t.text for t in ET.fromstring(svg).iter(f"{SVG}title")}


def test_missing_dot_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(viz.shutil, "which", lambda name: None)
    with pytest.raises(viz.GraphvizError, match="apt-get install -y graphviz"):
        viz.render(nested_dag(), tmp_path / "x.svg")
    assert issubclass(viz.GraphvizError, td.DagError)
