"""The Streamlit app, driven headless with AppTest: every page, the main flows, and user
errors that must show an ``st.error`` (never an exception) and leave the session usable."""
from __future__ import annotations

import io
import struct
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "app.py")
PAGES = ["pages/model.py", "pages/discover.py", "pages/classes.py", "pages/explain.py", "pages/export.py",
         "pages/evaluate.py"]
SUBMIT_DISCOVERY = "FormSubmitter:discover_form-Start discovery"

pytest.importorskip("streamlit.testing.v1")
from streamlit.testing.v1 import AppTest  # noqa: E402


def _demo_ready() -> bool:
    from phpn.demos import get_demo

    demo = get_demo("fashion-mnist")
    return (demo.assets_dir / "model.safetensors").is_file() and (demo.assets_dir / "discover").is_dir()


needs_demo = pytest.mark.skipif(not _demo_ready(), reason="the fashion-mnist demo assets are not there")


@pytest.fixture(autouse=True)
def _uploads_in_tmp(tmp_path, monkeypatch):
    """Workspaces beside the test's folder (data roots and workspaces lie apart); typed paths
    and saving allowed in the test's folder only; visitors' code off unless a test turns it on
    (the operator's switch)."""
    app_settings_in(tmp_path, monkeypatch)


def app_settings_in(tmp_path, monkeypatch) -> None:
    """The app's settings for one test (what the autouse fixture above applies; usable directly)."""
    monkeypatch.setenv("PHPN_UPLOAD_DIR", str(tmp_path.parent / f"{tmp_path.name}-uploads"))
    monkeypatch.setenv("PHPN_DATA_ROOTS", str(tmp_path))
    monkeypatch.setenv("PHPN_WRITABLE_ROOTS", str(tmp_path))
    monkeypatch.delenv("PHPN_ALLOW_CODE", raising=False)
    monkeypatch.setenv("PHPN_SETTINGS_FILE", str(tmp_path / "no-settings.toml"))


@pytest.fixture
def code_allowed(monkeypatch):
    monkeypatch.setenv("PHPN_ALLOW_CODE", "1")


def _app() -> AppTest:
    return AppTest.from_file(APP, default_timeout=120)


def _same_browser(at: AppTest, monkeypatch) -> AppTest:
    """A new page load (a reload) in the browser that ``at`` ran in: it sends back the key that
    page gave it, as a browser sends its cookie; nothing of it is in the URL."""
    from phpn.app import state

    key = at.session_state["_key_to_keep"]
    monkeypatch.setattr(state, "browser_cookie", lambda: key)
    return _app()


def _clean(at: AppTest) -> None:
    """No uncaught exception on the page."""
    assert not at.exception, [e.value for e in at.exception]


def _errors(at: AppTest) -> list:
    return [e.value for e in at.error]


def _wait_for_job(at: AppTest, timeout: float = 90.0) -> object:
    job = at.session_state["job"]
    start = time.time()
    while job.running:
        assert time.time() - start < timeout, "the discovery did not finish in time"
        time.sleep(0.3)
        at.run()
    at.run()
    return job


def _small_discovery(at: AppTest, k: int = 2, cap: int = 8, toggles: dict = None, **settings) -> object:
    at.switch_page("pages/discover.py").run()
    _clean(at)
    at.slider(key="disc_k").set_value(k)
    at.number_input(key="disc_cap").set_value(cap)
    for key, value in settings.items():
        at.selectbox(key=key).set_value(value)
    for key, value in (toggles or {}).items():
        at.toggle(key=key).set_value(value)
    if [c for c in at.checkbox if c.key == "disc_confirm_chance"]:  # near chance: the visitor confirms
        at.checkbox(key="disc_confirm_chance").check()
    at.button(key=SUBMIT_DISCOVERY).click().run()
    _clean(at)
    job = _wait_for_job(at)
    _clean(at)
    assert job.status == "done", job.error
    return job


@pytest.fixture(scope="module")
def demo_app():
    """One app session with the demo loaded and a small live run, shared by the read-only tests."""
    if not _demo_ready():
        pytest.skip("the fashion-mnist demo assets are not there")
    at = _app().run()
    _clean(at)
    _small_discovery(at, k=3, cap=10)
    return at


# --- every page and the first start -----------------------------------------------------------

