"""Which timm and Hugging Face classifiers phpn decomposes: one representative per family.

Each model is built with random weights and 10 classes (nothing is downloaded), saved the way
its users save it (a bare state dict in a .safetensors file; a save_pretrained folder), loaded
back through phpn exactly as the CLI does, and diagnosed. Decomposable ones are then
discovered (k=3) and certified on a small batch of synthetic images the models have never
seen. Prints a markdown table: family, model, verdict, agreement, max |Δlogit|, reason.

    python scripts/model_coverage.py            # the table (a few minutes on a CPU)
    python scripts/model_coverage.py --fast     # the subset the tests check
    python scripts/model_coverage.py --family VGG --family LeViT   # only those families
    python scripts/model_coverage.py --write-index   # regenerate phpn/models/timm_index.json

The index lets phpn name a timm architecture from a state dict's keys and shapes; rebuild it
after upgrading timm (it builds every model of the indexed families on the meta device).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from phpn.api import open_data, open_model, run_discovery  # noqa: E402
from phpn.errors import PhpnError  # noqa: E402
from phpn.pipeline.discover import DiscoveryConfig  # noqa: E402

NUM_CLASSES = 10


@dataclass
class Case:
    family: str
    label: str  # what is built, as a user would name it
    save: Callable  # folder -> (checkpoint path, arch to pass or None)
    size: int  # input crop: small where the model allows it
    fast: bool = False  # in the subset the tests run


@dataclass
class Row:
    family: str
    label: str
    verdict: str
    agreement: Optional[float] = None
    max_logit_diff: Optional[float] = None
    max_abs_logit: Optional[float] = None
    reason: str = ""
    notes: list = field(default_factory=list)
    seconds: float = 0.0

    def markdown(self) -> str:
        agreement = f"{self.agreement:.0%}" if self.agreement is not None else "–"
        diff = f"{self.max_logit_diff:.1e}" if self.max_logit_diff is not None else "–"
        scale = f"{self.max_abs_logit:.2g}" if self.max_abs_logit is not None else "–"
        return f"| {self.family} | {self.label} | {self.verdict} | {agreement} | {diff} | {scale} | {self.reason} |"


# ----------------------------------------------------------------------------- what is built


def _no_zero_weights(model: torch.nn.Module) -> torch.nn.Module:
    """Libraries zero-initialise some layers (a classifier, the last norm of residual blocks), which
    makes every logit 0 or nearly so; random values there make the agreement mean something."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.is_floating_point() and not param.any():
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    return model


def _timm(name: str, by_name: bool = True, **kwargs) -> Callable:
    """Save a random-init timm model's state dict; phpn gets --arch timm/NAME (or infers it)."""

    def save(folder: Path):
        import timm
        from safetensors.torch import save_file

        torch.manual_seed(0)
        model = _no_zero_weights(timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, **kwargs).eval())
        path = folder / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        return path, (f"timm/{name}" if by_name else None)

    return save


def _hf(config_name: str, model_name: str, processor: Optional[Callable] = None, **config) -> Callable:
    """A random-init transformers classifier written with save_pretrained (and its processor)."""

    def save(folder: Path):
        import transformers

        torch.manual_seed(0)
        labels = {i: f"class {i}" for i in range(NUM_CLASSES)}
        cfg = getattr(transformers, config_name)(num_labels=NUM_CLASSES, id2label=labels,
                                                 label2id={v: k for k, v in labels.items()}, **config)
        model = _no_zero_weights(getattr(transformers, model_name)(cfg).eval())
        out = folder / model_name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.save_pretrained(out)
            if processor is not None:
                processor(transformers).save_pretrained(out)
        return out, None

    return save


_SMALL_STAGES = dict(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 2, 1])
_CONVNEXT_PROCESSOR = (lambda t: t.ConvNextImageProcessor(size={"shortest_edge": 64}, crop_pct=0.875))

