"""Discovery end to end on a tiny model: run files, certificate, reload."""

import pytest
import torch
from conftest import tiny_split
from PIL import Image

from phpn.errors import ConfigError, DataError, RunError
from phpn.images.batches import load_batch
from phpn.images.folders import scan_image_folder
from phpn.method.certify import certify
from phpn.pipeline.discover import DiscoveryConfig, discover, patch_box
from phpn.runs.store import load_run, save_run


def _discover(tiny_loaded, image_folder, **overrides):
    data = scan_image_folder(image_folder, class_names=tiny_loaded.class_names, num_classes=4)
    split = tiny_split(tiny_loaded.model)
    config = DiscoveryConfig(k=3, device="cpu", **overrides)
    return discover(tiny_loaded, split, data, tiny_loaded.preprocess, config), split, data


@pytest.mark.slow
def test_discovery_is_exact_and_certified(tiny_loaded, image_folder, tmp_path):

    run, split, data = _discover(tiny_loaded, image_folder)
    assert run.prototypes.shape == (4, 3, 8)
    assert float(run.head_error().max()) < 1e-12
    for entry in run.meta["classes"]:
        # Up to 6 per prototype: weak peaks and near-identical crops are skipped.
        assert len(entry["top_patches"]) == 3 and 1 <= len(entry["top_patches"][0]) <= 6
        assert len(entry["fidelity"]) == 3 and all(-1 <= f <= 1 for f in entry["fidelity"])
        assert entry["objective_after"] <= entry["objective_before"] + 1e-9
        paths = [p["path"] for p in entry["top_patches"][0]]
        assert len(set(paths)) == len(paths)  # at most one patch per image

    network = run.network(split)
    batches = [load_batch(data.root, c.paths, tiny_loaded.preprocess)[0] for c in data.classes]
    cert = certify(network, tiny_loaded.model, batches, run.head_error())
    assert cert.images == 48 and cert.top1_agreement == 1.0
    assert cert.relative_logit_diff <= 1e-4 and cert.passed


def test_progress_reports_every_stage(tiny_loaded, image_folder):
    data = scan_image_folder(image_folder, num_classes=4)
    stages = {}
    discover(tiny_loaded, tiny_split(tiny_loaded.model), data, tiny_loaded.preprocess, DiscoveryConfig(k=2, device="cpu"),
             progress=lambda s, d, t: stages.__setitem__(s, (d, t)))
    assert stages == {"features": (48, 48), "nmf": (4, 4), "refine": (4, 4)}


@pytest.mark.parametrize("stage", ["features", "nmf", "refine"])
def test_a_cancelling_progress_callback_stops_every_stage(tiny_loaded, image_folder, stage):
    from phpn.errors import Cancelled

    data = scan_image_folder(image_folder, num_classes=4)
    calls = []

    def progress(s, done, total):
        calls.append(s)
        if s == stage and calls.count(s) > 1:  # first report of a stage is its start; stop inside it
            raise Cancelled()

    with pytest.raises(Cancelled):
        discover(tiny_loaded, tiny_split(tiny_loaded.model), data, tiny_loaded.preprocess,
                 DiscoveryConfig(k=2, device="cpu"), progress=progress)
    assert calls[-1] == stage


@pytest.mark.slow
def test_small_memory_budget_streams_classes_with_the_same_quality(tiny_loaded, image_folder):
    whole, _, _ = _discover(tiny_loaded, image_folder)
    grouped, _, _ = _discover(tiny_loaded, image_folder, memory_budget_mb=0)  # one class per group
    assert float(grouped.head_error().max()) < 1e-12
    for a, b in zip(whole.meta["classes"], grouped.meta["classes"]):
        assert b["nmf_relative_error"] == pytest.approx(a["nmf_relative_error"], rel=0.02)


def test_run_round_trip_and_checkpoint_check(tiny_loaded, image_folder, tmp_path):
    run, split, _ = _discover(tiny_loaded, image_folder)
    path = save_run(run, tmp_path / "run")
    again = load_run(path, expected_sha256="a" * 64)
    torch.testing.assert_close(again.prototypes, run.prototypes, rtol=0, atol=0)
    assert again.meta["config"]["k"] == 3 and again.meta["model"]["sha256"] == "a" * 64
    assert not list(tmp_path.glob(".run*"))  # no temporary folders left behind
    with pytest.raises(RunError, match="different checkpoint"):
        load_run(path, expected_sha256="b" * 64)
    # Saving over an existing run needs overwrite=True, then replaces it whole.
    with pytest.raises(RunError, match="already holds a phpn run"):
        save_run(again, path)
    save_run(again, path, overwrite=True)
    assert load_run(path).meta["classes"] == run.meta["classes"]


def test_run_refused_for_another_head(tiny_loaded, image_folder, tmp_path):
    run, split, _ = _discover(tiny_loaded, image_folder)
    other = tiny_split(type(tiny_loaded.model)(num_classes=4))
    with pytest.raises(RunError, match="head weights differ"):
        run.network(other)


def test_damaged_run_message(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "run.json").write_text("{")
    (bad / "tensors.safetensors").write_bytes(b"nonsense")
    with pytest.raises(RunError, match="damaged"):
        load_run(bad)
    with pytest.raises(RunError, match="is not a phpn run"):
        load_run(tmp_path)


def test_bad_data_messages(tiny_loaded, image_folder, tmp_path):
    (image_folder / "0" / "notes.txt").write_text("not an image")
    (image_folder / "1" / "broken.png").write_bytes(b"\x89PNG garbage")
    data = scan_image_folder(image_folder, num_classes=4)
    reasons = dict(data.skipped)
    assert "not an image" in reasons["0/notes.txt"] and "unreadable" in reasons["1/broken.png"]
    (image_folder / "4").mkdir()
    with pytest.raises(DataError, match="has no readable images"):
        scan_image_folder(image_folder, num_classes=5)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        scan_image_folder(empty)
    with pytest.raises(ConfigError, match="between 1 and 20"):
        DiscoveryConfig(k=25)


def test_k_larger_than_the_data_allows(tiny_loaded, tmp_path):
    root = tmp_path / "one"
    (root / "0").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(root / "0" / "a.png")
    data = scan_image_folder(root, num_classes=4)
    # 1 image x 2x2 grid = 4 positions (crop 4 -> stride 2): k = 5 is too many.
    from phpn.images.preprocess import Preprocess
    pre = Preprocess(resize=4, crop=4, mean=(0.5,) * 3, std=(0.5,) * 3)
    with pytest.raises(ConfigError, match="Lower k or add images"):
        discover(tiny_loaded, tiny_split(tiny_loaded.model), data, pre, DiscoveryConfig(k=5, device="cpu"))


def test_patch_box_is_inside_the_input():
    assert patch_box((0, 0), (7, 7), 224) == [0, 0, 48, 48]
    assert patch_box((3, 3), (7, 7), 224) == [80, 80, 144, 144]
    assert patch_box((6, 6), (7, 7), 224) == [176, 176, 224, 224]
