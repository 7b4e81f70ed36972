"""A catalogue of bad inputs: each gets one clear line (exit 2) and nothing is lost.

Every case builds its inputs in its own folder, runs the command line in-process (or the
library function a server calls), checks the key phrase of the message, and then checks that
every file that existed before, the case's own and the shared model/run/images, is still
there with the same bytes.
"""
from __future__ import annotations

import io
import json
import shutil
import textwrap
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TinyNet, tiny_split
from PIL import Image
from safetensors.torch import load_file, save_file

from phpn.cli import main
from phpn.errors import DataError
from phpn.models.checkpoint import file_sha256
from phpn.runs.record import RunRecord
from phpn.runs.store import META, file_metadata

MODEL_SOURCE = textwrap.dedent('''
    import torch
    from torch import nn
    import torch.nn.functional as F

    class Net(nn.Module):
        def __init__(self, num_classes=4):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU())
            self.classifier = nn.Linear(8, num_classes)

        def forward(self, x):
            return self.classifier(F.adaptive_avg_pool2d(self.body(x), 1).flatten(1))
''')


def _state(model: TinyNet) -> dict:
    return {"body.0.weight": model.features[0].weight, "body.0.bias": model.features[0].bias,
            "body.2.weight": model.features[2].weight, "body.2.bias": model.features[2].bias,
            "classifier.weight": model.fc.weight, "classifier.bias": model.fc.bias}


def _images(root: Path, folders, per_class: int = 3, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for name in folders:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            arr = rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / name / f"img{i}.png")
    return root


class World:
    """The shared, valid inputs: a user's model file and checkpoint, images, and a saved run."""

    def __init__(self, root: Path):
        self.root = root
        self.source = root / "net.py"
        self.source.write_text(MODEL_SOURCE)
        torch.manual_seed(0)
        self.state = {k: v.detach().contiguous() for k, v in _state(TinyNet()).items()}
        self.checkpoint = root / "net.safetensors"
        save_file(self.state, str(self.checkpoint))
        self.images = _images(root / "images", ["0", "1", "2", "3"])
        self.run = root / "run"
        code = main([str(a) for a in ["discover", *self.model, "--data", self.images, "--k", "2", "--solver",
                                      "none", "--device", "cpu", "--out", self.run, "--quiet"]])
        assert code == 0

    @property
    def model(self) -> list:
        return self.model_with(self.checkpoint)

    def model_with(self, checkpoint) -> list:
        return ["--checkpoint", checkpoint, "--model-def", f"{self.source}:Net", "--resize", "16", "--crop", "16"]

    def discover(self, tmp: Path, *extra, out=None, checkpoint=None) -> list:
        return ["discover", *self.model_with(checkpoint or self.checkpoint), "--data", self.images, "--k", "2",
                "--solver", "none", "--device", "cpu", "--quiet", "--out", out or tmp / "out", *extra]

    def copy_run(self, tmp: Path) -> Path:
        return Path(shutil.copytree(self.run, tmp / "run"))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return World(tmp_path_factory.mktemp("world"))


def _snapshot(*roots) -> dict:
    files = {}
    for root in roots:
        for p in sorted(Path(root).rglob("*")):
            if p.is_file() and not p.is_symlink():
                files[str(p)] = p.read_bytes()
    return files


def _cli(capsys, argv) -> tuple:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _shard(run: Path) -> dict:
    """The first shard of a saved run (the tiny runs have one): its files and checksums."""
    return json.loads((run / META).read_text())["shards"][0]


def _rewrite_run(run: Path, *, meta=None, tensors=None, records=None, checksum=True) -> None:
    m = json.loads((run / META).read_text())
    shard = m["shards"][0]
    if records is not None:
        (run / shard["records"]).write_text(json.dumps(records(json.loads((run / shard["records"]).read_text()))))
    if tensors is not None or records is not None:  # as a forger would: the shard names its run and records
        current = load_file(str(run / shard["file"]))
        (tensors or (lambda t: None))(current)
        save_file(current, str(run / shard["file"]), metadata=file_metadata(
            run=m["seal"]["id"], records_sha256=file_sha256(run / shard["records"])))
    if checksum:
        shard["sha256"] = file_sha256(run / shard["file"])
        shard["records_sha256"] = file_sha256(run / shard["records"])
        m = RunRecord.from_dict(m).sealed().to_dict()  # and run.json sealed again
    if meta is not None:
        meta(m)
    (run / META).write_text(json.dumps(m))


def _write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return path


# ---------------------------------------------------------------- the cases: (id, build(world, tmp) -> argv, phrase)

