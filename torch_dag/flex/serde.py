"""The JSON form of flexible layers and of a flexible DAG's per-level call templates: registers the
`Flex` op with the core's custom-op registry and the flexible DAG with serde (`torch_dag.flex` imports
this module explicitly, so importing anything of `torch_dag` registers both).

A `Flex` vertex's config: the full-width layer (op and config), its parameters (shape, dtype,
trainable), and per level the layer's config and, for each parameter, the kept indices along each
axis as runs `[start, stop)`. Weights (the shared parameters, every level's buffers) are ordinary
state-dict tensors. Loading builds only registered ops, like any other vertex.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.errors import DagError, LoadError
from ..core.ops import CustomOpSpec, module_op_spec, op_name, register_custom_op
from ..core.template import DTYPES, from_json, to_json
from ..serde.format import EXTENSION_DAGS
from .model import FlexDagModule
from .modules import Cuts, FlexModule, index_runs

_MAX_RUNS = 1 << 20


def flex_config(module: FlexModule) -> dict[str, Any]:
    levels = []
    for i in range(module.num_levels):
        levels.append(
            {
                "config": _layer_config(module.view(i)),
                "cuts": _runs(module.cuts[i]),
            }
        )
    params = {
        name: (
            {
                "shape": list(p.shape),
                "dtype": str(p.dtype).removeprefix("torch."),
                "requires_grad": p.requires_grad,
            }
            if p is not None
            else None
        )
        for name, p in module._parameters.items()
    }
    full = _plain_copy(module.full, module._parameters)
    config = {
        "op": op_name(module.full),
        "full": _layer_config(full),
        "params": params,
        "levels": levels,
        "level": module.level if module.custom is None else module.num_levels - 1,
    }
    if module.custom is not None:  # widths set by set_widths (its buffers are the DAG's custom_layers)
        skeleton, cuts = module.custom
        config["custom"] = {"config": _layer_config(skeleton), "cuts": _runs(cuts)}
    return config


def _runs(cuts: Cuts) -> dict[str, list]:
    return {name: [[axis, index_runs(index)] for axis, index in axes] for name, axes in cuts.items()}


def build_flex(config: Any, where: str) -> FlexModule:
    _expect(isinstance(config, dict), f"{where}: config must be an object")
    op, params, levels = config.get("op"), config.get("params"), config.get("levels")
    _expect(isinstance(op, str), f"{where}: the flexible layer's op must be a name")
    try:
        spec = module_op_spec(op)
    except Exception as e:
        raise LoadError(f"{where}: {e}") from None
    _expect(isinstance(params, dict), f"{where}: params must be an object")
    _expect(
        isinstance(levels, list) and len(levels) > 0 and all(isinstance(x, dict) for x in levels),
        f"{where}: levels must be a non-empty list of objects",
    )
    full = _build(spec, config.get("full"), where)
    for name, info in params.items():
        _expect(name in full._parameters, f"{where}: {op} has no parameter {name!r}")
        if info is None:
            full._parameters[name] = None
            continue
        _expect(
            isinstance(info, dict)
            and isinstance(info.get("shape"), list)
            and all(type(d) is int and d >= 0 for d in info["shape"])
            and info.get("dtype") in DTYPES,
            f"{where}: bad description of parameter {name!r}",
        )
        tensor = torch.empty(info["shape"], dtype=DTYPES[info["dtype"]], device="meta")
        full._parameters[name] = nn.Parameter(tensor, requires_grad=info.get("requires_grad") is not False)
    skeletons, cuts = [], []
    for i, level in enumerate(levels):
        skeletons.append(_build(spec, level.get("config"), f"{where} level {i}"))
        cuts.append(_cuts(level.get("cuts"), full, f"{where} level {i}"))
    try:
        module = FlexModule(full, skeletons, cuts)
    except Exception as e:
        raise LoadError(f"{where}: {e}") from None
    level = config.get("level", len(levels) - 1)
    _expect(type(level) is int and 0 <= level < len(levels), f"{where}: level {level!r} out of range")
    module.set_level(level)
    custom = config.get("custom")
    if custom is not None:
        _expect(isinstance(custom, dict), f"{where}: custom must be an object")
        skeleton = _build(spec, custom.get("config"), f"{where} custom widths")
        module.set_custom(skeleton, _cuts(custom.get("cuts"), full, f"{where} custom widths"))
    return module


def _layer_config(layer: nn.Module) -> dict[str, Any]:
    spec = module_op_spec(op_name(layer))
    return {k: to_json(v) for k, v in spec.config(layer).items()}


def _plain_copy(skeleton: nn.Module, params: dict[str, Any]) -> nn.Module:
    layer = copy.copy(skeleton)
    layer.__dict__.update(params)
    return layer


def _build(spec, config: Any, where: str) -> nn.Module:
    _expect(isinstance(config, dict), f"{where}: config must be an object")
    allowed = spec.param_names
    unknown = sorted(set(config) - allowed)
    _expect(not unknown, f"{where}: unknown config keys {unknown}")
    try:
        return spec.build({k: from_json(v) for k, v in config.items()})
    except Exception as e:
        raise LoadError(f"{where}: cannot build {spec.name} from {config}: {type(e).__name__}: {e}") from None


def _cuts(data: Any, full: nn.Module, where: str) -> dict[str, list[tuple[int, np.ndarray]]]:
    _expect(isinstance(data, dict), f"{where}: cuts must be an object")
    cuts: dict[str, list[tuple[int, np.ndarray]]] = {}
    for name, axes in data.items():
        param = full._parameters.get(name)
        if param is None:
            raise LoadError(f"{where}: cuts name {name!r}, which is not a parameter")
        _expect(isinstance(axes, list), f"{where}: cuts of {name!r} must be a list")
        cuts[name] = []
        for item in axes:
            _expect(
                isinstance(item, list)
                and len(item) == 2
                and type(item[0]) is int
                and 0 <= item[0] < param.dim()
                and isinstance(item[1], list)
                and len(item[1]) <= _MAX_RUNS,
                f"{where}: malformed cut of {name!r}",
            )
            axis, runs = item
            size = param.shape[axis]
            _expect(
                all(
                    isinstance(r, list)
                    and len(r) == 2
                    and all(type(x) is int for x in r)
                    and 0 <= r[0] < r[1] <= size
                    for r in runs
                ),
                f"{where}: cut of {name!r} out of range",
            )
            index = np.concatenate([np.arange(a, b) for a, b in runs]) if runs else np.zeros(0, np.int64)
            _expect(bool(np.all(np.diff(index) > 0)), f"{where}: cut of {name!r} is not sorted and distinct")
            cuts[name].append((axis, index))
    return cuts


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise LoadError(message)


# --- flexible DAGs ---------------------------------------------------------------------------------


def flex_dag_json(dag: FlexDagModule) -> dict[str, Any]:
    """The flexible DAG's own part of the file: its level in use, or the widths `set_widths` was given
    (its layers are stored at the top level: the widths are set again when it loads)."""
    level, widths = dag.current_level(), dag.current_widths()
    if level is None and widths is None:
        raise DagError(
            "a flexible model at widths that are neither a level nor set by set_widths cannot be "
            "saved as such: set_level_use(i) first, or save make_base_copy() as a plain model"
        )
    return {
        "level": dag.max_level() if level is None else level,
        **({} if widths is None else {"widths": widths}),
        "width_info": dag.width_info,
        "level_args": {
            name: [
                [to_json(list(args)), {k: to_json(v) for k, v in kwargs.items()}]
                for args, kwargs in per_level
            ]
            for name, per_level in dag.level_args.items()
        },
    }


def build_flex_dag(
    data: Any, inputs: list[str], vertices: list, output: Any, input_meta: dict
) -> FlexDagModule:
    _expect(
        isinstance(data, dict) and isinstance(data.get("level_args", {}), dict),
        "flex: must be an object with level_args",
    )
    level_args = {}
    for name, per_level in data.get("level_args", {}).items():
        _expect(
            isinstance(per_level, list)
            and all(
                isinstance(x, list) and len(x) == 2 and isinstance(x[0], list) and isinstance(x[1], dict)
                for x in per_level
            ),
            f"flex: level_args of {name!r} must be a list of [args, kwargs]",
        )
        level_args[name] = [
            (tuple(from_json(args)), {k: from_json(v) for k, v in kwargs.items()})
            for args, kwargs in per_level
        ]
    width_info = data.get("width_info")
    _expect(width_info is None or isinstance(width_info, dict), "flex: width_info must be an object")
    dag = FlexDagModule(inputs, vertices, output, input_meta, level_args, width_info)
    level = data.get("level")
    _expect(type(level) is int and 0 <= level <= dag.max_level(), f"flex: level {level!r} out of range")
    widths = data.get("widths")
    if widths is None:
        _expect(dag.current_level() is not None, "flex: layers at custom widths, but no widths saved")
        dag.set_level_use(level)
        return dag
    _expect(
        isinstance(widths, list)
        and all(type(w) in (int, float) and w > 0 and math.isfinite(w) for w in widths),
        f"flex: widths must be a list of positive numbers (fractions or channel counts), got {str(widths)[:80]}",
    )
    # the layers were built at those widths (each layer's custom config, its buffers in custom_layers)
    _expect(dag.current_level() is None, "flex: widths saved, but the layers are at a level")
    dag._widths = list(widths)
    return dag


register_custom_op(CustomOpSpec("Flex", FlexModule, flex_config, build_flex, dag_class=FlexDagModule))
EXTENSION_DAGS["flex"] = (FlexDagModule, flex_dag_json, build_flex_dag)
