"""The expert's notes on prototypes (saved beside the run, never changing it), switching
prototypes off (an edited model, measured against the original), and the glossary."""
import copy
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TinyNet, tiny_split
from PIL import Image

from phpn import glossary
from phpn.errors import ConfigError, RunError
from phpn.head import LoadedModel
from phpn.images.folders import scan_image_folder
from phpn.images.preprocess import Preprocess
from phpn.pipeline.discover import DiscoveryConfig, discover
from phpn.runs import annotations as A
from phpn.runs.store import ANNOTATIONS, load_run, save_run


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    torch.manual_seed(0)
    model = TinyNet().eval()
    pre = Preprocess(resize=16, crop=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    loaded = LoadedModel(model=model, arch="tiny", num_classes=4, sha256="a" * 64, preprocess=pre,
                         class_names=["red", "green", "blue", "grey"], source="test")
    root = tmp_path_factory.mktemp("notes") / "images"
    rng = np.random.default_rng(1)
    for c, tint in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200), (120, 120, 120)]):
        (root / str(c)).mkdir(parents=True)
        for i in range(8):
            arr = np.clip(rng.normal(0, 70, (20, 20, 3)) + np.array(tint), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / str(c) / f"img{i:02d}.png")
    data = scan_image_folder(root, class_names=loaded.class_names, num_classes=4)
    # A few steps of training so that the prototypes matter: switching one off must be able to
    # change a prediction.
    from phpn.images.batches import load_batch

    batch, kept, _ = load_batch(root, [p for c in data.classes for p in c.paths], pre)
    labels = torch.tensor([int(p.split("/")[0]) for p in kept])
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(60):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(batch), labels).backward()
        opt.step()
    model.eval()
    split = tiny_split(model)
    run = discover(loaded, split, data, pre, DiscoveryConfig(k=3, device="cpu", lbfgs_iter=20))
    saved = tmp_path_factory.mktemp("runs") / "run"
    save_run(run, saved)
    return model, split, data, pre, load_run(saved), saved


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_notes_are_saved_beside_the_run_and_never_change_it(world):
    _, _, _, _, run, folder = world
    before = {p.name: _sha(p) for p in folder.iterdir()}  # run.json and the run's data files
    notes = A.load_annotations(run)
    assert notes.notes == {} and notes.run_sha256 == run.meta["tensors_sha256"]
    notes.set(2, 1, name="  blue   sky ", description="Fires on the\nbackground.", flags=["Background", "spurious",
                                                                                         "background"])
    notes.set(0, 0, flags=["my own flag"])
    assert notes.label(2, 1) == "prototype 2 “blue sky”" and notes.label(2, 0) == "prototype 1"
    assert A.prototype_labels(notes, 2, 3) == ["prototype 1", "prototype 2 “blue sky”", "prototype 3"]
    assert notes.get(2, 1).flags == ("background", "spurious")
    assert notes.flagged("spurious") == [(2, 1)] and notes.flagged() == [(0, 0), (2, 1)]
    path = A.save_annotations(notes, folder)
    assert path == folder / ANNOTATIONS
    assert sorted(p.name for p in folder.iterdir()) == sorted([ANNOTATIONS, *before])  # no temporary left
    assert {name: _sha(folder / name) for name in before} == before
    again = A.load_annotations(load_run(folder))  # the run still opens: its checksum holds
    assert again.to_dict() == notes.to_dict()
    assert again.get(2, 1).description == "Fires on the\nbackground."
    # Clearing every field removes the note.
    again.set(0, 0, flags=[])
    assert (0, 0) not in again.notes and again.flagged() == [(2, 1)]


