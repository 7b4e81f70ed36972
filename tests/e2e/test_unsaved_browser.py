"""In a real browser: notes that could not be saved yet (the shipped demo run is read-only)
make a reload ask first (the browser's beforeunload prompt); once the run is saved, and the
notes with it, a reload goes ahead without asking. Same server and skips as ``test_browser.py``."""
from __future__ import annotations

import pytest
from test_browser import _choose, _idle, _main, _nav, open_page, server, sync_api  # noqa: F401 - server: the page fixture's


@pytest.fixture(scope="module")
def unsaved_page(server):  # noqa: F811 - the fixture imported above
    with open_page(server) as pg:
        yield pg


def _reload(pg, dialogs: list) -> None:
    """Reload; a beforeunload prompt is recorded and dismissed (the page then stays as it was)."""
    def answer(dialog):
        dialogs.append(dialog.type)
        dialog.dismiss()

    pg.on("dialog", answer)
    try:
        pg.reload(timeout=5_000)
    except sync_api.TimeoutError:  # the prompt was dismissed: no new page loads
        pass
    finally:
        pg.remove_listener("dialog", answer)


def test_unsaved_notes_ask_before_a_reload_and_saved_ones_do_not(unsaved_page):
    pg = unsaved_page
    _main(pg).get_by_text("Doctor's verdict").wait_for()
    _idle(pg)
    _nav(pg, "Class browser", "Class browser")
    _choose(pg, "Class (type to search)", "Bag", "Bag (8)").click()
    _main(pg).get_by_text("(class 8)").wait_for()
    _idle(pg)
    dialogs = []
    _reload(pg, dialogs)  # nothing unsaved yet: no prompt
    assert dialogs == []
    pg.get_by_role("heading", name="Class browser").first.wait_for()
    _main(pg).get_by_text("(class 8)").wait_for()
    _idle(pg)

    _main(pg).get_by_text("Your notes: name, describe and flag this prototype").first.click()
    form = pg.locator("[data-testid='stForm']").first
    form.get_by_label("Name").wait_for()  # the expander open and the page settled before typing
    _idle(pg)
    form.get_by_label("Name").fill("strap")
    form.get_by_role("button", name="Save the note").click()
    # the demo run is read-only (a loaded machine may take long to rerun the page)
    _main(pg).get_by_text("Note kept for this session", exact=False).wait_for(timeout=180_000)
    _idle(pg)
    _reload(pg, dialogs)
    assert dialogs == ["beforeunload"]
    assert _main(pg).get_by_text("Prototype 1 “strap”", exact=True).count() == 1  # dismissed: nothing lost

    _nav(pg, "Discover", "Discover part-prototypes")
    name_box = pg.get_by_label("Name (saved in your private workspace", exact=False)
    name_box.fill("kept-before-leaving")
    name_box.press("Enter")
    _idle(pg)
    pg.get_by_role("button", name="Save run").click()
    _main(pg).get_by_text("Saved to").wait_for()  # the notes are written beside the saved run
    _idle(pg)
    dialogs.clear()
    _reload(pg, dialogs)
    assert dialogs == []
    pg.get_by_role("heading", name="Discover part-prototypes").first.wait_for()
    _idle(pg)
    _nav(pg, "Class browser", "Class browser")
    _choose(pg, "Class (type to search)", "Bag", "Bag (8)").click()
    _main(pg).get_by_text("Prototype 1 “strap”", exact=True).wait_for()  # reopened from the URL, notes saved
