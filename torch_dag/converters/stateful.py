"""What a forward does besides computing its outputs, watched while it is traced.

A DAG computes its outputs from its inputs and weights and keeps no state between calls, so a forward
that updates a buffer or parameter (`self.count += 1`, an EMA, `self.buf[0] = x`, `self.avg = ...`
from its old value) or mutates an input in place would convert to a different model: such a forward is
refused with a `ConversionError` naming the tensor, the op and the source line. What may alias the
state is read from the concrete values where the tracer has them (shared storage), else from the graph
(views and aliases of a `get_attr` or placeholder). `torch.no_grad()` / `enable_grad()` /
`set_grad_enabled()` / `inference_mode()` regions are recorded: every node gets `meta["td_grad"]`, the
grad mode it was computed in, and the converter detaches values where they leave a no-grad region.
"""

from __future__ import annotations

import contextlib
import operator
import os
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.node import map_aggregate
from torch.overrides import TorchFunctionMode

from ..core.errors import ConversionError
from ..core.ops import MODULE_OPS
from ..core.traits import Trait, has_trait
from . import canonical

_SKIPPED_DIRS = (os.path.dirname(torch.__file__), os.path.dirname(os.path.dirname(__file__)))
REMEDY_STATE = (
    "a DAG keeps no state between calls, so it would compute a different model. Move the update out "
    "of forward (into the training loop or a hook), or keep this module unconverted"
)
REMEDY_INPUT = (
    "a DAG does not mutate its inputs, so the caller would no longer see the change. Write it out of "
    "place (`x = x + y`) or clone the input first"
)


class StatefulForward(ConversionError):
    """The forward updates state or its inputs, or switches grad mode in a way a DAG cannot keep."""


UNKNOWN = object()  # a node's value when the trace had no example inputs


def user_line(stack_trace: str | None = None) -> str:
    """' at file:line (`code`)': the innermost frame of model code (not torch, not torch_dag), from
    `stack_trace` (fx's text form) or from the live stack."""
    if stack_trace is not None:
        lines = [s.strip() for s in stack_trace.strip().splitlines()]
        frames = [(lines[i], lines[i + 1] if i + 1 < len(lines) else "") for i in range(len(lines))]
        found = [(f, c) for f, c in frames if f.startswith("File ") and not _skipped(f.split('"')[1])]
        return f" at {found[-1][0]} (`{found[-1][1]}`)" if found else ""
    for frame in reversed(traceback.extract_stack()):
        if not _skipped(frame.filename):
            return f" at {frame.filename}:{frame.lineno} (`{(frame.line or '').strip()}`)"
    return ""


def _skipped(filename: str) -> bool:
    return filename.startswith(_SKIPPED_DIRS) or filename.startswith("<")


def _op_label(kind: str, target: Any, root: nn.Module) -> str:
    if kind == "call_module":
        return f"{type(root.get_submodule(target)).__name__}(inplace=True)"
    if kind == "call_method":
        return f".{target}()"
    return getattr(target, "__name__", str(target))


