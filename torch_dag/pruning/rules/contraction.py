"""Channel rules of ops that multiply two activations: matmul and scaled dot-product attention."""

from __future__ import annotations

from typing import Any

from ...core.dag import Vertex
from ...core.template import Ref
from ..channels import Analysis, Channels, call_arg, rank_of
from .elementwise import untracked_operand


def attention(a: Analysis, v: Vertex, inputs: list[Any], out: Any) -> Any:
    """scaled_dot_product_attention over heads carried as channels (on a batch axis of q, k and v):
    a head goes from all three at once. Channels of the head dim: v's go to the output, q's and k's
    (contracted) are tied and the call keeps the scale it had (the default is 1/sqrt(head dim))."""
    q, k, value = inputs[:3]
    ranks = [rank_of(a.values[r.name]) for r in v.args[:3]]
    mask = call_arg(v, 3, "attn_mask")
    mask_info = a.info.get(mask.name) if isinstance(mask, Ref) else None
    tracked = [(info, rank) for info, rank in zip((q, k, value), ranks) if isinstance(info, Channels)]
    if not tracked:
        a.block(mask_info, f"{v.name}: an attention mask with channels, on untracked q, k, v")
        return None
    batch = {(info.axis - rank) for info, rank in tracked if info.axis < rank - 2}
    if len(batch) == 1 and len(tracked) == 3 and all(info.axis < rank - 2 for info, rank in tracked):
        for info, _ in tracked[1:]:
            a.uf.union(tracked[0][0].ids, info.ids)
        a.role(v).flop_shares = [(1.0, q.ids)]  # both products run once per head
        offset = next(iter(batch))
        # a bias per head (relative positions): its table is sliced, or its producer pruned, with the heads
        if isinstance(mask_info, Channels) and mask_info.axis - a.values[mask.name].dim() == offset:
            a.uf.union(q.ids, mask_info.ids)
        elif mask_info is not None:
            a.block(
                [q, mask_info], f"{v.name}: an attention mask with channels on another axis than the heads"
            )
            return None
        elif isinstance(mask, Ref) and not untracked_operand(
            a, v, mask, Channels(ranks[0] + offset, q.ids), ranks[0]
        ):
            return None
        return Channels(out.dim() + offset, value.ids)
    last = [info.axis == rank - 1 for info, rank in zip((q, k, value), ranks) if isinstance(info, Channels)]
    if all(last) and isinstance(q, Channels) == isinstance(k, Channels):
        a.block(mask_info, f"{v.name}: an attention mask with channels while the head dim is pruned")
        qk_dim, v_dim = a.values[v.args[0].name].shape[-1], a.values[v.args[2].name].shape[-1]
        if isinstance(q, Channels):  # the head dim q and k contract: pruned in both, the scale kept
            a.uf.union(q.ids, k.ids)
            if call_arg(v, 6, "scale") is None:
                a.role(v).keywords = {"scale": qk_dim**-0.5}
            a.role(v).flop_shares.append((qk_dim / (qk_dim + v_dim), q.ids))  # q k^T over the head dim
        if isinstance(value, Channels):
            a.role(v).flop_shares.append((v_dim / (qk_dim + v_dim), value.ids))  # the weights times v
        return Channels(out.dim() - 1, value.ids) if isinstance(value, Channels) else None
    a.block(
        [q, k, value, mask_info],
        f"{v.name}: attention with channels on axes it contracts or on some operands only",
    )
    return None


def matmul(a: Analysis, v: Vertex, inputs: list[Any], out: Any) -> Any:
    """x @ y: channels on broadcast (batch) axes are tied across the operands and stay; the rows of x
    and the columns of y go to the output; on the contracted axis both operands' are tied."""
    ranks = [rank_of(a.values[r.name]) if isinstance(r, Ref) else 0 for r in v.args[:2]]
    if min(ranks) < 2:
        a.block(inputs, f"{v.name}: matmul with a vector")
        return None
    left, right = inputs[:2]
    batch = [
        (info, info.axis - rank)
        for info, rank in zip((left, right), ranks)
        if isinstance(info, Channels) and info.axis < rank - 2
    ]
    if batch:
        if (
            len(batch) != sum(isinstance(i, Channels) for i in (left, right))
            or len({off for _, off in batch}) > 1
        ):
            a.block([left, right], f"{v.name}: matmul with channels on different axes of its operands")
            return None
        channels, offset = batch[0]
        for info, _ in batch[1:]:
            a.uf.union(channels.ids, info.ids)
        for info, ref, rank in zip((left, right), v.args[:2], ranks):
            if info is None and rank >= -offset and a.values[ref.name].shape[offset] != 1:
                a.block(
                    channels, f"{v.name}: matmul with {ref.name}, which spans the channels but is not tracked"
                )
                return None
        a.role(v).flop_shares = [(1.0, channels.ids)]  # one product per head
        return Channels(out.dim() + offset, channels.ids)
    if isinstance(left, Channels) and left.axis == ranks[0] - 2 and not isinstance(right, Channels):
        a.role(v).flop_shares = [(1.0, left.ids)]
        return Channels(out.dim() - 2, left.ids)
    if isinstance(right, Channels) and right.axis == ranks[1] - 1 and not isinstance(left, Channels):
        a.role(v).flop_shares = [(1.0, right.ids)]
        return Channels(out.dim() - 1, right.ids)
    if (
        isinstance(left, Channels)
        and isinstance(right, Channels)
        and left.axis == ranks[0] - 1
        and right.axis == ranks[1] - 2
    ):  # q @ k.T over the head dim: a position goes from both
        a.uf.union(left.ids, right.ids)
        a.role(v).flop_shares = [(1.0, left.ids)]  # handled: nothing of its own to slice
        return None
    a.block([left, right], f"{v.name}: matmul contracts the channel axis with an untracked operand")
    return None
