"""`torch-dag`: a thin command line over the public API.

torch-dag convert timm:resnet50 -o resnet50.dag
torch-dag convert mypkg.models:make_net --input-size 3x64x64 -o net.dag
torch-dag info resnet50.dag
torch-dag viz resnet50.dag -o resnet50.svg        (--html for one offline page)
torch-dag swap-act resnet50.dag relu=hardswish -o r50_hswish.dag
torch-dag fold-bn resnet50.dag -o r50_folded.dag
torch-dag export-onnx resnet50.dag -o resnet50.onnx
torch-dag prune timm:resnet50 --flops-ratio 0.5 -o resnet50_half.dag
torch-dag factorize resnet50.dag --flops-ratio 0.7 --calibration images.npy -o resnet50_lr.dag
torch-dag flexify timm:resnet50 --levels 0.25 0.5 1.0 -o resnet50_flex.dag --delta-file r50.delta
torch-dag finetune resnet50_half.dag --teacher resnet50.dag --data images.npy -o resnet50_half_ft.dag
torchrun --nproc_per_node 4 -m torch_dag.cli finetune ...      (the same, data-parallel)
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from tqdm import tqdm

from . import analysis, converters, finetuning, flex, passes, pruning, serde, viz
from .core.errors import DagError
from .core.options import choices
from .finetuning import Optimizer
from .flex.widths import FlexCompensation
from .passes.factorize import Allocation
from .pruning.prune import AttentionMode, Compensation, Criterion


def load_model(spec: str) -> nn.Module:
    """`timm:NAME` (pretrained=False) or `package.module:factory` (called with no arguments)."""
    source, sep, name = spec.partition(":")
    if not sep or not name:
        raise SystemExit(f"model spec {spec!r} must be 'timm:NAME' or 'package.module:factory'")
    if source == "timm":
        try:
            import timm
        except ImportError:
            raise SystemExit("timm is not installed: pip install 'torch-dag[timm]'") from None
        try:
            return timm.create_model(name, pretrained=False)
        except RuntimeError as e:  # timm's "Unknown model"
            raise SystemExit(f"timm cannot build {name!r}: {e}") from None
    try:
        module = importlib.import_module(source)  # the user named this module on the command line
    except ImportError as e:
        raise SystemExit(f"cannot import {source!r} for model spec {spec!r}: {e}") from None
    factory = getattr(module, name, None)
    if factory is None:
        raise SystemExit(f"{source} has no attribute {name!r}")
    model = factory()
    if not isinstance(model, nn.Module):
        raise SystemExit(f"{spec} returned {type(model).__name__}, not an nn.Module")
    return model


def parse_size(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(d) for d in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sizes like 3x224x224, got {text!r}") from None


def _example_input(model: nn.Module, input_size: tuple[int, ...] | None, batch: int) -> torch.Tensor:
    if input_size is None:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        if "input_size" not in cfg:
            raise SystemExit("cannot tell the model's input size: pass --input-size, e.g. 3x224x224")
        input_size = tuple(cfg["input_size"])
    return torch.randn(batch, *input_size)


def cmd_convert(args: argparse.Namespace) -> None:
    steps = tqdm(total=4, desc="convert", unit="step", disable=args.quiet)
    steps.set_postfix_str("building model")
    model = load_model(args.model).eval()
    x = _example_input(model, args.input_size, args.batch)
    steps.update()
    steps.set_postfix_str("tracing")
    start = time.perf_counter()
    dag = converters.build_from_unstructured_module(model, (x,))
    seconds = time.perf_counter() - start
    steps.update()
    steps.set_postfix_str("checking outputs")
    from .core.compare import compare_outputs

    with torch.no_grad():
        equal, diff, reason = compare_outputs(model(x), dag(x))
    steps.update()
    if not equal:
        raise SystemExit(f"converted DAG's outputs differ from the model's: {reason}")
    steps.set_postfix_str("saving")
    path = serde.save(dag, args.output)
    steps.update()
    steps.close()
    print(
        f"{args.model}: {len(dag)} vertices, converted in {seconds:.2f} s, max output difference "
        f"{diff:.1e}, saved to {path} ({path.stat().st_size / 1e6:.1f} MB)"
    )


def cmd_info(args: argparse.Namespace) -> None:
    dag = serde.load(args.path)
    inputs = dag.example_inputs()
    if args.input_size:
        inputs = (torch.randn(inputs[0].shape[0], *args.input_size),)
    report = analysis.count_flops(dag, *inputs)
    shapes = ", ".join(f"{n}: {'x'.join(map(str, t.shape))}" for n, t in zip(dag.input_names, inputs))
    print(f"{args.path}  (inputs {shapes})")
    print(report.table(top=args.top))
    if isinstance(dag, flex.FlexDagModule):
        print(f"flexible: {dag.num_levels} levels (the figures above are of level {dag.current_level()})")
        _print_levels(dag, inputs, report)


def _print_levels(model: flex.FlexDagModule, inputs: tuple, full: analysis.FlopReport) -> None:
    """Params, FLOPs and kmapp of every level of a flexible model (ratios to `full`)."""
    was = model.current_level()
    print(f"  {'level':>5s} {'params (M)':>11s} {'FLOPs (G)':>10s} {'FLOPs ratio':>12s} {'kmapp':>8s}")
    for level in range(model.num_levels):
        model.set_level_use(level)
        count = analysis.count_flops(model, *inputs)
        print(
            f"  {level:5d} {count.total_params / 1e6:11.3f} {count.total_flops / 1e9:10.3f} "
            f"{count.total_flops / full.total_flops:12.3f} {count.kmapp or 0.0:8.2f}"
        )
    if was is not None:
        model.set_level_use(was)


def _load_or_convert(source: str, input_size: tuple[int, ...] | None) -> tuple:
    """A .dag file, or a model spec converted on the spot; with example inputs for analysis."""
    if Path(source).is_file():
        dag = serde.load(source)
        inputs = dag.example_inputs()
        if input_size:
            inputs = (torch.randn(inputs[0].shape[0], *input_size),)
        return dag, inputs
    model = load_model(source).eval()
    x = _example_input(model, input_size, 1)
    return converters.build_from_unstructured_module(model, (x,)), (x,)


def cmd_prune(args: argparse.Namespace) -> None:
    dag, inputs = _load_or_convert(args.source, args.input_size)
    config = pruning.PruneConfig(
        criterion=args.criterion,
        round_to=args.round_to,
        min_channels=args.min_channels,
        attention=args.attention,
        compensate=args.compensate,
    )
    calibration = _calibration(args)
    start = time.perf_counter()
    with warnings.catch_warnings():  # the report says which rounding was used
        warnings.simplefilter("ignore")
        pruned, report = pruning.prune(
            dag,
            args.flops_ratio,
            inputs,
            params_ratio=args.params_ratio,
            kmapp=args.kmapp,
            config=config,
            calibration=calibration,
            progress=not args.quiet,
            return_report=True,
        )
    recalibrated = _recalibrated(pruned, calibration, args)
    seconds = time.perf_counter() - start
    serde.save(pruned, args.output)
    before, after = analysis.count_flops(dag, *inputs), analysis.count_flops(pruned, *inputs)
    rows = [
        ("params (M)", before.total_params / 1e6, after.total_params / 1e6),
        ("FLOPs (G)", before.total_flops / 1e9, after.total_flops / 1e9),
        ("kmapp", before.kmapp or 0.0, after.kmapp or 0.0),
    ]
    print(
        f"pruned {args.source} to {after.total_flops / before.total_flops:.1%} of its FLOPs and "
        f"{after.total_params / before.total_params:.1%} of its params in {seconds:.1f} s "
        f"({config.criterion}; widths rounded to multiples of {report.round_to} where a group is that wide, "
        f"as hardware kernels run fastest on such widths"
        f"{'' if report.round_to == config.round_to else f'; {config.round_to} could not reach the target'}"
        f"); saved to {args.output}"
    )
    print(f"  {'':12s} {'before':>10s} {'after':>10s} {'ratio':>7s}")
    for label, old, new in rows:
        print(f"  {label:12s} {old:10.3f} {new:10.3f} {new / old if old else 0:7.3f}")
    print(f"  channel groups: {report.groups}, prunable {report.prunable}, narrowed {report.narrowed}")
    if recalibrated is not None:
        print(f"  batchnorm statistics re-estimated on {args.calibration}: {recalibrated} layers")


_NEEDS_CALIBRATION = "--recalibrate-bn re-estimates statistics on --calibration data: give --calibration"


def _calibration(args: argparse.Namespace) -> list[tuple[torch.Tensor]] | None:
    """Batches of `--calibration` (a .npy array of model inputs, loaded without pickle)."""
    if args.calibration is None:
        if getattr(args, "recalibrate_bn", False):
            raise DagError(_NEEDS_CALIBRATION)
        return None
    import numpy as np

    data = torch.from_numpy(np.load(args.calibration, allow_pickle=False)).float()
    return [(chunk,) for chunk in data.split(args.batch_size)]


def _recalibrated(
    model: nn.Module, calibration: list[tuple[torch.Tensor]] | None, args: argparse.Namespace
) -> int | None:
    """With `--recalibrate-bn`, re-estimate `model`'s batchnorm statistics on the calibration batches."""
    if not args.recalibrate_bn:
        return None
    if calibration is None:  # `_calibration` raised this already
        raise DagError(_NEEDS_CALIBRATION)
    return finetuning.recalibrate_batchnorm(model, calibration)


