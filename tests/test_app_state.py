"""The app for an expert, driven headless with AppTest: notes on prototypes saved beside the
run and carried into reports and exports, switching prototypes off (an edited model, marked
as such), plain-language help and low-fidelity flags, and state that lasts: the URL restores
the session's run, class and image; settings and messages belong to one model."""
from __future__ import annotations

import hashlib
import io
import json
import zipfile

import pytest
from test_app import (  # noqa: F401
    _app,
    _clean,
    _errors,
    _folder_zip,
    _load_uploaded_tiny,
    _same_browser,
    _small_discovery,
    _uploads_in_tmp,
    code_allowed,
    needs_demo,
)

pytest.importorskip("streamlit.testing.v1")

NOTES_SUBMIT = "FormSubmitter:notes_{c}_{i}-Save the note"
OFF_SUBMIT = "FormSubmitter:off_form_{c}-Compare with the original model"


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _save_run(at, name: str):
    at.switch_page("pages/discover.py").run()
    at.text_input(key="save_path").set_value(name)
    at.button(key="save_run").click().run()
    _clean(at)
    assert any(s.value.startswith("Saved to") for s in at.success), _errors(at)
    return at.session_state["run"].saved_to


@pytest.mark.slow
@needs_demo
def test_notes_are_saved_beside_the_run_survive_a_reload_and_reach_reports_and_exports(monkeypatch):
    from phpn.runs.annotations import load_annotations
    from phpn.runs.store import load_run

    at = _app().run()
    folder = _save_run(at, "annotated")
    before = {p.name: _sha(p) for p in folder.iterdir()}  # run.json and the run's data files
    at.switch_page("pages/classes.py").run()
    at.selectbox(key="browser_class").set_value(3).run()
    at.text_input(key="notes_name_3_1").set_value("collar")
    at.multiselect(key="notes_flags_3_1").set_value(["spurious"])
    at.text_input(key="notes_other_3_1").set_value("Stripes")
    at.text_area(key="notes_desc_3_1").set_value("Fires on the neckline.")
    at.button(key=NOTES_SUBMIT.format(c=3, i=1)).click().run()
    _clean(at)
    assert "Note saved beside the run." in [s.value for s in at.success]
    # annotations.json beside the run; the run itself untouched and still verified when opened.
    assert {name: _sha(folder / name) for name in before} == before
    saved = load_annotations(load_run(folder))
    assert saved.get(3, 1).name == "collar" and saved.get(3, 1).flags == ("spurious", "stripes")
    query = dict(at.query_params)
    assert query["run"] == "my runs / annotated" and query["class"] == "3" and query["demo"] == "fashion-mnist"

    # A reload (a new session with the same URL) restores the run, its notes and the class.
    again = _same_browser(at, monkeypatch)
    for key, value in query.items():
        again.query_params[key] = value
    again.run()
    _clean(again)
    run = again.session_state["run"]
    assert run.origin == "reopened from the link (my runs / annotated)" and run.saved_to == folder
    assert run.notes.label(3, 1) == "prototype 2 “collar”"
    again.switch_page("pages/classes.py").run()
    _clean(again)
    assert again.selectbox(key="browser_class").value == 3
    header = [m.value for m in again.markdown if "collar" in m.value]
    assert header and "`spurious` `stripes`" in header[0]
    assert "Fires on the neckline." in [c.value for c in again.caption]

    # The class report and the run's zip carry the notes.
    again.switch_page("pages/export.py").run()
    assert again.selectbox(key="export_class").value == 3
    again.button(key="build_class_report").click().run()
    _clean(again)
    html_text = again.session_state["class_report"][2]
    assert "prototype 2 “collar”" in html_text and "Flagged: <b>spurious</b>, <b>stripes</b>" in html_text
    assert "Fires on the neckline." in html_text
    archive = zipfile.ZipFile(io.BytesIO(_zip_bytes(again)))  # what the page's download button holds
    notes = json.loads(archive.read(next(n for n in archive.namelist() if n.endswith("/annotations.json"))))
    assert notes["prototypes"] == [{"class_index": 3, "prototype": 1, "name": "collar",
                                    "description": "Fires on the neckline.", "flags": ["spurious", "stripes"]}]


