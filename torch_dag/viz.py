"""Pictures of a DagModule: Graphviz DOT source, a rendered SVG/PNG, and one offline HTML page.

Nodes are coloured by op family (a table, below) and shaded by their share of the FLOPs, so the
heavy layers of a large model stand out; nested DagModules become (recursive) clusters.
"""

from __future__ import annotations

import html
import math
import shutil
import string
import subprocess
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.nn.modules.conv import _ConvNd

from .analysis import FlopReport, count_flops
from .core.dag import DagModule, Vertex
from .core.errors import DagError
from .core.ops import is_dag_module, known_ops
from .core.template import iter_refs, unique_refs
from .core.traits import Trait, traits_of
from .passes.pattern import BATCH_NORMS, CONVS, DROPOUTS

__all__ = [
    "OP_FAMILIES",  # noqa: F822  (made when read, by the module's __getattr__)
    "GraphvizError",
    "op_families",
    "op_family",
    "render",
    "to_dot",
    "to_html",
]


class GraphvizError(DagError):
    """Graphviz's `dot` program is missing or rejected the DOT source."""


# family -> fill colour of its heaviest vertex (the legend's order); an op in no family is "other"
FAMILY_COLOURS: dict[str, str] = {
    "conv": "#2f6fd0",
    "linear": "#7b3fc4",
    "attention": "#d0342c",
    "norm": "#2e9e4f",
    "activation": "#e8822a",
    "pooling": "#17a2a2",
    "elementwise": "#c9a400",
    "shape": "#8a8a8a",
    "constant": "#a0522d",
    "other": "#5a5a5a",
}
# an op's family is that of the first of its traits in this order
_FAMILY_BY_TRAIT: tuple[tuple[Trait, str], ...] = (
    (Trait.CONV, "conv"),
    (Trait.LINEAR, "linear"),
    (Trait.CONTRACTION, "attention"),
    (Trait.NORM, "norm"),
    (Trait.ACTIVATION, "activation"),
    (Trait.POOL, "pooling"),
    (Trait.REDUCTION, "pooling"),
    (Trait.ELEMENTWISE, "elementwise"),
    (Trait.FACTORY, "constant"),
    (Trait.VIEW, "shape"),
    (Trait.ALIASES_INPUT, "shape"),
    (Trait.DROPOUT, "shape"),
    (Trait.IDENTITY, "shape"),
    (Trait.METADATA, "shape"),
)
# families of the ops whose traits name none
_FAMILY_OF_UNTRAITED = {
    op: family
    for family, ops in {
        "conv": "ConvTranspose1d ConvTranspose2d ConvTranspose3d conv_transpose1d conv_transpose2d conv_transpose3d "
        "Fold Unfold fold unfold",
        "linear": "Bilinear bilinear Embedding embedding LSTM GRU RNN",
        "attention": "cdist",
        "activation": "Softmax LogSoftmax Softmax2d softmax log_softmax",
        "shape": "cat stack repeat tile pad roll flip gather index_select PixelShuffle PixelUnshuffle ChannelShuffle "
        "pixel_shuffle pixel_unshuffle channel_shuffle",
    }.items()
    for op in ops.split()
}


def op_family(op: str) -> str:
    """The colour family of op `op`, from its traits (read now: ops registered later are coloured too)."""
    traits = traits_of(op)
    by_trait = next((family for trait, family in _FAMILY_BY_TRAIT if trait in traits), None)
    return by_trait or _FAMILY_OF_UNTRAITED.get(op, "other")


def op_families() -> dict[str, tuple[str, str]]:
    """family -> (colour, the registered ops of the family, space-separated), for legends and docs."""
    members: dict[str, list[str]] = {family: [] for family in FAMILY_COLOURS}
    for op in known_ops():
        family = op_family(op)
        if family != "other":
            members[family].append(op)
    return {family: (colour, " ".join(members[family])) for family, colour in FAMILY_COLOURS.items()}


