"""A discovery as a background job: progress per stage, cancel, and a queue shared by everyone.

:class:`DiscoveryJob` runs :func:`phpn.api.run_discovery` in a thread; whoever started it polls
``status``, ``stages``, ``queue_position()`` and ``result`` (the app's Discover page does, every
half second), and ``cancel()`` stops it at the next progress report. Every job waits its turn in
a :class:`DiscoveryQueue` first, which lets only a few discoveries run at once (the operator's
``PHPN_MAX_DISCOVERIES``; one on a CPU), so that a server stays responsive for visitors who are
only browsing while others discover. A job may name its ``owner`` (the app: the visitor's
workspace, shared by all their tabs); the queue refuses an owner's job beyond
``per_owner`` queued or running at once (the operator's ``PHPN_DISCOVERIES_PER_VISITOR``), so
that one visitor cannot fill the line. Nothing here touches Streamlit.
"""
from __future__ import annotations

import threading
import time
import traceback
from dataclasses import dataclass
from typing import Callable, Hashable, Optional

from phpn.api import run_discovery
from phpn.errors import Cancelled, ConfigError, PhpnError

STAGES = ("features", "nmf", "refine", "certify")
STAGE_LABELS = {"features": "Features", "nmf": "NMF", "refine": "Refinement", "certify": "Certificate"}
# Rough share of the total time of each stage, for the overall estimate before a stage starts.
STAGE_WEIGHTS = {"features": 0.25, "nmf": 0.15, "refine": 0.4, "certify": 0.2}


def error_message(exc: BaseException) -> str:
    """A user's error as its own sentence; anything else as a short, honest note."""
    if isinstance(exc, PhpnError):
        return str(exc)
    return (f"Something went wrong: {type(exc).__name__}: {exc}. The session is still usable; "
            "check the inputs and try again.")


@dataclass
class StageProgress:
    done: int = 0
    total: int = 0
    started: float = 0.0
    updated: float = 0.0

    @property
    def fraction(self) -> float:
        return min(1.0, self.done / self.total) if self.total else 0.0

    def remaining(self, now: float) -> Optional[float]:
        f = self.fraction
        if f <= 0 or f >= 1:
            return 0.0 if f >= 1 else None
        return (now - self.started) * (1 - f) / f


def too_many_for_owner(limit: int) -> ConfigError:
    """The refusal of a job beyond an owner's ``limit`` of discoveries queued or running."""
    count = "1 discovery" if limit == 1 else f"{limit} discoveries"
    return ConfigError(f"You already have {count} queued or running:", "wait for one to finish or cancel it.")


class DiscoveryQueue:
    """First come, first served, at most ``slots`` jobs at once; at most ``per_owner`` jobs of
    one owner queued or running at once (0: no such limit)."""

    def __init__(self, slots: int = 1, per_owner: int = 0):
        if int(slots) < 1:
            raise ValueError("a queue needs at least one slot")
        if int(per_owner) < 0:
            raise ValueError("per_owner is a count (0: no limit)")
        self.slots = int(slots)
        self.per_owner = int(per_owner)
        self._cond = threading.Condition()
        self._running: list = []
        self._waiting: list = []
        self._owners: dict = {}  # id(job) -> owner, for jobs waiting or running that named one

    def held_by(self, owner: Hashable) -> int:
        """How many of ``owner``'s jobs are queued or running."""
        with self._cond:
            return sum(1 for o in self._owners.values() if o == owner)

    def join(self, job, owner: Optional[Hashable] = None) -> None:
        """Put ``job`` at the end of the line now, or refuse it (ConfigError) when ``owner``
        already has ``per_owner`` jobs queued or running. :meth:`enter` then waits its turn."""
        with self._cond:
            if job in self._waiting or job in self._running:
                return
            if owner is not None:
                if self.per_owner and self.held_by(owner) >= self.per_owner:
                    raise too_many_for_owner(self.per_owner)
                self._owners[id(job)] = owner
            self._waiting.append(job)
            self._cond.notify_all()

    def enter(self, job, cancelled: Callable[[], bool], poll_s: float = 0.1,
              owner: Optional[Hashable] = None) -> bool:
        """Wait for a slot (joining the line first if :meth:`join` was not called); True once
        ``job`` holds one, False if it was cancelled while waiting."""
        self.join(job, owner)
        with self._cond:
            entered = False
            try:
                while not (self._waiting[0] is job and len(self._running) < self.slots):
                    if cancelled():
                        return False
                    self._cond.wait(poll_s)
                self._running.append(job)
                entered = True
                return True
            finally:
                self._waiting.remove(job)
                if not entered:
                    self._owners.pop(id(job), None)
                self._cond.notify_all()

    def leave(self, job) -> None:
        with self._cond:
            if job in self._running:
                self._running.remove(job)
                self._owners.pop(id(job), None)
            self._cond.notify_all()

    def position(self, job) -> Optional[int]:
        """0 while ``job`` runs, n when n-1 jobs wait before it, None when it is not here."""
        with self._cond:
            if job in self._running:
                return 0
            if job in self._waiting:
                return self._waiting.index(job) + 1
            return None

    @property
    def running(self) -> int:
        with self._cond:
            return len(self._running)

    @property
    def waiting(self) -> int:
        with self._cond:
            return len(self._waiting)


_DEFAULT_QUEUE: Optional[DiscoveryQueue] = None
_QUEUE_LOCK = threading.Lock()