def _param(flags, phrase):
    return lambda w, t: w.discover(t, *flags), phrase


PARAMETERS = {
    "batch-size-0": _param(["--batch-size", "0"], "--batch-size must be a whole number of at least 1, got 0"),
    "batch-size-negative": _param(["--batch-size", "-5"], "--batch-size must be a whole number of at least 1, got -5"),
    "seed-negative": _param(["--seed", "-1"], "The seed -1 is out of range. Use a whole number from 0 to 4294967295"),
    "seed-2**32": _param(["--seed", str(2 ** 32)], "The seed 4294967296 is out of range"),
    "seed-huge": _param(["--seed", str(10 ** 30)], f"The seed {10 ** 30} is out of range"),
    "device-meta": _param(["--device", "meta"], "Unknown device 'meta'. Use auto, cpu, cuda or cuda:N"),
    "device-xla": _param(["--device", "xla"], "Unknown device 'xla'"),
    "device-cuda-word": _param(["--device", "cuda:first"], "Unknown device 'cuda:first'"),
    "device-upper-case": _param(["--device", "CPU"], "Unknown device 'CPU'"),
    "mean-nan": _param(["--mean", "nan", "0", "0"], "--mean must be finite numbers, got nan"),
    "mean-inf": _param(["--mean", "0", "inf", "0"], "--mean must be finite numbers, got inf"),
    "std-nan": _param(["--std", "nan", "1", "1"], "--std must be finite numbers, got nan"),
    "std-inf": _param(["--std", "1", "1", "inf"], "--std must be finite numbers, got inf"),
    "std-overflowing": _param(["--std", "1e400", "1", "1"], "--std must be finite numbers, got inf"),
    "std-zero": _param(["--std", "0", "1", "1"], "std values must be positive"),
    "std-negative": _param(["--std", "-1", "1", "1"], "std values must be positive"),
    "mean-wrong-count": _param(["--mean", "0.5"], "mean and std need 3 values each (one per input channel), got 1 and 3"),
    "k-0": _param(["--k", "0"], "--k must be a whole number of at least 1, got 0"),
    "k-21": _param(["--k", "21"], "k = 21 is out of range. Choose between 1 and 20"),
    "images-per-class-0": _param(["--images-per-class", "0"], "--images-per-class must be a whole number of at least 1"),
    "resize-below-crop": _param(["--resize", "8"], "resize (8) must be at least crop (16)"),
    "crop-0": _param(["--crop", "0"], "--crop must be a whole number of pixels from 1 to 4096, got 0"),
    "demo-and-checkpoint": (lambda w, t: ["discover", "--demo", "fashion-mnist", "--checkpoint", w.checkpoint,
                                          "--out", t / "out"], "A demo brings its own model"),
    "demo-and-model-def": (lambda w, t: ["doctor", "--demo", "fashion-mnist", "--model-def", f"{w.source}:Net"],
                           "cannot be combined with a checkpoint, --arch or --model-def"),
    "unknown-demo": (lambda w, t: ["doctor", "--demo", "mnist"], "There is no built-in demo called 'mnist'"),
    "no-model": (lambda w, t: ["discover", "--out", t / "out"], "No model given. Pass --checkpoint PATH or --demo NAME"),
    "num-classes-mismatch": (lambda w, t: ["doctor", *w.model, "--num-classes", "7"],
                             "classifier.weight is (4, 8) but the model has (7, 8)"),
    "num-classes-mismatch-demo": (lambda w, t: ["doctor", "--demo", "fashion-mnist", "--num-classes", "7"],
                                  "You asked for 7 classes but the demo fashion-mnist has 10"),
    "no-data": (lambda w, t: ["discover", *w.model, "--out", t / "out"], "No image folder given"),
    "crop-huge": (lambda w, t: ["doctor", *w.model, "--resize", "100000", "--crop", "100000"],
                  "--resize must be a whole number of pixels from 1 to 4096, got 100000"),
    "check-preprocessing-huge-size": (lambda w, t: ["check-preprocessing", *w.model, "--data", w.images,
                                                    "--sizes", "32", "100000"],
                                      "--sizes must be a whole number of pixels from 1 to 4096, got 100000"),
    "feature-layer-unknown": (lambda w, t: ["doctor", *w.model, "--feature-layer", "nosuch"],
                              "The model has no layer named 'nosuch' (--feature-layer)"),
}


def _existing_run(w, t, *, extra=None, overwrite=True):
    run = w.copy_run(t)
    if extra:
        _write(run / extra, "the user's own file")
    return w.discover(t, *(["--overwrite"] if overwrite else []), out=run)


