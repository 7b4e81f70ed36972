"""The certificate: agreement beside the model's accuracy, the near-chance warning, progress,
real time and cancel, and its one text form."""
from __future__ import annotations

import json
import threading
import time
from dataclasses import replace

import pytest
import torch
from conftest import tiny_split
from scipy.stats import binom

from phpn.errors import Cancelled
from phpn.images.batches import load_batch
from phpn.images.folders import scan_image_folder
from phpn.method.certify import (
    LIKELY_CAUSES,
    Certificate,
    binomial_p_value,
    certify,
    chance_threshold,
    chance_warning,
    format_certificate,
    near_chance,
)
from phpn.pipeline.discover import DiscoveryConfig, discover


@pytest.fixture
def tiny_run(tiny_loaded, image_folder):
    data = scan_image_folder(image_folder, class_names=tiny_loaded.class_names, num_classes=4)
    split = tiny_split(tiny_loaded.model)
    run = discover(tiny_loaded, split, data, tiny_loaded.preprocess, DiscoveryConfig(k=2, device="cpu"))
    return run, run.network(split), data


def _labelled_batches(data, pre, size=12):
    out = []
    for c in data.classes:
        for start in range(0, len(c.paths), size):
            batch, kept, _ = load_batch(data.root, c.paths[start:start + size], pre)
            out.append((batch, torch.full((len(kept),), c.class_index)))
    return out


def test_accuracy_is_recorded_beside_agreement(tiny_loaded, tiny_run):
    run, network, data = tiny_run
    batches = _labelled_batches(data, tiny_loaded.preprocess)
    cert = certify(network, tiny_loaded.model, batches, run.head_error())
    with torch.inference_mode():
        predicted = torch.cat([tiny_loaded.model(b).argmax(1) for b, _ in batches])
    labels = torch.cat([lab for _, lab in batches])
    right = int((predicted == labels).sum())
    assert cert.passed and cert.images == 48 and cert.agreed == 48
    assert cert.labelled_images == 48 and cert.labelled_classes == 4 and cert.correct == right
    assert cert.accuracy == pytest.approx(right / 48)
    d = cert.to_dict()
    assert d["accuracy"] == pytest.approx(right / 48) and d["near_chance"] == near_chance(right, 48, 4)
    text = format_certificate(d)
    assert text.startswith("PASSED: agrees with the model on 48 of 48 images")
    assert f"the model's accuracy on the 48 labelled images: {100 * right / 48:.1f}% ({right} right)" in text
    assert "top-1" not in text and "top-1" not in format_certificate(d, short=True)


def test_without_labels_accuracy_is_unknown(tiny_loaded, tiny_run):
    run, network, data = tiny_run
    batches = [b for b, _ in _labelled_batches(data, tiny_loaded.preprocess)]
    cert = certify(network, tiny_loaded.model, batches, run.head_error())
    assert cert.labelled_images == 0 and cert.accuracy is None
    assert chance_warning(cert) is None
    assert "model accuracy unknown (no labelled images)" in format_certificate(cert)
    assert format_certificate(cert, short=True) == "PASSED · agrees with the model on 48/48 images"


def test_unlabelled_images_in_a_batch_do_not_count(tiny_loaded, tiny_run):
    run, network, data = tiny_run
    batch, labels = _labelled_batches(data, tiny_loaded.preprocess)[0]
    labels[:5] = -1
    cert = certify(network, tiny_loaded.model, [(batch, labels)], run.head_error())
    assert cert.images == 12 and cert.labelled_images == 7


def test_older_certificates_still_format():
    old = {"images": 32, "top1_agreement": 1.0, "max_logit_diff": 1e-7, "max_abs_logit": 2.0, "max_head_error": 1e-9,
           "mean_head_error": 1e-10, "relative_logit_diff": 5e-8, "passed": True}
    assert format_certificate(old).startswith("PASSED: agrees with the model on 32 of 32 images, max |Δlogit| 1e-07")
    assert chance_warning(old) is None
    assert format_certificate(None) == "not computed" and format_certificate({}, short=True) == "no certificate"


def test_binomial_tail_matches_scipy():
    for correct, n, p0 in [(2, 3, 0.1), (11, 100, 0.1), (30, 100, 0.1), (60, 100, 0.5), (0, 10, 0.3), (5, 5, 0.2),
                           (300, 3000, 0.1)]:
        assert binomial_p_value(correct, n, p0) == pytest.approx(binom.sf(correct - 1, n, p0), rel=1e-9, abs=1e-300)


def test_near_chance_thresholds():
    assert chance_threshold(10) == pytest.approx(0.2) and chance_threshold(2) == pytest.approx(0.75)
    assert chance_threshold(1000) == pytest.approx(0.002)
    assert near_chance(11, 100, 10)  # the 11% on 10 classes
    assert near_chance(20, 100, 10)  # twice chance
    assert not near_chance(80, 100, 10)
    assert near_chance(2, 3, 10)  # 3 images cannot tell a model from guessing (p = 0.028)
    assert not near_chance(3, 3, 10)  # p = 0.001
    assert near_chance(70, 100, 2) and not near_chance(90, 100, 2)
    assert not near_chance(0, 0, 10) and not near_chance(0, 10, 1)


