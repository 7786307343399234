"""The README's recipe for detectors: their post-processing (box decoding, NMS, per-image lists) depends on
the data, so the whole model does not convert; the part before it (backbone and neck) converts, prunes
and goes back into the detector."""

from __future__ import annotations

import pytest
import torch

import torch_dag as td
from torch_dag.core.errors import ConversionError

torchvision = pytest.importorskip("torchvision")


def _detector() -> torch.nn.Module:
    torch.manual_seed(0)
    detection = torchvision.models.detection
    # every box kept (random weights score low): the detections are then a real comparison
    model = detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, box_score_thresh=0.0
    )
    return model.eval()


@pytest.mark.slow
def test_whole_detector_fails_with_the_way_out() -> None:
    model = _detector()
    with pytest.raises(ConversionError, match=r"model.backbone \(BackboneWithFPN"):
        td.build_from_unstructured_module(model, ([torch.rand(3, 320, 320)],))


@pytest.mark.slow
def test_backbone_converts_prunes_and_goes_back() -> None:
    model = _detector()
    images = [torch.rand(3, 320, 320), torch.rand(3, 320, 320)]
    x = torch.randn(1, 3, 320, 320)

    dag = td.build_from_unstructured_module(model.backbone, x)
    with torch.no_grad():
        reference = model.backbone(x)
        converted = dag(x)
        assert list(converted) == list(reference)
        for name in reference:
            torch.testing.assert_close(converted[name], reference[name])
        expected = model(images)
        model.backbone = dag  # the detector runs with the DAG in place of its backbone, unchanged
        got = model(images)
    for e, g in zip(expected, got, strict=True):
        assert e["boxes"].shape[0] > 0
        torch.testing.assert_close(g["boxes"], e["boxes"])
        torch.testing.assert_close(g["scores"], e["scores"])

    small, report = td.prune(dag, 0.5, x, return_report=True)
    assert abs(report.reached - 0.5) <= 0.02
    with torch.no_grad():
        out = small(x)
        # the heads read the features: their widths stay, only the inside narrows
        assert {name: t.shape for name, t in out.items()} == {name: t.shape for name, t in reference.items()}
        model.backbone = small
        detections = model(images)
    assert len(detections) == 2
    assert all(d["boxes"].shape[1] == 4 and torch.isfinite(d["boxes"]).all() for d in detections)