def _symlink_out(w, t):
    (t / "real").mkdir()
    (t / "link").symlink_to(t / "real")
    return w.discover(t, out=t / "link")


OUTPUTS = {
    "out-is-a-file": (lambda w, t: w.discover(t, out=_write(t / "notes.txt", "my notes")),
                      "notes.txt exists and is a file, not a phpn run; phpn will not replace it"),
    "out-is-a-folder-of-files": (lambda w, t: w.discover(t, out=_write(t / "work" / "thesis.tex", "x").parent),
                                 "is a folder that is not a phpn run (it holds thesis.tex)"),
    "out-is-a-git-repository": (lambda w, t: w.discover(t, out=_write(t / "repo" / ".git" / "HEAD", "ref").parent.parent),
                                "is a folder that is not a phpn run (it holds .git)"),
    "out-has-a-hidden-file": (lambda w, t: w.discover(t, out=_write(t / "d" / ".DS_Store", "x").parent),
                              "is a folder that is not a phpn run (it holds .DS_Store)"),
    "out-is-a-run-without-overwrite": (lambda w, t: _existing_run(w, t, overwrite=False),
                                       "already holds a phpn run. Choose a new folder, or replace it on purpose (--overwrite"),
    "out-is-a-run-with-foreign-files": (lambda w, t: _existing_run(w, t, extra="results.csv"),
                                        "also holds files phpn did not write (results.csv)"),
    "out-is-a-run-with-notes": (lambda w, t: _existing_run(w, t, extra="annotations.json"),
                                "carries prototype notes (annotations.json)"),
    "out-under-a-file": (lambda w, t: w.discover(t, out=_write(t / "f.txt", "x") / "run"),
                         "f.txt is a file, not a folder"),
    "out-is-a-link": (_symlink_out, "is a symbolic link; phpn does not write runs through links"),
}


def _names(data):
    return lambda w, t: [*w.discover(t), "--class-names", _write(t / "names.txt", data)]


CLASS_NAMES = {
    "names-missing-file": (lambda w, t: [*w.discover(t), "--class-names", t / "nope.txt"],
                           "nope.txt does not exist or is not a file"),
    "names-a-folder": (lambda w, t: [*w.discover(t), "--class-names", t], "does not exist or is not a file"),
    "names-binary-png": (_names(b"\x89PNG\r\n\x1a\n" + bytes(range(256))), "is not UTF-8 text (byte 0 cannot be decoded)"),
    "names-latin-1": (_names("red\ngreen\nblue\ncaf\xe9".encode("latin-1")), "is not UTF-8 text"),
    "names-nul-bytes": (_names(b"red\x00\ngreen\nblue\ngrey\n"), "contains NUL bytes: it is a binary file"),
    "names-too-few": (_names("red\ngreen\nblue\n"), "There are 3 class names but the model has 4 classes"),
    "names-too-many": (_names("a\nb\nc\nd\ne\n"), "There are 5 class names but the model has 4 classes"),
    "names-empty-file": (_names(""), "holds no names"),
    "names-broken-json": (_names('["red", "green"'), "starts like a JSON list but is not valid JSON"),
    "names-json-of-objects": (_names('[{"a": 1}, {"b": 2}, {"c": 3}, {"d": 4}]'), "is not a list of names"),
    "names-control-characters": (_names("red\ngre\x07en\nblue\ngrey\n"), "contains control characters"),
}


def _checkpoint(data, name="model.pt"):
    return lambda w, t: ["doctor", "--checkpoint", _write(t / name, data) if data is not None else t / name]


def _saved(obj, name="model.pt"):
    def build(w, t):
        torch.save(obj, t / name)
        return ["doctor", "--checkpoint", t / name]
    return build


def _bad_weights(value, key="classifier.weight"):
    def build(w, t):
        state = {k: v.clone() for k, v in w.state.items()}
        state[key][0, 0] = value
        save_file(state, str(t / "bad.safetensors"))
        return w.discover(t, checkpoint=t / "bad.safetensors")
    return build


def _model_file(source):
    def build(w, t):
        _write(t / "m.py", source)
        return ["doctor", "--checkpoint", w.checkpoint, "--model-def", f"{t / 'm.py'}:Net"]
    return build


def _wrong_shapes(w, t):
    state = {k: v.clone() for k, v in w.state.items()}
    state["classifier.weight"] = torch.zeros(4, 16)
    save_file(state, str(t / "wrong.safetensors"))
    return ["doctor", "--checkpoint", t / "wrong.safetensors", "--model-def", f"{w.source}:Net"]