@needs_demo
def test_first_start_loads_the_demo_and_every_page_renders():
    at = _app().run()
    _clean(at)
    assert at.session_state["model"].session.demo == "fashion-mnist"
    assert len(at.session_state["data"].data.classes) == 10
    sidebar = " ".join(c.value for c in at.sidebar.caption)
    assert "fashion-mnist" in sidebar and "10 classes" in sidebar
    assert any("Exact" in s.value for s in at.success)  # the doctor's verdict
    assert at.session_state["run"].origin.startswith("precomputed")  # browsing starts at once
    for page in PAGES:
        at.switch_page(page).run()
        _clean(at)
        assert at.title, page


@needs_demo
def test_the_model_keeps_how_it_was_loaded_and_the_url_does_not_rescan_the_runs(monkeypatch):
    from phpn.app import serving

    scans = []
    real = serving.readable_runs
    monkeypatch.setattr(serving, "readable_runs", lambda *a, **kw: scans.append(1) or real(*a, **kw))
    at = _app().run()
    _clean(at)
    assert at.session_state["model"].spec == {"demo": "fashion-mnist"}
    assert at.query_params["run"] == "demo / fashion-mnist"  # the precomputed run, by its label
    scans.clear()
    for _ in range(3):
        at.switch_page("pages/explain.py").run()
        at.switch_page("pages/classes.py").run()
    _clean(at)
    assert at.query_params["run"] == "demo / fashion-mnist"
    assert scans == []  # the label was found once, when the run was opened, not on every render


@needs_demo
def test_the_experts_names_are_shown_as_text_not_html():
    at = _app().run()
    notes = at.session_state["run"].notes
    for c in notes.class_indices:
        notes.set(c, 0, name="<i>Sky</i>")
    for page in ("pages/classes.py", "pages/explain.py"):
        at.switch_page(page).run()
        _clean(at)
        shown = [m.value for m in at.markdown if "Sky" in m.value]
        assert shown and "<i>" not in "".join(shown), (page, shown)
        assert any("**Prototype 1 “&lt;i&gt;Sky&lt;/i&gt;”**" in v for v in shown), (page, shown)  # case kept


@pytest.mark.slow
@needs_demo
def test_the_imagenet_demo_loads_with_its_run_and_every_page_renders():
    at = _app().run()
    at.switch_page("pages/model.py").run()
    at.selectbox(key="demo_name").set_value("imagenet-lite0").run()
    at.button(key="load_demo").click().run()
    _clean(at)
    assert at.session_state["model"].session.demo == "imagenet-lite0"
    assert at.session_state["run"].origin.startswith("precomputed")
    for page in PAGES:
        at.switch_page(page).run()
        _clean(at)
        assert not _errors(at), (page, _errors(at))


@pytest.mark.slow
def test_every_page_with_a_run(demo_app):
    at = demo_app
    titles = {}
    for page in PAGES:
        at.switch_page(page).run()
        _clean(at)
        assert not _errors(at), (page, _errors(at))
        titles[page] = at.title[0].value
    assert titles["pages/classes.py"] == "Class browser" and titles["pages/explain.py"] == "Explain an image"


# --- discovery -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_live_discovery_shows_the_certificate_and_the_refinement_table(demo_app):
    at = demo_app
    at.switch_page("pages/discover.py").run()
    run = at.session_state["run"]
    assert run.origin == "live discovery" and run.run.k == 3
    assert any("Certificate PASSED" in s.value for s in at.success)
    labels = [m.label for m in at.metric]
    assert {"Agreement (images)", "Model accuracy", "Max |Δ logit|", "Features", "NMF",
            "Refinement"} <= set(labels)
    metrics = {m.label: m.value for m in at.metric}
    cert = run.run.meta["certificate"]
    assert metrics["Agreement (images)"] == f"{cert['images']} / {cert['images']}"
    assert metrics["Model accuracy"] == f"{100 * cert['correct'] / cert['labelled_images']:.1f}%"
    table = at.dataframe[0].value
    assert len(table) == 10 and {"α", "negative α", "fidelity", "objective before", "objective after",
                                 "refinement iterations", "converged"} <= set(table)
    assert bool(table["converged"].all()) and int(table["refinement iterations"].min()) > 0
    job = at.session_state["job"]
    assert {"features", "nmf", "refine", "certify"} <= {s for s, p in job.stages.items() if p.total}
    assert all(p.fraction == 1.0 for p in job.stages.values() if p.total)


