"""This visitor's session: its model, images and run (``st.session_state``), its workspace and
the browser key that names it (never the URL), paths a visitor may give, the run's notes, and
the URL that names the view.

Session state (``st.session_state``):
  model      ModelEntry    the loaded model (cached across sessions) and how it was loaded
  data       DataEntry     the scanned image folder
  run        RunEntry      the current run, its decomposed network and where it came from
  job        DiscoveryJob  the live discovery, if one was started
  explained  dict          the last explanation shown (for the Export page)
  _sid       str           this visitor's workspace id, from the browser's key (never from the URL)
  _view      Share         the run a read-only share link opened (its token in ``_view_token``)
"""
from __future__ import annotations

import copy
import functools
import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import streamlit as st
import streamlit.components.v1 as components

from phpn.api import run_image_root
from phpn.app import serving
from phpn.app.cache import (
    ModelEntry,
)
from phpn.app.messages import error_text, show_error
from phpn.errors import PhpnError, RunError
from phpn.method.network import LazyPrototypeNetwork
from phpn.runs.annotations import Annotations, load_annotations, save_annotations
from phpn.runs.provenance import (
    model_origin,
    portable_path,
    recorded_load,
)
from phpn.runs.store import check_split

DEFAULT_DEMO = "fashion-mnist"
BROWSER_KEY_COOKIE = "phpn_key"  # the browser's key to its workspace (never in a URL)
SWEEP_EVERY_S = 600  # idle visitors' workspaces are looked for this often


# --- session state -------------------------------------------------------------------------

@dataclass
class DataEntry:
    data: object  # phpn.images.folders.ImageFolderData
    label: str  # recorded in runs: "demo:<name>" or the folder
    kind: str  # "demo" | "upload" | "path"
    cap: Optional[int]
    seed: int = 0
    explain_root: Optional[Path] = None  # held-out images to explain (demos)


@dataclass
class RunEntry:
    run: object  # phpn.runs.store.Run (a saved run reads a class's shard when the class is first shown)
    split: object  # the model's head the run decomposes: the network is built on it when first needed
    origin: str
    model_key: str
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    saved_to: Optional[Path] = None
    wall: Optional[dict] = None  # live runs: seconds per stage as the app saw them, certificate included
    notes: object = None  # phpn.runs.annotations.Annotations: the expert's notes on the prototypes
    notes_problem: Optional[str] = None  # why the saved notes could not be read (then they are not overwritten)
    notes_unsaved: bool = False  # edited notes not yet written beside the run
    url_label: Optional[tuple] = None  # (saved_to, its label among the visitor's runs), found once per folder
    shared: bool = False  # opened through another visitor's read-only share link

    @functools.cached_property
    def network(self):
        """The decomposed network for the pages, which explain a few classes at a time
        (phpn.method.network.LazyPrototypeNetwork): a class's prototypes are read (its shard only) when
        it is first explained (pages read a class inside :func:`stop_on_error`). The run was
        checked against this head when it was set (:func:`set_run`)."""
        return LazyPrototypeNetwork(self.split, self.run.class_indices, self.run.class_prototypes, self.run.k).eval()


def state():
    return st.session_state


def browser_cookie() -> Optional[str]:
    """The browser key this browser sent with the page's connection (a cookie), or None. It is
    never read from the URL, so a link cannot hand anybody a workspace."""
    try:
        return st.context.cookies.get(BROWSER_KEY_COOKIE)
    except Exception:  # noqa: BLE001 - no browser connection (a script run without a server)
        return None


def session_id() -> str:
    """This visitor's workspace id: from the browser's key when the browser holds one this
    server made (a reload, another tab of the same browser), else from a fresh key that the
    page then gives the browser to keep (:func:`keep_browser_key`)."""
    if "_sid" not in st.session_state:
        key = browser_cookie()
        sid = serving.workspace_id(key) if key else None
        if sid is None:
            key = serving.new_browser_key()
            sid = serving.workspace_id(key)
            st.session_state["_key_to_keep"] = key
        st.session_state["_sid"] = sid
    return st.session_state["_sid"]


