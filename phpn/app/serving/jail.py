"""The jail in which a visitor's model runs, and the server's side of talking to it.

A visitor's model (an uploaded Python file, a trusted pickle) runs only in a worker process
(:mod:`phpn.app.serving.worker`) started inside bubblewrap (``bwrap``, Debian's
``bubblewrap`` package), never in the server. The jail:

- has no network: a network namespace of its own (only an unused loopback);
- sees the system's ``/usr`` (libraries), the Python installation, its site-packages and the
  phpn package, all read-only, plus the visitor's own files read-only under ``/visitor``;
  nothing else of the server's disk (no other workspace, no ``/etc``, no home folder);
- writes only to a private, size-limited ``/tmp`` that disappears with it;
- starts from an empty environment (``--clearenv``) plus the few variables Python needs;
- runs in its own PID namespace (it sees and can signal only its own processes), in a new
  session (no terminal), and dies with the server (``--die-with-parent``);
- runs under resource limits: address space, CPU seconds and file size (``setrlimit`` before
  ``bwrap`` starts, inherited by everything in the jail) and the number of processes (set by
  the worker's first line inside the jail, where the kernel counts them per user namespace).
  When the server runs as root, the worker drops to an unprivileged user id of its own before
  any of phpn or the visitor's code is imported: the kernel does not count root's processes.

The server sends tensors and receives tensors over the worker's pipes in a plain format
(:func:`write_message`: a JSON header and raw float32 bytes): the server never unpickles or
imports anything the visitor sent. :class:`JailedModel` kills the worker (never abandons
it) on :meth:`JailedModel.close`, :meth:`JailedModel.kill` (cancel), on a call's time limit
and when the job's whole time limit passes.
"""
from __future__ import annotations

import functools
import json
import os
import queue
import random
import resource
import selectors
import shutil
import signal
import site
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Optional

import numpy as np
import torch

import phpn
from phpn.app.serving.cost import ForwardCost, check_forward_cost
from phpn.app.serving.settings import ServerSettings, load_settings
from phpn.errors import ConfigError

JAIL_TOOL = "bwrap"
INSTALL_HINT = ("Install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap; Fedora: dnf install bubblewrap) "
                "on a kernel that allows user namespaces, or leave PHPN_ALLOW_CODE off.")
VISITOR_MOUNT = "/visitor"
_PACKAGE_PARENT = Path(phpn.__file__).resolve().parents[1]  # the folder that holds phpn/
_STARTUP_LIMIT_S = 180.0  # Python + torch start-up in the jail, before the visitor's code runs
_HEADER = struct.Struct("<I")
_MAX_HEADER_BYTES = 1 << 20
_MAX_PAYLOAD_BYTES = 1 << 30  # a result larger than this is refused unread
_MAX_STARTS = 50  # a worker killed by a limit starts again on its next use, this many times in all
_JAIL_UID_BASE = 1_200_000  # unprivileged ids for jails started by root: none of them is a real user
# The worker's first line inside the jail (before phpn, torch or the visitor's code is imported):
# drop to the jail's own user id when started as root, then cap the processes, which the kernel
# counts per user namespace (set outside, it would count every process of the server's user).
_ENTRY = ("import os, resource, runpy\n"
          "uid = int(os.environ.pop('PHPN_JAIL_UID', '-1'))\n"
          "if uid > 0:\n"
          "    os.setgroups([]); os.setresgid(uid, uid, uid); os.setresuid(uid, uid, uid)\n"
          "n = int(os.environ.pop('PHPN_JAIL_NPROC'))\n"
          "resource.setrlimit(resource.RLIMIT_NPROC, (n, n))\n"
          "runpy.run_module('phpn.app.serving.worker', run_name='__main__', alter_sys=True)\n")


# --- is the jail available? --------------------------------------------------------------------------

def _privileged() -> bool:
    return os.geteuid() == 0


def _namespace_flags() -> list:
    if _privileged():
        # Root: bwrap works without a user namespace; the worker drops to its own id (kernel
        # capabilities to do so are all it keeps, and setresuid clears them).
        return ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try",
                "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    return ["--unshare-all", "--unshare-user", "--disable-userns"]


