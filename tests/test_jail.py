"""The jail for visitors' models (phpn.app.serving.jail) and the budgets that refuse costly inputs.

Each guarantee is tested with a real hostile model file run through bubblewrap: its forward does
something forbidden when the batch's first value asks for it (so the trial passes and the harm
comes on "real" batches), and reports what happened in the error it raises.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import TinyNet

from phpn.app.serving import (
    JailedModel,
    ServerSettings,
    check_input_pixels,
    check_request_pixels,
    jail_problem,
    try_in_child_process,
)
from phpn.app.uploads import held_upload, save_upload, unpack_model_folder
from phpn.errors import CheckpointError, ConfigError, DataError
from phpn.models.checkpoint import MAX_SAFETENSORS_TENSORS, read_checkpoint
from phpn.models.hf import load_model_folder

pytestmark = pytest.mark.slow  # every test here starts from a costly fixture (a jailed worker, trained models, runs)


def _bwrap_reason() -> str:
    problem = jail_problem()
    if problem is None:
        return ""
    try:
        done = subprocess.run(["bwrap", "--unshare-all", "true"], capture_output=True, timeout=30)
        detail = done.stderr.decode("utf-8", "replace").strip() or f"exit code {done.returncode}"
    except OSError as exc:
        detail = str(exc)
    return f"bubblewrap cannot build the jail here ({problem}; `bwrap --unshare-all true`: {detail})"


needs_jail = pytest.mark.skipif(bool(_bwrap_reason()), reason=_bwrap_reason() or "bwrap works")

HOSTILE = '''
import os
import socket
import time

import torch
from torch import nn

OTHER_FILE = {other!r}
PORT = {port}
ALLOC = {alloc}


def probe(code):
    if code == 1:
        try:
            return "ESCAPED read " + open(OTHER_FILE).read()
        except OSError as exc:
            return f"read refused: {{type(exc).__name__}}"
    if code == 2:
        return f"env: secret={{os.environ.get('PHPN_TEST_SECRET')}} keys={{sorted(os.environ)}}"
    if code == 3:
        s = socket.socket()
        s.settimeout(3)
        try:
            s.connect(("127.0.0.1", PORT))
            return "ESCAPED connected"
        except OSError as exc:
            return f"socket refused: {{type(exc).__name__}}"
    if code == 4:
        forked = 0
        for _ in range(20):
            try:
                pid = os.fork()
            except OSError as exc:
                return f"forked {{forked}} then {{type(exc).__name__}}"
            if pid == 0:
                time.sleep(30)
                os._exit(0)
            forked += 1
        return f"forked {{forked}}"
    if code == 5:
        block = torch.empty(ALLOC, dtype=torch.uint8)
        block.fill_(1)
        return "ESCAPED allocated " + str(ALLOC >> 20) + " MB"
    if code == 6:
        try:
            with open(os.path.join(os.path.dirname(__file__), "planted.py"), "w") as fh:
                fh.write("x = 1")
            return "ESCAPED wrote beside the model file"
        except OSError as exc:
            return f"write refused: {{type(exc).__name__}}"
    if code == 7:
        while True:
            time.sleep(0.1)
    return None


class Net(nn.Module):
    def __init__(self, num_classes=3):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):
        outcome = probe(int(x.flatten()[0].item())) if float(x.flatten()[0]) in (1., 2., 3., 4., 5., 6., 7.) else None
        if outcome is not None:
            raise RuntimeError("PROBE " + outcome)
        return self.fc(self.features(x).mean((2, 3)))
'''


MEMORY_MB = 6144
ALLOC = max(4 * 2 ** 30, MEMORY_MB * 2 ** 20)


def _batch(code: float) -> torch.Tensor:
    x = torch.zeros(1, 3, 8, 8)
    x[0, 0, 0, 0] = code
    return x


def _probe(jailed: JailedModel, code: float, **kwargs) -> str:
    with pytest.raises(ConfigError) as err:
        jailed.forward(_batch(code), **kwargs)
    return str(err.value)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """A jailed worker holding the hostile model, a listening socket, another visitor's file and a
    secret in the server's environment."""
    root = tmp_path_factory.mktemp("jail")
    other = root / "other-visitor" / "private.txt"
    other.parent.mkdir()
    other.write_text("the other visitor's secret")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.2)
    mine = root / "mine"
    mine.mkdir()
    (mine / "net.py").write_text(HOSTILE.format(other=str(other), port=listener.getsockname()[1], alloc=ALLOC))
    namespace = {}
    exec(HOSTILE.format(other="", port=0, alloc=0), namespace)  # noqa: S102 - the test's own code
    torch.manual_seed(0)
    torch.save(namespace["Net"]().state_dict(), mine / "weights.pt")
    os.environ["PHPN_TEST_SECRET"] = "hunter2"
    # Address space: enough for Python, torch and phpn (2 to 4 GB); the probe asks for 4 GB, or the
    # whole limit if that is more, so it cannot fit whatever the start took.
    settings = ServerSettings(allow_code=True, worker_memory_mb=MEMORY_MB, worker_processes=12)
    try:
        jailed = JailedModel({"checkpoint": str(mine / "weights.pt"), "model_def": f"{mine / 'net.py'}:Net",
                              "input_size": [3, 8, 8]}, settings=settings)
    finally:
        del os.environ["PHPN_TEST_SECRET"]
    yield jailed, listener, mine
    jailed.close()
    listener.close()


