"""The JSON form of mutable vertices: registers the `Mutable` and `MutableElementwise` ops with the core's
custom-op registry (`torch_dag.nas` imports this module, so importing `torch_dag` registers both).

A mutable vertex's config: its kind, how many positional inputs its candidates take, each candidate's
choice value, the choices still allowed, the one in use, and the candidates themselves as a small graph
(one vertex per candidate, named by it, in the file's own vertex format, so candidates are built only
from the registered vocabulary). Their weights are ordinary state-dict tensors (`<vertex>.candidates.
<name>.<tensor>`): every candidate's, in safetensors, no pickle.
"""

from __future__ import annotations

from typing import Any

from ..core.dag import DagModule, Vertex
from ..core.errors import DagError, LoadError
from ..core.ops import CustomOpSpec, register_custom_op
from ..core.template import Ref
from ..core.traits import Trait
from ..serde.build import _build_dag
from ..serde.limits import Limits, valid_name
from ..serde.save import _graph_json
from .vertex import ElementwiseMutableOp, MutableOp, elementwise

_MAX_ARITY = 64
_NESTED_TENSORS = 1 << 20  # tensors a candidate's config may make (the loader compares weights after)
_NESTED_LARGEST = 1 << 62  # integers were bounded by the file's largest tensor before this is called


def mutable_config(module: MutableOp) -> dict[str, Any]:
    arity = int(getattr(module, "arity", 1))
    inputs = [f"x{i}" for i in range(arity)]
    refs = tuple(Ref(n) for n in inputs)
    bank = DagModule(
        inputs,
        [Vertex(name, candidate, refs) for name, candidate in module.candidates.items()],
        tuple(Ref(name) for name in module.candidates),
    )
    bank.train(module.training)
    return {
        "kind": module.kind,
        "arity": arity,
        "values": list(module.values),
        "allowed": list(module.allowed),
        "chosen": module.chosen,
        "candidates": _graph_json(bank),
    }


def _builder(cls: type[MutableOp]):
    def build(config: Any, where: str) -> MutableOp:
        _expect(isinstance(config, dict), f"{where}: config must be an object")
        kind, arity, values = config.get("kind"), config.get("arity"), config.get("values")
        allowed, chosen = config.get("allowed"), config.get("chosen")
        _expect(kind in ("op", "value"), f"{where}: kind must be 'op' or 'value', got {kind!r}")
        _expect(type(arity) is int and 0 <= arity <= _MAX_ARITY, f"{where}: arity must be 0..{_MAX_ARITY}")
        _expect(
            isinstance(values, list) and all(type(v) in (str, int) for v in values),
            f"{where}: values must be a list of names or integers",
        )
        _expect(
            isinstance(allowed, list) and all(valid_name(a) for a in allowed) and valid_name(chosen),
            f"{where}: allowed and chosen must name candidates",
        )
        try:
            bank = _build_dag(config.get("candidates"), 1, Limits(_NESTED_TENSORS, _NESTED_LARGEST))
        except LoadError as e:
            raise LoadError(f"{where}: candidates: {e}") from None
        candidates = {v.name: v.module for v in bank}
        _expect(
            bank.input_names == [f"x{i}" for i in range(arity)] and len(candidates) == len(values),
            f"{where}: the candidates do not match the arity and values",
        )
        _expect(
            cls is MutableOp or elementwise(candidates),
            f"{where}: a MutableElementwise vertex must hold element-wise candidates only",
        )
        try:
            module = cls(candidates, kind, values, chosen, allowed)
        except DagError as e:
            raise LoadError(f"{where}: {e}") from None
        module.arity = arity
        return module

    return build


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise LoadError(message)


register_custom_op(CustomOpSpec("Mutable", MutableOp, mutable_config, _builder(MutableOp)))
register_custom_op(
    CustomOpSpec("MutableElementwise", ElementwiseMutableOp, mutable_config, _builder(ElementwiseMutableOp)),
    traits=[Trait.ELEMENTWISE],
)
