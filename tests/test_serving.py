"""Serving many visitors: the operator's settings, the switch for visitors' code and the
jailed worker that tries it, private workspaces, quotas, the idle sweep, allowed paths,
runs a visitor may open or write, and messages without server paths."""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from phpn.app.serving import (
    ServerSettings,
    Workspace,
    load_settings,
    may_read,
    read_only_reason,
    readable_runs,
    redact_paths,
    require_code_allowed,
    run_save_target,
    settings_table,
    sweep_idle,
    try_in_child_process,
    visitor_path,
    workspace_root,
)
from phpn.errors import ConfigError, DataError, RunError

SID_A, SID_B = "a" * 32, "b" * 32


@pytest.fixture
def settings(tmp_path):
    return ServerSettings(upload_dir=tmp_path / "ws", session_quota_mb=1.0, total_quota_mb=1.5)


# --- settings ---------------------------------------------------------------------------------------

def test_defaults_are_safe_for_a_public_server(tmp_path):
    s = load_settings(environ={}, settings_file=tmp_path / "missing.toml")
    assert s.allow_code is False and s.data_roots == () and s.shared_runs is None
    assert s.discoveries_per_visitor == 2
    assert s.discovery_slots() == (max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 1)
    assert {row[0] for row in settings_table()} == set(ServerSettings.__dataclass_fields__)


def test_environment_variables_win_over_the_settings_file(tmp_path):
    file = tmp_path / "phpn.toml"
    file.write_text('[phpn]\nallow_code = true\nidle_hours = 2\ndata_roots = ["/srv/a", "/srv/b"]\n')
    s = load_settings(environ={}, settings_file=file)
    assert s.allow_code is True and s.idle_hours == 2.0 and s.data_roots == (Path("/srv/a"), Path("/srv/b"))
    s = load_settings(environ={"PHPN_ALLOW_CODE": "0", "PHPN_DATA_ROOTS": f"/x{os.pathsep}/y",
                               "PHPN_MAX_DISCOVERIES": "3", "PHPN_DISCOVERIES_PER_VISITOR": "1"}, settings_file=file)
    assert s.allow_code is False and s.data_roots == (Path("/x"), Path("/y")) and s.discovery_slots() == 3
    assert s.discoveries_per_visitor == 1


@pytest.mark.parametrize("env, phrase", [
    ({"PHPN_ALLOW_CODE": "maybe"}, "The setting PHPN_ALLOW_CODE is 'maybe', not 1 or 0."),
    ({"PHPN_SESSION_QUOTA_MB": "-5"}, "not a finite number ≥ 0"),
    ({"PHPN_IDLE_HOURS": "nan"}, "not a finite number ≥ 0"),
    ({"PHPN_DATA_ROOTS": "relative/dir"}, "not a list of absolute folders"),
    ({"PHPN_SHARED_RUNS": "runs"}, "not an absolute folder"),
])
def test_bad_settings_name_the_variable(tmp_path, env, phrase):
    with pytest.raises(ConfigError, match="restart the app") as err:
        load_settings(environ=env, settings_file=tmp_path / "none.toml")
    assert phrase in str(err.value)


def test_the_manual_and_the_shipped_settings_file_name_every_setting():
    readme = (Path(__file__).resolve().parents[1] / "docs" / "MANUAL.md").read_text(encoding="utf-8")
    shipped = Path(__file__).resolve().parents[1] / ".streamlit" / "phpn.toml"
    for key, variable, _, _ in settings_table():
        assert f"| `{variable}` | `{key}` |" in readme
        assert f"# {key} = " in shipped.read_text(encoding="utf-8")
    assert load_settings(environ={}, settings_file=shipped) == ServerSettings()


def test_unknown_keys_in_the_settings_file_are_refused(tmp_path):
    file = tmp_path / "phpn.toml"
    file.write_text("[phpn]\nallow_cod = true\n")
    with pytest.raises(ConfigError, match="unknown keys: allow_cod"):
        load_settings(environ={}, settings_file=file)