@pytest.mark.slow
@needs_demo
def test_an_automatic_k_per_class_is_run_shown_and_explained():
    at = _app().run()
    _clean(at)
    job = _small_discovery(at, cap=10, toggles={"disc_auto_k": True})
    run = at.session_state["run"].run
    ks = {c: run.class_k(c) for c in run.class_indices.tolist()}
    assert run.meta["config"]["auto_k"] == 8 and all(2 <= k <= 8 for k in ks.values()) and job.status == "done"
    assert any(f"k = up to {run.k}, chosen per class" in c.value for c in at.caption)
    small = min(ks, key=ks.get)
    at.switch_page("pages/classes.py").run()
    at.selectbox(key="browser_class").set_value(small).run()
    _clean(at)
    assert sum(1 for m in at.markdown if "map fidelity" in m.value) == ks[small]
    assert any(c.value.startswith(f"k = {ks[small]}, chosen from NMF's error: relative error") for c in at.caption)


def test_save_and_load_a_run(demo_app, tmp_path):
    at = demo_app
    at.switch_page("pages/discover.py").run()
    target = tmp_path / "saved-run"
    at.text_input(key="save_path").set_value(str(target))
    at.button(key="save_run").click().run()
    _clean(at)
    assert '"format_version": 2' in (target / "run.json").read_text()
    assert at.session_state["run"].saved_to == target
    before = at.session_state["run"].run.prototypes.clone()
    at.text_input(key="load_path").set_value(str(target))
    at.button(key="load_run").click().run()
    _clean(at)
    assert torch.equal(at.session_state["run"].run.prototypes, before)
    # A folder that is not a run: a clear error, and the run is kept.
    at.text_input(key="load_path").set_value(str(tmp_path))
    at.button(key="load_run").click().run()
    _clean(at)
    assert any("is not a phpn run" in e for e in _errors(at))
    assert torch.equal(at.session_state["run"].run.prototypes, before)


@pytest.mark.slow
@needs_demo
def test_a_run_from_another_checkpoint_is_refused(tmp_path):
    from phpn.runs.store import load_run, save_run

    at = _app().run()
    _small_discovery(at, k=2, cap=4)
    run = load_run(save_run(at.session_state["run"].run, tmp_path / "mine"))
    run.meta["model"]["sha256"] = "f" * 64
    save_run(run, tmp_path / "other")
    at.text_input(key="load_path").set_value(str(tmp_path / "other"))
    at.button(key="load_run").click().run()
    _clean(at)
    assert any("different checkpoint" in e for e in _errors(at))


@pytest.mark.slow
@needs_demo
def test_cancel_keeps_the_session_and_the_previous_run():
    at = _app().run()
    _small_discovery(at, k=2, cap=4)
    previous = at.session_state["run"]
    at.slider(key="disc_k").set_value(3)
    at.number_input(key="disc_cap").set_value(100)
    at.selectbox(key="disc_solver").set_value("nelder-mead")  # slow on purpose: time to cancel
    at.button(key=SUBMIT_DISCOVERY).click().run()
    _clean(at)
    assert at.session_state["job"].running
    at.button(key="cancel_job").click().run()
    job = _wait_for_job(at)
    _clean(at)
    assert job.status == "cancelled"
    assert at.session_state["run"] is previous
    assert any("cancelled" in w.value for w in at.warning)
    # Still usable: another page renders with the previous run.
    at.switch_page("pages/classes.py").run()
    _clean(at)
    assert at.title[0].value == "Class browser"


# --- browsing and explaining -------------------------------------------------------------------------

def test_class_browser_switches_classes(demo_app):
    at = demo_app
    at.switch_page("pages/classes.py").run()
    _clean(at)
    for c in (0, 5, 9):
        at.selectbox(key="browser_class").set_value(c).run()
        _clean(at)
        assert f"({c})" in at.markdown[0].value or any(f"(class {c})" in m.value for m in at.markdown)
        assert len(at.get("plotly_chart")) == 1
        assert sum(1 for m in at.markdown if "map fidelity" in m.value) == 3
        assert len(at.image) >= 6  # a patch grid and a map row per prototype
    assert any("Shared parts" in c.value for c in at.caption)
    # The chosen class is still chosen after a visit to another page.
    at.switch_page("pages/explain.py").run()
    at.switch_page("pages/classes.py").run()
    _clean(at)
    assert at.selectbox(key="browser_class").value == 9