def keep_browser_key() -> None:
    """Give a new browser key to the browser as a first-party cookie (SameSite=Strict, Secure on
    https, lasting as long as an idle workspace), when the server did not: served with
    ``phpn app`` / ``serve.py`` the key arrives as an HttpOnly cookie set by the server
    (phpn.app.serving.browser) and this does nothing. Under plain ``streamlit run app.py`` a page
    script can set no response header, so the page writes the cookie itself, through Streamlit's
    own script (``st.html`` with its JavaScript allowed, our text only); it is then not HttpOnly."""
    key = st.session_state.get("_key_to_keep")
    if not key:
        return
    age = int(max(1.0, serving.load_settings().idle_hours) * 3600)
    script = (f"<script>(function(){{var k={json.dumps(key)};"  # the key is [A-Za-z0-9_.-]: nothing to escape
              f"var s=document.location.protocol==='https:'?'; Secure':'';"
              f"document.cookie='{BROWSER_KEY_COOKIE}='+k+'; Path=/; Max-Age={age}; SameSite=Strict'+s;}})();</script>")
    with st.sidebar:
        st.html(script, unsafe_allow_javascript=True)


def workspace() -> "serving.Workspace":
    """This visitor's private folder (uploads, saved runs); marked active on every page."""
    ws = st.session_state.get("_workspace")
    if ws is None or not ws.path.is_dir():  # first use, or swept while the visitor was away
        ws = serving.Workspace(session_id())
        st.session_state["_workspace"] = ws
    else:
        ws.touch()
    return ws


def shown_path(path) -> str:
    """A path as a visitor may see it: inside their workspace 'my runs/…', else its last part."""
    path = Path(path)
    ws = st.session_state.get("_workspace")
    if ws is not None and ws.owns(path):
        return "my files/" + path.resolve().relative_to(ws.path.resolve()).as_posix()
    return serving.redact_paths(str(path)) if path.is_absolute() else str(path)


def visitor_path(text: str, what: str) -> Path:
    """A server path the visitor typed, if they may read it (their workspace, the demos, the
    shared runs, the operator's PHPN_DATA_ROOTS); else a clear error."""
    return serving.visitor_path(text, what, workspace=workspace())


def known_runs() -> list:
    """(label, folder) of the runs this visitor may open: theirs, the shared ones, the demos', and
    the one run a share link opened (none other of its owner's)."""
    found = serving.readable_runs(workspace())
    view = st.session_state.get("_view")
    if view is not None:
        found.insert(0, (f"shared with you / {view.run_name}", view.run_dir))
    return found


def _view_of(folder) -> Optional["serving.Share"]:
    """The share link this session opened, when ``folder`` is its run."""
    view = st.session_state.get("_view")
    if view is None or folder is None:
        return None
    return view if serving.is_within(folder, view.run_dir) and serving.is_within(view.run_dir, folder) else None


def readable_for(folder, path) -> bool:
    """Whether this visitor may read ``path`` for the run at ``folder``: what they may read
    anyway, and, for a run a share link opened, the files that run names in its owner's
    workspace (its model and images: read by the server, never listed or written)."""
    if serving.may_read(path, workspace()):
        return True
    view = _view_of(folder)
    return view is not None and serving.is_within(path, view.run_dir.parent.parent)


def save_target(text: str) -> Path:
    """Where the visitor may save a run called ``text`` (a name: in their workspace)."""
    return serving.run_save_target(text, workspace())


def run_folder(text: str) -> Path:
    """The run folder a visitor picked or typed, if they may read it."""
    text = str(text).strip()
    for label, path in known_runs():
        if text in (label, str(path)):
            return path
    return visitor_path(text, "run folder")


def current_model() -> Optional[ModelEntry]:
    return st.session_state.get("model")


def current_data() -> Optional[DataEntry]:
    return st.session_state.get("data")


def current_run() -> Optional[RunEntry]:
    return st.session_state.get("run")


def set_model(entry: ModelEntry) -> None:
    old = current_model()
    st.session_state["model"] = entry
    if old is None or old.key != entry.key:
        forget_model_state()


def set_data(entry: DataEntry) -> None:
    st.session_state["data"] = entry


