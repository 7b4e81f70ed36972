"""Images in, tensors out: preprocessing, robust image decoding, class folders.

A dataset is an ImageFolder layout (``root/<class>/<image>``). Class folders are matched to
the model's output indices all or nothing: every folder by name (against the model's class
names), or every folder by number (``7``, ``007``, ``00_name``, CUB's ``001.Name``); a partial
match is refused with the folders that did not match. When the model has no class names and
the folders are exactly as many as its classes, the sorted folder names name the classes. The
mapping is kept in ``ImageFolderData.class_mapping``. Unreadable files are skipped and
reported, never fatal.
"""
from __future__ import annotations

import difflib
import hashlib
import io
import os
import random
import threading
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from phpn.config import COLOURS, DECODES, INTERPOLATIONS
from phpn.errors import ConfigError, DataError
from phpn.validation import check_finite, check_input_side

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
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


@dataclass
class ClassImages:
    """The images of one class folder, matched to a model output index."""

    folder: str
    class_index: int
    paths: list  # relative to the dataset root, POSIX separators


@dataclass
class ImageFolderData:
    root: Path
    classes: list  # list[ClassImages], sorted by class_index
    skipped: list = field(default_factory=list)  # (relative path, reason)
    # How the folders were matched to the model's classes (see match_class_folders); stored in
    # each run's meta as data.class_mapping.
    class_mapping: dict = field(default_factory=dict)
    class_names: Optional[list] = None  # set only when the names were taken from the folders

    @property
    def class_indices(self) -> list:
        return [c.class_index for c in self.classes]

    def by_index(self, class_index: int) -> ClassImages:
        for c in self.classes:
            if c.class_index == class_index:
                return c
        raise DataError(f"No image folder is matched to class {class_index}.",
                        "Add a folder for it or pick another class.")

    def summary(self) -> dict:
        return {
            "root": str(self.root),
            "classes": len(self.classes),
            "images": sum(len(c.paths) for c in self.classes),
            "per_class": {c.folder: len(c.paths) for c in self.classes},
            "skipped": [list(s) for s in self.skipped],
            "class_mapping": self.class_mapping,
        }


MAPPING_BY = {
    "name": "by name (folder names equal the model's class names)",
    "index": "by index (folder names are class numbers counted from 0)",
    "index-from-1": "by index counted from 1 (CUB-style 'NNN.Name' folders)",
    "folder-names": "by sorted folder name (the model has no class names, so the folders name the classes)",
}


def describe_class_mapping(mapping: dict, shown: int = 8) -> str:
    """One line saying how the class folders were matched, for the CLI and the app."""
    if not mapping:
        return "class folders: mapping not recorded"
    folders = mapping.get("folders", {})
    pairs = ", ".join(f"{f} -> {i}" for f, i in list(folders.items())[:shown])
    more = f", ... ({len(folders)} in all)" if len(folders) > shown else ""
    return f"{len(folders)} class folders matched {MAPPING_BY.get(mapping.get('by'), mapping.get('by'))}: {pairs}{more}"


def _name_key(text: str) -> str:
    """Compare names ignoring case, spaces and punctuation: 'ankle_boot' = 'Ankle boot',
    't-shirt-top' = 'T-shirt/top'."""
    return "".join(ch for ch in text.casefold() if ch.isalnum())


def _folder_number(folder: str) -> Optional[tuple]:
    """(number, separator, rest) for '7', '007', '00_t-shirt-top', '001.Black_footed_Albatross'."""
    for sep in (".", "_"):
        head, found, rest = folder.partition(sep)
        if found and head.isdigit() and rest:
            return int(head), sep, rest
    return (int(folder), "", "") if folder.isdigit() else None


def _match_by_name(folders: list, class_names: Sequence[str]) -> tuple:
    """({folder: index}, {folder: [candidate indices]} for ambiguous names)."""
    lookup: dict = {}
    for i, name in enumerate(class_names):
        lookup.setdefault(_name_key(str(name)), []).append(i)
    found, ambiguous = {}, {}
    for folder in folders:
        hits = lookup.get(_name_key(folder), [])
        if len(hits) == 1:
            found[folder] = hits[0]
        elif hits:
            ambiguous[folder] = hits
    return found, ambiguous