def test_the_chance_warning_names_the_causes():
    cert = Certificate(images=300, top1_agreement=1.0, max_logit_diff=0.0, max_abs_logit=1.0, max_head_error=0.0,
                       mean_head_error=0.0, labelled_images=300, correct=33, labelled_classes=10)
    warning = chance_warning(cert)
    assert warning.startswith("The model is right on only 33 of 300 labelled images (11.0%), which is not clearly "
                              "better than guessing among 10 classes (10.0%).")
    for cause in LIKELY_CAUSES:
        assert cause in warning
    assert "phpn check-preprocessing" in warning
    assert chance_warning(replace(cert, correct=240)) is None


def test_progress_reports_images_and_real_time(tiny_loaded, tiny_run):
    run, network, data = tiny_run
    calls = []
    batches = _labelled_batches(data, tiny_loaded.preprocess, size=5)
    started = time.perf_counter()
    cert = certify(network, tiny_loaded.model, batches, run.head_error(), progress=lambda *a: calls.append(a),
                   total=48)
    wall = time.perf_counter() - started
    assert {s for s, _, _ in calls} == {"certify"} and calls[-1] == ("certify", 48, 48)
    done = [d for _, d, _ in calls]
    assert done == sorted(done) and all(t == 48 for _, _, t in calls)
    assert 0 < cert.seconds <= wall + 1e-3


def test_a_cancel_stops_before_the_next_forward(tiny_loaded, tiny_run):
    run, network, data = tiny_run
    batches = _labelled_batches(data, tiny_loaded.preprocess, size=4)
    stop = threading.Event()
    forwards = []
    model = tiny_loaded.model
    handle = model.register_forward_hook(lambda *a: (forwards.append(1), stop.set()))
    try:
        with pytest.raises(Cancelled):
            certify(network, model, batches, run.head_error(), cancel=stop)
    finally:
        handle.remove()
    assert len(forwards) == 1  # the first batch's model forward, then nothing


def test_a_cancelling_progress_callback_stops_certify_run(tiny_loaded, tiny_run):
    from phpn.api import ModelSession, certify_run
    from phpn.models.doctor import Diagnosis

    run, network, data = tiny_run
    split = tiny_split(tiny_loaded.model)
    session = ModelSession(loaded=tiny_loaded, diagnosis=Diagnosis(verdict="exact", reason="", split=split),
                           preprocess=tiny_loaded.preprocess)
    seen = []

    def progress(stage, done, total):
        seen.append(done)
        if done >= 16:
            raise Cancelled()

    with pytest.raises(Cancelled):
        certify_run(session, run, data, device="cpu", progress=progress)
    assert seen[0] == 0 and max(seen) == 16  # batches of 16 on the CPU: stopped at the first check after 16
    cert = certify_run(session, run, data, device="cpu")
    assert cert.passed and cert.labelled_images == 48 and cert.labelled_classes == 4


@pytest.mark.slow
def test_the_fashion_demo_at_the_wrong_size_is_certified_but_flagged_at_chance(capsys):
    """The issue's case: an exact decomposition of a model fed the wrong input size."""
    from phpn.api import certify_run, open_data, open_model, open_run
    from phpn.cli import main
    from phpn.demos import get_demo

    demo = get_demo("fashion-mnist")
    if not (demo.run_dir / "run.json").is_file():
        pytest.skip("the fashion-mnist demo run is not there")
    session = open_model(demo="fashion-mnist")
    run = open_run(demo.run_dir, session)
    data = open_data(session, demo.explain_dir(), images_per_class=5)
    right = certify_run(session, run, data, device="cpu")
    assert right.passed and right.labelled_images == 50 and right.accuracy >= 0.8 and chance_warning(right) is None

    session.preprocess = replace(session.preprocess, resize=96, crop=96)
    wrong = certify_run(session, run, data, device="cpu")
    assert wrong.passed and wrong.top1_agreement == 1.0  # still exact ...
    assert wrong.accuracy <= 0.2 and chance_warning(wrong)  # ... but the model cannot read these inputs

    code = main(["certify", str(demo.run_dir), "--demo", "fashion-mnist", "--data", str(demo.explain_dir()),
                 "--images-per-class", "5", "--device", "cpu", "--json"])
    out = capsys.readouterr()
    obj = json.loads(out.out)
    assert code == 0 and obj["labelled_images"] == 50 and obj["correct"] == right.correct
    assert obj["accuracy"] == pytest.approx(right.accuracy) and obj["chance_warning"] is None
    assert "WARNING" not in out.err


class _Slow(torch.nn.Module):
    """A layer that takes a while and records that it ran (and optionally asks for a cancel)."""

    def __init__(self, log, name, stop=None):
        super().__init__()
        self.log, self.name, self.stop = log, name, stop

    def forward(self, x):
        time.sleep(0.06)
        self.log.append(self.name)
        if self.stop is not None:
            self.stop.set()
        return x


