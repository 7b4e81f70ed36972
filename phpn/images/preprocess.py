"""Preprocessing: a picture in, the tensor the model reads out (resize, crop, colour,
normalisation, as the model was evaluated with), and robust decoding of one image file."""
from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from phpn.config import COLOURS, INTERPOLATIONS
from phpn.errors import ConfigError, DataError
from phpn.validation import check_finite, check_input_side

# Guard against decompression bombs: larger images are refused with a clear message.
MAX_IMAGE_PIXELS = 100_000_000
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS


# "shorter": the shorter side becomes ``resize`` and the aspect ratio is kept (torchvision, timm's
# default crop mode, Hugging Face's shortest_edge); "square": both sides become ``resize`` (Hugging
# Face's height/width sizes, timm's "squash" crop mode).
RESIZE_MODES = ("shorter", "square")
# Where the resize runs. "pil": Pillow's resize of the 8-bit image (timm's and Hugging Face's PIL
# transforms); "tensor": torchvision's antialiased resize of the uint8 tensor (torchvision's weights'
# transforms, Hugging Face's default image processors). The two differ by one grey level on a few
# pixels, so each model gets the one it was evaluated with.
BACKENDS = ("pil", "tensor")
# The centre crop's offset (size - crop) / 2 when it is not whole: torchvision and timm round it,
# Hugging Face's image processors floor it.
CROP_OFFSETS = ("round", "floor")
# Where JPEG files are decoded (defaults.DECODE is the default). "cpu": Pillow, in the decoding
# workers; "gpu": the workers only read the files' bytes, and the model's CUDA device decodes a
# batch at a time (nvJPEG) and resizes, crops and normalises it there; "auto": "gpu" when the
# model runs on CUDA, else "cpu". Other files (PNG, CMYK or EXIF-rotated JPEGs, ...) take the CPU
# path either way.


def _interpolation_mode(name: str):
    return InterpolationMode(name)


