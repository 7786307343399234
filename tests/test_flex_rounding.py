"""`make_flexible` keeps its levels apart: widths are rounded per channel group only as coarsely as keeps
that group's levels distinct, the rounding chosen is recorded (and warned about where it is finer than
asked), and levels whose FLOPs do not grow strictly are refused with the reason. Models are small,
hand-written and converted without example inputs."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import torch_dag as td
from torch_dag import flex as tf


class Narrow(nn.Module):
    """16-channel convs with a residual, the idioms of hand-written models."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.body = nn.Conv2d(width, width, 3, padding=1)
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        x = self.stem(x).relu()
        B, C, H, W = x.shape
        x = x + self.body(x).relu()
        return self.head(x.reshape(B, C, H * W).mean(2))


class Attention(nn.Module):
    """A conv stem, then nn.MultiheadAttention (4 heads of 4) over the tokens and a concat."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 16, stride=16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.side = nn.Conv2d(3, 8, 16, stride=16)
        self.head = nn.Linear(24, 10)

    def forward(self, x):
        t = self.stem(x).flatten(2).transpose(1, 2)
        t = t + self.attn(t, t, t, need_weights=False)[0]
        both = torch.cat([t.mean(1), self.side(x).mean((2, 3))], 1)
        return self.head(both)


def level_flops(flex: tf.FlexDagModule, inputs: tuple) -> list[int]:
    """FLOPs of every level, counted on the plain model of that level."""
    counts = []
    for level in range(flex.max_level() + 1):
        flex.set_level_use(level)
        counts.append(td.count_flops(flex.make_base_copy(), *inputs).total_flops)
    return counts


def out_channels(flex: tf.FlexDagModule, name: str) -> int:
    return flex.make_base_copy()[name].module.out_channels


def test_narrow_groups_round_finer_and_keep_three_distinct_levels():
    torch.manual_seed(0)
    dag = td.build_from_unstructured_module(Narrow().eval())
    with pytest.warns(UserWarning, match=r"round finer \(stem: 4\)"):
        flex = tf.make_flexible(dag, [0.25, 0.5, 1.0])
    assert flex.width_info["rounding"] == [4]
    widths = []
    for level in range(3):
        flex.set_level_use(level)
        widths.append(out_channels(flex, "stem"))
    assert widths == [4, 8, 16]
    flops = level_flops(flex, dag.example_inputs())
    assert flops[0] < flops[1] < flops[2] == td.count_flops(dag, *dag.example_inputs()).total_flops


def test_wide_groups_keep_the_rounding_asked_for():
    dag = td.build_from_unstructured_module(Narrow(64).eval())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to say: 16, 32 and 64 are multiples of 8
        flex = tf.make_flexible(dag, [0.25, 0.5, 1.0])
    assert flex.width_info["rounding"] == [8]
    flex.set_level_use(0)
    assert out_channels(flex, "stem") == 16


@pytest.mark.slow
def test_attention_heads_round_per_group():
    torch.manual_seed(0)
    dag = td.build_from_unstructured_module(Attention().eval())
    inputs = dag.example_inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flex = tf.make_flexible(dag, [0.25, 0.5, 1.0])
    producers = [g.producers[0] for g in flex._plan().prunable]
    # the stream (16 channels: 4, 8, 16), the heads (4 of 4 channels: 1, 2, 4 heads), the side (8: 2, 4, 8)
    assert dict(zip(producers, flex.width_info["rounding"])) == {"stem": 4, "attn_q": 4, "side": 2}
    flops = level_flops(flex, inputs)
    assert flops[0] < flops[1] < flops[2], flops
    for level in range(3):
        flex.set_level_use(level)
        torch.testing.assert_close(flex(*inputs), flex.make_base_copy()(*inputs))


def test_the_chosen_rounding_is_saved_and_set_widths_uses_it(tmp_path):
    dag = td.build_from_unstructured_module(Narrow().eval())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flex = tf.make_flexible(dag, [0.25, 0.5, 1.0])
    td.save(flex, tmp_path / "narrow.dag")
    loaded = td.load(tmp_path / "narrow.dag")
    assert loaded.width_info["rounding"] == [4]
    loaded.set_widths([0.25])  # the saved ranking and rounding: 4 channels, not 8
    assert out_channels(loaded, "stem") == 4


@pytest.mark.parametrize(
    ("levels", "config"),
    [
        ([0.5, 0.5, 1.0], tf.FlexConfig()),  # two levels of the same widths
        ([1.0, 0.5], tf.FlexConfig()),  # a wider level before a narrower one
        ([0.25, 0.5, 1.0], tf.FlexConfig(min_channels=16)),  # every level keeps everything
    ],
)
def test_levels_that_do_not_grow_are_refused_with_the_reason(levels, config):
    dag = td.build_from_unstructured_module(Narrow().eval())
    with pytest.raises(
        td.DagError, match=r"do not grow strictly \(level 0 \(width [\d.]+\): [\d.]+ MFLOPs"
    ) as e:
        tf.make_flexible(dag, levels, config=config)
    assert "give levels further apart" in str(e.value)