@pytest.mark.slow
@needs_jail
def test_the_hostile_model_loads_and_answers_real_batches(hostile):
    jailed, _, _ = hostile
    assert jailed.info["verdict"] == "exact" and jailed.info["num_classes"] == 3
    assert jailed.info["split"]["feature_layer"] == "features" and jailed.info["split"]["head_layer"] == "fc"
    x = torch.randn(2, 3, 8, 8) + 10  # no probe code
    assert jailed.forward(x).shape == (2, 3)
    assert jailed.features(x).shape == (2, 4, 8, 8)
    here = "phpn_user_model_" + hashlib.sha1(str((hostile[2] / "net.py").resolve()).encode()).hexdigest()[:12]
    assert here not in sys.modules  # the server never imported the visitor's file


@pytest.mark.slow
@needs_jail
def test_another_folders_file_cannot_be_read(hostile):
    message = _probe(hostile[0], 1)
    assert "PROBE read refused: FileNotFoundError" in message and "ESCAPED" not in message


@needs_jail
def test_the_servers_environment_is_not_seen(hostile):
    message = _probe(hostile[0], 2)
    assert "PROBE env: secret=None" in message
    keys = message.split("keys=")[1].split("]")[0]
    assert "PHPN_TEST_SECRET" not in keys and "PYTHONPATH" in keys  # only what the jail sets


@needs_jail
def test_no_socket_reaches_the_servers_loopback(hostile):
    jailed, listener, _ = hostile
    message = _probe(jailed, 3)
    assert "PROBE socket refused: ConnectionRefusedError" in message
    with pytest.raises(socket.timeout):
        listener.accept()  # nothing came through


