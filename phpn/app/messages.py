"""Messages to the visitor: a user's error as its own sentence (never a traceback), and
messages kept for the page that follows an action."""
from __future__ import annotations

import traceback
from contextlib import contextmanager

import streamlit as st

from phpn.app import serving
from phpn.errors import PhpnError
from phpn.jobs import error_message

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


@contextmanager
def stop_on_error():
    """Around a page's first read of a class (its shard): a damaged shard, or any phpn error,
    is said on the page, which stops there (never a traceback)."""
    try:
        yield
    except PhpnError as exc:
        show_error(exc)
        st.stop()


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