def test_explain_a_picked_image_and_another_class(demo_app):
    at = demo_app
    at.switch_page("pages/explain.py").run()
    _clean(at)
    assert at.radio(key="explain_source").value == "Held-out explain set"
    at.selectbox(key="explain_folder").set_value("07_sneaker").run()
    _clean(at)
    explained = at.session_state["explained"]["explanation"]
    assert len(explained.top) == 5
    assert explained.contributions.shape == (3,)
    assert explained.logit == pytest.approx(explained.bias + explained.contributions.sum(), abs=1e-4)
    charts = at.get("plotly_chart")
    assert len(charts) == 2  # top-5 and the waterfall
    key = next(k for k in at.session_state if str(k).startswith("explain_class_"))
    other = next(c for c in at.selectbox(key=key).options if not c.startswith("Sneaker"))
    at.selectbox(key=key).set_value(int(other.rsplit("(", 1)[1].rstrip(")"))).run()
    _clean(at)
    assert at.session_state["explained"]["explanation"].class_index != explained.class_index


def _png(size=(28, 28), color=128) -> bytes:
    buf = io.BytesIO()
    Image.new("L", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _png_bomb(w: int = 20000, h: int = 20000) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xffffffff)

    comp = zlib.compressobj()
    data = b"".join(comp.compress(b"\0" * (w + 1)) for _ in range(50)) + comp.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def test_explain_uploads_good_broken_and_bomb_images(demo_app):
    at = demo_app
    at.switch_page("pages/explain.py").run()
    at.radio(key="explain_source").set_value("Upload an image").run()
    _clean(at)
    upload = at.file_uploader(key="explain_upload")
    upload.set_value(("shirt.png", _png(), "image/png")).run()
    _clean(at)
    assert not _errors(at)
    assert at.session_state["explained"]["label"] == "shirt.png"
    at.file_uploader(key="explain_upload").set_value(("broken.png", b"\x89PNG not really", "image/png")).run()
    _clean(at)
    assert any("not a readable image" in e for e in _errors(at))
    at.file_uploader(key="explain_upload").set_value(("bomb.png", _png_bomb(), "image/png")).run()
    _clean(at)
    assert any("too large to decode safely" in e for e in _errors(at))
    at.radio(key="explain_source").set_value("Held-out explain set").run()
    _clean(at)
    assert not _errors(at)


# --- export and evaluate ----------------------------------------------------------------------------

def test_export_builds_reports(demo_app):
    at = demo_app
    at.switch_page("pages/explain.py").run()  # an explanation to export
    at.switch_page("pages/export.py").run()
    _clean(at)
    at.selectbox(key="export_class").set_value(3)
    at.button(key="build_class_report").click().run()
    _clean(at)
    at.button(key="build_expl_report").click().run()
    _clean(at)
    labels = [b.label for b in at.get("download_button")]
    assert labels == ["Download the run (.zip)", "Download the class report (.html)",
                      "Download the explanation report (.html)"]
    html_text = at.session_state["class_report"][2]
    assert "Dress" in html_text and "data:image/png;base64," in html_text


def test_evaluate_page_shows_the_numbers(demo_app, tmp_path):
    at = demo_app
    at.switch_page("pages/evaluate.py").run()
    _clean(at)
    at.number_input(key="eval_per_class").set_value(2)
    at.number_input(key="eval_del_per_class").set_value(1)
    at.button(key="FormSubmitter:evaluate_form-Evaluate").click().run()
    _clean(at)
    assert not _errors(at), _errors(at)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Top-1 agreement"] == "100.00%"
    assert "Completeness error" in metrics and "Mean own-contribution gap (top − random)" in metrics
    # A bad folder is a message, not a crash.
    at.text_input(key="eval_root").set_value(str(tmp_path / "nonexistent" / "folder"))
    at.button(key="FormSubmitter:evaluate_form-Evaluate").click().run()
    _clean(at)
    assert any("does not exist" in e for e in _errors(at))
    at.text_input(key="eval_root").set_value("/etc")  # outside the operator's folders
    at.button(key="FormSubmitter:evaluate_form-Evaluate").click().run()
    _clean(at)
    assert any("outside the folders this server allows" in e for e in _errors(at))


# --- uploads: checkpoints and image folders -----------------------------------------------------------

TINY_DEF = '''
import torch
from torch import nn


class TinyNet(nn.Module):
    def __init__(self, num_classes=4):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class MLPHead(nn.Module):
    def __init__(self, num_classes=4):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(torch.flatten(self.pool(self.features(x)), 1))))
'''