def cmd_factorize(args: argparse.Namespace) -> None:
    dag, inputs = _load_or_convert(args.source, args.input_size)
    small, report = passes.factorize(
        dag,
        args.flops_ratio,
        params_ratio=args.params_ratio,
        rank_ratio=args.rank_ratio,
        calibration=_calibration(args),
        example_inputs=inputs,
        allocation=args.allocation,
        protected=args.protect,
        progress=not args.quiet,
        return_report=True,
    )
    serde.save(small, args.output)
    print(report.table(top=args.top))
    print(f"saved to {args.output}")


def cmd_flexify(args: argparse.Namespace) -> None:
    dag, inputs = _load_or_convert(args.source, args.input_size)
    config = flex.FlexConfig(
        criterion=args.criterion,
        round_to=args.round_to,
        min_channels=args.min_channels,
        attention=args.attention,
        compensate=args.compensate,
    )
    start = time.perf_counter()
    calibration = _calibration(args)
    model = flex.make_flexible(
        dag, args.levels, inputs, flops_ratios=args.flops_ratios, config=config, calibration=calibration
    )
    recalibrated = _recalibrated(model, calibration, args)
    seconds = time.perf_counter() - start
    serde.save(model, args.output)
    ranking = cast(dict[str, Any], model.width_info)["ranking"]  # make_flexible records its width plan
    print(
        f"made {args.source} flexible with {model.num_levels} levels over {len(ranking)} "
        f"channel groups in {seconds:.1f} s ({config.criterion}); saved to {args.output}"
    )
    if recalibrated is not None:
        print(
            f"  per-level batchnorm statistics re-estimated on {args.calibration} ({recalibrated} over all levels)"
        )
    model.set_level_use(model.max_level())
    _print_levels(model, inputs, analysis.count_flops(dag, *inputs))
    if args.delta_file:
        level = min(args.starting_level, model.max_level())
        flex.FileDeltaManager.make_delta_file(
            args.delta_file, model, starting_level=level, progress=not args.quiet
        )
        size = args.delta_file.stat().st_size
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        print(
            f"delta file {args.delta_file}: {size / 1e6:.2f} MB (the flexible model's weights: "
            f"{weights / 1e6:.2f} MB), starting at level {level}"
        )