def default_queue(slots: int = 1, per_owner: int = 0) -> DiscoveryQueue:
    """The process-wide queue, with ``slots`` places and ``per_owner`` jobs per owner when it is
    first asked for (a server hands in its operator's settings; later calls get the same queue)."""
    global _DEFAULT_QUEUE
    with _QUEUE_LOCK:
        if _DEFAULT_QUEUE is None:
            _DEFAULT_QUEUE = DiscoveryQueue(slots, per_owner)
        return _DEFAULT_QUEUE


class DiscoveryJob:
    """Discovery in a background thread; the progress callback raises Cancelled on request.

    ``session`` is the ModelSession to discover on (a callable ``session_for(device)`` may be
    given instead, so that a GPU job works on its own copy of a shared model); ``data`` an
    ImageFolderData; ``config`` a DiscoveryConfig. ``model_key`` tells whoever adopts the result
    which model it belongs to; ``owner`` who started it (the queue limits the jobs each owner
    has queued or running: :meth:`start` refuses one too many).
    """

    def __init__(self, session, data, config, data_label: str, *, model_key: str = "",
                 queue: Optional[DiscoveryQueue] = None, describe_error: Callable = error_message,
                 session_for: Optional[Callable] = None, owner: Optional[Hashable] = None):
        self.session, self.data, self.config, self.data_label = session, data, config, data_label
        self.model_key = model_key
        self.owner = owner
        self.queue = queue or default_queue()
        self.describe_error = describe_error
        self.session_for = session_for
        self.cancel_event = threading.Event()
        self.stages = {s: StageProgress() for s in STAGES}
        self.current: Optional[str] = None
        self.status = "queued"  # queued | running | done | cancelled | failed
        self.result = None
        self.error: Optional[str] = None
        self.adopted = False
        self.started = time.time()
        self.began: Optional[float] = None  # when it left the queue
        self.finished: Optional[float] = None
        self.thread = threading.Thread(target=self._work, name="phpn-discovery", daemon=True)

    def start(self) -> "DiscoveryJob":
        """Join the queue (ConfigError when the owner has too many jobs already), then work in the background."""
        self.queue.join(self, self.owner)
        self.thread.start()
        return self

    def cancel(self) -> None:
        self.cancel_event.set()

    @property
    def running(self) -> bool:
        """Not finished yet: waiting in the queue or discovering."""
        return self.status in ("queued", "running")

    @property
    def waiting(self) -> bool:
        return self.status == "queued"

    def queue_position(self) -> Optional[int]:
        return self.queue.position(self)

    def queue_text(self) -> str:
        """What to tell the visitor while the job waits its turn."""
        pos = self.queue_position() or 0
        at_once = "one discovery runs" if self.queue.slots == 1 else f"{self.queue.slots} discoveries run"
        return (f"Waiting in the queue: position {pos} ({at_once} at a time on this server). It starts by itself; "
                "you can keep browsing meanwhile.")

    def progress(self, stage: str, done: int, total: int) -> None:
        if self.cancel_event.is_set():
            raise Cancelled()
        now = time.time()
        p = self.stages.setdefault(stage, StageProgress())
        if not p.started:
            p.started = now
        p.done, p.total, p.updated = int(done), int(total), now
        self.current = stage

    def _work(self) -> None:
        entered = False
        try:
            entered = self.queue.enter(self, self.cancel_event.is_set, owner=self.owner)
            if not entered:
                raise Cancelled()
            self.began = time.time()
            self.status = "running"
            session = self.session_for(self.config.device) if self.session_for else self.session
            self.result = run_discovery(session, self.data, self.config, progress=self.progress,
                                        data_label=self.data_label)
            self.status = "done"
        except Cancelled:
            self.status = "cancelled"
        except Exception as exc:  # noqa: BLE001 - reported to whoever polls the job
            if not isinstance(exc, PhpnError):
                traceback.print_exc()
            self.error = self.describe_error(exc)
            self.status = "failed"
        finally:
            if entered:
                self.queue.leave(self)
            self.finished = time.time()

    def wait(self, timeout: Optional[float] = None) -> str:
        self.thread.join(timeout)
        return self.status

    def wall_times(self) -> dict:
        """Seconds per stage (first to last report), in the queue, and in all (from the start
        request to the end, the queue included)."""
        out = {s: round(p.updated - p.started, 3) for s, p in self.stages.items() if p.started}
        out["queued"] = round((self.began or self.finished or time.time()) - self.started, 3)
        out["total"] = round((self.finished or time.time()) - self.started, 3)
        return out

    def elapsed(self) -> float:
        """Seconds since it left the queue (0 while it waits)."""
        if self.began is None:
            return 0.0
        return (self.finished or time.time()) - self.began

    def overall(self) -> float:
        return sum(STAGE_WEIGHTS[s] * self.stages[s].fraction for s in STAGES if s in self.stages)

    def remaining(self) -> Optional[float]:
        """Seconds left (rough): the elapsed time scaled by the weighted share of work left."""
        if not self.running:
            return 0.0
        f = self.overall()
        if f <= 0.02:
            return None
        return self.elapsed() * (1 - f) / f


def format_seconds(s: Optional[float]) -> str:
    if s is None:
        return "estimating…"
    s = max(0.0, float(s))
    if s < 60:
        return f"{s:.0f} s"
    return f"{int(s // 60)} min {int(s % 60):02d} s"
