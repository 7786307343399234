"""FLOPs, params and kmapp: totals agree with fvcore on the zoo, on single layers and on a few timm models."""

from __future__ import annotations

import collections
import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_dag as td
from tests.zoo import ZOO, convert, make

fvcore_nn = pytest.importorskip("fvcore.nn")
jit_handles = pytest.importorskip("fvcore.nn.jit_handles")

# fvcore traces with torch.jit.trace, which warns about Python values it bakes in
pytestmark = pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")


def _sdpa_handle(inputs: list, outputs: list) -> int:
    """fvcore has no rule for SDPA: count q @ k^T and attn @ v multiply-adds, as torch_dag does."""
    query, key, value = (jit_handles.get_shape(x) for x in inputs[:3])
    return math.prod(query[:-1]) * key[-2] * (query[-1] + value[-1])


def fvcore_flops(model: nn.Module, inputs: tuple) -> int:
    analysis = fvcore_nn.FlopCountAnalysis(model, inputs)
    analysis.set_op_handle("aten::scaled_dot_product_attention", _sdpa_handle)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    return analysis.total()


def unique_param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# --- the zoo -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_flops_match_fvcore(name):
    model, inputs, dag = convert(name)
    report = td.count_flops(dag, *inputs)
    assert report.total_flops == fvcore_flops(model, inputs)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_params_per_vertex_sum_to_unique_params(name):
    model, inputs, dag = convert(name)
    report = td.count_flops(dag, *inputs)
    assert set(report.params) == set(report.flops) == set(report.ops) == {v.name for v in dag}
    assert all(n >= 0 for n in report.params.values())
    assert report.total_params == unique_param_count(model) == unique_param_count(dag)


def test_shared_layer_params_counted_once_flops_twice():
    _model, inputs, dag = convert("shared_module")
    report = td.count_flops(dag, *inputs)
    linear = [name for name, op in report.ops.items() if op == "Linear"]
    assert len(linear) == 2
    assert sorted(report.params[n] for n in linear) == [0, 8 * 8 + 8]
    assert [report.flops[n] for n in linear] == [3 * 8 * 8] * 2


# --- single layers -----------------------------------------------------------------------------------


class Fn(nn.Module):
    """A model that is one function call, with its own parameters."""

    def __init__(self, fn: Callable[..., torch.Tensor], **params: torch.Tensor):
        super().__init__()
        self.fn = fn
        for key, value in params.items():
            setattr(self, key, nn.Parameter(value))

    def forward(self, x):
        return self.fn(self, x)


class First(nn.Module):
    """Wraps a layer so that the layer stays a vertex, and keeps its first output."""

    def __init__(self, layer: nn.Module, attention: bool = False):
        super().__init__()
        self.layer, self.attention = layer, attention

    def forward(self, x):
        out = self.layer(x, x, x) if self.attention else self.layer(x)
        return out[0] if isinstance(out, tuple) else out


class CrossAttention(nn.Module):
    """Attention whose keys and values have their own widths (kdim, vdim)."""

    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, kdim=6, vdim=4, batch_first=True)

    def forward(self, x):
        return self.mha(x, x[..., :6], x[..., :4], need_weights=False)[0]


def _img() -> torch.Tensor:
    return torch.randn(2, 4, 8, 8)


def _seq() -> torch.Tensor:
    return torch.randn(2, 4, 8)


