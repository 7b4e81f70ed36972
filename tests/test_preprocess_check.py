"""Check preprocessing: the fashion-mnist demo model (trained at 28 px) run at the wrong size is
near chance, and the check proposes the right size with the numbers."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from phpn.images.preprocess import Preprocess
from phpn.method.certify import near_chance
from phpn.pipeline.preprocess_check import (
    CROP_FRACTION,
    NORMALISATIONS,
    candidate_settings,
    check_preprocessing,
    cli_flags,
    describe,
    normalisation_name,
)

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


@pytest.mark.slow
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
    from phpn.images.preprocess import load_image

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
    from phpn.images.folders import scan_image_folder
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


@pytest.mark.slow
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
    assert all(line.endswith(("grey  [" + line.split("[", 1)[-1])) for line in text.splitlines()[1:-1])  # the channels
    code = main(["check-preprocessing", "--demo", "fashion-mnist", "--sizes", "28", "--colour", "bgr"])
    err = capsys.readouterr().err
    assert code == 2 and "The colour setting 'bgr' is for 3-channel models" in err and len(err.strip().splitlines()) == 1


def test_folders_matched_to_the_wrong_classes_are_named(tmp_path):
    """Every folder holds the next class's images: no size helps, and the check says the class
    order is wrong, naming the folders and what the model reads them as."""
    import shutil

    from phpn.images.folders import scan_image_folder

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


# --- the colours: BGR and grey-as-RGB variants ---------------------------------------------------------

TINTS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (120, 120, 120)]  # conftest's image_folder, class by class


class NearestTint(torch.nn.Module):
    """Classifies a picture by the nearest of the class tints to its mean colour, read in the
    channel order it was trained with ("rgb" or "bgr")."""

    def __init__(self, pre: Preprocess, order: str):
        super().__init__()
        tints = torch.tensor(TINTS, dtype=torch.float32) / 255
        tints = (tints - torch.tensor(pre.mean)) / torch.tensor(pre.std)
        self.register_buffer("tints", tints.flip(1) if order == "bgr" else tints)

    def forward(self, x):
        return -torch.cdist(x.mean((2, 3)), self.tints) ** 2


def _tint_session(tiny_loaded, order: str, colour: str = "rgb"):
    from conftest import tiny_split

    from phpn.api import ModelSession
    from phpn.models.doctor import Diagnosis

    pre = replace(tiny_loaded.preprocess, mean=(0.5,) * 3, std=(0.25,) * 3)
    loaded = replace(tiny_loaded, model=NearestTint(pre, order).eval(), preprocess=pre)
    return ModelSession(loaded=loaded, diagnosis=Diagnosis(verdict="exact", reason="", split=tiny_split(tiny_loaded.model)),
                        preprocess=replace(pre, colour=colour))


def test_colour_settings_reverse_or_grey_the_channels(image_folder):
    from PIL import Image

    from phpn.errors import ConfigError

    picture = Image.open(image_folder / "0" / "img00.png")
    rgb = Preprocess(resize=16, crop=16, mean=(0.5,) * 3, std=(0.25,) * 3)
    assert torch.equal(replace(rgb, colour="bgr")(picture), rgb(picture).flip(0))
    grey = replace(rgb, colour="grey")(picture)
    one = Preprocess(resize=16, crop=16, mean=(0.5,), std=(0.25,), channels=1)(picture)
    assert grey.shape == (3, 16, 16) and all(torch.equal(grey[c], one[0]) for c in range(3))
    from torchvision.transforms.v2.functional import pil_to_tensor

    for colour in ("rgb", "bgr", "grey"):  # the batch (GPU decoding) path arranges the colours the same way
        pre = replace(rgb, backend="tensor", colour=colour)
        assert torch.equal(pre.from_uint8(pil_to_tensor(picture.convert("RGB"))[None])[0], pre(picture)), colour
    assert Preprocess.from_dict(replace(rgb, colour="bgr").to_dict()).colour == "bgr"
    assert Preprocess.from_dict({k: v for k, v in rgb.to_dict().items() if k != "colour"}) == rgb  # older runs
    with pytest.raises(ConfigError, match="Unknown colour setting 'rbg'. Use one of: rgb, bgr, grey."):
        replace(rgb, colour="rbg")
    with pytest.raises(ConfigError, match="'bgr' is for 3-channel models; a 1-channel model always gets the grey"):
        Preprocess(resize=16, crop=16, mean=(0.5,), std=(0.25,), channels=1, colour="bgr")
    assert describe(replace(rgb, colour="bgr")) == ("16 px, mean 0.5/0.5/0.5, std 0.25/0.25/0.25 normalisation, "
                                                    "BGR (channel order reversed)")
    assert cli_flags(replace(rgb, colour="grey")) == "--resize 16 --crop 16 --mean 0.5 0.5 0.5 --std 0.25 0.25 0.25 --colour grey"


def test_a_model_trained_on_bgr_images_gets_the_bgr_variant_proposed(tiny_loaded, image_folder):
    # Every image of the 4 classes: on 3 per class, 6 wins against 0 is within chance once the
    # dozen settings tried are accounted for (p = 1/64, Bonferroni over the candidates).
    from phpn.images.folders import scan_image_folder
    from phpn.pipeline.preprocess_check import COLOUR_VARIANTS

    data = scan_image_folder(image_folder, class_names=tiny_loaded.class_names, num_classes=4)
    check = check_preprocessing(_tint_session(tiny_loaded, "bgr"), data, images_per_class=12, sizes=(16,))
    assert check.current.correct == 24 and check.images == 48  # red and blue swapped: right on green and grey only
    assert check.best.preprocess == replace(check.current.preprocess, colour="bgr") and check.best.correct == 48
    assert check.best.label == f"in use, {COLOUR_VARIANTS['bgr']}" and check.improves
    assert check.proposal().endswith("--colour bgr")
    assert {r["channels"] for r in check.table()} == {"RGB", COLOUR_VARIANTS["bgr"], COLOUR_VARIANTS["grey"]}
    # The same check on a model that reads RGB keeps the setting in use: the variants are tried, and lose.
    check = check_preprocessing(_tint_session(tiny_loaded, "rgb"), data, images_per_class=12, sizes=(16,))
    assert check.best.preprocess.colour == "rgb" and check.best.correct == 48 and not check.improves
    swapped = next(r for r in check.results if r.preprocess == replace(check.current.preprocess, colour="bgr"))
    assert swapped.correct == 24


def test_a_setting_applied_as_bgr_is_checked_against_plain_rgb(tiny_loaded, image_folder):
    from phpn.images.folders import scan_image_folder

    data = scan_image_folder(image_folder, class_names=tiny_loaded.class_names, num_classes=4)
    # The model reads RGB, but BGR is in use (applied by mistake): plain RGB is tried and proposed.
    check = check_preprocessing(_tint_session(tiny_loaded, "rgb", colour="bgr"), data, images_per_class=12, sizes=(16,))
    assert check.current.correct == 24 and check.best.preprocess.colour == "rgb" and check.best.correct == 48
    assert check.improves and check.proposal().endswith("--colour rgb")


def test_a_grey_model_gets_no_colour_variants():
    grey = Preprocess(resize=28, crop=28, mean=(0.5,), std=(0.5,), channels=1)
    from phpn.pipeline.preprocess_check import colour_variants

    assert colour_variants(grey) == []
    assert [p.colour for _, p in colour_variants(Preprocess())] == ["bgr", "grey"]