@needs_jail
def test_processes_are_limited(hostile):
    message = _probe(hostile[0], 4)
    assert "PROBE forked" in message and "then BlockingIOError" in message
    forked = int(message.split("PROBE forked ")[1].split()[0])
    assert forked < 12  # the limit counts the worker's own process and threads too
    jailed = hostile[0]
    uid = jailed._exposer.uid  # the jail's own user id when the server runs as root
    if uid is not None:
        assert len(_processes_of(uid)) > forked  # the worker and its sleeping children
    jailed.kill("the test ended it")
    deadline = time.monotonic() + 30  # the kernel takes the PID namespace down; a loaded machine takes a moment
    while uid is not None and _processes_of(uid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if uid is not None:
        assert _processes_of(uid) == []  # nothing left behind


def _processes_of(uid: int) -> list:
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            text = status.read_text()
        except OSError:
            continue
        line = next((x for x in text.splitlines() if x.startswith("Uid:")), "")
        if line.split()[1:2] == [str(uid)]:
            found.append(status.parent.name)
    return found


@pytest.mark.slow
@needs_jail
def test_files_cannot_be_written_beside_the_model(hostile):
    message = _probe(hostile[0], 6)
    assert "PROBE write refused: PermissionError" in message or "PROBE write refused: OSError" in message
    assert not (hostile[2] / "planted.py").exists()


@pytest.mark.slow
@needs_jail
def test_allocating_4_gb_is_refused_with_a_clear_message(hostile):
    message = _probe(hostile[0], 5)
    limit = hostile[0].settings.worker_memory_mb
    assert f"The visitor's model ran out of memory during its forward pass: it may use {limit:g} MB " \
           "(PHPN_WORKER_MEMORY_MB)" in message
    assert "ESCAPED" not in message


@pytest.mark.slow
@needs_jail
def test_a_hang_on_real_batches_is_killed_by_the_time_limit_and_cancel_kills(hostile):
    jailed, _, _ = hostile
    start = time.monotonic()
    message = _probe(jailed, 7, timeout_s=2)
    assert "did not finish its forward pass within 2 s and its worker was stopped" in message
    assert time.monotonic() - start < 15 and not jailed.alive and jailed.proc.returncode is not None
    starts = jailed.starts
    assert jailed.forward(torch.full((1, 3, 8, 8), 0.5)).shape == (1, 3)  # the next use: a fresh worker
    assert jailed.starts == starts + 1 and jailed.alive


@pytest.mark.slow
@needs_jail
def test_cancel_and_idleness_kill_the_worker(tmp_path):
    (tmp_path / "net.py").write_text(HOSTILE.format(other="", port=1, alloc=0))
    namespace = {}
    exec(HOSTILE.format(other="", port=0, alloc=0), namespace)  # noqa: S102 - the test's own code
    torch.save(namespace["Net"]().state_dict(), tmp_path / "weights.pt")
    settings = ServerSettings(allow_code=True, job_timeout_s=3)
    jailed = JailedModel({"checkpoint": str(tmp_path / "weights.pt"), "model_def": f"{tmp_path / 'net.py'}:Net",
                          "input_size": [3, 8, 8]}, settings=settings)
    assert jailed.job_timeout_s == 3.0  # PHPN_JOB_TIMEOUT
    threading.Timer(1.0, jailed.kill).start()  # the visitor's Cancel, from another thread
    start = time.monotonic()
    message = _probe(jailed, 7)
    assert "The visitor's model was stopped during its forward pass: it was cancelled." in message
    assert time.monotonic() - start < 15 and not jailed.alive
    # The operator's per-pass limit (PHPN_JOB_TIMEOUT), with no limit given by the caller: the worker
    # (started again for this batch) is killed, with every process of its jail.
    message = _probe(jailed, 7)
    assert ("The visitor's model did not finish its forward pass within 3 s and its worker was stopped (the server "
            "was not held up).") in message and "PHPN_JOB_TIMEOUT" in message
    assert not jailed.alive and jailed.proc.returncode is not None and jailed.starts == 2
    assert jailed.forward(torch.full((1, 3, 8, 8), 0.5)).shape == (1, 3)  # used again: started again
    jailed.idle_s = 1.0  # the visitor left: the idle watcher kills it within seconds
    deadline = time.monotonic() + 30
    while jailed.alive and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not jailed.alive and jailed._why_killed == "it was idle for more than 1 s"
    jailed.close()


@pytest.mark.slow
@needs_jail
def test_the_trial_runs_in_the_jail_and_reports_a_refused_read(tmp_path):
    secret = tmp_path / "elsewhere" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text("s3cret")
    mine = tmp_path / "mine"
    mine.mkdir()
    torch.save({"fc.weight": torch.zeros(3, 4), "fc.bias": torch.zeros(3)}, mine / "weights.pt")
    (mine / "net.py").write_text(f"import os\nraise RuntimeError('env ' + str(os.environ.get('HOME')) + ' ' + "
                                 f"open({str(secret)!r}).read())\n")
    with pytest.raises(ConfigError) as err:
        try_in_child_process(mine / "weights.pt", model_def=f"{mine / 'net.py'}:Net",
                             settings=ServerSettings(allow_code=True))
    assert "FileNotFoundError" in str(err.value) and "s3cret" not in str(err.value)


def test_the_switch_refuses_without_bubblewrap(monkeypatch):
    from phpn.app.serving import jail  # noqa: PLC0415 - the module whose probe is replaced

    monkeypatch.setattr(jail, "jail_problem", lambda: "bubblewrap (bwrap) is not installed on this server")
    with pytest.raises(ConfigError) as err:
        try_in_child_process("x.pt", model_def="net.py:Net", settings=ServerSettings(allow_code=True))
    assert str(err.value).startswith("Visitors' code is switched on (PHPN_ALLOW_CODE), but it cannot be jailed: "
                                     "bubblewrap (bwrap) is not installed on this server. Install bubblewrap "
                                     "(Debian/Ubuntu: apt-get install bubblewrap;")


# --- costly inputs, refused before anything is built ---------------------------------------------------

def _huge_header_safetensors(path, header_bytes: int) -> None:
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", header_bytes) + b"{" + b" " * (header_bytes - 2) + b"}")


def test_a_small_zip_with_a_huge_safetensors_header_is_refused_fast(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "resnet", "num_labels": 2}))
    _huge_header_safetensors(folder / "model.safetensors", 60 * 2 ** 20)
    archive = tmp_path / "model.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in folder.iterdir():
            zf.write(f, f"model/{f.name}")
    assert archive.stat().st_size < 2 * 2 ** 20
    start = time.monotonic()
    with pytest.raises(DataError) as err:
        unpack_model_folder(archive, tmp_path / "unpacked")
    assert time.monotonic() - start < 5
    assert "model.safetensors has a safetensors header of 60.0 MB, more than the 16 MB limit" in str(err.value)
    assert not (tmp_path / "unpacked").exists()
    for reader in (lambda: read_checkpoint(folder / "model.safetensors"), lambda: load_model_folder(folder)):
        start = time.monotonic()
        with pytest.raises(CheckpointError, match="more than the 16 MB limit"):
            reader()
        assert time.monotonic() - start < 5