def test_bad_notes_get_clear_messages(world, tmp_path):
    _, _, _, _, run, folder = world
    notes = A.Annotations.for_run(run)
    with pytest.raises(ConfigError, match=r"^Class 7 has no prototypes in this run\. Pick one"):
        notes.set(7, 0, name="x")
    with pytest.raises(ConfigError, match=r"^Prototype 4 does not exist: classes in this run have 3\."):
        notes.set(1, 3, name="x")
    with pytest.raises(ConfigError, match=r"^The prototype's name is 81 characters long; at most 80"):
        notes.set(1, 0, name="n" * 81)
    with pytest.raises(ConfigError, match=r"^Flags must be a list of words\."):
        notes.set(1, 0, flags="background")
    with pytest.raises(RunError, match=r"is not a saved phpn run, so the notes have nowhere to go\."):
        A.save_annotations(notes, tmp_path)
    # Another run's notes are refused, naming the file.
    other = copy.deepcopy(notes.to_dict())
    other["run_tensors_sha256"] = "f" * 64
    with pytest.raises(RunError, match=r"^The annotations\.json of the run describes another run \(tensors sha256 "
                                       r"ffffffffffff…"):
        A.Annotations.from_dict(other, run)
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / ANNOTATIONS).write_text("{not json")
    with pytest.raises(RunError, match=r"^The run's annotations\.json cannot be read \(JSONDecodeError\)\. Remove or "
                                       r"rename annotations\.json"):
        A.load_annotations(run, damaged)
    (damaged / ANNOTATIONS).write_text(json.dumps({"format_version": 1, "run_sha256": notes.run_seal, "prototypes": [
        {"class_index": 1, "prototype": 5, "name": "x"}]}))
    with pytest.raises(RunError, match=r"has an entry this run cannot take \(Prototype 6 does not exist"):
        A.load_annotations(run, damaged)


def test_switching_nothing_off_changes_nothing(world):
    _, split, data, pre, run, _ = world
    net = run.network(split).eval()
    result = A.switch_off(net, data, pre, {})
    assert result.images == 32 and result.changed == []
    assert result.edited_accuracy == result.original_accuracy


def test_switch_off_equals_the_head_without_those_prototypes(world):
    model, split, data, pre, run, _ = world
    net = run.network(split).eval()
    off = {1: [0, 2], 2: [1]}
    result = A.switch_off(net, data, pre, off, batch_size=5)
    # The same edit made by hand on the model's own head: v_c minus the switched-off prototypes.
    edited = copy.deepcopy(model)
    with torch.no_grad():
        for c, protos in off.items():
            row = run.class_indices.tolist().index(c)
            edited.fc.weight[c] -= run.prototypes[row, protos].sum(0).float()
    paths = [(c.class_index, p) for c in data.classes for p in c.paths]
    from phpn.images.batches import load_batch

    batch, kept, _ = load_batch(data.root, [p for _, p in paths], pre)
    truth = torch.tensor([c for c, _ in paths])
    with torch.no_grad():
        original, by_hand = model(batch).argmax(1), edited(batch).argmax(1)
    assert result.original_accuracy == pytest.approx(float((original == truth).double().mean()))
    assert result.edited_accuracy == pytest.approx(float((by_hand == truth).double().mean()))
    expected = [{"path": p, "true": int(t), "original": int(o), "edited": int(e)}
                for (_, p), t, o, e in zip(paths, truth, original, by_hand) if o != e]
    assert result.changed == expected and len(expected) > 0  # the edit matters on this trained model
    assert result.edited_accuracy < result.original_accuracy
    text = result.summary(run.class_names)
    assert text.startswith("Edited model: prototypes switched off. It no longer equals the original model")
    assert "green: prototype 1, prototype 3; blue: prototype 2" in text
    assert f"{100 * result.original_accuracy:.1f}% → {100 * result.edited_accuracy:.1f}%" in text
    assert result.to_dict()["edited_model"] is True
    assert text.endswith(f"On 32 labelled images, accuracy {100 * result.original_accuracy:.1f}% → "
                         f"{100 * result.edited_accuracy:.1f}% ({100 * result.accuracy_change:+.1f} points); "
                         f"{len(expected)} predictions changed.")


def test_a_switch_off_says_which_images_it_was_measured_on(world):
    _, split, data, pre, run, _ = world
    net = run.network(split).eval()
    held = A.switch_off(net, data, pre, {1: [0]}, measured_on="the demo's held-out images")
    found_on = A.switch_off(net, data, pre, {1: [0]}, measured_on="the discovery images",
                            on_discovery_images=True)
    assert (held.original_accuracy, held.edited_accuracy) == (found_on.original_accuracy, found_on.edited_accuracy)
    numbers = (f"accuracy {100 * held.original_accuracy:.1f}% → {100 * held.edited_accuracy:.1f}% "
               f"({100 * held.accuracy_change:+.1f} points); {len(held.changed)} predictions changed.")
    assert held.summary(run.class_names).endswith(
        f"Switched off: green: prototype 1. Measured on the demo's held-out images (32 labelled images): {numbers}")
    assert held.warning is None
    assert found_on.warning == A.ON_DISCOVERY_IMAGES == (
        "Measured on the discovery images: the prototypes were found on these very images, so this accuracy is "
        "optimistic. Held-out images (ones discovery did not see) give a fair number.")
    assert found_on.summary(run.class_names).endswith(f"(32 labelled images): {numbers} {A.ON_DISCOVERY_IMAGES}")
    assert found_on.summary(run.class_names, with_warning=False).endswith(numbers)
    assert found_on.to_dict()["measured_on"] == "the discovery images" and found_on.to_dict()["on_discovery_images"]


