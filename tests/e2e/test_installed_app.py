"""The app from a built wheel: in a fresh virtual environment, ``phpn app`` started from a folder
that is not the checkout serves the first page, with the built-in demo opened, in a real browser."""
from __future__ import annotations

import os
import subprocess

import pytest
from test_browser import CHROMIUM, CHROMIUM_ARGS, _free_port, _idle, sync_api, wait_until_serving
from test_packaging import _env, build_wheel, install_in_venv

pytestmark = pytest.mark.slow


def test_phpn_app_from_an_installed_wheel_serves_the_demo(tmp_path):
    venv = install_in_venv(build_wheel(tmp_path), tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    port = _free_port()
    log = tmp_path / "app.log"
    env = dict(_env(), PHPN_UPLOAD_DIR=str(tmp_path / "uploads"), PYTHONUNBUFFERED="1")
    with open(log, "w") as fh:  # Streamlit's own flags pass through `phpn app`
        proc = subprocess.Popen([str(venv / "bin" / "phpn"), "app", "--server.headless", "true", "--server.port",
                                 str(port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false"],
                                cwd=elsewhere, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(url, proc, log, timeout=90)
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(90_000)
            page.goto(url)
            page.get_by_text("Model & data").first.wait_for()
            _idle(page, timeout=90)
            sidebar = page.locator('[data-testid="stSidebar"]').inner_text()
            browser.close()
        assert "fashion-mnist" in sidebar, sidebar  # the built-in demo opened on first start
        # It ran the installed package's app, not a checkout's.
        installed = next((venv / "lib").glob("python*/site-packages/phpn/app/pages/model.py"))
        assert installed.is_file()
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=20)
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]