def set_run(run, origin: str, saved_to: Optional[Path] = None, wall: Optional[dict] = None,
            checked: bool = False) -> RunEntry:
    """Make ``run`` the session's run; ``checked``: it was opened for this model (phpn.api.open_run)."""
    model = current_model()
    if model is None:
        raise RunError("No model is loaded.", "Load the model the run was made from first (Model & data page).")
    if not model.decomposable:
        raise RunError("The loaded model cannot be decomposed.", "Load a model whose head can be decomposed.")
    if not checked:
        check_split(run, model.session.split)  # refuses a run made for another head
    entry = RunEntry(run=run, split=model.session.split, origin=origin, model_key=model.key,
                     saved_to=Path(saved_to) if saved_to else None, wall=wall)
    _open_notes(entry)
    _record_how_the_model_was_loaded(run, model)
    st.session_state["run"] = entry
    st.session_state.pop("boot_warnings", None)
    st.session_state.pop("explained", None)
    st.session_state.pop("evaluation", None)
    return entry


# --- state that lasts: per-model state, notes beside the run, the URL ---------------------------

# What belongs to one model: results, messages and the settings chosen for it (widget keys and
# the values remember() keeps). All of it is forgotten when another model is loaded.
# (A run waiting for its model, "pending_run", is kept: it opens when that model is loaded.)
MODEL_STATE_KEYS = ("data", "run", "explained", "evaluation", "job_note", "class_report", "explanation_report",
                    "switch_off", "_flash")
MODEL_SETTING_PREFIXES = ("disc_", "browser_", "explain_", "export_", "eval_", "notes_", "off_", "mistakes",
                          "contrast_", "why_")


def forget_model_state() -> None:
    """Forget everything that belonged to the previous model (a finished discovery included; a
    running one is kept: adopt_finished_job() says it was not kept)."""
    for key in MODEL_STATE_KEYS:
        st.session_state.pop(key, None)
    job = st.session_state.get("job")
    if job is not None and not job.running:
        st.session_state.pop("job", None)
    for key in list(st.session_state.keys()):
        bare = key[len("_kept_"):] if key.startswith("_kept_") else key
        if bare.startswith(MODEL_SETTING_PREFIXES):
            st.session_state.pop(key, None)


def _notes_writable(entry: RunEntry) -> Optional[str]:
    """Why the notes cannot be written beside the run now, or None."""
    if entry.shared:
        return "this run was shared with you read-only"
    if entry.saved_to is None:
        return "the run is not saved yet: save it on the Discover page and the notes go with it"
    if entry.notes_problem:
        return entry.notes_problem
    reason = serving.read_only_reason(entry.saved_to)
    if reason:
        return f"{reason}: save a copy of the run on the Discover page to keep notes"
    return None


def _open_notes(entry: RunEntry) -> None:
    try:
        entry.notes = load_annotations(entry.run, entry.saved_to)
    except PhpnError as exc:
        entry.notes = Annotations.for_run(entry.run)
        entry.notes_problem = f"the saved notes could not be read ({error_text(exc)})"


def save_notes(entry: RunEntry) -> Optional[str]:
    """Write the run's notes beside it when possible; returns why not, or None when saved."""
    why = _notes_writable(entry)
    if why is None:
        save_annotations(entry.notes, entry.saved_to)
        entry.notes_unsaved = False
    else:
        entry.notes_unsaved = True
    return why


def flush_notes() -> None:
    """Notes edited before the run was saved are written once it is."""
    entry = current_run()
    if entry is not None and entry.notes_unsaved and _notes_writable(entry) is None:
        try:
            save_notes(entry)
        except PhpnError as exc:
            show_error(exc)


def unsaved_work(entry: Optional[RunEntry]) -> bool:
    """Whether a reload or a closed tab would lose the visitor's work: notes kept for this
    session only, or a discovery that could not be kept in the workspace."""
    return entry is not None and (entry.notes_unsaved or entry.saved_to is None)


def guard_unsaved_work() -> None:
    """While there is unsaved work, the browser asks before the page is reloaded or closed (its
    own 'Leave site?' prompt); the guard is lifted once the work is saved. The script runs in a
    component's frame, which is of the page's origin: the listener is made in the page itself
    (and kept on it, so that the same one is removed), so it outlives the frame."""
    on = "true" if unsaved_work(current_run()) else "false"
    ask = json.dumps("event.preventDefault(); event.returnValue = ''; return '';")  # what browsers expect
    script = ("<script>(function(){var w = window.parent;"
              f"w.__phpnUnsavedWork = w.__phpnUnsavedWork || new w.Function('event', {ask});"
              f"if ({on}) w.addEventListener('beforeunload', w.__phpnUnsavedWork);"
              "else w.removeEventListener('beforeunload', w.__phpnUnsavedWork);})();</script>")
    with st.sidebar:
        components.html(script, height=0)


