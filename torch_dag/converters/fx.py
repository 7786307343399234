"""`build_from_unstructured_module`: any traceable `nn.Module` -> `DagModule` of vocabulary ops."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..core.compare import compare_outputs
from ..core.dag import DagModule
from ..core.errors import ConversionError
from ..core.ops import custom_op_spec
from .fx_walk import Canonicalizer
from .patterns import raise_weight_standardization
from .stateful import StatefulForward, StateWatch, probe_training, restore_attributes, snapshot_attributes
from .tracer import ConcreteTracer, vocabulary_spec


def _as_dag_class(dag: DagModule) -> DagModule:
    """The DAG as the `DagModule` subclass its custom ops ask for (hand-written flexible layers make a
    flexible DAG), or as it is."""
    classes = {spec.dag_class for v in dag if (spec := custom_op_spec(v.module)) and spec.dag_class}
    if len(classes) > 1:
        names = ", ".join(sorted(c.__name__ for c in classes))
        raise ConversionError(f"the model mixes custom layers that need different DAG classes ({names})")
    return classes.pop().from_dag(dag) if classes else dag


def build_from_unstructured_module(
    model: nn.Module,
    example_inputs: Sequence[Any] | Any | None = None,
    example_kwargs: dict[str, Any] | None = None,
    *,
    tracer: str = "auto",
) -> DagModule:
    """Trace `model` into a `DagModule` of atomic vertices with equal outputs.

    `example_inputs` (a tensor or a tuple of positional inputs) and `example_kwargs` let the tracer run
    the model while it traces, which resolves Python control flow on shapes (each such decision becomes
    a run-time guard). Without them, timm-style models use `model.pretrained_cfg['input_size']`, and
    anything else is traced purely symbolically. Parameters and buffers are shared with `model`.

    `tracer`: "fx" (symbolic tracing), "export" (torch.export, mapped back to the same vocabulary; needs
    example inputs) or "auto": fx, then torch.export when fx fails and example inputs are given. The
    DAG's `traced_with` says which one made it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    if tracer not in ("auto", "fx", "export"):
        raise ValueError(f"tracer must be 'auto', 'fx' or 'export', got {tracer!r}")
    inputs = _bind_example_inputs(model, example_inputs, example_kwargs)
    switches = None
    if inputs is not None:  # both tracers see the model in eval mode: look at its train mode too
        was_training = model.training
        try:
            switches = probe_training(
                model, _clone(inputs), lambda m: ConcreteTracer(None).is_leaf_module(m, "")
            )
        finally:
            model.train(was_training)
    if tracer == "export":
        return _from_export(model, inputs, switches)
    try:
        return _from_fx(model, inputs, switches)
    except StatefulForward:
        raise
    except ConversionError as fx_error:
        if tracer == "fx" or inputs is None:
            raise
        try:
            return _from_export(model, inputs, switches)
        except ConversionError as export_error:
            raise ConversionError(f"{fx_error}\n(torch.export fallback: {export_error})") from fx_error


def _from_export(model: nn.Module, inputs: dict[str, Any] | None, grad_switches: int | None) -> DagModule:
    from . import export

    if inputs is None:
        raise ConversionError("the torch.export path needs example inputs")
    if grad_switches:  # torch.export does not record every kind (inference_mode): never trust it to
        raise StatefulForward(
            f"{type(model).__name__}.forward switches grad mode (torch.no_grad(), enable_grad(), "
            "set_grad_enabled() or inference_mode()); the torch.export path does not map grad-mode "
            "regions: convert with tracer='fx', which keeps them"
        )
    was_training = model.training
    model.eval()
    try:
        graph, _ = export.trace(model, inputs)
        tracer = ConcreteTracer(inputs)
        dag = raise_weight_standardization(Canonicalizer(model, graph, tracer).run()).eval()
        with torch.no_grad():
            equal, worst, why = compare_outputs(model(**_clone(inputs)), dag(**_clone(inputs)))
        if not equal:
            raise ConversionError(
                f"the DAG made through torch.export differs from {type(model).__name__} on the "
                f"example inputs (max difference {worst:.3g}: {why}); not returned"
            )
        dag.traced_with = "export"
        return dag.train(was_training)
    finally:
        model.train(was_training)