def __getattr__(name: str) -> Any:
    """`OP_FAMILIES`: `op_families()` computed when read, so it is never stale."""
    if name == "OP_FAMILIES":
        return op_families()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _k(value: Any) -> str:
    """A kernel size / stride as `3` (all equal) or `3x1`."""
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    return str(values[0]) if len(set(values)) == 1 else "x".join(map(str, values))


def _conv(m: _ConvNd) -> str:
    text = f"{m.in_channels}->{m.out_channels} k{_k(m.kernel_size)}"
    text += f" s{_k(m.stride)}" if _k(m.stride) != "1" else ""
    return text + (" dw" if m.groups == m.in_channels > 1 else f" g{m.groups}" if m.groups > 1 else "")


_CONV = [*CONVS, "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d"]
_POOL = ["MaxPool1d", "MaxPool2d", "MaxPool3d", "AvgPool1d", "AvgPool2d", "AvgPool3d"]
_ADAPTIVE = [f"Adaptive{kind}Pool{n}d" for kind in ("Avg", "Max") for n in (1, 2, 3)]
_BATCH_NORM = [*BATCH_NORMS, "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d"]

# op -> short config shown after the op name (module ops only: function ops keep theirs in the template);
# each function takes the module class of its op
CONFIG_TEXT: dict[str, Callable[[Any], str]] = {
    **dict.fromkeys(_CONV, _conv),
    **dict.fromkeys(_POOL, lambda m: f"k{_k(m.kernel_size)} s{_k(m.stride)}"),
    **dict.fromkeys(_ADAPTIVE, lambda m: f"-> {_k(m.output_size)}"),
    **dict.fromkeys(_BATCH_NORM, lambda m: str(m.num_features)),
    **dict.fromkeys(["LayerNorm", "RMSNorm"], lambda m: _k(m.normalized_shape)),
    **dict.fromkeys(["LSTM", "GRU", "RNN"], lambda m: f"{m.input_size}->{m.hidden_size} x{m.num_layers}"),
    **dict.fromkeys(DROPOUTS, lambda m: f"p={m.p}"),
    **dict.fromkeys(["Parameter", "Constant"], lambda m: "x".join(map(str, m.shape)) or "scalar"),
    "GroupNorm": lambda m: f"{m.num_channels} g{m.num_groups}",
    "Linear": lambda m: f"{m.in_features}->{m.out_features}",
    "Embedding": lambda m: f"{m.num_embeddings}x{m.embedding_dim}",
    "MultiheadAttention": lambda m: f"{m.embed_dim} h{m.num_heads}",
    "GELU": lambda m: "" if m.approximate == "none" else m.approximate,
}


def _quote(text: str) -> str:
    """A DOT double-quoted string (ids, tooltips); `\\n` stays a line break. Graphviz decodes HTML
    entities even in plain strings, so `&` is escaped too."""
    text = text.replace("&", "&amp;").replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{text}"'


def _html_label(lines: list[str], max_label: int) -> str:
    """A DOT HTML-like label: first line bold, the rest small; every line escaped and shortened."""
    lines = [t.strip() for t in lines if t.strip()]
    short = [html.escape(t if len(t) <= max_label else t[: max_label - 3] + "...") for t in lines]
    rest = "".join(f'<br/><font point-size="8">{t}</font>' for t in short[1:])
    return f"<<b>{short[0]}</b>{rest}>"


def _shade(colour: str, weight: float) -> tuple[str, str]:
    """(fill, font colour): `colour` mixed into white by `weight` in [0, 1], white text on dark fills."""
    rgb = [round(255 + (int(colour[i : i + 2], 16) - 255) * weight) for i in (1, 3, 5)]
    luminance = (0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]) / 255
    return "#" + "".join(f"{c:02x}" for c in rgb), "#ffffff" if luminance < 0.55 else "#1a1a1a"


_SI = (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3), ("", 1.0))


def _si(n: float) -> str:
    """1234567 -> '1.23M': counts of params and FLOPs, short."""
    unit, scale = next((u, s) for u, s in _SI if abs(n) >= s or not u)
    return f"{n / scale:.3g}{unit}"


