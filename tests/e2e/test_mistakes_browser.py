"""In a real browser: the mistakes-first page on the demo's held-out images (gallery, confusions,
"why A and not B", a click on a cell of the confusion matrix opening that cell's story), and the page
fetches nothing from outside the app's own server (no
favicon or font from a CDN). Same server and skips as ``test_browser.py``."""
from __future__ import annotations

import pytest
from test_browser import _idle, _main, _nav, _shot, open_page, server  # noqa: F401 - server: the page fixture's


@pytest.fixture(scope="module")
def watched_page(server):  # noqa: F811 - the fixture imported above
    """A page whose every request is recorded from the first one on."""
    requests = []
    with open_page(server, on_request=requests.append) as pg:
        yield pg, requests, server


def test_mistakes_first_and_nothing_fetched_from_the_internet(watched_page):
    pg, requests, url = watched_page
    _main(pg).get_by_text("Doctor's verdict").wait_for()
    _idle(pg)
    _nav(pg, "Mistakes first", "Mistakes first")
    _main(pg).get_by_text("The demo's held-out images").click()
    pg.get_by_label("Images per class (0: all)").fill("5")
    pg.get_by_label("Images per class (0: all)").press("Enter")
    _idle(pg)
    pg.get_by_role("button", name="Predict the folder").click()
    pg.get_by_role("heading", name="Why A and not B?").wait_for(timeout=120_000)
    _main(pg).get_by_text("logit gap").first.wait_for()
    _idle(pg)
    assert _main(pg).get_by_text("Most frequent confusions").is_visible()
    assert _main(pg).get_by_text("✗ wrong").count() > 0  # the demo model's few mistakes come first
    assert pg.locator("[data-testid='stException']").count() == 0
    _shot(pg, "9-mistakes-first")
    pg.get_by_role("heading", name="Why A and not B?").evaluate("e => e.scrollIntoView({block: 'start'})")
    _idle(pg)
    _shot(pg, "10-why-a-not-b")

    icon = pg.evaluate("() => Array.from(document.querySelectorAll('link[rel~=icon]')).map(l => l.href)")
    assert icon and all(h.startswith(url) or h.startswith("data:") for h in icon), icon
    outside = [u for u in requests if not u.startswith((url, "data:", "blob:", "about:"))
               and not u.startswith(url.replace("http", "ws"))]
    assert not outside, outside


def _found():
    """What the page predicts on the demo's held-out images, 5 per class (the same scan)."""
    from phpn.api import open_data, open_model
    from phpn.demos import get_demo
    from phpn.pipeline.mistakes import predict_folder

    session = open_model(demo="fashion-mnist")
    return predict_folder(session, open_data(session, get_demo("fashion-mnist").explain_dir(), 5))


def test_a_click_on_a_cell_of_the_confusion_matrix_opens_its_story(watched_page):
    pg, _, _ = watched_page
    found = _found()
    first = found.mistakes_first()[0]
    other = next(c for c in found.confusions() if (c["true"], c["predicted"]) != (first.true_class, first.predicted))
    classes, _ = found.confusion_matrix()
    _nav(pg, "Mistakes first", "Mistakes first")
    _main(pg).get_by_text("The demo's held-out images", exact=True).click()
    pg.get_by_label("Images per class (0: all)").fill("5")
    pg.get_by_label("Images per class (0: all)").press("Enter")
    _idle(pg)
    pg.get_by_role("button", name="Predict the folder").click()
    pg.get_by_role("heading", name="Why A and not B?").wait_for(timeout=120_000)
    _idle(pg)
    title = _main(pg).get_by_role("heading", name="The model prefers")
    assert f"{found.name(first.predicted)} over {found.name(first.true_class)}" in title.inner_text()

    matrix = _main(pg).get_by_test_id("stPlotlyChart").first
    matrix.scroll_into_view_if_needed()
    cell = matrix.locator(".scatterlayer .point").nth(len(classes) * classes.index(other["true"])
                                                       + classes.index(other["predicted"]))
    cell.click(force=True)  # the square is clear: Plotly's own layer above it takes the click
    expected = f"The model prefers {other['predicted_name']} over {other['true_name']}"
    _main(pg).get_by_role("heading", name=expected).wait_for(timeout=60_000)
    _idle(pg)
    assert pg.get_by_role("combobox", name="A (the model's choice)").input_value().startswith(other["predicted_name"])
    assert pg.get_by_role("combobox", name="B (the class it was not)").input_value().startswith(other["true_name"])
    assert pg.locator("[data-testid='stException']").count() == 0
    _shot(pg, "11-confusion-cell")
