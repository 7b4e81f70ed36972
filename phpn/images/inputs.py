"""What the Python API accepts as a model's images, besides a folder on disk.

- a ``torch.utils.data.DataLoader`` yielding ``(images, labels)`` batches;
- a ``Dataset`` (or any sequence) yielding ``(image, label)`` pairs, where the image is a PIL
  image (preprocessed by phpn) or a tensor already preprocessed by the caller.

Labels are the model's class indices. Either becomes an :class:`phpn.images.folders.ImageFolderData`
whose ``root`` is an :class:`InMemoryImages` store: discovery and the certificate read it
through :func:`phpn.images.batches.load_batch` exactly as they read a folder, so every step after this
one is the same for files and for objects.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from PIL import Image

from phpn.config import class_name
from phpn.errors import ConfigError, DataError
from phpn.images.folders import ClassImages, ImageFolderData
from phpn.images.preprocess import Preprocess

KEY_PREFIX = "memory"
# A DataLoader's images are held in memory (it can only be read in its own order); past this
# size phpn stops and asks for a cap, a Dataset (read by index) or a folder instead.
MAX_LOADER_BYTES = 8 * 2 ** 30


def _key(label: int, n: int) -> str:
    return f"{KEY_PREFIX}/{label}/{n:06d}"


@dataclass(frozen=True)
class TensorInput:
    """Stands in for :class:`phpn.images.preprocess.Preprocess` when the caller preprocessed the images.

    phpn then knows the input's shape but not how to turn a picture into it, so explaining a
    file or a PIL image asks for a real preprocessing spec instead of guessing one.
    """

    channels: int
    height: int
    width: int

    @property
    def crop(self) -> int:
        return self.height

    @property
    def input_size(self) -> tuple:
        return (self.channels, self.height, self.width)

    def to_dict(self) -> dict:
        return {"given": "preprocessed tensors", "channels": self.channels, "size": [self.height, self.width]}

    @classmethod
    def from_dict(cls, d: dict) -> "TensorInput":
        channels, (height, width) = int(d["channels"]), (int(v) for v in d["size"])
        if min(channels, height, width) < 1:
            raise ValueError(f"input size {channels}x{height}x{width} is not positive")
        return cls(channels, height, width)

    def _refuse(self, *_args, **_kwargs):
        raise ConfigError("These images were given as preprocessed tensors, so phpn does not know how to "
                          "preprocess a picture for this model.",
                          "Pass a preprocessed tensor, or give preprocess=phpn.Preprocess(resize=..., crop=..., "
                          "mean=..., std=...) to phpn.open_model or phpn.decompose.")

    geometry = normalise = __call__ = _refuse


# The picture a transform is probed with to learn the input size it gives (decompose re-probes
# with the data's first picture when that gives another size).
TRANSFORM_PROBE = (256, 256)


# torchvision's transforms that draw at random on every call (besides every Random* one).
_RANDOM_STEPS = {"ColorJitter", "GaussianBlur", "AutoAugment", "RandAugment", "TrivialAugmentWide", "AugMix",
                 "ElasticTransform", "RandomErasing"}


def is_deterministic(transform) -> bool:
    """Whether a transform (a ``Compose``, nested or not) has no random step: the same picture
    always gives the same tensor."""
    steps = getattr(transform, "transforms", None)
    if isinstance(steps, (list, tuple)):
        return all(is_deterministic(step) for step in steps)
    name = type(transform).__name__
    return not (name.startswith("Random") or name in _RANDOM_STEPS)


class TransformInput:
    """A torchvision transform (``transforms.Compose([...])`` or any callable from a PIL image to
    a (C, H, W) tensor) given as the preprocessing: applied as given to every picture, and
    recorded (its text) in the run. Its ``Normalize`` step, when it has one, gives the mean and
    std that turn a preprocessed image back into a picture."""

    def __init__(self, transform, input_size: Optional[tuple] = None):
        self.transform = transform
        if input_size is None:
            input_size = tuple(self(Image.new("RGB", TRANSFORM_PROBE, (128, 128, 128))).shape)
        self.channels, self.height, self.width = (int(v) for v in input_size)
        steps = getattr(transform, "transforms", [transform])
        normalize = next((t for t in steps if hasattr(t, "mean") and hasattr(t, "std")), None)
        self.mean = [float(v) for v in normalize.mean] if normalize is not None else None
        self.std = [float(v) for v in normalize.std] if normalize is not None else None

    @property
    def crop(self) -> int:
        return self.height

    @property
    def input_size(self) -> tuple:
        return (self.channels, self.height, self.width)

    @property
    def source(self) -> str:
        return "a transform given in Python"

    def resized(self, input_size: tuple) -> "TransformInput":
        return TransformInput(self.transform, input_size)

    def __call__(self, image) -> torch.Tensor:
        try:
            out = self.transform(image)
        except Exception as exc:  # the transform's own error, named
            raise DataError(f"The preprocess transform failed on an image ({type(exc).__name__}: "
                            f"{' '.join(str(exc).split())[:300]}).",
                            "Pass preprocess= a transform that takes a PIL image, e.g. transforms.Compose([...]).") \
                from None
        if not isinstance(out, torch.Tensor) or out.ndim != 3:
            raise ConfigError(f"The preprocess transform returned {type(out).__name__} "
                              f"{tuple(getattr(out, 'shape', ()))}, not a (channels, height, width) tensor.",
                              "End the transform with transforms.ToTensor() (and Normalize), or "
                              "transforms.v2.ToImage() and ToDtype(torch.float32, scale=True).")
        return out.float()

    def geometry(self, image) -> Image.Image:
        """The picture the model sees: the transform's output, un-normalised."""
        x = self(image)
        if self.mean is not None and len(self.mean) == x.shape[0]:
            x = x * torch.tensor(self.std)[:, None, None] + torch.tensor(self.mean)[:, None, None]
        else:
            lo, hi = float(x.min()), float(x.max())
            x = (x - lo) / (hi - lo) if hi > lo else torch.zeros_like(x)
        arr = (x.clamp(0, 1).numpy().transpose(1, 2, 0) * 255).round().astype(np.uint8)
        return Image.fromarray(arr[:, :, 0], "L").convert("RGB") if arr.shape[2] == 1 else \
            Image.fromarray(arr[:, :, :3], "RGB")

    def to_dict(self) -> dict:
        return {"given": "a transform", "transform": " ".join(repr(self.transform).split())[:4000],
                "channels": self.channels, "size": [self.height, self.width]}

    def describe(self) -> str:
        return f"the transform given in Python: {self.to_dict()['transform']}"