def _shape_text(shape: Any) -> str:
    return "x".join(map(str, shape)) if shape is not None else ""


def _leaf_flops(report: FlopReport) -> list[int]:
    return [f for name, f in report.flops.items() if name not in report.nested] + [
        f for sub in report.nested.values() for f in _leaf_flops(sub)
    ]


class _Writer:
    """Collects the nodes (nested in clusters) and the edges (all at top level, so that an edge into a
    cluster does not pull its source into the cluster) of one DOT graph."""

    def __init__(self, report: FlopReport | None, max_label: int):
        self.max_label = max_label
        self.total = max(1, report.total_flops) if report else 1
        self.heaviest = max([1, *_leaf_flops(report)]) if report else 1
        self.nodes: list[str] = []
        self.edges: dict[tuple[str, str], None] = {}
        self.families: set[str] = set()

    def share(self, flops: int) -> str:
        share = 100 * flops / self.total
        return "" if not flops else f"{share:.1f}%" if share >= 0.1 else "<0.1%"

    def vertex(self, node_id: str, vertex: Vertex, report: FlopReport | None, pad: str) -> None:
        family = op_family(vertex.op)
        self.families.add(family)
        flops = report.flops.get(vertex.name, 0) if report else 0
        weight = 0.15 + 0.85 * math.sqrt(flops / self.heaviest) if report else 0.35
        fill, font = _shade(FAMILY_COLOURS[family], weight)
        shape = (report.shapes.get(vertex.name) if report else None) or vertex.meta.get("shape")
        config = CONFIG_TEXT[vertex.op](vertex.module) if vertex.op in CONFIG_TEXT else ""
        lines = [vertex.name, f"{vertex.op} {config}", f"{_shape_text(shape)}  {self.share(flops)}"]
        tooltip = f"{vertex.meta.get('module_path', vertex.name)}\n{vertex!r}"
        self.nodes.append(
            f"{pad}{_quote(node_id)} [label={_html_label(lines, self.max_label)} fillcolor="
            f"{_quote(fill)} fontcolor={_quote(font)} tooltip={_quote(tooltip)}];"
        )

    def dag(
        self,
        dag: DagModule,
        report: FlopReport | None,
        prefix: str,
        sources: dict[str, list[str]],
        depth: int = 1,
    ) -> None:
        """Emit `dag`'s vertices; `sources` maps each name in scope to the node ids that carry its value."""
        pad = "  " * depth
        for vertex in dag:
            node_id = prefix + vertex.name
            if is_dag_module(vertex.module):
                inner: DagModule = vertex.module
                inner_sources = {
                    name: self.sources(
                        vertex.args[i] if i < len(vertex.args) else vertex.kwargs.get(name), sources
                    )
                    for i, name in enumerate(inner.input_names)
                }
                sub = report.nested.get(vertex.name) if report else None
                share = self.share(sub.total_flops if sub else 0)
                title = f"{vertex.name}: DagModule, {len(inner)} vertices  {share}"
                self.nodes += [
                    f"{pad}subgraph {_quote('cluster_' + node_id)} {{",
                    f"{pad}  label={_html_label([title], self.max_label + 20)} "
                    'style="rounded,dashed" color="#777777" fontsize=10 labeljust=l;',
                ]
                self.dag(inner, sub, node_id + "/", inner_sources, depth + 1)
                self.nodes.append(pad + "}")
                sources[vertex.name] = [s for name in inner.output_names for s in inner_sources[name]]
            else:
                self.vertex(node_id, vertex, report, pad)
                for source in self.sources((vertex.args, vertex.kwargs), sources):
                    self.edges[source, node_id] = None
                sources[vertex.name] = [node_id]

    @staticmethod
    def sources(template: Any, sources: dict[str, list[str]]) -> list[str]:
        return list(dict.fromkeys(s for ref in iter_refs(template) for s in sources[ref.name]))

    def legend(self) -> str:
        cells = "".join(
            f'<td bgcolor="{colour}"><font color="#ffffff" point-size="9">{family}</font></td>'
            for family, colour in FAMILY_COLOURS.items()
            if family in self.families
        )
        table = f'<table border="0" cellspacing="2"><tr>{cells}</tr></table>'
        return f'  "<legend>" [shape=plaintext style="" label=<{table}>];'


