"""Check preprocessing: the fashion-mnist demo model (trained at 28 px) run at the wrong size is
near chance, and the check proposes the right size with the numbers."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from phpn.certify import near_chance
from phpn.data import Preprocess
from phpn.preprocess_check import (CROP_FRACTION, NORMALISATIONS, candidate_settings, check_preprocessing, cli_flags,
                                   describe, normalisation_name)

SIZES = (28, 32, 64, 96)  # the grid, cut to sizes a tiny CPU test can afford


def _fashion():
    from phpn.api import open_data, open_model
    from phpn.demos import get_demo

    demo = get_demo("fashion-mnist")
    if not (demo.assets_dir / "model.safetensors").is_file():
        pytest.skip("the fashion-mnist demo assets are not there")
    session = open_model(demo="fashion-mnist")
    return session, open_data(session, demo.explain_dir())


def test_candidates_cover_sizes_crops_and_the_recorded_setting_once():
    current = Preprocess(resize=224, crop=224)
    recorded = Preprocess(resize=32, crop=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    found = candidate_settings(current, recorded, family=Preprocess(), sizes=(32, 224))
    labels = [label for label, _ in found]
    assert labels == ["in use", "recorded with the model", "the model family's reference", "size 32",
                      "size 32, centre crop"]  # 224 is in use; 256 -> 224 is the family's
    pres = dict(found)
    assert pres["size 32, centre crop"].resize == round(32 / CROP_FRACTION) == 37
    assert pres["size 32"].mean == current.mean  # geometry first, with the normalisation in use
    assert len({p for _, p in found}) == len(found)


def test_presets_fit_the_model_channels():
    grey = Preprocess(resize=28, crop=28, mean=(0.5,), std=(0.5,), channels=1)
    assert normalisation_name(grey) == "0.5"
    rgb = replace(grey, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), channels=3)
    assert normalisation_name(rgb) == "ImageNet" and set(NORMALISATIONS) == {"ImageNet", "0.5", "none"}
    assert describe(grey) == "28 px, 0.5 normalisation"
    assert cli_flags(grey) == "--resize 28 --crop 28 --mean 0.5 --std 0.5"


def test_the_wrong_size_is_at_chance_and_the_check_proposes_28_px():
    session, data = _fashion()
    right = session.preprocess
    assert (right.resize, right.crop, right.channels) == (28, 28, 1)
    session.preprocess = replace(right, resize=96, crop=96)
    calls = []
    check = check_preprocessing(session, data, images_per_class=3, sizes=SIZES, progress=lambda *a: calls.append(a))
    assert check.images == 30 and check.classes == 10
    assert check.current.preprocess.crop == 96 and check.current.images == 30
    assert near_chance(check.current.correct, 30, 10)  # the wrong size: flagged at chance
    assert check.best.preprocess.crop == 28 and check.best.preprocess == right  # the recorded, right setting
    assert check.best.accuracy >= 0.8 and not check.best_near_chance and check.improves
    accuracies = [r.correct for r in check.results]
    assert accuracies == sorted(accuracies, reverse=True)
    # Recomputed by hand: the model's accuracy on the same 30 images at the proposed setting.
    from phpn.data import load_image

    images = [(c.class_index, c.paths[int(i * len(c.paths) / 3)]) for c in data.classes for i in range(3)]
    x = torch.stack([right(load_image(data.root / p)) for _, p in images])
    with torch.inference_mode():
        by_hand = int((session.loaded.model(x).argmax(1) == torch.tensor([c for c, _ in images])).sum())
    assert check.best.correct == by_hand
    assert check.proposal() == (f"Use 28 px, mean 0.286, std 0.353 normalisation (recorded with the model): right on "
                                f"{by_hand} of 30 images ({100 * by_hand / 30:.0f}%), against {check.current.correct} "
                                f"({100 * check.current.correct / 30:.0f}%) with the setting in use. "
                                "CLI: --resize 28 --crop 28 --mean 0.286 --std 0.353")
    assert calls[0] == ("check", 0, calls[0][2]) and calls[-1][1] == calls[-1][2]
    tried = {(r.preprocess.resize, r.preprocess.crop, normalisation_name(r.preprocess)) for r in check.results}
    assert {(28, 28, "0.5"), (28, 28, "none"), (28, 28, "ImageNet"), (110, 96, "mean 0.286, std 0.353")} <= tried


def test_a_model_that_cannot_run_at_a_size_is_reported_not_fatal(tiny_loaded, image_folder):
    from conftest import tiny_split
    from phpn.api import ModelSession
    from phpn.data import scan_image_folder
    from phpn.models.doctor import Diagnosis

    class FixedSize(torch.nn.Module):  # a flatten + linear head: only 16 px inputs work
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3 * 16 * 16, 4)

        def forward(self, x):
            return self.fc(x.flatten(1))

    loaded = replace(tiny_loaded, model=FixedSize().eval())
    session = ModelSession(loaded=loaded, diagnosis=Diagnosis(verdict="exact", reason="", split=tiny_split(tiny_loaded.model)),
                           preprocess=loaded.preprocess)
    data = scan_image_folder(image_folder, class_names=loaded.class_names, num_classes=4)
    check = check_preprocessing(session, data, images_per_class=2, sizes=(16, 32))
    failed = [r for r in check.results if r.error]
    assert failed and all(r.preprocess.crop == 32 for r in failed) and all(r.accuracy is None for r in failed)
    assert check.results[-len(failed):] == failed  # failures rank last
    assert failed[0].error.startswith("the model cannot run on this input (")
    assert check.best.preprocess.crop == 16


def test_cli_check_preprocessing(capsys):
    from phpn.cli import main

    _fashion()
    code = main(["check-preprocessing", "--demo", "fashion-mnist", "--resize", "96", "--crop", "96", "--sizes", "28",
                 "96", "--images-per-class", "2", "--json"])
    obj = json.loads(capsys.readouterr().out)
    assert code == 0 and obj["images"] == 20 and obj["improves"]
    assert obj["current"]["preprocess"]["crop"] == 96 and obj["best"]["preprocess"]["crop"] == 28
    assert obj["proposal"].startswith("Use 28 px") and obj["proposal"].endswith("--std 0.353")
    code = main(["check-preprocessing", "--demo", "fashion-mnist", "--sizes", "28", "--images-per-class", "1"])
    text = capsys.readouterr().out
    assert code == 0 and text.startswith("10 labelled images of 10 classes; settings ranked by the model's accuracy:")
    assert text.splitlines()[-1].startswith("Keep the setting in use (28 px, mean 0.286, std 0.353 normalisation)")


def test_folders_matched_to_the_wrong_classes_are_named(tmp_path):
    """Every folder holds the next class's images: no size helps, and the check says the class
    order is wrong, naming the folders and what the model reads them as."""
    import shutil

    from phpn.data import scan_image_folder

    session, data = _fashion()
    root = tmp_path / "shifted"
    for c in data.classes:
        folder = root / str((c.class_index + 1) % 10)
        folder.mkdir(parents=True)
        for rel in c.paths[:3]:
            shutil.copy(data.root / rel, folder / rel.split("/")[-1])
    shifted = scan_image_folder(root, class_names=session.loaded.class_names, num_classes=10)
    check = check_preprocessing(session, shifted, images_per_class=3, sizes=(28, 32))
    assert check.best_near_chance and not check.improves
    hint = check.class_order_hint()
    assert hint is not None and hint.startswith(
        "The class order looks wrong (28 px, mean 0.286, std 0.353 normalisation): folder '0' (matched to class 0) is "
        "read as class 9 on 3 of 3 images; folder '1' (matched to class 1) is read as class 0 on ")
    assert hint in check.proposal() and check.proposal().startswith("No setting tried reads these images")
    # With the folders right, there is no such hint.
    right = check_preprocessing(session, data, images_per_class=3, sizes=(28,))
    assert right.class_order_hint() is None
