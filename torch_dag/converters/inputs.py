"""Example inputs for a model converted without any: read from the first layer that reads the input.

A symbolic fx trace runs until the first Conv1d / Conv2d / Conv3d, Linear or Embedding fed by each
input (or until tracing fails; then the first such layer in registration order stands in). Its
shape tells what to feed:

| first reader | guesses, tried in this order |
| --- | --- |
| `Conv2d(C, ...)` | `1 x C x S x S` for an image size S the model declares, then `1 x C x 224 x 224` |
| `Conv1d(C, ...)` | `1 x C x 1024`, then `1 x C x 16000` (one second of 16 kHz audio); with C = 1 also without the channel axis (`1 x 1024`: a waveform the model unsqueezes) |
| `Conv3d(C, ...)` | `1 x C x 16 x 112 x 112`, then `1 x C x 16 x 224 x 224` (16 frames) |
| `Linear(F, ...)` | `1 x F`, then `1 x 16 x F` (a sequence of 16) |
| `Embedding(N, ...)` | `1 x 16` int64 ids below N |

The first forward parameter and every required one get such an input (optical flow's `image2` the
same kind as `image1`); a guess counts only if the model runs on it eagerly. When none runs, optional
parameters named like a given input with a prefix (an encoder-decoder's `decoder_input_ids` beside
`input_ids`) get the same kind of input too, and the guesses are tried again. A model declares its image
size by an attribute `image_size`, `img_size` or `input_size` (an int, `(H, W)` or `(C, H, W)`) on itself
or on its `config` (the Hugging Face convention).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..core.errors import ConversionError
from ..core.ops import LayerProxy
from .stateful import restore_attributes, snapshot_attributes
from .tracer import named_forward

_READERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.Embedding)


class InputsNotInferred(ConversionError):
    """The model does not tell its inputs (no reading layer, or no guess it runs on): give them."""


_SEQUENCE = 16  # tokens of a guessed sequence


_SIZE_ATTRIBUTES = ("image_size", "img_size", "input_size")


def declared_image_sizes(model: nn.Module) -> list[tuple[int, int]]:
    """The (H, W) image sizes `model` or its `config` declares (module docstring), first found first."""
    sizes = []
    for holder in (model, getattr(model, "config", None)):
        for name in _SIZE_ATTRIBUTES:
            value = getattr(holder, name, None)
            if isinstance(value, int) and value > 0:
                value = (value, value)
            if isinstance(value, (tuple, list)) and len(value) in (2, 3):
                size = tuple(value[-2:])
                if all(isinstance(v, int) and v > 0 for v in size) and size not in sizes:
                    sizes.append(size)
    return sizes


def _guesses(layer: nn.Module, image_sizes: list[tuple[int, int]]) -> list[tuple[int, ...]]:
    """The input shapes to try for a first reader (the table in the module docstring)."""
    if isinstance(layer, nn.Embedding):
        return [(1, _SEQUENCE)]
    if isinstance(layer, nn.Linear):
        return [(1, layer.in_features), (1, _SEQUENCE, layer.in_features)]
    assert isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
    channels = layer.in_channels
    if isinstance(layer, nn.Conv1d):
        lengths = (1024, 16000)
        return [shape for n in lengths for shape in [(1, channels, n)] + ([(1, n)] if channels == 1 else [])]
    if isinstance(layer, nn.Conv3d):
        return [(1, channels, 16, 112, 112), (1, channels, 16, 224, 224)]
    sizes = [*image_sizes, *([(224, 224)] if (224, 224) not in image_sizes else [])]
    return [(1, channels, h, w) for h, w in sizes]


def _tensor(layer: nn.Module, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A guessed input for `layer`: int64 ids below its vocabulary size, or floats of its weight's dtype."""
    weight = layer.weight
    assert isinstance(weight, torch.Tensor)
    generator = torch.Generator().manual_seed(seed)
    if isinstance(layer, nn.Embedding):
        ids = torch.randint(0, layer.num_embeddings, shape, generator=generator)
        return ids.to(weight.device)
    dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
    return torch.randn(shape, generator=generator).to(device=weight.device, dtype=dtype)


class _Found(Exception):
    """Stops the search trace once every wanted input has its reader."""


class _ReaderTracer(fx.Tracer):
    """Symbolic fx trace that notes, per input, the first reader layer whose input derives from it."""

    def __init__(self, wanted: list[str]):
        super().__init__()
        self.wanted = wanted
        self.readers: dict[str, tuple[str, nn.Module]] = {}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        leaf = isinstance(m, (*_READERS, LayerProxy))
        return leaf or super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        reader = _reader(m)
        if reader is not None and args and isinstance(args[0], fx.Proxy):
            path = self.path_of_module(m)
            for name in _placeholders(args[0].node):
                self.readers.setdefault(name, (path, reader))
            if all(name in self.readers for name in self.wanted):
                raise _Found
        return super().call_module(m, forward, args, kwargs)


def _reader(module: nn.Module) -> nn.Module | None:
    """The layer whose weight tells the shape of what `module` reads: the module itself, or the layer a
    proxy computes (a flexible layer at its width in use); None for others and for weightless ones."""
    layer = module.current_layer() if isinstance(module, LayerProxy) else module
    weight = getattr(layer, "weight", None)
    return layer if isinstance(layer, _READERS) and isinstance(weight, torch.Tensor) else None


def _placeholders(node: fx.Node) -> set[str]:
    """The inputs (placeholder names) a node's value derives from."""
    seen, todo, found = set(), [node], set()
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        if current.op == "placeholder":
            found.add(str(current.target))
        todo.extend(current.all_input_nodes)
    return found