@pytest.mark.slow
def test_a_safetensors_file_listing_too_many_tensors_is_refused(tmp_path):
    n = MAX_SAFETENSORS_TENSORS + 1
    header = json.dumps({f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(n)})
    path = tmp_path / "many.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode())
    start = time.monotonic()
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(path)
    assert time.monotonic() - start < 5
    assert f"many.safetensors lists {n:,} tensors, more than the {MAX_SAFETENSORS_TENSORS:,} limit" in str(err.value)


def test_a_config_with_two_million_labels_is_refused_fast(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "resnet", "num_labels": 2_000_000}))
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", 2) + b"{}")
    start = time.monotonic()
    with pytest.raises(CheckpointError) as err:
        load_model_folder(folder)
    assert time.monotonic() - start < 5
    assert "model/config.json asks for 2,000,000 labels, more than the 100,000 limit (num_labels)" in str(err.value)
    archive = tmp_path / "model.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(folder / "config.json", "config.json")
        zf.write(folder / "model.safetensors", "model.safetensors")
    start = time.monotonic()
    with pytest.raises(DataError, match="config.json asks for 2,000,000 labels, more than the 100,000 limit"):
        unpack_model_folder(archive, tmp_path / "unpacked")
    assert time.monotonic() - start < 5


def test_an_input_larger_than_allowed_is_refused_before_any_work():
    start = time.monotonic()
    with pytest.raises(ConfigError) as err:
        check_input_pixels(4096, 4096, ServerSettings())
    assert str(err.value).startswith("An input of 4096x4096 pixels is more than the 1,048,576 pixels a model input "
                                     "may have on this server (PHPN_MAX_INPUT_PIXELS).")
    with pytest.raises(ConfigError, match="4096x4096 pixels is more than the 1,048,576"):
        try_in_child_process("x.pt", model_def="net.py:Net", overrides={"crop": 4096, "resize": 4096},
                             settings=ServerSettings(allow_code=True))
    with pytest.raises(ConfigError, match="4096x4096 pixels is more than the 1,048,576"):  # any model, before loading
        check_request_pixels({"checkpoint": "resnet18.pth", "overrides": {"crop": 4096, "resize": 4096}},
                             ServerSettings())
    assert time.monotonic() - start < 5
    check_input_pixels(518, 518, ServerSettings())  # a large real model's input passes


