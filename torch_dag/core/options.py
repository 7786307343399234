"""One check for string options (criterion, attention mode, compensation, optimizer ...): the error names
the option, the value given and the values accepted, in the same words everywhere."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, get_args

from .errors import DagError


def choices(literal: Any) -> tuple[str, ...]:
    """The values of a `Literal[...]` type, so that the type and the check share one list."""
    return get_args(literal)


def check_option(
    option: str,
    value: Any,
    accepted: Sequence[str],
    *,
    what: str | None = None,
    where: str = "",
    error: type[Exception] = DagError,
) -> None:
    """Raise `error` unless `value` is one of `accepted`: "<option>='x' is not a known <what><where>: use a,
    b or c". `what` says what the option chooses (default: its name), `where` what it configures."""
    if isinstance(value, str) and value in accepted:
        return
    raise error(f"{option}={value!r} is not a known {what or option}{where}: use {spoken(accepted)}")


def spoken(values: Sequence[str]) -> str:
    """'a, b or c'."""
    values = [str(v) for v in values]
    return values[0] if len(values) == 1 else f"{', '.join(values[:-1])} or {values[-1]}"
