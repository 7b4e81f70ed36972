"""Hugging Face ``transformers`` image classifiers from a local model folder.

The folder is what ``model.save_pretrained(folder)`` (and the image processor's
``save_pretrained``) write: ``config.json``, the weights in ``model.safetensors`` (or
``pytorch_model.bin``, or shards listed in an ``*.index.json``), and optionally
``preprocessor_config.json``. Nothing is downloaded and no code from the folder runs: the
architecture is built from ``config.json`` by transformers' own classes (a config that asks
for custom code, ``auto_map``, is refused), and the weights are read as tensors only
(safetensors, or ``torch.load(weights_only=True)``).

A transformers model returns an output object; phpn wraps it in :class:`LogitsOnly`, whose
``forward`` returns ``.logits``, so the head finder sees an ordinary classifier. Class names
come from ``config.id2label`` and preprocessing from the image processor's settings.

transformers is optional (``pip install 'phpn[hf]'``).
"""
from __future__ import annotations

import hashlib
import json
import sys
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from phpn.errors import CheckpointError, ConfigError
from phpn.head import LoadedModel
from phpn.images.preprocess import Preprocess
from phpn.models.checkpoint import check_safetensors_header, file_sha256, read_checkpoint
from phpn.models.user_code import format_mismatch

INSTALL_HINT = "Install transformers (pip install 'phpn[hf]', or pip install transformers) and try again."
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
SHARD_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
# Pillow's resampling numbers, as image processors store them.
_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}
_PIL_RESAMPLE_NAMES = {1: "lanczos", 4: "box", 5: "hamming"}
_DEFAULT_LABEL = "LABEL_"
# More classes than any image classifier has (ImageNet-21k: 21,843); transformers builds a dict
# per label, so a config asking for millions costs minutes before anything fails.
MAX_NUM_LABELS = 100_000


def is_model_folder(path) -> bool:
    """A folder given as the checkpoint: phpn reads it as a Hugging Face model folder."""
    return path is not None and Path(path).is_dir()


def require_transformers():
    try:
        import transformers  # noqa: PLC0415 - optional dependency
    except ImportError:
        raise ConfigError("This is a Hugging Face model folder, but transformers is not installed.",
                          INSTALL_HINT) from None
    return transformers