@functools.lru_cache(maxsize=1)
def jail_problem() -> Optional[str]:
    """None when bubblewrap can build the jail here; else a sentence saying why not."""
    tool = shutil.which(JAIL_TOOL)
    if tool is None:
        return "bubblewrap (bwrap) is not installed on this server"
    probe = [tool, *_namespace_flags(), "--die-with-parent", "--ro-bind", "/", "/", "true"]
    try:
        done = subprocess.run(probe, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"bubblewrap could not be started ({type(exc).__name__})"
    if done.returncode != 0:
        detail = done.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or [f"exit code {done.returncode}"]
        return f"bubblewrap cannot create namespaces here ({detail[0][:200]})"
    return None


CODE_SWITCH = "Visitors' code is switched on (PHPN_ALLOW_CODE)"
ISOLATE_SWITCH = "Every visitor's model is to run in a jailed worker (PHPN_ISOLATE_ALL_MODELS)"


def require_jail(switch: str = CODE_SWITCH) -> None:
    """Refuse what ``switch`` asks for when the jail cannot be built: the switch cannot be turned on."""
    problem = jail_problem()
    if problem is not None:
        hint = INSTALL_HINT if switch == CODE_SWITCH else INSTALL_HINT.replace("PHPN_ALLOW_CODE",
                                                                              "PHPN_ISOLATE_ALL_MODELS")
        raise ConfigError(f"{switch}, but it cannot be jailed: {problem}.", hint)


def runs_code(request: dict) -> bool:
    """Whether loading ``request`` runs the visitor's code (a model file, a trusted pickle)."""
    return bool(request.get("model_def") or request.get("trust_pickle"))


# --- the bwrap command ---------------------------------------------------------------------------------

def _python_folders() -> list:
    """The Python installation and its site-packages, outermost first, without duplicates."""
    found = [Path(sys.prefix), Path(sys.base_prefix), Path(sys.executable).resolve().parents[1],
             *(Path(p) for p in site.getsitepackages()), _PACKAGE_PARENT]
    user_site = site.getusersitepackages() if site.ENABLE_USER_SITE else None
    if user_site and Path(user_site).is_dir():
        found.append(Path(user_site))
    out = []
    for folder in sorted({p.resolve() for p in found if p.is_dir()}, key=lambda p: len(p.parts)):
        if not any(folder == o or o in folder.parents for o in out):
            out.append(folder)
    return out


def _dirs_for(dest: Path, made: set) -> list:
    """``--dir`` for every folder above ``dest`` (bwrap would make them 0700: unreadable to the jail's user)."""
    args = []
    for parent in reversed(dest.parents):
        if str(parent) != "/" and parent not in made:
            made.add(parent)
            args += ["--perms", "0755", "--dir", str(parent)]
    return args


def _system_binds() -> list:
    args = ["--ro-bind", "/usr", "/usr"]
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        top = Path("/") / name
        if top.is_symlink():
            args += ["--symlink", os.readlink(top), str(top)]
        elif top.is_dir():
            args += ["--ro-bind", str(top), str(top)]
    return args


def _readable_by_all(path: Path) -> bool:
    return bool(path.stat().st_mode & stat.S_IROTH)


_MAX_VISITOR_FILES = 2_000


class _Exposer:
    """Binds the visitor's files into the jail one by one, read-only. When the server runs as root
    the jail's user is another one, which reads only files readable by all: any other file is
    copied (never opened up) into a staging folder that the jail's user owns and that goes with
    the worker."""

    def __init__(self, uid: Optional[int]):
        self.uid = uid
        self.staging: Optional[Path] = None
        self.count = 0

    def _staged(self, path: Path) -> Path:
        if self.staging is None:
            self.staging = Path(tempfile.mkdtemp(prefix="phpn-jail-"))
        copy = self.staging / f"{self.count}-{path.name}"
        shutil.copyfile(path, copy)
        os.chown(copy, self.uid, self.uid)
        copy.chmod(0o400)
        return copy

    def bind(self, path: Path, dest: Path, made: set) -> list:
        self.count += 1
        if self.count > _MAX_VISITOR_FILES:
            raise ConfigError(f"The visitor's model has more than {_MAX_VISITOR_FILES} files.",
                              "Upload the model's own files only.")
        source = path
        if self.uid is not None and not _readable_by_all(path):
            source = self._staged(path)
        return _dirs_for(dest, made) + ["--ro-bind", str(source), str(dest)]

    def expose(self, path: Path, dest: Path, made: set, python_only: bool = False) -> list:
        """Binds for ``path`` (a file, or a folder's regular files; links are left out) at ``dest``."""
        if path.is_file():
            return self.bind(path, dest, made)
        args = _dirs_for(dest / "x", made)
        for item in sorted(path.rglob("*")):
            if item.is_symlink() or not item.is_file() or (python_only and item.suffix != ".py"):
                continue
            args += self.bind(item, dest / item.relative_to(path), made)
        return args

    def remove(self) -> None:
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)