class StateWatch:
    """Watches the calls a trace records: refuses state and input mutations, tracks the grad mode."""

    def __init__(self, root: nn.Module, inputs: dict[str, Any] | None):
        self.root = root
        self.grad_enabled = True  # the caller's mode, as seen by the forward
        self.grad_switches = 0  # how many times the forward switched it
        self.alias_of: dict[fx.Node, str] = {}  # node -> the state or input it may share storage with
        self.storage: dict[int, str] = {}  # storage address -> the state or input it holds
        self.derived: dict[int, torch.Tensor] = {}  # real tensors computed from buffers (kept alive)
        for name, value in (inputs or {}).items():
            self._index(value, f"input '{name}'")
        for path, module in root.named_modules():
            prefix = f"{path}." if path else ""
            own = () if _vocabulary_kind(module) else (("buffer", module._buffers),)
            for kind, table in (("parameter", module._parameters), *own):
                for key, tensor in table.items():
                    self._index(tensor, f"{kind} '{prefix}{key}'")
            for key, value in vars(module).items():
                self._index(value, f"tensor attribute '{prefix}{key}'")

    def from_state(self, value: Any) -> bool:
        """Whether a real tensor in `value` is a buffer, tensor attribute or input, or was computed from one."""
        found = False

        def visit(v: Any) -> Any:
            nonlocal found
            if isinstance(v, torch.Tensor) and not isinstance(v, fx.Proxy) and not found:
                what = self._aliased(v) or ""
                found = id(v) in self.derived or what.startswith(("buffer", "tensor attribute", "input"))
            return v

        map_aggregate(value, visit)
        return found

    def _index(self, value: Any, what: str) -> None:
        if isinstance(value, torch.Tensor) and not isinstance(value, fx.Proxy):
            storage = value.untyped_storage()
            if storage.nbytes() > 0:
                self.storage.setdefault(storage.data_ptr(), what)

    def _aliased(self, value: Any) -> str | None:
        """The state or input `value` may share storage with (None: fresh storage)."""
        concrete = getattr(value, "_td_value", value) if isinstance(value, fx.Proxy) else value
        if isinstance(concrete, torch.Tensor) and not isinstance(concrete, fx.Proxy):
            storage = concrete.untyped_storage()
            return self.storage.get(storage.data_ptr()) if storage.nbytes() > 0 else None
        return self.alias_of.get(value.node) if isinstance(value, fx.Proxy) else None

    def _mutated(self, kind: str, target: Any, args: tuple, kwargs: dict) -> Any:
        """The argument a call writes to, if it writes to one."""
        if kwargs.get("out") is not None:
            return kwargs["out"]
        if kind == "call_module":
            in_place = getattr(self.root.get_submodule(target), "inplace", False) is True
        elif kind == "call_method" and str(target).startswith("__i"):  # `buf += 1` on a real tensor
            in_place = getattr(operator, str(target).strip("_"), None) in canonical.IN_PLACE_OPERATORS
        else:
            in_place = kind in ("call_function", "call_method") and canonical.is_in_place(
                kind, target, kwargs
            )
        return args[0] if in_place and args else None

    def before_call(self, kind: str, target: Any, args: tuple, kwargs: dict) -> None:
        """Refuse a call that writes to state, to an input, or under no_grad to a value with gradients."""
        mutated = self._mutated(kind, target, args, kwargs)
        if mutated is None:
            return
        what = self._aliased(mutated)
        op = _op_label(kind, target, self.root)
        if what is not None:
            remedy = REMEDY_INPUT if what.startswith("input") else REMEDY_STATE
            raise StatefulForward(
                f"{type(self.root).__name__}.forward updates {what} in place ({op}){user_line()}; {remedy}"
            )
        if not self.grad_enabled and isinstance(mutated, fx.Proxy) and mutated.node.meta.get("td_grad"):
            raise StatefulForward(
                f"{type(self.root).__name__}.forward updates '{mutated.node.name}', computed with gradients, "
                f"in place ({op}) under torch.no_grad(){user_line()}: autograd ignores that update in eager "
                "mode and a DAG cannot; write it out of place or compute the value inside the block"
            )

    def after_call(self, node: fx.Node, kind: str, target: Any, args: tuple, kwargs: dict) -> None:
        """Record the node's grad mode, and what it may alias when its first argument aliases state."""
        if kind == "placeholder":
            self.alias_of[node] = f"input '{target}'"
            return
        if kind == "get_attr":
            self.alias_of[node] = f"'{target}'"
            return
        node.meta["td_grad"] = self.grad_enabled
        source = args[0] if args else None
        if (
            isinstance(source, fx.Proxy)
            and source.node in self.alias_of
            and self._aliases(kind, target, args)
        ):
            self.alias_of[node] = self.alias_of[source.node]

    def _aliases(self, kind: str, target: Any, args: tuple) -> bool:
        if kind == "call_function" and target is getattr:
            return args[1] == "data"
        if canonical.is_in_place(kind, target, {}):
            return True  # `x.add_(y)` returns x
        op = (
            canonical.OP_BY_METHOD.get(target)
            if kind == "call_method"
            else canonical.OP_BY_TARGET.get(target)
        )
        return op is not None and has_trait(op, Trait.ALIASES_INPUT)

    def check_assignment(self, module: nn.Module, name: str, value: Any, graph: fx.Graph) -> None:
        """`self.buf = <traced value>` in forward: refused when the value carries data from an input or a
        buffer, or when the old value was read as data (a running count, an EMA); a value made from
        shapes and weights alone is a cache the DAG recomputes on every call, and is let through."""
        path = next((p for p, m in self.root.named_modules() if m is module), None)
        if path is None:
            return
        qualname = f"{path}.{name}" if path else name
        if not isinstance(value, fx.Proxy):  # computed eagerly: from the buffers' values, or a constant
            if self.from_state(value):
                raise StatefulForward(
                    f"{type(self.root).__name__}.forward assigns '{qualname}' a value computed from "
                    f"buffers or inputs{user_line()}; {REMEDY_STATE}"
                )
            return
        old_read = any(_data_users(n) for n in graph.nodes if n.op == "get_attr" and n.target == qualname)
        sources = _data_sources(value.node) if not old_read else set()
        carried = [s for s in sources if s.op == "placeholder" or _is_buffer(self.root, s)]
        if old_read or carried:
            why = "from its previous value" if old_read else f"from '{carried[0].target}'"
            raise StatefulForward(
                f"{type(self.root).__name__}.forward assigns '{qualname}' {why}{user_line()}; {REMEDY_STATE}"
            )

    @contextlib.contextmanager
    def patched(self, tracer: Any) -> Iterator[None]:
        """While tracing (not while the tracer runs real values): grad-mode switches set the watched mode
        instead of torch's, and assignments of traced values to a module's tensors are checked."""
        set_grad, is_grad = torch._C._set_grad_enabled, torch.is_grad_enabled
        inference = torch.autograd.grad_mode.inference_mode
        enter, exit_, setattr_ = inference.__enter__, inference.__exit__, nn.Module.__setattr__
        watch = self

        def set_grad_enabled(mode: Any) -> None:
            if tracer._eager:
                return set_grad(mode)
            if not isinstance(mode, bool):
                raise StatefulForward(f"torch.set_grad_enabled({mode!r}) on a traced value{user_line()}")
            watch.grad_enabled, watch.grad_switches = mode, watch.grad_switches + 1

        def inference_enter(ctx: Any) -> None:
            if tracer._eager:
                return enter(ctx)
            ctx._td_prev, watch.grad_enabled = watch.grad_enabled, watch.grad_enabled and not ctx.mode
            watch.grad_switches += 1

        def inference_exit(ctx: Any, *exc: Any) -> None:
            if tracer._eager or not hasattr(ctx, "_td_prev"):
                return exit_(ctx, *exc)
            watch.grad_enabled, watch.grad_switches = ctx._td_prev, watch.grad_switches + 1

        def module_setattr(module: nn.Module, name: str, value: Any) -> None:
            if (
                not tracer._eager
                and isinstance(value, torch.Tensor | fx.Proxy)
                and _holds_tensor(module, name)
            ):
                watch.check_assignment(module, name, value, tracer.graph)
            setattr_(module, name, value)

        patches = [
            (torch._C, "_set_grad_enabled", set_grad_enabled),
            (torch, "is_grad_enabled", lambda: is_grad() if tracer._eager else watch.grad_enabled),
            (inference, "__enter__", inference_enter),
            (inference, "__exit__", inference_exit),
            (nn.Module, "__setattr__", module_setattr),
        ]
        originals = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
        try:
            for owner, name, replacement in patches:
                setattr(owner, name, replacement)
            with _RealStateWrites(self, tracer):
                yield
        finally:
            for owner, name, original in originals:
                setattr(owner, name, original)