def _match_by_index(folders: list, class_names: Optional[Sequence[str]]) -> tuple:
    """({folder: index}, how) when every folder is numbered, else ({...partial}, None).

    Plain numbers and 'NN_name' count from 0; CUB's 'NNN.Name' counts from 1. When the model
    has class names, the name after the number decides instead.
    """
    found, bases = {}, set()
    for folder in folders:
        parsed = _folder_number(folder)
        if parsed is None:
            continue
        number, sep, rest = parsed
        base = 1 if sep == "." else 0
        if rest and class_names is not None:
            for candidate in (0, 1):
                i = number - candidate
                if 0 <= i < len(class_names) and _name_key(str(class_names[i])) == _name_key(rest):
                    base = candidate
                    break
        bases.add(base)
        found[folder] = number - base
    how = None
    if len(found) == len(folders):
        how = "index-from-1" if bases == {1} else "index" if bases == {0} else None
    return found, how


def match_class_folders(folders: Sequence[str], class_names: Optional[Sequence[str]] = None,
                        num_classes: Optional[int] = None) -> tuple:
    """Map class folder names to the model's class indices, all or nothing.

    Every folder matches by name, or every folder by index; otherwise a DataError lists the
    folders that did not match, the names expected and a suggestion. When the model has no
    class names and there are exactly as many folders (not numbered) as classes, the sorted
    folder names become the class names. Returns ``(indices, how, names_from_folders)``:
    ``how`` is a key of MAPPING_BY; ``names_from_folders`` is None unless the folders name
    the classes.
    """
    folders = list(folders)
    if class_names is not None and num_classes is None:
        num_classes = len(class_names)
    if class_names is not None and num_classes is not None and len(class_names) != num_classes:
        raise DataError(f"The class-names list has {len(class_names)} names but the model has {num_classes} classes.",
                        "Give one name per class, in the model's class order.")
    by_name, ambiguous = ({}, {}) if class_names is None else _match_by_name(folders, class_names)
    by_index, index_how = _match_by_index(folders, class_names)

    if class_names is not None and len(by_name) == len(folders):
        indices, how = [by_name[f] for f in folders], "name"
    elif index_how is not None:
        indices, how = [by_index[f] for f in folders], index_how
        limit = num_classes
        bad = [f for f, i in zip(folders, indices) if i < 0 or (limit is not None and i >= limit)]
        if bad:
            numbers = sorted(_folder_number(f)[0] for f in folders)
            hint = "Name the folders by class index, 0 to {}.".format((limit or 1) - 1)
            if how == "index" and limit is not None and numbers[0] >= 1 and numbers[-1] == limit:
                hint = (f"The folders look numbered from 1 (1 to {limit}): rename them 0 to {limit - 1}, "
                        "or name them by class name.")
            raise DataError(f"These class folders name classes the model does not have (it has {limit} classes, "
                            f"numbered 0 to {limit - 1}): {', '.join(bad[:10])}.", hint)
    elif class_names is None and not by_index and (num_classes is None or len(folders) == num_classes):
        return list(range(len(folders))), "folder-names", list(folders)
    elif class_names is None:
        unmatched = [f for f in folders if f not in by_index]
        if by_index:
            raise DataError(f"Some class folders are numbered and others are not: {', '.join(unmatched[:10])} "
                            "have no class number.", "Name every folder by its class index (0, 1, ...), or none.")
        raise DataError(
            f"The image folder has {len(folders)} class folders but the model has {num_classes} classes, "
            "and the folder names are neither class numbers nor class names.",
            "Name each folder by its class index (0, 1, ...) or provide a class-names file.",
        )
    else:
        raise DataError(*_unmatched_message(folders, by_name, ambiguous, by_index, class_names))
    if len(set(indices)) != len(indices):
        dup = sorted({i for i in indices if indices.count(i) > 1})
        pairs = [f for f, i in zip(folders, indices) if i in dup]
        raise DataError(f"Two class folders map to the same model class: {', '.join(pairs[:10])}.",
                        "Merge or rename them.")
    return indices, how, None


def _unmatched_message(folders, by_name, ambiguous, by_index, class_names) -> tuple:
    unmatched = [f for f in folders if f not in by_name]
    expected = [str(n) for n in class_names]
    shown = ", ".join(expected[:12]) + (f", ... ({len(expected)} in all)" if len(expected) > 12 else "")
    problem = (f"These class folders match none of the model's class names: {', '.join(unmatched[:10])}"
               f"{' ...' if len(unmatched) > 10 else ''}. Expected names: {shown}.")
    hints = []
    for folder, hits in list(ambiguous.items())[:3]:
        hints.append(f"'{folder}' fits several classes ({', '.join(map(str, hits))}): name it by index")
    taken = set(by_name.values())  # suggest only names no other folder has
    keys = {_name_key(n): n for i, n in enumerate(expected) if i not in taken}
    for folder in [f for f in unmatched if f not in ambiguous][:5]:
        key = _name_key(folder)
        close = [k for k in keys if key and (k.startswith(key) or key.startswith(k))][:1]
        close = close or difflib.get_close_matches(key, list(keys), n=1, cutoff=0.8)
        if close:
            hints.append(f"'{folder}' might be '{keys[close[0]]}'")
    if by_index and len(by_index) == len(folders):
        hints.append("the folders are numbered, but some numbers are out of range")
    fix = ("Rename the folders to the model's class names or to class indices (all of them, one way), "
           "or give the right class-names file.")
    if hints:
        fix = "Perhaps: " + "; ".join(hints) + ". " + fix
    return problem, fix


