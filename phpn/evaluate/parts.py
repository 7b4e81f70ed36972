"""Part-annotated datasets in the CUB-200-2011 layout.

    root/images.txt               <image_id> <relative path under images/>
    root/image_class_labels.txt   <image_id> <class_id, from 1>
    root/train_test_split.txt     <image_id> <1 = train, 0 = test>
    root/bounding_boxes.txt       <image_id> <x> <y> <width> <height>
    root/parts/parts.txt          <part_id, from 1> <part name>
    root/parts/part_locs.txt      <image_id> <part_id> <x> <y> <visible 0/1>
    root/classes.txt              <class_id> <name>   (optional)
    root/images/...               the image files

As in the evaluation protocol of Huang et al., each image is cropped to its bounding box
(keypoints shifted with it); then it goes through the model's :class:`phpn.images.preprocess.Preprocess`
(resize the shorter side, centre crop), and the keypoints are mapped through the same
geometry. Keypoints that land outside the final crop cannot be seen by the model and are
marked not visible. Coordinates are ``(x, y)`` in pixels, pixel ``(row r, column c)``
being the point ``(c, r)``.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from phpn.errors import ConfigError, DataError
from phpn.images.folders import ClassImages, ImageFolderData
from phpn.images.preprocess import Preprocess, load_image

REQUIRED = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "bounding_boxes.txt",
            "parts/parts.txt", "parts/part_locs.txt")


@dataclass
class PartImage:
    image_id: int
    path: str  # relative to root/images, POSIX separators
    class_index: int  # model output index
    is_train: bool
    bbox: tuple  # (x, y, width, height) in the original image
    keypoints: np.ndarray  # (M, 2) (x, y) in the original image
    visible: np.ndarray  # (M,) bool


@dataclass
class PartDataset:
    root: Path
    part_names: list
    images: list  # list[PartImage]
    class_names: dict = field(default_factory=dict)  # model class index -> name
    crop_to_bbox: bool = True

    @property
    def num_parts(self) -> int:
        return len(self.part_names)

    @property
    def class_indices(self) -> list:
        return sorted({im.class_index for im in self.images})

    def __len__(self) -> int:
        return len(self.images)

    def select(self, split: str = "test", classes: Optional[Sequence[int]] = None,
               per_class: Optional[int] = None, seed: int = 0) -> "PartDataset":
        """A subset: ``split`` "train", "test" or "all"; only ``classes``; at most
        ``per_class`` images a class (a seeded sample that depends on the class only)."""
        if split not in ("train", "test", "all"):
            raise ConfigError(f"split must be 'train', 'test' or 'all', got {split!r}.", "")
        if per_class is not None and per_class < 1:
            raise ConfigError(f"images per class must be at least 1, got {per_class}.", "")
        wanted = None if classes is None else {int(c) for c in classes}
        chosen = []
        for c in self.class_indices:
            if wanted is not None and c not in wanted:
                continue
            ims = [im for im in self.images if im.class_index == c
                   and (split == "all" or im.is_train == (split == "train"))]
            if per_class is not None and len(ims) > per_class:
                digest = hashlib.sha256(f"{seed}:{c}".encode()).digest()
                rng = random.Random(int.from_bytes(digest[:8], "little"))
                keep = set(rng.sample(range(len(ims)), per_class))
                ims = [im for j, im in enumerate(ims) if j in keep]
            chosen.extend(ims)
        return replace(self, images=chosen)

    def by_class(self) -> dict:
        out: dict = {}
        for i, im in enumerate(self.images):
            out.setdefault(im.class_index, []).append(i)
        return out

    def to_image_folder(self) -> ImageFolderData:
        """The same images as an :class:`ImageFolderData` (whole images, no box crop)."""
        classes = []
        for c, idx in sorted(self.by_class().items()):
            folder = self.images[idx[0]].path.split("/", 1)[0]
            classes.append(ClassImages(folder=folder, class_index=c, paths=[self.images[i].path for i in idx]))
        return ImageFolderData(root=self.root / "images", classes=classes)

    def load(self, i: int, preprocess: Preprocess):
        """Image ``i`` as the model sees it: (tensor (ch, S, S), keypoints (M, 2), visible (M,))."""
        im = self.images[i]
        picture = load_image(self.root / "images" / im.path)
        kp = im.keypoints.astype(np.float64).copy()
        if self.crop_to_bbox:
            picture, offset = crop_box(picture, im.bbox)
            kp = kp - offset[None, :]
        tensor = preprocess(picture)
        kp, inside = preprocess_keypoints(kp, picture.size, preprocess)
        return tensor, kp, im.visible & inside

    def load_batch(self, indices: Sequence[int], preprocess: Preprocess):
        """(tensor (n, ch, S, S), keypoints (n, M, 2), visible (n, M), kept indices, skipped)."""
        tensors, kps, vis, kept, skipped = [], [], [], [], []
        for i in indices:
            try:
                t, k, v = self.load(i, preprocess)
            except DataError as exc:
                skipped.append((self.images[i].path, str(exc)))
                continue
            tensors.append(t)
            kps.append(k)
            vis.append(v)
            kept.append(i)
        if not tensors:
            M = self.num_parts
            return torch.empty(0), np.zeros((0, M, 2)), np.zeros((0, M), bool), kept, skipped
        return torch.stack(tensors), np.stack(kps), np.stack(vis), kept, skipped


def crop_box(picture, bbox):
    """Crop a PIL image to ``bbox`` (x, y, w, h), clipped to the image and rounded to
    whole pixels; returns (cropped image, (x0, y0) offset to subtract from keypoints)."""
    x, y, w, h = (float(v) for v in bbox)
    W, H = picture.size
    x0, y0 = max(0, int(round(x))), max(0, int(round(y)))
    x1, y1 = min(W, int(round(x + w))), min(H, int(round(y + h)))
    if x1 <= x0 or y1 <= y0:
        return picture, np.zeros(2)
    return picture.crop((x0, y0, x1, y1)), np.array([x0, y0], dtype=np.float64)


def preprocess_keypoints(keypoints, image_size, preprocess: Preprocess):
    """Map (M, 2) ``(x, y)`` keypoints of an image of ``image_size`` (w, h) through
    ``preprocess.geometry`` (resize the shorter side, centre crop). Returns the mapped
    keypoints and a (M,) bool: the point lies inside the crop.

    Pixel centres map to pixel centres: ``x' = (x + 0.5) * new_w / w - 0.5 - left``.
    """
    w, h = image_size
    nw, nh = preprocess.resized_size(w, h)
    left, top = preprocess.crop_box(nw, nh)
    kp = np.asarray(keypoints, dtype=np.float64)
    out = np.empty_like(kp)
    out[:, 0] = (kp[:, 0] + 0.5) * nw / w - 0.5 - left
    out[:, 1] = (kp[:, 1] + 0.5) * nh / h - 0.5 - top
    S = preprocess.crop
    inside = (out[:, 0] >= -0.5) & (out[:, 0] < S - 0.5) & (out[:, 1] >= -0.5) & (out[:, 1] < S - 0.5)
    return out, inside


def _read_table(root: Path, name: str, min_fields: int, split_max: int = -1) -> list:
    path = root / name
    if not path.is_file():
        raise DataError(f"{path} is missing: {root} is not in the CUB-200-2011 annotation layout.",
                        f"A part-annotated dataset needs {', '.join(REQUIRED)} under its root.")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split(maxsplit=split_max) if split_max > 0 else line.split()
        if len(fields) < min_fields:
            raise DataError(f"{path}, line {n}: expected at least {min_fields} fields, got {line!r}.",
                            "Fix or regenerate the annotation file.")
        rows.append(fields)
    return rows


def is_cub_layout(root) -> bool:
    root = Path(root)
    return all((root / name).is_file() for name in REQUIRED)


def load_cub_parts(root, *, class_map: Optional[dict] = None, crop_to_bbox: bool = True) -> PartDataset:
    """Read a CUB-layout part-annotated dataset.

    Class ids count from 1; model index = id - 1 unless ``class_map`` ({id: index}) says
    otherwise (ids missing from ``class_map`` are dropped).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"The part-annotated dataset {root} does not exist.",
                        "Give the CUB_200_2011 folder (the one holding images.txt and parts/).")
    try:
        paths = {int(r[0]): r[1].strip() for r in _read_table(root, "images.txt", 2, split_max=1)}
        labels = {int(r[0]): int(r[1]) for r in _read_table(root, "image_class_labels.txt", 2)}
        train = {int(r[0]): r[1] == "1" for r in _read_table(root, "train_test_split.txt", 2)}
        boxes = {int(r[0]): tuple(float(v) for v in r[1:5]) for r in _read_table(root, "bounding_boxes.txt", 5)}
        part_rows = _read_table(root, "parts/parts.txt", 2, split_max=1)
        part_ids = [int(r[0]) for r in part_rows]
        part_names = [r[1].strip() for r in part_rows]
        locs = _read_table(root, "parts/part_locs.txt", 5)
    except ValueError as exc:
        raise DataError(f"An annotation file under {root} has a malformed number ({exc}).",
                        "Fix or regenerate the annotation files.") from None
    slot = {pid: j for j, pid in enumerate(part_ids)}
    M = len(part_names)
    kps = {i: np.zeros((M, 2)) for i in paths}
    vis = {i: np.zeros(M, dtype=bool) for i in paths}
    for r in locs:
        try:
            img, pid, x, y, v = int(r[0]), int(r[1]), float(r[2]), float(r[3]), int(float(r[4]))
        except ValueError:
            raise DataError(f"parts/part_locs.txt under {root} has a malformed line: {' '.join(r)!r}.",
                            "Fix or regenerate the annotation file.") from None
        if img not in kps or pid not in slot:
            continue
        kps[img][slot[pid]] = (x, y)
        vis[img][slot[pid]] = v == 1
    names = {}
    if (root / "classes.txt").is_file():
        for r in _read_table(root, "classes.txt", 2, split_max=1):
            cid = int(r[0])
            idx = class_map.get(cid) if class_map is not None else cid - 1
            if idx is not None:
                names[int(idx)] = r[1].strip()
    images = []
    for img_id in sorted(paths):
        if img_id not in labels or img_id not in train or img_id not in boxes:
            raise DataError(f"Image {img_id} of {root / 'images.txt'} has no class, split or bounding box.",
                            "Every image id must appear in image_class_labels.txt, train_test_split.txt and "
                            "bounding_boxes.txt.")
        cid = labels[img_id]
        idx = class_map.get(cid) if class_map is not None else cid - 1
        if idx is None:
            continue
        images.append(PartImage(image_id=img_id, path=paths[img_id].replace("\\", "/"), class_index=int(idx),
                                is_train=train[img_id], bbox=boxes[img_id], keypoints=kps[img_id],
                                visible=vis[img_id]))
    if not images:
        raise DataError(f"{root} lists no images.", "Check images.txt and image_class_labels.txt.")
    return PartDataset(root=root, part_names=part_names, images=images, class_names=names,
                       crop_to_bbox=crop_to_bbox)
