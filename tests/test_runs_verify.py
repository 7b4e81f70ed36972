"""Runs are written without touching anything else and verified when opened."""
import json
from pathlib import Path

import pytest
import torch
from conftest import TinyNet, tiny_split
from safetensors.torch import load_file, save_file

from phpn.errors import RunError
from phpn.images.folders import scan_image_folder
from phpn.models.checkpoint import file_sha256
from phpn.pipeline.discover import DiscoveryConfig, discover
from phpn.runs.record import ABSENT, RunRecord
from phpn.runs.store import META, check_model, check_run_target, file_metadata, load_run, save_run, verify_run


@pytest.fixture
def saved(tiny_loaded, image_folder, tmp_path):
    data = scan_image_folder(image_folder, class_names=tiny_loaded.class_names, num_classes=4)
    run = discover(tiny_loaded, tiny_split(tiny_loaded.model), data, tiny_loaded.preprocess,
                   DiscoveryConfig(k=2, device="cpu", solver="none"))
    return save_run(run, tmp_path / "run"), run


def _files(path) -> list:
    """The data files run.json names, head first."""
    m = json.loads((path / META).read_text())
    return [m["head"]["file"]] + [s[key] for s in m["shards"] for key in ("file", "records")]


def _rewrite(path, *, meta=None, tensors=None, records=None, checksum=True):
    """Change a saved run by hand (its first shard: the tiny runs have one): ``meta`` changes
    run.json in place, ``records`` maps the shard's records to those written; with ``checksum``
    the recorded sha256 and the seal are updated to match (``meta`` changes after that)."""
    m = json.loads((path / META).read_text())
    shard = m["shards"][0]
    if records is not None:
        listed = json.loads((path / shard["records"]).read_text())
        (path / shard["records"]).write_text(json.dumps(records(listed)))
    if tensors is not None or records is not None:  # as a forger would: the shard names its run and records
        current = load_file(str(path / shard["file"]))
        current.update(tensors or {})
        save_file(current, str(path / shard["file"]), metadata=file_metadata(
            run=m["seal"]["id"], records_sha256=file_sha256(path / shard["records"])))
    if checksum:
        shard["sha256"] = file_sha256(path / shard["file"])
        shard["records_sha256"] = file_sha256(path / shard["records"])
        m = RunRecord.from_dict(m).sealed().to_dict()  # and run.json sealed again
    if meta is not None:
        meta(m)
    (path / META).write_text(json.dumps(m))


def test_checksum_is_recorded_and_the_mapping_stored(saved):
    path, run = saved
    meta = json.loads((path / META).read_text())
    assert meta["head"]["sha256"] == file_sha256(path / meta["head"]["file"])
    assert [s["sha256"] for s in meta["shards"]] == [file_sha256(path / s["file"]) for s in meta["shards"]]
    assert meta["data"]["class_mapping"]["by"] == "index"
    assert meta["data"]["class_mapping"]["folders"] == {"0": 0, "1": 1, "2": 2, "3": 3}
    again = load_run(path)
    assert torch.equal(again.prototypes, run.prototypes)


def test_a_flipped_bit_is_refused(saved):
    path, _ = saved
    for name in _files(path):
        raw = bytearray((path / name).read_bytes())
        raw[-3] ^= 0x01
        (path / name).write_bytes(bytes(raw))
        with pytest.raises(RunError, match=f"{name} does not match the checksum recorded in run.json"):
            verify_run(path)
        raw[-3] ^= 0x01
        (path / name).write_bytes(bytes(raw))
    verify_run(path)


def test_nan_prototypes_are_refused(saved):
    path, run = saved
    bad = run.prototypes.clone()
    bad[0, 0, 0] = float("nan")
    _rewrite(path, tensors={"prototypes": bad})
    with pytest.raises(RunError, match="prototypes contains NaN or infinite values"):
        verify_run(path)


def test_prototypes_that_no_longer_sum_to_the_head_are_refused(saved):
    path, run = saved
    bad = run.prototypes.clone()
    bad[1, 0] *= 1.01
    _rewrite(path, tensors={"prototypes": bad})
    with pytest.raises(RunError, match="its prototypes do not sum to the head rows they decompose"):
        verify_run(path)


