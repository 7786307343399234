"""ONNX export: onnxruntime runs the exported zoo and timm sample with the DagModule's outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree

import torch_dag as td
from tests.zoo import ZOO, make
from torch_dag.converters.onnx import OnnxExportError, export_onnx

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")

OUTPUT_NAMES = {
    "residual": ["output"],
    "spellings": ["output.0", "output.1"],
    "multi_input_outputs": ["sum", "parts.0", "parts.1.0", "parts.1.1"],
}

TIMM_SAMPLE = [
    ("resnet18", 96),
    ("mobilenetv3_small_100", 96),
    ("vit_tiny_patch16_224", 224),
    ("convnext_atto", 64),
    ("efficientnet_b0", 96),
    ("swin_tiny_patch4_window7_224", 224),
]


def run_onnx(path, dag: td.DagModule, inputs: tuple) -> tuple[list[str], list[np.ndarray]]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == dag.input_names
    outputs = session.run(None, {name: x.numpy() for name, x in zip(dag.input_names, inputs)})
    return [o.name for o in session.get_outputs()], outputs


def assert_runs_like_dag(path, dag: td.DagModule, inputs: tuple) -> list[str]:
    with torch.no_grad():
        expected = [leaf for leaf in pytree.tree_leaves(dag(*inputs)) if leaf is not None]
    names, actual = run_onnx(path, dag, inputs)
    assert len(actual) == len(expected)
    for name, value, reference in zip(names, actual, expected):
        np.testing.assert_allclose(value, reference.numpy(), rtol=1e-4, atol=1e-5, err_msg=name)
    return names


def one_more_sample(inputs: tuple) -> tuple:
    return tuple(torch.cat([x, x[:1] * 0.5]) for x in inputs)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_model(name, tmp_path):
    model, inputs = make(name)
    dag = td.build_from_unstructured_module(model, inputs).eval()
    path = export_onnx(dag, tmp_path / "model.onnx", inputs)
    names = assert_runs_like_dag(path, dag, inputs)
    assert_runs_like_dag(path, dag, one_more_sample(inputs))  # the batch axis is dynamic
    if name in OUTPUT_NAMES:
        assert names == OUTPUT_NAMES[name]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "size"), TIMM_SAMPLE, ids=[n for n, _ in TIMM_SAMPLE])
def test_timm_model(name, size, tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    x = torch.randn(1, 3, size, size)
    dag = td.build_from_unstructured_module(timm.create_model(name, pretrained=False).eval(), (x,))
    path = export_onnx(dag, tmp_path / "model.onnx", dag.example_inputs())
    assert_runs_like_dag(path, dag, (x,))
    assert_runs_like_dag(path, dag, (torch.randn(2, 3, size, size),))


class BatchOfFour(nn.Module):
    def forward(self, x):
        if x.shape[0] == 4:  # the DAG guards the batch size: it cannot be dynamic
            return x * 2
        return x


def test_fixed_batch_size_needs_static_export(tmp_path):
    x = torch.randn(4, 3)
    dag = td.build_from_unstructured_module(BatchOfFour(), (x,)).train()
    with pytest.raises(OnnxExportError, match="dynamic_batch=False"):
        export_onnx(dag, tmp_path / "dynamic.onnx", (x,))
    path = export_onnx(dag, tmp_path / "static.onnx", (x,), dynamic_batch=False, opset=21)
    assert dag.training  # exported in eval mode, then restored
    assert {o.domain: o.version for o in onnx.load(path).opset_import}[""] == 21
    assert_runs_like_dag(path, dag, (x,))
    with pytest.raises(Exception, match="invalid dimensions"):  # onnxruntime rejects another batch size
        run_onnx(path, dag, (torch.randn(2, 3),))


class NoneOutput(nn.Module):
    def forward(self, x):
        return x + 1, None, {"b": x * 2}


def test_none_outputs_are_dropped(tmp_path):
    x = torch.randn(2, 3)
    dag = td.build_from_unstructured_module(NoneOutput(), (x,))
    path = export_onnx(dag, tmp_path / "model.onnx", x)
    assert assert_runs_like_dag(path, dag, (x,)) == ["output.0", "output.2.b"]


class SizeOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        return self.fc(x), x.shape[0]


def test_errors_name_what_failed(tmp_path):
    x = torch.randn(2, 3)
    dag = td.build_from_unstructured_module(SizeOutput(), (x,))
    with pytest.raises(td.DagError, match=r"output 'output.1' is a int"):
        export_onnx(dag, tmp_path / "model.onnx", (x,))
    with pytest.raises(OnnxExportError, match="takes a DagModule, not a SizeOutput"):
        export_onnx(SizeOutput(), tmp_path / "model.onnx", (x,))
    with pytest.raises(OnnxExportError, match=r"2 example inputs for the DAG's inputs \['x'\]"):
        export_onnx(dag, tmp_path / "model.onnx", (x, x))
    with pytest.raises(OnnxExportError, match="fails on the example inputs in torch_dag vertex fc"):
        export_onnx(dag, tmp_path / "model.onnx", torch.randn(2, 5))
    dag = td.build_from_unstructured_module(BatchOfFour(), (x,))
    with pytest.raises(OnnxExportError, match=r"opset (version )?17"):
        export_onnx(dag, tmp_path / "model.onnx", (x,), opset=17, dynamic_batch=False)


class AttentionShapes(nn.Module):
    """What torch.onnx does not take as it is: attention on 3-d and 5-d q, k, v, a reshape of the
    transposed attention output, and shapes read at a batch of one."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.cls = nn.Parameter(torch.randn(1, 1, 8))

    def forward(self, x):
        batch, n, c = x.shape
        x = torch.cat([self.cls.expand(batch, -1, -1), x], 1)
        q, k, v = self.qkv(x).chunk(3, -1)
        flat = nn.functional.scaled_dot_product_attention(q, k, v)  # 3-d
        heads = self.qkv(x).reshape(batch, n + 1, 3, 2, 4).permute(2, 0, 3, 1, 4)
        split = nn.functional.scaled_dot_product_attention(*heads.unbind(0))
        merged = split.transpose(1, 2).reshape(batch, n + 1, c)
        windows = self.qkv(x[:, 1:]).reshape(batch, 2, n // 2, 3, 2, 4).permute(3, 0, 1, 4, 2, 5)
        local = nn.functional.scaled_dot_product_attention(*windows.unbind(0))  # 5-d
        return flat + merged, local.flatten(1)


def test_attention_and_reshapes_export_from_a_batch_of_one(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(1, 6, 8)
    dag = td.build_from_unstructured_module(AttentionShapes().eval(), (x,))
    path = export_onnx(dag, tmp_path / "model.onnx", (x,))
    assert_runs_like_dag(path, dag, (x,))
    assert_runs_like_dag(path, dag, (torch.randn(3, 6, 8),))
    assert not any(v.op == "clone" for v in dag)  # the export's rewrites stay out of the DAG
