"""`td.nas` beyond the hand-written CNN: an `nn.MultiheadAttention` model converted without example
inputs (activations, depth, and on its flexible form, heads and widths) and a timm model (kernel sizes,
activations, depth), each against its eager model and through a file."""

from __future__ import annotations

import random
import warnings

import pytest
import torch
from torch import nn

import torch_dag as td


class Attention(nn.Module):
    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.emb = nn.Linear(8, d)
        self.attn = nn.MultiheadAttention(d, 4, batch_first=True)
        self.ln = nn.LayerNorm(d)
        self.fc1, self.act, self.fc2 = nn.Linear(d, 64), nn.GELU(), nn.Linear(64, d)
        self.head = nn.Linear(d, 5)
        self.skip_mlp = False  # the oracle of depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.emb(x)
        x = x + self.attn(x, x, x, need_weights=False)[0]
        if not self.skip_mlp:
            x = x + self.fc2(self.act(self.fc1(self.ln(x))))
        return self.head(x.mean(1))


def _attention() -> Attention:
    torch.manual_seed(0)
    return Attention().eval()


def test_attention_model_activation_and_depth_against_eager(tmp_path):
    model, x = _attention(), torch.randn(3, 6, 8)
    dag = td.build_from_unstructured_module(model)  # input shape inferred from the first Linear
    sdag = td.nas.make_mutable(dag, (nn.GELU,), {"gelu": nn.GELU(), "relu": nn.ReLU()})
    sdag = td.nas.make_mutable(sdag, td.nas.residual, td.nas.skippable())
    assert td.nas.dump_chosen(sdag) == {"add": "block", "add_1": "block", "act": "gelu"}
    choice = {"add": "block", "add_1": "identity", "act": "relu"}
    td.nas.set_chosen(sdag, choice)
    oracle = _attention()
    oracle.skip_mlp = True
    with torch.no_grad():
        torch.testing.assert_close(sdag(x), oracle(x), rtol=0, atol=0)
        td.nas.set_chosen(sdag, {"add_1": "block"})
        oracle.skip_mlp, oracle.act = False, nn.ReLU()
        torch.testing.assert_close(sdag(x), oracle(x), rtol=0, atol=0)
        td.save(sdag, tmp_path / "a.dag")
        loaded = td.load(tmp_path / "a.dag")
        torch.testing.assert_close(loaded(x), oracle(x), rtol=0, atol=0)
        sub = td.nas.export_subnet(loaded)
        torch.testing.assert_close(sub(x), oracle(x), rtol=0, atol=0)
    assert td.nas.dump_chosen(loaded) == {**choice, "add_1": "block"}


def test_flexible_attention_model_heads_widths_and_activation():
    model, x = _attention(), torch.randn(3, 6, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flex = td.make_flexible(td.build_from_unstructured_module(model), levels=[0.5, 1.0])
    sdag = td.nas.make_mutable(flex, (nn.GELU,), {"gelu": nn.GELU(), "relu": nn.ReLU()})
    channel = [m.name for m in td.nas.mutables(sdag) if m.kind == "channel"]
    assert len(channel) == flex.search_dimension == 3  # the residual stream, the heads, the MLP
    rng = random.Random(5)
    for _ in range(3):
        choice = td.nas.sample(sdag, rng)
        td.nas.set_chosen(sdag, choice)
        sub = td.nas.export_subnet(sdag)
        with torch.no_grad():
            torch.testing.assert_close(sub(x), sdag(x), rtol=0, atol=0)
        assert td.count_flops(sub, x).total_flops == td.count_flops(sdag, x).total_flops
    td.nas.set_chosen(sdag, {**td.nas.largest(sdag), "act": "gelu"})
    with torch.no_grad():
        torch.testing.assert_close(sdag(x), model(x))


@pytest.mark.slow
def test_timm_mobilenetv3_kernel_sizes_activations_and_depth(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("mobilenetv3_small_050", pretrained=False).eval()
    x = torch.randn(1, 3, 64, 64)
    dag = td.build_from_unstructured_module(model, example_inputs=(x,))
    depthwise = lambda v, g: v.op == "Conv2d" and v.module.groups == v.module.in_channels > 1  # noqa: E731
    sdag = td.nas.make_mutable(dag, depthwise, td.nas.kernel_sizes(3, 5, 7))
    sdag = td.nas.make_mutable(sdag, (nn.Hardswish, nn.ReLU), {"relu": nn.ReLU(), "hswish": nn.Hardswish()})
    sdag = td.nas.make_mutable(sdag, td.nas.residual, td.nas.skippable())
    kinds = [m.kind for m in td.nas.mutables(sdag)]
    assert kinds.count("value") == 11 and kinds.count("op") > 20
    with torch.no_grad():
        torch.testing.assert_close(sdag(x), model(x), rtol=0, atol=0)
        choice = td.nas.sample(sdag, random.Random(0))
        sub = td.nas.export_subnet(sdag, choice)
        td.nas.set_chosen(sdag, choice)
        torch.testing.assert_close(sub(x), sdag(x), rtol=0, atol=0)
        td.save(sdag, tmp_path / "m.dag")
        loaded = td.load(tmp_path / "m.dag")
        torch.testing.assert_close(loaded(x), sdag(x), rtol=0, atol=0)
    assert td.nas.dump_chosen(loaded) == choice
    flops = [
        td.count_flops(td.nas.export_subnet(sdag, c), x).total_flops
        for c in (td.nas.smallest(sdag), choice, td.nas.largest(sdag))
    ]
    assert flops[0] < flops[1] < flops[2]
    assert td.count_flops(sdag, x).total_flops == flops[1]