def test_edited_logits_lose_exactly_the_switched_off_contributions(world):
    _, split, data, pre, run, _ = world
    net = run.network(split).eval()
    from phpn.images.batches import load_batch

    batch, _, _ = load_batch(data.root, data.classes[1].paths[:4], pre)
    with torch.no_grad():
        e = net.explain_features(net.backbone(batch), with_maps=False)
    all_off = A.edited_logits(e, {1: [0, 1, 2]}, net)
    assert torch.allclose(all_off[:, 1], e.bias[1].expand(4), atol=1e-5)  # only the bias is left
    assert torch.equal(all_off[:, [0, 2, 3]], e.logits[:, [0, 2, 3]])  # other classes untouched
    with pytest.raises(ConfigError, match=r"^Class 1 has prototypes 1 to 3; \[4\] were asked for\."):
        A.switch_off(net, data, pre, {1: [3]})


def test_glossary_explains_every_word_shown_and_flags_low_fidelity():
    for term in ("logit", "contribution", "prototype", "fidelity", "agreement", "alpha", "residual", "objective"):
        text = glossary.explain(term)
        assert 40 < len(text) < 400, term
    assert "not about being right" in glossary.explain("agreement")
    assert glossary.fidelity_warning(glossary.LOW_FIDELITY) is None
    assert glossary.fidelity_warning(0.44) == (
        f"Low fidelity (0.44 < {glossary.LOW_FIDELITY:g}): its example patches and maps may not be what this "
        "prototype actually responds to; read it with care.")
    assert glossary.low_fidelity(0.1) and not glossary.low_fidelity(None)


def test_notes_name_their_run_and_are_refused_on_another(world, tmp_path):
    import shutil

    _, _, _, _, run, folder = world
    notes = A.Annotations.for_run(run)
    notes.set(1, 0, name="edge")
    assert notes.to_dict()["run_sha256"] == run.meta["seal"]["sha256"] == notes.run_seal
    assert notes.to_dict()["run_tensors_sha256"] == run.meta["tensors_sha256"]
    copy_dir = Path(shutil.copytree(folder, tmp_path / "copy"))
    A.save_annotations(notes, copy_dir)
    assert A.load_annotations(load_run(copy_dir)).to_dict() == notes.to_dict()

    def refused(data, phrase):
        (copy_dir / ANNOTATIONS).write_text(json.dumps(data))
        before = {p.name: _sha(p) for p in copy_dir.iterdir()}
        with pytest.raises(RunError) as err:
            A.load_annotations(load_run(copy_dir))
        assert str(err.value) == phrase
        assert {p.name: _sha(p) for p in copy_dir.iterdir()} == before

    fix = " Remove or rename annotations.json to open the run without them."
    unnamed = {k: v for k, v in notes.to_dict().items() if k not in ("run_sha256", "run_tensors_sha256")}
    refused(unnamed, "The annotations.json of the run does not name the run it belongs to, so it could be another "
                     "run's." + fix)
    # the same tensors under another meaning (other class names, another certificate...): another run
    other = dict(notes.to_dict(), run_sha256="e" * 64)
    refused(other, f"The annotations.json of the run describes another run (run sha256 eeeeeeeeeeee…, this run's is "
                   f"{notes.run_seal[:12]}…)." + fix)
    # notes written for a run saved before seals name its tensors only: still matched by them
    older = {k: v for k, v in notes.to_dict().items() if k != "run_sha256"}
    (copy_dir / ANNOTATIONS).write_text(json.dumps(older))
    assert A.load_annotations(load_run(copy_dir)).get(1, 0).name == "edge"
    # and saving notes of another run into this folder is refused, the file left as it was
    stranger = A.Annotations.for_run(run)
    stranger.run_seal = "e" * 64
    with pytest.raises(RunError, match=r"^These notes describe another run than the one saved in copy\."):
        A.save_annotations(stranger, copy_dir)
    assert json.loads((copy_dir / ANNOTATIONS).read_text()) == older