def _sample(paths: list, cap: Optional[int], seed: int, folder: str) -> list:
    paths = sorted(paths)
    if cap is None or len(paths) <= cap:
        return paths
    # The sample depends only on the seed and the folder's name, not on other folders.
    digest = hashlib.sha256(f"{seed}:{folder}".encode()).digest()
    rng = random.Random(int.from_bytes(digest[:8], "little"))
    return sorted(rng.sample(paths, cap))


def scan_image_folder(
    root,
    *,
    class_names: Optional[Sequence[str]] = None,
    num_classes: Optional[int] = None,
    images_per_class: Optional[int] = None,
    seed: int = 0,
    verify: bool = True,
) -> ImageFolderData:
    """Find the class folders under ``root`` and the images in each.

    ``verify`` opens each sampled image header so that unreadable files are skipped and
    reported here rather than failing later in a batch.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"The image folder {root} does not exist or is not a folder.",
                        "Give a folder with one sub-folder of images per class.")
    if images_per_class is not None and images_per_class < 1:
        raise ConfigError(f"images per class must be at least 1, got {images_per_class}.", "")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(f"{root} has no class sub-folders.",
                        "Arrange images as root/<class name>/<image>, one sub-folder per class.")

    indices, how, folder_names = match_class_folders([f.name for f in folders], class_names, num_classes)
    mapping = {"by": how, "meaning": MAPPING_BY[how],
               "folders": {f.name: int(i) for f, i in sorted(zip(folders, indices), key=lambda t: t[1])},
               "class_names_from_folders": folder_names is not None}

    skipped: list = []
    classes = []
    for folder, idx in zip(folders, indices):
        files = [p for p in folder.rglob("*") if p.is_file()]
        images = []
        for p in files:
            rel = p.relative_to(root).as_posix()
            if p.suffix.lower() not in IMAGE_SUFFIXES:
                skipped.append((rel, "not an image file (unknown extension)"))
                continue
            images.append(rel)
        chosen = _sample(images, images_per_class, seed, folder.name)
        if verify:
            good = []
            for rel in chosen:
                try:
                    with Image.open(root / rel) as im:
                        im.verify()
                    good.append(rel)
                except Exception as exc:  # any decoder failure means "skip and report"
                    skipped.append((rel, f"unreadable image ({type(exc).__name__})"))
            chosen = good
        if not chosen:
            raise DataError(f"The class folder '{folder.name}' has no readable images.",
                            "Add images to it or remove the folder.")
        classes.append(ClassImages(folder=folder.name, class_index=int(idx), paths=chosen))
    classes.sort(key=lambda c: c.class_index)
    return ImageFolderData(root=root, classes=classes, skipped=skipped, class_mapping=mapping,
                           class_names=folder_names)


def load_batch(root: Path, rel_paths: Sequence[str], preprocess: Preprocess):
    """Decode and preprocess; returns (tensor (n, ch, crop, crop), kept paths, skipped)."""
    dataset = ImageList(root, rel_paths, preprocess)
    return _collate_images([dataset[i] for i in range(len(dataset))])


def default_workers() -> int:
    """Decoding processes: this process's share of the cores (torchrun starts several per
    machine), less one left to the process itself (it drives the model)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    cores //= max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, min(cores - 1, 16))


class ImageList(torch.utils.data.Dataset):
    """Images at ``root/rel_paths``, decoded and preprocessed; an unreadable one yields its reason."""

    def __init__(self, root, rel_paths: Sequence[str], preprocess: Preprocess):
        # A root with get() holds the images in memory (phpn.images.inputs, the Python API's objects).
        root = root if hasattr(root, "get") else Path(root)
        self.root, self.rel_paths, self.preprocess = root, list(rel_paths), preprocess

    def __len__(self) -> int:
        return len(self.rel_paths)

    def __getitem__(self, i: int):
        rel = self.rel_paths[i]
        try:
            if hasattr(self.root, "get"):
                return rel, self.root.get(rel, self.preprocess), None
            return rel, self.preprocess(load_image(self.root / rel)), None
        except Exception as exc:  # skip and report, never fatal
            return rel, None, str(exc)


