"""Work brought back: a saved run reopened with its model, a run's zip taken in, the demo at
first start, a reload's URL, a read-only share link, idle workspaces swept."""
from __future__ import annotations

import shutil
import time
import traceback
from pathlib import Path
from typing import Optional

import streamlit as st

from phpn.api import import_run, missing_model, model_source, open_run
from phpn.app import serving
from phpn.app.cache import (
    load_model_entry,
    scan_data,
)
from phpn.app.messages import error_text, flash, user_errors
from phpn.app.state import (
    DEFAULT_DEMO,
    SWEEP_EVERY_S,
    DataEntry,
    _view_of,
    current_data,
    current_model,
    current_run,
    readable_for,
    run_folder,
    session_id,
    set_data,
    set_model,
    set_run,
    workspace,
)
from phpn.app.uploads import held_upload, original_name
from phpn.demos import get_demo
from phpn.errors import PhpnError
from phpn.runs.provenance import (
    resolve_portable,
)
from phpn.runs.store import load_run
from phpn.runs.transfer import MAX_RUN_ZIP_BYTES


def _files_of(folder) -> Path:
    """Whose 'my files/…' the run at ``folder`` means: its owner's for a shared run, else this visitor's."""
    view = _view_of(folder)
    return view.run_dir.parent.parent if view is not None else workspace().path


def model_spec_of_run(run, folder=None) -> Optional[dict]:
    """How to load the model a run was made from (load_model_entry's arguments), or None when
    its file is not on this server or not readable by this visitor."""
    return model_source(run, allowed=lambda path: readable_for(folder, path), workspace=_files_of(folder),
                        code=True)  # load_model_entry runs a visitor's code only where the operator allows it


def reopen_run(folder: Path, origin: str) -> Optional[str]:
    """Open a saved run with the model it was made from (loaded from where the run says);
    returns what is missing when the model file is not here (the run then waits for it)."""
    run = load_run(folder)
    model = current_model()
    if model is None or model.session.loaded.sha256 != run.checkpoint_sha256:
        spec = model_spec_of_run(run, folder)
        if spec is None:
            st.session_state["pending_run"] = (Path(folder), origin, run.checkpoint_sha256)
            return (missing_model(run, where="on this server for you").problem
                    + " Load that model on the Model & data page: the run opens as soon as it is loaded.")
        if spec.get("demo"):
            load_demo(spec["demo"], with_run=False)
        else:
            set_model(load_model_entry(**spec))

    run = open_run(folder, current_model().session)
    entry = set_run(run, origin, saved_to=folder, checked=True)
    if _view_of(folder) is not None:
        entry.shared = True
        entry.notes_problem = None
    _reopen_data(run, folder)
    return None


def open_run_zip(uploaded) -> tuple:
    """A run's zip the visitor uploaded (the Export page's), taken into their workspace under a
    fresh name (verified whole: :func:`phpn.api.import_run`) and opened with its model;
    returns (the folder, what is missing or None: see :func:`reopen_run`). A run that is taken in
    but cannot be opened here is removed again."""
    ws = workspace()
    size = getattr(uploaded, "size", None) or len(uploaded.getbuffer())
    with held_upload(size):
        folder = import_run(uploaded, ws.runs, max_bytes=min(MAX_RUN_ZIP_BYTES, ws.room()))
    try:
        ws.keep_within_quota(folder)
        return folder, reopen_run(folder, f"uploaded as {original_name(uploaded)}")
    except Exception:  # Streamlit's rerun and stop signals are not Exceptions: they pass
        shutil.rmtree(folder, ignore_errors=True)
        raise


