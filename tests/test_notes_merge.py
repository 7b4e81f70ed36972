"""Two people annotating one saved run: each save writes only the prototypes its editor
changed, over what is on disk now; each note names its last editor; a prototype both changed
is reported with the other version quoted, never overwritten silently."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TinyNet, tiny_split
from PIL import Image

from phpn.head import LoadedModel
from phpn.images.folders import scan_image_folder
from phpn.images.preprocess import Preprocess
from phpn.pipeline.discover import DiscoveryConfig, discover
from phpn.runs import annotations as A
from phpn.runs.store import ANNOTATIONS, load_run, save_run


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    pre = Preprocess(resize=16, crop=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    loaded = LoadedModel(model=TinyNet().eval(), arch="tiny", num_classes=4, sha256="a" * 64, preprocess=pre,
                         class_names=["red", "green", "blue", "grey"], source="test")
    root = tmp_path / "images"
    rng = np.random.default_rng(1)
    for c in range(4):
        (root / str(c)).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / str(c) / f"{i}.png")
    data = scan_image_folder(root, class_names=loaded.class_names, num_classes=4)
    run = discover(loaded, tiny_split(loaded.model), data, pre, DiscoveryConfig(k=2, device="cpu", lbfgs_iter=5))
    save_run(run, tmp_path / "run")
    return load_run(tmp_path / "run"), tmp_path / "run"


def test_two_editors_keep_each_others_notes(saved):
    run, folder = saved
    ana, ben = A.load_annotations(run), A.load_annotations(run)  # both open the run's (empty) notes
    ana.editor, ben.editor = "Ana", "Ben"
    ana.set(0, 0, name="beak")
    A.save_annotations(ana, folder)
    ben.set(1, 1, name="wing", flags=["looks right"])
    A.save_annotations(ben, folder)  # Ben never saw Ana's note: it is kept all the same
    assert ben.conflicts == [] and ben.get(0, 0).name == "beak"  # and Ben now sees it
    on_disk = A.load_annotations(load_run(folder))
    assert on_disk.get(0, 0).name == "beak" and on_disk.get(0, 0).edited_by == "Ana"
    assert on_disk.get(1, 1).name == "wing" and on_disk.get(1, 1).edited_by == "Ben"
    assert on_disk.get(1, 1).last_edit().startswith("edited by Ben, 20") and on_disk.get(1, 1).last_edit().endswith(
        " UTC")
    entries = json.loads((folder / ANNOTATIONS).read_text())["prototypes"]
    assert [(e["class_index"], e["prototype"], e["name"], e["edited_by"]) for e in entries] == [
        (0, 0, "beak", "Ana"), (1, 1, "wing", "Ben")]


def test_the_same_prototype_edited_twice_is_reported_not_lost(saved):
    run, folder = saved
    ana, ben = A.load_annotations(run), A.load_annotations(run)
    ana.editor, ben.editor = "Ana", "Ben"
    ana.set(2, 0, name="sky")
    A.save_annotations(ana, folder)
    ben.set(2, 0, name="water")
    A.save_annotations(ben, folder)
    assert [(key, theirs.name, theirs.edited_by) for key, theirs in ben.conflicts] == [((2, 0), "sky", "Ana")]
    text = A.conflict_text(ben, run.class_names)
    assert text.startswith("Someone else changed the same prototype since you opened these notes: blue prototype 1 "
                           "(theirs: “sky”, edited by Ana, 20")
    assert text.endswith("Your version is saved; theirs is quoted here so that nothing is lost.")
    assert A.load_annotations(load_run(folder)).get(2, 0).name == "water"
    # Ana saves again without touching that prototype: Ben's version stays.
    ana.set(3, 1, description="grey background")
    A.save_annotations(ana, folder)
    assert ana.conflicts == [] and A.load_annotations(load_run(folder)).get(2, 0).name == "water"
    # A second edit by the one who saved last is no conflict.
    ben.set(2, 0, name="lake")
    A.save_annotations(ben, folder)
    assert ben.conflicts == [] and A.conflict_text(ben) == ""


def test_clearing_a_note_clears_only_that_prototype(saved):
    run, folder = saved
    ana = A.load_annotations(run)
    ana.set(0, 0, name="beak")
    ana.set(0, 1, name="eye")
    A.save_annotations(ana, folder)
    ben = A.load_annotations(load_run(folder))
    ana.set(3, 0, name="fur")
    A.save_annotations(ana, folder)
    ben.set(0, 1, name="")  # Ben clears "eye"
    A.save_annotations(ben, folder)
    final = A.load_annotations(load_run(folder))
    assert final.get(0, 0).name == "beak" and final.get(0, 1).empty and final.get(3, 0).name == "fur"
    assert final.get(0, 0).edited_by == "" and "edited_by" not in final.to_dict()["prototypes"][0]  # no editor named
