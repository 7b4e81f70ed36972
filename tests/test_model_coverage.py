"""The coverage table's fast subset: a timm ResNet, a mean-pooled timm ViT and a Hugging Face
ConvNeXt, random weights, saved and loaded as users do, each certified at 100% agreement."""
import sys
from pathlib import Path

import pytest

pytest.importorskip("timm")
pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import model_coverage  # noqa: E402


@pytest.mark.slow
def test_fast_subset_certifies_exactly():
    cases = [c for c in model_coverage.CASES if c.fast]
    assert [c.family for c in cases] == ["timm ResNet", "timm ViT (avg pool)", "HF ConvNeXt"]
    rows = model_coverage.run_cases(cases, log=lambda line: None)
    for row in rows:
        assert row.verdict in ("exact", "exact-after-folding"), (row.label, row.reason)
        assert row.agreement == 1.0, row.label
        assert row.max_logit_diff < 1e-3, row.label
    assert [r.verdict for r in rows] == ["exact", "exact-after-folding", "exact-after-folding"]


def test_every_listed_timm_family_has_a_case():
    families = " ".join(c.family for c in model_coverage.CASES)
    for family in ("ResNet", "ResNet-D", "ResNetV2", "ConvNeXt", "EfficientNet", "EfficientNetV2", "RegNet",
                   "DenseNet", "MobileNetV2", "MobileNetV3", "ViT", "DeiT", "EVA", "Swin"):
        assert f"timm {family}" in families, family
    for family in ("ResNet", "ConvNeXt", "ConvNeXtV2", "EfficientNet", "RegNet", "Swin", "ViT"):
        assert f"HF {family}" in families, family
