"""DagModule -> ONNX through torch.export (`torch.onnx.export(..., dynamo=True)`).

The TorchScript exporter is deprecated since torch 2.9 and lacks ops the DAG vocabulary has
(`channel_shuffle`); the torch.export one traces the generated straight-line forward as it is.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, cast

import torch
from torch.utils import _pytree as pytree

from ..core.dag import DagModule, Vertex, evaluating
from ..core.editor import Editor
from ..core.errors import DagError
from ..core.ops import FunctionOp
from ..core.template import Ref


class OnnxExportError(DagError):
    """A DagModule could not be exported to ONNX; the message says which step failed and why."""


def export_onnx(
    dag: DagModule,
    path: str | os.PathLike,
    example_inputs: Any,
    *,
    opset: int | None = None,
    dynamic_batch: bool = True,
) -> Path:
    """Write `dag` (in eval mode) to `path` as an ONNX model and return the path.

    Inputs are named `dag.input_names`; outputs are the DAG's output structure flattened, named by
    their keys ("output" for a single tensor, "output.0", ... for a tuple, "logits", "aux.1", ...
    for a dict; None outputs are dropped). With `dynamic_batch`, dim 0 of every input is left
    symbolic ("batch"); guards the DAG holds on the batch size are not kept in the ONNX graph.
    """
    missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:
        raise OnnxExportError(f"ONNX export needs {' and '.join(missing)}: pip install 'torch-dag[onnx]'")
    inputs = _check_inputs(dag, example_inputs)
    if dynamic_batch and inputs and all(x.dim() > 0 and x.shape[0] == 1 for x in inputs):
        # torch.export specializes a dynamic dim whose example size is 1: export at batch 2
        inputs = tuple(torch.cat([x, x]) for x in inputs)
    with evaluating(dag):
        output_names = _output_names(dag, inputs)
        program = _export(_export_ready(dag, inputs), inputs, output_names, opset, dynamic_batch)
    path = Path(path)
    try:
        program.save(path)
    except OSError as error:
        raise OnnxExportError(f"could not write the ONNX model to {path}: {error}") from error
    return path


def _check_inputs(dag: DagModule, example_inputs: Any) -> tuple[torch.Tensor, ...]:
    if not isinstance(dag, DagModule):
        raise OnnxExportError(
            f"export_onnx takes a DagModule, not a {type(dag).__name__}: convert it first "
            f"with td.build_from_unstructured_module(model, example_inputs)"
        )
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    if len(inputs) != len(dag.input_names):
        raise OnnxExportError(f"got {len(inputs)} example inputs for the DAG's inputs {dag.input_names}")
    for name, value in zip(dag.input_names, inputs):
        if not isinstance(value, torch.Tensor):
            raise OnnxExportError(
                f"example input {name!r} is a {type(value).__name__}; ONNX inputs are tensors"
            )
    return inputs


def _export_ready(dag: DagModule, inputs: tuple[torch.Tensor, ...]) -> DagModule:
    """The same function, spelled so that torch.onnx exports it: a reshape of a transposed tensor
    reads a copy (the exporter lowers reshape to a view using strides that its later decomposition
    of attention changes; the copy is an Identity in ONNX), and attention on q, k, v
    of another rank than 4 is reshaped to 4-d and back (the exporter takes 4-d attention only)."""
    with torch.no_grad():
        values = dag.run_collecting(*inputs)
    editor = Editor(dag)
    for vertex in list(editor):
        source = vertex.args[0] if vertex.args else None
        if (
            vertex.op in ("reshape", "view_as")
            and isinstance(source, Ref)
            and source.name in editor.vertices
            and editor[source.name].op in ("transpose", "permute", "movedim")
        ):
            copy = editor.insert(
                Vertex(
                    editor.fresh_name(f"{source.name}_copy"),
                    FunctionOp("clone"),
                    (source,),
                    {"memory_format": torch.contiguous_format},
                ),
                before=vertex.name,
            )
            vertex.args = (Ref(copy.name), *vertex.args[1:])
        elif vertex.op == "scaled_dot_product_attention" and all(
            isinstance(a, Ref) and values[a.name].dim() not in (2, 4) for a in vertex.args[:3]
        ):
            _as_4d(editor, vertex, values)
    return editor.build()


def _as_4d(editor: Editor, vertex: Vertex, values: dict[str, Any]) -> None:
    """`sdpa(q, k, v)` on 3-d (batch, tokens, dim) tensors through a heads axis of size 1, on 5-d and
    more (Twins' windows) with the leading axes merged into the batch, and the result shaped back."""
    rank = values[vertex.args[0].name].dim()
    lead = values[vertex.args[0].name].shape[1 : rank - 3]  # axes merged into the batch (rank > 4)

    def fitted(ref: Ref) -> Ref:
        call = (
            (FunctionOp("unsqueeze"), (ref, 1)) if rank == 3 else (FunctionOp("flatten"), (ref, 0, rank - 4))
        )
        new = editor.insert(Vertex(editor.fresh_name(f"{ref.name}_4d"), *call), before=vertex.name)
        return Ref(new.name)

    args = [fitted(a) for a in vertex.args[:3]]
    mask = vertex.args[3] if len(vertex.args) > 3 else vertex.kwargs.get("attn_mask")
    if isinstance(mask, Ref) and values[mask.name].dim() == rank:
        if len(vertex.args) > 3:
            args.append(fitted(mask))
        else:
            vertex.kwargs = {**vertex.kwargs, "attn_mask": fitted(mask)}
    elif isinstance(mask, Ref) and values[mask.name].dim() > 2:  # broadcast over leading axes: keep it simple
        raise OnnxExportError(
            f"vertex {vertex.name!r} ({vertex.op}): a {values[mask.name].dim()}-d attention mask "
            f"on {rank}-d q, k, v cannot be exported (torch.onnx takes 4-d attention only)"
        )
    vertex.args = (*args, *vertex.args[len(args) :])
    back = (
        (FunctionOp("squeeze"), (Ref(vertex.name), 1))
        if rank == 3
        else (FunctionOp("unflatten"), (Ref(vertex.name), 0, (-1, *lead)))
    )
    restored = Vertex(editor.fresh_name(f"{vertex.name}_{rank}d"), *back)
    editor.rewire(vertex.name, restored.name)
    editor.insert(restored, after=vertex.name)


def _output_names(dag: DagModule, inputs: tuple[torch.Tensor, ...]) -> list[str]:
    """One name per tensor torch.export will return, from the pytree key path of the output."""
    try:
        with torch.no_grad():
            output = dag(*inputs)
    except Exception as error:
        raise OnnxExportError(
            f"the DAG fails on the example inputs{_vertex_note(error)}: {_root_cause(error)}"
        ) from error
    prefix = [] if isinstance(output, dict) else ["output"]
    names = []
    for key_path, leaf in pytree.tree_flatten_with_path(output)[0]:
        if leaf is None:  # torch.onnx drops None outputs
            continue
        name = ".".join(prefix + [_key_name(key) for key in key_path])
        if not isinstance(leaf, torch.Tensor):
            raise OnnxExportError(
                f"output {name!r} is a {type(leaf).__name__}, not a tensor; ONNX outputs "
                f"are tensors: return it as a tensor or drop it from the DAG's output"
            )
        names.append(name)
    if len(set(names)) != len(names):
        raise OnnxExportError(f"the DAG's output keys flatten to clashing ONNX output names {names}")
    return names


def _key_name(key: pytree.KeyEntry) -> str:
    for attribute in ("key", "idx", "name"):  # MappingKey, SequenceKey, GetAttrKey
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def _export(
    dag: DagModule,
    inputs: tuple[torch.Tensor, ...],
    output_names: list[str],
    opset: int | None,
    dynamic_batch: bool,
) -> torch.onnx.ONNXProgram:
    dynamic_shapes = None
    if dynamic_batch:
        same_batch = len({x.shape[0] for x in inputs if x.dim() > 0}) <= 1
        axes = [
            {0: "batch" if same_batch else f"batch_{name}"} if x.dim() > 0 else None
            for name, x in zip(dag.input_names, inputs)
        ]
        dynamic_shapes = {"args": tuple(axes)}  # DagModule.forward takes *args
    inputs = tuple(x.detach().clone() for x in inputs)  # torch.export marks dynamic dims on its inputs
    try:
        program = torch.onnx.export(
            dag,
            inputs,
            dynamo=True,
            input_names=dag.input_names,
            output_names=output_names,
            opset_version=opset,
            dynamic_shapes=dynamic_shapes,
            verbose=False,
        )
    except Exception as error:
        cause = _root_cause(error)
        hint = ""
        if dynamic_batch and ("Dim" in cause or "batch" in cause):  # torch.export's dynamic shape checks
            hint = " (if the DAG only works at one batch size, pass dynamic_batch=False)"
        raise OnnxExportError(
            f"torch.onnx could not export the DagModule{_vertex_note(error)}: {cause}{hint}"
        ) from error
    program = cast(torch.onnx.ONNXProgram, program)  # None only for the TorchScript exporter (dynamo=False)
    produced = program.model.opset_imports.get("")
    if opset is not None and produced != opset:  # torch.onnx only logs a failed version conversion
        raise OnnxExportError(
            f"torch.onnx could not convert the model to opset {opset} (it produced opset "
            f"{produced}); pass an opset it supports, or opset=None for its default"
        )
    return program


def _root_cause(error: BaseException) -> str:
    while error.__cause__ is not None:
        error = error.__cause__
    text = str(error).strip()
    return f"{type(error).__name__}: {text[:800]}{'...' if len(text) > 800 else ''}"


def _vertex_note(error: BaseException | None) -> str:
    """The ' in torch_dag vertex ...' note DagModule.forward adds, from anywhere in the cause chain."""
    while error is not None:
        for note in getattr(error, "__notes__", ()):
            if note.startswith("in torch_dag vertex"):
                return " " + note
        error = error.__cause__ or error.__context__
    return ""
