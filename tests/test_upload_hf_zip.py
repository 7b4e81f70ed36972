"""A zipped Hugging Face model folder as an upload: checked like every archive, unpacked into the
visitor's folder, loaded through phpn.models.hf (nothing fetched); pickled weights and custom
code need what they need. And the provenance of a model the app loaded: the upload's own name,
its sha256 and how it was loaded, never a path of the server's workspace."""
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

from phpn.app.serving import ServerSettings
from phpn.app.uploads import save_model_upload, unpack_model_folder
from phpn.errors import DataError
from phpn.models.archive import sniff_upload
from phpn.runs.provenance import (
    describe_origin,
    load_from_record,
    model_origin,
    origin_words,
    portable_path,
    recorded_load,
    resolve_portable,
)

transformers = pytest.importorskip("transformers")

LABELS = {0: "red", 1: "green", 2: "blue"}
CODE_ON = ServerSettings(allow_code=True)
CODE_OFF = ServerSettings(allow_code=False)


class _Upload(io.BytesIO):
    """What Streamlit hands the page: bytes with a name and a size."""

    def __init__(self, data: bytes, name: str):
        super().__init__(data)
        self.name = name
        self.size = len(data)


def _save_convnext(folder: Path, safetensors: bool = True) -> torch.nn.Module:
    """A tiny ConvNeXt classifier with random weights and its image processor, as users save them."""
    torch.manual_seed(0)
    cfg = transformers.ConvNextConfig(num_labels=3, id2label=LABELS, label2id={v: k for k, v in LABELS.items()},
                                      hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1])
    model = transformers.ConvNextForImageClassification(cfg).eval()
    if safetensors:
        model.save_pretrained(folder)
    else:  # the older format: the state dict pickled by torch.save
        folder.mkdir(parents=True)
        cfg.architectures = ["ConvNextForImageClassification"]
        cfg.save_pretrained(folder)
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    transformers.ConvNextImageProcessor(size={"shortest_edge": 64}, crop_pct=0.875).save_pretrained(folder)
    return model


def _zip_folder(folder: Path, prefix: str = "convnext/", extra: tuple = ()) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for path in sorted(folder.iterdir()):
            zf.write(path, prefix + path.name)
        for entry, data in extra:
            zf.writestr(entry, data)
    return buf.getvalue()


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hf") / "convnext"
    _save_convnext(folder)
    return folder


def _images(root: Path, per_class: int = 4) -> Path:
    rng = np.random.default_rng(0)
    for c, tint in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        (root / str(c)).mkdir(parents=True)
        for i in range(per_class):
            arr = np.clip(rng.normal(0, 60, (32, 32, 3)) + np.array(tint), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / str(c) / f"{i}.png")
    return root


# --- the library: a good zip loads and a discovery on it certifies ---------------------------------

def test_a_zipped_model_folder_loads_through_the_hf_path_and_certifies(saved, tmp_path):
    from phpn.api import open_data, open_model, run_discovery
    from phpn.models.checkpoint import file_sha256
    from phpn.pipeline.discover import DiscoveryConfig

    upload = save_model_upload(_Upload(_zip_folder(saved), "My ConvNeXt.zip"), tmp_path / "ws", settings=CODE_OFF)
    assert (upload.kind, upload.name, upload.folder) == ("model-folder-zip", "My ConvNeXt.zip", "convnext")
    assert upload.path.name == "convnext" and (upload.path / "config.json").is_file()
    left = sorted(p.name for p in (tmp_path / "ws").rglob("*") if p.is_file())
    assert left == ["config.json", "model.safetensors", "preprocessor_config.json"]  # the archive is gone

    session = open_model(upload.path)
    assert session.loaded.arch == "hf/ConvNextForImageClassification"
    assert session.loaded.class_names == ["red", "green", "blue"]
    assert session.loaded.sha256 == file_sha256(saved / "model.safetensors")  # the same identity as the CLI's
    assert (session.preprocess.resize, session.preprocess.crop) == (73, 64)  # from preprocessor_config.json
    assert session.diagnosis.verdict == "exact-after-folding"
    data = open_data(session, _images(tmp_path / "images"))
    run = run_discovery(session, data, DiscoveryConfig(k=2, images_per_class=None, device="cpu", batch_size=8),
                        certify_images=True)
    cert = run.meta["certificate"]
    assert cert["passed"] and cert["top1_agreement"] == 1.0 and cert["max_logit_diff"] < 1e-4


