"""Sessions that belong to a browser, read-only share links, and data roots apart from the
workspaces: what a second browser, a shared link or an attacker's link can and cannot reach."""
from __future__ import annotations

import os

import pytest
from test_app import _app, _clean, _errors, _uploads_in_tmp, needs_demo  # noqa: F401

from phpn.app import serving, state
from phpn.app.serving import (
    ServerSettings,
    Workspace,
    check_confined,
    create_share,
    list_shares,
    new_browser_key,
    open_share,
    revoke_share,
    sweep_idle,
    token_digest,
    visitor_path,
    workspace_id,
    workspace_root,
)
from phpn.app.serving.shares import REVOKED_PROBLEM
from phpn.errors import ConfigError, DataError, RunError

REVOKED_SENTENCE = f"{REVOKED_PROBLEM} Ask the person who shared it for a new link."


def _settings(tmp_path, **more) -> ServerSettings:
    return ServerSettings(upload_dir=tmp_path / "ws", **more)


def _saved_run(ws: Workspace, name: str):
    folder = ws.runs / name
    folder.mkdir()
    (folder / "run.json").write_text("{}")
    return folder


# --- browser keys ---------------------------------------------------------------------------

def test_a_workspace_is_found_only_from_a_key_this_server_signed(tmp_path):
    settings = _settings(tmp_path)
    key = new_browser_key(settings)
    sid = workspace_id(key, settings)
    assert sid is not None and len(sid) == 32 and sid not in key  # the folder name does not give the key away
    assert workspace_id(key, settings) == sid and workspace_id(new_browser_key(settings), settings) != sid
    value, signature = key.split(".")
    forged = f"{value}.{'0' * 32}"
    for bad in (forged, value, sid, "", None, "../" + key, key + "x"):
        assert workspace_id(bad, settings) is None
    (tmp_path / "elsewhere").mkdir()
    assert workspace_id(key, _settings(tmp_path / "elsewhere")) is None  # another server's secret
    assert oct(os.stat(workspace_root(settings) / ".server-key").st_mode & 0o777) == "0o600"


def test_the_sweep_keeps_the_share_records_and_the_server_key(tmp_path):
    settings = _settings(tmp_path, idle_hours=0.0)
    ws = Workspace(workspace_id(new_browser_key(settings), settings), settings)
    create_share(ws, _saved_run(ws, "r"), settings)
    os.utime(ws.path / ".last-active", (0, 0))
    assert sweep_idle(settings, now=10 ** 10) == 1
    root = workspace_root(settings)
    assert sorted(p.name for p in root.iterdir()) == [".server-key", ".shares"]


def test_a_browser_session_removes_only_the_uploads_it_made(tmp_path):
    settings = _settings(tmp_path)
    sid = workspace_id(new_browser_key(settings), settings)
    tab_a, tab_b = Workspace(sid, settings), Workspace(sid, settings)  # two tabs of one browser
    a_upload, b_upload = tab_a.new_upload_dir(), tab_b.new_upload_dir()
    assert tab_b.forget_uploads(keep=[]) == 1
    assert a_upload.is_dir() and not b_upload.exists()


# --- share links ----------------------------------------------------------------------------

def test_a_share_link_opens_one_run_and_can_be_revoked_by_its_owner_only(tmp_path):
    settings = _settings(tmp_path)
    a = Workspace(workspace_id(new_browser_key(settings), settings), settings)
    b = Workspace(workspace_id(new_browser_key(settings), settings), settings)
    run = _saved_run(a, "mine")
    _saved_run(a, "other")
    token = create_share(a, run, settings)
    assert len(token) == 32
    stored = list((workspace_root(settings) / ".shares").iterdir())
    assert [p.name for p in stored] == [f"{token_digest(token)}.json"] and token not in stored[0].read_text()
    share = open_share(token, settings)
    assert share.run_dir == run and share.run_name == "mine" and share.owner == a.path.name
    assert [s.run_name for s in list_shares(a, settings)] == ["mine"] and list_shares(b, settings) == []
    with pytest.raises(RunError, match="Only a run saved in your workspace can be shared"):
        create_share(b, run, settings)  # not B's run
    assert not revoke_share(b, share.digest, settings)  # B cannot revoke A's link
    assert open_share(token, settings).run_dir == run
    assert revoke_share(a, share.digest, settings)
    for bad in (token, token[:-1] + ("A" if token[-1] != "A" else "B"), "", "../../x", a.path.name):
        with pytest.raises(RunError) as err:
            open_share(bad, settings)
        assert str(err.value) == REVOKED_SENTENCE


