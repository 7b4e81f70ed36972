"""phpn's app: turn a trained image classifier into a part-prototype network, in the browser.

    streamlit run app.py

This file sets up the navigation; the shared frame (page set-up, the session with the
Fashion-MNIST demo and its precomputed run loaded on first start so every page works
with no upload, and the sidebar with the model/run status) is ``pages/_shared.frame()``,
which every page draws first. The pages only call into ``phpn``.
"""
import os
import sys
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: on a shared CPU, spinning threads slowed a
# live discovery from ~3 s to 10-80 s. Must be set before torch is first imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import streamlit as st  # noqa: E402

from pages import _shared as shared  # noqa: E402
from phpn.errors import PhpnError  # noqa: E402

shared.configure_page()
page = st.navigation([
    st.Page(shared.PAGES["model"], title="Model & data", icon=":material/inventory_2:", default=True),
    st.Page(shared.PAGES["discover"], title="Discover", icon=":material/search:"),
    st.Page(shared.PAGES["classes"], title="Class browser", icon=":material/extension:"),
    st.Page(shared.PAGES["explain"], title="Explain an image", icon=":material/image_search:"),
    st.Page(shared.PAGES["mistakes"], title="Mistakes first", icon=":material/rule:"),
    st.Page(shared.PAGES["export"], title="Export", icon=":material/download:"),
    st.Page(shared.PAGES["evaluate"], title="Evaluate", icon=":material/straighten:"),
])
try:
    page.run()
except PhpnError as exc:  # found while a page ran (a saved run's shard read for the first time): said, no traceback
    shared.show_error(exc)
