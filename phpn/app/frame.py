"""What the app's pages share: session state, cached models and images, the background
discovery job, error display and the sidebar. No maths here: every number comes from phpn.

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
import shutil
import threading
import time
import traceback
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import numpy as np
import streamlit as st
import streamlit.components.v1 as components
from PIL import Image, ImageDraw

from phpn import jobs
from phpn.api import import_run, missing_model, model_source, open_model, open_run, run_image_root
from phpn.app import serving
from phpn.app.uploads import held_upload, original_name
from phpn.demos import get_demo
from phpn.errors import PhpnError, RunError
from phpn.images.folders import scan_image_folder
from phpn.images.preprocess import Preprocess, load_image
from phpn.jobs import STAGE_LABELS, STAGES, error_message, format_seconds  # noqa: F401 - the pages use them through here
from phpn.method.certify import chance_warning, format_certificate
from phpn.method.network import LazyPrototypeNetwork
from phpn.runs.annotations import Annotations, load_annotations, save_annotations
from phpn.runs.provenance import (
    describe_origin,
    model_origin,
    portable_path,
    recorded_load,
    resolve_portable,
)
from phpn.runs.store import check_split, load_run, save_run
from phpn.runs.transfer import MAX_RUN_ZIP_BYTES
from phpn.show import viz
from phpn.show.pictures import seen_picture

DEFAULT_DEMO = "fashion-mnist"
BROWSER_KEY_COOKIE = "phpn_key"  # the browser's key to its workspace (never in a URL)
SWEEP_EVERY_S = 600  # idle visitors' workspaces are looked for this often


# --- errors ----------------------------------------------------------------------------------

def error_text(exc: BaseException) -> str:
    """The message for the page: never a server path (see phpn.app.serving.redact_paths)."""
    return serving.redact_paths(error_message(exc))


def show_error(exc: BaseException) -> None:
    st.error(error_text(exc), icon=":material/error:")


@contextmanager
def user_errors():
    """Show any error of the block as ``st.error`` (never a traceback) and carry on.

    Streamlit's own control flow (``st.rerun``, ``st.stop``) derives from BaseException and
    passes through.
    """
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - the point is to catch everything the user can cause
        if not isinstance(exc, PhpnError):
            traceback.print_exc()  # to the server log, not to the page
        show_error(exc)


# --- cached resources ------------------------------------------------------------------------

@dataclass
class ModelEntry:
    """A model shared by every session that loads the same thing: read-only by convention."""

    session: object  # phpn.api.ModelSession
    key: str
    label: str
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    spec: dict = field(default_factory=dict)  # the arguments load_model_entry was given (how to load it again)
    cost: Optional["serving.ForwardCost"] = None  # one image's forward pass at the input size it was opened at

    @property
    def decomposable(self) -> bool:
        return self.session.diagnosis.split is not None

    def session_for(self, device: str):
        """The shared session for CPU work (inference only, nothing is moved or changed); a
        private copy for a GPU, so the cached model is never moved off the CPU under the
        feet of other sessions."""
        if str(device).startswith("cuda"):
            with self.lock:
                return copy.deepcopy(self.session)
        return self.session


def _freeze(spec: dict) -> tuple:
    def f(v):
        if isinstance(v, (list, tuple)):
            return tuple(f(x) for x in v)
        if isinstance(v, dict):
            return tuple(sorted((k, f(x)) for k, x in v.items()))
        return v

    return tuple(sorted((k, f(v)) for k, v in spec.items() if v is not None))


@st.cache_resource(max_entries=6, show_spinner=False)
def _load_model_entry(spec: tuple, _given: dict, _base: Optional[ModelEntry] = None) -> ModelEntry:
    """``_base``: the same model opened at its own preprocessing, whose loaded weights this entry shares."""
    s = dict(spec)
    if s.get("model_def") or s.get("trust_pickle"):
        serving.require_code_allowed("a model file" if s.get("model_def") else "a trusted (pickled) checkpoint")
    pre = Preprocess.from_dict(dict(s["preprocess"])) if "preprocess" in s else None
    # A visitor's code: only ever in a jailed worker; their weights too when the operator says so.
    if serving.isolated(s):
        session = serving.open_jailed_session(
            {**s, "preprocess": dict(s["preprocess"]) if "preprocess" in s else None,
             "overrides": dict(s["overrides"]) if "overrides" in s else None},
            class_names=list(s["class_names"]) if "class_names" in s else None)
    elif _base is not None:  # the loaded model is shared with the entry it came from
        with _base.lock:
            session = open_model(_base.session, preprocess=pre, overrides=dict(s["overrides"]) if "overrides" in s else None,
                                 feature_layer=s.get("feature_layer"), head_layer=s.get("head_layer"))
    else:
        session = open_model(s.get("checkpoint"), demo=s.get("demo"), arch=s.get("arch"), model_def=s.get("model_def"),
                             trust_pickle=bool(s.get("trust_pickle", False)), num_classes=s.get("num_classes"),
                             class_names=list(s["class_names"]) if "class_names" in s else None, preprocess=pre,
                             overrides=dict(s["overrides"]) if "overrides" in s else None,
                             feature_layer=s.get("feature_layer"), head_layer=s.get("head_layer"))
    cost = _checked_cost(session)
    if s.get("demo"):
        label = f"demo: {s['demo']}"
    elif s.get("origin"):  # an upload by its own name and how it came, not where the server keeps it

        origin = dict(s["origin"])
        label = origin.get("name") or Path(str(s.get("checkpoint"))).name
        session.loaded = replace(session.loaded, source=describe_origin(origin))
    else:
        label = Path(str(s.get("checkpoint"))).name
    return ModelEntry(session=session, key=repr(spec), label=label, lock=_base.lock if _base else threading.RLock(),
                      spec=copy.deepcopy({k: v for k, v in _given.items() if v is not None}), cost=cost)


def _checked_cost(session) -> Optional["serving.ForwardCost"]:
    """One image's forward cost at the size the model was opened at (counted in its jailed worker,
    or here), refused when over the operator's budget."""
    worker = serving.jailed_worker(session)
    if worker is not None:
        return worker.cost  # counted and checked in the worker's trial
    size = tuple(session.diagnosis.input_size or ())
    if len(size) != 3:
        return None
    cost = serving.measure_cost(session.loaded.model, size)
    serving.check_forward_cost(size[1], size[2], cost)
    return cost