def _state_dict_bytes(cls_name: str) -> bytes:
    namespace = {}
    exec(TINY_DEF, namespace)  # noqa: S102 - our own test code
    torch.manual_seed(0)
    model = namespace[cls_name]()
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getvalue()


def _folder_zip(folders=("0", "1", "2", "3"), per_class: int = 6, extra: tuple = ()) -> bytes:
    rng = np.random.default_rng(0)
    tints = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (120, 120, 120)]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for c, folder in enumerate(folders):
            for i in range(per_class):
                arr = np.clip(rng.normal(0, 60, (24, 24, 3)) + np.array(tints[c % 4]), 0, 255).astype(np.uint8)
                im = io.BytesIO()
                Image.fromarray(arr).save(im, format="PNG")
                zf.writestr(f"colours/{folder}/img{i}.png", im.getvalue())
        for name, data in extra:
            zf.writestr(name, data)
    return buf.getvalue()


def _load_uploaded_tiny(at: AppTest, cls_name: str = "TinyNet", allow_code: bool = True) -> None:
    at.switch_page("pages/model.py").run()
    at.radio(key="model_source").set_value("Upload a checkpoint").run()
    _clean(at)
    at.file_uploader(key="ckpt_upload").set_value(("tiny.pt", _state_dict_bytes(cls_name), "application/octet-stream"))
    at.file_uploader(key="def_upload").set_value(("tiny_net.py", TINY_DEF.encode(), "text/x-python"))
    at.text_input(key="factory").set_value(cls_name)
    at.checkbox(key="run_model_code").set_value(allow_code)
    at.number_input(key="pre_resize").set_value(24)
    at.number_input(key="pre_crop").set_value(24)
    at.file_uploader(key="names_upload").set_value(("names.txt", b"red\ngreen\nblue\ngrey\n", "text/plain"))
    at.button(key="load_model").click().run()
    _clean(at)


def test_a_model_file_is_not_run_without_the_opt_in(code_allowed):
    at = _app().run()
    _load_uploaded_tiny(at, allow_code=False)
    assert any("running it was not allowed" in e for e in _errors(at))
    assert at.session_state["model"].label.startswith("demo")  # the session keeps its model


@pytest.mark.slow
def test_uploaded_checkpoint_model_file_and_zip_then_discover_browse_explain(code_allowed):
    at = _app().run()
    _load_uploaded_tiny(at)
    assert not _errors(at), _errors(at)
    model = at.session_state["model"]
    assert model.decomposable and model.session.preprocess.crop == 24
    assert model.session.class_names == ["red", "green", "blue", "grey"]
    assert "run" not in at.session_state and "data" not in at.session_state  # the demo's are dropped
    at.radio(key="data_source").set_value("Upload a zip of an image folder").run()
    at.file_uploader(key="zip_upload").set_value(("colours.zip", _folder_zip(extra=(("colours/0/notes.txt", b"hi"),)),
                                                  "application/zip"))
    at.number_input(key="data_cap").set_value(0)
    at.button(key="scan").click().run()
    _clean(at)
    assert not _errors(at), _errors(at)
    data = at.session_state["data"]
    assert data.kind == "upload" and [len(c.paths) for c in data.data.classes] == [6, 6, 6, 6]
    assert at.metric[-1].label == "Skipped files" and at.metric[-1].value == "1"
    _small_discovery(at, k=2, cap=6)
    at.switch_page("pages/classes.py").run()
    _clean(at)
    # An untrained tiny model is at chance on its images: the chance warning is the only error, and
    # the only warnings are the flags of low-fidelity prototypes.
    assert all("near chance" in e for e in _errors(at)), _errors(at)
    assert all(w.value.startswith("Low fidelity") for w in at.warning)
    at.switch_page("pages/explain.py").run()
    _clean(at)
    assert at.radio(key="explain_source").options == ["Discovery images", "Upload an image"]
    assert at.session_state["explained"]["explanation"].maps.shape[0] == 2


@pytest.mark.slow
def test_a_head_that_cannot_be_decomposed_is_explained(code_allowed):
    at = _app().run()
    _load_uploaded_tiny(at, "MLPHead")
    model = at.session_state["model"]
    assert not model.decomposable
    assert any("Cannot be decomposed exactly" in e for e in _errors(at))
    at.switch_page("pages/discover.py").run()
    _clean(at)
    assert any("cannot be decomposed exactly" in e for e in _errors(at))


