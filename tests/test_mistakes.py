"""Mistakes first: predictions over a labelled folder, the confusion summary, and "why A and not
B" whose waterfall adds up exactly to the logit gap."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_split

from phpn.api import ModelSession
from phpn.errors import Cancelled, ConfigError, DataError
from phpn.images.batches import load_batch
from phpn.images.folders import scan_image_folder
from phpn.images.preprocess import load_image
from phpn.models.doctor import Diagnosis
from phpn.pipeline.discover import DiscoveryConfig, discover
from phpn.pipeline.mistakes import FolderPredictions, Prediction, contrast_image, predict_folder


@pytest.fixture
def setup(tiny_loaded, image_folder):
    split = tiny_split(tiny_loaded.model)
    session = ModelSession(loaded=tiny_loaded, diagnosis=Diagnosis(verdict="exact", reason="", split=split),
                           preprocess=tiny_loaded.preprocess)
    data = scan_image_folder(image_folder, class_names=tiny_loaded.class_names, num_classes=4)
    return session, data, split


def test_predictions_are_the_models_own(setup):
    session, data, _ = setup
    found = predict_folder(session, data, batch_size=5)
    assert found.images == 48 and [p.path for p in found.predictions] == [p for c in data.classes for p in c.paths]
    batch, _, _ = load_batch(data.root, [p.path for p in found.predictions], session.preprocess)
    with torch.inference_mode():
        probs = torch.softmax(session.loaded.model(batch).double(), 1)
    assert [p.predicted for p in found.predictions] == probs.argmax(1).tolist()
    assert [p.runner_up for p in found.predictions] == torch.topk(probs, 2, 1).indices[:, 1].tolist()
    assert np.allclose([p.confidence for p in found.predictions], probs.max(1).values.numpy(), atol=1e-6)
    truth = [c.class_index for c in data.classes for _ in c.paths]
    assert [p.true_class for p in found.predictions] == truth
    assert found.correct == int((probs.argmax(1) == torch.tensor(truth)).sum())


def _toy(pairs) -> FolderPredictions:
    preds = [Prediction(path=f"{t}/{i}.png", true_class=t, predicted=q, confidence=conf, true_probability=0.0,
                        runner_up=(q + 1) % 3) for i, (t, q, conf) in enumerate(pairs)]
    return FolderPredictions(root=".", predictions=preds, class_names=["cat", "dog", "fox"])


def test_mistakes_first_and_the_confusion_summary():
    found = _toy([(0, 0, 0.9), (0, 1, 0.6), (0, 1, 0.8), (1, 1, 0.5), (1, 1, 0.99), (2, 0, 0.7), (2, 2, 0.4)])
    order = found.mistakes_first()
    assert [(p.true_class, p.predicted, p.confidence) for p in order] == [
        (0, 1, 0.8), (2, 0, 0.7), (0, 1, 0.6),  # mistakes, the most confident first
        (2, 2, 0.4), (1, 1, 0.5), (0, 0, 0.9), (1, 1, 0.99)]  # then the right ones, the least sure first
    assert found.images == 7 and found.correct == 4
    assert found.confusions() == [
        {"true": 0, "predicted": 1, "true_name": "cat", "predicted_name": "dog", "count": 2, "share": 2 / 3},
        {"true": 2, "predicted": 0, "true_name": "fox", "predicted_name": "cat", "count": 1, "share": 0.5}]
    assert [(r["name"], r["correct"], r["images"]) for r in found.per_class()] == [("cat", 1, 3), ("fox", 1, 2),
                                                                                    ("dog", 2, 2)]
    assert found.summary() == ("The model is right on 4 of 7 labelled images (57.1%); 3 mistakes. "
                               "Most frequent: cat taken for dog (2 of the cat images).")
    assert order[0].rival == 1 and order[-1].rival == 2  # wrong: the prediction; right: the runner-up


def test_a_cancel_stops_the_predictions(setup):
    session, data, _ = setup
    with pytest.raises(Cancelled):
        predict_folder(session, data, cancel=lambda: True)


@pytest.mark.slow
def test_why_a_and_not_b_adds_up_to_the_logit_gap(setup, tiny_loaded, image_folder):
    session, data, split = setup
    run = discover(tiny_loaded, split, data, session.preprocess, DiscoveryConfig(k=3, device="cpu"))
    network = run.network(split)
    path = image_folder / "2" / "img03.png"
    c = contrast_image(session, network, path, 2, 0)
    with torch.inference_mode():
        logits = tiny_loaded.model(session.preprocess(load_image(path))[None])[0].double()
    assert c.logit_a == pytest.approx(float(logits[2]), abs=1e-5) and c.logit_b == pytest.approx(float(logits[0]), abs=1e-5)
    assert c.gap == pytest.approx(float(logits[2] - logits[0]), abs=1e-5)
    steps = c.steps()
    assert len(steps) == 1 + 3 + 3 and steps[0][0] == "bias blue − bias red"
    assert steps[1][0] == "blue: prototype 1" and steps[4][0] == "red: prototype 1"
    assert sum(v for _, v in steps) == pytest.approx(c.gap, abs=1e-5)  # the waterfall ends at the gap
    assert c.bias_a - c.bias_b == pytest.approx(float(split.bias[2] - split.bias[0]), abs=1e-6)
    assert c.maps_a.shape == (3, 8, 8) and np.allclose(c.maps_a.mean((1, 2)), c.contributions_a, atol=1e-5)
    assert c.to_dict()["gap"] == c.gap
    from phpn.runs.annotations import Annotations

    notes = Annotations.for_run(run)
    notes.set(2, 0, name="beak")
    notes.set(0, 2, name="wing", flags=["background"])
    named = contrast_image(session, network, path, 2, 0, notes=notes)
    assert [lab for lab, _ in named.steps()] == [
        "bias blue − bias red", "blue: prototype 1 “beak”", "blue: prototype 2", "blue: prototype 3",
        "red: prototype 1", "red: prototype 2", "red: prototype 3 “wing”"]  # the expert's names, else the number
    assert [v for _, v in named.steps()] == [v for _, v in steps]
    assert named.to_dict()["labels_b"] == ["prototype 1", "prototype 2", "prototype 3 “wing”"]
    with pytest.raises(DataError, match="Pick two different classes"):
        contrast_image(session, network, path, 1, 1)
    partial = discover(tiny_loaded, split, data, session.preprocess, DiscoveryConfig(k=2, device="cpu", classes=(0, 1)))
    with pytest.raises(ConfigError, match="Class 3 has no prototypes in this run."):
        contrast_image(session, partial.network(split), path, 0, 3)


def test_a_class_order_that_is_off_by_one_is_named():
    from phpn.pipeline.mistakes import class_order_hint

    labels = [0, 0, 0, 1, 1, 1, 2, 2, 2]
    shifted = [1, 1, 1, 2, 2, 0, 0, 0, 0]  # each folder read as the next class (one image strays)
    assert class_order_hint(labels, shifted, {0: "cat", 1: "dog", 2: "fox"}) == (
        "The class order looks wrong: folder 'cat' (matched to class 0) is read as class 1 on 3 of 3 images; folder "
        "'dog' (matched to class 1) is read as class 2 on 2 of 3 images; folder 'fox' (matched to class 2) is read "
        "as class 0 on 3 of 3 images. Check the class-names file, or name each folder by its class index or class "
        "name.")
    assert class_order_hint(labels, labels, {}) is None  # right
    assert class_order_hint(labels, [1, 2, 0, 2, 0, 1, 0, 1, 2], {}) is None  # scattered: not an order problem
    found = _toy([(t, q, 0.9) for t, q in zip(labels, shifted)])
    found.folders = {0: "cat", 1: "dog", 2: "fox"}
    assert found.class_order_hint() == class_order_hint(labels, shifted, found.folders)


def test_the_labelled_sets_on_offer_put_the_held_out_images_first(tmp_path):
    from phpn.pipeline.mistakes import HELD_OUT_IMAGES, LOADED_IMAGES, SERVER_FOLDER, UPLOADED_FOLDER, labelled_sets

    held, loaded = tmp_path / "held", tmp_path / "train"
    sets = labelled_sets(held, loaded, loaded_label="demo:x", run_root="demo:x")
    assert [s.choice for s in sets] == [HELD_OUT_IMAGES, LOADED_IMAGES, UPLOADED_FOLDER, SERVER_FOLDER]
    assert [(s.root, s.words, s.discovery) for s in sets] == [
        (held, "the demo's held-out images", False), (loaded, "the discovery images (loaded on Model & data)", True),
        (None, "an uploaded labelled folder", False), (None, "a labelled folder on this server", False)]
    other = labelled_sets(None, loaded, loaded_label="/data/test", run_root="demo:x", upload=False)
    assert [(s.choice, s.words, s.discovery) for s in other] == [
        (LOADED_IMAGES, "the images loaded on Model & data", False),  # not the run's discovery images
        (SERVER_FOLDER, "a labelled folder on this server", False)]
    assert [s.choice for s in labelled_sets(upload=False)] == [SERVER_FOLDER]


def test_the_confusion_matrix_and_the_cell_a_click_opens():
    from phpn.pipeline.mistakes import confusion_pick

    found = _toy([(0, 0, 0.9), (0, 1, 0.6), (0, 1, 0.8), (1, 1, 0.5), (1, 1, 0.99), (2, 0, 0.7), (2, 2, 0.4)])
    classes, counts = found.confusion_matrix()
    assert classes == [0, 1, 2] and counts.tolist() == [[1, 2, 0], [0, 2, 0], [1, 0, 1]]
    # Beyond the limit: the classes in the most mistakes (cat 3, dog 2, fox 1).
    fewer, small = found.confusion_matrix(max_classes=2)
    assert fewer == [0, 1] and small.tolist() == [[1, 2], [0, 2]]
    # A cell's story: its most confident mistake, A the prediction, B the truth; on the diagonal,
    # the least sure right image against its runner-up; nothing for an empty cell.
    example, a, b = found.open_cell(0, 1)
    assert (example.path, example.confidence, a, b) == ("0/2.png", 0.8, 1, 0)
    example, a, b = found.open_cell(1, 1)
    assert (example.path, a, b) == ("1/3.png", 1, 2)
    assert found.open_cell(1, 0) is None
    # What the chart reports for a click: the point's customdata [true, predicted], else its position.
    assert confusion_pick([{"curve_number": 1, "point_index": 1, "x": 1, "y": 0, "customdata": [0, 1]}],
                          classes) == (0, 1)
    assert confusion_pick([{"x": 2, "y": 1}], [3, 5, 7]) == (5, 7)  # row: true class, column: prediction
    assert confusion_pick([{"x": 0, "y": 0, "customdata": [2, 2]}, {"customdata": [2, 0]}], classes) == (2, 0)
    assert confusion_pick([], classes) is None and confusion_pick(None, classes) is None
    assert confusion_pick([{"x": 0.5, "y": 1}, {"x": 3, "y": 0}], classes) is None  # no cell of the matrix