def _first_readers(model: nn.Module, wanted: list[str]) -> dict[str, tuple[str, nn.Module]]:
    """Each wanted input's first reader, as far as a symbolic trace of the forward gets."""
    tracer = _ReaderTracer(wanted)
    signature = inspect.signature(model.forward)
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in signature.parameters.values()):
        positional = sum(signature.parameters[n].kind is inspect.Parameter.POSITIONAL_ONLY for n in wanted)
        tracer.create_args_for_root = _named_root(tracer, wanted, positional)  # type: ignore[method-assign]
        concrete = None
    else:
        concrete = {n: p.default for n, p in signature.parameters.items() if n not in wanted}
    snapshot = snapshot_attributes(model)  # a forward may store traced values on the model
    try:
        tracer.trace(model, concrete_args=concrete or None)
    except _Found:
        pass
    except Exception:  # the trace stops where fx cannot follow: keep what it found before
        pass
    finally:
        restore_attributes(snapshot)
    return tracer.readers


def _named_root(tracer: fx.Tracer, names: list[str], positional: int) -> Callable[..., Any]:
    base = tracer.create_args_for_root

    def create_args_for_root(root_fn: Any, is_module: bool, concrete_args: Any = None) -> Any:
        return base(named_forward(root_fn, names, positional), is_module, concrete_args)

    return create_args_for_root


def _wanted(model: nn.Module) -> list[str]:
    """The forward parameters that get an inferred input: the first one and every required one."""
    parameters = [
        p
        for p in inspect.signature(model.forward).parameters.values()
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    return [p.name for i, p in enumerate(parameters) if i == 0 or p.default is p.empty]


def _siblings(model: nn.Module, wanted: list[str]) -> list[str]:
    """Optional parameters named like a wanted input with a prefix (`decoder_input_ids` beside
    `input_ids`): an encoder-decoder's second stream, tried when the wanted inputs alone do not run."""
    names = inspect.signature(model.forward).parameters
    return [n for n in names if n not in wanted and any(n.endswith(f"_{w}") for w in wanted)]


def _example_call(wanted: list[str], shape: tuple[int, ...] | None, layer: nn.Module | None = None) -> str:
    shape = shape or (1, 3, 224, 224)
    tensor = f"torch.randn({', '.join(map(str, shape))})"
    if isinstance(layer, nn.Embedding):
        tensor = f"torch.randint(0, {layer.num_embeddings}, {tuple(shape)})"
    given = tensor if len(wanted) <= 1 else f"({', '.join([tensor] * len(wanted))})"
    return f"td.build_from_unstructured_module(model, {given})"


def infer_example_inputs(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Example inputs for `model`'s forward guessed from the layers that first read them (module
    docstring), checked by running the model on them in eval mode; and, per input, what it was read
    from. Raises `ConversionError` showing the call with example inputs when no guess runs."""
    wanted = _wanted(model)
    if not wanted:
        raise InputsNotInferred(
            f"{type(model).__name__}.forward takes no named input to infer; give example inputs "
            "by name: td.build_from_unstructured_module(model, example_kwargs={...})"
        )
    readers = _first_readers(model, wanted)
    fallback = next(((n, r) for n, m in model.named_modules() if (r := _reader(m)) is not None), None)
    default = readers.get(wanted[0]) or fallback
    if default is None:
        raise InputsNotInferred(
            f"cannot infer example inputs for {type(model).__name__}: no Conv1d/2d/3d, Linear or "
            "Embedding reads its input, so nothing tells their shape. Give them, e.g. "
            f"{_example_call(wanted, None)}"
        )
    tried: list[str] = []
    for names in (wanted, wanted + _siblings(model, wanted)):
        if tried and names == wanted:
            continue
        found = _first_guess_that_runs(model, {n: readers.get(n, default) for n in names}, tried)
        if found is not None:
            return found
    shape = _guesses(default[1], declared_image_sizes(model))[0]
    raise InputsNotInferred(
        f"cannot infer example inputs for {type(model).__name__}: the model does not run on the "
        f"guessed inputs; tried {'; '.join(tried)}. Give them, e.g. "
        f"{_example_call(wanted, shape, default[1])}"
    )


def _first_guess_that_runs(
    model: nn.Module, chosen: dict[str, tuple[str, nn.Module]], tried: list[str]
) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """The first of the guesses for the `chosen` inputs (name: (path, reader)) the model runs on, with
    what each was read from; None (each failure added to `tried`) when it runs on none."""
    guesses = {name: _guesses(layer, declared_image_sizes(model)) for name, (_, layer) in chosen.items()}
    for attempt in range(max(map(len, guesses.values()))):
        inputs, sources = {}, {}
        for seed, (name, (path, layer)) in enumerate(chosen.items()):
            shape = guesses[name][min(attempt, len(guesses[name]) - 1)]
            inputs[name] = _tensor(layer, shape, seed)
            sources[name] = f"{type(layer).__name__} '{path}'" if path else type(layer).__name__
        failure = _eager_failure(model, inputs)
        if failure is None:
            return inputs, sources
        shapes = ", ".join(f"{n}: {tuple(v.shape)}" for n, v in inputs.items())
        tried.append(f"{shapes} (read from {', '.join(sorted(set(sources.values())))}): {failure}")
    return None


def _eager_failure(model: nn.Module, inputs: dict[str, torch.Tensor]) -> str | None:
    """Why `model` (in eval mode, buffers untouched) does not run on `inputs`, or None when it does."""
    was_training = model.training
    saved = [(b, b.clone()) for b in model.buffers()]
    model.eval()  # a run as the user's own would be: what it caches on the model stays
    try:
        with torch.no_grad():
            model(**{n: v.clone() for n, v in inputs.items()})
        return None
    except Exception as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    finally:
        model.train(was_training)
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


__all__ = ["InputsNotInferred", "infer_example_inputs"]
