"""Images in, tensors out: preprocessing, robust image decoding, class folders.

A dataset is an ImageFolder layout (``root/<class>/<image>``). Class folders are matched to
the model's output indices by name (against the model's class names), by number
(``007`` or ``7``), or, when the folders are exactly as many as the model's classes, by
sorted order. Unreadable files are skipped and reported, never fatal.
"""
from __future__ import annotations

import hashlib
import os
import random
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from .errors import ConfigError, DataError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
# Guard against decompression bombs: larger images are refused with a clear message.
MAX_IMAGE_PIXELS = 100_000_000
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS


_RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


@dataclass(frozen=True)
class Preprocess:
    """Resize (shorter side) then centre-crop, then normalise per channel."""

    resize: int = 256
    crop: int = 224
    mean: tuple = (0.485, 0.456, 0.406)
    std: tuple = (0.229, 0.224, 0.225)
    channels: int = 3
    interpolation: str = "bilinear"  # of the resize: bilinear, bicubic or nearest (as the model was trained)

    def __post_init__(self):
        if self.channels not in (1, 3):
            raise ConfigError(f"channels must be 1 or 3, got {self.channels}.", "Use 1 for grey-scale models, 3 for RGB.")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ConfigError(
                f"mean and std need {self.channels} values each (one per input channel), "
                f"got {len(self.mean)} and {len(self.std)}.",
                "Pass --mean and --std with one number per channel.",
            )
        if any(s <= 0 for s in self.std):
            raise ConfigError("std values must be positive.", "Check --std.")
        if self.interpolation not in _RESAMPLE:
            raise ConfigError(f"Unknown interpolation '{self.interpolation}'.",
                              f"Use one of: {', '.join(_RESAMPLE)}.")
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
        return cls(
            resize=int(d["resize"]), crop=int(d["crop"]), mean=tuple(d["mean"]), std=tuple(d["std"]),
            channels=int(d.get("channels", 3)), interpolation=str(d.get("interpolation", "bilinear")),
        )

    def geometry(self, image: Image.Image) -> Image.Image:
        """Resize and crop only: the picture the model sees, before normalisation."""
        w, h = image.size
        scale = self.resize / min(w, h)
        nw, nh = max(self.crop, round(w * scale)), max(self.crop, round(h * scale))
        image = image.resize((nw, nh), _RESAMPLE[self.interpolation])
        left, top = (nw - self.crop) // 2, (nh - self.crop) // 2
        return image.crop((left, top, left + self.crop, top + self.crop))

    def normalise(self, image: Image.Image) -> torch.Tensor:
        mode = "L" if self.channels == 1 else "RGB"
        arr = np.asarray(image.convert(mode), dtype=np.float32) / 255.0
        if arr.ndim == 2:
            arr = arr[:, :, None]
        t = torch.from_numpy(arr.transpose(2, 0, 1).copy())
        mean = torch.tensor(self.mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(self.std, dtype=torch.float32)[:, None, None]
        return (t - mean) / std

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.normalise(self.geometry(image))


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
        }


def _match_folder(folder: str, class_names: Optional[Sequence[str]], num_classes: Optional[int]) -> Optional[int]:
    key = folder.strip().lower().replace("_", " ")
    if class_names is not None:
        for i, name in enumerate(class_names):
            if name.strip().lower().replace("_", " ") == key:
                return i
    # "7", "007" and "007.Sooty_Albatross" (CUB style) name classes by number.
    head = folder.split(".", 1)[0].split("_", 1)[0]
    if head.isdigit():
        idx = int(head)
        if folder.split(".", 1)[0] != folder and class_names is None:
            idx -= 1  # CUB folders count from 1
        if num_classes is None or 0 <= idx < num_classes:
            return idx
    return None


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

    indices = [_match_folder(f.name, class_names, num_classes) for f in folders]
    if any(i is None for i in indices):
        if num_classes is not None and len(folders) != num_classes and class_names is None:
            raise DataError(
                f"{root} has {len(folders)} class folders but the model has {num_classes} classes, "
                "and the folder names are neither class numbers nor class names.",
                "Name each folder by its class index (0, 1, ...) or provide a class-names file.",
            )
        if class_names is not None and (num_classes is None or len(folders) != num_classes):
            unknown = [f.name for f, i in zip(folders, indices) if i is None][:5]
            raise DataError(
                f"These class folders match no class name of the model: {', '.join(unknown)}.",
                "Rename them to the model's class names (or indices), or provide the right class-names file.",
            )
        indices = list(range(len(folders)))  # as many folders as classes: sorted order
    if len(set(indices)) != len(indices):
        raise DataError("Two class folders map to the same model class.", "Merge or rename them.")

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
    return ImageFolderData(root=root, classes=classes, skipped=skipped)


def load_batch(root: Path, rel_paths: Sequence[str], preprocess: Preprocess):
    """Decode and preprocess; returns (tensor (n, ch, crop, crop), kept paths, skipped)."""
    dataset = ImageList(root, rel_paths, preprocess)
    return _collate_images([dataset[i] for i in range(len(dataset))])


def default_workers() -> int:
    """Decoding processes: one core is left to the main process (it drives the model)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(0, min(cores - 1, 16))


class ImageList(torch.utils.data.Dataset):
    """Images at ``root/rel_paths``, decoded and preprocessed; an unreadable one yields its reason."""

    def __init__(self, root, rel_paths: Sequence[str], preprocess: Preprocess):
        self.root, self.rel_paths, self.preprocess = Path(root), list(rel_paths), preprocess

    def __len__(self) -> int:
        return len(self.rel_paths)

    def __getitem__(self, i: int):
        rel = self.rel_paths[i]
        try:
            return rel, self.preprocess(load_image(self.root / rel)), None
        except Exception as exc:  # skip and report, never fatal
            return rel, None, str(exc)


def _collate_images(items):
    tensors = [t for _, t, _ in items if t is not None]
    kept = [rel for rel, t, _ in items if t is not None]
    skipped = [(rel, why) for rel, t, why in items if t is None]
    return (torch.stack(tensors) if tensors else torch.empty(0)), kept, skipped


def iter_batches(root, rel_paths: Sequence[str], preprocess: Preprocess, batch_size: int = 64,
                 workers: Optional[int] = None, pin_memory: bool = False):
    """Yield (tensor, kept paths, skipped) batch by batch, in the order of ``rel_paths``.

    With ``workers`` > 0 the images are decoded by that many processes while the caller runs
    the model on the previous batch (``None``: :func:`default_workers`); ``pin_memory`` lets a
    CUDA copy overlap with compute.
    """
    workers = default_workers() if workers is None else int(workers)
    if workers < 0:
        raise ConfigError(f"workers must be 0 or more, got {workers}.", "Use --workers 0 to decode in this process.")
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}.", "Use --batch-size 64, for example.")
    dataset = ImageList(root, rel_paths, preprocess)
    if not len(dataset):
        return
    workers = min(workers, -(-len(dataset) // batch_size))  # no idle process for a short list
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                                         collate_fn=_collate_images, pin_memory=pin_memory,
                                         prefetch_factor=4 if workers else None, persistent_workers=False)
    yield from loader
