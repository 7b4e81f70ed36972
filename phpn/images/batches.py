"""Batches: images read in decoding workers (Pillow on the CPU, or JPEG bytes decoded on the
model's CUDA device) while the model runs, in order, unreadable files skipped and reported."""
from __future__ import annotations

import io
import os
import threading
import warnings
from pathlib import Path
from typing import Optional, Sequence

import torch
from PIL import Image

from phpn.config import DECODES
from phpn.errors import ConfigError, DataError
from phpn.images.preprocess import (
    Preprocess,
    load_image,
)


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