def jail_argv(command: list, visitor_paths: list, *, tmp_mb: float, processes: int) -> tuple:
    """``(argv, mapped, exposer)``: the bwrap command that runs ``command`` in the jail, where the
    jail sees each of ``visitor_paths`` (``/visitor/N/<name>``), and what to remove afterwards.

    ``visitor_paths`` are files or folders; ``(folder, "py")`` exposes only a folder's Python
    files (a model file's neighbours, which it may import)."""
    made: set = set()
    uid = _JAIL_UID_BASE + random.randrange(100_000) if _privileged() else None
    exposer = _Exposer(uid)
    args = [JAIL_TOOL, *_namespace_flags(), "--die-with-parent", "--new-session", "--clearenv"]
    args += _system_binds()
    # The private /tmp first: what is bound below it afterwards (a Python or a checkout that lives
    # under /tmp) is mounted on top of it instead of being hidden by it.
    args += ["--perms", "1777", "--size", str(int(tmp_mb * 2 ** 20)), "--tmpfs", "/tmp"]
    made.add(Path("/tmp"))
    for folder in _python_folders():
        if folder.parts[1:2] != ("usr",):
            args += _dirs_for(folder, made) + ["--ro-bind", str(folder), str(folder)]
    mapped = []
    try:
        for i, item in enumerate(visitor_paths):
            python_only = isinstance(item, tuple)
            path = Path(item[0] if python_only else item).resolve()
            dest = Path(VISITOR_MOUNT) / str(i) / path.name
            args += exposer.expose(path, dest, made, python_only=python_only)
            mapped.append(str(dest))
    except BaseException:
        exposer.remove()
        raise
    args += ["--proc", "/proc", "--dev", "/dev", "--chdir", "/tmp"]
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "TMPDIR": "/tmp", "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": str(_PACKAGE_PARENT),
           "PHPN_JAIL_NPROC": str(int(processes))}
    if uid is not None:
        env["PHPN_JAIL_UID"] = str(uid)
    for key, value in env.items():
        args += ["--setenv", key, value]
    return args + ["--", *command], mapped, exposer


def _limits(settings: ServerSettings):
    """setrlimit in the child before bwrap starts: inherited by the jail and all it starts."""
    memory = int(settings.worker_memory_mb * 2 ** 20)
    cpu = max(1, int(settings.worker_cpu_s))
    fsize = int(settings.worker_file_mb * 2 ** 20)

    def apply():
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 5))  # SIGXCPU at the soft limit, SIGKILL 5 s later
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    return apply


_SPAWN_LOCK = threading.Lock()
_SPAWN_QUEUE: "queue.Queue" = queue.Queue()
_SPAWNER: list = []


def _spawner() -> None:
    while True:
        start, box, done = _SPAWN_QUEUE.get()
        try:
            box.append((True, start()))
        except BaseException as exc:  # noqa: BLE001 - handed back to the caller's thread
            box.append((False, exc))
        done.set()


def _spawn(start):
    """Run ``start`` (a Popen) on one thread that lives as long as the server: bwrap's
    --die-with-parent follows the thread that started it, and the app's page threads end."""
    with _SPAWN_LOCK:
        if not _SPAWNER:
            thread = threading.Thread(target=_spawner, name="phpn-jail-spawner", daemon=True)
            thread.start()
            _SPAWNER.append(thread)
    box: list = []
    done = threading.Event()
    _SPAWN_QUEUE.put((start, box, done))
    done.wait()
    ok, value = box[0]
    if not ok:
        raise value
    return value