def _zip_bytes(at) -> bytes:
    from phpn.show.report import run_zip_bytes

    entry = at.session_state["run"]
    return run_zip_bytes(entry.run, "run", notes=entry.notes)


@needs_demo
def test_switching_prototypes_off_is_an_edited_model_with_its_accuracy_beside_the_original():
    at = _app().run()
    at.switch_page("pages/classes.py").run()
    at.selectbox(key="browser_class").set_value(3).run()
    # Plain language: the method's quantities sit in an expert section, every word has help.
    assert any(e.label.startswith("Expert details") for e in at.expander)
    assert {m.label for m in at.metric} >= {"Residual ‖R‖/‖v‖", "Negative α", "Objective before", "Objective after"}
    at.multiselect(key="off_protos_3").set_value([0, 1])
    at.button(key=OFF_SUBMIT.format(c=3)).click().run()
    _clean(at)
    assert not _errors(at), _errors(at)
    assert any(w.value.startswith("**Edited model: prototypes switched off. It no longer equals the original model")
               for w in at.warning)
    result = at.session_state["switch_off"][2]
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Original model accuracy"] == f"{100 * result.original_accuracy:.1f}%"
    assert metrics["Edited model accuracy"] == f"{100 * result.edited_accuracy:.1f}%"
    assert metrics["Predictions changed"] == f"{len(result.changed)} of {result.images}"
    assert result.images == 100 and result.switched_off == {3: [0, 1]}
    assert result.edited_accuracy < result.original_accuracy  # the dress's main parts matter
    # A low-fidelity prototype is flagged where it is shown (the threshold lives in phpn.glossary).
    from phpn.glossary import LOW_FIDELITY

    at.session_state["run"].run.class_meta(3)["fidelity"][2] = LOW_FIDELITY / 2
    at.run()
    assert any(w.value.startswith(f"Low fidelity ({LOW_FIDELITY / 2:.2f} < {LOW_FIDELITY:g})") for w in at.warning)


@pytest.mark.slow
@needs_demo
def test_switching_off_is_measured_on_the_held_out_images_by_default_and_says_so():
    from phpn.runs.annotations import ON_DISCOVERY_IMAGES, switch_off

    at = _app().run()
    _small_discovery(at, k=2, cap=4)
    at.switch_page("pages/classes.py").run()
    at.selectbox(key="browser_class").set_value(3).run()
    assert at.selectbox(key="off_source").value == "The demo's held-out images"  # the default where there are
    assert at.selectbox(key="off_source").options == ["The demo's held-out images",
                                                      "The images loaded on Model & data",
                                                      "Labelled folder on this server"]
    at.multiselect(key="off_protos_3").set_value([0])
    at.number_input(key="off_per_class").set_value(3)
    at.button(key=OFF_SUBMIT.format(c=3)).click().run()
    _clean(at)
    assert not _errors(at), _errors(at)
    result = at.session_state["switch_off"][2]
    model, data, entry = at.session_state["model"], at.session_state["data"], at.session_state["run"]
    held_out = switch_off(entry.network, model_scan(model, data.explain_root), model.session.preprocess, {3: [0]},
                          images_per_class=3)
    assert result.images == held_out.images == 30
    assert (result.original_accuracy, result.edited_accuracy, result.changed) == (
        held_out.original_accuracy, held_out.edited_accuracy, held_out.changed)
    assert result.measured_on == "the demo's held-out images" and not result.on_discovery_images
    caption = next(c.value for c in at.caption if c.value.startswith("Edited model"))
    assert (f"Measured on the demo's held-out images (30 labelled images): accuracy "
            f"{100 * held_out.original_accuracy:.1f}% → {100 * held_out.edited_accuracy:.1f}%") in caption
    assert ON_DISCOVERY_IMAGES not in [w.value for w in at.warning]
    # On the images discovery read, the same numbers come with the warning that they are optimistic.
    at.selectbox(key="off_source").set_value("The images loaded on Model & data")
    at.button(key=OFF_SUBMIT.format(c=3)).click().run()
    _clean(at)
    result = at.session_state["switch_off"][2]
    assert result.on_discovery_images and result.measured_on == "the discovery images (loaded on Model & data)"
    assert ON_DISCOVERY_IMAGES in [w.value for w in at.warning]
    assert result.images == sum(min(3, len(c.paths)) for c in data.data.classes)


