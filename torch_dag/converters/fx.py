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
from .inputs import infer_example_inputs
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

    `example_inputs` (a tensor, a tuple of positional inputs, or a dict of keyword inputs) and
    `example_kwargs` let the tracer run the model while it traces, which resolves Python control flow
    on shapes (each such decision becomes a run-time guard) and traces through `torch.fx.wrap`-ped
    helpers. Without them, timm-style models use `model.pretrained_cfg['input_size']`, and anything
    else gets inputs inferred from the layers that first read them (`converters/inputs.py`; their
    `dag.input_meta` entries say `"inferred": True` and what they were read from); a model they cannot
    be inferred for is traced purely symbolically, or refused with the call that gives them.

    A forward `forward(self, x, *args, **kwargs)` takes the inputs bound to its named parameters;
    `**kwargs` entries are inputs of their own names. Inputs that are Python constants (`None`, a bool,
    a number, a string) are baked into the DAG like defaults. Cache objects in the outputs (instances of
    a class named `...Cache`, such as a Hugging Face model's key/value cache with its default
    `use_cache`) are outputs of None in the DAG, which keeps no state between calls; every other output
    equals the model's. Parameters and buffers are shared with `model`.

    `tracer`: "fx" (symbolic tracing), "export" (torch.export, mapped back to the same vocabulary; needs
    example inputs) or "auto": fx, then torch.export when fx fails and example inputs are given. The
    DAG's `traced_with` says which one made it. An exported DAG keeps its batch dimension free when it
    matches the model at the example's batch and at another one; otherwise it asserts the traced batch.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    if tracer not in ("auto", "fx", "export"):
        raise ValueError(f"tracer must be 'auto', 'fx' or 'export', got {tracer!r}")
    try:
        return _build(model, example_inputs, example_kwargs, tracer)
    except StatefulForward:
        raise
    except ConversionError as e:
        hint = _parts_hint(model)
        if not hint:
            raise
        raise type(e)(f"{e}\n{hint}") from e  # the same kind of error (InputsNotInferred stays one)


def _parts_hint(model: nn.Module, share: float = 0.1) -> str:
    """What to do when a model does not convert whole (a detector's data-dependent post-processing, a
    forward that takes images as a list): name its largest parts, which may convert on their own."""
    total = sum(p.numel() for p in model.parameters())
    if not total:
        return ""
    children = [
        (sum(p.numel() for p in child.parameters()) / total, name, type(child).__name__)
        for name, child in model.named_children()
    ]
    parts = sorted((part for part in children if part[0] >= share), reverse=True)
    if len(parts) < 2:
        return ""
    listed = ", ".join(f"model.{name} ({cls}, {100 * f:.0f} % of the parameters)" for f, name, cls in parts)
    return (
        f"Its parts may convert on their own: {listed}. Convert one whose forward does not depend on the "
        "data (a detector's backbone: `dag = td.build_from_unstructured_module(model.backbone, "
        "torch.randn(1, 3, 320, 320))`), transform it and put it back (`model.backbone = dag`): README, "
        "'Models that do not convert whole'"
    )


def _build(
    model: nn.Module, example_inputs: Any, example_kwargs: dict[str, Any] | None, tracer: str
) -> DagModule:
    try:
        inputs, inferred = _example_inputs(model, example_inputs, example_kwargs)
    except _NotInferred as not_inferred:
        try:  # what the model does not tell may still trace symbolically
            return _convert(model, None, tracer)
        except ConversionError:
            raise not_inferred.error from None
    try:
        dag = _convert(model, inputs, tracer)
    except ConversionError as e:
        if not inferred or inputs is None:
            raise
        guessed = ", ".join(f"{n}: {tuple(inputs[n].shape)} from {where}" for n, where in inferred.items())
        raise ConversionError(f"{e}\n(with inputs inferred as {guessed})") from e
    for name, where in inferred.items():
        dag.input_meta.setdefault(name, {}).update(inferred=True, inferred_from=where)
    return dag


def _convert(model: nn.Module, inputs: dict[str, Any] | None, tracer: str) -> DagModule:
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
        dag = _from_fx(model, inputs, switches)
    except StatefulForward:
        raise
    except ConversionError as fx_error:
        if tracer == "fx" or inputs is None:
            raise
        try:
            return _from_export(model, inputs, switches)
        except ConversionError as export_error:
            raise ConversionError(f"{fx_error}\n(torch.export fallback: {export_error})") from fx_error
    return dag  # where the model branches on its batch size, the DAG's guards refuse other sizes


def _from_export(model: nn.Module, inputs: dict[str, Any] | None, grad_switches: int | None) -> DagModule:
    """The DAG made through torch.export with a free batch size where it matches the model at another
    batch, else at the example's batch (asserted when it runs)."""
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
        try:
            dag = _exported(model, inputs, dynamic_batch=True)
        except ConversionError:
            dag = None
        if dag is None or _same_at_other_batch(model, dag, inputs) is not True:
            dag = _exported(model, inputs, dynamic_batch=False)
        assert dag is not None
        dag.traced_with = "export"
        return dag.train(was_training)
    finally:
        model.train(was_training)


