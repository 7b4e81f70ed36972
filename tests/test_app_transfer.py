"""A run's zip taken in again (export → import: the same prototypes, verified; unsafe, foreign
and tampered zips refused, nothing left behind), the Discover page's upload that reopens it,
and a grey model's pictures shown grey."""
from __future__ import annotations

import io
import json
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_app import _app, _clean, _errors, needs_demo

from phpn.api import import_run, open_run
from phpn.cli import main
from phpn.errors import DataError, RunError
from phpn.runs.store import load_run, save_run, verify_run
from phpn.show.report import run_zip_bytes

pytest.importorskip("streamlit.testing.v1")

EXPORT_FIX = "Upload the zip the Export page gives (“Download the run (.zip)”)"


def _demo():
    from phpn.demos import get_demo

    return get_demo("fashion-mnist")


def _zip_of(entries: dict) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _rewritten(data: bytes, change) -> bytes:
    """The zip ``data`` with each member's bytes passed through ``change(name, bytes)``."""
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return _zip_of({name: change(name, zf.read(name)) for name in zf.namelist()})


@pytest.fixture(scope="module")
def sealed_zip(tmp_path_factory) -> bytes:
    """The demo run saved by this version (sealed), as the Export page zips it."""
    folder = save_run(load_run(_demo().run_dir), tmp_path_factory.mktemp("sealed") / "sealed")
    run = load_run(folder)
    assert run.record.seal is not None
    return run_zip_bytes(run, "phpn-run-fashion-mnist-k3")


@needs_demo
def test_an_exported_run_comes_back_with_the_same_prototypes_and_opens_with_its_model(tmp_path):
    original = load_run(_demo().run_dir)
    archive = tmp_path / "export.zip"
    archive.write_bytes(run_zip_bytes(original, "phpn-run-fashion-mnist-k3"))
    into = tmp_path / "runs"

    folder = import_run(archive, into)
    assert folder == into / "phpn-run-fashion-mnist-k3"
    again = verify_run(folder)
    assert torch.equal(again.prototypes, original.prototypes)
    assert torch.equal(again.alpha, original.alpha) and torch.equal(again.head_rows, original.head_rows)
    assert again.meta["demo"] == "fashion-mnist"
    assert import_run(archive, into) == into / "phpn-run-fashion-mnist-k3-2"  # never over the first
    assert sorted(p.name for p in into.iterdir()) == ["phpn-run-fashion-mnist-k3", "phpn-run-fashion-mnist-k3-2"]

    reopened = open_run(folder)  # the demo's model, found from the run
    assert reopened.session is not None and reopened.session.demo == "fashion-mnist"
    assert torch.equal(reopened.prototypes, original.prototypes)


@needs_demo
def test_a_sealed_run_comes_back_under_the_name_given_without_an_audit_not_its_own(tmp_path, sealed_zip):
    with zipfile.ZipFile(io.BytesIO(sealed_zip)) as zf:
        entries = {n: zf.read(n) for n in zf.namelist()}
    entries["phpn-run-fashion-mnist-k3/audit.json"] = b"{}"  # names no run: let go
    entries["phpn-run-fashion-mnist-k3/.DS_Store"] = b"\0"
    folder = import_run(io.BytesIO(_zip_of(entries)), tmp_path / "runs", name="mine")
    assert folder == tmp_path / "runs" / "mine"
    assert sorted(p.name for p in folder.iterdir()) == sorted(Path(n).name for n in entries
                                                              if not n.endswith(("audit.json", ".DS_Store")))
    assert verify_run(folder).record.seal is not None


@needs_demo
def test_the_runs_own_audit_travels_in_its_zip_and_another_runs_does_not(tmp_path):
    from phpn.api import saved_audit

    demo = _demo()
    run = open_run(save_run(load_run(demo.run_dir), tmp_path / "mine"))
    audit = run.audit(demo.explain_dir(), images_per_class=2)
    assert audit.saved_to == str(tmp_path / "mine" / "audit.json")
    data = run_zip_bytes(run, "audited", audit=audit)
    back = saved_audit(open_run(import_run(io.BytesIO(data), tmp_path / "runs")))
    assert back.note == "" and back.audit.to_dict() == audit.to_dict()
    # An audit.json edited after it was written (its checksum no longer holds): not kept.
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        entries = {n: zf.read(n) for n in zf.namelist()}
    edited = json.loads(entries["audited/audit.json"])
    edited["audit"]["prototypes"][0]["score"] = 99.0
    entries["audited/audit.json"] = json.dumps(edited).encode()
    folder = import_run(io.BytesIO(_zip_of(entries)), tmp_path / "runs", name="edited")
    assert not (folder / "audit.json").exists() and verify_run(folder).record.seal is not None


def _refused(tmp_path, data: bytes, name: str, error=RunError) -> str:
    archive = tmp_path / name
    archive.write_bytes(data)
    into = tmp_path / "runs"
    with pytest.raises(error) as info:
        import_run(archive, into)
    assert list(into.iterdir()) == []  # nothing half-written, no temporary folder left
    return str(info.value)