def _collate_images(items):
    tensors = [t for _, t, _ in items if t is not None]
    kept = [rel for rel, t, _ in items if t is not None]
    skipped = [(rel, why) for rel, t, why in items if t is None]
    return (torch.stack(tensors) if tensors else torch.empty(0)), kept, skipped


def batch_decode_device(decode: str, device=None) -> Optional[torch.device]:
    """The device that decodes JPEGs a batch at a time for ``decode`` (one of DECODES) with the
    model on ``device``, or None when Pillow decodes them in the workers."""
    if decode not in DECODES:
        raise ConfigError(f"Unknown decode mode '{decode}'.", f"Use one of: {', '.join(DECODES)}.")
    device = torch.device(device if device is not None else "cpu")
    if decode == "cpu" or (decode == "auto" and device.type != "cuda"):
        return None
    if device.type != "cuda":
        raise ConfigError(f"--decode gpu needs the model on a CUDA device, but it runs on {device}.",
                          "Use --decode auto (the GPU when there is one) or --decode cpu.")
    if _jpeg_decoder() is None:
        if decode == "auto":
            return None
        raise ConfigError("This torchvision cannot decode JPEGs (torchvision.io.decode_jpeg is missing).",
                          "Use --decode cpu, or install a torchvision that decodes images.")
    return device


def describe_decode(decode_device: Optional[torch.device]) -> str:
    """The decode mode in words, for the benchmark and the run's record."""
    if decode_device is None:
        return "cpu (Pillow)"
    return f"gpu (JPEG bytes read by the workers, nvJPEG on {decode_device})"


def _jpeg_decoder():
    try:
        from torchvision.io import ImageReadMode, decode_jpeg  # noqa: PLC0415 - not in every torchvision build
    except ImportError:
        return None
    return decode_jpeg, ImageReadMode.RGB


JPEG_MAGIC = b"\xff\xd8\xff"
EXIF_ORIENTATION = 0x0112


def plain_jpeg(data: bytes) -> bool:
    """Whether a batch decoder gives the same picture as :func:`load_image`: a complete RGB or grey
    JPEG within the size limit, shown as stored (no EXIF rotation). Reads the header only."""
    if not data.startswith(JPEG_MAGIC) or not data.rstrip(b"\0\r\n ").endswith(b"\xff\xd9"):
        return False  # truncated (or with trailing data): Pillow decides and reports
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                return (im.format == "JPEG" and im.mode in ("RGB", "L")
                        and im.getexif().get(EXIF_ORIENTATION, 1) == 1)
    except Exception:  # Pillow decodes it again and names the problem
        return False


class JpegBytesList(ImageList):
    """Like :class:`ImageList`, but a plain JPEG (see :func:`plain_jpeg`) comes back as its bytes,
    a 1-D uint8 tensor, to be decoded with the rest of its batch by :func:`decode_batch`."""

    def __getitem__(self, i: int):
        rel = self.rel_paths[i]
        try:
            with open(self.root / rel, "rb") as f:
                head = f.read(len(JPEG_MAGIC))
                data = head + f.read() if head == JPEG_MAGIC else b""
        except OSError:
            data = b""  # ImageList reports it
        if data and plain_jpeg(data):
            return rel, torch.frombuffer(bytearray(data), dtype=torch.uint8), None
        return super().__getitem__(i)


