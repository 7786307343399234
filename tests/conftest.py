"""The two test tiers: `pytest -m "not slow"` is the fast one, `pytest -m slow` the rest; CI runs both.

A test that takes more than ~3.5 s on the 2-core CI machine is `slow`. A whole test function is marked
where it is defined (`@pytest.mark.slow`); single slow cases of otherwise fast parametrized tests are
listed in SLOW_CASES here, so that the parameter lists (which benchmarks read too) stay plain data.
"""

from __future__ import annotations

import pytest

# test function (node id) -> the ids of its slow parametrized cases
SLOW_CASES: dict[str, set[str]] = {
    "tests/test_timm.py::test_timm_model": {
        "beit_base_patch16_224",
        "cait_xxs24_224",
        "swinv2_cr_tiny_ns_224",
        "ghostnet_100",
        "inception_v3",
        "efficientnet_lite0",
        "swin_tiny_patch4_window7_224",
        "rexnet_100",
        "efficientformer_l1",
        "mobilevit_xxs",
        "levit_128s",
        "mixer_s16_224",
        "fastvit_t8",
        "coatnet_nano_rw_224",
        "hrnet_w18_small",
        "hgnetv2_b0",
        "repvgg_a0",
        "mobileone_s0",
    },
    "tests/test_passes.py::test_preserving_pass": {
        *(
            f"{name}-timm-swin_tiny_patch4_window7_224"
            for name in (
                "remove_identities",
                "remove_dead",
                "dedupe_constants",
                "fold_batchnorm",
                "nest_by_module",
                "nest_then_flatten",
            )
        ),
        "fold_batchnorm-timm-efficientnet_b0",
        "nest_by_module-timm-efficientnet_b0",
        "nest_by_module-timm-vit_tiny_patch16_224",
        "nest_then_flatten-timm-vit_tiny_patch16_224",
        "dedupe_constants-timm-vit_tiny_patch16_224",
        "remove_dead-timm-vit_tiny_patch16_224",
        "nest_by_module-timm-convnext_atto",
        "fold_batchnorm-timm-convnext_atto",
        "nest_by_module-timm-mobilenetv3_small_100",
        "fold_batchnorm-timm-mobilenetv3_small_100",
    },
    "tests/test_pruning.py::test_prune_reaches_the_flops_target": {
        "random-regnety_002-96",
        "random-mobilenetv3_small_100-96",
    },
    "tests/test_pruning.py::test_pruning_zeroed_heads_keeps_outputs": {"swin-head_dim", "swin-heads"},
    "tests/test_export.py::test_hugging_face_models_convert_save_and_load": {"bert"},
    "tests/test_onnx.py::test_zoo_model": {"squeeze_excite"},
}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the cases of SLOW_CASES slow; a listed case that no longer exists is an error (when its test
    was collected whole: not when the command line names single cases)."""
    found: dict[str, set[str]] = {}
    for item in items:
        function, _, _ = item.nodeid.partition("[")
        case = item.callspec.id if hasattr(item, "callspec") else None
        found.setdefault(function, set()).add(case)
        if case in SLOW_CASES.get(function, ()):
            item.add_marker(pytest.mark.slow)
    if any("[" in arg for arg in config.args):
        return
    stale = {
        f"{function}[{case}]"
        for function, cases in SLOW_CASES.items()
        if function in found
        for case in cases - found[function]
    }
    if stale:
        raise pytest.UsageError(
            f"tests/conftest.py SLOW_CASES lists cases that do not exist: {sorted(stale)}"
        )