def _drain(stream, tail: list) -> None:
    for line in iter(stream.readline, b""):
        tail[0] = (tail[0] + line)[-4000:]


def _time_up(ref, limit: float) -> None:
    jailed = ref()
    if jailed is not None:
        jailed.kill(f"it was kept for more than the {limit:g} s it was given")


_LIVE: "weakref.WeakSet" = weakref.WeakSet()
_WATCHER: list = []


def _watch(jailed) -> None:
    """Kill workers left idle (their visitor left): a later use starts them again."""
    with _SPAWN_LOCK:
        _LIVE.add(jailed)
        if not _WATCHER:
            thread = threading.Thread(target=_watcher, name="phpn-jail-idle", daemon=True)
            thread.start()
            _WATCHER.append(thread)


def _watcher() -> None:
    while True:
        time.sleep(5)
        now = time.monotonic()
        for jailed in list(_LIVE):
            if jailed.alive and not jailed.busy and now - jailed.last_used > jailed.idle_s:
                jailed.kill(f"it was idle for more than {jailed.idle_s:g} s")


# --- messages over the pipes ------------------------------------------------------------------------

def write_message(stream, header: dict, tensor: Optional[torch.Tensor] = None) -> None:
    """A message: 4-byte length, JSON header, then a tensor's raw float32 bytes (if any)."""
    payload = b""
    if tensor is not None:
        array = np.ascontiguousarray(tensor.detach().to("cpu", torch.float32).numpy())
        header = dict(header, shape=list(array.shape))
        payload = array.tobytes()
    header = dict(header, nbytes=len(payload))
    data = json.dumps(header).encode("utf-8")
    stream.write(_HEADER.pack(len(data)) + data)
    if payload:
        stream.write(payload)
    stream.flush()


def tensor_of(header: dict, payload: bytes) -> Optional[torch.Tensor]:
    """The float32 tensor a message carries, checked against its declared shape (no pickle)."""
    shape = header.get("shape")
    if shape is None:
        return None
    if not (isinstance(shape, list) and all(isinstance(v, int) and v >= 0 for v in shape)) or \
            int(np.prod(shape, dtype=np.int64)) * 4 != len(payload):
        raise ConfigError("The jailed worker sent a malformed tensor.", "Try again; if it persists, the model "
                                                                        "file is at fault.")
    return torch.from_numpy(np.frombuffer(payload, dtype=np.float32).reshape(shape).copy())


class _Reader:
    """Reads whole messages from a pipe with a deadline (never blocks past it)."""

    def __init__(self, fd: int):
        self.fd = fd
        self.buffer = bytearray()
        self.selector = selectors.DefaultSelector()
        self.selector.register(fd, selectors.EVENT_READ)

    def _fill(self, n: int, deadline: float, alive) -> bool:
        while len(self.buffer) < n:
            left = deadline - time.monotonic()
            if left <= 0 or not alive():
                return False
            if self.selector.select(timeout=min(left, 0.2)):
                chunk = os.read(self.fd, max(1 << 16, min(n - len(self.buffer), 1 << 24)))
                if not chunk:
                    return False
                self.buffer += chunk
        return True

    def read(self, deadline: float, alive) -> Optional[tuple]:
        if not self._fill(_HEADER.size, deadline, alive):
            return None
        (size,) = _HEADER.unpack(self.buffer[:_HEADER.size])
        if size > _MAX_HEADER_BYTES:
            raise ConfigError("The jailed worker sent a message too large to read.", "")
        if not self._fill(_HEADER.size + size, deadline, alive):
            return None
        header = json.loads(bytes(self.buffer[_HEADER.size:_HEADER.size + size]))
        nbytes = int(header.get("nbytes", 0))
        if nbytes > _MAX_PAYLOAD_BYTES:
            raise ConfigError("The jailed worker sent a result too large to read.", "")
        end = _HEADER.size + size + nbytes
        if not self._fill(end, deadline, alive):
            return None
        payload = bytes(self.buffer[_HEADER.size + size:end])
        del self.buffer[:end]
        return header, payload


# --- the server's side --------------------------------------------------------------------------------