# --- the switch for visitors' code ---------------------------------------------------------------------

def test_code_is_refused_when_the_switch_is_off(tmp_path):
    off = ServerSettings()
    with pytest.raises(ConfigError) as err:
        require_code_allowed("a model file", off)
    assert str(err.value).startswith("Running visitors' code is turned off on this server. A model file cannot be used.")
    assert "PHPN_ALLOW_CODE=1" in str(err.value)
    marker = tmp_path / "ran.txt"
    model_file = tmp_path / "net.py"
    model_file.write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    with pytest.raises(ConfigError, match="turned off"):
        try_in_child_process(tmp_path / "x.pt", model_def=f"{model_file}:Net", settings=off)
    with pytest.raises(ConfigError, match="trusted \\(pickled\\) checkpoint cannot be used"):
        try_in_child_process(tmp_path / "x.pt", trust_pickle=True, settings=off)
    assert not marker.exists()  # nothing ran
    require_code_allowed("a model file", ServerSettings(allow_code=True))  # on: no error


NET = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, num_classes=3):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))
'''


@pytest.fixture
def user_model(tmp_path):
    namespace = {}
    exec(NET, namespace)  # noqa: S102 - the test's own code
    torch.manual_seed(0)
    ckpt = tmp_path / "weights.th"  # any extension
    torch.save(namespace["Net"]().state_dict(), ckpt)
    return ckpt


@pytest.mark.slow
def test_visitor_code_that_exits_or_hangs_is_contained(tmp_path, user_model):
    on = ServerSettings(allow_code=True)
    good = tmp_path / "good.py"
    good.write_text(NET)
    result = try_in_child_process(user_model, model_def=f"{good}:Net", input_size=(3, 16, 16), settings=on)
    assert result == {"ok": True, "num_classes": 3, "arch": "user:good.py:Net", "verdict": "exact"}

    quits = tmp_path / "quits.py"
    quits.write_text("import os\nos._exit(0)\n" + NET)
    with pytest.raises(ConfigError) as err:
        try_in_child_process(user_model, model_def=f"{quits}:Net", settings=on)
    assert "ended its process (exit code 0) before the model was loaded" in str(err.value)

    hangs = tmp_path / "hangs.py"
    hangs.write_text(NET + "\nwhile True:\n    pass\n")
    start = time.monotonic()
    with pytest.raises(ConfigError) as err:
        try_in_child_process(user_model, model_def=f"{hangs}:Net", timeout_s=1.0, settings=on)
    assert "did not finish loading within 1 s and was stopped" in str(err.value)
    assert time.monotonic() - start < 120  # and this process (the server) carries on


@pytest.mark.slow
def test_a_trusted_pickle_is_tried_in_the_child(tmp_path):
    on = ServerSettings(allow_code=True)
    path = tmp_path / "whole.ckpt"
    torch.save(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(4, 5)), path)
    result = try_in_child_process(path, trust_pickle=True, overrides={"crop": 16, "resize": 16}, settings=on)
    assert result == {"ok": True, "num_classes": 5, "arch": "pickled:Sequential", "verdict": "exact"}


# --- workspaces ----------------------------------------------------------------------------------------

def test_each_visitor_gets_a_private_workspace(settings):
    a, b = Workspace(SID_A, settings), Workspace(SID_B, settings)
    assert a.path != b.path and a.path.parent == b.path.parent == settings.upload_dir
    for folder in (settings.upload_dir, a.path):
        assert (folder.stat().st_mode & 0o777) == 0o700
    upload = a.new_upload_dir()
    (upload / "model.pt").write_bytes(b"x")
    (a.runs / "mine").mkdir()
    assert a.owns(upload / "model.pt") and not b.owns(upload / "model.pt")
    assert not may_read(upload / "model.pt", b, settings) and may_read(upload / "model.pt", a, settings)
    with pytest.raises(ConfigError, match="outside the folders|turned off"):
        visitor_path(str(upload / "model.pt"), "checkpoint", settings, workspace=b)
    assert visitor_path(str(upload / "model.pt"), "checkpoint", settings, workspace=a) == upload / "model.pt"
    with pytest.raises(ConfigError, match="session id is not valid"):
        Workspace("../" + SID_A, settings)


def test_a_link_planted_at_the_workspace_root_is_refused(tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (tmp_path / "ws").symlink_to(target)
    with pytest.raises(ConfigError, match="symbolic link"):
        workspace_root(ServerSettings(upload_dir=tmp_path / "ws"))
    shared = tmp_path / "open"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    with pytest.raises(ConfigError, match="can be read or written by other users"):
        workspace_root(ServerSettings(upload_dir=shared))
    ok = workspace_root(ServerSettings(upload_dir=tmp_path / "fresh"))
    (ok / SID_A).symlink_to(target)  # a link where a visitor's folder will be
    with pytest.raises(ConfigError, match="symbolic link"):
        Workspace(SID_A, ServerSettings(upload_dir=ok))
    assert list(target.iterdir()) == []


def test_quotas_per_visitor_and_in_total(settings):
    a, b = Workspace(SID_A, settings), Workspace(SID_B, settings)
    (a.new_upload_dir() / "big.bin").write_bytes(b"\0" * 700_000)
    a.check_room(300_000)
    with pytest.raises(DataError, match=r"past this server's 1\.0 MB per visitor \(you use 683\.6 KB\)"):
        a.check_room(400_000, "This zip file")
    assert a.room() == 2 ** 20 - 700_000
    (b.new_upload_dir() / "big.bin").write_bytes(b"\0" * 700_000)
    with pytest.raises(DataError, match="space for uploads is full"):
        b.check_room(200_000)
    assert b.room() == int(1.5 * 2 ** 20) - 1_400_000 - (a.usage() - 700_000) - (b.usage() - 700_000)


def test_a_visitor_forgets_earlier_uploads_but_keeps_what_is_in_use_and_their_runs(settings):
    ws = Workspace(SID_A, settings)
    old, current = ws.new_upload_dir(), ws.new_upload_dir()
    (old / "old.pt").write_bytes(b"x")
    (current / "images" / "a").mkdir(parents=True)
    (ws.runs / "saved").mkdir()
    assert ws.forget_uploads(keep=[current / "images", None]) == 1
    assert not old.exists() and current.exists() and (ws.runs / "saved").exists()


def test_idle_workspaces_are_swept_and_active_ones_kept(settings):
    idle, active, kept = (Workspace(s, settings) for s in (SID_A, SID_B, "c" * 32))
    old = time.time() - 7 * 3600
    for ws in (idle, kept):
        os.utime(ws.path / ".last-active", (old, old))
    outside = settings.upload_dir.parent / "not-phpn"
    outside.mkdir()
    (settings.upload_dir / "link").symlink_to(outside)
    assert sweep_idle(settings, keep=("c" * 32,)) == 1
    assert not idle.path.exists() and active.path.exists() and kept.path.exists() and outside.exists()


# --- paths, runs and messages -------------------------------------------------------------------------

def test_typed_paths_only_under_the_operators_roots(tmp_path):
    off = ServerSettings(upload_dir=tmp_path / "ws")
    with pytest.raises(ConfigError) as err:
        visitor_path("/etc/passwd", "checkpoint", off)
    assert str(err.value).startswith("Paths on this server are turned off for visitors, so the checkpoint cannot")
    data = tmp_path / "data"
    (data / "models").mkdir(parents=True)
    (data / "escape").symlink_to(tmp_path)
    on = ServerSettings(upload_dir=tmp_path / "ws", data_roots=(data,))
    assert visitor_path(str(data / "models" / "m.pt"), "checkpoint", on) == data / "models" / "m.pt"
    assert visitor_path("models/m.pt", "checkpoint", on) == data / "models" / "m.pt"
    for bad in ("/etc/passwd", str(data / ".." / "x"), str(data / "escape" / "ws")):
        with pytest.raises(ConfigError, match="outside the folders this server allows"):
            visitor_path(bad, "checkpoint", on)


def test_runs_listed_are_the_visitors_own_the_shared_and_the_demos(tmp_path):
    shared = tmp_path / "shared"
    (shared / "team-run").mkdir(parents=True)
    (shared / "team-run" / "run.json").write_text("{}")
    settings = ServerSettings(upload_dir=tmp_path / "ws", shared_runs=shared)
    a, b = Workspace(SID_A, settings), Workspace(SID_B, settings)
    (a.runs / "mine").mkdir()
    (a.runs / "mine" / "run.json").write_text("{}")
    labels_a = [label for label, _ in readable_runs(a, settings)]
    labels_b = [label for label, _ in readable_runs(b, settings)]
    assert labels_a[:2] == ["my runs / mine", "shared / team-run"]
    assert "my runs / mine" not in labels_b and "shared / team-run" in labels_b
    from phpn.demos import DEMOS

    demos = [f"demo / {d.name}" for d in DEMOS.values() if (d.run_dir / "run.json").is_file()]
    assert labels_b[1:] == demos


def test_saving_runs_never_touches_the_demos_or_the_shared_folder(tmp_path):
    from phpn.demos import DEMOS

    shared = tmp_path / "shared"
    shared.mkdir()
    settings = ServerSettings(upload_dir=tmp_path / "ws", shared_runs=shared, data_roots=(tmp_path / "data",),
                              writable_roots=(tmp_path / "out",))
    ws = Workspace(SID_A, settings)
    assert run_save_target("my-run", ws, settings) == ws.runs / "my-run"
    assert run_save_target(str(tmp_path / "out" / "r"), ws, settings) == tmp_path / "out" / "r"
    with pytest.raises(RunError, match="the server's data folders are read-only"):
        run_save_target(str(tmp_path / "data" / "r"), ws, settings)
    with pytest.raises(RunError, match="the shared runs are read-only"):
        run_save_target(str(shared / "r"), ws, settings)
    demo = next(iter(DEMOS.values()))
    assert read_only_reason(demo.run_dir, settings) == f"the {demo.name} demo's files are read-only"
    for roots in ((), (demo.assets_dir.parent,)):  # whatever the operator allows
        with pytest.raises(RunError, match="demo's files are read-only"):
            run_save_target(str(demo.run_dir), ws, ServerSettings(upload_dir=tmp_path / "ws", data_roots=roots))
    with pytest.raises(RunError, match="demo's files are read-only"):
        run_save_target(str(demo.assets_dir.parent.parent), ws,
                        ServerSettings(upload_dir=tmp_path / "ws", data_roots=(Path("/"),)))
    with pytest.raises(RunError, match="No name given"):
        run_save_target("  ", ws, settings)


@pytest.mark.parametrize("text, expected", [
    ("The checkpoint /srv/phpn/uploads/abc123/upload-x/model.pt does not exist.",
     "The checkpoint …/model.pt does not exist."),
    ("'/tmp/phpn-0/ab/runs/r1' exists and is not a run folder.", "'…/r1' exists and is not a run folder."),
    ("Cannot read C:\\Users\\me\\models\\net.pth (denied)", "Cannot read …/net.pth (denied)"),
    ("in ~/private/data/x.png: bad", "in …/x.png: bad"),
    ("Folders 1/2 and T-shirt/top stay; so do 0.5/0.25 and |Δlogit|.",
     "Folders 1/2 and T-shirt/top stay; so do 0.5/0.25 and |Δlogit|."),
    ("pip install torch --index-url https://download.pytorch.org/whl/cpu",
     "pip install torch --index-url https://download.pytorch.org/whl/cpu"),
])
def test_messages_never_show_server_paths(text, expected):
    assert redact_paths(text) == expected


# --- the app, driven headless: what a visitor can and cannot do ---------------------------------------

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def app_env(tmp_path, monkeypatch):
    """A server as shipped: no settings file, no code, no typed paths; workspaces in tmp."""
    pytest.importorskip("streamlit.testing.v1")
    monkeypatch.setenv("PHPN_UPLOAD_DIR", str(tmp_path / "uploads"))
    monkeypatch.setenv("PHPN_SETTINGS_FILE", str(tmp_path / "no-settings.toml"))
    for var in ("PHPN_ALLOW_CODE", "PHPN_DATA_ROOTS", "PHPN_SHARED_RUNS"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def _app():
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _errors(at) -> list:
    return [e.value for e in at.error]


def test_with_the_switch_off_a_visitor_cannot_run_code(app_env, monkeypatch):
    at = _app()
    before = at.session_state["model"]
    at.radio(key="model_source").set_value("Upload a checkpoint").run()
    for widget in (at.file_uploader(key="def_upload"), at.text_input(key="factory"),
                   at.checkbox(key="run_model_code"), at.checkbox(key="trust_pickle")):
        assert widget.disabled
    assert any("PHPN_ALLOW_CODE=1" in i.value for i in at.info)
    # Controls filled in while the switch was on, then the operator turns it off: nothing runs.
    monkeypatch.setenv("PHPN_ALLOW_CODE", "1")
    at.run()
    marker = app_env / "ran.txt"
    code = f"open({str(marker)!r}, 'w').write('ran')\n".encode()
    at.file_uploader(key="ckpt_upload").set_value(("m.th", _torch_state_dict_bytes(), "application/octet-stream"))
    at.file_uploader(key="def_upload").set_value(("net.py", code, "text/x-python"))
    at.text_input(key="factory").set_value("Net")
    at.checkbox(key="run_model_code").set_value(True)
    at.checkbox(key="trust_pickle").set_value(True)
    monkeypatch.delenv("PHPN_ALLOW_CODE")
    at.button(key="load_model").click().run()
    assert not at.exception and len(_errors(at)) == 1  # disabled controls carry no code to the loader
    assert not marker.exists() and at.session_state["model"] is before
    assert not any("arbitrary code" in w.value for w in at.warning)
    # Behind the page, both ways into the model cache refuse code while the switch is off.
    from phpn.app import cache as _cache
    from phpn.app import frame as _shared

    model_file = app_env / "net.py"
    model_file.write_text(code.decode())
    spec = dict(checkpoint=str(app_env / "m.th"), model_def=f"{model_file}:Net")
    for load in (lambda: _shared.load_model_entry(**spec), lambda: _cache._load_model_entry(_cache._freeze(spec), spec),
                 lambda: _shared.load_model_entry(checkpoint=spec["checkpoint"], trust_pickle=True)):
        with pytest.raises(ConfigError, match="^Running visitors' code is turned off on this server"):
            load()
    assert not marker.exists()


def _torch_state_dict_bytes() -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(nn.Linear(3, 2).state_dict(), buf)
    return buf.getvalue()


def test_server_paths_are_off_and_uploads_take_any_checkpoint_name(app_env, monkeypatch):
    at = _app()
    at.radio(key="model_source").set_value("Checkpoint on this server").run()
    assert at.text_input(key="ckpt_path").disabled
    assert any(i.value.startswith("Paths on this server are turned off for visitors") for i in at.info)
    (app_env / "data").mkdir()
    monkeypatch.setenv("PHPN_DATA_ROOTS", str(app_env / "data"))  # the operator allows one folder
    at.run()
    at.text_input(key="ckpt_path").set_value("/etc/passwd")
    at.button(key="load_model").click().run()
    errors = _errors(at)
    assert len(errors) == 1 and errors[0].startswith("The checkpoint is outside the folders this server allows.")
    assert "/etc" not in errors[0] and "passwd" not in errors[0]
    monkeypatch.delenv("PHPN_DATA_ROOTS")
    at.radio(key="model_source").set_value("Upload a checkpoint").run()
    at.file_uploader(key="ckpt_upload").set_value(("photo.th", b"\x89PNG\r\n\x1a\n0000", "image/png"))
    at.button(key="load_model").click().run()
    assert _errors(at) == ["'photo.th' is not a checkpoint: it looks like a PNG image. Upload the weights saved "
                           "with torch.save(model.state_dict(), path) or safetensors; any file name or extension "
                           "will do."]
    at.file_uploader(key="ckpt_upload").set_value(("linear.th", _torch_state_dict_bytes(), "application/x"))
    at.button(key="load_model").click().run()
    errors = _errors(at)  # read as a checkpoint: whatever is wrong now is about its weights, not its name
    assert len(errors) == 1 and "not a checkpoint" not in errors[0] and "No checkpoint uploaded" not in errors[0]
    assert str(app_env) not in errors[0]
    assert [p for p in at.session_state["_workspace"].uploads.rglob("*")] == []  # a failed load keeps nothing


@pytest.mark.slow
def test_two_visitors_see_only_their_own_runs_and_the_demo_run_stays_read_only(app_env):
    a, b = _app(), _app()
    a.switch_page("pages/discover.py").run()
    a.text_input(key="save_path").set_value("alice-run")
    a.button(key="save_run").click().run()
    assert not _errors(a), _errors(a)
    saved = a.session_state["run"].saved_to
    assert saved.name == "alice-run" and (saved / "run.json").is_file()
    assert any("my runs / alice-run" == o for o in a.selectbox(key="load_choice").options)
    b.switch_page("pages/discover.py").run()
    assert not any("alice-run" in o for o in b.selectbox(key="load_choice").options)
    b.text_input(key="load_path").set_value(str(saved))
    b.button(key="load_run").click().run()
    assert any("Paths on this server are turned off" in e for e in _errors(b))
    assert not any(str(app_env) in e for e in _errors(b))
    # Nobody saves over the shipped demo run.
    from phpn.demos import get_demo

    demo_run = get_demo("fashion-mnist").run_dir
    stamp = (demo_run / "run.json").stat().st_mtime_ns
    b.text_input(key="save_path").set_value(str(demo_run))
    b.button(key="save_run").click().run()
    assert any("the fashion-mnist demo's files are read-only" in e for e in _errors(b))
    assert (demo_run / "run.json").stat().st_mtime_ns == stamp


def test_a_discovery_waits_its_turn_with_its_position_shown(app_env):
    from phpn.app.frame import server_queue

    queue = server_queue()
    holder, release = object(), threading.Event()
    entered = threading.Event()

    def hold():
        queue.enter(holder, lambda: False, poll_s=0.01)
        entered.set()
        release.wait(60)
        queue.leave(holder)

    threading.Thread(target=hold, daemon=True).start()
    assert entered.wait(10)
    try:
        at = _app()
        at.switch_page("pages/discover.py").run()
        at.slider(key="disc_k").set_value(2)
        at.number_input(key="disc_cap").set_value(4)
        at.button(key="FormSubmitter:discover_form-Start discovery").click().run()
        job = at.session_state["job"]
        assert job.waiting and job.queue_position() >= 1
        at.run()
        assert any(i.value.startswith("Waiting in the queue: position") for i in at.info)
        assert any("waiting in the queue" in c.value for c in at.sidebar.caption)
    finally:
        release.set()
    assert job.wait(120) == "done", job.error


def _start_discovery(at) -> None:
    at.switch_page("pages/discover.py").run()
    at.slider(key="disc_k").set_value(2)
    at.number_input(key="disc_cap").set_value(4)
    at.button(key="FormSubmitter:discover_form-Start discovery").click().run()


@pytest.mark.slow
def test_one_visitor_may_queue_two_discoveries_whatever_their_tabs(app_env, monkeypatch):
    from phpn.app import frame, state

    queue = frame.server_queue()
    assert queue.per_owner == 2  # PHPN_DISCOVERIES_PER_VISITOR's default
    holder, release, entered = object(), threading.Event(), threading.Event()

    def hold():
        queue.enter(holder, lambda: False, poll_s=0.01)
        entered.set()
        release.wait(60)
        queue.leave(holder)

    threading.Thread(target=hold, daemon=True).start()
    assert entered.wait(10)
    jobs = []
    try:
        first = _app()
        key = first.session_state["_key_to_keep"]
        monkeypatch.setattr(state, "browser_cookie", lambda: key)  # the same browser's other tabs
        tabs = [first, _app(), _app()]
        for tab in tabs:
            _start_discovery(tab)
        jobs = [tab.session_state["job"] for tab in tabs[:2]]
        assert all(job.waiting for job in jobs) and queue.held_by(jobs[0].owner) == 2
        assert "job" not in tabs[2].session_state
        assert _errors(tabs[2]) == ["You already have 2 discoveries queued or running: wait for one to finish or "
                                    "cancel it."]
        monkeypatch.setattr(state, "browser_cookie", lambda: None)  # another visitor is admitted
        other = _app()
        _start_discovery(other)
        jobs.append(other.session_state["job"])
        assert jobs[2].waiting and jobs[2].owner != jobs[0].owner and not _errors(other)
    finally:
        for job in jobs:
            job.cancel()
        release.set()
    assert [job.wait(30) for job in jobs] == ["cancelled"] * 3
    assert queue.held_by(jobs[0].owner) == 0


def test_an_unsafe_workspace_root_stops_the_app_with_a_message(app_env, monkeypatch):
    target = app_env / "elsewhere"
    target.mkdir()
    (app_env / "planted").symlink_to(target)
    monkeypatch.setenv("PHPN_UPLOAD_DIR", str(app_env / "planted"))
    at = _app()
    assert _errors(at) == ["The workspace root is a symbolic link; phpn refuses to write through it. Remove it or "
                           "point PHPN_UPLOAD_DIR at a new folder, then restart the app."]
    assert list(target.iterdir()) == []


# --- bad input through the app: one clear message each, no traceback, nothing lost ----------------------

def _png_bytes() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def _zip_bytes(entries) -> bytes:
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries:
            zf.writestr(name, data)
    return buf.getvalue()


def _truncated_state_dict() -> bytes:
    return _torch_state_dict_bytes()[:300]


CHECKPOINT_CASES = [
    ("empty.pt", lambda: b"", "The checkpoint 'empty.pt' is empty (0 bytes)."),
    ("photo.ckpt", _png_bytes, "'photo.ckpt' is not a checkpoint: it looks like a PNG image."),
    ("page.bin", lambda: b"<html><body>404</body></html>", "'page.bin' is not a checkpoint: it looks like a web page"),
    ("images.pt", lambda: _zip_bytes([("a/1.png", _png_bytes())]), "it is a zip archive of other files"),
    ("cut.pth", _truncated_state_dict, "it is a damaged zip archive"),
]


@pytest.mark.parametrize("name, make, phrase", CHECKPOINT_CASES, ids=[c[0] for c in CHECKPOINT_CASES])
def test_bad_checkpoint_uploads_get_one_clear_message(app_env, name, make, phrase):
    at = _app()
    before = at.session_state["model"]
    at.radio(key="model_source").set_value("Upload a checkpoint").run()
    at.file_uploader(key="ckpt_upload").set_value((name, make(), "application/octet-stream"))
    at.button(key="load_model").click().run()
    assert not at.exception
    errors = _errors(at)
    assert len(errors) == 1 and phrase in errors[0], errors
    assert str(app_env) not in errors[0]
    assert at.session_state["model"] is before
    assert [p for p in at.session_state["_workspace"].uploads.rglob("*")] == []  # refused: nothing kept


ZIP_CASES = [
    ("notzip", lambda: b"just text", "is not a readable zip archive"),
    ("empty", lambda: _zip_bytes([]), "The zip file is empty."),
    ("escape", lambda: _zip_bytes([("a/1.png", _png_bytes()), ("../../evil.png", b"x")]), "outside its folder"),
    ("over-quota", lambda: _zip_bytes([("a/zeros.bmp", b"\0" * (3 << 20))]), "more than the 2.0 MB allowed"),
]


@pytest.mark.parametrize("name, make, phrase", ZIP_CASES, ids=[c[0] for c in ZIP_CASES])
def test_bad_image_zips_get_one_clear_message_and_leave_nothing(app_env, monkeypatch, name, make, phrase):
    monkeypatch.setenv("PHPN_SESSION_QUOTA_MB", "2")
    at = _app()
    data_before = at.session_state["data"]
    at.radio(key="data_source").set_value("Upload a zip of an image folder").run()
    at.file_uploader(key="zip_upload").set_value((f"{name}.zip", make(), "application/zip"))
    at.button(key="scan").click().run()
    assert not at.exception
    errors = _errors(at)
    assert len(errors) == 1 and phrase in errors[0], errors
    assert str(app_env) not in errors[0]
    assert at.session_state["data"] is data_before
    ws = at.session_state["_workspace"]
    assert [p for p in ws.uploads.rglob("*")] == []  # neither the archive nor a half-unpacked folder
    assert not (app_env / "evil.png").exists()


def test_a_zip_larger_than_the_visitors_room_is_refused_before_it_is_written(app_env, monkeypatch):
    monkeypatch.setenv("PHPN_SESSION_QUOTA_MB", "0.05")
    at = _app()
    at.radio(key="data_source").set_value("Upload a zip of an image folder").run()
    payload = _zip_bytes([(f"a/{i}.bin", os.urandom(20_000)) for i in range(4)])
    at.file_uploader(key="zip_upload").set_value(("big.zip", payload, "application/zip"))
    at.button(key="scan").click().run()
    errors = _errors(at)
    assert len(errors) == 1 and errors[0].startswith("This zip file (78.")
    assert "past this server's 51.2 KB per visitor" in errors[0]
    assert [p for p in at.session_state["_workspace"].uploads.rglob("*")] == []


RUN_CASES = [
    ("not-a-run", None, "is not a phpn run"),
    ("bad-json", "{ not json", "run.json"),
    ("classes-not-a-list", '{"format": "phpn-run", "classes": "oops"}', "run.json"),
]


@pytest.mark.parametrize("name, content, phrase", RUN_CASES, ids=[c[0] for c in RUN_CASES])
def test_damaged_runs_are_refused_with_a_message_and_the_current_run_kept(app_env, monkeypatch, name, content,
                                                                          phrase):
    folder = app_env / "data" / name
    folder.mkdir(parents=True)
    if content is not None:
        (folder / "run.json").write_text(content)
    monkeypatch.setenv("PHPN_DATA_ROOTS", str(app_env / "data"))
    at = _app()
    run_before = at.session_state["run"]
    at.switch_page("pages/discover.py").run()
    at.text_input(key="load_path").set_value(str(folder))
    at.button(key="load_run").click().run()
    assert not at.exception
    errors = _errors(at)
    assert len(errors) == 1 and phrase in errors[0], errors
    assert str(app_env) not in errors[0]
    assert at.session_state["run"] is run_before
    for page in ("pages/classes.py", "pages/explain.py"):
        at.switch_page(page).run()
        assert not at.exception and not _errors(at)


def test_a_saved_run_over_the_visitors_quota_is_removed_again(app_env, monkeypatch):
    monkeypatch.setenv("PHPN_SESSION_QUOTA_MB", "0.05")  # 51.2 KB: less than the demo run's tensors
    at = _app()
    at.switch_page("pages/discover.py").run()
    at.text_input(key="save_path").set_value("too-big")
    at.button(key="save_run").click().run()
    errors = _errors(at)
    assert len(errors) == 1 and errors[0].startswith("This run (") and "per visitor" in errors[0], errors
    assert not (at.session_state["_workspace"].runs / "too-big").exists()
