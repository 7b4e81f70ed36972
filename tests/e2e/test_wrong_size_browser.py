"""In a real browser, the issue's case: a visitor's own model (the fashion-mnist network loaded
from its weights and model file, as an operator who allows code and server paths would serve
it) left at a wrong input size. The setup check says so as soon as the images are scanned, and
a discovery asks for a confirmation; the discovery is exact and certified, yet the app says the
model is at chance before any explanation, and "Check preprocessing" proposes 28 px, which one
click applies for the session (and one undoes)."""
from __future__ import annotations

import pytest
from test_browser import ROOT, _idle, _main, _nav, _shot, open_page, serve_app


@pytest.fixture(scope="module")
def operator_server(tmp_path_factory):
    """The app served with visitors' code and server paths under the repository allowed."""
    yield from serve_app(tmp_path_factory, "e2e-operator", PHPN_ALLOW_CODE="1", PHPN_DATA_ROOTS=str(ROOT))


@pytest.mark.slow
def test_a_wrong_input_size_is_caught_before_any_explanation(operator_server):
    with open_page(operator_server, timeout_ms=120_000) as pg:
        _main(pg).get_by_text("Doctor's verdict").wait_for()
        _idle(pg)
        main = _main(pg)
        # The model: weights and model file on the server, input size left wrong (96 px).
        main.get_by_text("Checkpoint on this server").click()
        _idle(pg)
        pg.get_by_label("Checkpoint path on this server").fill(str(ROOT / "assets/fashion-mnist/model.safetensors"))
        main.get_by_text("Your own architecture").click()
        pg.get_by_label("Model definition path (.py)").fill(str(ROOT / "phpn/demos/fashion_cnn.py"))
        pg.get_by_label("Function or class that builds the model").fill("FashionCNN")
        main.get_by_text("Run this Python file to build the model").click()
        main.get_by_text("Preprocessing and layers").click()
        pg.get_by_label("Resize (shorter side, 0: default)").fill("96")
        pg.get_by_label("Centre crop (0: default)").fill("96")
        pg.get_by_label("Mean (comma separated)").fill("0.286")
        pg.get_by_label("Std (comma separated)").fill("0.353")
        pg.get_by_label("Std (comma separated)").press("Enter")
        _idle(pg)
        pg.get_by_role("combobox", name="Input channels").click()
        pg.get_by_role("option", name="1", exact=True).click()
        _idle(pg)
        pg.get_by_role("button", name="Load model").click()
        main.get_by_text("Loaded fashion_cnn.py").or_(main.get_by_text("Loaded model.safetensors")).first.wait_for()
        _idle(pg)
        # The images: the demo's discovery folder on the server, 3 per class.
        main.get_by_text("Image folder on this server").click()
        _idle(pg)
        pg.get_by_label("Image folder path").fill(str(ROOT / "assets/fashion-mnist/discover"))
        pg.get_by_label("Images per class (0: all)").fill("3")
        pg.get_by_label("Images per class (0: all)").press("Enter")
        _idle(pg)
        pg.get_by_role("button", name="Scan images").click()
        main.get_by_text("Found 10 classes").wait_for()
        _idle(pg)
        # The setup check, before any heavy work: near chance and scaled up 3.4×, said on this page.
        main.get_by_text("Setup check: fix this before discovering.").wait_for()
        main.get_by_text("scaled up 3.4× to the model's 96 px").wait_for()
        main.get_by_text("Setup check: fix this before discovering.").scroll_into_view_if_needed()
        _shot(pg, "10-setup-check-before-discovery")
        # Discover: a discovery near chance asks for a confirmation first.
        _nav(pg, "Discover", "Discover part-prototypes")
        pg.get_by_role("button", name="Start discovery").click()
        main.get_by_text("Not started: the model is near chance").wait_for()
        main.get_by_text("Discover anyway at this setting").click()
        pg.get_by_role("button", name="Start discovery").click()
        main.get_by_text("Discovery finished").wait_for(timeout=480_000)
        main.get_by_text("Certificate PASSED").wait_for()
        main.get_by_text("The model is right on only").first.wait_for()
        assert pg.locator("[data-testid='stSidebar']").get_by_text("near chance").count() == 1
        pg.get_by_role("button", name="Check preprocessing").click()
        main.get_by_text("Use 28 px").wait_for(timeout=300_000)
        _idle(pg)
        main.get_by_text("Check preprocessing: does the model read these images?").evaluate(
            "e => e.scrollIntoView({block: 'start'})")
        _idle(pg)
        _shot(pg, "11-wrong-size-caught")
        # Explain: the warning comes first.
        _nav(pg, "Explain an image", "Explain an image")
        first_alert = main.locator("[data-testid='stAlertContentError']").first
        assert "The model is right on only" in first_alert.inner_text()  # after the alert's icon name
        assert pg.locator("[data-testid='stException']").count() == 0
        # Apply the proposal for the session, then undo it: the run at 96 px comes back.
        _nav(pg, "Discover", "Discover part-prototypes")  # the check opens by itself: the model is at chance
        pg.get_by_role("button", name="Apply this setting: 28 px").click()
        main.get_by_text("Preprocessing for this session: 28 px").wait_for()
        _idle(pg)  # the rerun has finished: the old run's elements are gone, not just stale
        assert main.get_by_text("Certificate PASSED").count() == 0  # the old run is put aside
        assert pg.locator("[data-testid='stSidebar']").get_by_text("near chance").count() == 0
        pg.get_by_role("button", name="Undo: back to the old setting").click()
        main.get_by_text("Certificate PASSED").wait_for()
        assert main.get_by_text("Preprocessing for this session").count() == 0
        assert pg.locator("[data-testid='stException']").count() == 0