CASES = [
    Case("timm ResNet", "resnet18 (--arch timm/resnet18)", _timm("resnet18"), 64, fast=True),
    Case("timm ResNet", "resnet50", _timm("resnet50"), 64),
    Case("timm ResNet-D", "resnet26d (inferred)", _timm("resnet26d", by_name=False), 64),
    Case("timm ResNetV2", "resnetv2_50 (inferred)", _timm("resnetv2_50", by_name=False), 64),
    Case("timm ConvNeXt", "convnext_atto (inferred)", _timm("convnext_atto", by_name=False), 64),
    Case("timm ConvNeXt", "convnext_tiny", _timm("convnext_tiny"), 64),
    Case("timm EfficientNet", "efficientnet_b0", _timm("efficientnet_b0"), 64),
    Case("timm EfficientNetV2", "efficientnetv2_rw_t", _timm("efficientnetv2_rw_t"), 64),
    Case("timm RegNet", "regnetx_002 (inferred)", _timm("regnetx_002", by_name=False), 64),
    Case("timm DenseNet", "densenet121", _timm("densenet121"), 64),
    Case("timm MobileNetV2", "mobilenetv2_050", _timm("mobilenetv2_050"), 64),
    Case("timm MobileNetV3", "mobilenetv3_small_050", _timm("mobilenetv3_small_050"), 64),
    Case("timm MobileNetV4", "mobilenetv4_conv_small", _timm("mobilenetv4_conv_small"), 64),
    Case("timm VGG", "vgg11", _timm("vgg11"), 32),
    Case("timm LeViT", "levit_128s", _timm("levit_128s"), 224),
    Case("timm ViT (avg pool)", "vit_tiny_patch16_224, global_pool='avg'",
         _timm("vit_tiny_patch16_224", global_pool="avg"), 224, fast=True),
    Case("timm ViT (avg pool)", "vit_small_patch16_224, global_pool='avg'",
         _timm("vit_small_patch16_224", global_pool="avg"), 224),
    Case("timm ViT (class token)", "vit_tiny_patch16_224", _timm("vit_tiny_patch16_224"), 224),
    Case("timm DeiT (avg pool)", "deit_tiny_patch16_224, global_pool='avg'",
         _timm("deit_tiny_patch16_224", global_pool="avg"), 224),
    Case("timm DeiT (distilled)", "deit_tiny_distilled_patch16_224", _timm("deit_tiny_distilled_patch16_224"), 224),
    Case("timm EVA (avg pool)", "eva02_tiny_patch14_224, global_pool='avg'",
         _timm("eva02_tiny_patch14_224.mim_in22k", global_pool="avg"), 224),
    Case("timm Swin", "swin_tiny_patch4_window7_224", _timm("swin_tiny_patch4_window7_224"), 224),
    Case("HF ResNet", "ResNetForImageClassification", _hf("ResNetConfig", "ResNetForImageClassification",
                                                          embedding_size=16, **_SMALL_STAGES), 64),
    Case("HF ConvNeXt", "ConvNextForImageClassification",
         _hf("ConvNextConfig", "ConvNextForImageClassification", _CONVNEXT_PROCESSOR, **_SMALL_STAGES), 64,
         fast=True),
    Case("HF ConvNeXtV2", "ConvNextV2ForImageClassification",
         _hf("ConvNextV2Config", "ConvNextV2ForImageClassification", **_SMALL_STAGES), 64),
    Case("HF EfficientNet", "EfficientNetForImageClassification",
         _hf("EfficientNetConfig", "EfficientNetForImageClassification", image_size=64), 64),
    Case("HF RegNet", "RegNetForImageClassification",
         _hf("RegNetConfig", "RegNetForImageClassification", embedding_size=16, groups_width=8, **_SMALL_STAGES),
         64),
    Case("HF Swin", "SwinForImageClassification",
         _hf("SwinConfig", "SwinForImageClassification", embed_dim=16, depths=[1, 1], num_heads=[1, 2],
             image_size=64, window_size=4), 64),
    Case("HF ViT", "ViTForImageClassification",
         _hf("ViTConfig", "ViTForImageClassification", hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
             intermediate_size=64, image_size=64, patch_size=16), 64),
    Case("HF DeiT", "DeiTForImageClassification",
         _hf("DeiTConfig", "DeiTForImageClassification", hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
             intermediate_size=64, image_size=64, patch_size=16), 64),
    Case("HF BEiT (mean-pooled)", "BeitForImageClassification",
         _hf("BeitConfig", "BeitForImageClassification", hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
             intermediate_size=64, image_size=64, patch_size=16, use_mean_pooling=True), 64),
]


# ----------------------------------------------------------------------------- checking