def run_url_label(entry: Optional[RunEntry]) -> Optional[str]:
    """How the URL names the current run: its label among the runs this visitor may open (looked
    up once per folder the run is saved in, not on every render)."""
    if entry is None or entry.saved_to is None:
        return None
    if entry.url_label is None or entry.url_label[0] != entry.saved_to:
        where = Path(entry.saved_to).resolve()
        label = next((label for label, path in known_runs() if Path(path).resolve() == where), None)
        entry.url_label = (entry.saved_to, label)
    return entry.url_label[1]


def set_url(**values) -> None:
    """Put values in the page's URL (None removes one), so a reload or a link restores them."""
    for key, value in values.items():
        if value is None:
            st.query_params.pop(key, None)
        elif st.query_params.get(key) != str(value):
            st.query_params[key] = str(value)


def sync_url() -> None:
    """The model (a demo) and the run in the URL, or the share link's token while its run is
    shown; pages add the class and image. Nothing in the URL names the visitor's workspace."""
    model = current_model()
    run = current_run()
    view = st.session_state.get("_view_token") if run is not None and run.shared else None
    set_url(session=None, view=view, demo=model.session.demo if model is not None else None,
            run=None if view else run_url_label(run))


def _record_how_the_model_was_loaded(run, entry: ModelEntry) -> None:
    """The run remembers how the app loaded its model (file, architecture file, preprocessing,
    layers), so that a saved run can reopen it later, and where the model came from (the upload's
    own name, how it was loaded). Files in the visitor's workspace are written 'my files/…':
    a saved or exported run holds no server path of theirs."""
    spec = copy.deepcopy(entry.spec)
    app_load = origin = app_folder = None
    if spec and not spec.get("demo"):  # the origin is recorded once, as model.origin below
        app_load = recorded_load({k: v for k, v in spec.items() if k != "origin"}, workspace().path)
    found = model_origin("demo", name=spec["demo"]) if spec.get("demo") else spec.get("origin")
    if found and run.model_info.get("sha256") == entry.session.loaded.sha256:
        origin = {**found, "sha256": entry.session.loaded.sha256}
    data = current_data()
    if data is not None and data.kind != "demo" and run.data_info.get("root") == data.label:
        app_folder = {"root": portable_path(data.data.root, workspace().path), "kind": data.kind, "cap": data.cap,
                      "seed": data.seed}
    run.note_loading(app_load=app_load, origin=origin, app_folder=app_folder)


def image_root_for_run(run, class_index: Optional[int] = None) -> Optional[Path]:
    """Where the run's training images (top patches) can be read now, or None; probed with a
    patch of ``class_index`` (the class shown: no other class's shard is read)."""
    data = current_data()
    entry = current_run()
    folder = entry.saved_to if entry is not None and entry.run is run else None
    # Only folders this visitor may read: a run's recorded folder may be another visitor's.
    return run_image_root(run, also=[data.data.root] if data is not None else [],
                          allowed=lambda root: readable_for(folder, root), class_index=class_index)


def require_model(decomposable: bool = True) -> ModelEntry:
    entry = current_model()
    if entry is None:
        st.info("No model is loaded yet. Load one on the **Model & data** page.")
        st.page_link(PAGES["model"], label="Go to Model & data", icon=":material/inventory_2:")
        st.stop()
    if decomposable and not entry.decomposable:
        st.error(f"This model cannot be decomposed exactly: {entry.session.diagnosis.reason} "
                 "Load a model whose head is global average pooling followed by a linear layer.")
        st.stop()
    return entry


def require_run() -> RunEntry:
    require_model()
    entry = current_run()
    if entry is None:
        st.info("There is no run yet for this model. Start a discovery (or load a saved run) on the "
                "**Discover** page.")
        st.page_link(PAGES["discover"], label="Go to Discover", icon=":material/search:")
        st.stop()
    return entry


PAGES = {
    "model": "pages/model.py",
    "discover": "pages/discover.py",
    "classes": "pages/classes.py",
    "explain": "pages/explain.py",
    "mistakes": "pages/mistakes.py",
    "export": "pages/export.py",
    "evaluate": "pages/evaluate.py",
    "audit": "pages/audit.py", "compare": "pages/compare.py",
}
