"""Browser tests start a Streamlit server and Chromium: all of them belong to the slow tier
(``pytest -m "not slow"`` leaves them out)."""
from pathlib import Path

import pytest

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.slow)
