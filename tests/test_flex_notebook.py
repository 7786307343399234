"""Every cell of the FlexViT notebook's level-switching, copying, level-delta and delta-manager sections
(../shared/reference/flexvit_flex_modules_notebook.txt), with `td.flex` in place of `flex_modules`, a
hand-written flexible ViT (`FlexViT`, a `td.flex.Module`) in place of `flexvit` and a plain twin written
with torch layers only (`PlainViT`) in place of `vit`. The oracles: the plain twin built independently at
each level's widths (its parameter count, its outputs once it holds the flexible model's weights)."""

from __future__ import annotations

import io
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_dag as td

fm = td.flex

EMBED, HEADS, HEAD_DIM, MLP, CLASSES, PATCH = [8, 12, 16], [2, 3, 4], 4, [16, 24, 32], 10, 8


class FlexBlock(fm.Module):
    def __init__(self):
        super().__init__()
        self.ln1, self.ln2 = fm.LayerNorm(EMBED), fm.LayerNorm(EMBED)
        self.attn = fm.MultiheadAttention(EMBED, HEADS, HEAD_DIM)
        self.fc1, self.fc2 = fm.Linear(EMBED, MLP), fm.Linear(MLP, EMBED)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class FlexViT(fm.Module):
    """A small ViT whose levels narrow the embedding, the heads and the MLPs."""

    def __init__(self, depth: int = 2):
        super().__init__()
        self.patch = fm.Conv2d([3] * 3, EMBED, kernel_size=PATCH, stride=PATCH)
        self.blocks = nn.Sequential(*(FlexBlock() for _ in range(depth)))
        self.norm = fm.LayerNorm(EMBED)
        self.head = fm.Linear(EMBED, [CLASSES] * 3)

    def forward(self, x):
        B, _, H, W = x.shape
        tokens = self.patch(x).reshape(B, -1, (H // PATCH) * (W // PATCH)).transpose(1, 2)
        return self.head(self.norm(self.blocks(tokens)).mean(1))


class PlainAttention(nn.Module):
    def __init__(self, embed: int, heads: int):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(embed, heads * HEAD_DIM) for _ in range(3))
        self.proj = nn.Linear(heads * HEAD_DIM, embed)

    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = (f(x).reshape(B, N, -1, HEAD_DIM).transpose(1, 2) for f in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v, scale=1 / math.sqrt(HEAD_DIM))
        return self.proj(out.transpose(1, 2).reshape(B, N, -1))


class PlainBlock(nn.Module):
    def __init__(self, embed: int, heads: int, mlp: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(embed), nn.LayerNorm(embed)
        self.attn = PlainAttention(embed, heads)
        self.fc1, self.fc2 = nn.Linear(embed, mlp), nn.Linear(mlp, embed)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class PlainViT(nn.Module):
    """The plain ViT of one level, written with torch layers only."""

    def __init__(self, level: int, depth: int = 2):
        super().__init__()
        embed = EMBED[level]
        self.patch = nn.Conv2d(3, embed, kernel_size=PATCH, stride=PATCH)
        self.blocks = nn.Sequential(*(PlainBlock(embed, HEADS[level], MLP[level]) for _ in range(depth)))
        self.norm = nn.LayerNorm(embed)
        self.head = nn.Linear(embed, CLASSES)

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        return self.head(self.norm(self.blocks(tokens)).mean(1))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def randomize_nets(*nets: nn.Module) -> None:
    for net in nets:
        for p in net.parameters():
            p.data[:] = torch.rand(*p.shape)


PLAIN_COUNTS = [count_parameters(PlainViT(level)) for level in range(3)]


@pytest.fixture
def model():
    torch.manual_seed(0)
    return FlexViT().eval()


# --- level switching ------------------------------------------------------------------------------


def test_cell_1_a_plain_conv():
    conv = nn.Conv2d(3, 20, kernel_size=3)
    assert conv(torch.rand((10, 3, 100, 100))).shape == (10, 20, 98, 98)


def test_cells_2_and_3_a_flexible_conv_switches_levels():
    conv = fm.Conv2d([1, 2, 3], [10, 15, 20], kernel_size=3)
    conv.set_level_use(conv.max_level())
    x = torch.rand((10, 3, 100, 100))
    assert conv(x).shape == (10, 20, 98, 98)
    conv.set_level_use(1)
    with pytest.raises(RuntimeError, match=r"expected input.*to have 2 channels, but got 3"):
        conv(x)
    first_conv = fm.Conv2d([3, 3, 3], [10, 15, 20], kernel_size=3)
    for i in range(0, first_conv.max_level() + 1):
        first_conv.set_level_use(i)
        assert first_conv.current_level() == i
        assert first_conv(x).shape == (10, [10, 15, 20][i], 98, 98)


def test_cell_4_a_flexible_model_switches_levels(model):
    x = torch.rand(10, 3, 32, 32)
    assert model.max_level() == 2
    for i in range(0, model.max_level() + 1):
        model.set_level_use(i)
        assert model.current_level() == i
        assert model(x).shape == (10, CLASSES)
        assert count_parameters(model.make_base_copy()) == PLAIN_COUNTS[i]
    assert PLAIN_COUNTS[0] < PLAIN_COUNTS[1] < PLAIN_COUNTS[2] == count_parameters(model)


# --- copying --------------------------------------------------------------------------------------


def test_cell_5_copying_a_layer():
    reg = nn.Conv2d(10, 20, kernel_size=3)
    flex = fm.Conv2d([5, 7, 10], [10, 15, 20], kernel_size=3)
    x = torch.rand(10, 10, 20, 20)
    flex.set_level_use(2)
    randomize_nets(flex, reg)
    flex.load_from_base(reg)
    assert torch.isclose(flex(x), reg(x)).all()
    randomize_nets(flex, reg)
    flex.copy_to_base(reg)
    assert torch.isclose(flex(x), reg(x)).all()
    randomize_nets(flex, reg)
    reg2 = flex.make_base_copy()
    assert type(reg2) is nn.Conv2d and torch.isclose(flex(x), reg2(x)).all()


@pytest.mark.parametrize("level", [0, 1, 2])
def test_cell_6_copying_a_model_both_ways(model, level):
    reg = PlainViT(level).eval()
    x = torch.rand(10, 3, 32, 32)
    model.set_level_use(level)
    randomize_nets(model, reg)
    fm.flexible_model_copy(reg, model)  # model.load_from_base(reg)
    assert torch.isclose(model(x), reg(x)).all()
    randomize_nets(reg, model)
    fm.flexible_model_copy(model, reg)  # model.copy_to_base(reg)
    assert torch.isclose(model(x), reg(x)).all()


# --- level deltas ---------------------------------------------------------------------------------


def test_cells_7_and_8_level_deltas(model):
    x = torch.rand(10, 3, 32, 32)
    model.set_level_use(1)
    reg_model = model.make_base_copy()
    assert count_parameters(reg_model) == PLAIN_COUNTS[1]
    model.set_level_use(2)
    down_delta, up_delta = model.export_level_delta()
    assert down_delta is None
    up_delta.apply(reg_model)
    assert count_parameters(reg_model) == PLAIN_COUNTS[2]
    assert torch.isclose(reg_model(x), model(x)).all()
    model.set_level_use(1)
    down_delta, up_delta = model.export_level_delta()
    down_delta.apply(reg_model)
    assert count_parameters(reg_model) == PLAIN_COUNTS[1]
    assert torch.isclose(reg_model(x), model(x)).all()


# --- delta managers -------------------------------------------------------------------------------


def test_cell_9_the_in_memory_manager(model):
    x = torch.rand(10, 3, 32, 32)
    model.set_level_use(0)
    manager = fm.InMemoryDeltaManager(model)
    reg_model = manager.managed_model()
    assert count_parameters(reg_model) == PLAIN_COUNTS[0]
    for level in (2, 1, 0, 2):
        assert manager.move_to(level) is reg_model
        assert count_parameters(reg_model) == PLAIN_COUNTS[level]
        model.set_level_use(level)
        assert torch.isclose(reg_model(x), model(x)).all()


@pytest.mark.slow
def test_cell_11_the_delta_file_written_through_an_open_file(model, tmp_path):
    x = torch.rand(10, 3, 32, 32)
    model.set_level_use(0)
    name = tmp_path / "vit.delta"
    with open(name, "wb") as file:
        fm.FileDeltaManager.make_delta_file(file, model, starting_level=0, example_inputs=(x,))
    with fm.file_delta_manager(name) as manager:
        for level in (0, 2, 1, 0, 2):
            reg_model = manager.move_to(level)
            assert count_parameters(reg_model) == PLAIN_COUNTS[level]
            model.set_level_use(level)
            assert torch.isclose(reg_model(x), model(x)).all()
    top = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert os.path.getsize(name) > top  # it holds every level's weights
    buffer = io.BytesIO()  # any binary file object will do
    model.set_level_use(0)
    fm.FileDeltaManager.make_delta_file(buffer, model, starting_level=0, example_inputs=(x,))
    other = tmp_path / "from_buffer.delta"
    other.write_bytes(buffer.getvalue())
    with fm.file_delta_manager(other) as manager:
        model.set_level_use(1)
        assert torch.isclose(manager.move_to(1)(x), model(x)).all()
