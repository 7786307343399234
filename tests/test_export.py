"""The torch.export path: ATen graphs mapped back to the vocabulary, the fallback from fx, and
Hugging Face models (built from small configs, random weights, no download)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_dag as td
from tests.zoo import make
from torch_dag.core.compare import bitwise_equal, compare_outputs


def run(module, *args, **kwargs):
    with torch.no_grad():
        return module(*args, **kwargs)


@pytest.mark.parametrize(
    "name", ["residual", "concat_split", "depthwise_grouped", "squeeze_excite", "attention"]
)
def test_zoo_through_export_equals_eager_and_has_the_same_layers(name, tmp_path):
    model, inputs = make(name)
    dag = td.build_from_unstructured_module(model, inputs, tracer="export")
    assert dag.traced_with == "export"
    td.verify(dag)
    equal, worst, why = compare_outputs(run(model, *inputs), run(dag, *inputs))
    assert equal, (worst, why)
    by_fx = td.build_from_unstructured_module(model, inputs, tracer="fx")
    if not any(v.op == "MultiheadAttention" for v in by_fx):  # export decomposes it into its linears
        layers = sorted(v.op for v in dag if v.op[0].isupper() and v.op not in ("Parameter", "Constant"))
        assert layers == sorted(
            v.op for v in by_fx if v.op[0].isupper() and v.op not in ("Parameter", "Constant")
        )
    td.save(dag, tmp_path / "m.dag")
    assert bitwise_equal(run(dag, *inputs), run(td.load(tmp_path / "m.dag"), *inputs))


class KeywordsOnly(nn.Module):
    """A forward fx cannot trace (it takes **kwargs), with integer ids, an embedding and a dict output."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 16)
        self.proj = nn.Linear(16, 16)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 3)

    def forward(self, **kwargs):
        h = self.embed(kwargs["ids"]) * kwargs["mask"][..., None]
        h = self.norm(h + torch.relu(self.proj(h)))
        return {"logits": self.head(h.mean(1)), "hidden": h}


@pytest.mark.parametrize("tracer", ["auto", "fx", "export"])
def test_a_keywords_only_forward_converts_with_its_keywords_as_inputs(tracer):
    torch.manual_seed(0)
    model = KeywordsOnly().eval()
    kwargs = {"ids": torch.randint(0, 20, (2, 5)), "mask": torch.ones(2, 5)}
    dag = td.build_from_unstructured_module(model, None, kwargs, tracer=tracer)
    assert dag.traced_with == ("export" if tracer == "export" else "fx")
    assert dag.input_names == ["ids", "mask"]
    assert {"Embedding", "Linear", "LayerNorm"} <= {v.op for v in dag}
    out = run(dag, **kwargs)
    assert set(out) == {"logits", "hidden"}
    assert compare_outputs(run(model, **kwargs), out)[0]