CHECKPOINTS = {
    "checkpoint-missing": (_checkpoint(None), "model.pt does not exist"),
    "checkpoint-a-folder": (lambda w, t: ["doctor", "--checkpoint", w.images],
                            "images is a folder without config.json, so it is not a Hugging Face model folder"),
    "checkpoint-empty": (_checkpoint(b""), "is empty (0 bytes)"),
    "checkpoint-garbage": (_checkpoint(b"this is not a checkpoint"), "is not a readable PyTorch checkpoint"),
    "checkpoint-truncated-safetensors": (lambda w, t: ["doctor", "--checkpoint",
                                                       _write(t / "cut.safetensors", w.checkpoint.read_bytes()[:200])],
                                         "is not a readable safetensors file"),
    "checkpoint-pickled-object": (_saved({"weights": threading.Lock}), "reading it would mean running code"),
    "checkpoint-one-tensor": (_saved(torch.zeros(3, 3)), "holds a single tensor of shape (3, 3)"),
    "checkpoint-wrong-shapes": (_wrong_shapes, "The checkpoint does not fit user:net.py:Net"),
    "checkpoint-nan-head": (_bad_weights(float("nan")), "weights contain NaN or infinite values (in classifier.weight)"),
    "checkpoint-inf-conv": (_bad_weights(float("inf"), "body.0.weight"),
                            "weights contain NaN or infinite values (in body.0.weight)"),
    "model-def-missing-file": (lambda w, t: ["doctor", "--checkpoint", w.checkpoint, "--model-def", f"{t}/none.py:Net"],
                               "none.py does not exist"),
    "model-def-no-factory": (_model_file("def other():\n    pass\n"), "m.py has no function or class named 'Net'"),
    "model-def-syntax-error": (_model_file("def Net(:\n"), "Running the model file m.py failed (SyntaxError"),
    "model-def-not-a-module": (_model_file("def Net():\n    return 42\n"), "Net in m.py returned a int, not a torch.nn.Module"),
    "model-forward-raises": (_model_file(MODEL_SOURCE + "\n    def forward(self, x):\n        raise ValueError('boom')\n"),
                             "The model fails on an input of shape (2, 3, 224, 224) (ValueError: boom)"),
    "model-def-no-colon": (lambda w, t: ["doctor", "--checkpoint", w.checkpoint, "--model-def", str(w.source)],
                           "is not of the form FILE.py:FACTORY"),
}


def _data(folders, per_class=3, corrupt=()):
    def build(w, t):
        root = _images(t / "data", folders, per_class)
        for folder in corrupt:
            for p in (root / folder).iterdir():
                p.write_bytes(b"\x89PNG broken")
        return [*w.discover(t), "--data", root]
    return build


def _data_with_names(folders):
    def build(w, t):
        root = _images(t / "data", folders)
        return [*w.discover(t), "--data", root, "--class-names", _write(t / "names.txt", "red\ngreen\nblue\ngrey\n")]
    return build


DATA = {
    "data-missing": (lambda w, t: [*w.discover(t), "--data", t / "none"], "does not exist or is not a folder"),
    "data-is-a-file": (lambda w, t: [*w.discover(t), "--data", _write(t / "x.png", "x")],
                       "does not exist or is not a folder"),
    "data-without-class-folders": (lambda w, t: [*w.discover(t), "--data", _write(t / "d" / "a.png", "x").parent],
                                   "has no class sub-folders"),
    "data-class-without-images": (lambda w, t: [*w.discover(t), "--data",
                                                _write(_images(t / "d", ["0", "1"]) / "2" / "notes.txt", "x").parent.parent],
                                  "The class folder '2' has no readable images"),
    "data-all-images-corrupt": (_data(["0", "1"], corrupt=["1"]), "The class folder '1' has no readable images"),
    "data-numbered-from-1": (_data(["1", "2", "3", "4"], 1), "The folders look numbered from 1 (1 to 4): rename them 0 to 3"),
    "data-index-out-of-range": (_data(["0", "1", "9"], 1), "numbered 0 to 3): 9."),
    "data-numbers-and-names": (_data(["0", "cat"], 1), "Some class folders are numbered and others are not: cat"),
    "data-partial-names": (_data_with_names(["red", "grn", "blue"]),
                           "match none of the model's class names: grn. Expected names: red, green, blue, grey"),
    "data-two-folders-one-class": (_data(["1", "01"], 1), "Two class folders map to the same model class: 01, 1"),
    "data-names-without-model-names": (_data(["cat", "dog", "emu"], 1), "3 class folders but the model has 4 classes"),
}