def _asked_side(spec: dict) -> Optional[int]:
    """The input side (the crop) that ``spec``'s preprocessing asks for, if it asks for one."""
    crops = [(spec.get(key) or {}).get("crop") for key in ("overrides", "preprocess")]
    return next((int(c) for c in crops if c), None)


def load_model_entry(**spec) -> ModelEntry:
    """The cached model for ``spec``; a visitor's code (model file, trusted pickle) runs only if
    the operator allows it, and only in a jailed worker (phpn.app.serving.jail) that loads and
    tries it, then serves every forward pass (a worker that was killed starts again when used).
    A visitor's weights-only model goes to such a worker too when the operator sets
    PHPN_ISOLATE_ALL_MODELS.

    An input size asked for (the preprocessing's crop) is checked against the pixel cap before any
    model is built, and against the model's forward cost (counted at its own input size, from
    the model as opened without that preprocessing: usually cached already) before the model
    runs at that size."""
    serving.check_request_pixels(spec)  # the input's size, before any model is built
    side, base = _asked_side(spec), None
    if side is not None and not serving.isolated(spec):  # a jailed model's trial counts its cost in the jail
        own = {k: v for k, v in spec.items() if k not in ("overrides", "preprocess")}
        try:
            base = _load_model_entry(_freeze(own), own)
        except Exception:  # noqa: BLE001 - it does not open at its own size: its cost is counted at the size asked
            base = None
        if base is not None:
            serving.check_forward_cost(side, side, base.cost)
    return _load_model_entry(_freeze(spec), spec, base)


