"""`torch-dag`: a thin command line over the public API (`torch-dag --help`; the usage is in parser.py).

parser.py holds the subcommand table and options; each subcommand's run function lives in the module
of its group: convert.py (convert, export-onnx), info.py (info, viz), rewrite.py (swap-act, fold-bn,
simplify), compress.py (prune, factorize, flexify), latency.py (bench, latency-table, and the latency
table `prune --latency-ratio` reads or builds), finetune.py; models.py loads models and inputs; values.py
checks option values and paths.

A user's mistake (a bad value, a missing or unwritable file, a model that cannot run on the inputs
given) is one line on stderr and exit status 2; only a bug in torch-dag prints a traceback.
"""

from __future__ import annotations

import sys

from ..analysis.latency import steady_allocator
from ..core.errors import DagError
from .models import load_model
from .parser import build_parser, parse_size
from .values import check_outputs

__all__ = ["build_parser", "load_model", "main", "parse_size"]

USER_ERRORS = (DagError, ValueError, OSError)  # what the toolkit raises on purpose, and bad paths


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        check_outputs(args)
        if getattr(args, "steady_allocator", False) and not steady_allocator():
            print(
                "torch-dag: --steady-allocator has no effect here (the C library is not glibc); preload "
                "jemalloc or tcmalloc for the same",
                file=sys.stderr,
            )
        args.run(args)
    except USER_ERRORS as e:
        print(f"torch-dag {args.command}: error: {one_line(e)}", file=sys.stderr)
        raise SystemExit(2) from None


def one_line(error: BaseException) -> str:
    """The error's message on one line (an OSError as "what: which file")."""
    if isinstance(error, OSError) and error.strerror and error.filename:
        text = f"{error.filename}: {error.strerror}"
    else:
        text = str(error) or type(error).__name__
    return " ".join(text.split())
