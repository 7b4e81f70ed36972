"""Pictures of what the model saw: a preprocessed tensor shown as an image, and a discovery
image read back from a folder or from the Python API's in-memory store."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

from phpn.images.preprocess import load_image


def picture_of_tensor(x, preprocess) -> Image.Image:
    """A preprocessed (C, H, W) tensor as a picture: un-normalised when the mean/std are known,
    else rescaled to its own range."""
    x = x.detach().float().cpu()
    mean, std = getattr(preprocess, "mean", None), getattr(preprocess, "std", None)
    if mean is not None and std is not None and len(mean) == x.shape[0]:
        x = (x * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]).clamp(0, 1)
    else:
        lo, hi = float(x.min()), float(x.max())
        x = (x - lo) / (hi - lo) if hi > lo else torch.zeros_like(x)
    arr = (x.numpy().transpose(1, 2, 0) * 255).round().astype(np.uint8)
    if arr.shape[2] == 1:
        return Image.fromarray(arr[:, :, 0], "L").convert("RGB")
    return Image.fromarray(arr[:, :, :3], "RGB")


def sees_grey(preprocess) -> bool:
    """Whether the model is given a grey image: a 1-channel model, or the grey colour setting."""
    return getattr(preprocess, "channels", 3) == 1 or getattr(preprocess, "colour", "rgb") == "grey"


def in_model_colours(picture: Image.Image, preprocess) -> Image.Image:
    """A picture (already resized and cropped) in the colours the model gets: grey (in three
    equal channels, so that maps are drawn over it in colour) when the model reads grey."""
    return picture.convert("L").convert("RGB") if sees_grey(preprocess) else picture.convert("RGB")


def seen_picture(image: Image.Image, preprocess) -> Image.Image:
    """An image as the model sees it, before normalisation: resized and cropped, in its colours."""
    return in_model_colours(preprocess.geometry(image), preprocess)


def seen_image(source, key: str, preprocess) -> Optional[Image.Image]:
    """A discovery image as the model saw it, from a folder or an in-memory store; None if unreadable."""
    if source is None:
        return None
    try:
        if hasattr(source, "get"):  # phpn.images.inputs.InMemoryImages
            item = source.get(key, preprocess)
            return picture_of_tensor(item, preprocess)
        return seen_picture(load_image(Path(source) / key), preprocess)
    except Exception:  # a missing or unreadable image only loses its tile
        return None