@st.cache_data(max_entries=32, show_spinner=False)
def _scan(root: str, class_names: Optional[tuple], num_classes: Optional[int], cap: Optional[int], seed: int,
          mtime: float):
    return scan_image_folder(root, class_names=list(class_names) if class_names else None, num_classes=num_classes,
                             images_per_class=cap, seed=seed)


def scan_data(entry: ModelEntry, root, cap: Optional[int], seed: int = 0):
    loaded = entry.session.loaded
    root = Path(root)
    mtime = root.stat().st_mtime if root.exists() else 0.0
    names = tuple(loaded.class_names) if loaded.class_names else None
    # Under an operator's data root every entry is resolved on its own: a link out of it is refused.
    serving.check_confined(root)
    return _scan(str(root), names, int(loaded.num_classes), cap, int(seed), mtime)


@st.cache_data(max_entries=4096, show_spinner=False)
def seen_image(path: str, preprocess_key: tuple) -> Optional[np.ndarray]:
    """The picture the model sees (resized, cropped; grey in RGB for a grey model) of an image file, or None."""
    try:
        return np.asarray(seen_picture(load_image(path), Preprocess.from_dict(dict(preprocess_key))))
    except Exception:
        return None


@st.cache_data(max_entries=512, show_spinner=False)
def patch_grid(root: str, entries: tuple, color: str, pre_key: tuple, size: int, columns: int):
    """Top patches as one picture: each (path, box) drawn as a tile with its box."""
    images, boxes = [], []
    for path, box in entries:
        seen = seen_image(str(Path(root) / path), pre_key)
        if seen is not None:  # an image that no longer decodes is left out, not fatal
            images.append(seen)
            boxes.append(box)
    return np.asarray(viz.patch_grid(images, boxes, color, size, columns)) if images else None


def preprocess_key(pre) -> tuple:
    return _freeze(pre.to_dict())


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


@contextmanager
def stop_on_error():
    """Around a page's first read of a class (its shard): a damaged shard, or any phpn error,
    is said on the page, which stops there (never a traceback)."""
    try:
        yield
    except PhpnError as exc:
        show_error(exc)
        st.stop()


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
    model = run.meta.setdefault("model", {})
    if spec and not spec.get("demo"):  # the origin is recorded once, as model.origin below
        model.setdefault("app_load", recorded_load({k: v for k, v in spec.items() if k != "origin"}, workspace().path))
    origin = model_origin("demo", name=spec["demo"]) if spec.get("demo") else spec.get("origin")
    if origin and model.get("sha256") == entry.session.loaded.sha256:
        model.setdefault("origin", {**origin, "sha256": entry.session.loaded.sha256})
    data = current_data()
    recorded = run.meta.setdefault("data", {})
    if data is not None and data.kind != "demo" and recorded.get("root") == data.label:
        recorded.setdefault("app_folder", {"root": portable_path(data.data.root, workspace().path), "kind": data.kind,
                                           "cap": data.cap, "seed": data.seed})


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
    recorded = run.meta.get("data", {})
    recorded_folder = recorded.get("app_folder") or {}
    root = str(recorded_folder.get("root") or recorded.get("root", ""))
    if current_data() is not None or not root or root.startswith("demo:"):
        return

    path = resolve_portable(root, _files_of(folder))  # 'my files/…': this visitor's workspace (a share: its owner's)
    if path is None or not path.is_dir() or not readable_for(folder, path):
        return
    config = run.meta.get("config", {})
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


# --- the live discovery ----------------------------------------------------------------------