def cmd_finetune(args: argparse.Namespace) -> None:
    import numpy as np

    student = serde.load(args.student)
    teacher, _ = _load_or_convert(args.teacher, None)
    inputs = torch.from_numpy(np.load(args.data, allow_pickle=False)).float()
    tensors = [inputs]
    if args.labels is not None:
        labels = torch.from_numpy(np.load(args.labels, allow_pickle=False)).long()
        if len(labels) != len(inputs):
            raise SystemExit(f"--labels has {len(labels)} entries for {len(inputs)} inputs")
        tensors.append(labels)
    dataset = torch.utils.data.TensorDataset(*tensors)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        collate_fn=None if args.labels is not None else lambda b: torch.stack([item[0] for item in b]),
    )
    report = finetuning.finetune(
        student,
        teacher,
        loader,
        epochs=args.epochs,
        lr=args.lr,
        optimizer=args.optimizer,
        weight_decay=args.weight_decay,
        temperature=args.temperature,
        alpha=args.alpha,
        features=args.features,
        checkpoint=args.checkpoint,
        checkpoint_every=args.checkpoint_every,
        progress=not args.quiet,
    )
    if int(os.environ.get("RANK", "0")) == 0:
        serde.save(student, args.output)
        losses = ", ".join(f"{loss:.4f}" for loss in report.epoch_losses)
        print(
            f"finetuned {args.student} towards {args.teacher}: {report.steps} steps on {report.world_size} "
            f"process(es) in {report.seconds:.1f} s"
            + (f" (resumed at step {report.resumed_at})" if report.resumed_at else "")
            + f"; mean loss per epoch: {losses}; saved to {args.output}"
        )