def test_an_op_with_no_torch_level_form_is_named():
    class Special(nn.Module):
        def forward(self, x):
            return torch.special.erfcx(x)

    with pytest.raises(td.ConversionError, match=r"special_erfcx.*no torch-level form"):
        td.build_from_unstructured_module(Special(), (torch.randn(3),), tracer="export")


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_a_matrix_product_on_an_in_out_weight_becomes_a_shared_linear(tracer):
    """`torch.addmm(bias, x, weight)` with weight (in, out), as GPT-2's Conv1D writes a linear layer: a
    Linear vertex on the transposed weight, one copy for a weight used twice."""

    class Conv1DTwice(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight, self.bias = nn.Parameter(torch.randn(6, 6)), nn.Parameter(torch.randn(6))

        def forward(self, x):
            return torch.addmm(self.bias, torch.addmm(self.bias, x, self.weight).relu(), self.weight)

    model, x = Conv1DTwice(), torch.randn(3, 6)
    dag = td.build_from_unstructured_module(model, (x,), tracer=tracer)
    linears = [v.module for v in dag if v.op == "Linear"]
    assert len(linears) == 2 and linears[0].weight is linears[1].weight
    assert torch.equal(linears[0].weight, model.weight.T)
    assert compare_outputs(run(model, x), run(dag, x))[0]


def test_export_maps_in_place_activations_resizes_norms_and_size_math():
    """ATen spellings timm models reach torch.export with: `silu_`, `upsample_*`, `linalg_vector_norm`
    (F.normalize), and `math.ceil` on sizes ("same" padding)."""
    import math

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            pad = math.ceil(x.shape[-1] / 3) * 3 - x.shape[-1]
            y = F.silu(self.conv(F.pad(x, (0, pad, 0, pad))), inplace=True)
            twice = (2 * y.shape[-2], 2 * y.shape[-1])
            y = F.interpolate(y, scale_factor=2, mode="nearest") + F.interpolate(y, twice, mode="bicubic")
            return F.normalize(F.interpolate(y, scale_factor=0.5, mode="bilinear"), dim=1)

    model, x = Mixed().eval(), torch.randn(2, 3, 10, 10)
    dag = td.build_from_unstructured_module(model, (x,), tracer="export")
    ops = {v.op for v in dag}
    assert {"interpolate", "norm", "size_ceil", "silu"} <= ops, ops
    for size in (10, 13):
        x = torch.randn(3, 3, size, size)
        assert compare_outputs(run(model, x), run(dag, x))[0], size


def test_export_needs_example_inputs_it_cannot_infer():
    class NoLayer(nn.Module):  # nothing tells the shape of its input
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return x * self.scale

    with pytest.raises(
        td.ConversionError, match=r"cannot infer example inputs.*build_from_unstructured_module"
    ):
        td.build_from_unstructured_module(NoLayer(), tracer="export")


# --- Hugging Face transformers --------------------------------------------------------------------


def hf_models():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    small = dict(num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    ids = torch.randint(0, 100, (2, 7))
    return {
        "bert": (
            transformers.BertModel(transformers.BertConfig(hidden_size=64, vocab_size=100, **small)),
            {"input_ids": ids, "attention_mask": torch.ones(2, 7, dtype=torch.long)},
        ),
        "vit": (
            transformers.ViTModel(
                transformers.ViTConfig(hidden_size=64, image_size=32, patch_size=8, **small)
            ),
            {"pixel_values": torch.randn(2, 3, 32, 32)},
        ),
        "gpt2": (
            transformers.GPT2LMHeadModel(
                transformers.GPT2Config(
                    n_embd=64,
                    n_layer=2,
                    n_head=4,
                    n_inner=128,
                    vocab_size=100,
                    n_positions=32,
                    use_cache=False,
                    bos_token_id=0,
                    eos_token_id=0,
                )
            ),
            {"input_ids": ids},
        ),
    }


@pytest.mark.parametrize("name", ["bert", "vit", "gpt2"])
def test_hugging_face_models_convert_save_and_load(name, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, kwargs = hf_models()[name]
        model.eval()
        dag = td.build_from_unstructured_module(model, None, kwargs)
    assert dag.traced_with in ("fx", "export")  # ViT traces with fx now, the others need torch.export
    reference = run(model, **kwargs)
    out = run(dag, **kwargs)
    assert set(out) == set(reference)  # a ModelOutput becomes a dict of the same fields
    for key in reference:
        assert compare_outputs(reference[key], out[key])[0], key
    td.save(dag, tmp_path / "m.dag")
    assert bitwise_equal(out, run(td.load(tmp_path / "m.dag"), **kwargs))


@pytest.mark.parametrize("name", ["bert", "vit", "gpt2"])
def test_hugging_face_models_prune_heads_and_mlp_and_factorize(name):
    """Whole heads and MLP widths prune, whether query, key and value are three Linear layers (BERT, ViT)
    or one matrix product split in three (GPT-2's Conv1D: `addmm` on an (in, out) weight)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, kwargs = hf_models()[name]
        dag = td.build_from_unstructured_module(model.eval(), None, kwargs)
    inputs = tuple(kwargs.values())
    groups = td.pruning.channel_groups(dag, inputs)
    prunable = [g for g in groups.groups() if g.prunable]
    heads = [g for g in prunable if len(g.channels) == 4 and g.unit == 16]  # 4 heads of 16 channels each
    assert len(heads) == 2 and len(heads[0].producers) == (1 if name == "gpt2" else 3)
    assert any(len(g.channels) == 128 for g in prunable)  # the MLP hidden width
    pruned = td.prune(dag, 0.6, inputs)
    td.verify(pruned)
    ratio = td.count_flops(pruned, *inputs).total_flops / td.count_flops(dag, *inputs).total_flops
    assert ratio < 0.7
    shapes = {k: v.shape for k, v in run(dag, *inputs).items()}
    assert {k: v.shape for k, v in run(pruned, *inputs).items()} == shapes
    small = td.factorize(dag, rank_ratio=0.5, example_inputs=inputs)
    assert any(v.op == "LowRankLinear" for v in small)
    assert {k: v.shape for k, v in run(small, *inputs).items()} == shapes


def test_sizes_vary_within_what_export_traced_and_are_checked_outside():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 4)

        def forward(self, x):
            if x.shape[0] > 2:  # export keeps this branch for batches of 3 and more
                return self.fc(x) * 2
            return self.fc(x) * 3

    torch.manual_seed(0)
    model = Branchy().eval()
    dag = td.build_from_unstructured_module(model, (torch.randn(4, 6),), tracer="export")
    for batch in (3, 4, 9):
        x = torch.randn(batch, 6)
        assert compare_outputs(run(model, x), run(dag, x))[0], batch
    with pytest.raises(AssertionError, match=r"input 'x' dimension 0: .* sizes >= 3"):
        run(dag, torch.randn(2, 6))  # the other branch: refused, never silently the traced one
    with pytest.raises(AssertionError, match="dimension 1"):
        run(dag, torch.randn(4, 5))


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_hugging_face_dags_run_at_other_batch_sizes_and_lengths(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, kwargs = hf_models()[name]
        dag = td.build_from_unstructured_module(model.eval(), None, kwargs)
        for batch, length in ((5, 7), (3, 11), (2, 3)):
            other = {
                k: v[:1].repeat(batch, 1)[:, :length]
                if length <= v.shape[1]
                else torch.cat([v[:1].repeat(batch, 1)] * 2, 1)[:, :length]
                for k, v in kwargs.items()
            }
            reference, out = run(model, **other), run(dag, **other)
            for key in reference:
                assert compare_outputs(reference[key], out[key])[0], (batch, length, key)


@pytest.mark.slow
def test_a_hugging_face_dag_becomes_flexible():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, kwargs = hf_models()["vit"]
        dag = td.build_from_unstructured_module(model.eval(), None, kwargs)
    inputs = tuple(kwargs.values())
    flex = td.make_flexible(dag, [0.5, 1.0], inputs, config=td.flex.FlexConfig(round_to=1))
    flops = []
    for level in range(2):
        flex.set_level_use(level)
        assert bitwise_equal(run(flex, *inputs), run(flex.make_base_copy(), *inputs))
        flops.append(td.count_flops(flex, *inputs).total_flops)
    assert flops[0] < flops[1]
    assert compare_outputs(run(dag, *inputs), run(flex, *inputs))[0]