def is_preprocess_spec(pre) -> bool:
    """A Preprocess (or the tensor stand-in): something that says what the model's input is."""
    return hasattr(pre, "to_dict") and hasattr(pre, "crop")


def _field_names() -> list:
    return list(Preprocess().to_dict())


def merge_preprocess(base, overrides: Optional[dict] = None, how: str = "changed by hand"):
    """``base`` (a Preprocess) with some of its fields changed; None values are ignored.

    The one rule for partial preprocessing, used by the CLI's flags, the app's settings and the
    Python API's dicts:

    - a crop without a resize keeps ``base``'s resize-to-crop ratio: resize = round(crop x
      base.resize / base.crop), so over the usual 256/224 a crop of 200 resizes to 229 and a
      crop of 288 to 329 (what timm's crop_pct and torchvision's recipes do);
    - a mean and std of one length, without channels, set the channels; a change of channels
      without a mean or std gives the neutral 0.5 / 0.25 per channel.
    """
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    names = _field_names()
    unknown = set(overrides) - set(names)
    if unknown:
        raise ConfigError(f"Unknown preprocessing setting(s): {', '.join(sorted(unknown))}.",
                          f"Use: {', '.join(names)}.")
    if not overrides:
        return base
    values = base.to_dict()
    values.update(overrides)
    if "source" not in overrides:
        values["source"] = f"{base.source or 'defaults'}; {how}: {', '.join(sorted(overrides))}"
    if "channels" not in overrides and "mean" in overrides and "std" in overrides \
            and len(overrides["mean"]) == len(overrides["std"]):
        values["channels"] = len(overrides["mean"])
    channels = int(values["channels"])
    if channels != base.channels:
        if "mean" not in overrides:
            values["mean"] = [0.5] * channels
        if "std" not in overrides:
            values["std"] = [0.25] * channels
    if "crop" in overrides and "resize" not in overrides:
        crop = int(overrides["crop"])
        if crop > 0:  # else the crop's own check names the problem
            values["resize"] = max(crop, int(crop * base.resize / base.crop + 0.5))
    for name in ("mean", "std"):
        values[name] = [float(v) for v in values[name]]
    return Preprocess.from_dict(values)