def synthetic_images(root: Path, per_class: int = 2, size: int = 96, seed: int = 0) -> Path:
    """Smooth random colour fields, ``per_class`` per class folder (0..9): images no model saw."""
    rng = np.random.default_rng(seed)
    for c in range(NUM_CLASSES):
        (root / str(c)).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            low = rng.uniform(0, 255, size=(6, 6, 3))
            img = Image.fromarray(low.astype(np.uint8)).resize((size + 17 * i, size), Image.BICUBIC)
            img.save(root / str(c) / f"{i}.png")
    return root


def check(case: Case, workdir: Path, images: Path) -> Row:
    """Save, load through phpn, diagnose, and (when decomposable) discover + certify."""
    start = time.perf_counter()
    folder = workdir / case.label.split(" ")[0].replace("/", "_")
    folder.mkdir(parents=True, exist_ok=True)
    path, arch = case.save(folder)
    try:
        session = open_model(path, arch=arch, overrides={"resize": case.size, "crop": case.size})
    except PhpnError as err:
        return Row(case.family, case.label, "not loaded", reason=str(err), seconds=time.perf_counter() - start)
    d = session.diagnosis
    row = Row(case.family, case.label, d.verdict, reason=_short_reason(d.reason, d.decomposable),
              notes=list(session.loaded.notes))
    if d.decomposable:
        data = open_data(session, images)
        _, h, w = d.feature_shape
        if h * w == 1:
            row.reason += f" Its feature map is 1x1 at {case.size} px: prototypes say what, their where-maps have one cell."
        # Two images a class: a 1x1 feature map (VGG) gives two feature vectors, room for k = 2 parts.
        config = DiscoveryConfig(k=3 if 2 * h * w >= 3 else 2, images_per_class=None, device="cpu", batch_size=8)
        run = run_discovery(session, data, config, certify_images=True)
        cert = run.meta["certificate"]
        row.agreement, row.max_logit_diff = float(cert["top1_agreement"]), float(cert["max_logit_diff"])
        row.max_abs_logit = float(cert["max_abs_logit"])
    row.seconds = time.perf_counter() - start
    return row


def _short_reason(text: str, decomposable: bool) -> str:
    """What the doctor found: its first clause for a yes, the whole first sentence for a refusal."""
    sentence = text.split(". ")[0].rstrip(".")
    if decomposable:
        sentence = sentence.split(", so ")[0].split(": each logit")[0]
    return sentence.replace("|", "/") + "."


def run_cases(cases: list, log=print) -> list:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        images = synthetic_images(Path(tmp) / "images")
        for case in cases:
            try:
                row = check(case, Path(tmp) / "models", images)
            except ImportError as exc:  # timm or transformers missing
                row = Row(case.family, case.label, "skipped", reason=f"{exc}")
            rows.append(row)
            log(row.markdown() + f"  <!-- {row.seconds:.1f} s -->")
    return rows


TABLE_HEADER = ("| family | model (random weights, 10 classes) | verdict | agreement | max abs Δlogit | max abs logit "
                "| reason |\n|---|---|---|---|---|---|---|")


def write_index(path: Path) -> None:
    import timm

    from phpn.models import timm_models

    models: dict = {}
    heads: set = set()
    others: set = set()
    for module in timm_models.FAMILIES.values():
        start = time.perf_counter()
        for fp, entries in timm_models.index_entries(module, heads, others).items():
            models.setdefault(fp, []).extend(entries)
        print(f"{module}: {len(timm.list_models(module=module))} models, {time.perf_counter() - start:.0f} s",
              file=sys.stderr)
    index = {"timm_version": timm.__version__, "head_weights": sorted(heads), "other_class_keys": sorted(others),
             "models": models}
    path.write_text(json.dumps(index, sort_keys=True, separators=(",", ":")) + "\n", encoding="utf-8")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fast", action="store_true", help="only the subset the tests run")
    parser.add_argument("--family", action="append", default=[],
                        help="only the cases whose family contains this text (repeatable)")
    parser.add_argument("--write-index", action="store_true", help="regenerate phpn/models/timm_index.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.write_index:
        from phpn.models.timm_models import INDEX_PATH

        write_index(INDEX_PATH)
        return 0
    print(TABLE_HEADER)
    run_cases([c for c in CASES if (c.fast or not args.fast)
               and (not args.family or any(f.lower() in c.family.lower() for f in args.family))])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