def model_scan(model, root):
    from phpn.api import open_data

    return open_data(model.session, root)


@pytest.mark.slow
@needs_demo
def test_settings_and_messages_belong_to_one_model_and_a_stale_link_is_a_warning():
    at = _app().run()
    _small_discovery(at, k=2, cap=4)
    at.number_input(key="disc_cap").set_value(600).run()  # a setting chosen for this model
    assert any("Discovery finished" in s.value for s in at.success)
    at.switch_page("pages/model.py").run()
    at.selectbox(key="demo_name").set_value("imagenet-lite0").run()
    at.button(key="load_demo").click().run()
    _clean(at)
    assert at.query_params["demo"] == "imagenet-lite0" and at.query_params["run"] == "demo / imagenet-lite0"
    at.switch_page("pages/discover.py").run()
    _clean(at)
    assert not any("Discovery finished" in s.value for s in at.success)  # that was the other model's
    assert at.number_input(key="disc_cap").value != 600  # the other model's setting is not carried

    stale = _app()
    stale.query_params["run"] = "my runs / gone"
    stale.run()
    _clean(stale)
    assert any("The link's run could not be opened" in w.value for w in stale.sidebar.warning)
    assert stale.session_state["model"].session.demo == "fashion-mnist"  # the default demo instead


@pytest.mark.slow
@needs_demo
def test_a_run_whose_model_file_is_missing_asks_for_it_and_opens_once_it_is_loaded(tmp_path, monkeypatch):
    at = _app().run()
    at.switch_page("pages/model.py").run()
    at.selectbox(key="demo_name").set_value("imagenet-lite0").run()
    at.button(key="load_demo").click().run()
    folder = _save_run(at, "lite0-copy")
    from phpn.runs.store import load_run, save_run

    saved = load_run(folder)  # saved again as if made from an uploaded file that is gone now (run.json is sealed)
    meta = saved.meta
    meta["demo"] = None
    meta["model"]["source"] = str(tmp_path / "gone" / "lite0.safetensors")
    meta["model"]["origin"] = {"how": "upload", "name": "lite0.safetensors", "sha256": meta["model"]["sha256"]}
    save_run(saved, folder, overwrite=True)
    sha = meta["model"]["sha256"]

    again = _same_browser(at, monkeypatch)
    again.query_params["run"] = "my runs / lite0-copy"
    again.run()
    _clean(again)
    assert [w.value for w in again.sidebar.warning] == [
        f"This run was made from lite0.safetensors (sha256 {sha[:12]}…), which is not on this server for you. Load "
        "that model on the Model & data page: the run opens as soon as it is loaded."]
    assert again.session_state["model"].session.demo == "fashion-mnist"  # meanwhile, the default demo
    again.switch_page("pages/model.py").run()
    again.selectbox(key="demo_name").set_value("imagenet-lite0").run()
    again.button(key="load_demo").click().run()
    _clean(again)
    run = again.session_state["run"]
    assert run.saved_to == folder and run.origin == "reopened from the link (my runs / lite0-copy)"
    assert "pending_run" not in again.session_state