def as_preprocess(spec):
    """A ``Preprocess`` from a Preprocess, a dict of its fields (over phpn's defaults, by
    :func:`merge_preprocess`), a torchvision transform (:class:`TransformInput`), or None."""
    if spec is None or is_preprocess_spec(spec):
        return spec
    if isinstance(spec, dict):
        return merge_preprocess(Preprocess(source="phpn's defaults"), spec, how="given by the caller")
    if callable(spec):
        return TransformInput(spec)
    raise ConfigError(f"preprocess must be a phpn.Preprocess, a dict of its fields or a torchvision transform, "
                      f"not {type(spec).__name__}.",
                      "For example preprocess=transforms.Compose([...]) or preprocess={'resize': 256, 'crop': 224, "
                      "'mean': [...], 'std': [...]}.")


def module_sha256(model: torch.nn.Module) -> str:
    """A digest of a live model's weights and buffers, so a run remembers which model it decomposed."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _label(value, where: str) -> int:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise DataError(f"{where}: a label must be one class index, got a tensor of shape {tuple(value.shape)}.",
                            "Yield (image, class index) pairs.")
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        if isinstance(value, float) and float(value).is_integer():
            return int(value)
        raise DataError(f"{where}: a label must be a class index (an integer), got {type(value).__name__} {value!r}.",
                        "Yield (image, class index) pairs whose index is the model's output for that class.")
    return int(value)


def _image(item, where: str):
    """A PIL image or a (C, H, W) float tensor from one dataset item's image."""
    if isinstance(item, Image.Image):
        return item
    if isinstance(item, np.ndarray):
        item = torch.from_numpy(item)
    if isinstance(item, torch.Tensor):
        if item.ndim == 4 and item.shape[0] == 1:
            item = item[0]
        if item.ndim != 3:
            raise DataError(f"{where}: an image tensor must be (channels, height, width), got shape "
                            f"{tuple(item.shape)}.", "Yield one preprocessed image per item.")
        return item.detach().cpu().float()
    raise DataError(f"{where}: an image must be a PIL image or a preprocessed tensor, not {type(item).__name__}.",
                    "Return (PIL.Image, label) or (tensor (C, H, W), label) from the dataset.")