def _as_tuple(inputs: Any) -> tuple:
    return () if inputs is None else tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def to_dot(dag: DagModule, inputs: Any = None, *, max_label: int = 40) -> str:
    """Graphviz DOT source of `dag`; with `inputs` (a tensor or a tuple) nodes show their FLOPs share."""
    given = _as_tuple(inputs)
    return _to_dot(dag, given, count_flops(dag, *given) if inputs is not None else None, max_label)


def _to_dot(dag: DagModule, given: tuple, report: FlopReport | None, max_label: int) -> str:
    writer = _Writer(report, max_label)
    for i, name in enumerate(dag.input_names):
        value = given[i] if i < len(given) else None
        shape = value.shape if isinstance(value, torch.Tensor) else dag.input_meta.get(name, {}).get("shape")
        writer.nodes.append(
            f'  {_quote(name)} [shape=invhouse fillcolor="#dddddd" '
            f"label={_html_label([name, _shape_text(shape)], max_label)}];"
        )
    sources = {name: [name] for name in dag.input_names}
    writer.dag(dag, report, "", sources)
    for name in unique_refs(dag.output):
        for source in sources[name]:
            writer.edges[source, "<output>"] = None
    summary = f"{_si(sum(p.numel() for p in dag.parameters()))} params"
    if report:
        summary += f", {_si(report.total_flops)} FLOPs"
    label = _html_label(["output", summary], 60)
    writer.nodes.append(f'  "<output>" [shape=house fillcolor="#dddddd" label={label}];')
    header = [
        "digraph dag {",
        '  graph [rankdir=TB ranksep=0.25 nodesep=0.2 fontname="Helvetica"];',
        '  node [shape=box style="rounded,filled" fontname="Helvetica" fontsize=10 margin="0.1,0.04" '
        "height=0.3 penwidth=0.6];",
        '  edge [arrowsize=0.5 color="#666666" penwidth=0.8];',
    ]
    edges = [f"  {_quote(a)} -> {_quote(b)};" for a, b in writer.edges]
    return "\n".join([*header, writer.legend(), *writer.nodes, *edges, "}"]) + "\n"


def _dot(source: str, fmt: str) -> bytes:
    if shutil.which("dot") is None:
        raise GraphvizError(
            "the graphviz `dot` program is not on PATH; install graphviz "
            "(apt-get install -y graphviz, brew install graphviz or conda install graphviz)"
        )
    done = subprocess.run(["dot", f"-T{fmt}"], input=source.encode(), capture_output=True, check=False)
    if done.returncode != 0:
        raise GraphvizError(f"dot -T{fmt} failed: {done.stderr.decode(errors='replace').strip()}")
    return done.stdout


def render(dag: DagModule, path: str | Path, inputs: Any = None, fmt: str = "svg") -> Path:
    """Write `dag` drawn by graphviz to `path` as `fmt` (svg, png, pdf: anything `dot -T` takes)."""
    path = Path(path)
    path.write_bytes(_dot(to_dot(dag, inputs), fmt))
    return path


