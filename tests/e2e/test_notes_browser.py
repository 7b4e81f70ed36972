"""In a real browser: name and flag a prototype, reload the page (F5), and find the run, the
class and the note again; the note reaches the class report. Same server and skips as
``test_browser.py``."""
from __future__ import annotations

import pytest
from test_browser import _choose, _idle, _main, _nav, _shot, open_page, server  # noqa: F401 - server: the page fixture's


@pytest.fixture(scope="module")
def notes_page(server):  # noqa: F811 - the fixture imported above
    with open_page(server, accept_downloads=True) as pg:
        yield pg


def test_a_named_prototype_survives_a_reload_and_reaches_the_report(notes_page):
    pg = notes_page
    _main(pg).get_by_text("Doctor's verdict").wait_for()
    _idle(pg)
    # The shipped demo run is read-only: save a copy to annotate.
    _nav(pg, "Discover", "Discover part-prototypes")
    name_box = pg.get_by_label("Name (saved in your private workspace", exact=False)
    name_box.fill("annotated-in-browser")
    name_box.press("Enter")
    _idle(pg)
    pg.get_by_role("button", name="Save run").click()
    _main(pg).get_by_text("Saved to").wait_for()
    _idle(pg)

    _nav(pg, "Class browser", "Class browser")
    _choose(pg, "Class (type to search)", "Bag", "Bag (8)").click()
    _main(pg).get_by_text("(class 8)").wait_for()
    _idle(pg)
    _main(pg).get_by_text("Your notes: name, describe and flag this prototype").first.click()
    form = pg.locator("[data-testid='stForm']").first
    form.get_by_label("Name").fill("handle")
    form.get_by_label("Another flag (your own word)").fill("background")
    form.get_by_role("button", name="Save the note").click()
    _main(pg).get_by_text("Note saved beside the run.").wait_for()
    _idle(pg)
    assert "run=my+runs" in pg.url.replace("%20", "+") and "class=8" in pg.url

    pg.reload()  # F5: a new session from the same URL
    pg.get_by_role("heading", name="Class browser").first.wait_for()
    _main(pg).get_by_text("(class 8)").wait_for()
    _idle(pg)
    header = _main(pg).get_by_text("Prototype 1 “handle”", exact=True)
    header.wait_for()
    assert _main(pg).get_by_text("background", exact=True).count() > 0
    assert pg.locator("[data-testid='stException']").count() == 0
    header.scroll_into_view_if_needed()
    _idle(pg)
    _shot(pg, "12-class-browser-notes")

    _nav(pg, "Export", "Export")
    pg.get_by_role("button", name="Build the class report").click()
    download_button = pg.get_by_role("button", name="Download the class report (.html)")
    download_button.wait_for()
    with pg.expect_download() as info:
        download_button.click()
    html_text = open(info.value.path(), encoding="utf-8").read()
    assert "prototype 1 “handle”" in html_text and "Flagged: <b>background</b>" in html_text


def test_every_prototype_map_is_visible_on_natural_photos(notes_page):
    """The ImageNet demo on real photos: the Explain page draws every prototype on its own
    scale (the screenshot shows them), and the Class browser zooms the top patches."""
    pg = notes_page
    _nav(pg, "Model & data", "Model & data")
    _choose(pg, "Demo", "ImageNet", "ImageNet: EfficientNet-Lite0 on a few real photos").click()
    _idle(pg)
    pg.get_by_role("button", name="Load this demo").click()
    _main(pg).get_by_text("Loaded the imagenet-lite0 demo.").wait_for(timeout=120_000)
    _idle(pg)
    _nav(pg, "Explain an image", "Explain an image")
    _choose(pg, "Class folder", "espresso", "967_espresso").click()
    _main(pg).get_by_text("All prototypes, each on its own scale").wait_for()
    _idle(pg)
    assert _main(pg).get_by_text("Where, on this image: full colour =").count() == 3
    assert pg.locator("[data-testid='stException']").count() == 0
    _main(pg).get_by_text("All prototypes, each on its own scale").scroll_into_view_if_needed()
    _idle(pg)
    _shot(pg, "13-explain-natural-photo")
    _nav(pg, "Class browser", "Class browser")
    _main(pg).get_by_text("each zoomed beside its image").first.wait_for()
    _idle(pg)
    _shot(pg, "14-class-browser-natural-photos")