def _from_fx(model: nn.Module, inputs: dict[str, Any] | None, grad_switches: int | None) -> DagModule:
    if vocabulary_spec(model) is not None:  # fx never treats the root as a leaf: wrap it
        model = _Root(model)
        inputs = {"input": inputs[next(iter(inputs))]} if inputs else None
    was_training = model.training
    snapshot = snapshot_attributes(model)
    model.eval()
    try:
        with torch.no_grad():
            graph, tracer = _trace(model, inputs)
        assert tracer.watch is not None
        if grad_switches is not None and grad_switches != tracer.watch.grad_switches:
            raise StatefulForward(
                f"{type(model).__name__}.forward switches grad mode {grad_switches} times in train mode "
                f"and {tracer.watch.grad_switches} times in eval mode; a DAG is traced in eval mode and "
                "would not keep the train-mode regions. Switch grad mode the same way in both modes"
            )
        dag = raise_weight_standardization(Canonicalizer(model, graph, tracer).run())
        dag = _as_dag_class(dag)
        dag.traced_with = "fx"
        return dag.train(was_training)
    finally:
        restore_attributes(snapshot)
        model.train(was_training)


class _Root(nn.Module):
    """Holder that lets a single vocabulary layer (an `nn.LSTM`, a `Conv2d`) be traced as a leaf."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.layer = module

    def forward(self, input):
        return self.layer(input)


def _bind_example_inputs(
    model: nn.Module, example_inputs: Any, example_kwargs: dict | None
) -> dict[str, Any] | None:
    if example_inputs is None and example_kwargs is None:
        cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
        if isinstance(cfg, dict) and isinstance(cfg.get("input_size"), (tuple, list)):
            example_inputs = (torch.randn(1, *cfg["input_size"]),)
        else:
            return None
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    signature = inspect.signature(model.forward)
    try:
        bound = signature.bind(*(example_inputs or ()), **(example_kwargs or {}))
    except TypeError as e:
        raise ConversionError(
            f"example inputs do not fit {type(model).__name__}.forward{signature}: {e}"
        ) from e
    arguments: dict[str, Any] = {}
    for name, value in bound.arguments.items():  # **kwargs: its entries are inputs of their own names
        kind = signature.parameters[name].kind
        arguments.update(value if kind is inspect.Parameter.VAR_KEYWORD else {name: value})
    return {name: _clone(value) for name, value in arguments.items()}


def _clone(value: Any) -> Any:
    """Copy example tensors so in-place ops during tracing leave the caller's inputs alone."""
    return fx.node.map_aggregate(value, lambda v: v.clone() if isinstance(v, torch.Tensor) else v)


def _trace(model: nn.Module, inputs: dict[str, Any] | None) -> tuple[fx.Graph, ConcreteTracer]:
    tracer = ConcreteTracer(inputs)
    signature = inspect.signature(model.forward)
    concrete_args = {}
    for name, param in signature.parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise ConversionError(f"{type(model).__name__}.forward takes *{name}: give it named inputs")
        if (inputs is None or name not in inputs) and param.default is not param.empty:
            concrete_args[name] = param.default
    tracer.concrete_defaults = concrete_args
    tracer.watch = StateWatch(model, inputs)
    try:
        with tracer.patch_size_taking(), tracer.trace_through_fx_wraps(), tracer.watch.patched(tracer):
            graph = tracer.trace(model, concrete_args=concrete_args or None)
    except ConversionError:
        raise
    except Exception as e:
        where = _current_module(tracer)
        raise ConversionError(
            f"torch.fx could not trace {type(model).__name__}{where}: {type(e).__name__}: {e}. "
            + ("" if inputs is not None else "Passing example_inputs resolves shape-dependent control flow.")
        ) from e
    return graph, tracer


def _current_module(tracer: ConcreteTracer) -> str:
    stack = getattr(tracer, "module_stack", None)
    if stack:
        path, cls = list(stack.values())[-1] if isinstance(stack, dict) else (None, None)
        if path:
            return f" (inside module '{path}' of type {getattr(cls, '__name__', cls)})"
    return ""


__all__ = ["build_from_unstructured_module"]