@pytest.mark.parametrize("change, phrase", [
    (lambda m: m["model"].update(class_names=["a", "b"]), "run.json names 2 classes but the head has 4"),
    (lambda m: m["model"].update(class_names="abcd"), "model.class_names is not a list of names"),
    (lambda m: m.update(preprocess={"resize": 8}), "'preprocess' is missing or invalid"),
    (lambda m: m.update(model=[1, 2]), "run.json's 'model' is not an object"),
])
def test_a_malformed_run_json_is_refused_with_the_reason(saved, change, phrase):
    path, _ = saved
    _rewrite(path, meta=change)
    with pytest.raises(RunError) as err:
        load_run(path)
    assert phrase in str(err.value)


@pytest.mark.parametrize("change, phrase", [
    (lambda r: {"0": 1}, "'classes' is not a list of class records"),
    (lambda r: [{k: v for k, v in e.items() if k != "index"} for e in r], "class records lack an integer 'index'"),
    (lambda r: r[:-1], "class records (3) do not match the run's decomposed classes"),
    (lambda r: [dict(r[0], fidelity=[0.5])] + r[1:], "class 0's 'fidelity' is not a list of 2 numbers"),
])
def test_malformed_class_records_are_refused_with_the_reason(saved, change, phrase):
    path, _ = saved
    _rewrite(path, records=change)
    with pytest.raises(RunError) as err:
        verify_run(path)
    assert phrase in str(err.value)


def test_overwrite_replaces_only_a_run(saved, tmp_path):
    path, run = saved
    with pytest.raises(RunError, match="already holds a phpn run"):
        save_run(run, path)
    run.meta["note"] = "second"
    save_run(run, path, overwrite=True)
    assert load_run(path).meta["note"] == "second"
    assert sorted(p.name for p in path.iterdir()) == sorted([META] + _files(path))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no hidden leftovers
    (path / "mine.txt").write_text("keep me")
    with pytest.raises(RunError, match=r"also holds files phpn did not write \(mine.txt\)"):
        save_run(run, path, overwrite=True)
    assert (path / "mine.txt").read_text() == "keep me"