_PAGE = string.Template("""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>$title</title><style>
body { margin: 0; font: 13px Helvetica, Arial, sans-serif; display: flex; height: 100vh; }
#side { width: 320px; overflow: auto; padding: 10px; border-right: 1px solid #ccc; }
#view { flex: 1; overflow: hidden; cursor: grab; background: #fafafa; }
#stage { transform-origin: 0 0; }
table { border-collapse: collapse; width: 100%; }
td, th { padding: 2px 6px; border-bottom: 1px solid #eee; }
td.n { text-align: right; } input { width: 100%; box-sizing: border-box; padding: 4px; }
.searching g.node { opacity: 0.25; } .searching g.node.hit { opacity: 1; }
g.node.hit path, g.node.hit polygon { stroke: #e00000; stroke-width: 4px; }
</style></head><body>
<div id="side"><h3>$title</h3><input id="q" placeholder="search vertex name or op"> <span id="count"></span>
<table>$totals</table><h4>ops</h4><table><tr><th>op</th><th>count</th><th>FLOPs</th></tr>$ops</table>
<p>wheel: zoom, drag: pan</p></div>
<div id="view"><div id="stage">$svg</div></div>
<script>
const view = document.getElementById("view"), stage = document.getElementById("stage");
let s = 1, x = 0, y = 0, drag = null;
function apply() { stage.style.transform = "translate(" + x + "px," + y + "px) scale(" + s + ")"; }
const svg = stage.querySelector("svg");
s = Math.min(1, view.clientWidth / svg.getBoundingClientRect().width); apply();
view.addEventListener("wheel", function (e) {
  e.preventDefault();
  const r = view.getBoundingClientRect(), k = Math.exp(-e.deltaY * 0.0015);
  const px = e.clientX - r.left, py = e.clientY - r.top;
  x = px - (px - x) * k; y = py - (py - y) * k; s *= k; apply();
}, { passive: false });
view.addEventListener("mousedown", function (e) {
  e.preventDefault(); drag = [e.clientX - x, e.clientY - y];
});
window.addEventListener("mouseup", function () { drag = null; });
window.addEventListener("mousemove", function (e) {
  if (drag) { x = e.clientX - drag[0]; y = e.clientY - drag[1]; apply(); }
});
document.getElementById("q").addEventListener("input", function (e) {
  const q = e.target.value.trim().toLowerCase(); let n = 0;
  for (const g of stage.querySelectorAll("g.node")) {
    const hit = q !== "" && g.textContent.toLowerCase().includes(q);
    g.classList.toggle("hit", hit); n += hit;
  }
  stage.classList.toggle("searching", q !== "");
  document.getElementById("count").textContent = q ? n + " found" : "";
});
</script></body></html>
""")


def _rows(rows: Sequence[tuple[str, ...]]) -> str:
    """HTML table rows; every cell but the first is right-aligned."""
    cell = "<td{}>{}</td>".format
    return "".join(
        "<tr>" + "".join(cell(" class=n" if i else "", html.escape(c)) for i, c in enumerate(row)) + "</tr>"
        for row in rows
    )


def to_html(dag: DagModule, path: str | Path, inputs: Any = None, title: str = "torch-dag") -> Path:
    """Write one self-contained HTML page (works offline): the SVG inline, pan/zoom, search, a summary."""
    given = _as_tuple(inputs)
    report = count_flops(dag, *given) if inputs is not None else None
    svg = _dot(_to_dot(dag, given, report, max_label=40), "svg").decode()
    svg = svg[svg.index("<svg") :]  # drop the XML prolog and DOCTYPE: the page is HTML
    ops = Counter(v.op for v in dag)
    op_flops: Counter[str] = Counter()
    for vertex in dag:
        op_flops[vertex.op] += report.flops[vertex.name] if report else 0
    total = max(1, report.total_flops) if report else 0
    kmapp = report.kmapp if report else None
    params = sum(p.numel() for p in dag.parameters())
    flops = f"{report.total_flops / 1e9:.4f} G, batch {report.batch}" if report else "pass inputs"
    totals = [
        ("vertices", str(len(dag))),
        ("params", f"{params / 1e6:.3f} M"),
        ("FLOPs", flops),
        ("kmapp", f"{kmapp:.2f}" if kmapp is not None else "n/a"),
    ]
    op_rows = [
        (op, str(n), f"{100 * op_flops[op] / total:.1f}%" if report else "") for op, n in ops.most_common()
    ]
    page = _PAGE.substitute(title=html.escape(title), svg=svg, totals=_rows(totals), ops=_rows(op_rows))
    path = Path(path)
    path.write_text(page, encoding="utf-8")
    return path