class InMemoryImages:
    """Images held by the caller, addressed by keys like file paths (``memory/<class>/<n>``).

    Tensors are kept as given; PIL images are preprocessed when a batch is read. A Dataset is
    read again by index when a batch is needed, so its images are not all held in memory.
    """

    def __init__(self, description: str):
        self.description = description
        self._items = {}  # key -> tensor, PIL image, or ("dataset index", i)
        self._dataset = None

    def __str__(self) -> str:
        return self.description

    def add(self, key: str, item) -> None:
        self._items[key] = item

    def get(self, key: str, preprocess) -> torch.Tensor:
        item = self._items[key]
        if isinstance(item, tuple):
            item = _image(_pair(self._dataset[item[1]], f"item {item[1]}")[0], f"item {item[1]}")
        if isinstance(item, Image.Image):
            return preprocess(item.convert("RGB"))
        return item

    def load_batch(self, keys, preprocess):
        """Same contract as :func:`phpn.images.batches.load_batch`: (tensor (n, C, H, W), kept keys, skipped)."""
        tensors, kept, skipped = [], [], []
        for key in keys:
            try:
                tensors.append(self.get(key, preprocess))
                kept.append(key)
            except KeyError:
                skipped.append((key, "not in this image store"))
        if not tensors:
            return torch.empty(0), kept, skipped
        shapes = {tuple(t.shape) for t in tensors}
        if len(shapes) > 1:
            raise DataError(f"The images have different shapes ({', '.join(str(s) for s in sorted(shapes))}).",
                            "Preprocess them to one size (resize and centre-crop) before passing them.")
        return torch.stack(tensors), kept, skipped


def _pair(item, where: str) -> tuple:
    if isinstance(item, dict):
        for a, b in (("image", "label"), ("pixel_values", "label"), ("pixel_values", "labels"), ("img", "label")):
            if a in item and b in item:
                return item[a], item[b]
    if not isinstance(item, (tuple, list)) or len(item) < 2:
        raise DataError(f"{where} is a {type(item).__name__}, not an (image, label) pair.",
                        "Make the dataset return (image, class index), like torchvision's ImageFolder.")
    return item[0], item[1]


def _check_label(label: int, num_classes: int, where: str) -> None:
    if not 0 <= label < num_classes:
        raise DataError(f"{where}: label {label} is not a class of the model (it has {num_classes} classes, "
                        f"0 to {num_classes - 1}).", "Labels must be the model's own output indices.")


def _as_data(store: InMemoryImages, keys_by_class: dict, names) -> ImageFolderData:
    if not keys_by_class:
        raise DataError(f"{store} yielded no images.", "Pass a dataset or loader with at least one labelled image.")
    classes = [ClassImages(folder=_folder_name(c, names), class_index=c, paths=keys)
               for c, keys in sorted(keys_by_class.items())]
    return ImageFolderData(root=store, classes=classes, skipped=[])


def _folder_name(c: int, names) -> str:
    return class_name(names, c)


def loader_batch(batch, b: int, num_classes: int) -> tuple:
    """One DataLoader batch as (images (n, C, H, W), labels (n,) long), each label one of the model's classes."""
    images, labels = _pair(batch, f"batch {b}")
    if isinstance(images, torch.Tensor) and images.ndim == 3:
        images = images[None]
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise DataError(f"batch {b}: images must be a tensor (batch, channels, height, width), got "
                        f"{type(images).__name__} {tuple(getattr(images, 'shape', ()))}.",
                        "Give the DataLoader a transform that returns tensors (e.g. ToTensor + Normalize).")
    labels = torch.as_tensor(labels).reshape(-1)
    if labels.numel() != images.shape[0]:
        raise DataError(f"batch {b} has {images.shape[0]} images but {labels.numel()} labels.",
                        "Yield one label per image.")
    checked = []
    for label in labels.tolist():
        label = _label(label, f"batch {b}")
        _check_label(label, num_classes, f"batch {b}")
        checked.append(label)
    return images, torch.tensor(checked, dtype=torch.long)


def from_loader(loader, *, num_classes: int, images_per_class: Optional[int] = None,
                class_names=None, max_bytes: int = MAX_LOADER_BYTES) -> ImageFolderData:
    """Gather a DataLoader's ``(images, labels)`` batches by class (the first ``images_per_class`` of each)."""
    store = InMemoryImages(f"in-memory DataLoader ({type(getattr(loader, 'dataset', loader)).__name__})")
    keys: dict = {}
    held = 0
    for b, batch in enumerate(loader):
        images, labels = loader_batch(batch, b, num_classes)
        for image, label in zip(images, labels.tolist()):
            have = keys.setdefault(label, [])
            if images_per_class is None or len(have) < images_per_class:
                key = _key(label, len(have))
                store.add(key, image.detach().cpu().float().clone())
                have.append(key)
                held += image.numel() * 4
                if held > max_bytes:
                    raise DataError(f"The DataLoader's images take more than {max_bytes / 2 ** 30:.0f} GiB of "
                                    "memory, which phpn would hold for discovery.",
                                    "Pass images_per_class=N, or give the Dataset itself (read by index, not held) "
                                    "or an image folder.")
    return _as_data(store, keys, class_names)