def _reopen_data(run, folder=None) -> None:
    """The image folder the run was made from, scanned again when this visitor may read it."""
    recorded = run.data_info
    recorded_folder = recorded.get("app_folder") or {}
    root = str(recorded_folder.get("root") or recorded.get("root", ""))
    if current_data() is not None or not root or root.startswith("demo:"):
        return

    path = resolve_portable(root, _files_of(folder))  # 'my files/…': this visitor's workspace (a share: its owner's)
    if path is None or not path.is_dir() or not readable_for(folder, path):
        return
    config = run.settings
    cap = recorded_folder.get("cap", config.get("images_per_class"))
    seed = int(recorded_folder.get("seed", config.get("seed", 0)) or 0)
    data = scan_data(current_model(), path, cap, seed)
    set_data(DataEntry(data=data, label=str(recorded.get("root", root)), cap=cap, seed=seed,
                       kind=recorded_folder.get("kind") or ("upload" if workspace().owns(path) else "path")))


def open_pending_run() -> None:
    """A run that waited for its model opens once that model is loaded."""
    pending = st.session_state.get("pending_run")
    model = current_model()
    if not pending or model is None or model.session.loaded.sha256 != pending[2]:
        return
    st.session_state.pop("pending_run", None)
    with user_errors():
        reopen_run(pending[0], pending[1])
        st.toast(f"Opened the run that was waiting for this model ({pending[1]}).", icon=":material/history:")


def _keep_link_warnings() -> None:
    """What the link could not restore, shown in the sidebar with the start-up warnings."""
    link = st.session_state.pop("_link_warnings", [])
    if link:
        st.session_state["boot_warnings"] = link + list(st.session_state.get("boot_warnings") or [])


def restore_from_url() -> bool:
    """First start of a session from a link or a reload: the session's files, the model, the
    run, the class and the image named in the URL. Returns whether a run or model was restored.

    The URL never names a workspace (an old link's ``session`` is ignored): a run is looked up
    among the runs *this* visitor may open, so a link to "my runs / x" opens the visitor's own x
    or nothing. A share link (``view``) opens its one run read-only."""
    q = st.query_params
    restored, warnings = False, []
    label, demo, token = q.get("run"), q.get("demo"), q.get("view")
    try:
        if token:
            share = serving.open_share(token)
            st.session_state["_view"], st.session_state["_view_token"] = share, token
            missing = reopen_run(share.run_dir, f"shared with you read-only ({share.run_name})")
            if missing:
                warnings.append(missing)
            restored = True
        elif label:
            folder = run_folder(label)
            missing = reopen_run(folder, f"reopened from the link ({label})")
            if missing:
                warnings.append(missing)
            restored = True
        elif demo:
            warnings += load_demo(demo)
            restored = True
    except Exception as exc:  # noqa: BLE001 - a stale link must not stop the app
        if token:  # a revoked link is said as such, and the session goes on with the demo
            forget_view()
            warnings.append(error_text(exc))
        else:
            warnings.append(f"The link's {'run' if label else 'model'} could not be opened: {error_text(exc)}")
    st.session_state["_link_warnings"] = warnings
    for key, stores in (("class", ("_kept_browser_class", "_kept_export_class")), ("image", ("_kept_explain_file",))):
        value = q.get(key)
        if value is not None:
            if key == "class":
                try:
                    value = int(value)
                except ValueError:
                    continue
            else:
                folder, _, name = str(value).rpartition("/")
                if folder:
                    st.session_state["_kept_explain_folder"] = folder
                value = name
            for store in stores:
                st.session_state[store] = value
    return restored


def forget_view() -> None:
    st.session_state.pop("_view", None)
    st.session_state.pop("_view_token", None)


def check_view() -> None:
    """A shared run stays open only while its link does: once revoked, the run is closed and
    the page says why."""
    token = st.session_state.get("_view_token")
    run = current_run()
    if not token or run is None or not run.shared:
        return
    try:
        serving.open_share(token)
    except PhpnError as exc:
        forget_view()
        st.session_state.pop("run", None)
        flash(error_text(exc), "error", place="sidebar")