LAYERS: dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor]]] = {
    "Conv1d_unbatched": (lambda: First(nn.Conv1d(4, 6, 3)), lambda: torch.randn(4, 8)),
    "Conv2d_grouped": (lambda: First(nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2)), _img),
    "ConvTranspose2d": (lambda: First(nn.ConvTranspose2d(4, 6, 3, stride=2)), _img),
    "Linear_3d": (lambda: First(nn.Linear(8, 5)), _seq),
    "F.linear": (lambda: Fn(lambda m, x: F.linear(x, m.w), w=torch.randn(5, 8)), _seq),
    "BatchNorm2d_train": (lambda: First(nn.BatchNorm2d(4)).train(), _img),
    "BatchNorm1d_no_affine": (lambda: First(nn.BatchNorm1d(4, affine=False)), _seq),
    "GroupNorm": (lambda: First(nn.GroupNorm(2, 4)), _img),
    "InstanceNorm2d_affine": (lambda: First(nn.InstanceNorm2d(4, affine=True)), _img),
    "LayerNorm_no_affine": (lambda: First(nn.LayerNorm(8, elementwise_affine=False)), _seq),
    "F.group_norm_kw": (lambda: Fn(lambda m, x: F.group_norm(x, 2, weight=m.w), w=torch.ones(4)), _img),
    "AdaptiveAvgPool2d": (lambda: First(nn.AdaptiveAvgPool2d(2)), _img),
    "bmm": (lambda: Fn(lambda m, x: torch.bmm(x, x.transpose(1, 2))), _seq),
    "einsum": (lambda: Fn(lambda m, x: torch.einsum("bij,bkj->bik", x, x)), _seq),
    "interpolate_nearest_2d": (lambda: Fn(lambda m, x: F.interpolate(x, scale_factor=2)), _img),
    "interpolate_bilinear": (
        lambda: Fn(lambda m, x: F.interpolate(x, size=(16, 12), mode="bilinear", align_corners=True)),
        _img,
    ),
    "MultiheadAttention_seq_first": (lambda: First(nn.MultiheadAttention(8, 2), attention=True), _seq),
    "MultiheadAttention_kdim": (CrossAttention, _seq),
    "F.batch_norm": (lambda: Fn(lambda m, x: F.batch_norm(x, None, None, training=True)), _img),
    "F.instance_norm": (lambda: Fn(lambda m, x: F.instance_norm(x)), _img),
    "F.conv_transpose2d": (
        lambda: Fn(lambda m, x: F.conv_transpose2d(x, m.w, stride=2), w=torch.randn(4, 6, 3, 3)),
        _img,
    ),
    "grid_sample": (
        lambda: Fn(lambda m, x: F.grid_sample(x, torch.zeros(2, 5, 5, 2), align_corners=False)),
        _img,
    ),
    "AdaptiveAvgPool1d": (lambda: First(nn.AdaptiveAvgPool1d(2)), _seq),
    "interpolate_nearest_1d": (lambda: Fn(lambda m, x: F.interpolate(x, scale_factor=2)), _seq),
    "baddbmm": (lambda: Fn(lambda m, x: torch.baddbmm(torch.zeros(2, 4, 4), x, x.transpose(1, 2))), _seq),
}
# fvcore has no rule for these (only 2-d adaptive pooling and upsampling, no baddbmm): both count 0
UNCOUNTED_BY_FVCORE = {"AdaptiveAvgPool1d", "interpolate_nearest_1d", "baddbmm"}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_flops_match_fvcore(name):
    make_model, make_input = LAYERS[name]
    torch.manual_seed(0)
    model, x = make_model(), make_input()
    model = model if name.endswith("_train") else model.eval()
    dag = td.build_from_unstructured_module(model, (x,))
    ours, expected = td.count_flops(dag, x).total_flops, fvcore_flops(model, (x,))
    if name not in UNCOUNTED_BY_FVCORE:
        assert max(ours, expected) > 0, "pick a case with something to count"
    assert ours == expected


# --- kmapp and the report ------------------------------------------------------------------------------


def test_kmapp_is_flops_per_sample_per_pixel():
    model, _ = make("residual")
    x = torch.randn(2, 3, 16, 24)
    dag = td.build_from_unstructured_module(model, (x,))
    report = td.count_flops(dag, x)
    assert (report.batch, report.pixels) == (2, 16 * 24)
    assert report.kmapp == pytest.approx(report.total_flops / 2 / (16 * 24) / 1000, rel=1e-12)
    single = td.count_flops(dag, x[:1])
    assert report.total_flops == 2 * single.total_flops
    assert report.kmapp == pytest.approx(single.kmapp, rel=1e-12)


def test_no_kmapp_without_an_image_input():
    _model, inputs, dag = convert("shared_module")
    report = td.count_flops(dag, *inputs)
    assert report.pixels is None and report.kmapp is None
    assert "n/a" in report.table()


def test_table_has_totals_ops_and_heaviest_vertex():
    _model, inputs, dag = convert("residual")
    report = td.count_flops(dag, *inputs)
    table = report.table(top=3)
    assert f"{report.total_params / 1e6:.3f} M" in table
    assert f"{report.total_flops / 1e9:.3f} G" in table
    assert f"kmapp: {report.kmapp:.2f}" in table
    assert f"batch {report.batch}" in table
    histogram = report.op_histogram()
    assert histogram == collections.Counter(v.op for v in dag)
    for op, count in histogram.items():
        assert f"{op} x{count}" in table
    heaviest = max(report.flops, key=report.flops.get)
    assert heaviest in table
    assert len(table.splitlines()) == 4 + 3


# --- timm ----------------------------------------------------------------------------------------------

TIMM_SAMPLE = [
    ("resnet18", 64),
    ("mobilenetv3_small_100", 96),
    ("vit_tiny_patch16_224", 224),
    ("convnext_atto", 64),
]


@pytest.mark.parametrize(("name", "size"), TIMM_SAMPLE, ids=[n for n, _ in TIMM_SAMPLE])
def test_timm_flops_and_params_match(name, size):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    x = torch.randn(1, 3, size, size)
    dag = td.build_from_unstructured_module(model, (x,))
    report = td.count_flops(dag, x)
    assert report.total_flops == fvcore_flops(model, (x,))
    assert report.total_params == unique_param_count(model)
