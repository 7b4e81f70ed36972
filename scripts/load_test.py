"""Several visitors discovering while one browses: how long the browsing visitor waits.

    python scripts/load_test.py [--discoverers 3] [--slots 1] [--cap 30] [--switches 12]

Drives the app headless (Streamlit's AppTest, one server process as in production): each
discovering visitor starts a discovery of the fashion-mnist demo (k = 3, --cap images per
class) and the browsing visitor then switches between the read-only pages, timing each page
switch. ``--slots`` is the server's PHPN_MAX_DISCOVERIES (the queue's width). Prints the page
times (median and max) and, per discovery, its time in the queue and in all.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("STREAMLIT_LOGGER_LEVEL", "error")  # no "no runtime found" chatter from AppTest
BROWSE = ["pages/classes.py", "pages/explain.py", "pages/model.py", "pages/discover.py"]


def _visitor():
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=600).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _browse(at, switches: int) -> list:
    times = []
    for i in range(switches):
        page = BROWSE[i % len(BROWSE)]
        start = time.perf_counter()
        at.switch_page(page).run()
        times.append(time.perf_counter() - start)
        assert not at.exception, [e.value for e in at.exception]
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--discoverers", type=int, default=3)
    parser.add_argument("--slots", type=int, default=1, help="discoveries at once (PHPN_MAX_DISCOVERIES)")
    parser.add_argument("--cap", type=int, default=30, help="images per class of each discovery")
    parser.add_argument("--switches", type=int, default=12, help="page switches of the browsing visitor")
    args = parser.parse_args(argv)
    os.environ["PHPN_MAX_DISCOVERIES"] = str(args.slots)
    os.environ.setdefault("PHPN_UPLOAD_DIR", tempfile.mkdtemp(prefix="phpn-load-"))

    browser = _visitor()
    quiet = _browse(browser, args.switches)  # the same pages with nobody discovering
    discoverers = [_visitor() for _ in range(args.discoverers)]
    for at in discoverers:
        at.switch_page("pages/discover.py").run()
        at.slider(key="disc_k").set_value(3)
        at.number_input(key="disc_cap").set_value(args.cap)
        at.button(key="FormSubmitter:discover_form-Start discovery").click().run()
    jobs = [at.session_state["job"] for at in discoverers]
    busy = _browse(browser, args.switches)
    for job in jobs:
        job.wait(1800)
    print(f"{args.discoverers} visitors discovering (k=3, {args.cap} images per class, {args.slots} at a time), "
          f"one browsing ({args.switches} page switches):")
    for label, times in (("nobody discovering", quiet), ("while they discover", busy)):
        print(f"  page switch, {label}: median {statistics.median(times):.2f} s, max {max(times):.2f} s")
    for i, job in enumerate(jobs, 1):
        wall = job.wall_times()
        print(f"  discovery {i}: {job.status}, queued {wall['queued']:.1f} s, total {wall['total']:.1f} s")
    return 0 if all(job.status == "done" for job in jobs) else 1


if __name__ == "__main__":
    sys.exit(main())