class _Probe:
    """Stands in for the tracer while the model runs for real: inside a vocabulary layer (which updates
    its own state, like BatchNorm's running statistics) nothing is watched."""

    def __init__(self, is_leaf: Callable[[nn.Module], bool]):
        self.graph, self.depth, self.is_leaf = fx.Graph(), 0, is_leaf

    @property
    def _eager(self) -> bool:
        return self.depth > 0

    def enter(self, module: nn.Module, *_: Any) -> None:
        self.depth += self.is_leaf(module)

    def leave(self, module: nn.Module, *_: Any) -> None:
        self.depth -= self.is_leaf(module)


def probe_training(
    model: nn.Module, inputs: dict[str, Any], is_leaf: Callable[[nn.Module], bool]
) -> int | None:
    """Run `model` once in train mode on `inputs` (copies), refusing the state writes the eval-mode trace
    could not see (`if self.training: self.count += 1`); buffers and the random state are restored.
    Returns how many times the forward switched grad mode, or None for a model that cannot run so
    (BatchNorm on one value per channel), which is not probed."""
    probe, watch = _Probe(is_leaf), StateWatch(model, inputs)
    saved, snapshot = [(b, b.clone()) for b in model.buffers()], snapshot_attributes(model)
    tensors = [*model.parameters(), *model.buffers()]
    devices = sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})
    hooks = [
        nn.modules.module.register_module_forward_pre_hook(probe.enter),
        nn.modules.module.register_module_forward_hook(probe.leave),
    ]
    model.train()  # outside the watch: a `train()` may switch grad mode itself (timm's TinyViT)
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad(), watch.patched(probe):
            model(**inputs)
        return watch.grad_switches
    except StatefulForward as e:
        raise StatefulForward(f"{e} (seen when running the model in train mode)") from e
    except Exception:
        return None
    finally:
        for hook in hooks:
            hook.remove()
        restore_attributes(snapshot)
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


