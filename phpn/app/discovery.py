"""The live discovery: the library's job on a cached model, in the server's queue, its result
kept in the visitor's workspace as soon as it finishes."""
from __future__ import annotations

import time
from typing import Optional

import streamlit as st

from phpn import jobs
from phpn.app import serving
from phpn.app.cache import (
    ModelEntry,
)
from phpn.app.messages import error_text
from phpn.app.state import (
    RunEntry,
    current_model,
    session_id,
    set_run,
    workspace,
)
from phpn.errors import PhpnError
from phpn.runs.store import save_run

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
