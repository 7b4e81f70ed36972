"""Preprocessing equals the reference pipelines of torchvision, timm and Hugging Face to 1e-5 per pixel."""
import math

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from phpn.errors import ConfigError
from phpn.images.preprocess import Preprocess
from phpn.models import zoo

skimage_data = pytest.importorskip("skimage.data")


def _photos():
    """Real photos at sizes whose resize and crop offsets are not whole numbers."""
    return [
        Image.fromarray(skimage_data.astronaut()).resize((640, 427)),
        Image.fromarray(skimage_data.chelsea()),  # 451x300
        Image.fromarray(skimage_data.coffee()).resize((333, 517)),
    ]


def _max_diff(ours: Preprocess, reference) -> float:
    return max(float((ours(im) - reference(im)).abs().max()) for im in _photos())


def test_resize_rounds_like_torchvision():
    pre = Preprocess(resize=232, crop=224)
    assert pre.resized_size(640, 427) == (347, 232)
    assert pre.resized_size(427, 640) == (232, 347)
    assert pre.crop_box(347, 232) == (62, 4)  # round(61.5) = 62, as torchvision's CenterCrop
    assert Preprocess(resize=232, crop=224, crop_offset="floor").crop_box(347, 232) == (61, 4)
    photo = _photos()[0]
    reference = torchvision.transforms.Resize(232)(photo)
    assert reference.size == (347, 232)
    assert pre(photo).shape == (3, 224, 224)


@pytest.mark.parametrize("weights", [
    torchvision.models.ResNet50_Weights.IMAGENET1K_V1,
    torchvision.models.ResNet50_Weights.IMAGENET1K_V2,
    torchvision.models.Swin_T_Weights.IMAGENET1K_V1,
    torchvision.models.EfficientNet_B0_Weights.IMAGENET1K_V1,
])
def test_equals_torchvision_weights_transforms(weights):
    ours = zoo._weights_preprocess(weights)
    assert _max_diff(ours, weights.transforms()) < 1e-5


def test_torchvision_weights_told_by_the_file_hash():
    v1, v2 = torchvision.models.ResNet50_Weights.IMAGENET1K_V1, torchvision.models.ResNet50_Weights.IMAGENET1K_V2
    pre, notes = zoo.default_preprocess_with_notes("resnet50", sha256="0676ba61" + "0" * 56)
    assert pre.resize == 256 and "IMAGENET1K_V1" in notes[0]
    pre, notes = zoo.default_preprocess_with_notes("resnet50", sha256="11ad3fa6" + "0" * 56)
    assert pre.resize == 232 and "IMAGENET1K_V2" in notes[0]
    pre, notes = zoo.default_preprocess_with_notes("resnet50", sha256="f" * 64)  # a fine-tuned file: DEFAULT, said
    assert pre.resize == v2.transforms().resize_size[0]
    assert any("IMAGENET1K_V1: resize 256" in n for n in notes)
    assert v1.transforms().resize_size[0] == 256


@pytest.mark.parametrize("name", ["convnext_tiny", "vit_small_patch16_224", "resnet50", "efficientnet_b0",
                                  "deit_small_patch16_224"])
def test_equals_timm_create_transform(name):
    timm = pytest.importorskip("timm")
    from timm.data import create_transform, resolve_data_config

    from phpn.models import timm_models

    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    cfg = resolve_data_config({}, model=model)
    ours, notes = timm_models.preprocess_of(model, name)
    assert notes[0].startswith("preprocessing: resize shorter side to")
    assert ours.resize == math.floor(cfg["input_size"][-1] / cfg["crop_pct"])
    assert ours.mean == tuple(cfg["mean"]) and ours.interpolation == cfg["interpolation"]
    assert _max_diff(ours, create_transform(**cfg)) < 1e-5


def test_timm_squash_mode():
    pytest.importorskip("timm")
    from timm.data import create_transform

    from phpn.models import timm_models

    cfg = {"input_size": (3, 224, 224), "interpolation": "bilinear", "mean": (0.5,) * 3, "std": (0.5,) * 3,
           "crop_pct": 0.9, "crop_mode": "squash"}
    ours, _ = timm_models.preprocess_from_config(cfg, "test")
    assert ours.resize_mode == "square" and ours.resize == 248
    assert _max_diff(ours, create_transform(**cfg)) < 1e-5


def _hf_processors():
    transformers = pytest.importorskip("transformers")
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    return [
        transformers.ConvNextImageProcessor(size={"shortest_edge": 224}, crop_pct=0.875, image_mean=mean,
                                            image_std=std),
        transformers.ConvNextImageProcessorPil(size={"shortest_edge": 224}, crop_pct=0.875),
        transformers.ConvNextImageProcessor(size={"shortest_edge": 384}),  # warps to a square
        transformers.ViTImageProcessor(),
        transformers.ViTImageProcessorPil(),
        transformers.EfficientNetImageProcessor(),  # divides by std twice (include_top)
        transformers.EfficientNetImageProcessor(rescale_offset=True, do_center_crop=True),
    ]


@pytest.mark.parametrize("index", range(7))
def test_equals_hugging_face_image_processor(index):
    from phpn.models import hf

    processor = _hf_processors()[index]
    settings = {**processor.to_dict(), "image_processor_type": type(processor).__name__}
    ours, notes = hf.preprocess_from_processor(settings, "test")
    assert notes == []
    assert ours.backend == ("pil" if type(processor).__name__.endswith("Pil") else "tensor")

    def reference(im):
        return processor(im, return_tensors="pt")["pixel_values"][0]

    assert _max_diff(ours, reference) < 1e-5


def test_the_two_resize_backends_differ_only_by_rounding():
    # Pillow and torch's uint8 antialiased resize differ by one grey level on a few pixels:
    # that is why each model gets the backend its reference pipeline uses.
    photo = _photos()[0]
    a = np.asarray(Preprocess(resize=232, crop=224).geometry(photo), dtype=int)
    b = np.asarray(Preprocess(resize=232, crop=224, backend="tensor").geometry(photo), dtype=int)
    assert np.abs(a - b).max() == 1
    assert 0 < (a != b).mean() < 0.01


def test_recorded_form_round_trips_and_old_runs_still_load():
    pre = Preprocess(resize=73, crop=64, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bicubic",
                     resize_mode="square", backend="tensor", crop_offset="floor", source="somewhere")
    d = pre.to_dict()
    assert Preprocess.from_dict(d) == pre and Preprocess.from_dict(d).source == "somewhere"
    old = {"resize": 256, "crop": 224, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "channels": 3}
    assert Preprocess.from_dict(old) == Preprocess()
    assert Preprocess(source="a") == Preprocess(source="b")  # the same numbers are the same preprocessing


@pytest.mark.parametrize("field,value,message", [
    ("resize_mode", "stretch", "Unknown resize mode 'stretch'."),
    ("backend", "cv2", "Unknown resize backend 'cv2'."),
    ("crop_offset", "ceil", "Unknown crop offset 'ceil'."),
])
def test_bad_settings_are_refused(field, value, message):
    with pytest.raises(ConfigError) as err:
        Preprocess(**{field: value})
    assert err.value.problem == message
