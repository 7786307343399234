"""The `torch-dag` argument parser: the subcommand table, each subcommand's options and the run function
it calls (from the module of its group)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, NoReturn

from ..core.options import choices
from ..finetuning import Optimizer
from ..flex.widths import FlexCompensation
from ..passes.factorize import Allocation
from ..pruning.prune import AttentionMode, Compensation, Criterion
from .compress import cmd_factorize, cmd_flexify, cmd_prune
from .convert import cmd_convert, cmd_export_onnx
from .finetune import cmd_finetune
from .info import cmd_info, cmd_viz
from .latency import DTYPE_CHOICES, cmd_bench, cmd_latency_table, device_option
from .nas import add_search_parser
from .rewrite import cmd_fold_bn, cmd_simplify, cmd_swap_act
from .train_prune import add_train_prune_parser
from .values import FRACTION, integer, number, parse_size

USAGE = """`torch-dag`: a thin command line over the public API.

torch-dag convert timm:resnet50 -o resnet50.dag
torch-dag convert mypkg.models:make_net --input-size 3x64x64 -o net.dag
torch-dag info resnet50.dag                      (--groups: the channel groups, why fixed ones are)
torch-dag viz resnet50.dag -o resnet50.svg        (--html for one offline page)
torch-dag swap-act resnet50.dag relu=hardswish -o r50_hswish.dag
torch-dag fold-bn resnet50.dag -o r50_folded.dag
torch-dag export-onnx resnet50.dag -o resnet50.onnx
torch-dag bench resnet50.dag resnet50_half.dag --batch-size 32     (each one's latency, and their ratio)
torch-dag latency-table resnet50.dag --batch-size 32    (-> resnet50.latency-cpu-float32-b32.json)
torch-dag prune timm:resnet50 --flops-ratio 0.5 -o resnet50_half.dag    (--report: every group and layer)
torch-dag prune resnet50.dag --latency-ratio 0.5 --latency-batch 32 -o r50_fast.dag  (measured latency)
torch-dag factorize resnet50.dag --flops-ratio 0.7 --calibration images.npy -o resnet50_lr.dag
torch-dag flexify timm:resnet50 --levels 0.25 0.5 1.0 -o resnet50_flex.dag --delta-file r50.delta
torch-dag finetune resnet50_half.dag --teacher resnet50.dag --data images.npy -o resnet50_half_ft.dag
torch-dag search resnet50_nas.dag --flops-ratio 0.5 --data images.npy --labels labels.npy -o front.png
torchrun --nproc_per_node 4 -m torch_dag.cli finetune ...      (the same, data-parallel)
torch-dag train-prune model.dag --data batches.npy --flops-ratio 0.5 --steps 2000 -o out.dag  (learned gates)
"""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The usage text as written, and every option's default after its help (unless the help says it)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        hidden = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        shown = not hidden and action.nargs != 0
        if shown and "default" not in text and action.option_strings:
            text += " (default: %(default)s)"
        return text


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error on one line (what is wrong, and where to read the usage)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)  # subcommands' parsers too
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="torch-dag", description=USAGE)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def _convert_parser(sub: argparse._SubParsersAction) -> None:
    convert = sub.add_parser("convert", help="convert a model into a .dag file")
    convert.add_argument("model", help="timm:NAME or package.module:factory")
    convert.add_argument("-o", "--output", type=Path, required=True)
    convert.add_argument("--input-size", type=parse_size, help="CxHxW (default: the model's pretrained_cfg)")
    convert.add_argument("--batch", type=integer(1), default=1, help="batch size of the example input")
    convert.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    convert.set_defaults(run=cmd_convert)


def _info_parser(sub: argparse._SubParsersAction) -> None:
    info = sub.add_parser("info", help="ops, params, FLOPs, kmapp and the heaviest vertices of a .dag")
    info.add_argument("path", type=Path)
    info.add_argument("--input-size", type=parse_size, help="CxHxW to count at (default: as converted)")
    info.add_argument("--top", type=integer(0), default=15, help="heaviest vertices listed")
    info.add_argument(
        "--groups",
        action="store_true",
        help="also list the channel groups pruning sees, and why each fixed one cannot be pruned",
    )
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
    export.add_argument("--opset", type=integer(7, 30), help="ONNX opset (default: torch.onnx's)")
    export.add_argument(
        "--static-batch", action="store_true", help="fix the batch size instead of a dynamic axis"
    )
    export.set_defaults(run=cmd_export_onnx)


def _bench_parser(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser(
        "bench", help="measure the latency of a model, or of two side by side and their ratio"
    )
    bench.add_argument("model", help="a .dag file, timm:NAME or package.module:factory")
    bench.add_argument("other", nargs="?", help="a second model, timed in the same rounds on the same inputs")
    bench.add_argument("--input-size", type=parse_size, help="CxHxW (default: as converted / pretrained_cfg)")
    _add_timing_options(bench)
    bench.add_argument(
        "--runs", type=integer(1), help="timed calls of each model (default: as many as fill about a second)"
    )
    bench.add_argument("--threads", type=integer(1), help="CPU threads while timing (default: torch's)")
    bench.set_defaults(run=cmd_bench)


def _latency_table_parser(sub: argparse._SubParsersAction) -> None:
    table = sub.add_parser(
        "latency-table", help="time a model's layers at many widths: the table prune --latency-ratio reads"
    )
    table.add_argument("model", help="a .dag file, timm:NAME or package.module:factory")
    table.add_argument(
        "-o",
        "--output",
        type=Path,
        help="the table's JSON (default: beside the model, MODEL.latency-DEVICE-DTYPE-bBATCH.json)",
    )
    table.add_argument("--input-size", type=parse_size, help="CxHxW (default: as converted / pretrained_cfg)")
    _add_timing_options(table)
    table.add_argument(
        "--probes",
        type=integer(2),
        help="width assignments timed and fitted (default: 20, or 10 where a forward pass takes over a "
        "quarter second)",
    )
    table.add_argument(
        "--round-to",
        type=integer(1),
        help="widths the probes use are multiples of this (default: the rounding this device runs "
        "fastest at, measured first)",
    )
    table.add_argument(
        "--attention", choices=choices(AttentionMode), default="heads", help="as prune's --attention"
    )
    table.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    table.set_defaults(run=cmd_latency_table)


def _prune_parser(sub: argparse._SubParsersAction) -> None:
    shrink = sub.add_parser(
        "prune", help="remove channels to a FLOPs, params or latency target; prints a before/after table"
    )
    shrink.add_argument("source", help="a .dag file, timm:NAME or package.module:factory")
    target = shrink.add_mutually_exclusive_group(required=True)
    target.add_argument("--flops-ratio", type=FRACTION, help="fraction of the FLOPs to keep, in (0, 1]")
    target.add_argument("--params-ratio", type=FRACTION, help="fraction of the parameters to keep, in (0, 1]")
    target.add_argument(
        "--kmapp", type=number(above=0.0), help="target kmapp (FLOPs per input pixel / 1000), > 0"
    )
    target.add_argument(
        "--latency-ratio",
        type=FRACTION,
        help="fraction of the measured latency to keep, in (0, 1]: widths chosen on a latency table, "
        "the result measured",
    )
    shrink.add_argument(
        "--latency-table",
        type=Path,
        help="with --latency-ratio: a table from `torch-dag latency-table` (default: the one beside the "
        "model for --device, --dtype and --latency-batch, built and saved there when missing)",
    )
    shrink.add_argument(
        "--latency-batch",
        type=integer(1),
        help="with --latency-ratio: the batch size latency is predicted and measured at (default: the "
        "table's, else the example inputs' batch; --batch-size is the calibration's)",
    )
    shrink.add_argument(
        "--device",
        type=device_option,
        help="with --latency-ratio: cpu, cuda, ... (default: the table's, else cpu)",
    )
    shrink.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        help="with --latency-ratio: the dtype latency is measured in (default: the table's, else the model's own)",
    )
    _add_allocator_option(shrink)
    _add_width_options(
        shrink,
        "remove whole attention heads, or the same positions of every head",
        "keep widths multiples of this (1: no rounding; default: 8, or with --latency-ratio the rounding "
        "the latency table found fastest on its device)",
    )
    shrink.add_argument(
        "--compensate",
        choices=choices(Compensation),
        default="lstsq",
        help="with --calibration: re-solve the layers that lost inputs (lstsq), or restore "
        "the removed channels' mean contribution in their biases (mean)",
    )
    shrink.add_argument(
        "--protect", nargs="*", default=[], metavar="VERTEX", help="vertices whose channels stay"
    )
    shrink.add_argument(
        "--report",
        action="store_true",
        help="also list every channel group (width before -> after, or why it is fixed) and every "
        "layer's widths",
    )
    shrink.set_defaults(run=cmd_prune)


def _factorize_parser(sub: argparse._SubParsersAction) -> None:
    low = sub.add_parser("factorize", help="replace Linear/Conv2d layers by low-rank pairs to a target")
    low.add_argument("source", help="a .dag file, timm:NAME or package.module:factory")
    target = low.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--flops-ratio", type=FRACTION, help="fraction of the model's FLOPs to keep, in (0, 1]"
    )
    target.add_argument(
        "--params-ratio", type=FRACTION, help="fraction of the model's parameters to keep, in (0, 1]"
    )
    target.add_argument(
        "--rank-ratio", type=FRACTION, help="every layer at this fraction of its full rank, in (0, 1]"
    )
    low.add_argument(
        "--allocation",
        default="error",
        choices=choices(Allocation),
        help="least-error ranks per layer (error) or one rank fraction for all (uniform)",
    )
    low.add_argument(
        "--calibration",
        type=Path,
        help="a .npy array of model inputs (N x C x H x W) for the "
        "data-aware solution (default: truncated SVD, no data)",
    )
    low.add_argument("--batch-size", type=integer(1), default=8, help="calibration batch size")
    low.add_argument("--protect", nargs="*", default=[], metavar="VERTEX", help="vertices to leave alone")
    low.add_argument("--input-size", type=parse_size, help="CxHxW (default: as converted / pretrained_cfg)")
    low.add_argument("--top", type=integer(0), default=20, help="layers shown in the report (by FLOPs)")
    low.add_argument(
        "--latency",
        action="store_true",
        help="factorize only the layers whose low-rank pair runs faster, timed on the CPU at the input's "
        "batch (or on --latency-table's device, dtype and batch)",
    )
    low.add_argument(
        "--latency-table",
        type=Path,
        help="with --latency: a table from `torch-dag latency-table`, whose device, dtype and batch the "
        "layers are timed at",
    )
    _add_allocator_option(low)
    low.add_argument("-o", "--output", type=Path, required=True)
    low.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    low.set_defaults(run=cmd_factorize)


def _flexify_parser(sub: argparse._SubParsersAction) -> None:
    flexify = sub.add_parser(
        "flexify", help="one weight-shared model with switchable width levels (+ delta file)"
    )
    flexify.add_argument("source", help="a .dag file, timm:NAME or package.module:factory")
    target = flexify.add_mutually_exclusive_group()
    target.add_argument(
        "--levels",
        type=FRACTION,
        nargs="+",
        default=[0.25, 0.5, 1.0],
        help="width fraction per level, each in (0, 1], increasing (default: 0.25 0.5 1.0)",
    )
    target.add_argument(
        "--flops-ratios", type=FRACTION, nargs="+", help="FLOPs ratio per level instead, increasing"
    )
    _add_width_options(
        flexify,
        "levels keep whole attention heads, or the same positions of every head",
        "keep widths multiples of this (1: no rounding; default: 8)",
    )
    flexify.add_argument(
        "--compensate",
        choices=choices(FlexCompensation),
        default="none",
        help="with --calibration: re-solve the shared weights of the layers that lose inputs for "
        "all levels at once (the top level no longer equals the source exactly)",
    )
    flexify.add_argument("--delta-file", type=Path, help="also write the levels as a delta file")
    flexify.add_argument(
        "--starting-level", type=integer(0), default=0, help="the level the delta file stores whole"
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
    tune.add_argument("--epochs", type=integer(1), default=1, help="passes over --data")
    tune.add_argument("--batch-size", type=integer(1), default=32, help="per process")
    tune.add_argument(
        "--lr", type=number(above=0.0), default=1e-3, help="peak learning rate (cosine schedule)"
    )
    tune.add_argument("--optimizer", choices=choices(Optimizer), default="adamw", help="the optimizer")
    tune.add_argument("--weight-decay", type=number(low=0.0), default=0.0, help="decoupled weight decay")
    tune.add_argument("--temperature", type=number(above=0.0), default=1.0, help="distillation temperature")
    tune.add_argument(
        "--alpha",
        type=number(low=0.0, high=1.0),
        default=0.5,
        help="weight of distillation vs the labels' loss, in [0, 1]",
    )
    tune.add_argument("--features", nargs="*", default=[], metavar="VERTEX", help="vertices to match too")
    tune.add_argument(
        "--checkpoint", type=Path, help="a checkpoint folder: written as training goes, resumed from"
    )
    tune.add_argument(
        "--checkpoint-every", type=integer(0), default=0, help="steps between checkpoints (0: each epoch)"
    )
    tune.add_argument("-o", "--output", type=Path, required=True)
    tune.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    tune.set_defaults(run=cmd_finetune)


SUBCOMMANDS = (
    _convert_parser,
    _info_parser,
    _viz_parser,
    _rewrite_parsers,
    _export_parser,
    _bench_parser,
    _latency_table_parser,
    _prune_parser,
    _factorize_parser,
    _flexify_parser,
    _finetune_parser,
    add_search_parser,
    add_train_prune_parser,
)  # in the order `--help` lists them


def _add_timing_options(parser: argparse.ArgumentParser, batch_option: str = "--batch-size") -> None:
    """Where and how a latency is measured: batch size, device and dtype (bench, latency-table)."""
    parser.add_argument(
        batch_option,
        type=integer(1),
        help="batch size to time at (default: the example inputs' batch, 1 for a converted model)",
    )
    parser.add_argument("--device", type=device_option, default="cpu", help="cpu, cuda, cuda:1, mps")
    parser.add_argument(
        "--dtype", choices=DTYPE_CHOICES, help="weights and inputs cast to it (default: the model's own)"
    )
    _add_allocator_option(parser)


def _add_allocator_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--steady-allocator",
        action="store_true",
        help="keep freed memory in the process while timing (glibc), as a deployment with jemalloc or "
        "tcmalloc does: no pages faulted in afresh on every call (see torch_dag.steady_allocator)",
    )


def _add_width_options(parser: argparse.ArgumentParser, attention_help: str, round_to_help: str) -> None:
    """The options `prune` and `flexify` share: how channels are ranked and widths chosen, and I/O."""
    parser.add_argument("--criterion", default="l2", choices=choices(Criterion), help="channel importance")
    parser.add_argument(
        "--calibration",
        type=Path,
        help="a .npy array of model inputs (N x C x H x W): for taylor, compensation and --recalibrate-bn",
    )
    parser.add_argument("--batch-size", type=integer(1), default=8, help="calibration batch size")
    parser.add_argument(
        "--recalibrate-bn",
        action="store_true",
        help="with --calibration: re-estimate the "
        "batchnorm statistics of the result (of every level) on the calibration data",
    )
    parser.add_argument("--round-to", type=integer(1), help=round_to_help)
    parser.add_argument("--min-channels", type=integer(1), default=1, help="the narrowest a group may become")
    parser.add_argument("--attention", choices=choices(AttentionMode), default="heads", help=attention_help)
    parser.add_argument(
        "--input-size", type=parse_size, help="CxHxW (default: as converted / pretrained_cfg)"
    )
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress output")
