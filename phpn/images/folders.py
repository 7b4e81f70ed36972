"""Class folders: an ImageFolder layout (``root/<class>/<image>``) matched to the model's classes.

Class folders are matched to the model's output indices all or nothing: every folder by name
(against the model's class names), or every folder by number (``7``, ``007``, ``00_name``, CUB's
``001.Name``); a partial match is refused with the folders that did not match. When the model
has no class names and the folders are exactly as many as its classes, the sorted folder names
name the classes. The mapping is kept in ``ImageFolderData.class_mapping``. Unreadable files
are skipped and reported, never fatal.
"""
from __future__ import annotations

import difflib
import hashlib
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from PIL import Image

from phpn.errors import ConfigError, DataError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


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
    # How the folders were matched to the model's classes (see match_class_folders); stored in
    # each run's meta as data.class_mapping.
    class_mapping: dict = field(default_factory=dict)
    class_names: Optional[list] = None  # set only when the names were taken from the folders

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
            "class_mapping": self.class_mapping,
        }


MAPPING_BY = {
    "name": "by name (folder names equal the model's class names)",
    "index": "by index (folder names are class numbers counted from 0)",
    "index-from-1": "by index counted from 1 (CUB-style 'NNN.Name' folders)",
    "folder-names": "by sorted folder name (the model has no class names, so the folders name the classes)",
}


def describe_class_mapping(mapping: dict, shown: int = 8) -> str:
    """One line saying how the class folders were matched, for the CLI and the app."""
    if not mapping:
        return "class folders: mapping not recorded"
    folders = mapping.get("folders", {})
    pairs = ", ".join(f"{f} -> {i}" for f, i in list(folders.items())[:shown])
    more = f", ... ({len(folders)} in all)" if len(folders) > shown else ""
    return f"{len(folders)} class folders matched {MAPPING_BY.get(mapping.get('by'), mapping.get('by'))}: {pairs}{more}"


def _name_key(text: str) -> str:
    """Compare names ignoring case, spaces and punctuation: 'ankle_boot' = 'Ankle boot',
    't-shirt-top' = 'T-shirt/top'."""
    return "".join(ch for ch in text.casefold() if ch.isalnum())


def _folder_number(folder: str) -> Optional[tuple]:
    """(number, separator, rest) for '7', '007', '00_t-shirt-top', '001.Black_footed_Albatross'."""
    for sep in (".", "_"):
        head, found, rest = folder.partition(sep)
        if found and head.isdigit() and rest:
            return int(head), sep, rest
    return (int(folder), "", "") if folder.isdigit() else None


def _match_by_name(folders: list, class_names: Sequence[str]) -> tuple:
    """({folder: index}, {folder: [candidate indices]} for ambiguous names)."""
    lookup: dict = {}
    for i, name in enumerate(class_names):
        lookup.setdefault(_name_key(str(name)), []).append(i)
    found, ambiguous = {}, {}
    for folder in folders:
        hits = lookup.get(_name_key(folder), [])
        if len(hits) == 1:
            found[folder] = hits[0]
        elif hits:
            ambiguous[folder] = hits
    return found, ambiguous


def _match_by_index(folders: list, class_names: Optional[Sequence[str]]) -> tuple:
    """({folder: index}, how) when every folder is numbered, else ({...partial}, None).

    Plain numbers and 'NN_name' count from 0; CUB's 'NNN.Name' counts from 1. When the model
    has class names, the name after the number decides instead.
    """
    found, bases = {}, set()
    for folder in folders:
        parsed = _folder_number(folder)
        if parsed is None:
            continue
        number, sep, rest = parsed
        base = 1 if sep == "." else 0
        if rest and class_names is not None:
            for candidate in (0, 1):
                i = number - candidate
                if 0 <= i < len(class_names) and _name_key(str(class_names[i])) == _name_key(rest):
                    base = candidate
                    break
        bases.add(base)
        found[folder] = number - base
    how = None
    if len(found) == len(folders):
        how = "index-from-1" if bases == {1} else "index" if bases == {0} else None
    return found, how


