"""The command line on a user's own architecture: doctor, discover, certify, explain."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import TinyNet
from safetensors.torch import save_file


def _phpn(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "phpn", *map(str, args)], capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stderr)
    return proc


@pytest.fixture
def user_model(tmp_path):
    source = tmp_path / "tiny.py"
    source.write_text(textwrap.dedent('''
        import torch
        from torch import nn
        import torch.nn.functional as F

        class Net(nn.Module):
            def __init__(self, num_classes=4):
                super().__init__()
                self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                                          nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU())
                self.drop = nn.Dropout(0.2)
                self.classifier = nn.Linear(8, num_classes)

            def forward(self, x):
                x = F.adaptive_avg_pool2d(self.body(x), 1).flatten(1)
                return self.classifier(self.drop(x))
    '''))
    torch.manual_seed(0)
    reference = TinyNet()
    state = {"body.0.weight": reference.features[0].weight, "body.0.bias": reference.features[0].bias,
             "body.2.weight": reference.features[2].weight, "body.2.bias": reference.features[2].bias,
             "classifier.weight": reference.fc.weight, "classifier.bias": reference.fc.bias}
    checkpoint = tmp_path / "tiny.safetensors"
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(checkpoint))
    return ["--checkpoint", checkpoint, "--model-def", f"{source}:Net", "--resize", "16", "--crop", "16"]


@pytest.mark.slow
def test_doctor_discover_certify_explain(user_model, image_folder, tmp_path):
    doctor = json.loads(_phpn("doctor", *user_model, "--json").stdout)
    assert doctor["verdict"] == "exact"

    out = tmp_path / "run"
    found = json.loads(_phpn("discover", *user_model, "--data", image_folder, "--k", "2", "--out", out,
                             "--device", "cpu", "--quiet", "--json").stdout)
    assert found["classes"] == 4 and found["k"] == 2
    assert found["certificate"]["passed"] and found["certificate"]["top1_agreement"] == 1.0
    assert json.loads((out / "run.json").read_text())["format_version"] == 2

    cert = json.loads(_phpn("certify", out, *user_model, "--data", image_folder, "--device", "cpu", "--json").stdout)
    assert cert["images"] == 48 and cert["passed"]

    image = image_folder / "2" / "img00.png"
    explained = json.loads(_phpn("explain", out, image, *user_model, "--class", "2", "--json").stdout)
    assert explained["class"] == 2 and len(explained["prototypes"]) == 2
    # Completeness: the prototypes' contributions plus the bias give the class logit.
    assert explained["contributions_plus_bias"] == pytest.approx(explained["logit"], abs=1e-5)
    top_logits = [t["logit"] for t in explained["top"]]
    assert len(top_logits) == 4 and top_logits == sorted(top_logits, reverse=True)


@pytest.mark.slow
def test_errors_are_one_clear_line(tmp_path, image_folder):
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"this is not a checkpoint")
    proc = _phpn("doctor", "--checkpoint", bad, check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    proc = _phpn("discover", "--out", tmp_path / "x", check=False)
    assert proc.returncode == 2 and "Pass --checkpoint PATH or --demo NAME" in proc.stderr
    proc = _phpn("discover", "--demo", "no-such-demo", "--out", tmp_path / "x", "--json", check=False)
    assert proc.returncode == 2 and "error" in json.loads(proc.stdout)


@pytest.mark.slow
def test_every_subcommand_has_help():
    for command in ("discover", "certify", "explain", "doctor", "evaluate"):
        assert "usage: python -m phpn " + command in _phpn(command, "--help").stdout


def test_help_version_and_argument_errors_import_nothing_heavy():
    # Each answers from the parser alone: no torch, numpy or Pillow, so they return at once.
    for args in (["--help"], ["--version"], ["discover", "--k", "x", "--out", "x"], []):
        proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "phpn", *args], capture_output=True,
                              text=True, timeout=120)
        imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
        assert not imported & {"torch", "numpy", "PIL"}, args
        assert "phpn.config" in imported and "phpn.cli" in imported
    assert _phpn("--version").stdout.strip().startswith("phpn ")


@pytest.mark.slow
def test_json_errors_carry_type_and_exit_code(tmp_path):
    # An argument error is a JSON object on stdout too, with argparse's exit code.
    proc = _phpn("discover", "--k", "x", "--out", tmp_path / "x", "--json", check=False)
    assert proc.returncode == 2
    assert json.loads(proc.stdout) == {
        "error": "argument --k: expected a whole number or 'auto', got 'x' (see python -m phpn discover --help)",
        "type": "UsageError", "exit_code": 2}
    proc = _phpn("doctor", "--json", check=False)
    assert proc.returncode == 2
    assert json.loads(proc.stdout) == {"error": "No model given. Pass --checkpoint PATH or --demo NAME.",
                                       "type": "PhpnError", "exit_code": 2}
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_explain_into_a_folder_resumes_and_overwrites(tmp_path, image_folder, user_model):
    out = tmp_path / "run"
    _phpn("discover", *user_model, "--data", image_folder, "--k", "2", "--out", out, "--device", "cpu", "--quiet")
    explained = tmp_path / "explained"
    first = json.loads(_phpn("explain", out, image_folder / "0", *user_model, "--out", explained, "--json").stdout)
    assert first["explained"] == 12
    summary = json.loads((explained / "explanations.json").read_text())
    order = [e["image"] for e in summary["explained"]]
    assert summary["complete"] and len(order) == 12
    # An interruption: the last pages not written, the summary as it was mid-way.
    kept = summary["explained"][:5]
    for entry in summary["explained"][5:]:
        (explained / entry["png"]).unlink()
        (explained / entry["html"]).unlink()
    (explained / "explanations.json").write_text(json.dumps({**summary, "explained": kept, "complete": False}))
    stamp = {e["png"]: (explained / e["png"]).stat().st_mtime_ns for e in kept}
    resumed = json.loads(_phpn("explain", out, image_folder / "0", *user_model, "--out", explained, "--resume",
                               "--json").stdout)
    assert resumed["explained"] == 12
    assert {e["png"]: (explained / e["png"]).stat().st_mtime_ns for e in kept} == stamp  # not redone
    again = json.loads((explained / "explanations.json").read_text())
    assert again["complete"] and [e["image"] for e in again["explained"]] == order
    assert len(list(explained.iterdir())) == 2 * 12 + 1
    # --overwrite replaces phpn's own folder: pages of images no longer asked for go.
    _phpn("explain", out, image_folder / "2" / "img00.png", *user_model, "--out", explained, "--overwrite")
    assert sorted(p.name for p in explained.iterdir()) == ["explanations.json", "img00.html", "img00.png"]
    # Anything phpn did not write stops it, --overwrite or not.
    (explained / "notes.txt").write_text("mine")
    proc = _phpn("explain", out, image_folder / "2" / "img00.png", *user_model, "--out", explained, "--overwrite",
                 check=False)
    assert proc.returncode == 2 and "also holds files phpn did not write (notes.txt)" in proc.stderr
    assert (explained / "notes.txt").read_text() == "mine"
    # One format alone: pages only, and resuming asks for pages only.
    pages = tmp_path / "pages"
    done = _phpn("explain", out, image_folder / "0", *user_model, "--out", pages, "--formats", "html").stdout
    assert done.startswith(f"explained 12 of 12 images into {pages} (HTML each; summary in explanations.json)")
    assert sorted(p.suffix for p in pages.iterdir()) == [".html"] * 12 + [".json"]
    summary = json.loads((pages / "explanations.json").read_text())
    assert summary["formats"] == ["html"] and all("png" not in e and e["html"].endswith(".html")
                                                   for e in summary["explained"])
    stamp = {p.name: p.stat().st_mtime_ns for p in pages.glob("*.html")}
    _phpn("explain", out, image_folder / "0", *user_model, "--out", pages, "--formats", "html", "--resume")
    assert {p.name: p.stat().st_mtime_ns for p in pages.glob("*.html")} == stamp  # nothing redone