def test_a_zip_reaching_outside_its_folder_is_refused(tmp_path):
    message = _refused(tmp_path, _zip_of({"run/run.json": b"{}", "../x": b"escape"}), "traversal.zip", DataError)
    assert message == ("The zip file contains an entry that would be written outside its folder ('../x'). "
                       f"phpn refuses such archives; {EXPORT_FIX[0].lower()}{EXPORT_FIX[1:]}.")
    assert not (tmp_path / "x").exists()


def test_a_zip_with_a_link_is_refused(tmp_path):
    link = zipfile.ZipInfo("run/run.json")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(link, "/etc/passwd")
    message = _refused(tmp_path, buf.getvalue(), "link.zip", DataError)
    assert message == f"The zip file contains a symbolic link ('run/run.json'). Links are refused; {EXPORT_FIX[0].lower()}{EXPORT_FIX[1:]}."


def test_a_zip_that_is_not_a_run_or_not_a_zip_is_refused(tmp_path):
    message = _refused(tmp_path, _zip_of({"images/cat/1.png": b"png"}), "images.zip")
    assert message == ("'images.zip' is not a phpn run: it has no run.json at its top or in a folder just below it. "
                       f"{EXPORT_FIX}.")
    message = _refused(tmp_path, b"PK\x03\x04 but truncated", "broken.zip", DataError)
    assert message.startswith("broken.zip is not a readable zip archive (") and message.endswith(f"{EXPORT_FIX}.")
    message = _refused(tmp_path, _zip_of({"a/run.json": b"{}", "b/run.json": b"{}"}), "two.zip")
    assert message == "'two.zip' holds 2 runs. Upload one run's zip at a time."


@needs_demo
def test_a_tampered_run_is_refused_naming_what_changed(tmp_path, sealed_zip):
    def renamed(name, data):
        if name.endswith("/run.json"):
            meta = json.loads(data)
            meta["model"]["class_names"][0] = "Hat"
            return json.dumps(meta).encode()
        return data

    again = ("Upload the zip the Export page gives (“Download the run (.zip)”) again as it was downloaded: a run "
             "changed after it was saved is refused.")
    message = _refused(tmp_path, _rewritten(sealed_zip, renamed), "renamed.zip")
    assert message == ("The run in 'renamed.zip' is not valid: run.json's model (checkpoint sha256, architecture, "
                       f"class names) was changed after the run was saved (it no longer matches its seal). {again}")

    def flipped(name, data):
        if "/shard-" in name and name.endswith(".safetensors"):
            return data[:-1] + bytes([data[-1] ^ 1])
        return data

    message = _refused(tmp_path, _rewritten(sealed_zip, flipped), "flipped.zip")
    assert message.startswith("The run in 'flipped.zip' is damaged: shard-00000-")
    assert message.endswith(f"does not match the checksum recorded in run.json (it was changed or corrupted after "
                            f"saving). {again}")

    with zipfile.ZipFile(io.BytesIO(sealed_zip)) as zf:
        entries = {n: zf.read(n) for n in zf.namelist()}
    entries["phpn-run-fashion-mnist-k3/notes.txt"] = b"hello"
    message = _refused(tmp_path, _zip_of(entries), "extra.zip")
    assert message == ("'extra.zip' holds 'notes.txt' beside its run, which a run phpn exports does not have. "
                       "Upload the zip the Export page gives (“Download the run (.zip)”) as it was downloaded.")


# --- the Discover page's upload ---------------------------------------------------------------------

@pytest.mark.slow
@needs_demo
def test_the_discover_page_reopens_an_uploaded_run_zip_and_refuses_a_tampered_one(sealed_zip, tmp_path):
    at = _app().run()
    _clean(at)
    at.switch_page("pages/discover.py").run()
    _clean(at)
    workspace = at.session_state["_workspace"]
    before = set(workspace.runs.iterdir())

    tampered = _rewritten(sealed_zip, lambda n, b: b.replace(b'"Trouser"', b'"Trousers"') if n.endswith("run.json")
                          else b)
    at.file_uploader(key="load_zip").set_value(("tampered.zip", tampered, "application/zip")).run()
    at.button(key="load_zip_run").click().run()
    _clean(at)
    assert any(e.startswith("The run in 'tampered.zip' is not valid:") for e in _errors(at)), _errors(at)
    assert set(workspace.runs.iterdir()) == before  # nothing kept of it

    at.file_uploader(key="load_zip").set_value(("exported.zip", sealed_zip, "application/zip")).run()
    at.button(key="load_zip_run").click().run()
    _clean(at)
    assert not _errors(at)
    entry = at.session_state["run"]
    assert entry.origin == "uploaded as exported.zip"
    assert entry.saved_to == workspace.runs / "phpn-run-fashion-mnist-k3"
    assert set(workspace.runs.iterdir()) == before | {entry.saved_to}
    assert torch.equal(entry.run.prototypes, load_run(_demo().run_dir).prototypes)
    assert at.session_state["model"].session.demo == "fashion-mnist"
    assert any("Opened the uploaded run with its model" in s.value for s in at.success)

    # A run of a model this visitor has not uploaded here: kept, and the model file is asked for.
    at.file_uploader(key="load_zip").set_value(("theirs.zip", _of_a_missing_model(tmp_path), "application/zip")).run()
    at.button(key="load_zip_run").click().run()
    _clean(at)
    kept = workspace.runs / "theirs"
    assert [w.value for w in at.warning if w.value.startswith("Kept")] == [
        "Kept the run as `my files/runs/theirs`. This run was made from fashion.safetensors (sha256 abababababab…), "
        "which is not on this server for you. Load that model on the Model & data page: the run opens as soon as it "
        "is loaded."]
    assert at.session_state["pending_run"][0] == kept and verify_run(kept).checkpoint_sha256 == "ab" * 32
    assert at.session_state["run"].saved_to == entry.saved_to  # the open run stays until that model is loaded