class DiscoveryJob(jobs.DiscoveryJob):
    """The library's discovery job (phpn.jobs) on a cached model: a GPU job works on its own
    copy, errors are worded for the page, and it waits its turn in the server's queue, where the
    visitor (their workspace, whichever tab started it) may hold only so many jobs."""

    def __init__(self, entry: ModelEntry, data, config, data_label: str):
        super().__init__(entry.session, data, config, data_label, model_key=entry.key, describe_error=error_text,
                         session_for=entry.session_for, queue=server_queue(), owner=session_id())

    def cancel(self) -> None:
        super().cancel()
        if self.status == "running":  # a visitor's model in its jailed worker: killed, not waited for
            serving.stop_jailed(self.session)


def server_queue() -> "jobs.DiscoveryQueue":
    """The server's one discovery queue, with as many places (and jobs per visitor) as the operator's settings allow."""
    settings = serving.load_settings()
    return jobs.default_queue(settings.discovery_slots(), settings.discoveries_per_visitor)


def adopt_finished_job() -> None:
    """Make a finished discovery the current run (once)."""
    job: Optional[DiscoveryJob] = st.session_state.get("job")
    if job is None or job.running or job.adopted:
        return
    job.adopted = True
    if job.status == "done" and job.result is not None:
        model = current_model()
        if model is None or model.key != job.model_key:
            st.session_state["job_note"] = ("The discovery finished, but another model has been loaded since; "
                                            "its result was not kept.")
            return
        try:
            entry = set_run(job.result, "live discovery", wall=job.wall_times())
        except Exception as exc:  # noqa: BLE001
            st.session_state["job_note"] = error_text(exc)
            return
        note = keep_finished_run(entry, model)
        if note:
            st.session_state["job_note"] = note


def default_run_name(model: ModelEntry, run) -> str:
    """The name a run is saved under unless the visitor types another: model, k and the time."""
    stem = (model.session.demo or model.session.loaded.arch).replace("/", "-").replace(":", "-")
    return f"{stem}-k{run.k}-{time.strftime('%Y%m%d-%H%M%S')}"


def keep_finished_run(entry: RunEntry, model: ModelEntry) -> Optional[str]:
    """A finished discovery, saved at once in the visitor's own workspace ("my runs"), so that a
    reload or a closed tab never loses it (the URL then names it); returns why it could not be
    kept, or None. Saving it under another name stays possible on the Discover page."""
    base = workspace().runs / default_run_name(model, entry.run)
    target, n = base, 1
    while target.exists():  # two discoveries finished in the same second
        n += 1
        target = base.with_name(f"{base.name}-{n}")
    try:
        save_run(entry.run, target)
        workspace().keep_within_quota(target)
    except PhpnError as exc:
        return (f"The run was not kept in your workspace: {error_text(exc)} It stays open until you leave; save it "
                "on the Discover page once there is room.")
    entry.saved_to = target
    return None


# --- small display helpers ----------------------------------------------------------------

def flash(message: str, kind: str = "success", place: str = "main") -> None:
    """A message to show after the rerun that follows an action (so the sidebar is current)."""
    st.session_state.setdefault("_flash", []).append((place, kind, message))


def show_flash(place: str = "main") -> None:
    pending = st.session_state.get("_flash", [])
    keep = []
    for where, kind, message in pending:
        if where == place:
            getattr(st, kind)(message)
        else:
            keep.append((where, kind, message))
    st.session_state["_flash"] = keep


def remember(*keys: str, options: Optional[dict] = None) -> None:
    """Keep widget values when their page is left and opened again.

    Streamlit forgets the state of widgets that a run does not draw; call this before the
    widgets are drawn (it restores the last values, if still valid for ``options[key]``)
    and :func:`memorise` after.
    """
    for key in keys:
        store = f"_kept_{key}"
        if key not in st.session_state and store in st.session_state:
            value = st.session_state[store]
            allowed = (options or {}).get(key)
            if allowed is None or value in allowed:
                st.session_state[key] = value


def memorise(*keys: str) -> None:
    for key in keys:
        if key in st.session_state:
            st.session_state[f"_kept_{key}"] = st.session_state[key]