def share_controls() -> None:
    """'Copy a link to this view' for a run saved in this visitor's workspace, and the links
    they made, each with a Revoke button."""
    run = current_run()
    ws = workspace()
    shares = serving.list_shares(ws)
    own_run = run is not None and not run.shared and run.saved_to is not None and serving.is_within(run.saved_to, ws.runs)
    if not own_run and not shares:
        return
    with st.expander("Share", icon=":material/share:"):
        if own_run:
            st.caption("A link that opens this run and its notes read-only, and nothing else of your files. "
                       "Whoever has it sees the run's top patches; you can revoke it here.")
            if st.button("Copy a link to this view", key="share_make", icon=":material/link:"):
                with user_errors():
                    token = serving.create_share(ws, run.saved_to)
                    base = str(getattr(st.context, "url", "") or "").split("?")[0]
                    st.session_state.setdefault("_made_links", {})[token] = f"{base}?view={token}"
                    shares = serving.list_shares(ws)
        made = st.session_state.get("_made_links", {})
        for share in shares:
            when = time.strftime("%H:%M", time.localtime(share.created))
            link = next((url for token, url in made.items() if serving.token_digest(token) == share.digest), None)
            st.caption(f"Link to **{share.run_name}**, made {when}")
            if link:
                st.code(link, language=None)
            if st.button("Revoke", key=f"share_revoke_{share.digest}", icon=":material/link_off:"):
                serving.revoke_share(ws, share.digest)
                flash(f"The link to {share.run_name} is revoked: it opens nothing any more.", place="sidebar")
                st.rerun()


def load_demo(name: str, with_data: bool = True, with_run: bool = True) -> list:
    """Load a demo's model, images and precomputed run; returns warnings (strings)."""
    demo = get_demo(name)
    entry = load_model_entry(demo=name)
    set_model(entry)
    warnings = []
    if with_data:
        cap = demo.defaults.get("images_per_class")
        data = scan_data(entry, demo.discovery_dir(), cap, int(demo.defaults.get("seed", 0)))
        explain_root = None
        try:
            explain_root = demo.explain_dir()
        except PhpnError:
            pass
        set_data(DataEntry(data=data, label=f"demo:{name}", kind="demo", cap=cap,
                           seed=int(demo.defaults.get("seed", 0)), explain_root=explain_root))
    if with_run and entry.decomposable:
        if (demo.run_dir / "run.json").is_file():
            try:
                run = open_run(demo.run_dir, entry.session)
                set_run(run, f"precomputed run of the {name} demo", saved_to=demo.run_dir, checked=True)
            except PhpnError as exc:
                warnings.append(f"The demo's precomputed run could not be used: {exc}")
        else:
            warnings.append("The demo has no precomputed run yet: start one on the Discover page.")
    return warnings


def bootstrap() -> None:
    """First start of a session: the default demo, its images and its run, so every page works."""
    if st.session_state.get("_booted"):
        return
    st.session_state["_booted"] = True
    if restore_from_url() and current_model() is not None:
        return _keep_link_warnings()
    sweep_idle_workspaces()
    try:
        with st.spinner("Loading the Fashion-MNIST demo…"):
            st.session_state["boot_warnings"] = load_demo(DEFAULT_DEMO)
    except Exception as exc:  # noqa: BLE001
        st.session_state["boot_warnings"] = [f"The built-in demo could not be loaded: {error_text(exc)}"]
    _keep_link_warnings()


_LAST_SWEEP = [0.0]


def sweep_idle_workspaces() -> None:
    """Delete idle visitors' workspaces (at a session's start, then at most every SWEEP_EVERY_S)."""
    if time.time() - _LAST_SWEEP[0] < SWEEP_EVERY_S and _LAST_SWEEP[0]:
        return
    _LAST_SWEEP[0] = time.time()
    try:
        serving.sweep_idle(keep=(session_id(),))
        serving.sweep_shares()
    except Exception:  # noqa: BLE001 - housekeeping must never stop the app
        traceback.print_exc()