def test_a_cancel_stops_inside_a_forward_within_one_layer():
    from phpn.method.certify import checks_inside

    log, stop = [], threading.Event()
    model = torch.nn.Sequential(_Slow(log, "a"), _Slow(log, "b", stop), _Slow(log, "c"), _Slow(log, "d"))

    def tick():
        if stop.is_set():
            raise Cancelled()

    with checks_inside([model], tick):
        with pytest.raises(Cancelled):
            model(torch.zeros(1))
    assert log == ["a", "b"]  # stopped before the next layer, not at the end of the batch
    log.clear()
    model(torch.zeros(1))  # the hooks are gone once the certificate ends
    assert log == ["a", "b", "c", "d"]


def test_a_cancel_does_not_stop_another_threads_forward_on_a_shared_model():
    from phpn.method.certify import checks_inside

    log = []
    model = torch.nn.Sequential(_Slow(log, "a"), _Slow(log, "b"), _Slow(log, "c"))

    def tick():
        raise Cancelled()  # this caller has cancelled

    errors = []

    def other_visitor():
        try:
            model(torch.zeros(1))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    with checks_inside([model], tick):
        t = threading.Thread(target=other_visitor)
        t.start()
        t.join()
    assert not errors and log == ["a", "b", "c"]


class _Counting(torch.nn.Module):
    """Counts its calls; sleeps, and asks for a cancel on the ``stop_at``-th call."""

    def __init__(self, stop=None, stop_at=None):
        super().__init__()
        self.calls, self.stop, self.stop_at = 0, stop, stop_at

    def forward(self, x):
        self.calls += 1
        if self.stop is not None and self.calls == self.stop_at:
            time.sleep(0.06)
            self.stop.set()
        return x


@pytest.mark.parametrize("with_certificate", [False, True])
def test_a_cancel_stops_discovery_inside_a_forward(tiny_loaded, image_folder, with_certificate):
    import inspect

    from conftest import TinyNet

    if with_certificate and "certify" not in inspect.signature(discover).parameters:
        pytest.skip("discovery does not certify in its own pass here")
    stop = threading.Event()
    torch.manual_seed(0)
    net = TinyNet().eval()
    marker, after = _Counting(stop, stop_at=3), _Counting()
    net.features = torch.nn.Sequential(net.features[0], net.features[1], marker, net.features[2], net.features[3],
                                       after)
    loaded = replace(tiny_loaded, model=net)
    data = scan_image_folder(image_folder, class_names=loaded.class_names, num_classes=4)

    def progress(stage, done, total):
        if stop.is_set():
            raise Cancelled()

    options = {"certify": True} if with_certificate else {}
    with pytest.raises(Cancelled):
        discover(loaded, tiny_split(net), data, loaded.preprocess, DiscoveryConfig(k=2, device="cpu", batch_size=4),
                 progress=progress, **options)
    assert marker.calls == 3 and after.calls == 2  # the third forward stopped between its layers


def test_the_certificate_time_is_never_rounded_to_zero():
    cert = {"images": 10, "top1_agreement": 1.0, "max_logit_diff": 0.0, "relative_logit_diff": 0.0,
            "max_head_error": 0.0, "passed": True}
    assert format_certificate({**cert, "seconds": 0.012}).endswith("; checked in 0.012 s")
    assert format_certificate({**cert, "seconds": 3.456}).endswith("; checked in 3.5 s")
    assert format_certificate({**cert, "seconds": 72.3}).endswith("; checked in 72 s")


@pytest.mark.slow
def test_cli_warns_before_any_result_when_the_model_is_at_chance(tmp_path, capsys):
    """discover at the wrong input size: the certificate passes, the accuracy is at chance, and
    both discover and explain say so on stderr (and in --json) before their results."""
    from phpn.cli import main
    from phpn.demos import get_demo

    demo = get_demo("fashion-mnist")
    if not (demo.assets_dir / "model.safetensors").is_file():
        pytest.skip("the fashion-mnist demo assets are not there")
    out = tmp_path / "run96"
    code = main(["discover", "--demo", "fashion-mnist", "--resize", "96", "--crop", "96", "--images-per-class", "3",
                 "--k", "2", "--device", "cpu", "--out", str(out), "--quiet", "--json"])
    printed = capsys.readouterr()
    found = json.loads(printed.out)
    cert = found["certificate"]
    assert code == 0 and cert["passed"] and cert["labelled_images"] == 30 and cert["near_chance"]
    assert found["chance_warning"] == chance_warning(cert)
    assert printed.err.startswith(f"WARNING: {chance_warning(cert)}")
    image = next((demo.explain_dir() / "07_sneaker").iterdir())
    code = main(["explain", str(out), str(image), "--demo", "fashion-mnist", "--json"])
    printed = capsys.readouterr()
    assert code == 0 and json.loads(printed.out)["chance_warning"] == chance_warning(cert)
    assert printed.err.startswith("WARNING: The model is right on only")
