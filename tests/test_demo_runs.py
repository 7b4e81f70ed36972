"""The shipped demo runs load, certify, and are reproduced by a live discovery."""
import json
import subprocess
import sys

import pytest

from phpn.api import certify_run, open_data, open_model, open_run
from phpn.demos import get_demo
from phpn.runs.store import load_run


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fashion-mnist", "imagenet-lite0"])
def test_shipped_run_loads_and_certifies(name):
    demo = get_demo(name)
    session = open_model(demo=name)
    run = open_run(demo.run_dir, session)
    assert run.meta["certificate"]["passed"]
    held_out = demo.explain_dir() or demo.discovery_dir()
    data = open_data(session, held_out)
    cert = certify_run(session, run, data, device="cpu")
    assert cert.top1_agreement == 1.0 and cert.passed
    assert cert.images == sum(len(c.paths) for c in data.classes)


@pytest.mark.slow
def test_live_discovery_reproduces_the_shipped_fashion_run(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "phpn", "discover", "--demo", "fashion-mnist", "--out", str(out),
                           "--device", "cpu", "--quiet", "--json"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    live = json.loads(proc.stdout)["certificate"]
    shipped = json.loads((get_demo("fashion-mnist").run_dir / "run.json").read_text())["certificate"]
    assert live["images"] == shipped["images"] == 1000
    assert live["top1_agreement"] == shipped["top1_agreement"] == 1.0
    assert live["passed"] and live["max_logit_diff"] == pytest.approx(shipped["max_logit_diff"], rel=0.5, abs=1e-5)
    live_meta = load_run(out).meta  # format 2: the class records are in the shards
    shipped_meta = load_run(get_demo("fashion-mnist").run_dir).meta
    for a, b in zip(live_meta["classes"], shipped_meta["classes"]):
        assert a["fidelity"] == pytest.approx(b["fidelity"], abs=0.02)
