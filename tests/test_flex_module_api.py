"""The level API of `td.flex` building blocks and of hand-written models built from them (a
`td.flex.Module`), without a DagModule: levels, plain copies, copying both ways, level deltas (also as
bytes), the in-memory manager, and the errors that say what to do. The oracle is the plain torch layer
or model at each level's widths."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torch_dag as td
from torch_dag.flex.delta_level import LevelDelta
from torch_dag.flex.delta_tree import layer_path, layer_vertex

fm = td.flex


def blocks() -> dict[str, tuple[fm.Module, torch.Tensor]]:
    """Each building block with an input that every level reads."""
    return {
        "conv": (fm.Conv2d([3, 3, 3], [4, 6, 8], 3, padding=1), torch.randn(2, 3, 6, 6)),
        "depthwise": (fm.Conv2d([4, 6, 8], [4, 6, 8], 3, padding=1, groups=8), None),
        "linear": (fm.Linear([5, 5, 5], [2, 4, 6]), torch.randn(3, 5)),
        "batchnorm": (fm.BatchNorm2d([4, 6, 8]), None),
        "layernorm": (fm.LayerNorm([4, 6, 8]), None),
        "attention": (fm.MultiheadAttention([8, 8, 8], [1, 2, 4], head_dim=2), torch.randn(2, 5, 8)),
    }


def level_input(name: str, given: torch.Tensor | None, level: int) -> torch.Tensor:
    """The block's input at `level` (its input width changes with the level where it is not given)."""
    if given is not None:
        return given
    width = [4, 6, 8][level]
    return torch.randn(2, width, 5, 5) if name != "layernorm" else torch.randn(2, 3, width)


def fill_statistics(block: nn.Module) -> None:
    """Batchnorm statistics that differ per level, so that copying them is seen."""
    block.train()
    for level in range(3):
        block.set_level_use(level)
        block(torch.randn(4, [4, 6, 8][level], 5, 5) * (level + 2))
    block.eval()