def test_an_empty_folder_is_used_and_foreign_ones_are_refused(saved, tmp_path):
    _, run = saved
    empty = tmp_path / "empty"
    empty.mkdir()
    assert load_run(save_run(run, empty)).k == 2
    repo = tmp_path / "repo"
    (repo / ".git").mkdir(parents=True)
    (repo / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    with pytest.raises(RunError, match=r"is a folder that is not a phpn run \(it holds .git\)"):
        save_run(run, repo, overwrite=True)
    assert (repo / ".git" / "HEAD").read_text() == "ref: refs/heads/main\n"
    with pytest.raises(RunError, match="is a file, not a folder"):
        check_run_target(repo / ".git" / "HEAD" / "run")


def test_a_run_opened_with_another_architecture_or_cut_is_refused(saved, tiny_loaded):
    from dataclasses import replace

    path, _ = saved
    run = load_run(path)
    split = tiny_split(tiny_loaded.model)
    check_model(run, tiny_loaded, split)  # the same model: accepted
    with pytest.raises(RunError, match="made with the architecture 'tiny', but the model opened now has 'other'"):
        check_model(run, replace(tiny_loaded, arch="other"), split)
    split.feature_layer = "features.1"
    with pytest.raises(RunError, match="made with the feature layer 'features', but the model opened now has"):
        check_model(run, tiny_loaded, split)
    torch.manual_seed(5)
    with pytest.raises(RunError, match="head weights differ"):
        check_model(run, tiny_loaded, tiny_split(TinyNet().eval()))


def test_a_crash_while_replacing_a_run_leaves_the_old_run(saved, monkeypatch):
    import os

    import phpn.runs.store as runs

    path, run = saved
    run.prototypes = run.prototypes.clone()
    run.prototypes[:, [0, 1]] = run.prototypes[:, [1, 0]]  # another valid run: prototypes swapped
    real_replace = os.replace

    def crash_before_meta(src, dst):
        if str(dst).endswith(META):
            raise KeyboardInterrupt  # the process dies between the two files
        return real_replace(src, dst)

    monkeypatch.setattr(runs.os, "replace", crash_before_meta)
    old = verify_run(path)
    with pytest.raises(KeyboardInterrupt):
        save_run(run, path, overwrite=True)
    monkeypatch.setattr(runs.os, "replace", real_replace)
    again = verify_run(path)  # the new data files are there under their own names, unused
    assert torch.equal(again.prototypes, old.prototypes) and not torch.equal(again.prototypes, run.prototypes)
    save_run(run, path, overwrite=True)  # the next replacement clears them
    assert torch.equal(load_run(path).prototypes, run.prototypes)
    assert sorted(p.name for p in path.iterdir()) == sorted([META] + _files(path))
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # the temporary folder is gone


def test_two_saves_racing_for_one_folder_give_one_run_and_one_refusal(saved, tmp_path):
    import threading

    _, run = saved
    target = tmp_path / "raced"
    barrier, outcomes = threading.Barrier(2), []

    def save():
        barrier.wait()
        try:
            save_run(run, target)
            outcomes.append("saved")
        except RunError as err:
            outcomes.append(str(err))

    threads = [threading.Thread(target=save) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(outcomes) == 2 and outcomes.count("saved") == 1
    refusal = next(o for o in outcomes if o != "saved")
    assert "already holds a phpn run" in refusal or "was created by something else" in refusal
    assert torch.equal(load_run(target).prototypes, run.prototypes.double())


def test_numpy_numbers_in_the_metadata_are_saved_as_numbers(saved, tmp_path):
    import numpy as np

    _, run = saved
    run.meta["preprocess"]["std"] = list(np.float32([0.25, 0.25, 0.25]))
    run.meta["note"] = np.arange(3)
    again = load_run(save_run(run, tmp_path / "numpy"))
    assert again.meta["preprocess"]["std"] == [0.25, 0.25, 0.25] and again.meta["note"] == [0, 1, 2]


KILLER = """
import os, signal, sys
import phpn.runs.store as runs

source, target, at = sys.argv[1:4]
real_replace = os.replace

def replace(src, dst):
    if os.path.basename(str(dst)).startswith(at):
        os.kill(os.getpid(), signal.SIGKILL)  # no clean-up, no finally: as if the power went
    return real_replace(src, dst)

runs.os.replace = replace
runs.save_run(runs.load_run(source), target, overwrite=True)
"""


@pytest.mark.slow  # a fresh interpreter per kill
@pytest.mark.parametrize("at, outcome", [
    ("fresh", "absent"),  # killed before the finished run is renamed into place
    ("head-", "old"),  # killed before the first of the new run's files is moved in
    ("shard-", "old"),  # killed while the new run's files are moved in beside the old ones
    (META, "old"),  # killed just before run.json switches to the new run
])
def test_a_killed_save_never_leaves_a_run_that_loads_wrong(saved, tmp_path, at, outcome):
    import shutil
    import subprocess
    import sys

    path, run = saved
    if at == "fresh":
        target = tmp_path / "fresh"
    else:
        target = Path(shutil.copytree(path, tmp_path / "old"))
        changed = load_run(target)
        changed.prototypes = changed.prototypes.flip(1)  # another valid run to write over it
        source = save_run(changed, tmp_path / "changed")
        path = source
    proc = subprocess.run([sys.executable, "-c", KILLER, str(path), str(target), at], capture_output=True, timeout=120)
    assert proc.returncode == -9
    if outcome == "absent":
        with pytest.raises(RunError, match="is not a phpn run"):
            load_run(target)
    else:
        assert torch.equal(verify_run(target).prototypes, run.prototypes)


# --- run.json's whole meaning is checked: every refusal says what changed and writes nothing ------

@pytest.fixture
def certified(tiny_loaded, image_folder, tmp_path):
    data = scan_image_folder(image_folder, class_names=tiny_loaded.class_names, num_classes=4)
    run = discover(tiny_loaded, tiny_split(tiny_loaded.model), data, tiny_loaded.preprocess,
                   DiscoveryConfig(k=2, device="cpu", solver="none"), certify=True)
    return save_run(run, tmp_path / "run")


def _everything(root: Path) -> dict:
    """Every path under ``root`` with its bytes' sha256 (links and other files by what they are)."""
    out = {}
    for p in sorted(root.rglob("*")):
        key = str(p.relative_to(root))
        if p.is_symlink():
            out[key] = "link to " + str(p.readlink())
        elif p.is_file():
            out[key] = file_sha256(p)
        else:
            out[key] = "dir" if p.is_dir() else "other"
    return out


def _refused(path: Path, phrase: str, *, lazy: bool = False) -> str:
    """Opening (or, ``lazy``, verifying) the run is refused with ``phrase``; nothing under its
    parent folder is written, moved or removed; ``phpn verify`` says the same in one line."""
    from phpn.cli import main

    before = _everything(path.parent)
    if not lazy:
        with pytest.raises(RunError) as err:
            load_run(path)
        assert phrase in str(err.value), str(err.value)
    with pytest.raises(RunError) as err:
        verify_run(path)
    assert phrase in str(err.value), str(err.value)
    assert main(["verify", str(path)]) == 2
    assert _everything(path.parent) == before
    return str(err.value)


def _meta(path: Path) -> dict:
    return json.loads((path / META).read_text())


def _write_meta(path: Path, m: dict) -> None:
    (path / META).write_text(json.dumps(m, indent=1))


def test_a_saved_run_is_sealed_and_its_files_name_it(certified):
    m = _meta(certified)
    record = RunRecord.from_dict(m)
    assert record.to_dict() == m and json.dumps(record.to_dict()) == json.dumps(m)  # written through the record
    assert record.seal.version == 1 and record.seal_problem() == ""
    assert set(record.seal.sections) == set(m) - {"seal"}
    assert verify_run(certified).record.seal.sha256 == m["seal"]["sha256"]
    from safetensors import safe_open

    for name, records in [(m["head"]["file"], None)] + [(s["file"], s["records_sha256"]) for s in m["shards"]]:
        with safe_open(str(certified / name), "pt") as fh:
            named = json.loads(fh.metadata()["phpn"])
        assert named == ({"run": m["seal"]["id"]} | ({"records_sha256": records} if records else {}))


def test_a_forged_certificate_is_refused(certified, capsys):
    m = _meta(certified)
    assert m["certificate"]["passed"] is True
    m["certificate"].update(images=m["certificate"]["images"] * 10, agreed=m["certificate"]["agreed"] * 10)
    _write_meta(certified, m)
    text = _refused(certified, "run.json's certificate was changed after the run was saved (it no longer matches "
                               "its seal)")
    assert text.endswith("Run discovery again.")
    assert "run.json's certificate was changed" in capsys.readouterr().err


def test_a_certificate_that_contradicts_its_own_numbers_is_refused(certified):
    m = _meta(certified)
    m["certificate"]["max_logit_diff"] = m["certificate"]["max_abs_logit"]  # the two networks disagree
    _write_meta(certified, m)
    _refused(certified, "run.json's certificate.relative_logit_diff says")
    m["certificate"]["relative_logit_diff"] = 1.0
    _write_meta(certified, m)
    _refused(certified, "run.json's certificate.passed says True, but its own numbers give False")


def test_swapped_class_names_are_refused(saved):
    path, _ = saved
    m = _meta(path)
    m["model"]["class_names"] = m["model"]["class_names"][::-1]
    _write_meta(path, m)
    _refused(path, "run.json's model (checkpoint sha256, architecture, class names) was changed after the run was "
                   "saved")


@pytest.mark.parametrize("section, change", [
    ("preprocessing", lambda m: m["preprocess"].update(mean=[0.4, 0.4, 0.4])),
    ("settings", lambda m: m["config"].update(k=3)),
    ("'note'", lambda m: m.update(note="added")),
])
def test_other_changes_to_run_json_are_named(saved, section, change):
    path, _ = saved
    m = _meta(path)
    change(m)
    _write_meta(path, m)
    verb = "added" if section == "'note'" else "changed"
    _refused(path, f"run.json's {section} was {verb} after the run was saved")


def test_a_re_split_shard_with_the_same_sum_is_refused(saved):
    from safetensors import safe_open

    path, run = saved
    m = _meta(path)
    shard = m["shards"][0]
    with safe_open(str(path / shard["file"]), "pt") as fh:
        tensors, named = {k: fh.get_tensor(k) for k in fh.keys()}, fh.metadata()
    moved = 0.25 * tensors["prototypes"][0, 0]
    tensors["prototypes"][0, 0] -= moved
    tensors["prototypes"][0, 1] += moved  # another split of the same head row
    assert torch.allclose(tensors["prototypes"].sum(1), run.head_rows.double())
    save_file(tensors, str(path / shard["file"]), metadata=named)
    shard["sha256"] = file_sha256(path / shard["file"])  # its checksum recorded, as a careful hand would
    _write_meta(path, m)
    _refused(path, "run.json's shard index (files, checksums and the classes each holds) was changed after the run "
                   "was saved")


def test_a_shard_from_another_run_is_refused_even_when_sealed_again(saved, tiny_loaded, image_folder, tmp_path):
    import shutil

    path, _ = saved
    data = scan_image_folder(image_folder, class_names=tiny_loaded.class_names, num_classes=4)
    other = save_run(discover(tiny_loaded, tiny_split(tiny_loaded.model), data, tiny_loaded.preprocess,
                              DiscoveryConfig(k=2, device="cpu", solver="none", seed=1)), tmp_path / "other")
    theirs = _meta(other)["shards"][0]
    m = _meta(path)
    shutil.copy(other / theirs["file"], path / theirs["file"])
    old = m["shards"][0]["file"]
    (path / old).unlink()
    m["shards"][0].update(file=theirs["file"], sha256=theirs["sha256"])
    _write_meta(path, RunRecord.from_dict(m).sealed().to_dict())  # run.json itself consistent again
    load_run(path)  # the index and head are this run's: it opens, its shard is read when needed
    _refused(path, f"{theirs['file']} belongs to another run (it names run {_meta(other)['seal']['id'][:12]}…, this "
                   f"run is {m['seal']['id'][:12]}…)", lazy=True)


def test_a_records_file_from_another_save_is_refused_even_when_sealed_again(saved):
    path, _ = saved
    m = _meta(path)
    shard = m["shards"][0]
    records = json.loads((path / shard["records"]).read_text())
    records[0]["images"] += 1
    (path / shard["records"]).write_text(json.dumps(records))
    shard["records_sha256"] = file_sha256(path / shard["records"])
    _write_meta(path, RunRecord.from_dict(m).sealed().to_dict())
    _refused(path, f"{shard['file']} was saved with other class records than those run.json lists for it", lazy=True)


def test_a_shard_that_is_a_link_is_refused(saved, tmp_path):
    path, _ = saved
    shard = _meta(path)["shards"][0]["file"]
    outside = tmp_path / "outside.safetensors"
    (path / shard).rename(outside)  # the same bytes, its checksum holds: only where it lies is wrong
    (path / shard).symlink_to(outside)
    _refused(path, f"is damaged: {shard} is a link, not a file of the run (phpn never writes links)", lazy=True)
    head = _meta(path)["head"]["file"]
    (path / head).rename(tmp_path / head)
    (path / head).symlink_to(tmp_path / head)
    _refused(path, f"is damaged: {head} is a link, not a file of the run")


@pytest.mark.parametrize("kind", ["folder", "fifo"])
def test_a_shard_that_is_not_a_regular_file_is_refused(saved, kind):
    import os

    path, _ = saved
    shard = _meta(path)["shards"][0]["records"]
    (path / shard).unlink()
    if kind == "folder":
        (path / shard).mkdir()
    else:
        os.mkfifo(path / shard)
    _refused(path, f"is damaged: {shard} is not a regular file", lazy=True)


@pytest.mark.parametrize("where, change", [
    ("paths[0] '/etc/passwd'", lambda e: e["paths"].__setitem__(0, "/etc/passwd")),
    ("top_patches[0][0].path '../../../secret.png'",
     lambda e: e["top_patches"][0][0].update(path="../../../secret.png")),
])
def test_an_image_path_outside_the_image_folder_is_refused(saved, where, change):
    path, _ = saved

    def records(listed):
        change(listed[0])
        return listed

    _rewrite(path, records=records)  # checksums, the shard's own record and the seal all rewritten
    _refused(path, f"class 0's {where} is not a relative path inside the image folder (absolute, or leaving it)",
             lazy=True)


def test_a_removed_seal_is_refused(saved):
    path, _ = saved
    m = _meta(path)
    del m["seal"]
    _write_meta(path, m)
    _refused(path, f"run.json has no seal, but {m['head']['file']} belongs to a sealed run (the seal was removed "
                   "after saving)")


def test_a_run_saved_before_seals_opens_unsealed(saved, tmp_path):
    """Runs written before the seal (no seal, data files that name no run) open and verify as before."""
    path, run = saved
    m = _meta(path)
    del m["seal"]
    for entry in [m["head"]] + m["shards"]:
        current = load_file(str(path / entry["file"]))
        save_file(current, str(path / entry["file"]))  # no metadata: as phpn wrote them before
        entry["sha256"] = file_sha256(path / entry["file"])
    _write_meta(path, m)
    old = verify_run(path)
    assert old.record.seal is ABSENT and torch.equal(old.prototypes, run.prototypes.double())
    resaved = load_run(save_run(old, tmp_path / "resaved"))  # saving it again seals it
    assert resaved.record.seal.sha256 and resaved.record.seal_problem() == ""