class _Upload:
    def __init__(self, name: str, data: bytes):
        self.name, self._data, self.size = name, data, len(data)

    def getbuffer(self):
        return memoryview(self._data)


def test_a_full_disk_is_said_as_such(tmp_path, monkeypatch):
    import shutil  # noqa: PLC0415 - the function replaced below

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: usage._replace(free=3 * 2 ** 20))
    with pytest.raises(DataError) as err:
        save_upload(_Upload("big.pt", b"x" * (5 * 2 ** 20)), tmp_path / "uploads")
    assert str(err.value) == (f"The disk is full (needs 2 MB at {tmp_path / 'uploads'}). Ask the operator of this "
                              "server to free some room, then try again.")
    assert not (tmp_path / "uploads").exists()


def test_a_write_that_hits_a_full_disk_leaves_nothing(tmp_path, monkeypatch):
    import builtins  # noqa: PLC0415 - the function replaced below
    import errno  # noqa: PLC0415 - only here

    real_open = builtins.open

    class Full:
        def __init__(self, fh):
            self.fh = fh

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def write(self, _data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(builtins, "open", lambda p, m="r", *a, **k: Full(real_open(p, m, *a, **k)) if m == "wb"
                        else real_open(p, m, *a, **k))
    with pytest.raises(DataError, match=r"^The disk is full \(needs 1 MB at "):
        save_upload(_Upload("m.pt", b"x" * 1000), tmp_path)
    assert not (tmp_path / "m.pt").exists()


@pytest.mark.slow
def test_uploads_held_in_memory_are_counted():
    with held_upload(600, limit=1000):
        with pytest.raises(DataError) as err:
            with held_upload(500, limit=1000):
                pass
        assert str(err.value).startswith("The server is full: it already holds 600 bytes of uploads, and this one "
                                         "(500 bytes) would pass the 1000 bytes it may hold at once.")
        with held_upload(400, limit=1000):
            pass
    with held_upload(1000, limit=1000):  # released: room again
        pass


# The shared tiny model (conftest.TinyNet), as a model definition file a visitor would upload.
TINY = "from torch import nn\n\n\n" + inspect.getsource(TinyNet)


@pytest.mark.slow
@needs_jail
def test_discovery_and_explanation_through_the_worker_match_the_model_in_process(tmp_path, image_folder):
    from phpn.api import decompose, open_model  # noqa: PLC0415 - only this test needs the whole door
    from phpn.app.serving import open_jailed_session, stop_jailed  # noqa: PLC0415 - as above

    (tmp_path / "tiny.py").write_text(TINY)
    torch.manual_seed(0)
    torch.save(TinyNet().eval().state_dict(), tmp_path / "w.pt")
    request = {"checkpoint": tmp_path / "w.pt", "model_def": f"{tmp_path / 'tiny.py'}:TinyNet",
               "overrides": {"resize": 16, "crop": 16}}
    jailed = open_jailed_session(request, settings=ServerSettings(allow_code=True))
    here = open_model(request["checkpoint"], model_def=request["model_def"], overrides=request["overrides"])
    try:
        assert jailed.diagnosis.verdict == here.diagnosis.verdict == "exact"
        torch.testing.assert_close(jailed.split.weight, here.split.weight, rtol=0, atol=0)
        x = torch.rand(3, 3, 16, 16)
        torch.testing.assert_close(jailed.loaded.model(x), here.loaded.model(x), rtol=0, atol=0)
        a = decompose(jailed, str(image_folder), k=2, device="cpu", progress=False)
        b = decompose(here, str(image_folder), k=2, device="cpu", progress=False)
        for pa, pb in zip(a.prototypes, b.prototypes):
            torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
        ea, eb = a.network()(x), b.network()(x)
        torch.testing.assert_close(ea.logits, eb.logits, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ea.contributions, eb.contributions, rtol=1e-5, atol=1e-6)
    finally:
        stop_jailed(jailed, "the test ended")
    assert not jailed.loaded.model.jailed.alive


@pytest.mark.slow
def test_tensors_cross_the_pipe_as_plain_bytes_checked_against_their_shape():
    import io  # noqa: PLC0415 - only here

    from phpn.app.serving.jail import tensor_of, write_message  # noqa: PLC0415 - the protocol's two ends

    buffer = io.BytesIO()
    x = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    write_message(buffer, {"ok": True}, x)
    data = buffer.getvalue()
    size = struct.unpack("<I", data[:4])[0]
    header = json.loads(data[4:4 + size])
    assert header == {"ok": True, "shape": [2, 3], "nbytes": 24}
    torch.testing.assert_close(tensor_of(header, data[4 + size:]), x, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="malformed tensor"):
        tensor_of({"shape": [2, 3]}, b"\0" * 20)  # fewer bytes than the shape says
    with pytest.raises(ConfigError, match="malformed tensor"):
        tensor_of({"shape": [2, -3]}, b"")


@pytest.mark.slow
@needs_jail
def test_a_weights_only_model_runs_in_a_worker_when_the_operator_isolates_all_models(tmp_path, monkeypatch):
    """PHPN_ISOLATE_ALL_MODELS: the app opens a visitor's weights-only checkpoint in a jailed worker
    (which loads it with torch.load(weights_only=True) into the architecture named), with visitors'
    code still off; logits, head and cost match the model opened in the server."""
    import torchvision  # noqa: PLC0415 - only this test needs it

    from phpn.api import open_model  # noqa: PLC0415 - only this test needs the whole door
    from phpn.app import (
        cache,  # noqa: PLC0415 - the app's modules import Streamlit
        frame,  # noqa: PLC0415 - the app's frame imports Streamlit
    )
    from phpn.app.serving import isolated, jailed_worker, measure_cost, stop_jailed  # noqa: PLC0415 - as above

    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(weights=None, num_classes=3).eval().state_dict(), tmp_path / "r18.pt")
    spec = {"checkpoint": str(tmp_path / "r18.pt"), "arch": "resnet18", "overrides": {"resize": 64, "crop": 64}}
    on = ServerSettings(isolate_all_models=True)
    assert isolated(spec, on) and not isolated(spec, ServerSettings()) and not isolated({"demo": "x"}, on)
    assert isolated({"checkpoint": "m.py", "model_def": "m.py:Net"}, ServerSettings())
    monkeypatch.setenv("PHPN_SETTINGS_FILE", str(tmp_path / "none.toml"))
    monkeypatch.setenv("PHPN_ISOLATE_ALL_MODELS", "1")
    monkeypatch.delenv("PHPN_ALLOW_CODE", raising=False)
    cache._load_model_entry.clear()
    entry = frame.load_model_entry(**spec)
    here = open_model(spec["checkpoint"], arch="resnet18", overrides=spec["overrides"])
    worker = jailed_worker(entry.session)
    try:
        assert worker is not None and worker.alive and worker.request.get("trust_pickle") is None
        assert "runs in a jailed worker" in entry.session.loaded.notes
        assert entry.session.diagnosis.verdict == here.diagnosis.verdict == "exact"
        torch.testing.assert_close(entry.session.split.weight, here.split.weight, rtol=0, atol=0)
        x = torch.rand(2, 3, 64, 64)
        with torch.no_grad():
            torch.testing.assert_close(entry.session.loaded.model(x), here.loaded.model(x), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(entry.session.split.backbone(x), here.split.backbone(x), rtol=1e-5, atol=1e-6)
        counted = measure_cost(here.loaded.model, (3, 64, 64))
        assert entry.cost == worker.cost and (worker.cost.height, worker.cost.width) == (64, 64)
        assert worker.cost.gflops == pytest.approx(counted.gflops, rel=1e-9)
        with pytest.raises(ConfigError, match="is more than the 1,048,576 pixels"):  # refused before the pipe
            worker.forward(torch.zeros(1, 3, 1025, 1024))
    finally:
        stop_jailed(entry.session, "the test ended")
        cache._load_model_entry.clear()
    assert not worker.alive