def test_a_share_link_dies_with_its_run(tmp_path):
    settings = _settings(tmp_path)
    a = Workspace(workspace_id(new_browser_key(settings), settings), settings)
    run = _saved_run(a, "mine")
    token = create_share(a, run, settings)
    (run / "run.json").unlink()
    with pytest.raises(RunError, match="revoked, or the run it showed is no longer on the server"):
        open_share(token, settings)


# --- data roots -----------------------------------------------------------------------------

@pytest.mark.parametrize("variable", ["data_roots", "writable_roots", "shared_runs"])
def test_a_root_that_contains_or_lies_inside_the_workspaces_is_refused(tmp_path, variable):
    outer = {variable: (tmp_path,) if variable != "shared_runs" else tmp_path}
    with pytest.raises(ConfigError) as err:
        workspace_root(_settings(tmp_path, **outer))
    assert f"in PHPN_{variable.upper()} contains the visitors' workspaces" in str(err.value)
    assert not (tmp_path / "ws").exists()  # refused before anything is written
    workspace_root(_settings(tmp_path))
    inner = {variable: (tmp_path / "ws" / "x",) if variable != "shared_runs" else tmp_path / "ws" / "x"}
    with pytest.raises(ConfigError, match=f"in PHPN_{variable.upper()} lies inside the visitors' workspaces"):
        workspace_root(_settings(tmp_path, **inner))


def test_files_linked_out_of_a_data_root_are_refused_one_by_one(tmp_path):
    data, outside = tmp_path / "data", tmp_path / "private"
    (data / "images" / "cat").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.png").write_bytes(b"x")
    (data / "images" / "cat" / "ok.png").write_bytes(b"x")
    (data / "images" / "cat" / "inside.png").symlink_to(data / "images" / "cat" / "ok.png")  # stays inside: fine
    settings = _settings(tmp_path, data_roots=(data,))
    check_confined(data / "images", settings)
    (data / "images" / "cat" / "link.png").symlink_to(outside / "secret.png")
    (data / "images" / "dog").symlink_to(outside)  # a linked class folder
    with pytest.raises(DataError) as err:
        check_confined(data / "images", settings)
    assert str(err.value) == ("2 link(s) in the folder lead outside the server's data folders (the first: "
                              "cat/link.png); phpn does not follow them. Ask the operator to copy those images "
                              "into the data folder instead of linking them.")
    check_confined(outside, settings)  # not under a data root: not concerned
    with pytest.raises(ConfigError, match="outside the folders this server allows"):
        visitor_path(str(data / "images" / "dog"), "image folder", settings)


# --- two browsers, in the app ---------------------------------------------------------------

class Browser:
    """A browser for AppTest: keeps the key a page gives it and sends it with later page loads."""

    def __init__(self, monkeypatch, key=None):
        self.monkeypatch, self.key = monkeypatch, key

    def open(self, query=None):
        self.monkeypatch.setattr(state, "browser_cookie", lambda: self.key)
        at = _app()
        for name, value in (query or {}).items():
            at.query_params[name] = value
        at.run()
        _clean(at)
        self.key = at.session_state["_key_to_keep"] if "_key_to_keep" in at.session_state else self.key
        return at


def _save(at, name):
    at.switch_page("pages/discover.py").run()
    at.text_input(key="save_path").set_value(name)
    at.button(key="save_run").click().run()
    _clean(at)
    return at.session_state["run"].saved_to


def _labels(at):
    return [label for label, _ in serving.readable_runs(at.session_state["_workspace"])]


