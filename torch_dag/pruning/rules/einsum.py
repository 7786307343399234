"""The channel rule of einsum, read from its subscripts: an axis kept in the output passes its channels
through; an axis contracted against a weight (a Parameter / Constant operand) is read by it, the weight
sliced with the channels; an axis contracted between two activations ties their channels (attention's
`bhqd,bhkd->bhqk` over the head dim), as matmul does."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import torch

from ...core.dag import Vertex
from ...core.template import Ref
from ..channels import Analysis, Channels
from .elementwise import held_tensor

_ELLIPSIS = "..."


def einsum(a: Analysis, v: Vertex, inputs: list[Any], out: Any) -> Any:
    """Channels on an axis of letter L: tied across every operand tracked on L; an untracked operand
    spanning L must be a weight (sliced along it) or broadcast over it; they go to the output if L is in
    it (on its axis there), else they are read here. Two tracked letters in the output block both."""
    equation, refs, infos = _operands(v, inputs)
    values = [a.values.get(r.name) if isinstance(r, Ref) else r for r in refs]
    ranks = [t.dim() for t in values if isinstance(t, torch.Tensor)]
    tensors = len(ranks) == len(values) and isinstance(out, torch.Tensor)
    parsed = _subscripts(equation, ranks) if tensors and isinstance(equation, str) else None
    if parsed is None or not _fits(parsed, values, out):
        a.block(infos, f"{v.name}: einsum {equation!r} whose subscripts the channel rule cannot read")
        return None
    terms, output = parsed
    tracked: dict[str, np.ndarray] = {}
    for term, info in zip(terms, infos):
        if info is None:
            continue
        letter = term[info.axis] if isinstance(info, Channels) else None
        if letter is None or term.count(letter) > 1:
            a.block(infos, f"{v.name}: einsum {equation!r} takes a diagonal of (or nests) the channels")
            return None
        if letter in tracked:
            a.uf.union(tracked[letter], info.ids)
        else:
            tracked[letter] = info.ids
    if not tracked:
        return None
    kept = [letter for letter in tracked if letter in output]
    if len(kept) > 1:
        a.block(infos, f"{v.name}: einsum {equation!r} keeps channels on two output axes")
        return None
    for letter, ids in tracked.items():
        if not _operands_span(a, v, letter, ids, list(zip(refs, terms, infos, values))):
            a.block(
                infos,
                f"{v.name}: einsum {equation!r} spans the channels of {letter!r} with an untracked tensor",
            )
            return None
    a.role(v).flop_shares = [(1.0, ids) for ids in tracked.values()]  # its products run once per channel
    return Channels(output.index(kept[0]), tracked[kept[0]]) if kept else None


def _operands_span(a: Analysis, v: Vertex, letter: str, ids: np.ndarray, operands: list[tuple]) -> bool:
    """Whether every operand that has `letter` but no channel ids on it broadcasts over it (size 1) or is
    a weight held by a Parameter / Constant, which is then sliced along that axis with the channels."""
    for ref, term, info, value in operands:
        if letter not in term or (isinstance(info, Channels) and term[info.axis] == letter):
            continue
        axis = term.index(letter)
        if value.shape[axis] == 1:
            continue
        held = held_tensor(a, ref.name, axis) if info is None and isinstance(ref, Ref) else None
        if held is None or value.shape[axis] != len(ids):
            return False
        role = a.role(a.dag[held[0]])
        if role.in_ids is not None and role.axis != held[1]:
            return False  # a weight read along two axes with channels: one slicing axis per tensor
        if role.in_ids is not None:
            a.uf.union(role.in_ids, ids)
        role.in_ids, role.axis = ids, held[1]
    return True


def _operands(v: Vertex, inputs: list[Any]) -> tuple[Any, list[Any], list[Any]]:
    """The equation, the operands (`einsum(eq, a, b)` or `einsum(eq, [a, b])`) and their infos."""
    if len(v.args) == 2 and isinstance(v.args[1], (list, tuple)):
        return v.args[0], list(v.args[1]), list(inputs[1])
    return (v.args[0] if v.args else None), list(v.args[1:]), list(inputs[1:])


def _subscripts(equation: str, ranks: list[int]) -> tuple[list[list[str]], list[str]] | None:
    """Each operand's letters, one per axis, and the output's (the letters seen once, in order, when the
    equation has no `->`); an ellipsis becomes one name per axis it covers, aligned from the right.
    None when the equation does not fit the operands."""
    lhs, arrow, rhs = equation.replace(" ", "").partition("->")
    if len(lhs.split(",")) != len(ranks):
        return None
    terms, width = [], 0
    for term, rank in zip(lhs.split(","), ranks):
        head, dots, tail = term.partition(_ELLIPSIS)
        covered = rank - len(head) - len(tail) if dots else 0
        if covered < 0 or _ELLIPSIS in tail or (head + tail and not (head + tail).isalpha()):
            return None
        width = max(width, covered)
        terms.append([*head, *_ellipsis(covered), *tail])
    if any(len(term) != rank for term, rank in zip(terms, ranks)):
        return None
    if not arrow:
        seen = Counter(letter for term in terms for letter in term if not letter.startswith(_ELLIPSIS))
        return terms, [*_ellipsis(width), *sorted(letter for letter, n in seen.items() if n == 1)]
    head, dots, tail = rhs.partition(_ELLIPSIS)
    if _ELLIPSIS in tail or (head + tail and not (head + tail).isalpha()):
        return None
    return terms, [*head, *(_ellipsis(width) if dots else []), *tail]


def _ellipsis(n: int) -> list[str]:
    return [f"{_ELLIPSIS}{i}" for i in range(n, 0, -1)]


def _fits(parsed: tuple[list[list[str]], list[str]], values: list[Any], out: torch.Tensor) -> bool:
    """Whether the parsed letters agree with the operands' and the output's sizes (a safety net)."""
    terms, output = parsed
    sizes: dict[str, int] = {}
    for term, value in zip(terms, values):
        for letter, size in zip(term, value.shape):
            if sizes.get(letter, 1) not in (1, size) and size != 1:
                return False
            sizes[letter] = max(sizes.get(letter, 1), size)
    return len(output) == out.dim() and all(sizes.get(letter) == n for letter, n in zip(output, out.shape))