def decode_batch(items, root, preprocess: Preprocess, device: torch.device):
    """Workers' items (rel, bytes, or an image preprocessed on the CPU, or None and the reason) to
    (tensor (n, ch, crop, crop) on ``device``, kept paths, skipped) in the items' order.

    The JPEG bytes are decoded together on ``device``; one the batch decoder refuses is decoded
    alone, then by Pillow, and skipped with Pillow's reason when that fails too. Same-sized
    pictures are resized together.
    """
    decode_jpeg, rgb = _jpeg_decoder()
    jpegs = [j for j, (_, x, _) in enumerate(items) if x is not None and x.dim() == 1]
    decoded = {}
    if jpegs:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 points to TorchCodec
            try:
                decoded = dict(zip(jpegs, decode_jpeg([items[j][1] for j in jpegs], mode=rgb, device=device)))
            except torch.cuda.OutOfMemoryError:
                raise
            except RuntimeError:  # one bad file fails the whole batch: find it
                for j in jpegs:
                    try:
                        decoded[j] = decode_jpeg(items[j][1], mode=rgb, device=device)
                    except torch.cuda.OutOfMemoryError:
                        raise
                    except RuntimeError:
                        pass
    out = {}
    by_size = {}
    for j, image in decoded.items():
        by_size.setdefault(tuple(image.shape), []).append(j)
    for js in by_size.values():
        for j, x in zip(js, preprocess.from_uint8(torch.stack([decoded[j] for j in js]))):
            out[j] = x
    tensors, kept, skipped = [], [], []
    on_cpu = []  # where the images Pillow prepared are: copied to the device in one go
    for j, (rel, x, why) in enumerate(items):
        if j in out:
            x = out[j]
        elif x is not None and x.dim() == 1:  # the batch decoder refused it: as the CPU path would
            rel, x, why = ImageList(root, [rel], preprocess)[0]
        if x is None:
            skipped.append((rel, why))
            continue
        if x.device.type != device.type:
            on_cpu.append(len(tensors))
        tensors.append(x)
        kept.append(rel)
    if on_cpu:
        for i, x in zip(on_cpu, torch.stack([tensors[i] for i in on_cpu]).to(device, non_blocking=True)):
            tensors[i] = x
    return (torch.stack(tensors) if tensors else torch.empty(0)), kept, skipped


def iter_batches(root, rel_paths: Sequence[str], preprocess: Preprocess, batch_size: int = 64,
                 workers: Optional[int] = None, pin_memory: bool = False, decode: str = "cpu", device=None):
    """Yield (tensor, kept paths, skipped) batch by batch, in the order of ``rel_paths``.

    With ``workers`` > 0 the images are decoded by that many processes while the caller runs
    the model on the previous batch (``None``: :func:`default_workers` on the main thread, none
    on other threads); ``pin_memory`` lets a CUDA copy overlap with compute. ``decode`` (one of
    DECODES) with the model's ``device`` says where JPEGs are decoded (see
    :func:`batch_decode_device`); batches decoded on the GPU are yielded there.
    """
    on = batch_decode_device(decode, device)
    return _batches(root, rel_paths, preprocess, batch_size, _workers(workers, batch_size), pin_memory, on)


def iter_decoded_batches(root, rel_paths: Sequence[str], preprocess: Preprocess, batch_size: int = 64,
                         workers: Optional[int] = None, decode_device="cpu"):
    """:func:`iter_batches` with JPEGs decoded a batch at a time on ``decode_device``, any device:
    the GPU path, which the CPU runs too (to compare it with Pillow's, and in tests)."""
    return _batches(root, rel_paths, preprocess, batch_size, _workers(workers, batch_size), False,
                    torch.device(decode_device))


def _workers(workers: Optional[int], batch_size: int) -> int:
    """The decoding processes to start, after checking the reading options."""
    if workers is None:
        # Off the main thread (the app's discovery job, a server's threads) forking would copy
        # the other threads' held locks into the workers: decode here unless asked otherwise.
        workers = default_workers() if threading.current_thread() is threading.main_thread() else 0
    workers = int(workers)
    if workers < 0:
        raise ConfigError(f"workers must be 0 or more, got {workers}.", "Use --workers 0 to decode in this process.")
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}.", "Use --batch-size 64, for example.")
    return workers


def _batches(root, rel_paths, preprocess, batch_size, workers, pin_memory, decode_device):
    in_memory = hasattr(root, "get")
    if in_memory:
        decode_device = None  # images already in this process's memory: nothing to decode in parallel
    dataset = (ImageList if decode_device is None else JpegBytesList)(root, rel_paths, preprocess)
    if not len(dataset):
        return
    workers = 0 if in_memory else min(workers, -(-len(dataset) // batch_size))  # no idle process for a short list
    collate = _collate_images if decode_device is None else list
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                                         collate_fn=collate, pin_memory=pin_memory and decode_device is None,
                                         prefetch_factor=2 if workers else None, persistent_workers=False)
    try:
        for batch in loader:
            yield batch if decode_device is None else decode_batch(batch, dataset.root, preprocess, decode_device)
    except RuntimeError as exc:
        # Workers hand batches over in shared memory; a container's small /dev/shm kills them.
        if workers and any(s in str(exc) for s in ("shared memory", "killed by signal", "exited unexpectedly")):
            raise DataError(f"The image-decoding workers stopped ({exc}).",
                            "Decode in this process with --workers 0, or give the machine or container more "
                            "shared memory (docker run --shm-size 8g).") from None
        raise