@pytest.mark.slow
@needs_demo
def test_a_second_browser_and_an_attackers_link_reach_nothing_a_share_link_one_run(monkeypatch):
    alice = Browser(monkeypatch)
    a = alice.open()
    folder = _save(a, "alices-run")
    (folder.parent.parent / "uploads" / "upload-private").mkdir(parents=True)
    _save(a, "second-run")
    url = dict(a.query_params)
    assert url == {"demo": "fashion-mnist", "run": "my runs / second-run"}  # no key in the URL
    a_ws = a.session_state["_workspace"].path

    # B opens A's URL (and an old-style link with A's workspace id): the view, never A's files.
    bob = Browser(monkeypatch)
    b = bob.open({**url, "session": a_ws.name})
    b_ws = b.session_state["_workspace"].path
    assert b_ws != a_ws and bob.key != alice.key
    assert b.session_state["run"].saved_to != folder.parent / "second-run"
    assert [w.value for w in b.sidebar.warning][0].startswith("The link's run could not be opened")
    assert not [label for label in _labels(b) if label.startswith("my runs")]
    assert "session" not in b.query_params

    # Fixation: the attacker's own link does not make the victim's files land where they can look.
    mallory = Browser(monkeypatch)
    m = mallory.open()
    m_ws = m.session_state["_workspace"].path
    victim = Browser(monkeypatch).open({"session": m_ws.name})
    _save(victim, "victims-run")
    assert victim.session_state["_workspace"].path != m_ws
    assert not (m_ws / "runs" / "victims-run").exists()

    # A reload of A's own browser finds A's files.
    again = alice.open(url)
    assert again.session_state["_workspace"].path == a_ws
    assert again.session_state["run"].saved_to == folder.parent / "second-run"

    # A's share link: one run, read-only, in B; nothing else of A's.
    a = alice.open({"run": "my runs / alices-run"})
    a.sidebar.button(key="share_make").click().run()
    _clean(a)
    link = next(c.value for c in a.sidebar.code if "?view=" in c.value)
    token = link.split("?view=")[1]
    shares = list_shares(a.session_state["_workspace"])
    assert [s.run_name for s in shares] == ["alices-run"]
    seen = Browser(monkeypatch).open({"view": token})
    entry = seen.session_state["run"]
    assert entry.shared and entry.saved_to == folder and entry.origin == "shared with you read-only (alices-run)"
    assert seen.query_params["view"] == token and "run" not in seen.query_params
    assert seen.session_state["_workspace"].path not in (a_ws,)
    assert [label for label, _ in serving.readable_runs(seen.session_state["_workspace"])
            if label.startswith("my runs")] == []
    assert serving.may_read(a_ws / "uploads", seen.session_state["_workspace"]) is False
    seen.switch_page("pages/classes.py").run()
    _clean(seen)
    seen.text_input(key="notes_name_0_0").set_value("mine now")
    seen.button(key="FormSubmitter:notes_0_0-Save the note").click().run()
    _clean(seen)
    assert [w.value for w in seen.warning] == ["Note kept for this session; this run was shared with you read-only."]
    assert not (folder / "annotations.json").exists()

    # Revoked: the link is refused with a sentence.
    assert revoke_share(a.session_state["_workspace"], shares[0].digest)
    seen.run()  # the browser that has it open: the run is closed on its next page
    _clean(seen)
    assert "run" not in seen.session_state and "_view" not in seen.session_state
    assert REVOKED_SENTENCE in [e.value for e in seen.sidebar.error]
    late = Browser(monkeypatch).open({"view": token})
    assert REVOKED_SENTENCE in [w.value for w in late.sidebar.warning]
    assert late.session_state["run"].saved_to != folder and not late.session_state["run"].shared
    assert _errors(late) == []


# --- the HttpOnly cookie (serve.py) --------------------------------------------------------

def _through_middleware(headers, content_type=b"text/html; charset=utf-8", scheme="http", status=200, path="/"):
    import asyncio

    from phpn.app.serving.browser import BrowserKeyMiddleware

    async def inner(scope, receive, send):
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", content_type)] if content_type else []})
        await send({"type": "http.response.body", "body": b""})

    sent = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "scheme": scheme, "headers": headers, "path": path}
    asyncio.run(BrowserKeyMiddleware(inner)(scope, None, send))
    return [v.decode() for n, v in sent[0]["headers"] if n == b"set-cookie"]


def test_the_server_gives_a_browser_without_a_valid_key_an_httponly_one(tmp_path, monkeypatch):
    monkeypatch.setenv("PHPN_UPLOAD_DIR", str(tmp_path / "ws"))
    monkeypatch.setenv("PHPN_SETTINGS_FILE", str(tmp_path / "none.toml"))
    for var in ("PHPN_DATA_ROOTS", "PHPN_WRITABLE_ROOTS", "PHPN_SHARED_RUNS", "PHPN_IDLE_HOURS"):
        monkeypatch.delenv(var, raising=False)
    [cookie] = _through_middleware([])
    key, *attributes = cookie.split("; ")
    assert key.startswith("phpn_key=") and workspace_id(key[len("phpn_key="):]) is not None
    assert attributes == ["Path=/", "Max-Age=21600", "HttpOnly", "SameSite=Strict"]
    assert _through_middleware([], scheme="https")[0].endswith("; Secure")
    [renewed] = _through_middleware([(b"cookie", f"a=1; {key}".encode())])
    assert renewed == cookie  # a valid key is kept, its lifetime renewed
    forged = key[:-4] + "0000" if not key.endswith("0000") else key[:-4] + "1111"
    [replaced] = _through_middleware([(b"cookie", forged.encode())])
    assert replaced.split("; ")[0] not in (forged, key)  # a forged one is replaced
    assert _through_middleware([], content_type=b"application/javascript") == []  # pages only
    assert len(_through_middleware([], content_type=None, status=304, path="/classes")) == 1  # a cached page
    assert _through_middleware([], content_type=None, status=304, path="/static/js/index.js") == []