def _targets(dataset) -> Optional[list]:
    """The labels a dataset states without reading its images (torchvision's ``targets``), through
    ``Subset`` and ``random_split`` too (their ``indices`` into ``.dataset``); None when it has none."""
    targets = getattr(dataset, "targets", None)
    if targets is None and hasattr(dataset, "indices") and hasattr(dataset, "dataset"):
        parent = _targets(dataset.dataset)
        targets = [parent[int(i)] for i in dataset.indices] if parent is not None else None
    if targets is not None and len(targets) != len(dataset):
        return None
    return targets


def from_dataset(dataset, *, num_classes: int, images_per_class: Optional[int] = None,
                 class_names=None) -> ImageFolderData:
    """Index a Dataset of ``(image, label)`` pairs by class; images are read again when needed."""
    store = InMemoryImages(f"in-memory {type(dataset).__name__} ({len(dataset)} items)")
    store._dataset = dataset
    targets = _targets(dataset)
    keys: dict = {}
    for i in range(len(dataset)):
        where = f"item {i}"
        if targets is not None:
            label = _label(targets[i], where)
        else:
            image, label = _pair(dataset[i], where)
            label = _label(label, where)
        _check_label(label, num_classes, where)
        have = keys.setdefault(label, [])
        if images_per_class is None or len(have) < images_per_class:
            key = _key(label, len(have))
            store.add(key, ("dataset index", i))
            have.append(key)
    return _as_data(store, keys, class_names)


def first_image(data: ImageFolderData, preprocess) -> torch.Tensor:
    """The first image of ``data`` as the model gets it: its shape tells the input size."""
    entry = data.classes[0]
    batch, kept, skipped = data.root.load_batch(entry.paths[:1], preprocess)
    if not kept:
        raise DataError(f"The first image could not be read ({skipped[0][1] if skipped else 'unknown'}).", "")
    return batch[0]


def holds_pictures(data: ImageFolderData) -> bool:
    """Whether the first image is a picture that phpn must preprocess (not a tensor)."""
    store = data.root
    entry = data.classes[0]
    item = store._items[entry.paths[0]]
    if isinstance(item, tuple):
        item = _image(_pair(store._dataset[item[1]], f"item {item[1]}")[0], f"item {item[1]}")
    return isinstance(item, Image.Image)


def peek_input_size(data) -> Optional[tuple]:
    """(C, H, W) of the first tensor image a DataLoader or Dataset yields; None for pictures or folders."""
    try:
        if isinstance(data, torch.utils.data.DataLoader):
            images, _ = _pair(next(iter(data)), "batch 0")
            is_batch = isinstance(images, torch.Tensor) and images.ndim == 4
            return tuple(int(v) for v in images.shape[1:]) if is_batch else None
        if hasattr(data, "__getitem__") and hasattr(data, "__len__") and not isinstance(data, (str, bytes)) \
                and len(data):
            image = _image(_pair(data[0], "item 0")[0], "item 0")
            return tuple(int(v) for v in image.shape) if isinstance(image, torch.Tensor) else None
    except (StopIteration, DataError):
        return None  # the full read that follows reports the problem
    return None


# --- images handed to explain: what a PyTorch user holds ---------------------------------------