@pytest.mark.parametrize("name", list(blocks()))
def test_every_block_has_the_level_api(name):
    torch.manual_seed(0)
    block, given = blocks()[name]
    if name == "batchnorm":
        fill_statistics(block)
    block.eval()
    assert block.max_level() == 2 and block.current_level() == 2
    for level in range(3):
        block.set_level_use(level)
        assert block.current_level() == level
        x = level_input(name, given, level)
        plain = block.make_base_copy()
        assert not fm.flex_layers(plain) and not isinstance(plain, fm.Module)
        assert plain.training is block.training
        torch.testing.assert_close(plain(x), block(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", list(blocks()))
def test_every_block_copies_to_and_from_a_plain_layer_and_moves_by_deltas(name):
    torch.manual_seed(0)
    block, given = blocks()[name]
    if name == "batchnorm":
        fill_statistics(block)
    block.eval()
    block.set_level_use(0)
    plain = block.make_base_copy()
    for level in (1, 2):
        block.set_level_use(level)
        _, up = block.export_level_delta()
        up.apply(plain)
        expected = block.make_base_copy()
        assert type(plain) is type(expected)
        assert {k: v.shape for k, v in plain.state_dict().items()} == {
            k: v.shape for k, v in expected.state_dict().items()
        }
        assert all(torch.equal(plain.state_dict()[k], v) for k, v in expected.state_dict().items())
    for level in (1, 0):
        block.set_level_use(level)
        down, _ = block.export_level_delta()
        down.apply(plain)
        assert all(
            torch.equal(plain.state_dict()[k], v) for k, v in block.make_base_copy().state_dict().items()
        )
    x = level_input(name, given, 0)
    for p in plain.parameters():  # new weights into the flexible block, and back out
        p.data.normal_()
    block.load_from_base(plain)
    torch.testing.assert_close(block(x), plain(x), rtol=0, atol=0)
    other = block.make_base_copy()
    for p in other.parameters():
        p.data.zero_()
    block.copy_to_base(other)
    torch.testing.assert_close(other(x), plain(x), rtol=0, atol=0)


class FlexCNN(fm.Module):
    """A hand-written flexible CNN: plain containers and plain layers between the flexible ones."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(fm.Conv2d([3, 3, 3], [4, 8, 16], 3, padding=1), fm.BatchNorm2d([4, 8, 16]))
        self.body = nn.ModuleList([fm.Conv2d([4, 8, 16], [4, 8, 16], 3, padding=1) for _ in range(2)])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.gate = nn.Parameter(torch.ones(1))  # the same at every level
        self.head = fm.Linear([4, 8, 16], [10, 10, 10])

    def forward(self, x):
        x = self.stem(x).relu()
        for conv in self.body:
            x = x + conv(x).relu() * self.gate
        B, C, _, _ = x.shape
        return self.head(self.pool(x).reshape(B, C))


class PlainCNN(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width))
        self.body = nn.ModuleList([nn.Conv2d(width, width, 3, padding=1) for _ in range(2)])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.gate = nn.Parameter(torch.ones(1))
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        x = self.stem(x).relu()
        for conv in self.body:
            x = x + conv(x).relu() * self.gate
        B, C, _, _ = x.shape
        return self.head(self.pool(x).reshape(B, C))


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_a_hand_written_cnn_matches_its_plain_twin_at_every_level():
    torch.manual_seed(0)
    net, x = FlexCNN(), torch.randn(4, 3, 8, 8)
    net.train()
    for level in range(3):  # batchnorm statistics per level
        net.set_level_use(level)
        net(x)
    net.eval()
    net.set_level_use(0)
    manager = fm.InMemoryDeltaManager(net)
    managed = manager.managed_model()
    for level in (2, 0, 1, 2):
        twin = PlainCNN([4, 8, 16][level]).eval()
        net.set_level_use(level)
        net.copy_to_base(twin)
        assert manager.move_to(level) is managed and count(managed) == count(twin)
        torch.testing.assert_close(managed(x), twin(x), rtol=0, atol=0)
        torch.testing.assert_close(net(x), twin(x), rtol=0, atol=0)
        assert managed.training is False and all(not m.training for m in managed.modules())
    net.set_level_use(1)
    twin = PlainCNN(8).eval()
    for p in twin.parameters():
        p.data.normal_()
    twin.stem[1].running_mean.normal_()
    net.load_from_base(twin)
    torch.testing.assert_close(net(x), twin(x), rtol=0, atol=0)
    assert torch.equal(net.gate, twin.gate)


def test_level_api_errors_say_what_to_do():
    class Mixed(fm.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = fm.Linear([2, 4], [4, 4]), fm.Linear([4, 4, 4], [4, 4, 4])

    with pytest.raises(td.DagError, match=r"same number of levels, found 'a': 2, 'b': 3"):
        Mixed().max_level()

    class Empty(fm.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2)

    with pytest.raises(td.DagError, match=r"holds no td\.flex layers"):
        Empty().set_level_use(0)
    net = FlexCNN()
    for bad in (3, -1, True, "1"):
        with pytest.raises(td.DagError, match=r"levels 0\.\.2"):
            net.set_level_use(bad)
    net.set_level_use(1)
    with pytest.raises(
        td.DagError,
        match=r"layer 'stem\.0', weight: the tensor has shape \(16, 3, 3, 3\) in the plain model and \(8, 3, 3, 3\)",
    ):
        net.load_from_base(PlainCNN(16))
    with pytest.raises(td.DagError, match=r"the plain model has no layer 'stem\.0'"):
        net.copy_to_base(nn.Linear(2, 2))
    plain = net.make_base_copy()
    net.set_level_use(2)
    _, up = net.export_level_delta()
    net.set_level_use(0)
    with pytest.raises(td.DagError, match=r"not at level 1: stem\.0\.weight has shape \[4, 3, 3, 3\]"):
        up.apply(net.make_base_copy())
    up.apply(plain)  # the right level still moves
    with pytest.raises(td.DagError, match="moves that model's plain copies"):
        up.apply(td.build_from_unstructured_module(nn.Sequential(nn.Linear(2, 2)), torch.randn(1, 2)))
    net.stem[0].set_level_use(2)
    assert net.current_level() is None
    with pytest.raises(td.DagError, match="set_level_use"):
        net.export_level_delta()


def test_a_hand_written_models_delta_survives_its_bytes():
    torch.manual_seed(0)
    net = FlexCNN().eval()
    net.set_level_use(0)
    plain = net.make_base_copy()
    net.set_level_use(1)
    _, up = net.export_level_delta()
    again = LevelDelta.from_bytes(up.to_bytes())
    assert again.tree
    again.apply(plain)
    expected = net.make_base_copy().state_dict()
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in expected.items())


@pytest.mark.parametrize("path", ["", "stem.0", "body.1", "a_b.c__d", "_x._d", "0.u_"])
def test_layer_names_are_one_to_one(path):
    name = layer_vertex(path)
    assert name.isidentifier() and layer_path(name) == path


def test_a_delta_file_of_one_layer_through_an_open_file(tmp_path):
    torch.manual_seed(0)
    conv = fm.Conv2d([3, 3], [4, 8], 3).eval()
    with open(tmp_path / "text.delta", "w") as text, pytest.raises(td.DagError, match=r"open\(name, 'wb'\)"):
        fm.FileDeltaManager.make_delta_file(text, conv)
    with open(tmp_path / "conv.delta", "wb") as file:
        fm.FileDeltaManager.make_delta_file(file, conv, starting_level=1)
    x = torch.randn(2, 3, 5, 5)
    with fm.file_delta_manager(tmp_path / "conv.delta") as manager:
        for level in (1, 0, 1):
            conv.set_level_use(level)
            torch.testing.assert_close(manager.move_to(level)(x), conv(x), rtol=0, atol=0)