def _exported(model: nn.Module, inputs: dict[str, Any], dynamic_batch: bool) -> DagModule:
    """The DAG made through torch.export (the model in eval mode), checked on the example inputs."""
    from . import export

    graph, _ = export.trace(model, inputs, dynamic_batch=dynamic_batch)
    dag = raise_weight_standardization(Canonicalizer(model, graph, ConcreteTracer(inputs)).run()).eval()
    with torch.no_grad():
        equal, worst, why = compare_outputs(model(**_clone(inputs)), dag(**_clone(_tensors(inputs))))
    if not equal:
        raise ConversionError(
            f"the DAG made through torch.export differs from {type(model).__name__} on the "
            f"example inputs (max difference {worst:.3g}: {why}); not returned"
        )
    return dag


def _same_at_other_batch(model: nn.Module, dag: DagModule, inputs: dict[str, Any]) -> bool | None:
    """Does `dag` match `model` at another batch size than the example's (2 for a batch of 1, else 1)?
    None when the inputs share no batch size; True when the model itself does not run at that batch."""
    sizes = {v.shape[0] for v in inputs.values() if isinstance(v, torch.Tensor) and v.dim() > 0}
    if len(sizes) != 1:
        return None
    batch = sizes.pop()
    index = torch.arange(2 if batch == 1 else 1) % batch
    resized = {
        n: v[index.to(v.device)] if isinstance(v, torch.Tensor) and v.dim() > 0 else v
        for n, v in inputs.items()
    }
    modes, snapshot = (model.training, dag.training), snapshot_attributes(model)
    model.eval(), dag.eval()
    try:
        with torch.no_grad():
            try:
                expected = model(**_clone(resized))
            except Exception:
                return True
            try:
                return compare_outputs(expected, dag(**_clone(_tensors(resized))))[0]
            except Exception:
                return False
    finally:
        restore_attributes(snapshot)
        model.train(modes[0]), dag.train(modes[1])


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


def _example_inputs(
    model: nn.Module, example_inputs: Any, example_kwargs: dict | None
) -> tuple[dict[str, Any] | None, dict[str, str]]:
    """The inputs to trace with, by forward's parameter names (None: trace symbolically), and the names
    of those that were inferred, with the layer each was read from."""
    if isinstance(example_inputs, dict):  # a dict is keyword inputs
        both = sorted(set(example_inputs) & set(example_kwargs or {}))
        if both:
            raise ConversionError(f"inputs {both} are given both in example_inputs and in example_kwargs")
        example_inputs, example_kwargs = None, {**example_inputs, **(example_kwargs or {})}
    if example_inputs is not None or example_kwargs is not None:
        return _bind_example_inputs(model, example_inputs, example_kwargs), {}
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict) and isinstance(cfg.get("input_size"), (tuple, list)):
        return _bind_example_inputs(model, (torch.randn(1, *cfg["input_size"]),), None), {}
    try:
        inferred, sources = infer_example_inputs(model)
    except ConversionError as e:
        raise _NotInferred(e) from e
    return _bind_example_inputs(model, None, inferred), sources


class _NotInferred(Exception):
    def __init__(self, error: ConversionError):
        super().__init__(str(error))
        self.error = error


def _bind_example_inputs(
    model: nn.Module, example_inputs: Any, example_kwargs: dict | None
) -> dict[str, Any]:
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
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:  # its entries are inputs of their own names
            arguments.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL and value:
            raise ConversionError(
                f"{type(model).__name__}.forward{signature}: {len(value)} positional example input(s) "
                f"beyond the named parameters would go into *{name}, which has no names for DAG inputs; "
                "give only the named parameters' inputs, or wrap the model in a module whose forward "
                "names every input"
            )
        elif kind is not inspect.Parameter.VAR_POSITIONAL:
            arguments[name] = value
    return {name: _clone(value) for name, value in arguments.items()}


def _is_constant(value: Any) -> bool:
    """A Python constant input (baked into the DAG like a default, never a DAG input)."""
    return value is None or isinstance(value, (bool, int, float, str))


def _tensors(inputs: dict[str, Any]) -> dict[str, Any]:
    """The inputs a DAG made from `inputs` takes: all but the baked constants."""
    return {name: value for name, value in inputs.items() if not _is_constant(value)}


def _clone(value: Any) -> Any:
    """Copy example tensors so in-place ops during tracing leave the caller's inputs alone."""
    return fx.node.map_aggregate(value, lambda v: v.clone() if isinstance(v, torch.Tensor) else v)


def _trace(model: nn.Module, inputs: dict[str, Any] | None) -> tuple[fx.Graph, ConcreteTracer]:
    tracer = ConcreteTracer(inputs)
    signature = inspect.signature(model.forward)
    concrete_args = {name: value for name, value in (inputs or {}).items() if _is_constant(value)}
    parameters = signature.parameters.values()
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in parameters):
        if inputs is None:
            raise ConversionError(
                f"{type(model).__name__}.forward{signature} takes *args / **kwargs: give it example "
                "inputs, e.g. td.build_from_unstructured_module(model, torch.randn(1, 3, 224, 224))"
            )
        positional = sum(p.kind is p.POSITIONAL_ONLY and p.name in inputs for p in parameters)
        tracer.named_inputs = (list(inputs), positional)
    else:
        for name, param in signature.parameters.items():
            if (inputs is None or name not in inputs) and param.default is not param.empty:
                concrete_args[name] = param.default
    tracer.concrete_defaults = concrete_args
    tracer.watch = StateWatch(model, inputs)
    try:
        with (
            tracer.patch_size_taking(),
            tracer.patch_dtype_info(),
            tracer.trace_through_fx_wraps(),
            tracer.watch.patched(tracer),
        ):
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