def _of_a_missing_model(tmp_path) -> bytes:
    """The demo run as if made from an uploaded checkpoint that is not on this server (sealed again)."""
    run = load_run(_demo().run_dir)
    meta = run.meta
    meta["demo"] = None
    meta["model"]["sha256"] = "ab" * 32
    meta["model"]["source"] = str(tmp_path / "gone" / "fashion.safetensors")
    meta["model"]["origin"] = {"how": "upload", "name": "fashion.safetensors", "sha256": "ab" * 32}
    folder = save_run(run, tmp_path / "theirs")
    return run_zip_bytes(load_run(folder), "theirs")


# --- a grey model's pictures ------------------------------------------------------------------------

def _colourful(size=(40, 32)) -> Image.Image:
    x = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    x[..., 0] = np.linspace(0, 255, size[0], dtype=np.uint8)[None, :]
    x[..., 1] = 200
    x[..., 2] = np.linspace(255, 0, size[1], dtype=np.uint8)[:, None]
    return Image.fromarray(x, "RGB")


def _grey(picture) -> bool:
    a = np.asarray(picture)
    return a.ndim == 2 or (a.shape[2] == 3 and (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all())


@needs_demo
def test_a_grey_models_pictures_are_grey_on_explain_and_the_class_browser(tmp_path):
    from phpn.api import explain_image
    from phpn.app import frame
    from phpn.show import viz
    from phpn.show.compose import compose_explanation

    run = open_run(_demo().run_dir)
    pre = run.session.preprocess
    assert pre.channels == 1
    photo = tmp_path / "photos" / "0" / "colour.png"
    photo.parent.mkdir(parents=True)
    _colourful().save(photo)
    assert not _grey(Image.open(photo).convert("RGB"))

    e = explain_image(run.session, run.network(), photo)  # the Explain page's explanation
    assert np.asarray(e.image).shape == (28, 28, 3) and _grey(e.image)
    view = compose_explanation(e, run, image_root=tmp_path / "photos")
    assert _grey(view.overview[0].picture)
    seen = frame.seen_image(str(photo), frame.preprocess_key(pre))  # top patches, Explain and Class browser
    assert seen.shape == (28, 28, 3) and _grey(seen)
    grid = frame.patch_grid(str(tmp_path / "photos"), (("0/colour.png", (0, 0, 14, 14)),), "#000000",
                            frame.preprocess_key(pre), 56, 1)
    assert grid is not None
    pictures, maps, _, kept = viz.class_maps(run.network(), pre, tmp_path / "photos", ["0/colour.png"], 0)
    assert kept == ["0/colour.png"] and all(_grey(p) for p in pictures)  # the Class browser's maps

    rgb = type(pre).from_dict({**pre.to_dict(), "channels": 3, "mean": (0.5,) * 3, "std": (0.5,) * 3})
    from phpn.show.pictures import seen_picture

    assert not _grey(seen_picture(_colourful(), rgb))  # a colour model still sees colour
    assert _grey(seen_picture(_colourful(), type(pre).from_dict({**rgb.to_dict(), "colour": "grey"})))


def test_the_command_line_takes_in_a_run_zip_and_refuses_a_bad_one(tmp_path, sealed_zip, capsys):
    archive = tmp_path / "shared.zip"
    archive.write_bytes(sealed_zip)
    (tmp_path / "runs").mkdir()
    assert main(["import-run", str(archive), "--into", str(tmp_path / "runs"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    folder = Path(out["run"])
    assert folder.parent == tmp_path / "runs" and load_run(folder).record.seal_problem() == ""
    assert main(["import-run", str(archive), "--into", str(tmp_path / "runs"), "--name", folder.name]) == 0
    assert capsys.readouterr().out.startswith(f"{archive} -> {folder}-2: a complete run, every file checked")
    bad = tmp_path / "bad.zip"
    bad.write_bytes(_zip_of({"../x": b"1"}))
    assert main(["import-run", str(bad), "--into", str(tmp_path / "runs"), "--json"]) != 0
    err = json.loads(capsys.readouterr().out)
    assert err["type"] == "DataError" and "an entry that would be written outside its folder ('../x')" in err["error"]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted([folder.name, f"{folder.name}-2"])
