"""The discovery job (phpn.jobs): a real discovery in the background with progress, cancel,
and the queue that lets only a few run at once, with each waiting job's position."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from phpn.api import ModelSession
from phpn.errors import ConfigError
from phpn.images.folders import scan_image_folder
from phpn.jobs import DiscoveryJob, DiscoveryQueue, format_seconds
from phpn.models import diagnose
from phpn.pipeline.discover import DiscoveryConfig


class _Holder:
    """Stands in a queue line, like a job, until released."""

    def __init__(self, queue: DiscoveryQueue):
        self.queue, self.release, self.cancelled = queue, threading.Event(), threading.Event()
        self.entered = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        self.entered = self.queue.enter(self, self.cancelled.is_set, poll_s=0.01)
        if self.entered:
            self.release.wait(10)
            self.queue.leave(self)


def _wait_until(condition, timeout=10.0):
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, "timed out"
        time.sleep(0.01)


def test_the_queue_runs_at_most_its_slots_and_keeps_order():
    queue = DiscoveryQueue(2)
    holders = [_Holder(queue) for _ in range(5)]
    for h in holders:
        h.thread.start()
        _wait_until(lambda h=h: queue.position(h) is not None)
    assert [queue.position(h) for h in holders] == [0, 0, 1, 2, 3]
    assert (queue.running, queue.waiting) == (2, 3)
    holders[3].cancelled.set()  # a cancelled job leaves the line; those behind move up
    _wait_until(lambda: queue.position(holders[3]) is None)
    assert holders[3].entered is False
    assert [queue.position(h) for h in (holders[2], holders[4])] == [1, 2]
    holders[1].release.set()
    _wait_until(lambda: queue.position(holders[2]) == 0)
    assert [queue.position(h) for h in holders] == [0, None, 0, None, 1]
    for h in holders:
        h.release.set()
    for h in holders:
        h.thread.join(5)
    assert (queue.running, queue.waiting) == (0, 0)
    with pytest.raises(ValueError):
        DiscoveryQueue(0)


def test_one_owner_may_hold_only_so_many_jobs_queued_or_running():
    queue = DiscoveryQueue(1, per_owner=2)
    a1, a2, a3, b1 = (_Holder(queue) for _ in range(4))
    queue.join(a1, "A")
    a1.thread.start()
    _wait_until(lambda: queue.position(a1) == 0)
    queue.join(a2, "A")
    a2.thread.start()
    with pytest.raises(ConfigError) as err:
        queue.join(a3, "A")
    assert str(err.value) == ("You already have 2 discoveries queued or running: wait for one to finish or "
                              "cancel it.")
    assert queue.position(a3) is None and queue.held_by("A") == 2
    queue.join(b1, "B")  # another visitor is admitted and waits behind A's jobs
    b1.thread.start()
    assert [queue.position(h) for h in (a1, a2, b1)] == [0, 1, 2]
    assert (queue.held_by("A"), queue.held_by("B")) == (2, 1)
    a1.release.set()  # A's first job finishes: A may queue again, behind B
    _wait_until(lambda: queue.position(a2) == 0)
    assert queue.held_by("A") == 1
    queue.join(a3, "A")
    a3.thread.start()
    assert [queue.position(h) for h in (a2, b1, a3)] == [0, 1, 2]
    b1.cancelled.set()  # a job cancelled while waiting no longer counts for its owner
    _wait_until(lambda: queue.position(b1) is None)
    assert queue.held_by("B") == 0
    for h in (a2, a3, b1):
        h.release.set()
    for h in (a1, a2, a3, b1):
        h.thread.join(5)
    assert (queue.running, queue.waiting, queue.held_by("A")) == (0, 0, 0)
    one = DiscoveryQueue(1, per_owner=1)
    one.join(object(), "A")
    with pytest.raises(ConfigError, match="^You already have 1 discovery queued or running: wait"):
        one.join(object(), "A")
    unlimited = DiscoveryQueue(1)  # no per-owner limit unless asked
    for _ in range(5):
        unlimited.join(object(), "A")
    assert unlimited.held_by("A") == 5


@pytest.fixture
def session(tiny_loaded):
    pre = tiny_loaded.preprocess
    return ModelSession(loaded=tiny_loaded, diagnosis=diagnose(tiny_loaded, input_size=(3, pre.crop, pre.crop)),
                        preprocess=pre)


def test_a_job_discovers_in_the_background_after_waiting_its_turn(session, image_folder):
    data = scan_image_folder(image_folder, class_names=session.loaded.class_names, num_classes=4,
                             images_per_class=4)
    queue = DiscoveryQueue(1)
    blocker = _Holder(queue)
    blocker.thread.start()
    _wait_until(lambda: queue.position(blocker) == 0)
    job = DiscoveryJob(session, data, DiscoveryConfig(k=2, images_per_class=4, device="cpu"), "test-folder",
                       model_key="m1", queue=queue).start()
    _wait_until(lambda: job.queue_position() == 1)
    assert job.waiting and job.running and job.elapsed() == 0.0
    assert job.queue_text() == ("Waiting in the queue: position 1 (one discovery runs at a time on this server). "
                                "It starts by itself; you can keep browsing meanwhile.")
    time.sleep(0.2)
    assert job.status == "queued" and not any(p.total for p in job.stages.values())
    blocker.release.set()
    assert job.wait(120) == "done", job.error
    assert job.queue_position() is None and queue.running == 0
    run = job.result
    assert run.k == 2 and len(run.meta["classes"]) == 4 and run.meta["certificate"]["passed"]
    assert all(p.fraction == 1.0 for p in job.stages.values() if p.total)
    wall = job.wall_times()
    assert wall["queued"] >= 0.2
    assert wall["total"] == pytest.approx(wall["queued"] + job.elapsed(), abs=2e-3)
    assert job.remaining() == 0.0


def test_cancel_while_waiting_and_errors_are_reported(session, image_folder):
    data = scan_image_folder(image_folder, class_names=session.loaded.class_names, num_classes=4,
                             images_per_class=4)
    queue = DiscoveryQueue(1)
    blocker = _Holder(queue)
    blocker.thread.start()
    _wait_until(lambda: queue.position(blocker) == 0)
    job = DiscoveryJob(session, data, DiscoveryConfig(k=2, images_per_class=4, device="cpu"), "x", queue=queue).start()
    _wait_until(lambda: job.queue_position() == 1)
    job.cancel()
    assert job.wait(10) == "cancelled" and job.result is None and queue.waiting == 0
    blocker.release.set()

    # A job over its owner's limit is refused when it is started, before any thread runs.
    queue = DiscoveryQueue(1, per_owner=1)
    first = DiscoveryJob(session, data, DiscoveryConfig(k=2, device="cpu"), "x", queue=queue, owner="A",
                         session_for=lambda device: (_ for _ in ()).throw(ConfigError("Stop.", ""))).start()
    second = DiscoveryJob(session, data, DiscoveryConfig(k=2, device="cpu"), "x", queue=queue, owner="A")
    assert first.wait(10) == "failed" and queue.held_by("A") == 0  # finished jobs do not count
    blocker = _Holder(queue)
    queue.join(blocker, "A")
    blocker.thread.start()
    with pytest.raises(ConfigError, match="^You already have 1 discovery queued or running"):
        second.start()
    assert second.status == "queued" and not second.thread.is_alive() and queue.position(second) is None
    blocker.release.set()
    blocker.thread.join(5)

    def failing(device):
        raise ConfigError("The device is busy.", "Try later.")

    job = DiscoveryJob(session, data, DiscoveryConfig(k=2, device="cpu"), "x", queue=queue, session_for=failing,
                       describe_error=lambda exc: f"[{exc}]").start()
    assert job.wait(10) == "failed" and job.error == "[The device is busy. Try later.]"
    assert queue.running == 0


def test_format_seconds():
    assert [format_seconds(s) for s in (None, -1, 4.4, 59.6, 61, 3725)] == [
        "estimating…", "0 s", "4 s", "60 s", "1 min 01 s", "62 min 05 s"]


@pytest.mark.slow
def test_discoveries_sharing_a_model_with_other_visitors_get_their_own_features(session, image_folder):
    """In the app one cached model serves every visitor: forwards from other threads (another
    discovery, an explanation) must not leak into a discovery's features."""
    data = scan_image_folder(image_folder, class_names=session.loaded.class_names, num_classes=4,
                             images_per_class=6)
    config = DiscoveryConfig(k=2, images_per_class=6, device="cpu", batch_size=4)
    alone = DiscoveryJob(session, data, config, "x", queue=DiscoveryQueue(1)).start()
    assert alone.wait(120) == "done", alone.error
    stop = threading.Event()

    def other_visitor():
        blank = torch.zeros(3, 3, 16, 16)
        with torch.inference_mode():
            while not stop.is_set():
                session.loaded.model(blank)

    browsing = threading.Thread(target=other_visitor, daemon=True)
    browsing.start()
    try:
        queue = DiscoveryQueue(2)
        jobs = [DiscoveryJob(session, data, config, "x", queue=queue).start() for _ in range(2)]
        assert [job.wait(120) for job in jobs] == ["done", "done"], [job.error for job in jobs]
    finally:
        stop.set()
        browsing.join(10)
    for job in jobs:
        assert torch.equal(job.result.prototypes, alone.result.prototypes)
        assert job.result.meta["certificate"]["passed"]


def test_the_hooked_backbone_ignores_other_threads_using_the_same_model(tiny_model):
    """The hook-based backbone (used when a model cannot be traced) stops the forward at the
    cut: only its own forward, never another visitor's pass through the shared model."""
    from phpn.models.split import HookedBackbone

    backbone = HookedBackbone(tiny_model, "features")
    x = torch.randn(2, 3, 16, 16)
    with torch.inference_mode():
        expected_feats, expected_logits = tiny_model.features(x), tiny_model(x)
    stop, failures, wrong = threading.Event(), [], []

    def other_visitor():
        with torch.inference_mode():
            while not stop.is_set():
                try:
                    if not torch.allclose(tiny_model(x), expected_logits, atol=1e-6):
                        wrong.append("logits")
                except Exception as exc:  # noqa: BLE001 - recorded and asserted below
                    failures.append(repr(exc))

    thread = threading.Thread(target=other_visitor, daemon=True)
    thread.start()
    try:
        with torch.inference_mode():
            for _ in range(300):
                assert torch.allclose(backbone(x), expected_feats, atol=1e-6)
    finally:
        stop.set()
        thread.join(10)
    assert failures == [] and wrong == []
