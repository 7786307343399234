"""`torch-dag`: a thin command line over the public API (`torch-dag --help`; the usage is in parser.py).

parser.py holds the subcommand table and options; each subcommand's run function lives in the module
of its group: convert.py (convert, export-onnx), info.py (info, viz), rewrite.py (swap-act, fold-bn,
simplify), compress.py (prune, factorize, flexify), finetune.py; models.py loads models and inputs.
"""

from __future__ import annotations

import sys

from ..core.errors import DagError
from .models import load_model
from .parser import build_parser, parse_size

__all__ = ["build_parser", "load_model", "main", "parse_size"]


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except DagError as e:
        print(f"torch-dag: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
