"""Two browsers against one server started as ``phpn app`` starts it (``serve.py``: the
browser key is an HttpOnly cookie): the second browser that opens the first one's URL gets
the view, never the files; a share link opens one run read-only; a revoked link is refused;
a reload of the first browser finds its own run again. Same skips as ``test_browser.py``."""
from __future__ import annotations

import pytest
from test_browser import CHROMIUM, CHROMIUM_ARGS, _idle, _main, _nav, serve_app, sync_api


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    yield from serve_app(tmp_path_factory, "e2e-sessions", script="serve.py")


def _sidebar(pg):
    return pg.get_by_test_id("stSidebar")


def _key_cookie(context) -> dict:
    return next(c for c in context.cookies() if c["name"] == "phpn_key")


def test_two_browsers_a_share_link_and_its_revocation(served):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        alice_ctx, bob_ctx = (browser.new_context(viewport={"width": 1440, "height": 1300}) for _ in range(2))
        alice, bob = alice_ctx.new_page(), bob_ctx.new_page()
        for pg in (alice, bob):
            pg.set_default_timeout(60_000)

        alice.goto(served)
        _main(alice).get_by_text("Doctor's verdict").wait_for()
        _idle(alice)
        cookie = _key_cookie(alice_ctx)
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        assert alice.evaluate("document.cookie").find("phpn_key") == -1  # no script on the page can read it

        _nav(alice, "Discover", "Discover part-prototypes")
        name_box = alice.get_by_label("Name (saved in your private workspace", exact=False)
        name_box.fill("alices-run")
        name_box.press("Enter")
        _idle(alice)
        alice.get_by_role("button", name="Save run").click()
        _main(alice).get_by_text("Saved to").wait_for()
        _idle(alice)
        assert "run=my+runs" in alice.url.replace("%20", "+") and "session" not in alice.url
        alices_url = alice.url

        # B opens A's URL: its own session and the demo, none of A's runs.
        bob.goto(alices_url)  # A's Discover page
        _sidebar(bob).get_by_text("Model: demo: fashion-mnist", exact=False).wait_for()
        _idle(bob)
        assert _key_cookie(bob_ctx)["value"] != cookie["value"]
        _sidebar(bob).get_by_text("The link's run could not be opened", exact=False).wait_for()
        assert _sidebar(bob).get_by_text("alices-run", exact=False).count() == 0
        assert "alices-run" not in _sidebar(bob).inner_text()

        # A's share link opens that run read-only in B.
        _sidebar(alice).get_by_text("Share", exact=True).click()
        alice.get_by_role("button", name="Copy a link to this view").click()
        code = _sidebar(alice).locator("[data-testid='stCode'] code").first
        code.wait_for()
        link = code.inner_text().strip()
        assert "?view=" in link and cookie["value"] not in link
        bob.goto(link)
        _sidebar(bob).get_by_text("A read-only view of a run shared with you", exact=False).wait_for()
        _idle(bob)
        assert "shared with you read-only (alices-run)" in _sidebar(bob).inner_text()
        assert bob.locator("[data-testid='stException']").count() == 0

        # Revoked: the link is refused with a sentence.
        _idle(alice)
        alice.get_by_role("button", name="Revoke").click()
        _sidebar(alice).get_by_text("is revoked", exact=False).wait_for()
        bob.goto(link)
        _sidebar(bob).get_by_text("This shared link has been revoked", exact=False).wait_for()
        _idle(bob)
        assert "alices-run" not in _sidebar(bob).inner_text()

        # A's reload finds A's run again (the cookie, not the URL).
        alice.reload()
        _sidebar(alice).get_by_text("my files/runs/alices-run", exact=False).wait_for()
        assert bob.locator("[data-testid='stException']").count() == 0
        for ctx in (alice_ctx, bob_ctx):
            ctx.close()
        browser.close()