class JailedModel:
    """A visitor's model held by a worker in the jail; the server sends batches and gets tensors back.

    ``request`` says what to load (checkpoint, model_def, trust_pickle, arch, num_classes,
    input_size, overrides, preprocess); paths in it are the server's and are mapped into the
    jail here. :meth:`forward` returns logits, :meth:`features` the backbone's features of the
    doctor's split. The worker is killed on :meth:`close`, :meth:`kill` (cancel, the visitor
    left), when loading takes more than ``load_timeout_s`` (PHPN_CODE_TIMEOUT), when one call
    takes more than ``job_timeout_s`` (PHPN_JOB_TIMEOUT) and, if given, ``lifetime_s`` after it
    started.
    """

    def __init__(self, request: dict, *, settings: Optional[ServerSettings] = None,
                 load_timeout_s: Optional[float] = None, job_timeout_s: Optional[float] = None,
                 lifetime_s: Optional[float] = None, idle_s: Optional[float] = None):
        self.settings = settings or load_settings()
        require_jail(CODE_SWITCH if runs_code(request) else ISOLATE_SWITCH)
        self.load_timeout_s = float(load_timeout_s if load_timeout_s is not None else self.settings.code_timeout_s)
        self.job_timeout_s = float(job_timeout_s if job_timeout_s is not None else self.settings.job_timeout_s)
        self.idle_s = float(idle_s if idle_s is not None else self.settings.worker_idle_s)
        self.lifetime_s = lifetime_s
        self.request = dict(request)
        self._lock = threading.RLock()
        self.proc = None
        self._timer = None
        self._exposer = None
        self._why_killed: Optional[str] = None
        self._tail = [b""]
        self.starts = 0
        self.busy = False
        self.last_used = time.monotonic()
        self.info: Optional[dict] = None
        self.head: Optional[torch.Tensor] = None
        self.cost: Optional[ForwardCost] = None  # one image's forward pass, as the worker counted it
        self._start()
        _watch(self)

    def _start(self) -> None:
        """Start the worker in its jail and load the model there (again, after it was killed)."""
        self._why_killed = None
        self._tail[0] = b""
        self.starts += 1
        request = dict(self.request)
        paths = [key for key in ("checkpoint", "model_def") if request.get(key)]
        visitor = []
        for key in paths:
            if key == "model_def":
                file = str(request[key]).rpartition(":")[0]
                visitor.append((Path(file).resolve().parent, "py"))  # the file may import its neighbours
            else:
                visitor.append(Path(str(request[key])))
        argv, mapped, self._exposer = jail_argv([sys.executable, "-c", _ENTRY], visitor,
                                                tmp_mb=self.settings.worker_file_mb,
                                                processes=self.settings.worker_processes)
        for key, where in zip(paths, mapped):
            if key == "model_def":
                file, _, factory = str(request[key]).rpartition(":")
                request[key] = f"{where}/{Path(file).name}:{factory}"
            else:
                request[key] = where
        limits = _limits(self.settings)
        try:
            self.proc = _spawn(lambda: subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                                        stderr=subprocess.PIPE, preexec_fn=limits,
                                                        start_new_session=True))
        except OSError as exc:
            self._exposer.remove()
            raise ConfigError(f"The jail for the visitor's model could not be started ({exc}).", INSTALL_HINT) from None
        self._reader = _Reader(self.proc.stdout.fileno())
        # The threads hold no reference to this object, so that a worker nobody uses is collected (and killed).
        threading.Thread(target=_drain, args=(self.proc.stderr, self._tail), daemon=True).start()
        if self.lifetime_s is not None:
            self._timer = threading.Timer(float(self.lifetime_s), _time_up,
                                          args=(weakref.ref(self), float(self.lifetime_s)))
            self._timer.daemon = True
            self._timer.start()
        try:
            ready = self._receive(_STARTUP_LIMIT_S, "start")
            if ready.get("op") != "ready":
                raise ConfigError("The jailed worker did not start properly.", "Try again in a minute.")
            info, head = self._call({"op": "load", **request}, None, self.load_timeout_s, "load")
        except BaseException:
            self.kill()
            raise
        if self.info is not None and (info.get("sha256") != self.info.get("sha256") or
                                      (head is None) != (self.head is None) or
                                      (head is not None and not torch.equal(head, self.head))):
            self.kill("it loaded a different model the second time")
            raise ConfigError("The visitor's model gave a different head when its worker was started again.",
                              "Load the model again.")
        self.info, self.head = info, head
        if info.get("gflops") and info.get("input_size"):
            _, height, width = (int(v) for v in info["input_size"])
            self.cost = ForwardCost(float(info["gflops"]), height, width)
            try:
                check_forward_cost(height, width, self.cost, self.settings)
            except ConfigError:
                self.kill("its input costs more than allowed")
                raise

    @property
    def _stderr_tail(self) -> bytes:
        return self._tail[0]

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, why: str = "it was cancelled") -> None:
        """Kill the worker and everything in its jail now (cancel, time-out, the visitor left)."""
        if self.alive and self._why_killed is None:
            self._why_killed = why
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # bwrap's own group; the jail dies with it
            except (ProcessLookupError, PermissionError):
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self._wait_for_the_jail()
        if self._timer is not None:
            self._timer.cancel()
        if self._exposer is not None:
            self._exposer.remove()

    def _wait_for_the_jail(self, limit_s: float = 10.0) -> None:
        """Until every process of the jail is gone (they all hold the worker's pipe): the kernel takes
        the PID namespace down with its first process, in a moment."""
        deadline = time.monotonic() + limit_s
        fd = self.proc.stdout.fileno() if self.proc.stdout and not self.proc.stdout.closed else None
        while fd is not None and time.monotonic() < deadline:
            if self._reader.selector.select(timeout=0.2):
                try:
                    if not os.read(fd, 1 << 16):
                        return
                except OSError:
                    return

    def close(self) -> None:
        """Ask the worker to stop, then kill it whatever it does."""
        if self.alive:
            try:
                write_message(self.proc.stdin, {"op": "close"})
                self.proc.wait(timeout=2)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                pass
        self.kill("it was closed")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.kill("it was no longer used")
        except Exception:  # noqa: BLE001, S110 - at interpreter exit anything may be gone already
            pass

    # -- calls --
    def _ended(self, what: str) -> ConfigError:
        self.kill(self._why_killed or "it ended")
        code = self.proc.returncode
        why = self._why_killed
        if why and why != "it ended":
            return ConfigError(f"The visitor's model was stopped during its {what}: {why}.",
                               "It ran in a jailed worker, so the server was not affected.")
        tail = self._stderr_tail.decode("utf-8", "replace").strip().splitlines()[-1:]
        detail = f" Last message: {tail[0][:300]}" if tail else ""
        if code is not None and code < 0:
            name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
            limit = {"SIGXCPU": f" (it used more than the {self.settings.worker_cpu_s:g} CPU seconds allowed, "
                                "PHPN_WORKER_CPU_S)",
                     "SIGXFSZ": f" (it wrote a file larger than the {self.settings.worker_file_mb:g} MB allowed, "
                                "PHPN_WORKER_FILE_MB)"}.get(name, "")
            return ConfigError(f"The visitor's model ended its jailed worker during its {what} (signal {name})"
                               f"{limit}.{detail}", "It ran in a jail, so the server is unaffected; fix the model "
                                                    "file and try again.")
        if any(w in self._stderr_tail.decode("utf-8", "replace") for w in ("MemoryError", "allocate memory")):
            detail += (f" (it reached the {self.settings.worker_memory_mb:g} MB of memory a worker may use, "
                       "PHPN_WORKER_MEMORY_MB)")
        when = "before the model was loaded" if what in ("start", "load") else f"during its {what}"
        return ConfigError(f"The model code ended its process (exit code {code}) {when}.{detail}",
                           "It ran in a jailed worker, so the server is unaffected; fix the file (for example "
                           "remove calls to exit) and try again.")

    def _receive(self, timeout_s: float, what: str) -> dict:
        deadline = time.monotonic() + timeout_s
        try:
            got = self._reader.read(deadline, lambda: self.alive or bool(self._reader.selector.select(0)))
        except (ConfigError, ValueError) as exc:  # a malformed message: the worker cannot be trusted further
            self.kill("it sent a malformed message")
            raise ConfigError(f"The visitor's model sent a malformed message during its {what} and its worker was "
                              "stopped.", "Check the model file.") from exc
        if got is None:
            if self.alive and time.monotonic() >= deadline:
                self.kill(f"it did not finish within {timeout_s:g} s")
                if what == "load":
                    raise ConfigError(f"The model code did not finish loading within {timeout_s:.0f} s and was "
                                      "stopped (it ran in a jailed worker, so the server was not held up).",
                                      "Check the model file for a loop or slow work at import or in forward; the "
                                      "operator can allow more time with PHPN_CODE_TIMEOUT.")
                raise ConfigError(f"The visitor's model did not finish its {what} within {timeout_s:g} s and its "
                                  "worker was stopped (the server was not held up).",
                                  "Check the model's forward for a loop or a wait; the operator sets the limit "
                                  "with PHPN_JOB_TIMEOUT.")
            raise self._ended(what)
        header, payload = got
        self._last_payload = payload
        return header

    def _call(self, header: dict, tensor: Optional[torch.Tensor], timeout_s: float, what: str) -> tuple:
        with self._lock:
            self.busy = True
            try:
                return self._call_locked(header, tensor, timeout_s, what)
            finally:
                self.busy = False
                self.last_used = time.monotonic()

    def _call_locked(self, header: dict, tensor: Optional[torch.Tensor], timeout_s: float, what: str) -> tuple:
        if not self.alive:
            raise self._ended(what)
        try:
            write_message(self.proc.stdin, header, tensor)
        except (BrokenPipeError, OSError, ValueError):
            raise self._ended(what) from None
        reply = self._receive(timeout_s, what)
        if not reply.get("ok"):
            if reply.get("kind") == "memory":
                raise ConfigError(f"The visitor's model ran out of memory during its {what}: it may use "
                                  f"{self.settings.worker_memory_mb:g} MB (PHPN_WORKER_MEMORY_MB) "
                                  f"({reply.get('message', '')[:200]}).",
                                  "Use smaller inputs or a smaller model; the server was not affected.")
            if reply.get("user_error"):
                raise ConfigError(reply.get("message", ""), reply.get("fix", ""))
            raise ConfigError(f"The visitor's model failed during its {what} ({reply.get('message', '')[:300]}).",
                              "Fix the model file or checkpoint and try again.")
        return reply, tensor_of(reply, self._last_payload)

    def _batch(self, op: str, batch: torch.Tensor, timeout_s: Optional[float]) -> torch.Tensor:
        if batch.ndim != 4:
            raise ConfigError(f"A batch for the model must be (N, C, H, W), not {tuple(batch.shape)}.", "")
        check_forward_cost(int(batch.shape[2]), int(batch.shape[3]), self.cost, self.settings)
        with self._lock:
            if not self.alive:  # killed (cancel, a time limit, idle): a fresh worker, as many times as allowed
                if self.starts >= _MAX_STARTS:
                    raise self._ended(f"{op} pass")
                self._start()
            _, out = self._call({"op": op}, batch, float(timeout_s or self.job_timeout_s), f"{op} pass")
        # What comes back from the jail is checked like any input: one row per image, the head's width.
        width = None if self.head is None else int(self.head.shape[1] - 1 if op == "features" else self.head.shape[0])
        if out is None or out.ndim < 2 or out.shape[0] != batch.shape[0] or (width is not None and out.shape[1] != width):
            shape = None if out is None else tuple(out.shape)
            raise ConfigError(f"The visitor's model returned a {op} result of shape {shape} for a batch of "
                              f"{batch.shape[0]} images.", "Check what the model's forward returns.")
        return out.to(batch.device)

    def forward(self, batch: torch.Tensor, timeout_s: Optional[float] = None) -> torch.Tensor:
        """The model's logits for ``batch`` (N, C, H, W), computed in the jail."""
        return self._batch("forward", batch, timeout_s)

    def features(self, batch: torch.Tensor, timeout_s: Optional[float] = None) -> torch.Tensor:
        """The backbone's features (the doctor's split) for ``batch``, computed in the jail."""
        return self._batch("features", batch, timeout_s)

