"""The app's entry point: the navigation over the pages, inside the shared frame.

``phpn app`` runs this file with Streamlit; ``streamlit run app.py`` in a checkout calls
:func:`main` from the repository's three-line ``app.py``. Streamlit finds the pages relative
to the script it runs: ``pages/`` beside ``app.py`` in a checkout, ``phpn/app/pages`` once
installed (setup.py maps the one folder to the other).
"""
import os

# Idle OpenMP threads sleep instead of spinning: on a shared CPU, spinning threads slowed a
# live discovery from ~3 s to 10-80 s. Must be set before torch is first imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import streamlit as st  # noqa: E402

from phpn.app import frame  # noqa: E402
from phpn.errors import PhpnError  # noqa: E402

PAGES = (  # (key in frame.PAGES, title, icon); the first is the default page
    ("model", "Model & data", ":material/inventory_2:"),
    ("discover", "Discover", ":material/search:"),
    ("classes", "Class browser", ":material/extension:"),
    ("explain", "Explain an image", ":material/image_search:"),
    ("mistakes", "Mistakes first", ":material/rule:"),
    ("export", "Export", ":material/download:"),
    ("evaluate", "Evaluate", ":material/straighten:"),
    ("audit", "Audit", ":material/policy:"),
    ("compare", "Compare runs", ":material/compare_arrows:"),
)


def main() -> None:
    frame.configure_page()
    page = st.navigation([st.Page(frame.PAGES[key], title=title, icon=icon, default=i == 0)
                          for i, (key, title, icon) in enumerate(PAGES)])
    try:
        page.run()
    except PhpnError as exc:  # found while a page ran (a saved run's shard read for the first time): no traceback
        frame.show_error(exc)


if __name__ == "__main__":
    main()