def match_class_folders(folders: Sequence[str], class_names: Optional[Sequence[str]] = None,
                        num_classes: Optional[int] = None) -> tuple:
    """Map class folder names to the model's class indices, all or nothing.

    Every folder matches by name, or every folder by index; otherwise a DataError lists the
    folders that did not match, the names expected and a suggestion. When the model has no
    class names and there are exactly as many folders (not numbered) as classes, the sorted
    folder names become the class names. Returns ``(indices, how, names_from_folders)``:
    ``how`` is a key of MAPPING_BY; ``names_from_folders`` is None unless the folders name
    the classes.
    """
    folders = list(folders)
    if class_names is not None and num_classes is None:
        num_classes = len(class_names)
    if class_names is not None and num_classes is not None and len(class_names) != num_classes:
        raise DataError(f"The class-names list has {len(class_names)} names but the model has {num_classes} classes.",
                        "Give one name per class, in the model's class order.")
    by_name, ambiguous = ({}, {}) if class_names is None else _match_by_name(folders, class_names)
    by_index, index_how = _match_by_index(folders, class_names)

    if class_names is not None and len(by_name) == len(folders):
        indices, how = [by_name[f] for f in folders], "name"
    elif index_how is not None:
        indices, how = [by_index[f] for f in folders], index_how
        limit = num_classes
        bad = [f for f, i in zip(folders, indices) if i < 0 or (limit is not None and i >= limit)]
        if bad:
            numbers = sorted(_folder_number(f)[0] for f in folders)
            hint = "Name the folders by class index, 0 to {}.".format((limit or 1) - 1)
            if how == "index" and limit is not None and numbers[0] >= 1 and numbers[-1] == limit:
                hint = (f"The folders look numbered from 1 (1 to {limit}): rename them 0 to {limit - 1}, "
                        "or name them by class name.")
            raise DataError(f"These class folders name classes the model does not have (it has {limit} classes, "
                            f"numbered 0 to {limit - 1}): {', '.join(bad[:10])}.", hint)
    elif class_names is None and not by_index and (num_classes is None or len(folders) == num_classes):
        return list(range(len(folders))), "folder-names", list(folders)
    elif class_names is None:
        unmatched = [f for f in folders if f not in by_index]
        if by_index:
            raise DataError(f"Some class folders are numbered and others are not: {', '.join(unmatched[:10])} "
                            "have no class number.", "Name every folder by its class index (0, 1, ...), or none.")
        raise DataError(
            f"The image folder has {len(folders)} class folders but the model has {num_classes} classes, "
            "and the folder names are neither class numbers nor class names.",
            "Name each folder by its class index (0, 1, ...) or provide a class-names file.",
        )
    else:
        raise DataError(*_unmatched_message(folders, by_name, ambiguous, by_index, class_names))
    if len(set(indices)) != len(indices):
        dup = sorted({i for i in indices if indices.count(i) > 1})
        pairs = [f for f, i in zip(folders, indices) if i in dup]
        raise DataError(f"Two class folders map to the same model class: {', '.join(pairs[:10])}.",
                        "Merge or rename them.")
    return indices, how, None


def _unmatched_message(folders, by_name, ambiguous, by_index, class_names) -> tuple:
    unmatched = [f for f in folders if f not in by_name]
    expected = [str(n) for n in class_names]
    shown = ", ".join(expected[:12]) + (f", ... ({len(expected)} in all)" if len(expected) > 12 else "")
    problem = (f"These class folders match none of the model's class names: {', '.join(unmatched[:10])}"
               f"{' ...' if len(unmatched) > 10 else ''}. Expected names: {shown}.")
    hints = []
    for folder, hits in list(ambiguous.items())[:3]:
        hints.append(f"'{folder}' fits several classes ({', '.join(map(str, hits))}): name it by index")
    taken = set(by_name.values())  # suggest only names no other folder has
    keys = {_name_key(n): n for i, n in enumerate(expected) if i not in taken}
    for folder in [f for f in unmatched if f not in ambiguous][:5]:
        key = _name_key(folder)
        close = [k for k in keys if key and (k.startswith(key) or key.startswith(k))][:1]
        close = close or difflib.get_close_matches(key, list(keys), n=1, cutoff=0.8)
        if close:
            hints.append(f"'{folder}' might be '{keys[close[0]]}'")
    if by_index and len(by_index) == len(folders):
        hints.append("the folders are numbered, but some numbers are out of range")
    fix = ("Rename the folders to the model's class names or to class indices (all of them, one way), "
           "or give the right class-names file.")
    if hints:
        fix = "Perhaps: " + "; ".join(hints) + ". " + fix
    return problem, fix


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

    indices, how, folder_names = match_class_folders([f.name for f in folders], class_names, num_classes)
    mapping = {"by": how, "meaning": MAPPING_BY[how],
               "folders": {f.name: int(i) for f, i in sorted(zip(folders, indices), key=lambda t: t[1])},
               "class_names_from_folders": folder_names is not None}

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
    return ImageFolderData(root=root, classes=classes, skipped=skipped, class_mapping=mapping,
                           class_names=folder_names)