def test_bad_uploads_and_paths_show_errors_and_keep_the_session(tmp_path):
    at = _app().run()
    _clean(at)
    before = at.session_state["model"] if "model" in at.session_state else None

    at.radio(key="model_source").set_value("Upload a checkpoint").run()
    at.file_uploader(key="ckpt_upload").set_value(("model.pt", b"definitely not a checkpoint", "application/octet-stream"))
    at.button(key="load_model").click().run()
    _clean(at)
    assert len(_errors(at)) == 1
    assert (at.session_state["model"] if "model" in at.session_state else None) is before

    at.radio(key="model_source").set_value("Checkpoint on this server").run()
    at.text_input(key="ckpt_path").set_value(str(tmp_path / "nonexistent" / "model.pth"))
    at.button(key="load_model").click().run()
    _clean(at)
    assert any("does not exist" in e for e in _errors(at))

    # A real state dict with the wrong architecture named.
    at.radio(key="model_source").set_value("Upload a checkpoint").run()
    at.file_uploader(key="ckpt_upload").set_value(("tiny.pt", _state_dict_bytes("TinyNet"), "application/octet-stream"))
    at.selectbox(key="arch").set_value("resnet18")
    at.button(key="load_model").click().run()
    _clean(at)
    assert len(_errors(at)) == 1

    if before is None:
        return
    # Image folders: ../ in a zip, class folders that do not match, a missing folder.
    at.radio(key="data_source").set_value("Upload a zip of an image folder").run()
    at.file_uploader(key="zip_upload").set_value(("evil.zip", _folder_zip(extra=(("../../evil.png", _png()),)),
                                                  "application/zip"))
    at.button(key="scan").click().run()
    _clean(at)
    assert any("outside its folder" in e for e in _errors(at))
    at.file_uploader(key="zip_upload").set_value(("wrong.zip", _folder_zip(folders=("cats", "dogs")), "application/zip"))
    at.button(key="scan").click().run()
    _clean(at)
    assert any("match no class name" in e or "class folders" in e for e in _errors(at))
    at.radio(key="data_source").set_value("Image folder on this server").run()
    at.text_input(key="data_path").set_value(str(tmp_path / "nonexistent" / "images"))
    at.button(key="scan").click().run()
    _clean(at)
    assert any("does not exist" in e for e in _errors(at))
    # The session is still usable.
    assert at.session_state["model"] is before
    at.switch_page("pages/discover.py").run()
    _clean(at)


def test_trusting_a_pickle_needs_a_visible_choice(code_allowed):
    at = _app().run()
    at.radio(key="model_source").set_value("Upload a checkpoint").run()
    assert not any("arbitrary code" in w.value for w in at.warning)
    at.checkbox(key="trust_pickle").check().run()
    _clean(at)
    assert any("arbitrary code" in w.value for w in at.warning)


@pytest.mark.gpu
@needs_demo
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_discovery_on_the_gpu_leaves_the_shared_model_on_the_cpu():
    at = _app().run()
    at.switch_page("pages/discover.py").run()
    assert at.selectbox(key="disc_device").options[0] == "cuda"
    job = _small_discovery(at, k=3, cap=100, disc_device="cuda")
    assert job.result.meta["device"].startswith("cuda")
    assert any("Certificate PASSED" in s.value for s in at.success)
    model = at.session_state["model"].session
    assert all(p.device.type == "cpu" for p in model.loaded.model.parameters())
    at.switch_page("pages/explain.py").run()
    _clean(at)
    assert not _errors(at)
    at.switch_page("pages/evaluate.py").run()
    at.selectbox(key="eval_device").set_value("cuda")
    at.number_input(key="eval_per_class").set_value(2)
    at.button(key="FormSubmitter:evaluate_form-Evaluate").click().run()
    _clean(at)
    assert not _errors(at), _errors(at)
    assert all(p.device.type == "cpu" for p in model.loaded.model.parameters())


# --- accuracy beside agreement, the chance warning, check preprocessing, mistakes first -----------

def _wrong_size_model(at: AppTest, size: int = 96) -> None:
    """The demo's model with a wrong input size, as a visitor who left the default size would have it."""
    from dataclasses import replace as _replace

    from phpn.api import open_model
    from phpn.app.frame import ModelEntry

    session = open_model(demo="fashion-mnist")
    session.preprocess = _replace(session.preprocess, resize=size, crop=size)
    at.session_state["model"] = ModelEntry(session=session, key=f"fashion-mnist at {size} px",
                                           label=f"demo: fashion-mnist at {size} px")
    del at.session_state["run"]