VERDICT_TEXT = {
    "exact": ("Exact", "success"),
    "exact-after-folding": ("Exact after folding", "info"),
    "impossible": ("Cannot be decomposed exactly", "error"),
}


def certificate_line(cert: Optional[dict]) -> str:
    return format_certificate(cert, short=True)


@st.cache_resource(show_spinner=False)
def page_icon():
    """The favicon, drawn here: four prototype colours. A ``:material/…:`` or emoji favicon
    makes the browser fetch it from a font CDN, which fails offline."""
    icon = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    draw = ImageDraw.Draw(icon)
    for i, (x, y) in enumerate(((0, 0), (17, 0), (0, 17), (17, 17))):
        draw.rounded_rectangle((x, y, x + 14, y + 14), radius=3, fill=viz.prototype_color(i))
    return icon


def configure_page() -> None:
    st.set_page_config(page_title="phpn: part-prototypes for any classifier", page_icon=page_icon(), layout="wide")


def frame() -> None:
    """The shared frame, drawn by every page: page set-up, the session (the default demo on
    first start), a finished discovery adopted, the sidebar.

    Pages call it themselves (rather than relying on app.py having run first) so that the
    frame is there however Streamlit runs a page: through ``st.navigation`` in app.py, or
    directly, as Streamlit does for a ``pages/`` folder on a server's first request and in
    ``AppTest``.
    """
    configure_page()
    try:
        workspace()  # marks this visitor active, so the sweep keeps their files
    except PhpnError as exc:  # the operator's workspace root is unsafe: say so, write nothing
        show_error(exc)
        st.stop()
    keep_browser_key()
    bootstrap()
    sweep_idle_workspaces()
    adopt_finished_job()
    open_pending_run()
    check_view()
    flush_notes()
    sync_url()
    sidebar()
    guard_unsaved_work()


def sidebar() -> None:
    with st.sidebar:
        st.markdown("### Session")
        model = current_model()
        if model is None:
            st.caption("Model: none loaded")
        else:
            verdict = model.session.diagnosis.verdict
            icon = {"exact": ":material/check_circle:", "exact-after-folding": ":material/check_circle:",
                    "impossible": ":material/block:"}.get(verdict, "")
            st.caption(f"Model: **{model.label}** ({model.session.loaded.arch}, "
                       f"{model.session.loaded.num_classes} classes) {icon} {VERDICT_TEXT[verdict][0].lower()}")
        data = current_data()
        if data is not None:
            n = sum(len(c.paths) for c in data.data.classes)
            st.caption(f"Images: {len(data.data.classes)} classes, {n} images ({data.kind})")
        else:
            st.caption("Images: none")
        run = current_run()
        if run is not None:
            r = run.run
            st.caption(f"Run: {len(r.meta.get('classes', []))} classes × k = {r.k_label} ({run.origin}); "
                       f"certificate {certificate_line(r.meta.get('certificate'))}")

            if chance_warning(r.meta.get("certificate")):
                st.error("The model is near chance on the labelled images: its preprocessing is probably wrong. "
                         "See Discover → Check preprocessing.", icon=":material/warning:")
            if run.saved_to:
                st.caption(f"Saved at `{shown_path(run.saved_to)}`")
            else:
                st.caption("Not saved yet (Discover page).")
        else:
            st.caption("Run: none")
        if run is not None and run.shared:
            st.info("A read-only view of a run shared with you: notes cannot be saved, and nothing of the "
                    "person's other files is open to you.", icon=":material/visibility:")
        share_controls()
        show_flash("sidebar")
        job = st.session_state.get("job")
        if job is not None and job.waiting:
            st.caption(f":material/hourglass_top: Discovery waiting in the queue (position {job.queue_position()})")
        elif job is not None and job.running:
            st.caption(f":material/hourglass_top: Discovery running ({format_seconds(job.elapsed())})")
        for w in st.session_state.get("boot_warnings", []) or []:
            st.warning(w)