@dataclass(frozen=True)
class Preprocess:
    """Resize, centre-crop, then normalise per channel: torchvision's ``Resize`` + ``CenterCrop``.

    Sizes round as torchvision (and so timm and Hugging Face) do: a 640x427 photo resized to a
    shorter side of 232 becomes 347x232 (the longer side is truncated), and the crop's offset
    is ``round((size - crop) / 2)``.
    """

    resize: int = 256
    crop: int = 224
    mean: tuple = (0.485, 0.456, 0.406)
    std: tuple = (0.229, 0.224, 0.225)
    channels: int = 3
    interpolation: str = "bilinear"  # of the resize: bilinear, bicubic or nearest (as the model was trained)
    resize_mode: str = "shorter"  # see RESIZE_MODES
    backend: str = "pil"  # see BACKENDS
    crop_offset: str = "round"  # see CROP_OFFSETS
    colour: str = "rgb"  # see COLOURS
    # Where these values came from (e.g. "timm pretrained_cfg of convnext_tiny"), shown to the user;
    # not part of equality: the same numbers are the same preprocessing.
    source: str = field(default="", compare=False)

    def __post_init__(self):
        if self.channels not in (1, 3):
            raise ConfigError(f"channels must be 1 or 3, got {self.channels}.", "Use 1 for grey-scale models, 3 for RGB.")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ConfigError(
                f"mean and std need {self.channels} values each (one per input channel), "
                f"got {len(self.mean)} and {len(self.std)}.",
                "Pass --mean and --std with one number per channel.",
            )
        check_finite("mean", self.mean), check_finite("std", self.std)
        if any(s <= 0 for s in self.std):
            raise ConfigError("std values must be positive.", "Check --std.")
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(f"Unknown interpolation '{self.interpolation}'.",
                              f"Use one of: {', '.join(INTERPOLATIONS)}.")
        if self.resize_mode not in RESIZE_MODES:
            raise ConfigError(f"Unknown resize mode '{self.resize_mode}'.", f"Use one of: {', '.join(RESIZE_MODES)}.")
        if self.backend not in BACKENDS:
            raise ConfigError(f"Unknown resize backend '{self.backend}'.", f"Use one of: {', '.join(BACKENDS)}.")
        if self.colour not in COLOURS:
            raise ConfigError(f"Unknown colour setting '{self.colour}'.", f"Use one of: {', '.join(COLOURS)}.")
        if self.channels == 1 and self.colour != "rgb":
            raise ConfigError(f"The colour setting '{self.colour}' is for 3-channel models; a 1-channel model "
                              "always gets the grey image.", "Leave the colour setting at rgb for this model.")
        if self.crop_offset not in CROP_OFFSETS:
            raise ConfigError(f"Unknown crop offset '{self.crop_offset}'.", f"Use one of: {', '.join(CROP_OFFSETS)}.")
        check_input_side("resize", self.resize), check_input_side("crop", self.crop)
        if self.crop <= 0 or self.resize < self.crop:
            raise ConfigError(
                f"resize ({self.resize}) must be at least crop ({self.crop}) and both positive.",
                "Set --resize >= --crop.",
            )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        # Runs written before resize_mode/backend existed resized the shorter side with Pillow.
        return cls(
            resize=int(d["resize"]), crop=int(d["crop"]), mean=tuple(d["mean"]), std=tuple(d["std"]),
            channels=int(d.get("channels", 3)), interpolation=str(d.get("interpolation", "bilinear")),
            resize_mode=str(d.get("resize_mode", "shorter")), backend=str(d.get("backend", "pil")),
            crop_offset=str(d.get("crop_offset", "round")), colour=str(d.get("colour", "rgb")),
            source=str(d.get("source", "")),
        )

    def describe(self) -> str:
        """One line for the user: what is done to each image."""
        size = (f"shorter side to {self.resize}" if self.resize_mode == "shorter"
                else f"to {self.resize}x{self.resize}")
        fmt = lambda v: ", ".join(f"{x:.4g}" for x in v)  # noqa: E731
        text = (f"resize {size} ({self.interpolation}, {'Pillow' if self.backend == 'pil' else 'torch tensor'}), "
                f"centre crop {self.crop}, mean ({fmt(self.mean)}), std ({fmt(self.std)})")
        if self.colour != "rgb":
            text += ", channels in BGR order" if self.colour == "bgr" else ", grey image in the three channels"
        return f"{text}; from {self.source}" if self.source else text

    def resized_size(self, width: int, height: int) -> tuple:
        """(width, height) after the resize, rounded as torchvision's ``Resize`` rounds."""
        if self.resize_mode == "square":
            return self.resize, self.resize
        if width <= height:
            return self.resize, int(self.resize * height / width)
        return int(self.resize * width / height), self.resize

    def crop_box(self, width: int, height: int) -> tuple:
        """(left, top) of the centre crop in a resized image of that size."""
        if self.crop_offset == "floor":
            return (width - self.crop) // 2, (height - self.crop) // 2
        return int(round((width - self.crop) / 2.0)), int(round((height - self.crop) / 2.0))

    def geometry(self, image: Image.Image) -> Image.Image:
        """Resize and crop only: the picture the model sees, before normalisation."""
        nw, nh = self.resized_size(*image.size)
        mode = _interpolation_mode(self.interpolation)
        if self.backend == "tensor":
            resized = TF.resize(TF.pil_to_tensor(image), [nh, nw], interpolation=mode, antialias=True)
        else:
            resized = TF.resize(image, [nh, nw], interpolation=mode)
        left, top = self.crop_box(nw, nh)
        cropped = TF.crop(resized, top, left, self.crop, self.crop)
        return TF.to_pil_image(cropped) if self.backend == "tensor" else cropped

    def normalise(self, image: Image.Image) -> torch.Tensor:
        mode = "L" if self.channels == 1 or self.colour == "grey" else "RGB"
        t = TF.to_dtype(TF.pil_to_tensor(image.convert(mode)), torch.float32, scale=True)
        return TF.normalize(self.arrange_colours(t), list(self.mean), list(self.std))

    def arrange_colours(self, t: torch.Tensor) -> torch.Tensor:
        """(..., 1 or 3, H, W) pictures, grey or RGB as ``colour`` asks, to the model's channels: a grey
        one repeated for a 3-channel model, an RGB one reversed for "bgr"."""
        if self.channels == 3 and t.shape[-3] == 1:
            return t.expand(*t.shape[:-3], 3, *t.shape[-2:])
        return t.flip(-3) if self.colour == "bgr" else t

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.normalise(self.geometry(image))

    def from_uint8(self, images: torch.Tensor) -> torch.Tensor:
        """Decoded RGB pictures (N, 3, H, W) uint8 of one size, on any device, to the model's input
        (N, channels, crop, crop) float32 on that device: the steps of ``__call__`` on tensors.

        The resize is torchvision's antialiased tensor resize, so for the "tensor" backend this is
        ``__call__`` exactly on the CPU; for the "pil" backend it is within a grey level or two of
        Pillow's resize on a few pixels in a thousand (nearest: as many pixels take a neighbour's
        value), as tests/test_gpu_decode.py measures.
        """
        height, width = images.shape[-2:]
        nw, nh = self.resized_size(width, height)
        if (nh, nw) != (height, width):
            mode = _interpolation_mode(self.interpolation)
            if self.backend == "pil" and self.interpolation == "nearest":
                mode = _interpolation_mode("nearest-exact")  # the pixels Pillow's nearest picks
            images = TF.resize(images, [nh, nw], interpolation=mode, antialias=True)
        left, top = self.crop_box(nw, nh)
        images = images[..., top:top + self.crop, left:left + self.crop]
        if self.channels == 1 or self.colour == "grey":
            images = rgb_to_grey(images)
        x = TF.to_dtype(self.arrange_colours(images), torch.float32, scale=True)
        return TF.normalize(x, list(self.mean), list(self.std))


def rgb_to_grey(images: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> (..., 1, H, W) with Pillow's integer formula for convert("L")
    (ITU-R 601-2 luma: (19595 R + 38470 G + 7471 B + 2**15) >> 16), so both paths agree exactly."""
    rgb = images.to(torch.int32)
    grey = (rgb[..., 0, :, :] * 19595 + rgb[..., 1, :, :] * 38470 + rgb[..., 2, :, :] * 7471 + 0x8000) >> 16
    return grey.unsqueeze(-3).to(torch.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode (L, LA, RGBA, P, CMYK, I;16, F, ...) to 8-bit RGB.

    Transparency is composited on white; 16-bit and float images are rescaled to their own
    range rather than clipped, so a 16-bit scan does not turn white.
    """
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        image = Image.fromarray(arr.astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def load_image(source) -> Image.Image:
    """Open a path or file-like object as RGB; raise DataError naming the problem."""
    name = getattr(source, "name", str(source))
    try:
        # PIL only warns between MAX_IMAGE_PIXELS and twice that; refuse those too.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as im:
                im.load()
                return to_rgb(im)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError(
            f"{name} is too large to decode safely ({exc}).",
            f"Resize it below {MAX_IMAGE_PIXELS // 1_000_000} megapixels and try again.",
        ) from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"{name} is not a readable image ({type(exc).__name__}: {exc}).",
                        "Use a PNG, JPEG, BMP, GIF, TIFF or WebP file.") from None