Snapshot = dict[nn.Module, list[tuple[dict, dict]]]


def snapshot_attributes(model: nn.Module) -> Snapshot:
    """What each module holds (attributes, buffers, parameters), to undo what a traced or probed
    forward leaves on the model: fx's `_tensor_constant` attributes and values a forward caches on
    itself (`self.rel_indices = ...`, even into buffers, or into a dict it keeps: LeViT's
    `attention_bias_cache[device] = ...`, which would otherwise keep a traced value)."""
    snapshot = {}
    for module in model.modules():
        caches = [v for k, v in vars(module).items() if not k.startswith("_") and type(v) is dict]
        states = (vars(module), module._buffers, module._parameters, *caches)
        snapshot[module] = [(state, dict(state)) for state in states]
    return snapshot


def restore_attributes(snapshot: Snapshot) -> None:
    for states in snapshot.values():
        for state, before in states:
            for key in [k for k in state if k not in before]:
                del state[key]
            for key, value in before.items():
                if state.get(key, value) is not value:
                    state[key] = value


class _RealStateWrites(TorchFunctionMode):
    """fx hands a forward its buffers as real tensors, so `self.count += 1` or `self.avg.mul_(m)` with
    constant arguments runs eagerly and records nothing: such writes are seen (and refused) here."""

    def __init__(self, watch: StateWatch, tracer: Any):
        super().__init__()
        self.watch, self.tracer = watch, tracer

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if self.tracer._eager or has_proxy((args, kwargs)):
            return func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if name and args and isinstance(args[0], torch.Tensor):
            self.watch.before_call("call_method", name, args, kwargs)
        result = func(*args, **kwargs)
        if isinstance(result, torch.Tensor) and self.watch.from_state((args, kwargs)):
            self.watch.derived[id(result)] = result  # computed from a buffer's values
        return result


def _holds(value: Any, kind: type) -> bool:
    """Whether `value` (a nested container) holds an instance of `kind` anywhere."""
    found = False

    def visit(v: Any) -> Any:
        nonlocal found
        found = found or isinstance(v, kind)
        return v

    map_aggregate(value, visit)
    return found


def has_proxy(value: Any) -> bool:
    """Whether `value` (a nested container) holds an fx proxy anywhere."""
    return _holds(value, fx.Proxy)


def _vocabulary_kind(module: nn.Module) -> bool:
    """A module of a vocabulary class, or a subclass with its own forward (timm's BatchNormAct2d): its
    buffers are the layer's own (running statistics), which the vertex the converter makes of it
    updates as the layer does."""
    return any(cls in MODULE_OPS for cls in type(module).__mro__)


def _holds_tensor(module: nn.Module, name: str) -> bool:
    current = module._buffers.get(name, module._parameters.get(name, vars(module).get(name)))
    return isinstance(current, torch.Tensor) or name in module._buffers


def _is_buffer(root: nn.Module, node: fx.Node) -> bool:
    if node.op != "get_attr":
        return False
    path, _, name = str(node.target).rpartition(".")
    try:
        return name in root.get_submodule(path)._buffers
    except AttributeError:
        return False


def _is_metadata(node: fx.Node) -> bool:
    """A node that reads only a tensor's shape, rank, dtype or device (or checks a guard)."""
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] in ("shape", "ndim", "dtype", "device")
    op = None
    if node.op == "call_method":
        op = canonical.OP_BY_METHOD.get(str(node.target))
    elif node.op == "call_function":
        op = canonical.OP_BY_TARGET.get(node.target)
    return op is not None and (has_trait(op, Trait.METADATA) or has_trait(op, Trait.SIDE_EFFECT))


def _data_users(node: fx.Node) -> list[fx.Node]:
    return [u for u in node.users if not _is_metadata(u)]


def _data_sources(node: fx.Node) -> set[fx.Node]:
    """The placeholders and get_attr nodes whose values flow into `node` (not through shape reads)."""
    seen, stack, sources = set(), [node], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op in ("placeholder", "get_attr"):
            sources.add(n)
        elif not _is_metadata(n):
            stack.extend(n.all_input_nodes)
    return sources


def contains_tensor(value: Any) -> bool:
    """Whether `value` (a nested container) holds a tensor anywhere."""
    return _holds(value, torch.Tensor)
