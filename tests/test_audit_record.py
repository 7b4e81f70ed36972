"""An audit is kept beside its run (audit.json): read back when the run is reopened, refused when
it is another run's or was changed, and outside the seal (the run still verifies)."""
from __future__ import annotations

import io
import json
import shutil
import warnings
import zipfile

import pytest
import torch
from conftest import TinyNet

import phpn
from phpn.api import keep_audit, open_run, saved_audit
from phpn.cli import main
from phpn.errors import RunError
from phpn.images.preprocess import Preprocess
from phpn.method.certify import InputWarning
from phpn.resources import ASSETS
from phpn.runs import audit_record
from phpn.runs.store import AUDIT, check_run_target, load_run, verify_run
from phpn.show.report import audit_json, run_zip_bytes

PRE = Preprocess(resize=16, crop=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def _run(image_folder, seed: int = 0):
    torch.manual_seed(0)
    with warnings.catch_warnings():  # a random tiny model is near chance on these images: said, and not the point
        warnings.simplefilter("ignore", InputWarning)
        return phpn.decompose(TinyNet().eval(), image_folder, k=2, preprocess=PRE, progress=False, seed=seed)


@pytest.fixture
def saved(image_folder, tmp_path):
    run = _run(image_folder)
    folder = run.save(tmp_path / "run")
    return open_run(folder, run.session), image_folder


def test_an_audit_is_kept_and_the_reopened_run_gives_the_same_findings(saved):
    run, images = saved
    audit = run.audit(images, images_per_class=4)
    assert audit.saved_to == str(run.path / AUDIT) and audit.save_note == ""
    record = json.loads((run.path / AUDIT).read_text())
    assert record["kind"] == "phpn audit" and record["format_version"] == 1
    assert record["run"] == {"seal_sha256": run.record.seal.sha256, "seal_id": run.record.seal.id,
                             "tensors_sha256": run.record.tensors_sha256}
    # what it was measured on: the settings and every labelled image, by the folder's own names
    assert record["audit"]["settings"] == audit.settings and record["audit"]["images_per_class"] == 4
    assert record["audit"]["data_root"] == str(images)
    assert record["audit"]["image_paths"] == [f"{c}/img{i:02d}.png" for c in range(4) for i in range(4)]
    again = open_run(run.path, run.session)
    kept = again.last_audit
    assert kept is not None and kept.to_dict() == audit.to_dict()
    assert [(e.class_index, e.prototype, e.score, e.reasons) for e in kept.entries] == \
        [(e.class_index, e.prototype, e.score, e.reasons) for e in audit.entries]
    assert kept.summary == audit.summary and kept.saved_to == audit.saved_to
    # outside the seal: the run verifies, and a folder holding it is still only phpn's files
    verify_run(run.path)
    assert check_run_target(run.path, overwrite=True) == run.path
    # a run read without its model gives it back too
    assert saved_audit(load_run(run.path)).audit.to_dict() == audit.to_dict()


def test_another_runs_audit_is_reported_not_trusted(saved, image_folder, tmp_path):
    run, images = saved
    run.audit(images, images_per_class=4)
    other = _run(image_folder, seed=1).save(tmp_path / "other")
    shutil.copy(run.path / AUDIT, other / AUDIT)
    kept = saved_audit(load_run(other))
    assert kept.audit is None
    assert kept.note == (f"The {AUDIT} beside this run belongs to another run (run sha256 "
                         f"{run.record.seal.sha256[:12]}…, this run's is {load_run(other).record.seal.sha256[:12]}…), "
                         "so its findings are not shown. Audit the run again to replace it.")
    assert open_run(other, run.session).last_audit is None
    # auditing the other run replaces it (it is an audit phpn wrote)
    replaced = open_run(other, run.session).audit(images, images_per_class=4)
    assert replaced.saved_to == str(other / AUDIT) and saved_audit(load_run(other)).audit is not None


def test_a_changed_audit_is_reported_not_trusted(saved):
    run, images = saved
    run.audit(images, images_per_class=4)
    record = json.loads((run.path / AUDIT).read_text())
    record["audit"]["prototypes"][0]["score"] += 1.0  # someone edits a finding by hand
    (run.path / AUDIT).write_text(json.dumps(record))
    kept = saved_audit(run)
    assert kept.audit is None and kept.note.startswith(
        f"The {AUDIT} beside this run was changed after phpn wrote it (it no longer matches its checksum)")
    del record["run"]  # a file that names no run
    record["sha256"] = audit_record._checksum(record)
    (run.path / AUDIT).write_text(json.dumps(record))
    assert saved_audit(run).note.startswith(f"The {AUDIT} beside this run does not name the run it was measured on")
    (run.path / AUDIT).write_text("{not json")
    assert saved_audit(run).note.startswith(f"The {AUDIT} beside this run cannot be read (JSONDecodeError).")


def test_an_audit_is_not_kept_where_it_may_not_be(saved, image_folder):
    run, images = saved
    (run.path / AUDIT).write_text('{"mine": true}')  # a file phpn did not write is never replaced
    audit = run.audit(images, images_per_class=4)
    assert audit.saved_to is None and audit.save_note.startswith(
        f"The audit is not kept: {run.path / AUDIT} exists and is not a phpn audit; phpn will not replace it.")
    assert (run.path / AUDIT).read_text() == '{"mine": true}'
    unsaved = _run(image_folder)
    assert unsaved.audit(images, images_per_class=2).save_note.startswith(
        "The audit is not kept: the run is not saved yet")
    shipped = load_run(ASSETS / "fashion-mnist" / "run")
    assert audit_record.why_not_saved(shipped).startswith("The audit is not kept: this is a run shipped with phpn")
    with pytest.raises(RunError, match="The audit cannot be kept beside the run: this is a run shipped"):
        audit_record.save_audit(shipped, {})
    assert keep_audit(shipped, audit).saved_to is None and not (ASSETS / "fashion-mnist" / "run" / AUDIT).exists()


def test_a_replaced_run_drops_the_old_runs_audit(saved, image_folder):
    run, images = saved
    run.audit(images, images_per_class=4)
    _run(image_folder, seed=1).save(run.path, overwrite=True)
    assert not (run.path / AUDIT).exists() and saved_audit(load_run(run.path)) is None


def test_cli_shows_the_kept_audit_without_the_model(saved, capsys):
    run, images = saved
    assert main(["audit", str(run.path), "--last"]) == 2  # nothing kept yet
    assert f"No audit is kept beside the run at {run.path}." in capsys.readouterr().err
    audit = run.audit(images, images_per_class=4)
    assert main(["audit", str(run.path), "--last", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["saved_to"] == str(run.path / AUDIT) and out["prototypes"] == audit.to_dict()["prototypes"]
    assert main(["audit", str(run.path), "--last"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(audit.summary) and f"Kept beside the run: {run.path / AUDIT} (" in text


def test_an_audit_exported_with_a_zip_is_reported_and_replaced(saved):
    """A run's zip carries its audit as the Export page writes it (no run named): shown as such,
    never trusted, and replaced by the next audit."""
    run, images = saved
    audit = run.audit(images, images_per_class=4, save=False)
    assert audit.saved_to is None and not (run.path / AUDIT).exists()
    (run.path / AUDIT).write_text(json.dumps(audit_json(audit)))
    kept = saved_audit(run)
    assert kept.audit is None and kept.note == (
        f"The {AUDIT} beside this run is an audit exported with a run's zip, which does not name the run it was "
        "measured on, so its findings are not shown. Audit the run again to replace it.")
    assert run.audit(images, images_per_class=4).saved_to == str(run.path / AUDIT)
    assert saved_audit(run).audit is not None


def test_the_kept_audit_travels_in_the_runs_zip_unpacked_by_hand(saved, tmp_path):
    run, images = saved
    audit = run.audit(images, images_per_class=4)
    zipfile.ZipFile(io.BytesIO(run_zip_bytes(run, "travelled"))).extractall(tmp_path / "unzipped")
    kept = saved_audit(load_run(tmp_path / "unzipped" / "travelled"))
    assert kept.note == "" and kept.audit.to_dict() == audit.to_dict()