def _run_cmd(mutate=None, *, command="explain", extra=()):
    def build(w, t):
        run = w.copy_run(t)
        if mutate is not None:
            mutate(run)
        image = w.images / "0" / "img0.png"
        args = [run, image] if command == "explain" else [run, "--data", w.images, "--device", "cpu"]
        return [command, *args, *w.model, *extra]
    return build


def _flip_bit(run):
    raw = bytearray((run / _shard(run)["file"]).read_bytes())
    raw[-2] ^= 0x10
    (run / _shard(run)["file"]).write_bytes(bytes(raw))


def _other_arch(w, t):
    run = w.copy_run(t)
    _write(t / "other.py", MODEL_SOURCE)
    return ["explain", run, w.images / "0" / "img0.png", "--checkpoint", w.checkpoint, "--model-def",
            f"{t / 'other.py'}:Net", "--resize", "16", "--crop", "16"]


def _other_checkpoint(w, t):
    """The run opened with another checkpoint file (the same weights, saved again: another sha256)."""
    run = w.copy_run(t)
    other = t / "saved-again.safetensors"
    save_file(w.state, str(other), metadata={"saved": "again"})
    return ["explain", run, w.images / "0" / "img0.png", *w.model_with(other)]


def _scale(name, factor):
    def tensors(ts):
        ts[name] = ts[name].clone()
        ts[name][0, 0] *= factor
    return tensors


def _nan_prototypes(ts):
    ts["prototypes"] = ts["prototypes"].clone()
    ts["prototypes"][0, 0, 0] = float("nan")


RUNS = {
    "run-missing": (lambda w, t: ["explain", t / "none", w.images / "0" / "img0.png", *w.model],
                    "is not a phpn run (it has no run.json)"),
    "run-json-not-json": (_run_cmd(lambda r: _write(r / META, "{not json")), "run.json is not readable JSON"),
    "run-json-a-list": (_run_cmd(lambda r: _write(r / META, "[1, 2, 3]")), "run.json holds a list, not an object"),
    "run-json-empty": (_run_cmd(lambda r: _write(r / META, "")), "run.json is not readable JSON"),
    "run-format-99": (_run_cmd(lambda r: _rewrite_run(r, meta=lambda m: m.update(format_version=99))),
                      "has format 99, this phpn reads formats 1, 2"),
    "run-flipped-bit": (_run_cmd(_flip_bit), "does not match the checksum recorded in run.json"),
    "run-nan-prototypes": (_run_cmd(lambda r: _rewrite_run(r, tensors=_nan_prototypes)),
                           "prototypes contains NaN or infinite values"),
    "run-tampered-prototypes": (_run_cmd(lambda r: _rewrite_run(r, tensors=_scale("prototypes", 1.001))),
                                "its prototypes do not sum to the head rows they decompose"),
    "run-classes-not-a-list": (_run_cmd(lambda r: _rewrite_run(r, records=lambda classes: "all")),
                               "'classes' is not a list of class records"),
    "run-class-names-wrong-length": (_run_cmd(lambda r: _rewrite_run(
        r, meta=lambda m: m["model"].update(class_names=["a"]))), "run.json names 1 classes but the head has 4"),
    "run-preprocess-broken": (_run_cmd(lambda r: _rewrite_run(r, meta=lambda m: m.update(preprocess="big"))),
                              "'preprocess' is missing or invalid"),
    "run-tensors-missing": (_run_cmd(lambda r: (r / _shard(r)["file"]).unlink()), "safetensors is missing"),
    "run-another-checkpoint": (_other_checkpoint, "This run was made from a different checkpoint"),
    "run-another-architecture": (_other_arch, "made with the architecture 'user:net.py:Net', but the model opened now "
                                              "has 'user:other.py:Net'"),
    "run-certify-batch-size-0": (_run_cmd(command="certify", extra=["--batch-size", "0"]),
                                 "--batch-size must be a whole number of at least 1, got 0"),
    "explain-not-an-image": (lambda w, t: ["explain", w.run, _write(t / "x.png", "text"), *w.model],
                             "x.png is not a readable image"),
    "explain-unknown-class": (_run_cmd(extra=["--class", "zebra"]), "Unknown class 'zebra'"),
}