@pytest.mark.slow
@needs_demo
def test_the_url_carries_the_image_and_a_reload_shows_it_again():
    at = _app().run()
    at.switch_page("pages/explain.py").run()
    _clean(at)
    folders = at.selectbox(key="explain_folder").options
    at.selectbox(key="explain_folder").set_value(folders[2]).run()
    files = at.selectbox(key="explain_file").options
    at.selectbox(key="explain_file").set_value(files[1]).run()
    _clean(at)
    image = f"{folders[2]}/{files[1]}"
    assert at.query_params["image"] == image
    again = _app()
    for key, value in dict(at.query_params).items():
        again.query_params[key] = value
    again.run()
    again.switch_page("pages/explain.py").run()
    _clean(again)
    assert again.selectbox(key="explain_folder").value == folders[2]
    assert again.selectbox(key="explain_file").value == files[1]
    assert again.session_state["explained"]["label"] == image


@needs_demo
def test_notes_on_a_read_only_demo_run_are_kept_and_written_when_a_copy_is_saved():
    from phpn.runs.annotations import load_annotations
    from phpn.runs.store import load_run

    at = _app().run()
    at.switch_page("pages/classes.py").run()
    at.text_input(key="notes_name_0_0").set_value("neckline")
    at.button(key=NOTES_SUBMIT.format(c=0, i=0)).click().run()
    _clean(at)
    assert [w.value for w in at.warning] == [
        "Note kept for this session; the fashion-mnist demo's files are read-only: save a copy of the run on the "
        "Discover page to keep notes."]
    demo_run = at.session_state["run"].saved_to
    assert not (demo_run / "annotations.json").exists()  # the shipped run is never written
    folder = _save_run(at, "my-copy")
    at.switch_page("pages/classes.py").run()
    _clean(at)
    assert load_annotations(load_run(folder)).label(0, 0) == "prototype 1 “neckline”"
    assert not at.session_state["run"].notes_unsaved


@pytest.mark.slow
@needs_demo
def test_a_saved_run_of_an_uploaded_model_reopens_with_its_model_and_images_after_a_reload(code_allowed,
                                                                                            monkeypatch):
    at = _app().run()
    _load_uploaded_tiny(at)
    at.radio(key="data_source").set_value("Upload a zip of an image folder").run()
    at.file_uploader(key="zip_upload").set_value(("colours.zip", _folder_zip(), "application/zip"))
    at.number_input(key="data_cap").set_value(0)
    at.button(key="scan").click().run()
    _small_discovery(at, k=2, cap=6)
    folder = _save_run(at, "tiny-run")
    model_key = at.session_state["model"].key
    query = dict(at.query_params)
    assert query["run"] == "my runs / tiny-run" and "demo" not in query

    again = _same_browser(at, monkeypatch)
    for key, value in query.items():
        again.query_params[key] = value
    again.run()
    _clean(again)
    assert not [w.value for w in again.sidebar.warning if "link" in w.value or "run was made from" in w.value]
    assert again.session_state["model"].key == model_key  # the same file, architecture file and preprocessing
    assert again.session_state["run"].saved_to == folder
    data = again.session_state["data"]
    assert data.kind == "upload" and [len(c.paths) for c in data.data.classes] == [6, 6, 6, 6]


@needs_demo
def test_a_finished_discovery_is_kept_at_once_and_a_reload_brings_it_back(monkeypatch):
    at = _app().run()
    _clean(at)
    _small_discovery(at, k=2, cap=4)
    at.run()
    _clean(at)
    entry = at.session_state["run"]
    workspace = at.session_state["_workspace"]
    assert entry.origin == "live discovery" and entry.saved_to is not None
    assert entry.saved_to.parent == workspace.runs and (entry.saved_to / "run.json").is_file()
    assert at.query_params["run"] == f"my runs / {entry.saved_to.name}"
    prototypes = entry.run.prototypes.clone()

    again = _same_browser(at, monkeypatch)  # F5: the same browser, the same URL
    again.query_params["run"] = at.query_params["run"]
    again.run()
    _clean(again)
    back = again.session_state["run"]
    assert back.saved_to.resolve() == entry.saved_to.resolve()
    assert (back.run.prototypes - prototypes).abs().max().item() == 0.0