class LogitsOnly(nn.Module):
    """A transformers classifier whose ``forward(images)`` returns the logits tensor only."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


def logits_only(model: nn.Module) -> nn.Module:
    """A live transformers classifier wrapped in :class:`LogitsOnly`; any other module as it is."""
    transformers = sys.modules.get("transformers")  # a transformers model means it is imported already
    if transformers is not None and isinstance(model, transformers.PreTrainedModel):
        return LogitsOnly(model)
    return model


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path.name} in {path.parent} is not readable JSON ({type(exc).__name__}: {exc}).",
                              f"Re-save the {what} with save_pretrained.") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path.name} in {path.parent} does not hold a JSON object.",
                              f"Re-save the {what} with save_pretrained.")
    return data


def check_config_budget(raw: dict, where: str = "config.json") -> None:
    """Refuse a model config asking for more labels than any classifier has, before transformers
    builds anything from it (``num_labels``, ``id2label``, ``label2id``)."""
    counts = []
    for key in ("id2label", "label2id"):
        if isinstance(raw.get(key), dict):
            counts.append(len(raw[key]))
    value = raw.get("num_labels")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        counts.append(value)
    if counts and max(counts) > MAX_NUM_LABELS:
        raise CheckpointError(f"{where} asks for {int(max(counts)):,} labels, more than the {MAX_NUM_LABELS:,} limit "
                              "(num_labels) for an image classifier.",
                              "Check num_labels and id2label in config.json, and save the model again.")


def _weights_sha256(path: Path) -> str:
    """The file's sha256. A ``.safetensors`` file cannot run code, so its hash is all phpn needs
    before transformers reads it (after its header is checked for size); a ``.bin`` is read here
    first, through the weights-only check."""
    if path.suffix.lower() == ".safetensors":
        if not path.is_file():
            raise CheckpointError(f"The weights file {path} does not exist.", "Re-save the model with save_pretrained.")
        check_safetensors_header(path)
        return file_sha256(path)
    return read_checkpoint(path).sha256


def weight_files(folder: Path) -> list:
    """The weights files phpn reads from the folder: the shards an index lists, or one file."""
    folder = Path(folder)
    for name in SHARD_INDEXES:
        index = folder / name
        if index.is_file():
            files = sorted(set(_read_json(index, "model").get("weight_map", {}).values()))
            if not files:
                raise CheckpointError(f"{name} lists no weight files.", "Re-save the model with save_pretrained.")
            return files
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return [name]
    raise CheckpointError(f"The model folder {folder} has config.json but no weights "
                          f"({' or '.join(WEIGHT_FILES)}).", "Save the model with model.save_pretrained(folder).")


def pickled_weights(files: list) -> list:
    """The files among ``files`` that are pickles (``.bin``), not safetensors."""
    return [f for f in files if not str(f).lower().endswith(".safetensors")]


def weights_sha256(folder: Path) -> tuple:
    """``(sha256, files)``: of one weights file, or of the shards an index lists (the sha256 of
    several shards is that of their hashes in order)."""
    files = weight_files(folder)
    if not any((folder / name).is_file() for name in SHARD_INDEXES):  # one file: its own sha256
        return _weights_sha256(folder / files[0]), files
    digest = hashlib.sha256()
    for file in files:
        digest.update(_weights_sha256(folder / file).encode())
    return digest.hexdigest(), files


def load_model_folder(folder, num_classes: Optional[int] = None) -> LoadedModel:
    """Build the folder's transformers classifier and load its weights (eval mode, CPU)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} is a folder without config.json, so it is not a Hugging Face model folder.",
                              "Give a checkpoint file (.pt, .pth, .bin, .safetensors), or the folder that "
                              "save_pretrained wrote.")
    raw = _read_json(folder / "config.json", "model")
    if raw.get("auto_map"):
        raise CheckpointError(f"{folder.name}/config.json asks for the model's own code (auto_map), which phpn "
                              "does not run from a model folder.",
                              "Use a model type that transformers ships, or load the model yourself and pass it "
                              "to phpn as a module.")
    check_config_budget(raw, f"{folder.name}/config.json")
    for name in weight_files(folder):  # costly headers refused before transformers is even imported
        if str(name).lower().endswith(".safetensors") and (folder / name).is_file():
            check_safetensors_header(folder / name)
    transformers = require_transformers()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
        except Exception as exc:
            raise CheckpointError(f"transformers could not read {folder.name}/config.json "
                                  f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}).",
                                  "Check that it was written by save_pretrained with a recent transformers.") from None
    # Hashed here first; a .bin must also pass the weights-only check before transformers opens it.
    sha256, files = weights_sha256(folder)
    model = _from_pretrained(folder, raw, transformers)
    rows = int(config.num_labels)
    if num_classes is not None and int(num_classes) != rows:
        raise CheckpointError(f"You asked for {num_classes} classes but the model folder's classifier has {rows} "
                              f"(config.json num_labels / id2label).", f"Drop --num-classes or set it to {rows}.")
    arch = "hf/" + (config.architectures[0] if getattr(config, "architectures", None) else type(model).__name__)
    pre, pre_notes = preprocess_of_folder(folder)
    notes = [f"Hugging Face {type(model).__name__} from {folder.name}/config.json and {', '.join(files)}; "
             "phpn reads its .logits"] + pre_notes
    return LoadedModel(model=LogitsOnly(model).eval(), arch=arch, num_classes=rows, sha256=sha256, preprocess=pre,
                       class_names=class_names(config, rows), source=str(folder), notes=notes)


def _from_pretrained(folder: Path, raw: dict, transformers) -> nn.Module:
    # transformers maps the names older versions saved (e.g. Swin's attention.self.key) to the
    # current ones, so it loads the weights itself: from the local folder only (local_files_only,
    # never the hub), no remote code, every key checked.
    logging = transformers.utils.logging
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()  # phpn reports what did not fit itself, below
    logging.disable_progress_bar()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            # ignore_mismatched_sizes: report wrong shapes in ``info`` (refused below) instead of raising
            model, info = transformers.AutoModelForImageClassification.from_pretrained(
                str(folder), local_files_only=True, trust_remote_code=False, output_loading_info=True,
                ignore_mismatched_sizes=True)
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"The model type '{raw.get('model_type')}' in {folder.name}/config.json is not an "
                                  f"image classifier transformers knows ({str(exc).splitlines()[0][:200]}).",
                                  "Give a model saved from an AutoModelForImageClassification class.") from None
        except Exception as exc:
            raise CheckpointError(f"transformers could not load the model in {folder.name} "
                                  f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}).",
                                  "Re-save it with save_pretrained.") from None
        finally:
            logging.set_verbosity(verbosity)
            if bars:
                logging.enable_progress_bar()
    problem = format_mismatch(sorted(info.get("missing_keys") or []), sorted(info.get("unexpected_keys") or []),
                              [(k, tuple(a), tuple(b)) for k, a, b in (info.get("mismatched_keys") or [])], limit=3)
    if problem:
        raise CheckpointError(f"The weights do not fit the {type(model).__name__} that config.json describes: "
                              f"{problem}.",
                              "Save the classifier (not only its base model) with save_pretrained, and keep "
                              "config.json and the weights from the same save.")
    return model.float().eval()


def class_names(config, rows: int) -> Optional[list]:
    """``config.id2label`` in index order, unless it holds transformers' placeholders (LABEL_0...)."""
    id2label = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
    if sorted(id2label) != list(range(rows)):
        return None
    names = [id2label[i] for i in range(rows)]
    if all(n == f"{_DEFAULT_LABEL}{i}" for i, n in enumerate(names)):
        return None
    return names