CLI_CASES = {**PARAMETERS, **OUTPUTS, **CLASS_NAMES, **CHECKPOINTS, **DATA, **RUNS}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_refuses_with_one_clear_line_and_loses_nothing(case, world, tmp_path, capsys):
    build, phrase = CLI_CASES[case]
    argv = build(world, tmp_path)
    before = _snapshot(tmp_path, world.root)
    code, out, err = _cli(capsys, argv)
    assert code == 2, err
    # One line for the error, the last thing printed (a warning about the model may come first).
    lines = err.splitlines()
    assert lines[-1].startswith("error: ") and [ln[:7] for ln in lines].count("error: ") == 1, err
    assert "Traceback" not in err and phrase in lines[-1], err
    # Nothing deleted, renamed, changed or added (no run, no temporary folder left behind).
    assert _snapshot(tmp_path, world.root) == before


def test_json_mode_prints_the_error_as_json(world, tmp_path, capsys):
    code, out, err = _cli(capsys, [*world.discover(tmp_path, "--device", "meta"), "--json"])
    assert code == 2 and json.loads(out) == {"error": "Unknown device 'meta'. Use auto, cpu, cuda or cuda:N.",
                                             "type": "ConfigError", "exit_code": 2}


def test_doctor_gives_a_verdict_not_exact_for_nan_weights(world, tmp_path, capsys):
    state = {k: v.clone() for k, v in world.state.items()}
    state["classifier.bias"][1] = float("inf")
    save_file(state, str(tmp_path / "inf.safetensors"))
    code, out, _ = _cli(capsys, ["doctor", "--checkpoint", tmp_path / "inf.safetensors", "--model-def",
                                 f"{world.source}:Net", "--crop", "16", "--resize", "16", "--json"])
    report = json.loads(out)
    assert code == 3 and report["verdict"] == "impossible"
    assert "NaN or infinite values (in classifier.bias)" in report["reason"]


def test_a_forward_that_never_returns_gets_a_verdict_in_time():
    from phpn.models import diagnose

    release = threading.Event()

    class Stuck(TinyNet):
        def forward(self, x):
            release.wait()  # like a model waiting on something that never comes
            return super().forward(x)

    try:
        d = diagnose(Stuck().eval(), (3, 16, 16), time_limit_s=0.3)
        assert d.verdict == "impossible" and d.split is None
        assert d.reason.startswith("The model's forward pass did not finish within 0.3 s on a 2x3x16x16 input")
    finally:
        release.set()


