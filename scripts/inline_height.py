"""How tall an explanation shows in a notebook (``_repr_html_``, the details folded) against the
full page (``to_html()``), in Chromium at 1,000 px wide: the fashion-mnist demo's run on its
first held-out image (28 x 28).

    PYTHONPATH=. python scripts/inline_height.py
"""
import tempfile
from pathlib import Path

from playwright.sync_api import sync_playwright

import phpn
from phpn.demos import get_demo


def height(browser, html: str) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        page_file = Path(tmp) / "page.html"
        page_file.write_text(html, encoding="utf-8")
        page = browser.new_page(viewport={"width": 1000, "height": 200})
        page.goto(page_file.as_uri())
        tall = int(page.evaluate("document.documentElement.scrollHeight"))
        page.close()
    return tall


def main() -> None:
    demo = get_demo("fashion-mnist")
    run = phpn.open_run(demo.run_dir)
    image = sorted(p for p in demo.explain_dir().rglob("*.png"))[0]
    explanation = run.explain(image)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        inline = height(browser, f"<html><body>{explanation._repr_html_()}</body></html>")
        full = height(browser, explanation.to_html())
        browser.close()
    print(f"{image.name}: inline {inline} px, full page {full} px ({inline / full:.2f} x)")


if __name__ == "__main__":
    main()