@pytest.mark.slow
@needs_demo
def test_a_model_at_the_wrong_size_is_flagged_before_any_explanation_and_the_check_proposes_28_px():
    at = _app().run()
    _wrong_size_model(at)
    _small_discovery(at, k=2, cap=3)
    cert = at.session_state["run"].run.meta["certificate"]
    assert cert["passed"] and cert["labelled_images"] == 30 and cert["near_chance"]  # exact, and at chance
    from phpn.method.certify import chance_warning

    warning = chance_warning(cert)
    assert warning in _errors(at)
    assert any(m.label == "Model accuracy" and m.value == f"{100 * cert['accuracy']:.1f}%" for m in at.metric)
    assert any(m.label == "Agreement (images)" and m.value == "30 / 30" for m in at.metric)
    assert any("near chance" in e.value for e in at.sidebar.error)
    at.switch_page("pages/explain.py").run()
    _clean(at)
    assert _errors(at)[0] == warning  # the first thing on the page, before any explanation
    at.switch_page("pages/discover.py").run()
    at.button(key="check_pre").click().run(timeout=600)  # 20 images per class, the whole size grid
    _clean(at)
    proposal = next(w.value for w in at.warning if w.value.startswith("Use "))
    assert proposal.startswith("Use 28 px, mean 0.286, std 0.353 normalisation (recorded with the model)")
    check = at.session_state["preprocess_check"][1]
    assert check.current.preprocess.crop == 96 and check.best.preprocess.crop == 28 and check.improves


@pytest.mark.slow
@needs_demo
def test_the_proposed_preprocessing_is_applied_for_the_session_and_undone():
    at = _app().run()
    run = at.session_state["run"]
    _wrong_size_model(at)
    wrong = at.session_state["model"]
    at.session_state["run"] = run  # a run made before: put aside while the new setting is tried
    data = at.session_state["data"]
    at.switch_page("pages/discover.py").run()
    at.button(key="check_pre").click().run(timeout=600)  # 20 images per class, the whole size grid
    _clean(at)
    check = at.session_state["preprocess_check"][1]
    assert check.improves and check.best.preprocess.crop == 28
    at.button(key="check_pre_apply").click().run()
    _clean(at)
    assert not _errors(at), _errors(at)
    model = at.session_state["model"]
    assert model.session.preprocess == check.best.preprocess and model.session.diagnosis.verdict == "exact"
    assert model.session.loaded is wrong.session.loaded  # the same model, not loaded again
    assert at.session_state["data"] is data and "run" not in at.session_state
    banner = next(i.value for i in at.info if i.value.startswith("Preprocessing for this session"))
    assert banner == ("Preprocessing for this session: **28 px, mean 0.286, std 0.353 normalisation**, set by Check "
                      "preprocessing (it was 96 px, mean 0.286, std 0.353 normalisation). Discover again to make a run "
                      "with it; the run made with the old setting is put aside.")
    at.switch_page("pages/model.py").run()
    assert any("Preprocessing: resize 28, crop 28" in m.value for m in at.markdown)  # visible where it is set
    at.switch_page("pages/discover.py").run()
    at.button(key="check_pre_undo").click().run()
    _clean(at)
    assert at.session_state["model"] is wrong and at.session_state["run"] is run and at.session_state["data"] is data
    assert not [i for i in at.info if i.value.startswith("Preprocessing for this session")]