def cmd_export_onnx(args: argparse.Namespace) -> None:
    from .converters.onnx import export_onnx

    dag = serde.load(args.path)
    inputs = dag.example_inputs()
    if args.input_size:
        inputs = (torch.randn(inputs[0].shape[0], *args.input_size),)
    start = time.perf_counter()
    path = export_onnx(dag, args.output, inputs, opset=args.opset, dynamic_batch=not args.static_batch)
    print(
        f"{args.path}: {len(dag)} vertices exported in {time.perf_counter() - start:.2f} s to {path} "
        f"({path.stat().st_size / 1e6:.1f} MB)"
    )


def cmd_viz(args: argparse.Namespace) -> None:
    dag = serde.load(args.path)
    inputs = None if args.no_flops else dag.example_inputs()
    if args.html:
        path = viz.to_html(dag, args.output, inputs, title=args.path.name)
    else:
        path = viz.render(
            dag, args.output, inputs, fmt=args.format or args.output.suffix.lstrip(".") or "svg"
        )
    print(f"{args.path}: {len(dag)} vertices drawn to {path}")


def _rewrite(args: argparse.Namespace, rewrite, what: str, *, preserves: bool = False) -> None:
    """Load, rewrite, check the outputs where the pass keeps the function, save, report."""
    from .core.compare import compare_outputs

    dag = serde.load(args.path)
    inputs = dag.example_inputs()
    start = time.perf_counter()
    result = rewrite(dag)
    seconds = time.perf_counter() - start
    if preserves:
        with torch.no_grad():
            equal, _, reason = compare_outputs(dag(*inputs), result(*inputs), rtol=1e-4)
        if not equal:
            raise SystemExit(f"{what}: outputs changed, not saving: {reason}")
    before, after = analysis.count_flops(dag, *inputs), analysis.count_flops(result, *inputs)
    serde.save(result, args.output)
    print(
        f"{what} in {seconds:.2f} s: {len(dag)} -> {len(result)} vertices, params "
        f"{before.total_params / 1e6:.3f} M -> {after.total_params / 1e6:.3f} M, FLOPs "
        f"{before.total_flops / 1e9:.3f} G -> {after.total_flops / 1e9:.3f} G; saved to {args.output}"
    )


def cmd_swap_act(args: argparse.Namespace) -> None:
    mapping = {}
    for item in args.mapping:
        old, sep, new = item.partition("=")
        if not sep:
            raise SystemExit(f"expected OLD=NEW (e.g. relu=hardswish), got {item!r}")
        mapping[old] = new
    _rewrite(args, lambda d: passes.swap_activations(d, mapping, names=args.names), "swapped activations")


def cmd_fold_bn(args: argparse.Namespace) -> None:
    _rewrite(args, lambda dag: passes.fold_batchnorm(dag.eval()), "folded batch norms", preserves=True)