def test_a_rerun_with_overwrite_replaces_the_run_and_nothing_else(world, tmp_path, capsys):
    run = world.copy_run(tmp_path)
    (tmp_path / "beside.txt").write_text("keep")
    code, _, err = _cli(capsys, world.discover(tmp_path, "--overwrite", "--k", "3", out=run))
    assert code == 0, err
    assert json.loads((run / META).read_text())["config"]["k"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["beside.txt", "run"]
    m = json.loads((run / META).read_text())
    named = [m["head"]["file"]] + [s[key] for s in m["shards"] for key in ("file", "records")]
    assert sorted(p.name for p in run.iterdir()) == sorted([META] + named)


def test_huge_head_weights_keep_their_fidelity(tiny_loaded, image_folder):
    """Map fidelity is a correlation: a head scaled by 1e30 must give the same numbers, not 0."""
    from dataclasses import replace

    from phpn.images.folders import scan_image_folder
    from phpn.pipeline.discover import DiscoveryConfig, discover

    data = scan_image_folder(image_folder, num_classes=4)
    config = DiscoveryConfig(k=2, device="cpu", solver="none")
    plain = discover(tiny_loaded, tiny_split(tiny_loaded.model), data, tiny_loaded.preprocess, config)
    big = TinyNet().eval()
    big.load_state_dict(tiny_loaded.model.state_dict())
    with torch.no_grad():
        big.fc.weight.mul_(1e30)
    scaled = discover(replace(tiny_loaded, model=big), tiny_split(big), data, tiny_loaded.preprocess, config)
    for a, b in zip(plain.meta["classes"], scaled.meta["classes"]):
        assert b["fidelity"] == pytest.approx(a["fidelity"], abs=1e-4)
    assert max(abs(f) for c in scaled.meta["classes"] for f in c["fidelity"]) > 0.3


# ---------------------------------------------------------------- zips, as the app unpacks them

def _zip(entries: dict, *, link=None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
        if link:
            info = zipfile.ZipInfo(link)
            info.external_attr = (0o120777 << 16)
            zf.writestr(info, "/etc/passwd")
    return buf.getvalue()


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, "PNG")
    return buf.getvalue()


ZIPS = {
    "zip-parent-path": (lambda: _zip({"a/../../evil.png": _png()}), {}, "would be written outside its folder"),
    "zip-absolute-path": (lambda: _zip({"/tmp/evil.png": _png()}), {}, "would be written outside its folder"),
    "zip-drive-letter": (lambda: _zip({"C:/evil.png": _png()}), {}, "would be written outside its folder"),
    "zip-symlink": (lambda: _zip({"cat/a.png": _png()}, link="cat/passwd"), {}, "contains a symbolic link"),
    "zip-too-many-files": (lambda: _zip({f"cat/{i}.png": _png() for i in range(5)}), {"max_files": 3},
                           "holds more than 3 files"),
    "zip-too-large": (lambda: _zip({"cat/a.png": b"0" * 5000}), {"max_bytes": 1000}, "would unpack to"),
    "zip-not-a-zip": (lambda: b"PK not really a zip", {}, "is not a readable zip archive"),
    "zip-empty": (lambda: _zip({}), {}, "The zip file is empty"),
    "zip-only-folders": (lambda: _zip({"__MACOSX/._a": b"x"}), {}, "The zip file is empty"),
}


@pytest.mark.parametrize("case", list(ZIPS))
def test_bad_zips_are_refused_and_leave_nothing(case, tmp_path):
    from phpn.app.uploads import extract_zip

    make, options, phrase = ZIPS[case]
    archive = _write(tmp_path / "upload.zip", make())
    kept = _write(tmp_path / "user" / "keep.txt", "mine")
    with pytest.raises(DataError) as err:
        extract_zip(archive, tmp_path / "unpacked", **options)
    assert phrase in str(err.value)
    assert not (tmp_path / "unpacked").exists() or not any((tmp_path / "unpacked").iterdir())
    assert kept.read_text() == "mine" and not (Path("/tmp") / "evil.png").exists()


def test_unpacking_into_a_used_folder_is_refused_and_keeps_it(tmp_path):
    from phpn.app.uploads import extract_zip

    archive = _write(tmp_path / "upload.zip", _zip({"cat/a.png": _png()}))
    mine = _write(tmp_path / "dest" / "mine.txt", "mine")
    with pytest.raises(DataError, match="is not empty"):
        extract_zip(archive, tmp_path / "dest")
    assert mine.read_text() == "mine" and sorted(p.name for p in (tmp_path / "dest").iterdir()) == ["mine.txt"]




# ---------------------------------------------------------------- the same refusals through the Python API

def _api_cases():
    """Each case prepares its files and returns the call to make."""
    from phpn import api
    from phpn.device import resolve_device
    from phpn.images.preprocess import Preprocess
    from phpn.pipeline.discover import DiscoveryConfig
    from phpn.runs.store import load_run, save_run

    def names_file(data):
        def prepare(w, t):
            path = _write(t / "names.txt", data)
            return lambda: api.read_class_names(path, num_classes=4)
        return prepare

    def save_over(what):
        def prepare(w, t):
            target = _write(t / "mine" / "thesis.tex", "x").parent if what == "folder" else _write(t / "mine.txt", "x")
            return lambda: save_run(load_run(w.run), target, overwrite=True)
        return prepare

    def call(fn):
        return lambda w, t: (lambda: fn(w, t))

    return {
        "api-demo-and-checkpoint": (call(lambda w, t: api.open_model(w.checkpoint, demo="fashion-mnist")),
                                    "A demo brings its own model"),
        "api-class-names-count": (call(lambda w, t: api.open_model(demo="fashion-mnist", class_names=["a", "b"])),
                                  "There are 2 class names but the model has 10 classes"),
        "api-class-names-binary": (names_file(b"\xff\xfe\x00\x01"), "is not UTF-8 text"),
        "api-class-names-count-file": (names_file("a\nb\n"), "There are 2 class names but the model has 4 classes"),
        "api-seed": (call(lambda w, t: DiscoveryConfig(seed=2 ** 40)), "is out of range"),
        "api-seed-float": (call(lambda w, t: DiscoveryConfig(seed=1.5)), "The seed 1.5 is out of range"),
        "api-batch-size": (call(lambda w, t: DiscoveryConfig(batch_size=0)),
                           "batch size must be a whole number of at least 1"),
        "api-device-meta": (call(lambda w, t: DiscoveryConfig(device="meta")), "Unknown device 'meta'"),
        "api-resolve-device": (call(lambda w, t: resolve_device("cuda:x")), "Unknown device 'cuda:x'"),
        "api-std-nan": (call(lambda w, t: Preprocess(std=(float("nan"), 1.0, 1.0))),
                        "std must be finite numbers, got nan"),
        "api-crop-huge": (call(lambda w, t: Preprocess(resize=100000, crop=100000)),
                          "resize must be a whole number of pixels from 1 to 4096, got 100000"),
        "api-doctor-huge-input": (call(lambda w, t: __import__("phpn.models", fromlist=["diagnose"]).diagnose(
            TinyNet(), (3, 100000, 100000))), "The input size 100000x100000 is far larger than any classifier's input"),
        "api-mean-inf": (call(lambda w, t: Preprocess(mean=(0.0, float("inf"), 0.0))),
                         "mean must be finite numbers, got inf"),
        "api-save-over-a-folder": (save_over("folder"), "is a folder that is not a phpn run (it holds thesis.tex)"),
        "api-save-over-a-file": (save_over("file"), "mine.txt exists and is a file, not a phpn run"),
    }


API_CASES = list(_api_cases())


@pytest.mark.parametrize("case", API_CASES)
def test_the_api_refuses_the_same_inputs(case, world, tmp_path):
    from phpn.errors import PhpnError

    prepare, phrase = _api_cases()[case]
    call = prepare(world, tmp_path)
    before = _snapshot(tmp_path, world.root)
    with pytest.raises(PhpnError) as err:
        call()
    assert phrase in str(err.value)
    assert _snapshot(tmp_path, world.root) == before


def test_the_catalogue_is_large_enough():
    assert len(CLI_CASES) + len(ZIPS) + len(API_CASES) >= 80


def test_running_out_of_memory_is_one_line(world, tmp_path, capsys, monkeypatch):
    import phpn.api

    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(phpn.api, "run_discovery", no_memory)
    code, _, err = _cli(capsys, world.discover(tmp_path))
    assert code == 2 and err == ("error: There is not enough memory for this work. Lower --batch-size or "
                                 "--memory-budget, use fewer images per class, or a smaller input size.\n")
    assert not (tmp_path / "out").exists()


def test_an_image_the_model_gives_nan_for_is_refused_not_printed_as_nan(world, tmp_path, capsys):
    """A model normalising each input by its own spread divides by zero on a blank image."""
    source = MODEL_SOURCE.replace("return self.classifier(", "x = x / x.std((2, 3), keepdim=True)\n        return self.classifier(")
    _write(tmp_path / "spread.py", source)
    model = ["--checkpoint", world.checkpoint, "--model-def", f"{tmp_path / 'spread.py'}:Net", "--resize", "16",
             "--crop", "16"]
    run = tmp_path / "run"
    assert _cli(capsys, ["discover", *model, "--data", world.images, "--k", "2", "--solver", "none", "--device",
                         "cpu", "--quiet", "--out", run])[0] == 0
    Image.new("RGB", (20, 20), (128, 128, 128)).save(tmp_path / "blank.png")
    code, out, err = _cli(capsys, ["explain", run, tmp_path / "blank.png", *model, "--json"])
    assert code == 2 and list(json.loads(out)) == ["error", "type", "exit_code"]  # valid JSON, no "logit": NaN
    assert json.loads(out)["error"].startswith("The model gives NaN or infinite logits on blank.png")


def test_numpy_numbers_are_ordinary_numbers():
    from phpn.images.preprocess import Preprocess
    from phpn.pipeline.discover import DiscoveryConfig

    assert DiscoveryConfig(seed=np.int64(7), batch_size=np.int32(4)).seed == 7
    pre = Preprocess(mean=tuple(np.float32([0.5, 0.5, 0.5])), std=tuple(np.float32([0.25, 0.25, 0.25])))
    assert pre.std[0] == 0.25


def test_a_model_file_whose_forward_never_returns_is_refused_in_time(world, tmp_path, monkeypatch):
    import phpn.models.loader as loader
    from phpn.errors import CheckpointError
    from phpn.models import load_model

    gate = threading.Event()
    source = MODEL_SOURCE.replace("import torch\n", "import torch\nimport builtins\n").replace(
        "return self.classifier(", "builtins.phpn_test_gate.wait()\n        return self.classifier(")
    _write(tmp_path / "stuck.py", source)
    import builtins

    builtins.phpn_test_gate = gate
    monkeypatch.setattr(loader, "TRIAL_TIME_LIMIT_S", 0.3)
    try:
        with pytest.raises(CheckpointError, match=r"forward pass did not finish within 0.3 s on one 3x224x224 image"):
            load_model(world.checkpoint, model_def=f"{tmp_path / 'stuck.py'}:Net")
    finally:
        gate.set()
        del builtins.phpn_test_gate