def _size(size, key_short: str = "shortest_edge"):
    """('shorter', s) or ('square', h, w) from an image processor's size dict (or int)."""
    if isinstance(size, int):
        return ("square", size, size)
    size = size or {}
    if size.get(key_short):
        return ("shorter", int(size[key_short]))
    if size.get("height") and size.get("width"):
        return ("square", int(size["height"]), int(size["width"]))
    return None


def resize_backend(processor_type: str) -> str:
    """Where this image processor resizes: "...Fast" processors (transformers 4) and the plain ones of
    transformers 5 resize torch tensors; "...Pil" ones and transformers 4's plain ones use Pillow."""
    if processor_type.endswith("Pil"):
        return "pil"
    if processor_type.endswith("Fast"):
        return "tensor"
    try:
        import transformers  # noqa: PLC0415 - optional dependency

        major = int(transformers.__version__.split(".")[0])
    except (ImportError, ValueError):
        major = 5
    return "tensor" if major >= 5 else "pil"


def preprocess_from_processor(settings: dict, source: str) -> tuple:
    """An image processor's settings (its ``to_dict()`` or ``preprocessor_config.json``) as
    ``(Preprocess, notes)``, matching what the processor does to an image."""
    notes = []
    kind = str(settings.get("image_processor_type", ""))
    backend = resize_backend(kind)
    resample = settings.get("resample", 2)
    resample = int(getattr(resample, "value", resample))
    interpolation = _RESAMPLE.get(resample)
    if interpolation is None:
        notes.append(f"the processor's {_PIL_RESAMPLE_NAMES.get(resample, resample)} resampling is not supported; "
                     "phpn uses bicubic")
        interpolation = "bicubic"
    size = _size(settings.get("size"))
    crop_size = _size(settings.get("crop_size"))
    if size is None or not settings.get("do_resize", True):
        raise CheckpointError(f"phpn cannot follow this image processor ({kind}: size {settings.get('size')}).",
                              "Give the preprocessing with --resize, --crop, --mean and --std.")
    if "crop_pct" in settings and size[0] == "shorter":
        # ConvNeXt's processor: below 384 resize to edge/crop_pct then crop; from 384 warp to a square.
        edge = size[1]
        if edge < 384:
            resize, crop, mode = int(edge / float(settings["crop_pct"] or 0.875)), edge, "shorter"
        else:
            resize, crop, mode = edge, edge, "square"
    else:
        mode, resize = size[0], size[1]
        if size[0] == "square" and size[1] != size[2]:
            notes.append(f"the processor resizes to {size[1]}x{size[2]}; phpn uses a {size[1]}x{size[1]} square")
        crop = resize
        if settings.get("do_center_crop") and crop_size is not None:
            crop = crop_size[1]
    # The processor computes ((k * u - offset) - m) / s on u = pixel / 255, with k = 255 * rescale
    # factor: the same as (u - (m + offset) / k) / (s / k).
    normalize = settings.get("do_normalize", True)
    m = tuple(float(v) for v in settings.get("image_mean") or (0.0, 0.0, 0.0)) if normalize else (0.0,) * 3
    s = tuple(float(v) for v in settings.get("image_std") or (1.0, 1.0, 1.0)) if normalize else (1.0,) * 3
    rescale = settings.get("do_rescale", True)
    k = 255.0 * float(settings.get("rescale_factor", 1 / 255)) if rescale else 255.0
    offset = 1.0 if rescale and settings.get("rescale_offset") else 0.0
    mean, std = tuple((mi + offset) / k for mi in m), tuple(si / k for si in s)
    if settings.get("include_top") and normalize:  # EfficientNet's processor divides by std a second time
        std = tuple(a * si for a, si in zip(std, s))
    pre = Preprocess(resize=resize, crop=min(crop, resize), mean=mean, std=std, interpolation=interpolation,
                     resize_mode=mode, backend=backend, crop_offset="floor", source=source)
    return pre, notes


def preprocess_of_folder(folder: Path) -> tuple:
    """``(Preprocess, notes)`` from the folder's image processor, or ImageNet defaults without one."""
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        pre = Preprocess(source="ImageNet defaults (the folder has no preprocessor_config.json)")
        return pre, [f"preprocessing: {pre.describe()}; save the image processor with save_pretrained into the "
                     "folder, or pass --resize/--crop/--mean/--std"]
    settings = _read_json(path, "image processor")
    try:  # the processor class fills in its own defaults for settings the file leaves out
        transformers = require_transformers()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            processor = transformers.AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)
        settings = {**processor.to_dict(), "image_processor_type": type(processor).__name__}
    except Exception:  # read the file as it is
        pass
    pre, notes = preprocess_from_processor(settings, f"{folder.name}/preprocessor_config.json "
                                                     f"({settings.get('image_processor_type', 'image processor')})")
    return pre, [f"preprocessing: {pre.describe()}"] + notes