def cmd_simplify(args: argparse.Namespace) -> None:
    _rewrite(
        args, lambda d: passes.dedupe_constants(passes.remove_identities(d)), "simplified", preserves=True
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="torch-dag", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def _convert_parser(sub: argparse._SubParsersAction) -> None:
    convert = sub.add_parser("convert", help="convert a model into a .dag file")
    convert.add_argument("model", help="timm:NAME or package.module:factory")
    convert.add_argument("-o", "--output", type=Path, required=True)
    convert.add_argument("--input-size", type=parse_size, help="CxHxW (default: the model's pretrained_cfg)")
    convert.add_argument("--batch", type=int, default=1)
    convert.add_argument("-q", "--quiet", action="store_true")
    convert.set_defaults(run=cmd_convert)


def _info_parser(sub: argparse._SubParsersAction) -> None:
    info = sub.add_parser("info", help="ops, params, FLOPs, kmapp and the heaviest vertices of a .dag")
    info.add_argument("path", type=Path)
    info.add_argument("--input-size", type=parse_size, help="CxHxW to count at (default: as converted)")
    info.add_argument("--top", type=int, default=15)
    info.set_defaults(run=cmd_info)


def _viz_parser(sub: argparse._SubParsersAction) -> None:
    draw = sub.add_parser("viz", help="draw a .dag with graphviz: SVG/PNG, or one offline HTML page")
    draw.add_argument("path", type=Path)
    draw.add_argument("-o", "--output", type=Path, required=True, help="model.svg, model.png or model.html")
    draw.add_argument(
        "--html", action="store_true", help="one self-contained HTML page with pan/zoom and search"
    )
    draw.add_argument("--format", help="graphviz output format (default: the output file's suffix)")
    draw.add_argument(
        "--no-flops", action="store_true", help="do not run the model to count FLOPs per vertex"
    )
    draw.set_defaults(run=cmd_viz)


def _rewrite_parsers(sub: argparse._SubParsersAction) -> None:
    """The passes that read a .dag and write one: swap-act, fold-bn, simplify."""
    swap = sub.add_parser("swap-act", help="replace activations, e.g. relu=hardswish gelu=silu")
    swap.add_argument("path", type=Path)
    swap.add_argument("mapping", nargs="+", help="OLD=NEW op names (any case)")
    swap.add_argument("--names", help="regular expression vertex names must match")
    swap.add_argument("-o", "--output", type=Path, required=True)
    swap.set_defaults(run=cmd_swap_act)
    for name, run, text in (
        ("fold-bn", cmd_fold_bn, "fold BatchNorms into the conv/linear before them (for inference)"),
        ("simplify", cmd_simplify, "drop identity-like vertices and duplicate constants"),
    ):
        rewrite = sub.add_parser(name, help=text)
        rewrite.add_argument("path", type=Path)
        rewrite.add_argument("-o", "--output", type=Path, required=True)
        rewrite.set_defaults(run=run)


def _export_parser(sub: argparse._SubParsersAction) -> None:
    export = sub.add_parser("export-onnx", help="export a .dag to ONNX (onnxruntime, TensorRT, ...)")
    export.add_argument("path", type=Path)
    export.add_argument("-o", "--output", type=Path, required=True, help="model.onnx")
    export.add_argument("--input-size", type=parse_size, help="CxHxW to export at (default: as converted)")
    export.add_argument("--opset", type=int, help="ONNX opset (default: torch.onnx's)")
    export.add_argument(
        "--static-batch", action="store_true", help="fix the batch size instead of a dynamic axis"
    )
    export.set_defaults(run=cmd_export_onnx)


def _prune_parser(sub: argparse._SubParsersAction) -> None:
    shrink = sub.add_parser("prune", help="remove channels to a FLOPs target; prints a before/after table")
    shrink.add_argument("source", help="a .dag file, timm:NAME or package.module:factory")
    target = shrink.add_mutually_exclusive_group(required=True)
    target.add_argument("--flops-ratio", type=float, help="fraction of the FLOPs to keep")
    target.add_argument("--params-ratio", type=float, help="fraction of the parameters to keep")
    target.add_argument("--kmapp", type=float, help="target kmapp (FLOPs per input pixel / 1000)")
    _add_width_options(shrink, "remove whole attention heads, or the same positions of every head")
    shrink.add_argument(
        "--compensate",
        choices=choices(Compensation),
        default="lstsq",
        help="with --calibration: re-solve the layers that lost inputs (lstsq), or restore "
        "the removed channels' mean contribution in their biases (mean)",
    )
    shrink.set_defaults(run=cmd_prune)


def _factorize_parser(sub: argparse._SubParsersAction) -> None:
    low = sub.add_parser("factorize", help="replace Linear/Conv2d layers by low-rank pairs to a target")
    low.add_argument("source", help="a .dag file, timm:NAME or package.module:factory")
    target = low.add_mutually_exclusive_group(required=True)
    target.add_argument("--flops-ratio", type=float, help="fraction of the model's FLOPs to keep")
    target.add_argument("--params-ratio", type=float, help="fraction of the model's parameters to keep")
    target.add_argument("--rank-ratio", type=float, help="every layer at this fraction of its full rank")
    low.add_argument(
        "--allocation",
        default="error",
        choices=choices(Allocation),
        help="least-error ranks per layer (default) or one rank fraction for all",
    )
    low.add_argument(
        "--calibration",
        type=Path,
        help="a .npy array of model inputs (N x C x H x W) for the "
        "data-aware solution (default: truncated SVD, no data)",
    )
    low.add_argument("--batch-size", type=int, default=8, help="calibration batch size")
    low.add_argument("--protect", nargs="*", default=[], metavar="VERTEX", help="vertices to leave alone")
    low.add_argument("--input-size", type=parse_size, help="CxHxW (default: as converted / pretrained_cfg)")
    low.add_argument("--top", type=int, default=20, help="layers shown in the report (by FLOPs)")
    low.add_argument("-o", "--output", type=Path, required=True)
    low.add_argument("-q", "--quiet", action="store_true")
    low.set_defaults(run=cmd_factorize)


def _flexify_parser(sub: argparse._SubParsersAction) -> None:
    flexify = sub.add_parser(
        "flexify", help="one weight-shared model with switchable width levels (+ delta file)"
    )
    flexify.add_argument("source", help="a .dag file, timm:NAME or package.module:factory")
    target = flexify.add_mutually_exclusive_group()
    target.add_argument(
        "--levels",
        type=float,
        nargs="+",
        default=[0.25, 0.5, 1.0],
        help="width fraction per level, narrowest first (default: 0.25 0.5 1.0)",
    )
    target.add_argument("--flops-ratios", type=float, nargs="+", help="FLOPs ratio per level instead")
    _add_width_options(flexify, "levels keep whole attention heads, or the same positions of every head")
    flexify.add_argument(
        "--compensate",
        choices=choices(FlexCompensation),
        default="none",
        help="with --calibration: re-solve the shared weights of the layers that lose inputs for "
        "all levels at once (the top level no longer equals the source exactly)",
    )
    flexify.add_argument("--delta-file", type=Path, help="also write the levels as a delta file")
    flexify.add_argument(
        "--starting-level", type=int, default=0, help="the level the delta file stores whole"
    )
    flexify.set_defaults(run=cmd_flexify)


def _finetune_parser(sub: argparse._SubParsersAction) -> None:
    tune = sub.add_parser("finetune", help="distill a compressed .dag from its original (DDP under torchrun)")
    tune.add_argument("student", type=Path, help="the .dag to train (pruned, factorized or flexible)")
    tune.add_argument("--teacher", required=True, help="a .dag file, timm:NAME or package.module:factory")
    tune.add_argument("--data", type=Path, required=True, help="a .npy array of model inputs (N x ...)")
    tune.add_argument(
        "--labels", type=Path, help="a .npy array of N class labels (default: distillation only)"
    )
    tune.add_argument("--epochs", type=int, default=1)
    tune.add_argument("--batch-size", type=int, default=32, help="per process")
    tune.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (cosine schedule)")
    tune.add_argument("--optimizer", choices=choices(Optimizer), default="adamw")
    tune.add_argument("--weight-decay", type=float, default=0.0)
    tune.add_argument("--temperature", type=float, default=1.0, help="distillation temperature")
    tune.add_argument("--alpha", type=float, default=0.5, help="weight of distillation vs the labels' loss")
    tune.add_argument("--features", nargs="*", default=[], metavar="VERTEX", help="vertices to match too")
    tune.add_argument(
        "--checkpoint", type=Path, help="a checkpoint folder: written as training goes, resumed from"
    )
    tune.add_argument(
        "--checkpoint-every", type=int, default=0, help="steps between checkpoints (0: each epoch)"
    )
    tune.add_argument("-o", "--output", type=Path, required=True)
    tune.add_argument("-q", "--quiet", action="store_true")
    tune.set_defaults(run=cmd_finetune)


SUBCOMMANDS = (
    _convert_parser,
    _info_parser,
    _viz_parser,
    _rewrite_parsers,
    _export_parser,
    _prune_parser,
    _factorize_parser,
    _flexify_parser,
    _finetune_parser,
)  # in the order `--help` lists them


def _add_width_options(parser: argparse.ArgumentParser, attention_help: str) -> None:
    """The options `prune` and `flexify` share: how channels are ranked and widths chosen, and I/O."""
    parser.add_argument("--criterion", default="l2", choices=choices(Criterion))
    parser.add_argument(
        "--calibration",
        type=Path,
        help="a .npy array of model inputs (N x C x H x W): for taylor, compensation and --recalibrate-bn",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="calibration batch size")
    parser.add_argument(
        "--recalibrate-bn",
        action="store_true",
        help="with --calibration: re-estimate the "
        "batchnorm statistics of the result (of every level) on the calibration data",
    )
    parser.add_argument(
        "--round-to", type=int, default=8, help="keep widths multiples of this (1: no rounding)"
    )
    parser.add_argument("--min-channels", type=int, default=1)
    parser.add_argument("--attention", choices=choices(AttentionMode), default="heads", help=attention_help)
    parser.add_argument(
        "--input-size", type=parse_size, help="CxHxW (default: as converted / pretrained_cfg)"
    )
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("-q", "--quiet", action="store_true")


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except DagError as e:
        print(f"torch-dag: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
