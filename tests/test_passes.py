"""Graph passes on the zoo and a timm sample: verify holds, function kept where it should be, the
input is untouched and the result round-trips through save/load."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torch_dag as td
from tests.zoo import ZOO, make
from torch_dag import passes as P
from torch_dag.core.compare import bitwise_equal, compare_outputs

timm = pytest.importorskip("timm")

TIMM_SAMPLE = [
    ("resnet18", 64),
    ("mobilenetv3_small_100", 96),
    ("convnext_atto", 64),
    ("efficientnet_b0", 96),
    ("vit_tiny_patch16_224", 224),
    ("swin_tiny_patch4_window7_224", 224),
]

# passes that must keep the DAG's function (eval mode)
PRESERVING = {
    "remove_identities": P.remove_identities,
    "remove_dead": P.remove_dead,
    "dedupe_constants": P.dedupe_constants,
    "fold_batchnorm": P.fold_batchnorm,
    "nest_by_module": lambda d: P.nest_by_module(d, 1),
    "nest_then_flatten": lambda d: P.flatten(P.nest_by_module(d, 1)),
}


def _zoo(name):
    model, inputs = make(name)
    return td.build_from_unstructured_module(model, inputs), inputs


def _timm(name, size):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    x = torch.randn(1, 3, size, size)
    return td.build_from_unstructured_module(model, (x,)), (x,)


CASES = [pytest.param(lambda n=n: _zoo(n), id=f"zoo-{n}") for n in sorted(ZOO)] + [
    pytest.param(lambda n=n, s=s: _timm(n, s), id=f"timm-{n}") for n, s in TIMM_SAMPLE
]


def _signature(dag):
    return [(v.name, v.op, id(v.module), v.args, tuple(v.kwargs.items())) for v in dag]


@pytest.mark.parametrize("make_case", CASES)
@pytest.mark.parametrize("pass_name", sorted(PRESERVING))
def test_preserving_pass(make_case, pass_name, tmp_path):
    dag, inputs = make_case()
    before = _signature(dag)
    with torch.no_grad():
        reference = dag(*inputs)
        result = PRESERVING[pass_name](dag)
        equal, _, reason = compare_outputs(
            reference, result(*inputs), rtol=1e-4 if pass_name == "fold_batchnorm" else 1e-5
        )
    assert equal, reason
    assert _signature(dag) == before, "the pass changed its input"
    loaded = td.load(td.save(result, tmp_path / "result.dag"))
    with torch.no_grad():
        assert bitwise_equal(result(*inputs), loaded(*inputs))


def test_fold_batchnorm_folds_every_pair():
    dag, _inputs = _timm("resnet18", 64)
    folded = P.fold_batchnorm(dag)
    assert not [v for v in folded if v.op == "BatchNorm2d"]
    assert sum(v.op == "Conv2d" for v in folded) == sum(v.op == "Conv2d" for v in dag)


def test_swap_activations_every_spelling():
    dag, inputs = _zoo("spellings")
    assert sum(v.op == "ReLU" for v in dag) == 3  # F.relu, torch.relu, x.relu()
    swapped = P.swap_activations(dag, {"relu": "hardswish", nn.Sigmoid: nn.Tanh})
    ops = [v.op for v in swapped]
    assert (
        "ReLU" not in ops and "Sigmoid" not in ops and ops.count("Hardswish") == 3 and ops.count("Tanh") == 2
    )
    with torch.no_grad():
        x, y = inputs
        a = x + y
        expected = nn.functional.hardswish(a) * 3 + nn.functional.gelu(a) + torch.tanh(a) * 2
        expected = expected.softmax(-1) * 2
        torch.testing.assert_close(swapped(*inputs)[0], expected)


def test_swap_activations_name_filter_and_factory():
    dag, _ = _timm("resnet18", 64)
    swapped = P.swap_activations(dag, {"ReLU": lambda old: nn.LeakyReLU(0.1)}, names=r"^layer1_")
    changed = [v.name for v in swapped if v.op == "LeakyReLU"]
    assert changed and all(n.startswith("layer1_") for n in changed)
    assert any(v.op == "ReLU" for v in swapped)


def test_insert_batchnorm_after_lonely_convs():
    dag, inputs = _zoo("depthwise_grouped")
    pattern = P.op(P.CONVS, where=P.not_followed_by(P.BATCH_NORMS))
    lonely = [m.vertex.name for m in P.find(dag, pattern)]
    assert lonely == ["grouped", "proj"]
    result = P.insert_after(dag, pattern, lambda v: nn.BatchNorm2d(v.module.out_channels).eval())
    for name in lonely:
        (user,) = result.successors()[name]
        assert result[user].op == "BatchNorm2d"
    with torch.no_grad():  # fresh eval-mode BatchNorms are the identity up to eps
        assert compare_outputs(dag(*inputs), result(*inputs), rtol=1e-4)[0]


def test_insert_before():
    dag, inputs = _zoo("residual")
    result = P.insert_before(dag, P.op("Linear"), lambda v: nn.Dropout(0.0))
    assert result[result["head"].args[0].name].op == "Dropout"
    with torch.no_grad():
        assert torch.equal(dag(*inputs), result(*inputs))


def test_pattern_explains_failures():
    dag = P.remove_identities(_timm("resnet18", 64)[0])  # timm puts Identity (drop_block, aa) after bn
    conv_bn_relu = P.op("ReLU", inputs=[P.op("BatchNorm2d", inputs=[P.op(P.CONVS)], only_user=True)])
    assert len(P.find(dag, conv_bn_relu)) > 5
    reason = P.why_not(dag, conv_bn_relu, "layer1_0_act2")  # relu after the residual add
    assert reason is not None and "add" in reason and "BatchNorm2d" in reason


def test_nest_and_flatten_explicit():
    dag, inputs = _zoo("residual")
    block = [v.name for v in dag if v.meta.get("module_path", "").startswith(("a", "b"))]
    nested = P.nest(dag, block, "body")
    assert "body" in nested and len(nested["body"].module) == len(block)
    report = td.count_flops(nested, *inputs)
    assert report.total_flops == td.count_flops(dag, *inputs).total_flops  # FLOPs see through nesting
    flat = P.flatten(nested)
    assert len(flat) == len(dag)
    with torch.no_grad():
        assert torch.equal(flat(*inputs), dag(*inputs))


def test_nest_refuses_non_convex_sets():
    dag, _ = _zoo("residual")
    names = [v.name for v in dag]
    first_stem, add = names[0], next(v.name for v in dag if v.op == "add")
    with pytest.raises(td.DagError, match="path from it back into it"):
        P.nest(dag, [first_stem, add], "bad")


def test_nest_multiple_outputs():
    dag, inputs = _zoo("concat_split")
    cat = next(v.name for v in dag if v.op == "cat")
    chunk = next(v.name for v in dag if v.op == "chunk")
    names = [v.name for v in dag]
    group = names[names.index(cat) : names.index(chunk) + 1]
    nested = P.nest(dag, group, "mid")
    assert any(v.name.startswith("mid_out") for v in nested)
    with torch.no_grad():
        assert torch.equal(nested(*inputs), dag(*inputs))
        assert torch.equal(P.flatten(nested)(*inputs), dag(*inputs))


def test_remove_identities_drops_dropout_and_identity():
    dag, _inputs = _zoo("dropouts")
    result = P.remove_identities(dag)
    assert not [v for v in result if v.op in P.DROPOUTS]
    kept = P.remove_identities(dag, inference=False)
    assert [v for v in kept if v.op in P.DROPOUTS]
