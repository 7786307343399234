"""nn.MultiheadAttention decomposed into atomic vertices (`passes.decompose_attention`): outputs equal
to the eager module in every calling convention, and heads / head dims that prune (zero-loss oracle)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_dag as td
from torch_dag.core.compare import bitwise_equal, compare_outputs
from torch_dag.passes import decompose_attention
from torch_dag.pruning import PruneConfig, channel_groups, prune, surgery

B, L, E, H = 2, 5, 16, 4


class Call(nn.Module):
    """One MultiheadAttention call on projected inputs, with the masks given to forward."""

    def __init__(self, mha: nn.MultiheadAttention, need_weights: bool = False, average: bool = True):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(6, mha.embed_dim), nn.Linear(6, mha.kdim), nn.Linear(6, mha.vdim)
        self.mha, self.head = mha, nn.Linear(mha.embed_dim, 3)
        self.need_weights, self.average = need_weights, average

    def forward(self, x, attn_mask=None, key_padding_mask=None):
        out, weights = self.mha(
            self.q(x),
            self.k(x),
            self.v(x),
            key_padding_mask=key_padding_mask,
            need_weights=self.need_weights,
            attn_mask=attn_mask,
            average_attn_weights=self.average,
        )
        return (self.head(out), weights) if self.need_weights else self.head(out)


class Twice(nn.Module):
    """The same module called twice (its default need_weights=True, the weights read once)."""

    def __init__(self):
        super().__init__()
        self.mha, self.head = nn.MultiheadAttention(E, H, batch_first=True), nn.Linear(E, 3)

    def forward(self, x):
        y, _ = self.mha(x, x, x)
        z, weights = self.mha(y, x, x)
        return self.head(y + z), weights


def _causal(length: int = L) -> torch.Tensor:
    return torch.triu(torch.ones(length, length, dtype=torch.bool), 1)


def _padding() -> torch.Tensor:
    mask = torch.zeros(B, L, dtype=torch.bool)
    mask[0, -2:] = True
    return mask


def _mha(**kwargs) -> nn.MultiheadAttention:
    return nn.MultiheadAttention(E, H, **{"batch_first": True, **kwargs})


X, X_SEQ_FIRST = torch.randn(B, L, 6), torch.randn(L, B, 6)
CASES = {  # name: (model, inputs, heads prunable)
    "plain": (lambda: Call(_mha()), (X,), True),
    "seq_first": (lambda: Call(_mha(batch_first=False)), (X_SEQ_FIRST,), True),
    "no_bias": (lambda: Call(_mha(bias=False)), (X,), True),
    "kdim_vdim": (lambda: Call(_mha(kdim=8, vdim=12)), (X,), True),
    "causal_bool": (lambda: Call(_mha()), (X, _causal()), True),
    "float_mask": (lambda: Call(_mha()), (X, torch.randn(L, L)), True),
    "padding": (lambda: Call(_mha()), (X, None, _padding()), True),
    "both_masks_seq_first": (
        lambda: Call(_mha(batch_first=False)),
        (X_SEQ_FIRST, _causal(), _padding()),
        True,
    ),
    "per_head_mask": (lambda: Call(_mha()), (X, torch.randn(B * H, L, L)), False),  # mask spans the heads
    "weights_averaged": (lambda: Call(_mha(), need_weights=True), (X, None, _padding()), False),
    "weights_per_head": (lambda: Call(_mha(), need_weights=True, average=False), (X, _causal()), False),
    "dropout": (lambda: Call(_mha(dropout=0.1)), (X,), True),
    "unbatched": (lambda: Call(_mha()), (X[0], _causal()), True),
    "unbatched_weights": (lambda: Call(_mha(), need_weights=True), (X[0], None, _padding()[0]), False),
    # the first call's heads prune; the second's are fixed: its averaged weights are an output
    "called_twice": (lambda: Twice(), (torch.randn(B, L, E),), True),
}


def _convert(case: str) -> tuple[nn.Module, td.DagModule, tuple]:
    factory, inputs, _ = CASES[case]
    torch.manual_seed(0)
    model = factory().eval()
    names = ("x", "attn_mask", "key_padding_mask")
    given = {n: x for n, x in zip(names, inputs) if x is not None}
    dag = td.build_from_unstructured_module(model, (given.pop("x"),), given)
    return model, dag, tuple(x for x in inputs if x is not None)


@pytest.mark.parametrize("case", sorted(CASES))
def test_decomposed_attention_equals_the_module(case):
    model, dag, inputs = _convert(case)
    assert any(v.op == "MultiheadAttention" for v in dag)
    atomic = decompose_attention(dag, inputs)
    td.verify(atomic)
    assert not any(v.op == "MultiheadAttention" for v in atomic)
    assert any(v.op == "MultiheadAttention" for v in dag)  # the input is untouched
    replaced = {v.name for v in dag if v.op == "MultiheadAttention"}
    assert {v.meta.get("decomposed_from") for v in atomic} - {None} == replaced
    with torch.no_grad():
        reference = model(inputs[0], **dict(zip(dag.input_names[1:], inputs[1:])))
        equal, _, reason = compare_outputs(reference, atomic(*inputs), rtol=1e-5)
    assert equal, reason
    before, after = td.count_flops(dag, *inputs), td.count_flops(atomic, *inputs)
    assert after.total_flops == before.total_flops  # the FLOP rule of the module counts the same
    assert after.total_params == before.total_params
    groups = channel_groups(atomic, inputs)
    heads = [g for g in groups.groups() if any(p.endswith("mha_q") for p in g.producers)]
    assert len(heads) == 1 and len(heads[0].channels) == H, groups.summary()
    assert heads[0].prunable == CASES[case][2], groups.summary()


def test_dropout_stays_a_training_time_layer():
    _, dag, inputs = _convert("dropout")
    atomic = decompose_attention(dag, inputs)
    (dropout,) = [v for v in atomic if isinstance(v.module, nn.Dropout)]
    assert dropout.module.p == 0.1
    atomic.train()
    torch.manual_seed(0)
    first = atomic(*inputs)
    assert not torch.equal(first, atomic(*inputs))  # dropout on the attention weights while training


def test_unsupported_options_are_refused_or_left():
    torch.manual_seed(0)
    model = Call(_mha(add_bias_kv=True)).eval()
    dag = td.build_from_unstructured_module(model, (X,))
    with pytest.raises(
        td.DagError, match=r"vertex 'mha' \(MultiheadAttention\) uses add_bias_kv.*strict=False"
    ):
        decompose_attention(dag, (X,))
    kept = decompose_attention(dag, (X,), strict=False)
    assert [v.op for v in kept] == [v.op for v in dag]
    pruned = prune(dag, 0.8, (X,), config=PruneConfig(round_to=1))  # prunes around it, as before
    assert pruned(X).shape == dag(X).shape and any(v.op == "MultiheadAttention" for v in pruned)


class Transformer(nn.Module):
    """Two pre-activation-free blocks of MultiheadAttention + MLP on a residual stream (no LayerNorm:
    zeroed channels carry exact zeros), with a causal mask and key padding."""

    def __init__(self, batch_first: bool, dim: int = 32, heads: int = 4):
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Linear(6, dim)
        self.attention = nn.ModuleList(
            nn.MultiheadAttention(dim, heads, batch_first=batch_first) for _ in "ab"
        )
        self.mlp = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, 64), nn.ReLU(), nn.Linear(64, dim)) for _ in "ab"
        )
        self.head = nn.Linear(dim, 5)

    def forward(self, x, attn_mask, key_padding_mask):
        x = self.embed(x)
        x = x if self.batch_first else x.transpose(0, 1)
        for attention, mlp in zip(self.attention, self.mlp):
            x = x + attention(x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask)[0]
            x = x + mlp(x)
        return self.head(x.mean(1 if self.batch_first else 0))


def _transformer(batch_first: bool) -> tuple[td.DagModule, tuple]:
    torch.manual_seed(0)
    inputs = (torch.randn(B, 7, 6), _causal(7), torch.zeros(B, 7, dtype=torch.bool))
    inputs[2][1, -1] = True
    return td.build_from_unstructured_module(Transformer(batch_first).eval(), inputs), inputs


def _zero(dag: td.DagModule, groups, roots: set[int]) -> None:
    """Make the channels of `roots` exact zeros: zero their rows (and biases) in every producer."""
    with torch.no_grad():
        for name, role in groups.roles.items():
            if role.out_ids is not None and role.axis is None:
                module = dag[name].module
                mask = torch.from_numpy(np.isin(groups.root(role.out_ids), list(roots)))
                module.weight[mask] = 0
                if module.bias is not None:
                    module.bias[mask] = 0


@pytest.mark.parametrize("attention", ["heads", "head_dim"])
@pytest.mark.parametrize("batch_first", [True, False])
def test_zeroed_heads_prune_without_loss(batch_first, attention):
    """A head (or the same head-dim position of every head) whose q, k and v rows are zero adds
    nothing: removing it everywhere, with a third of every other group's channels, keeps the outputs."""
    dag, inputs = _transformer(batch_first)
    atomic = decompose_attention(dag, inputs)
    groups = channel_groups(atomic, inputs, attention=attention)
    heads = [g for g in groups.groups() if any(p.endswith("_q") for p in g.producers)]
    assert len(heads) == 2 and all(g.prunable for g in heads), groups.summary()
    assert all(len(g.channels) == (4 if attention == "heads" else 8) for g in heads), groups.summary()
    prunable = [g for g in groups.groups() if g.prunable]
    rng = np.random.default_rng(0)
    roots = {
        int(r) for g in prunable for r in rng.choice(g.channels, size=len(g.channels) // 3, replace=False)
    }
    roots |= {g.channels[1] for g in heads}
    _zero(atomic, groups, roots)
    with torch.no_grad():
        reference = atomic(*inputs)
        pruned = surgery.apply(atomic, groups, lambda ids: ~np.isin(groups.root(ids), list(roots)))
        td.verify(pruned)
        equal, _, reason = compare_outputs(reference, pruned(*inputs), rtol=1e-4)
    assert equal, reason
    widths = [pruned[v.name].module.out_features for v in atomic if v.name.endswith(("_q", "_k", "_v"))]
    assert all(w < 32 for w in widths), widths  # every block lost heads (or head dims) in q, k and v


@pytest.mark.parametrize("batch_first", [True, False])
def test_prune_to_half_the_flops_removes_heads(batch_first, tmp_path):
    dag, inputs = _transformer(batch_first)
    before = td.count_flops(dag, *inputs).total_flops
    pruned = prune(dag, 0.5, inputs)
    assert abs(td.count_flops(pruned, *inputs).total_flops / before - 0.5) <= 0.02
    heads = {v.name: v.module.out_features for v in pruned if v.name.endswith("_q")}
    assert len(heads) == 2 and any(w < 32 for w in heads.values()), heads
    assert all(w % 8 == 0 for w in heads.values()), heads  # whole heads of 8
    bigger = (torch.randn(3, 7, 6), inputs[1], torch.zeros(3, 7, dtype=torch.bool))
    with torch.no_grad():
        out = pruned(*inputs)
        assert out.shape == dag(*inputs).shape and pruned(*bigger).shape == (3, 5)  # batch stays free
    loaded = td.load(td.save(pruned, tmp_path / "pruned.dag"))
    with torch.no_grad():
        assert bitwise_equal(out, loaded(*inputs))


@pytest.mark.slow
def test_torchvision_vit_prunes_heads_to_half_the_flops():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(weights=None).eval()
    x = torch.randn(1, 3, 224, 224)
    dag = td.build_from_unstructured_module(model, (x,))
    atomic = decompose_attention(dag, (x,))
    with torch.no_grad():
        equal, _, reason = compare_outputs(model(x), atomic(x), rtol=1e-4)
    assert equal, reason
    pruned = prune(dag, 0.5, (x,))
    ratio = td.count_flops(pruned, x).total_flops / td.count_flops(dag, x).total_flops
    assert abs(ratio - 0.5) <= 0.02, ratio
    heads = [v.module.out_features for v in pruned if v.name.endswith("self_attention_q")]
    assert len(heads) == 12 and any(w < 768 for w in heads) and all(w % 64 == 0 for w in heads), heads
    with torch.no_grad():
        assert pruned(x).shape == (1, 1000)


def test_protecting_an_attention_layer_by_its_name_keeps_its_heads():
    """The name of a decomposed MultiheadAttention vertex (as `torch-dag info` lists the converted DAG)
    still names it: all its projections keep their widths."""
    dag, inputs = _transformer(batch_first=True)
    first = next(v.name for v in dag if isinstance(v.module, nn.MultiheadAttention))
    pruned = prune(dag, 0.6, inputs, protected=[first])
    widths = {v.name: v.module.out_features for v in pruned if v.name.endswith(("_q", "_k", "_v"))}
    assert {w for n, w in widths.items() if n.startswith(f"{first}_")} == {32}, widths
    assert any(w < 32 for n, w in widths.items() if not n.startswith(f"{first}_")), widths
    with pytest.raises(td.DagError, match="no vertex named 'attention_9'"):
        prune(dag, 0.6, inputs, protected=["attention_9"])


class Functional(nn.Module):
    """`F.multi_head_attention_forward` on the module's own packed weights (sequence first), or on
    weights it computes (`scaled`: then no layer holds them and the call stays a function vertex)."""

    def __init__(self, scaled: bool = False):
        super().__init__()
        self.scaled = scaled
        self.embed = nn.Linear(6, 32)
        self.in_proj_weight = nn.Parameter(torch.randn(96, 32) / 32**0.5)
        self.in_proj_bias = nn.Parameter(torch.randn(96))
        self.out = nn.Linear(32, 32)
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        h = self.embed(x)
        weight = self.in_proj_weight * 0.5 if self.scaled else self.in_proj_weight
        a, _ = F.multi_head_attention_forward(
            h, h, h, 32, 4, weight, self.in_proj_bias, None, None, False, 0.0,
            self.out.weight, self.out.bias, training=self.training, need_weights=False,
        )  # fmt: skip
        return self.head((h + a).mean(0))


def test_functional_attention_on_own_weights_becomes_a_layer_whose_heads_prune():
    torch.manual_seed(0)
    model, x = Functional().eval(), torch.randn(7, 2, 6)
    dag = td.build_from_unstructured_module(model, x)
    assert [v.op for v in dag].count("MultiheadAttention") == 1
    assert compare_outputs(model(x), dag(x))[0]
    flops = td.count_flops(dag, x).total_flops
    pruned = prune(dag, 0.5, x, config=PruneConfig(round_to=8))
    assert abs(td.count_flops(pruned, x).total_flops / flops - 0.5) <= 0.02
    (width,) = [v.module.out_features for v in pruned if v.name.endswith("_q")]
    assert width < 32 and width % 8 == 0  # whole heads of 8


def test_functional_attention_on_computed_weights_stays_a_function_and_is_counted():
    torch.manual_seed(0)
    model, x = Functional(scaled=True).eval(), torch.randn(7, 2, 6)
    dag = td.build_from_unstructured_module(model, x)
    (call,) = [v for v in dag if v.op == "multi_head_attention_forward"]
    assert compare_outputs(model(x), dag(x))[0]
    layer = td.build_from_unstructured_module(Functional().eval(), x)  # same sizes, as one layer
    counted = td.count_flops(dag, x).flops[call.name]
    (mha,) = [v.name for v in layer if v.op == "MultiheadAttention"]
    assert counted == td.count_flops(layer, x).flops[mha]
    groups = channel_groups(dag, (x,))
    assert any("multi_head_attention_forward" in r for g in groups.groups() for r in g.reasons)
