"""A part-annotated benchmark with ground truth: classes made of distinctive parts.

Every image shows the 3 parts of its class (of 6 part types, each with its own shape,
colour and texture) at random positions on a varied background with a few distractor
shapes. The class is the *combination* of parts: each part type is shared by 4 of the 8
classes, so no single part names a class, and every part is needed to name it. Each part's centre is written as a keypoint, in the
CUB-200-2011 annotation layout, so :func:`phpn.evaluate.parts.load_cub_parts` reads it
like the real thing.

Everything is drawn with numpy from one seed: the same config gives the same pixels on
any machine, so the benchmark is regenerated rather than committed.

Coordinates: pixel (row r, column c) has keypoint coordinates (x=c, y=r); a part is drawn
centred on an integer pixel, so the pixel at a visible keypoint always has the part's main
colour (the disc's red, the bullseye's centre dot, the centre stripe, the centre cell).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from phpn.errors import ConfigError


@dataclass(frozen=True)
class PartType:
    name: str
    shape: str  # one of SHAPES
    colour: tuple  # main colour (RGB, 0-255): the colour at the part's keypoint
    second: tuple = (0, 0, 0)  # second colour of textured parts


SHAPES = ("disc", "square", "triangle", "plus", "bullseye", "stripes", "diamond", "checker")

# Three pairs of part types; a class takes one part of each pair (the 8 faces of an
# octahedron whose vertices are the 6 part types). So every part type belongs to 4 classes,
# and every part of a class is needed to name it: swapping any one part for its pair gives
# another class. A model cannot ignore a part, so each part is a ground truth that
# prototypes should find.
PART_TYPES = (
    PartType("red disc", "disc", (220, 30, 30)),
    PartType("green square", "square", (30, 190, 50)),
    PartType("blue triangle", "triangle", (40, 70, 230)),
    PartType("yellow plus", "plus", (240, 220, 20)),
    PartType("cyan stripes", "stripes", (20, 220, 230), (10, 20, 70)),
    PartType("white checker", "checker", (250, 250, 250), (15, 15, 15)),
)
PAIRS = ((0, 1), (2, 3), (4, 5))
CLASS_PARTS = tuple((a, b, c) for a in PAIRS[0] for b in PAIRS[1] for c in PAIRS[2])


def class_name(index: int, class_parts=CLASS_PARTS, part_types=PART_TYPES) -> str:
    return "+".join(part_types[p].name.split()[1] for p in class_parts[index])


@dataclass(frozen=True)
class SyntheticPartsConfig:
    size: int = 64
    train_per_class: int = 400
    test_per_class: int = 50
    seed: int = 0
    radius: tuple = (6, 8)  # part half-size in pixels, inclusive range
    min_separation: int = 24  # Chebyshev distance between part centres, pixels
    # Chance that one part of a 3-part class is left out (marked not visible). Off by
    # default: with every part needed to name the class, it would make labels ambiguous.
    occlusion: float = 0.0
    distractors: tuple = (1, 3)  # number of distractor shapes, inclusive range
    colour_jitter: int = 15
    noise: float = 6.0  # std of pixel noise on the background, 0-255 scale

    def __post_init__(self):
        if self.size < 4 * self.radius[1]:
            raise ConfigError(f"size {self.size} is too small for parts of radius {self.radius[1]}.",
                              "Use size >= 4 * the largest radius.")
        if self.train_per_class < 0 or self.test_per_class < 0:
            raise ConfigError("Image counts must not be negative.", "")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["radius"], d["distractors"] = list(self.radius), list(self.distractors)
        return d

    @classmethod
    def from_dict(cls, d: dict, **overrides) -> "SyntheticPartsConfig":
        d = {**asdict(cls()), **d, **overrides}
        d["radius"], d["distractors"] = tuple(d["radius"]), tuple(d["distractors"])
        return cls(**d)


@dataclass
class SyntheticParts:
    """Images with labels and keypoints; index i is CUB image id i + 1."""

    images: np.ndarray  # (N, S, S, 3) uint8
    labels: np.ndarray  # (N,) class index, 0-based
    is_train: np.ndarray  # (N,) bool
    keypoints: np.ndarray  # (N, M, 2) float (x, y); 0 where not visible
    visible: np.ndarray  # (N, M) bool
    config: SyntheticPartsConfig
    class_parts: tuple = CLASS_PARTS
    part_types: tuple = PART_TYPES

    @property
    def num_classes(self) -> int:
        return len(self.class_parts)

    @property
    def part_names(self) -> list:
        return [p.name for p in self.part_types]

    @property
    def class_names(self) -> list:
        return [class_name(i, self.class_parts, self.part_types) for i in range(self.num_classes)]

    def folder(self, label: int) -> str:
        return f"{label + 1:03d}.{self.class_names[label]}"

    def rel_path(self, i: int) -> str:
        split = "train" if self.is_train[i] else "test"
        return f"{self.folder(int(self.labels[i]))}/{split}_{i + 1:05d}.png"


# --- drawing -------------------------------------------------------------------------------

def _part_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: int):
    """(mask of the part, mask of its second colour) on offsets from the centre."""
    kind = SHAPES.index(shape)
    ax, ay = np.abs(dx), np.abs(dy)
    second = np.zeros_like(dx, dtype=bool)
    if kind == 0:  # disc
        mask = dx * dx + dy * dy <= r * r
    elif kind == 1:  # square
        mask = (ax <= r - 1) & (ay <= r - 1)
    elif kind == 2:  # triangle, apex up, centre pixel well inside
        h = 2 * r
        top = -r
        rel = dy - top  # 0 at the apex, h at the base
        mask = (rel >= 0) & (rel <= h) & (ax <= rel * (r + 1) / h)
    elif kind == 3:  # plus
        t = max(1, r // 3)
        mask = ((ax <= t) & (ay <= r)) | ((ay <= t) & (ax <= r))
    elif kind == 4:  # bullseye: centre dot and a ring
        d2 = dx * dx + dy * dy
        mask = (d2 <= (0.4 * r) ** 2) | ((d2 >= (0.7 * r) ** 2) & (d2 <= r * r))
    elif kind == 5:  # horizontal stripes, the centre stripe in the main colour
        mask = (ax <= r) & (ay <= r)
        second = mask & ((np.floor((dy + 1) / 2).astype(int) % 2) != 0)
    elif kind == 6:  # diamond
        mask = ax + ay <= r + 1
    elif kind == 7:  # 3x3 checker, centre cell in the main colour
        mask = (ax <= r) & (ay <= r)
        cell = (2 * r + 1) / 3.0
        i = np.floor((dx + r) / cell).astype(int)
        j = np.floor((dy + r) / cell).astype(int)
        second = mask & (((i + j) % 2) != 0)
    else:
        raise ValueError(kind)
    return mask, second


def _jitter(rng, colour, amount):
    c = np.asarray(colour, dtype=np.float64) + rng.integers(-amount, amount + 1, size=3)
    return np.clip(c, 0, 255)


def _background(rng, size: int, noise: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / (size - 1)
    # Muted colours: a random colour pulled half way to a random grey.
    def muted():
        grey = rng.uniform(60, 200)
        return 0.5 * rng.uniform(0, 255, size=3) + 0.5 * grey

    c0, c1 = muted(), muted()
    angle = rng.uniform(0, 2 * np.pi)
    t = np.cos(angle) * xx + np.sin(angle) * yy
    t = (t - t.min()) / max(t.max() - t.min(), 1e-9)
    img = c0[None, None, :] * (1 - t[..., None]) + c1[None, None, :] * t[..., None]
    # Low-frequency blotches, so that backgrounds are not plain gradients.
    coarse = rng.normal(0, 18, size=(4, 4, 3))
    reps = int(np.ceil(size / 4))
    blot = np.kron(coarse, np.ones((reps, reps, 1)))[:size, :size]
    img = img + blot + rng.normal(0, noise, size=(size, size, 3))
    return img


def _distractor(rng, img: np.ndarray, yy, xx):
    """An ellipse outline or a thin line in a muted colour: not any of the part types."""
    size = img.shape[0]
    grey = rng.uniform(40, 210)
    colour = 0.35 * rng.uniform(0, 255, size=3) + 0.65 * grey
    cx, cy = rng.uniform(0, size, size=2)
    if rng.random() < 0.5:
        a, b = rng.uniform(4, 12, size=2)
        d = ((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2
        mask = (d >= 0.6) & (d <= 1.0)
    else:
        angle = rng.uniform(0, np.pi)
        length = rng.uniform(10, 30)
        u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
        v = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
        mask = (np.abs(u) <= length / 2) & (np.abs(v) <= 0.8)
    img[mask] = colour


def _place(rng, n: int, cfg: SyntheticPartsConfig):
    lo, hi = cfg.radius[1] + 1, cfg.size - cfg.radius[1] - 2
    for _ in range(1000):
        pts = rng.integers(lo, hi + 1, size=(n, 2))
        ok = True
        for i in range(n):
            for j in range(i):
                if np.max(np.abs(pts[i] - pts[j])) < cfg.min_separation:
                    ok = False
        if ok:
            return pts
    raise ConfigError(f"Cannot place {n} parts {cfg.min_separation} px apart in a {cfg.size} px image.",
                      "Lower min_separation or raise size.")


def render(rng: np.random.Generator, label: int, cfg: SyntheticPartsConfig,
           class_parts=CLASS_PARTS, part_types=PART_TYPES):
    """One image of class ``label``: (image (S,S,3) uint8, keypoints (M,2), visible (M,))."""
    size = cfg.size
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    img = _background(rng, size, cfg.noise)
    for _ in range(int(rng.integers(cfg.distractors[0], cfg.distractors[1] + 1))):
        _distractor(rng, img, yy, xx)
    parts = list(class_parts[label])
    if len(parts) >= 3 and rng.random() < cfg.occlusion:
        parts.pop(int(rng.integers(len(parts))))
    order = rng.permutation(len(parts))
    centres = _place(rng, len(parts), cfg)
    keypoints = np.zeros((len(part_types), 2))
    visible = np.zeros(len(part_types), dtype=bool)
    for slot, kind in zip(order, parts):
        cx, cy = (int(v) for v in centres[slot])
        r = int(rng.integers(cfg.radius[0], cfg.radius[1] + 1))
        pt = part_types[kind]
        mask, second = _part_mask(pt.shape, xx - cx, yy - cy, r)
        img[mask] = _jitter(rng, pt.colour, cfg.colour_jitter)
        if second.any():
            img[second] = _jitter(rng, pt.second, cfg.colour_jitter)
        keypoints[kind] = (cx, cy)
        visible[kind] = True
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), keypoints, visible


def _image_rng(seed: int, index: int) -> np.random.Generator:
    # One stream per image: an image does not depend on how many others are drawn.
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(index)])))


def generate(config: Optional[SyntheticPartsConfig] = None, **overrides) -> SyntheticParts:
    """Draw the whole dataset: per class, ``train_per_class`` then ``test_per_class`` images."""
    cfg = config or SyntheticPartsConfig()
    if overrides:
        cfg = SyntheticPartsConfig.from_dict(cfg.to_dict(), **overrides)
    C, M = len(CLASS_PARTS), len(PART_TYPES)
    per = cfg.train_per_class + cfg.test_per_class
    n = C * per
    images = np.zeros((n, cfg.size, cfg.size, 3), dtype=np.uint8)
    labels = np.zeros(n, dtype=np.int64)
    is_train = np.zeros(n, dtype=bool)
    keypoints = np.zeros((n, M, 2))
    visible = np.zeros((n, M), dtype=bool)
    i = 0
    for c in range(C):
        for j in range(per):
            train = j < cfg.train_per_class
            # The stream is keyed by (class, split, index in split), so changing
            # train_per_class does not change the test images.
            key = c * 1_000_000 + (0 if train else 500_000) + (j if train else j - cfg.train_per_class)
            images[i], keypoints[i], visible[i] = render(_image_rng(cfg.seed, key), c, cfg)
            labels[i], is_train[i] = c, train
            i += 1
    return SyntheticParts(images, labels, is_train, keypoints, visible, cfg)


def write_cub_layout(data: SyntheticParts, root, *, only: Optional[str] = None) -> Path:
    """Write images and annotations as CUB-200-2011 lays them out; returns ``root``.

    ``only``: "train" or "test" to write the images of one split (the annotation files
    still list only the written images). Bounding boxes are the whole image.
    """
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "parts").mkdir(exist_ok=True)
    keep = np.ones(len(data.labels), dtype=bool)
    if only == "train":
        keep = data.is_train.copy()
    elif only == "test":
        keep = ~data.is_train
    elif only is not None:
        raise ConfigError(f"only must be 'train', 'test' or None, got {only!r}.", "")
    ids = [i for i in range(len(data.labels)) if keep[i]]
    size = data.config.size
    lines = {k: [] for k in ("images", "labels", "split", "bbox", "locs")}
    for i in ids:
        rel = data.rel_path(i)
        path = root / "images" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(data.images[i]).save(path)
        lines["images"].append(f"{i + 1} {rel}")
        lines["labels"].append(f"{i + 1} {int(data.labels[i]) + 1}")
        lines["split"].append(f"{i + 1} {int(data.is_train[i])}")
        lines["bbox"].append(f"{i + 1} 0.0 0.0 {float(size)} {float(size)}")
        for m in range(data.visible.shape[1]):
            x, y = data.keypoints[i, m]
            lines["locs"].append(f"{i + 1} {m + 1} {x:.1f} {y:.1f} {int(data.visible[i, m])}")
    (root / "images.txt").write_text("\n".join(lines["images"]) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(lines["labels"]) + "\n")
    (root / "train_test_split.txt").write_text("\n".join(lines["split"]) + "\n")
    (root / "bounding_boxes.txt").write_text("\n".join(lines["bbox"]) + "\n")
    (root / "classes.txt").write_text(
        "".join(f"{c + 1} {data.folder(c)}\n" for c in range(data.num_classes)))
    (root / "parts" / "parts.txt").write_text("".join(f"{m + 1} {n}\n" for m, n in enumerate(data.part_names)))
    (root / "parts" / "part_locs.txt").write_text("\n".join(lines["locs"]) + "\n")
    return root