def test_config_at_the_zips_top_is_unpacked_under_the_zips_name(saved, tmp_path):
    upload = save_model_upload(_Upload(_zip_folder(saved, prefix=""), "resnet-ish.zip"), tmp_path, settings=CODE_OFF)
    assert (upload.path.name, upload.folder) == ("resnet-ish", "")
    zipped = tmp_path / "m.zip"
    zipped.write_bytes(_zip_folder(saved))
    assert sniff_upload(zipped) == "model-folder-zip"


def test_a_state_dict_upload_is_still_a_checkpoint(tmp_path):
    buf = io.BytesIO()
    torch.save({"w": torch.ones(2)}, buf)
    upload = save_model_upload(_Upload(buf.getvalue(), "weights.th"), tmp_path)
    assert (upload.kind, upload.name, upload.path) == ("checkpoint", "weights.th", tmp_path / "weights.th")


# --- refusals, each with its exact message, leaving nothing behind ---------------------------------

def _refused(tmp_path, data: bytes, settings=CODE_OFF, trusted=False, **options) -> str:
    ws = tmp_path / "ws"
    with pytest.raises(DataError) as err:
        save_model_upload(_Upload(data, "model.zip"), ws, settings=settings, trusted=trusted, **options)
    assert not ws.exists() or list(ws.rglob("*")) == [], list(ws.rglob("*"))
    return str(err.value)