def _picture_of_array(array: np.ndarray, where: str) -> Image.Image:
    """An 8-bit array as a picture: (H, W), (H, W, C) or (C, H, W) with C in 1, 3, 4."""
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # CHW -> HWC
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise DataError(f"{where}: an 8-bit image array must be (height, width), (height, width, channels) or "
                        f"(channels, height, width), got shape {tuple(array.shape)}.",
                        "Pass one picture as a numpy array of shape (H, W, 3), or a list of them.")
    return Image.fromarray(np.ascontiguousarray(array))


def _tensor_for_model(x: torch.Tensor, input_size: Optional[tuple], where: str) -> torch.Tensor:
    """A float image tensor as (C, H, W) for a model taking ``input_size``: a (H, W, C) one is turned
    round when its last axis is the model's channel count; any other channel count is refused."""
    x = x.detach().cpu().float()
    channels = int(input_size[0]) if input_size else None
    if x.ndim == 2 and channels == 1:
        x = x[None]
    if x.ndim != 3:
        raise DataError(f"{where}: an image tensor must be (channels, height, width), got shape {tuple(x.shape)}.",
                        "Pass one preprocessed image (C, H, W), a batch (N, C, H, W) or a list of images.")
    if channels is not None and x.shape[0] != channels:
        if x.shape[-1] == channels:
            return x.permute(2, 0, 1).contiguous()  # (H, W, C), as numpy and matplotlib hold images
        raise DataError(f"{where}: the image has shape {tuple(x.shape)}, but the model takes {channels} channels "
                        f"(input {tuple(input_size)}).",
                        f"Pass a ({channels}, H, W) tensor preprocessed as for the model, or a PIL image.")
    return x


def explain_inputs(image, input_size: Optional[tuple] = None) -> tuple:
    """What ``run.explain`` was given -> ([one image each], batched). An image is a path, a file
    object, a PIL image, a numpy array (8-bit: a picture; float: a preprocessed image, HWC or
    CHW) or a tensor (C, H, W) or (H, W, C); a batch is a tensor (N, C, H, W) or a list of images.
    Each item becomes a path/file/PIL picture or a (C, H, W) float tensor."""
    if isinstance(image, (list, tuple)):
        if not image:
            raise DataError("The list of images is empty.", "Pass at least one image.")
        return [explain_input(item, input_size, f"image {i}") for i, item in enumerate(image)], True
    if isinstance(image, np.ndarray) and image.dtype != np.uint8:
        image = torch.from_numpy(np.ascontiguousarray(image))
    if isinstance(image, torch.Tensor) and image.ndim == 4 and image.dtype != torch.uint8:
        return [explain_input(x, input_size, f"image {i}") for i, x in enumerate(image)], True
    return [explain_input(image, input_size, "the image")], False


def explain_input(image, input_size: Optional[tuple] = None, where: str = "the image"):
    """One image for :func:`explain_inputs` (a 4-D tensor of one image is that image)."""
    if isinstance(image, np.ndarray):
        if image.dtype == np.uint8:
            return _picture_of_array(image, where)
        if image.dtype == object or not np.issubdtype(image.dtype, np.number):
            raise DataError(f"{where}: a numpy array of {image.dtype} is not an image.",
                            "Pass an 8-bit picture (H, W, 3) or a float array preprocessed as for the model.")
        image = torch.from_numpy(np.ascontiguousarray(image))
    if isinstance(image, torch.Tensor):
        if image.ndim == 4 and image.shape[0] == 1:
            image = image[0]
        if image.dtype == torch.uint8:  # an 8-bit picture (torchvision's read_image gives CHW uint8)
            return _picture_of_array(image.cpu().numpy(), where)
        return _tensor_for_model(image, input_size, where)
    if isinstance(image, Image.Image) or hasattr(image, "read") or isinstance(image, str) \
            or hasattr(image, "__fspath__"):
        return image
    raise DataError(f"{where} is a {type(image).__name__}, which phpn cannot read as an image.",
                    "Pass a file path, a PIL image, a numpy array or a tensor (C, H, W), or a list or batch of them.")
