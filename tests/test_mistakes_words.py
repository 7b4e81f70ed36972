"""Mistakes in the expert's words: classes by their folder names when the model has none, the
contrast told as a story with the prototypes' names, and a grey model's pictures in grey."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
from conftest import tiny_split
from PIL import Image

from phpn.api import ModelSession
from phpn.images.folders import scan_image_folder
from phpn.images.preprocess import Preprocess
from phpn.models.doctor import Diagnosis
from phpn.pipeline.mistakes import Contrast, predict_folder
from phpn.show.pictures import in_model_colours


def test_a_model_without_names_is_told_in_its_folders_names(tiny_loaded, image_folder, tmp_path):
    loaded = replace(tiny_loaded, class_names=None)
    session = ModelSession(loaded=loaded, diagnosis=Diagnosis(verdict="exact", reason="",
                                                              split=tiny_split(loaded.model)),
                           preprocess=loaded.preprocess)
    named = tmp_path / "named"
    named.mkdir()
    for i, name in enumerate(["airplane", "bird", "cat", "deer"]):
        (image_folder / str(i)).rename(named / name)
    data = scan_image_folder(named, class_names=None, num_classes=4)
    assert data.class_names == ["airplane", "bird", "cat", "deer"]
    found = predict_folder(session, data)
    assert found.class_names == ["airplane", "bird", "cat", "deer"]
    assert {r["name"] for r in found.per_class()} == {"airplane", "bird", "cat", "deer"}
    for c in found.confusions():
        assert c["true_name"] in data.class_names and c["predicted_name"] in data.class_names


def _contrast(gap_terms, bias=(0.0, 0.0)) -> Contrast:
    ca, cb = np.array(gap_terms[0], dtype=float), np.array(gap_terms[1], dtype=float)
    return Contrast(image=Image.new("RGB", (4, 4)), class_a=6, class_b=0, name_a="Shirt", name_b="T-shirt/top",
                    logit_a=bias[0] + ca.sum(), logit_b=bias[1] + cb.sum(), bias_a=bias[0], bias_b=bias[1],
                    contributions_a=ca, contributions_b=cb, maps_a=np.zeros((2, 2, 2)), maps_b=np.zeros((2, 2, 2)),
                    labels_a=["collar", "prototype 2"], labels_b=["short sleeves", "prototype 2"])


def test_the_contrast_is_told_in_plain_words_with_the_prototypes_names():
    c = _contrast([[2.0, 0.5], [0.25, 1.0]])
    assert c.gap == 1.25
    assert c.story() == ("The model gives each class a score: a fixed starting value (its bias) plus what each of "
                         "its prototypes finds in this image. Here “Shirt” scores 1.25 more than “T-shirt/top”. The "
                         "parts that make the difference: “Shirt”'s collar (2.00 for “Shirt”), “Shirt”'s prototype 2 "
                         "(0.50 for “Shirt”); against it: “T-shirt/top”'s prototype 2 (1.00 for “T-shirt/top”), "
                         "“T-shirt/top”'s short sleeves (0.25 for “T-shirt/top”).")
    assert "logit" not in c.story() and "bias difference" not in c.story()
    biased = _contrast([[0.5, 0.0], [0.5, 0.0]], bias=(1.0, 0.0))
    assert "1.00 of that difference in starting values favours “Shirt” before any part is seen" in biased.story()
    assert c.to_dict()["story"] == c.story()


def test_a_grey_model_sees_grey():
    picture = Image.new("RGB", (4, 4), (200, 30, 30))
    grey = in_model_colours(picture, Preprocess(resize=4, crop=4, mean=(0.5,), std=(0.5,), channels=1))
    r, g, b = np.asarray(grey)[0, 0]
    assert grey.mode == "RGB" and r == g == b == np.asarray(picture.convert("L"))[0, 0]
    assert np.array_equal(np.asarray(in_model_colours(picture, Preprocess())), np.asarray(picture))
    as_grey = in_model_colours(picture, replace(Preprocess(), colour="grey"))
    assert len(set(np.asarray(as_grey)[0, 0].tolist())) == 1