def test_traversal_links_nested_archives_and_size_are_refused(saved, tmp_path):
    layout = "Zip the folder that model.save_pretrained(folder) wrote"
    assert _refused(tmp_path, _zip_folder(saved, extra=(("../../evil.py", b"x"),))) == (
        "The zip file contains an entry that would be written outside its folder ('../../evil.py'). phpn refuses "
        f"such archives; {layout[0].lower() + layout[1:]} and upload that.")
    link = zipfile.ZipInfo("convnext/weights")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    buf = io.BytesIO(_zip_folder(saved))
    with zipfile.ZipFile(buf, "a") as zf:
        zf.writestr(link, "/etc/passwd")
    assert _refused(tmp_path, buf.getvalue()) == ("The zip file contains a symbolic link ('convnext/weights'). "
                                                  "Links are refused; zip the model folder's real files only.")
    assert _refused(tmp_path, _zip_folder(saved, extra=(("convnext/more.tar.gz", b"x"),))) == (
        "The zip file contains another archive ('convnext/more.tar.gz'). Unpack that archive first, then zip the "
        "model folder itself and upload that.")
    size = sum(p.stat().st_size for p in saved.iterdir())
    message = _refused(tmp_path, _zip_folder(saved), max_bytes=size // 2 + len(_zip_folder(saved)))
    assert message.startswith("The zip file would unpack to ") and message.endswith(
        "allowed. Upload a smaller model, or ask the operator of this server to put the folder on the server.")
    many = _zip_folder(saved, extra=tuple((f"convnext/extra/{i}.txt", b"x") for i in range(1001)))
    assert _refused(tmp_path, many) == ("The zip file holds more than 1,000 files. A model folder holds a few files "
                                        "(config.json, the weights, preprocessor_config.json): zip only that folder.")


def test_a_zip_without_config_or_weights_or_with_two_models_is_refused(saved, tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.write(saved / "model.safetensors", "convnext/model.safetensors")
        zf.writestr("deep/er/config.json", "{}")  # two folders down: not looked at
    assert _refused(tmp_path, buf.getvalue()) == (
        "'model.zip' is not a checkpoint: it is a zip archive of other files (an image folder goes in the Images "
        "section; a Hugging Face model folder needs its config.json). Upload the weights saved with "
        "torch.save(model.state_dict(), path) or safetensors; any file name or extension will do.")
    source = tmp_path / "no-config.zip"  # unpacked directly: the folder check of its own
    source.write_bytes(buf.getvalue())
    with pytest.raises(DataError) as err:
        unpack_model_folder(source, tmp_path / "out")
    assert str(err.value) == ("The zip file has no config.json at its top or in a folder just below it, so it is "
                              "not a Hugging Face model folder. Zip the folder that model.save_pretrained(folder) "
                              "wrote (config.json beside model.safetensors) and upload that.")
    assert not (tmp_path / "out").exists()
    no_weights = _zip_folder(saved, prefix="m/")
    with zipfile.ZipFile(io.BytesIO(no_weights)) as zf:
        kept = {n: zf.read(n) for n in zf.namelist() if not n.endswith(".safetensors")}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in kept.items():
            zf.writestr(name, data)
    assert _refused(tmp_path, buf.getvalue()) == (
        "The model folder has config.json but no weights (model.safetensors or pytorch_model.bin, or their shards). "
        "Zip the whole folder that model.save_pretrained(folder) wrote.")
    two = _zip_folder(saved, prefix="a/", extra=(("b/config.json", (saved / "config.json").read_bytes()),))
    assert _refused(tmp_path, two) == ("The zip file holds 2 model folders with a config.json ('a', 'b'). Zip one "
                                       "model folder at a time.")


def test_custom_code_is_refused_even_where_visitors_code_is_allowed(saved, tmp_path):
    config = json.loads((saved / "config.json").read_text())
    config["auto_map"] = {"AutoModelForImageClassification": "modeling_mine.MyNet"}
    data = _zip_folder(saved, extra=(("convnext/modeling_mine.py", b"import os\nos._exit(3)\n"),))
    buf = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(buf, "w") as zf:
        for name in src.namelist():
            zf.writestr(name, json.dumps(config) if name.endswith("config.json") and "preprocessor" not in name
                        else src.read(name))
    for settings in (CODE_OFF, CODE_ON):
        assert _refused(tmp_path, buf.getvalue(), settings=settings, trusted=True) == (
            "The model folder's config.json asks for the model's own code (auto_map), which phpn never runs from a "
            "model folder. Use a model class that transformers ships, or upload its weights with your own "
            "architecture file (.py) where this server allows visitors' code.")


def test_pickled_weights_need_the_operators_switch_and_the_visitors_trust(tmp_path):
    from phpn.api import open_model

    folder = tmp_path / "src" / "old"
    model = _save_convnext(folder, safetensors=False)
    data = _zip_folder(folder, prefix="old/")
    assert _refused(tmp_path, data, settings=CODE_OFF, trusted=True) == (
        "The model folder's weights are pytorch_model.bin, a pickle, and opening visitors' pickles is turned off on "
        "this server. Save the weights as safetensors (model.save_pretrained(folder), the default) and upload the "
        "folder again. The operator of this server can allow it by setting PHPN_ALLOW_CODE=1 before `streamlit run "
        "app.py` (only on a server whose visitors are trusted).")
    assert _refused(tmp_path, data, settings=CODE_ON, trusted=False) == (
        "The model folder's weights are pytorch_model.bin, a pickle, which is opened only for a file you trust. "
        "Tick 'Trust this checkpoint' if you made it or trust its source, or save the weights as safetensors "
        "(model.save_pretrained(folder), the default) and upload the folder again.")
    upload = save_model_upload(_Upload(data, "old.zip"), tmp_path / "ws", settings=CODE_ON, trusted=True)
    loaded = open_model(upload.path).loaded  # read with torch.load(weights_only=True) all the same
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model(pixel_values=x).logits)


# --- provenance --------------------------------------------------------------------------------------

def test_origins_read_as_the_visitor_knows_the_model(tmp_path):
    sha = "ab" * 32
    assert describe_origin(model_origin("upload", name="resnet.pt", sha256=sha)) == \
        "resnet.pt (uploaded checkpoint), sha256 abababababab…"
    assert describe_origin(model_origin("hf-zip", name="convnext.zip", folder="convnext")) == \
        "convnext.zip, folder 'convnext' (uploaded zip of a Hugging Face model folder)"
    assert describe_origin(model_origin("server-path", path="/data/models/r50.pth")) == \
        "/data/models/r50.pth (checkpoint on the server)"
    assert describe_origin(model_origin("demo", name="fashion-mnist")) == "the built-in fashion-mnist demo"
    assert origin_words({"origin": model_origin("upload", name="a.pt", sha256=sha)}) == "a.pt (uploaded checkpoint)"
    assert origin_words({"source": "/x/y.pt"}) == "" and describe_origin(None) == ""
    with pytest.raises(Exception, match="Unknown way of loading a model: 'ftp'"):
        model_origin("ftp")


def test_workspace_files_are_recorded_as_my_files_and_found_again(tmp_path):
    ws = tmp_path / "ws"
    (ws / "uploads" / "u1").mkdir(parents=True)
    ckpt = ws / "uploads" / "u1" / "tiny.pt"
    spec = {"checkpoint": str(ckpt), "model_def": f"{ws}/uploads/u1/net.py:TinyNet", "arch": None,
            "origin": model_origin("upload", name="tiny.pt")}
    recorded = recorded_load(spec, ws)
    assert recorded["checkpoint"] == "my files/uploads/u1/tiny.pt"
    assert recorded["model_def"] == "my files/uploads/u1/net.py:TinyNet"
    assert str(tmp_path) not in json.dumps(recorded)
    assert load_from_record(recorded, ws) == spec
    other = tmp_path / "other-visitor"
    assert load_from_record(recorded, other)["checkpoint"] == str(other / "uploads" / "u1" / "tiny.pt")
    assert resolve_portable("my files/../../etc/passwd", ws) is None
    assert load_from_record({"checkpoint": "my files/../x.pt"}, ws) is None
    assert portable_path("/data/models/r50.pth", ws) == "/data/models/r50.pth"  # the operator's folders stay


# --- the app: the zip on the Model page, and what an app-made run records ---------------------------

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def app(tmp_path, monkeypatch):
    pytest.importorskip("streamlit.testing.v1")
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("PHPN_UPLOAD_DIR", str(tmp_path / "uploads"))
    monkeypatch.setenv("PHPN_DATA_ROOTS", str(tmp_path / "roots"))
    monkeypatch.delenv("PHPN_ALLOW_CODE", raising=False)
    monkeypatch.setenv("PHPN_SETTINGS_FILE", str(tmp_path / "no-settings.toml"))
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _clean(at) -> list:
    """The page's errors, less the warning that an untrained model is near chance on its images."""
    assert not at.exception, [e.value for e in at.exception]
    return [e.value for e in at.error if "better than guessing" not in e.value and "near chance" not in e.value]


def _upload_model(at, data: bytes, name: str) -> list:
    at.switch_page("pages/model.py").run()
    at.radio(key="model_source").set_value("Upload a checkpoint").run()
    at.file_uploader(key="ckpt_upload").set_value((name, data, "application/zip"))
    at.number_input(key="pre_resize").set_value(64)
    at.number_input(key="pre_crop").set_value(64)
    at.button(key="load_model").click().run()
    return _clean(at)


def _images_zip() -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for c, tint in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
            for i in range(4):
                arr = np.clip(rng.normal(0, 60, (24, 24, 3)) + np.array(tint), 0, 255).astype(np.uint8)
                png = io.BytesIO()
                Image.fromarray(arr).save(png, format="PNG")
                zf.writestr(f"colours/{LABELS[c]}/{i}.png", png.getvalue())
    return buf.getvalue()


@pytest.mark.slow
def test_the_model_page_takes_a_zipped_model_and_the_run_says_where_it_came_from(app, saved, tmp_path,
                                                                                  monkeypatch):
    import time

    from phpn.models.checkpoint import file_sha256
    from phpn.runs.store import load_run

    at = app
    assert _upload_model(at, _zip_folder(saved), "my convnext.zip") == []
    model = at.session_state["model"]
    loaded = model.session.loaded
    assert (model.label, loaded.arch, loaded.class_names) == ("my convnext.zip", "hf/ConvNextForImageClassification",
                                                              ["red", "green", "blue"])
    assert loaded.source == "my convnext.zip, folder 'convnext' (uploaded zip of a Hugging Face model folder)"
    assert model.session.diagnosis.verdict == "exact-after-folding"
    details = " ".join(m.value for m in at.markdown)
    assert "source: my convnext.zip, folder 'convnext'" in details and str(tmp_path) not in details

    at.radio(key="data_source").set_value("Upload a zip of an image folder").run()
    at.file_uploader(key="zip_upload").set_value(("colours.zip", _images_zip(), "application/zip"))
    at.number_input(key="data_cap").set_value(0)
    at.button(key="scan").click().run()
    assert _clean(at) == []
    at.switch_page("pages/discover.py").run()
    at.slider(key="disc_k").set_value(2)
    at.number_input(key="disc_cap").set_value(4)
    if [c for c in at.checkbox if c.key == "disc_confirm_chance"]:  # near chance: the visitor confirms
        at.checkbox(key="disc_confirm_chance").check()
    at.button(key="FormSubmitter:discover_form-Start discovery").click().run()
    job = at.session_state["job"]
    start = time.time()
    while job.running:
        assert time.time() - start < 90, "the discovery did not finish in time"
        time.sleep(0.3)
        at.run()
    at.run()
    assert job.status == "done", job.error
    run = at.session_state["run"].run
    recorded = run.meta["model"]
    sha = file_sha256(saved / "model.safetensors")
    assert recorded["sha256"] == sha  # phpn's checkpoint identity, as before
    assert recorded["origin"] == {"how": "hf-zip", "loaded_as": "uploaded zip of a Hugging Face model folder",
                                  "name": "my convnext.zip", "folder": "convnext", "sha256": sha}
    assert recorded["source"] == loaded.source
    assert recorded["app_load"]["checkpoint"].startswith("my files/uploads/upload-")
    assert recorded["app_load"]["checkpoint"].endswith("/my_convnext/convnext")
    assert run.meta["data"]["root"] == "upload:colours.zip"
    assert run.meta["data"]["app_folder"]["root"].startswith("my files/uploads/upload-")
    assert run.meta["certificate"]["passed"]

    at.text_input(key="save_path").set_value("hf-run")
    at.button(key="save_run").click().run()
    assert _clean(at) == []
    saved_to = at.session_state["run"].saved_to
    text = (saved_to / "run.json").read_text()
    workspace = str(at.session_state["_workspace"].path)
    assert workspace not in text and str(tmp_path) not in text  # no server path of the visitor's files
    assert load_run(saved_to).meta["model"]["origin"]["name"] == "my convnext.zip"

    # A reload (a new session with the same URL, in the same browser) reopens the run with its
    # model, from 'my files/…'.
    from streamlit.testing.v1 import AppTest

    from phpn.app import state

    query = dict(at.query_params)
    assert query["run"] == "my runs / hf-run"
    cookie = at.session_state["_key_to_keep"]  # what the browser keeps
    monkeypatch.setattr(state, "browser_cookie", lambda: cookie)
    again = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    for key, value in query.items():
        again.query_params[key] = value
    again.run()
    assert _clean(again) == []
    assert again.session_state["run"].saved_to == saved_to
    assert again.session_state["model"].label == "my convnext.zip"
    assert again.session_state["model"].session.loaded.sha256 == sha

    at.switch_page("pages/export.py").run()
    assert _clean(at) == []
    captions = " ".join(c.value for c in at.caption)
    origin = "my convnext.zip, folder 'convnext' (uploaded zip of a Hugging Face model folder)"
    assert f"Model: {origin}, sha256 {sha[:12]}…" in captions
    at.button(key="build_class_report").click().run()
    assert _clean(at) == []
    html = at.session_state["class_report"][2]
    assert "from my convnext.zip, folder &#x27;convnext&#x27; (uploaded zip of a Hugging Face model folder)" in html
    assert workspace not in html


@pytest.mark.slow
def test_the_model_page_opens_pickled_weights_in_a_zip_only_with_both_opt_ins(app, tmp_path, monkeypatch):
    folder = tmp_path / "src" / "old"
    _save_convnext(folder, safetensors=False)
    before = app.session_state["model"]
    errors = _upload_model(app, _zip_folder(folder, prefix="old/"), "old.zip")
    assert errors == ["The model folder's weights are pytorch_model.bin, a pickle, and opening visitors' pickles is "
                      "turned off on this server. Save the weights as safetensors (model.save_pretrained(folder), the "
                      "default) and upload the folder again. The operator of this server can allow it by setting "
                      "PHPN_ALLOW_CODE=1 before `streamlit run app.py` (only on a server whose visitors are "
                      "trusted)."]
    assert app.session_state["model"] is before  # the session keeps its model
    uploads = tmp_path / "uploads"
    assert not any(p.is_file() and "old" in p.name for p in uploads.rglob("*"))  # the refused upload left nothing

    monkeypatch.setenv("PHPN_ALLOW_CODE", "1")  # the operator's switch; the visitor's trust is still needed
    errors = _upload_model(app, _zip_folder(folder, prefix="old/"), "old.zip")
    assert errors == ["The model folder's weights are pytorch_model.bin, a pickle, which is opened only for a file "
                      "you trust. Tick 'Trust this checkpoint' if you made it or trust its source, or save the "
                      "weights as safetensors (model.save_pretrained(folder), the default) and upload the folder "
                      "again."]
    app.checkbox(key="trust_pickle").check()
    assert _upload_model(app, _zip_folder(folder, prefix="old/"), "old.zip") == []
    model = app.session_state["model"]
    assert model.label == "old.zip" and model.session.loaded.arch == "hf/ConvNextForImageClassification"
    assert model.spec["trust_pickle"] is False  # read as tensors only (weights_only): no trial process needed


def test_a_model_folder_on_the_server_is_named_by_its_path_there(app, saved, tmp_path):
    import shutil

    folder = tmp_path / "roots" / "models" / "convnext"
    shutil.copytree(saved, folder)
    at = app
    at.switch_page("pages/model.py").run()
    at.radio(key="model_source").set_value("Checkpoint on this server").run()
    at.text_input(key="ckpt_path").set_value(str(folder))
    at.number_input(key="pre_resize").set_value(64)
    at.number_input(key="pre_crop").set_value(64)
    at.button(key="load_model").click().run()
    assert _clean(at) == []
    model = at.session_state["model"]
    assert model.label == "convnext"
    assert model.session.loaded.source == f"{folder} (checkpoint on the server)"  # the operator's folder: meaningful
    assert model.spec["origin"] == {"how": "server-path", "loaded_as": "checkpoint on the server", "path": str(folder),
                                    "name": "convnext"}


def test_the_cli_says_what_to_do_with_a_zipped_model_folder(saved, tmp_path, capsys):
    from phpn.cli import main

    zipped = tmp_path / "m.zip"
    zipped.write_bytes(_zip_folder(saved))
    assert main(["doctor", "--checkpoint", str(zipped)]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: m.zip is not a checkpoint: it is a zipped Hugging Face model folder. Unzip it and give the folder "
        "(--checkpoint FOLDER), or upload the zip on the app's Model page.")
