"""`PruneReport` says what pruning did group by group and layer by layer, and why a target was missed:
the fixed groups, widest first, with their reasons and share of the FLOPs. Unknown protected names raise."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn

import torch_dag as td
from torch_dag.core.errors import DagError
from torch_dag.pruning import PruneConfig, PruneReport, channel_groups, prune
from torch_dag.pruning.report import layer_widths


class FixedMiddle(nn.Module):
    """A residual stem, then two 48-channel layers behind ops without a channel rule (cumsum over the
    channels): `mid` holds most of the FLOPs and can never narrow, so a low target is out of reach."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.conv1 = nn.Conv2d(16, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.wide = nn.Conv2d(16, 48, 1)
        self.mid = nn.Conv2d(48, 48, 3, padding=1)
        self.narrow = nn.Conv2d(48, 8, 1)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.conv2(torch.relu(self.bn1(self.conv1(x))))
        y = self.narrow(self.mid(self.wide(x).cumsum(1)).cumsum(1)).relu()
        return self.head(nn.functional.adaptive_avg_pool2d(y, 1).flatten(1))


# the vertices whose weights carry each group's channels (written or read), by the model's structure
MEMBERS = {
    "stem_0": ["stem_0", "stem_1", "conv1", "conv2", "wide"],
    "conv1": ["conv1", "bn1", "conv2"],
    "wide": ["wide"],
    "mid": ["mid"],
    "narrow": ["narrow", "head"],
    "head": ["head"],
}


@pytest.fixture(scope="module")
def fixed_middle() -> tuple[td.DagModule, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(1, 3, 16, 16)
    return td.build_from_unstructured_module(FixedMiddle().eval(), (x,)), x


@pytest.fixture(scope="module")
def half(fixed_middle) -> tuple[td.DagModule, PruneReport]:
    """The model pruned to half its FLOPs, and the report."""
    dag, x = fixed_middle
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the rounding may give way: not what these tests are about
        return prune(dag, 0.5, (x,), return_report=True)


def _widths(module: nn.Module) -> tuple[int, int]:
    """A layer's (in, out) channels from its constructor attributes: the oracle for the layer rows."""
    if isinstance(module, nn.Conv2d):
        return module.in_channels, module.out_channels
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    assert isinstance(module, nn.BatchNorm2d)
    return module.num_features, module.num_features


def test_every_group_is_listed_with_its_kept_width_and_share(fixed_middle, half):
    (dag, x), (pruned, report) = fixed_middle, half
    groups = channel_groups(dag, (x,)).groups()
    assert [row.producers for row in report.group_rows] == [tuple(g.producers) for g in groups]
    assert [row.reasons for row in report.group_rows] == [tuple(g.reasons) for g in groups]
    flops = td.count_flops(dag, x)
    for row in report.group_rows:
        assert row.width == _widths(dag[row.producers[0]].module)[1]
        for producer in row.producers:  # every producer of a group keeps the group's width
            out = _widths(pruned[producer].module)[1]
            assert out == row.kept, (row, producer)
        expected = sum(flops.flops[n] for n in MEMBERS[row.producers[0]]) / flops.total_flops
        assert row.flops_share == pytest.approx(expected)
    assert report.narrowed == sum(1 for r in report.group_rows if r.prunable and r.kept < r.width)
    assert report.groups == len(report.group_rows) and report.prunable == 3


def test_every_layer_is_listed_with_its_widths_before_and_after(fixed_middle, half):
    (dag, _), (pruned, report) = fixed_middle, half
    layers = [v.name for v in dag if isinstance(v.module, (nn.Conv2d, nn.Linear, nn.BatchNorm2d))]
    assert [row.vertex for row in report.layer_rows] == layers
    for row in report.layer_rows:
        assert row.before == _widths(dag[row.vertex].module)
        assert row.after == _widths(pruned[row.vertex].module)
        assert row.op == dag[row.vertex].op
    assert layer_widths(dag["cumsum"].module) is None


def test_str_is_a_summary_and_table_lists_everything(fixed_middle, half):
    _, report = half
    assert "\n" not in str(report) and str(report).startswith("FLOPs ratio ")
    table = report.table()
    assert table.splitlines()[0] == str(report)
    for row in report.group_rows:
        line = next(line for line in table.splitlines() if line.startswith(f"  {row.name} "))
        assert f"{row.width:d} -> " in line and (row.prunable or row.reasons[0] in line)
    for row in report.layer_rows:
        assert any(line.startswith(f"  {row.vertex} ") for line in table.splitlines())
    with pytest.raises(AttributeError):  # frozen
        report.reached = 1.0  # type: ignore[misc]


def test_a_missed_target_names_the_fixed_groups_widest_first(fixed_middle):
    dag, x = fixed_middle
    with pytest.warns(UserWarning, match=r"ratio reached is 0\.\d+, outside 0\.300 \+- 0\.020") as caught:
        _, report = prune(dag, 0.3, (x,), return_report=True)
    message = str(caught[0].message)
    flops = td.count_flops(dag, x)
    mid_share = flops.flops["mid"] / flops.total_flops
    assert report.missed and report.reached > 0.3 + 0.02
    assert (
        f"mid (48 channels, {mid_share:.0%} of the FLOPs): cumsum_1: no channel rule for op cumsum" in message
    )
    assert "wide (48 channels" in message and "head (10 channels" in message
    # widest first; of equal widths the one with more FLOPs
    assert message.index("mid (48") < message.index("wide (48") < message.index("head (10")
    assert "3 of 6 channel groups are fixed" in message and "few, wide channels" not in message
    assert report.why() in message
    # the floor the message gives is what the FLOP model predicts at every prunable group's narrowest
    floor = float(re.search(r"the FLOPs ratio is about (\d\.\d+)", message).group(1))
    assert floor == pytest.approx(report.floor, abs=1e-3) and floor > 0.3


def test_a_met_target_has_no_why(fixed_middle):
    dag, x = fixed_middle
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, report = prune(dag, 0.9, (x,), return_report=True)
    assert not report.missed and report.why() == ""


def test_unknown_protected_names_raise_with_the_closest_names(fixed_middle):
    dag, x = fixed_middle
    with pytest.raises(DagError, match=r"'conv3': closest 'conv[12]', 'conv[12]'") as raised:
        prune(dag, 0.5, (x,), protected=["conv1", "conv3", "nothing_like_it_at_all"])
    assert "'nothing_like_it_at_all': nothing close" in str(raised.value)
    with pytest.raises(DagError, match="a list of vertex names"):
        prune(dag, 0.5, (x,), protected="conv1")
    with pytest.raises(DagError, match="'conv3': closest"):  # every pass that reads channel groups
        td.make_flexible(dag, (0.5, 1.0), (x,), protected=["conv3"])


def test_a_protected_vertex_keeps_its_group_and_says_so(fixed_middle):
    dag, x = fixed_middle
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruned, report = prune(dag, 0.6, (x,), protected=["conv1"], config=PruneConfig(), return_report=True)
    (row,) = [r for r in report.group_rows if r.producers == ("conv1",)]
    assert row.reasons == ("conv1: protected",) and row.kept == row.width
    assert pruned["conv1"].module.out_channels == 16
