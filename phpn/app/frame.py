"""What the app's pages share, in one handle (``from phpn.app import frame as S``): the page's
frame (configuration, sidebar, widget memory), and, from where each lives, what the pages call.

- ``messages.py``: a user's error as its own sentence, messages kept across a rerun;
- ``cache.py``: models, scanned folders and pictures cached across sessions;
- ``state.py``: this visitor's session (model, images, run, workspace, notes, the URL);
- ``restore.py``: work brought back (saved runs with their models, run zips, the demo, the URL);
- ``discovery.py``: the live discovery job.

No maths here: every number comes from phpn.
"""

from __future__ import annotations

from typing import Optional

import streamlit as st
from PIL import Image, ImageDraw

from phpn.app.cache import ModelEntry, load_model_entry, patch_grid, preprocess_key, scan_data, seen_image
from phpn.app.discovery import DiscoveryJob, adopt_finished_job, default_run_name, server_queue
from phpn.app.messages import flash, show_error, show_flash, stop_on_error, user_errors
from phpn.app.restore import (
    bootstrap,
    check_view,
    load_demo,
    model_spec_of_run,
    open_pending_run,
    open_run_zip,
    reopen_run,
    share_controls,
    sweep_idle_workspaces,
)
from phpn.app.state import (
    PAGES,
    DataEntry,
    current_data,
    current_model,
    current_run,
    flush_notes,
    guard_unsaved_work,
    image_root_for_run,
    keep_browser_key,
    known_runs,
    require_model,
    require_run,
    run_folder,
    save_notes,
    save_target,
    set_data,
    set_model,
    set_url,
    shown_path,
    sync_url,
    visitor_path,
    workspace,
)
from phpn.errors import PhpnError
from phpn.jobs import STAGE_LABELS, STAGES, format_seconds
from phpn.method.certify import chance_warning, format_certificate
from phpn.show import viz

# What the pages call as frame.NAME: defined where it lives, handed on here.
__all__ = [
    'DataEntry', 'DiscoveryJob', 'ModelEntry', 'PAGES', 'STAGES', 'STAGE_LABELS', 'current_data',
    'current_model', 'current_run', 'default_run_name', 'flash', 'format_seconds', 'image_root_for_run',
    'known_runs', 'load_demo', 'load_model_entry', 'model_spec_of_run', 'open_run_zip', 'patch_grid',
    'preprocess_key', 'reopen_run', 'require_model', 'require_run', 'run_folder', 'save_notes', 'save_target',
    'scan_data', 'seen_image', 'server_queue', 'set_data', 'set_model', 'set_url', 'show_error', 'show_flash',
    'shown_path', 'stop_on_error', 'user_errors', 'visitor_path', 'workspace'
]


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
            st.caption(f"Run: {len(r.class_records)} classes × k = {r.k_label} ({run.origin}); "
                       f"certificate {certificate_line(r.recorded_certificate)}")

            if chance_warning(r.recorded_certificate):
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