@needs_demo
def test_mistakes_first_gallery_confusions_and_why_a_not_b():
    from phpn.api import open_data
    from phpn.pipeline.mistakes import predict_folder

    at = _app().run()
    at.switch_page("pages/mistakes.py").run()
    _clean(at)
    at.radio(key="mistakes_source").set_value("The demo's held-out images")
    at.number_input(key="mistakes_cap").set_value(5)
    at.button(key="mistakes_predict").click().run()
    _clean(at)
    assert not _errors(at), _errors(at)
    found = at.session_state["mistakes"]["found"]
    model = at.session_state["model"]
    again = predict_folder(model.session, open_data(model.session, at.session_state["data"].explain_root, 5))
    assert [p.predicted for p in found.predictions] == [p.predicted for p in again.predictions]
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Model accuracy"] == f"{100 * found.accuracy:.1f}%" and metrics["Images"] == "50"
    assert metrics["Mistakes"] == str(found.images - found.correct)
    assert found.summary() in [m.value for m in at.markdown]
    wrong = [p for p in found.mistakes_first() if not p.correct]
    assert wrong, "the demo model makes a few mistakes on its held-out images"
    # The contrast opens on the most confident mistake: its prediction against its label.
    first = wrong[0]
    gap_title = next(s.value for s in at.subheader if "logit gap" in s.value)
    assert f"{found.name(first.predicted)} over {found.name(first.true_class)}" in gap_title
    assert [c.key for c in at.get("plotly_chart")][0] == "mistakes_matrix"
    # The confusion matrix: classes by their names, each cell's count, and the cell's classes kept
    # for the click that opens its story.
    import json

    classes, counts = found.confusion_matrix()
    heat, cells = json.loads(at.get("plotly_chart")[0].proto.spec)["data"]
    layout = json.loads(at.get("plotly_chart")[0].proto.spec)["layout"]
    assert layout["xaxis"]["ticktext"] == layout["yaxis"]["ticktext"] == [found.name(c) for c in classes]
    assert heat["text"] == counts.tolist() and int(counts.sum()) == found.images
    assert cells["customdata"][len(classes) * classes.index(first.true_class) + classes.index(first.predicted)] == [
        first.true_class, first.predicted]
    # A prototype the expert named is called by its name in the waterfall and under its map.
    at.session_state["run"].notes.set(first.predicted, 1, name="collar")
    at.run()
    _clean(at)
    bars = json.loads(at.get("plotly_chart")[1].proto.spec)["data"][0]["x"]
    a, b = found.name(first.predicted), found.name(first.true_class)
    assert bars[1:4] == [f"{a}: prototype 1", f"{a}: prototype 2 “collar”", f"{a}: prototype 3"]
    assert bars[4] == f"{b}: prototype 1"
    captions = [c for img in at.image for c in img.captions]
    assert any(c.startswith("prototype 2 “collar”: ") for c in captions), captions
    # ... and its top training patches are shown under it, named the same way.
    assert "prototype 2 “collar”: its top training patches" in captions
    assert sum(c.endswith(": its top training patches") for c in captions) == 6  # k = 3, twice
    # Another image through its own "Why?" button.
    other = wrong[-1]
    at.button(key=f"why_{other.path}").click().run()
    _clean(at)
    assert any(other.path in c.value for c in at.caption)


@pytest.mark.slow
@needs_demo
def test_explain_marks_a_mistake_against_the_images_label():
    from phpn.api import open_data
    from phpn.pipeline.mistakes import predict_folder

    at = _app().run()
    model, data = at.session_state["model"], at.session_state["data"]
    found = predict_folder(model.session, open_data(model.session, data.explain_root))
    wrong = next(p for p in found.predictions if not p.correct)
    folder, name = wrong.path.split("/", 1)
    at.switch_page("pages/explain.py").run()
    at.selectbox(key="explain_folder").set_value(folder).run()
    at.selectbox(key="explain_file").set_value(name).run()
    _clean(at)
    assert any(e.value.startswith(f"**Mistake**: the model predicts **{found.name(wrong.predicted)}**, but this image "
                                  f"is labelled **{found.name(wrong.true_class)}**") for e in at.warning)
    assert at.session_state["explained"]["true_class"] == wrong.true_class


def test_uploaded_timm_state_dict_with_its_timm_name():
    timm = pytest.importorskip("timm")
    from safetensors.torch import save as save_safetensors

    torch.manual_seed(0)
    model = timm.create_model("convnext_atto", pretrained=False, num_classes=4).eval()
    data = save_safetensors({k: v.contiguous() for k, v in model.state_dict().items()})
    at = _app().run()
    at.switch_page("pages/model.py").run()
    at.radio(key="model_source").set_value("Upload a checkpoint").run()
    _clean(at)
    at.file_uploader(key="ckpt_upload").set_value(("weights.safetensors", data, "application/octet-stream"))
    at.text_input(key="timm_arch").set_value("convnext_atto")
    at.number_input(key="pre_resize").set_value(64)
    at.number_input(key="pre_crop").set_value(64)
    at.button(key="load_model").click().run()
    _clean(at)
    assert not _errors(at), _errors(at)
    loaded = at.session_state["model"].session
    assert loaded.loaded.arch == "timm/convnext_atto" and loaded.loaded.num_classes == 4
    assert loaded.diagnosis.verdict == "exact-after-folding"
