"""A fixed sample of timm families: convert, equal outputs, bitwise round trip, FLOPs agree with fvcore.

The whole zoo is swept by benchmarks/timm_coverage.py; this sample keeps CI fast.
"""

from __future__ import annotations

import pytest
import torch

import torch_dag as td
from torch_dag.core.compare import bitwise_equal, compare_outputs

timm = pytest.importorskip("timm")

# (name, input size): small members of different families, at small inputs where the model allows
SAMPLE = [
    ("resnet18", 96),
    ("resnet50", 64),
    ("resnext26ts", 64),
    ("resnest14d", 64),
    ("seresnext26d_32x4d", 64),
    ("mobilenetv3_small_100", 96),
    ("mobilenetv2_050", 96),
    ("efficientnet_b0", 96),
    ("tf_efficientnet_b0", 96),
    ("efficientnet_lite0", 96),
    ("ghostnet_100", 96),
    ("rexnet_100", 96),
    ("lcnet_050", 96),
    ("regnetx_002", 96),
    ("regnety_002", 96),
    ("densenet121", 64),
    ("dla34", 64),
    ("dpn48b", 64),
    ("cspresnet50", 64),
    ("hrnet_w18_small", 64),
    ("inception_v3", 128),
    ("repvgg_a0", 64),
    ("convnext_atto", 64),
    ("edgenext_xx_small", 64),
    ("poolformer_s12", 64),
    ("mobilevit_xxs", 64),
    ("efficientformer_l1", 224),
    ("fastvit_t8", 64),
    ("efficientvit_b0", 64),
    ("mobileone_s0", 64),
    ("vit_tiny_patch16_224", 224),
    ("deit_tiny_distilled_patch16_224", 224),
    ("cait_xxs24_224", 224),
    ("xcit_nano_12_p16_224", 224),
    ("pit_ti_224", 224),
    ("levit_128s", 224),
    ("beit_base_patch16_224", 224),
    ("swin_tiny_patch4_window7_224", 224),
    ("swinv2_cr_tiny_ns_224", 224),
    ("mixer_s16_224", 224),
    ("coatnet_nano_rw_224", 224),
    ("maxvit_nano_rw_256", 256),
    ("tiny_vit_5m_224", 224),
    ("pvt_v2_b0", 224),
    ("twins_svt_small", 224),
    ("crossvit_tiny_240", 240),
    ("nfnet_l0", 64),
    ("sequencer2d_s", 224),
    ("hgnetv2_b0", 64),
    ("ese_vovnet19b_dw", 64),
]


@pytest.fixture(scope="module")
def fvcore():
    return pytest.importorskip("fvcore.nn")


@pytest.mark.parametrize(("name", "size"), SAMPLE, ids=[n for n, _ in SAMPLE])
def test_timm_model(name, size, tmp_path):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        reference = model(x)
    dag = td.build_from_unstructured_module(model, (x,))
    td.verify(dag)
    with torch.no_grad():
        out = dag(x)
    equal, _, reason = compare_outputs(reference, out)
    assert equal, reason
    loaded = td.load(td.save(dag, tmp_path / "model.dag"))
    with torch.no_grad():
        assert bitwise_equal(out, loaded(x))
