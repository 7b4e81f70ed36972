"""In a real browser: the Audit page on the demo's held-out images (the ranking, its summary and
the top prototype's reasons beside the baselines), then the Compare page against the demo's own
saved run (every prototype paired with itself). Same server and skips as ``test_browser.py``."""
from __future__ import annotations

from test_browser import _choose, _idle, _main, _nav, _shot, page, server  # noqa: F401


def test_audit_and_compare_pages(page):  # noqa: F811 - the fixture imported above
    pg = page
    _main(pg).get_by_text("Doctor's verdict").wait_for()
    _idle(pg)

    _nav(pg, "Audit", "Audit")
    _main(pg).get_by_text("The demo's held-out images").click()
    pg.get_by_label("Images per class").fill("4")
    pg.get_by_label("Images per class").press("Enter")
    _idle(pg)
    pg.get_by_role("button", name="Audit the prototypes").click()
    pg.get_by_role("button", name="Download the audit (.json)").wait_for(timeout=180_000)
    _idle(pg)
    summary = _main(pg).get_by_text("prototypes stand out: they score above every random-direction baseline").or_(
        _main(pg).get_by_text("Nothing stands out")).first
    assert summary.is_visible()
    assert _main(pg).get_by_text("40 labelled images, up to 4 per class.").is_visible()
    assert pg.locator("[data-testid='stException']").count() == 0
    _shot(pg, "audit")

    _nav(pg, "Compare runs", "Compare two runs")
    _choose(pg, "The other run", "fashion", "demo / fashion-mnist").click()
    _idle(pg)
    pg.get_by_role("button", name="Compare").click()
    pg.get_by_role("button", name="Download the comparison (.json)").wait_for(timeout=180_000)
    _idle(pg)
    assert _main(pg).get_by_text("30 of 30 prototypes of this run matched one-to-one").is_visible()
    assert pg.locator("[data-testid='stException']").count() == 0
    _shot(pg, "compare")
