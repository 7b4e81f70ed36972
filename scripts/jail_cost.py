"""What running a weights-only model in a jailed worker (PHPN_ISOLATE_ALL_MODELS) costs, against
opening and running the same model in the server, measured in the same run.

    python scripts/jail_cost.py [--arch resnet18] [--crop 224] [--batch 8] [--repeats 5]

Prints the time to open the model (load + the doctor's trial; in the jail: the worker's start
too), the time of one forward pass of a batch, and the worker's extra memory (its resident
size), with the jail's ratios to the server's.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from phpn.api import open_model  # noqa: E402
from phpn.app.serving import ServerSettings, jailed_worker, open_jailed_session, stop_jailed  # noqa: E402


def _processes() -> dict:
    """pid -> (parent pid, resident kB) of every process."""
    found = {}
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
        except OSError:
            continue
        found[int(fields["Pid"])] = (int(fields["PPid"]), int(fields.get("VmRSS", "0 kB").split()[0]))
    return found


def _rss_mb(pid: int) -> float:
    """Resident memory of a process and all it started (bwrap, the worker's Python), in MB."""
    table = _processes()
    todo, kb = [pid], 0
    while todo:
        current = todo.pop()
        kb += table.get(current, (0, 0))[1]
        todo += [p for p, (parent, _) in table.items() if parent == current]
    return kb / 1024


def _timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the worker runs one thread: compare like with like
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.pt"
        torch.save(getattr(torchvision.models, args.arch)(weights=None, num_classes=10).state_dict(), path)
        overrides = {"resize": args.crop, "crop": args.crop}
        start = time.perf_counter()
        here = open_model(path, arch=args.arch, overrides=overrides)
        open_here = time.perf_counter() - start
        start = time.perf_counter()
        jailed = open_jailed_session({"checkpoint": path, "arch": args.arch, "overrides": overrides},
                                     settings=ServerSettings(isolate_all_models=True))
        open_jail = time.perf_counter() - start
        try:
            x = torch.rand(args.batch, 3, args.crop, args.crop)
            with torch.no_grad():
                here.loaded.model(x)
                jailed.loaded.model(x)
                forward_here = _timed(lambda: here.loaded.model(x), args.repeats)
                forward_jail = _timed(lambda: jailed.loaded.model(x), args.repeats)
                one = x[:1]
                round_here = _timed(lambda: here.loaded.model(one), args.repeats)
                round_jail = _timed(lambda: jailed.loaded.model(one), args.repeats)
            memory = _rss_mb(jailed_worker(jailed).proc.pid)
        finally:
            stop_jailed(jailed, "the measurement ended")
    print(f"{args.arch} at {args.crop} px, batch {args.batch}, one thread, median of {args.repeats}")
    print(f"open (load + doctor's trial): server {open_here:.2f} s, jailed worker {open_jail:.2f} s "
          f"(x{open_jail / open_here:.1f})")
    print(f"forward of the batch: server {forward_here * 1e3:.1f} ms, jailed worker {forward_jail * 1e3:.1f} ms "
          f"(x{forward_jail / forward_here:.2f})")
    print(f"forward of one image: server {round_here * 1e3:.1f} ms, jailed worker {round_jail * 1e3:.1f} ms "
          f"(x{round_jail / round_here:.2f})")
    print(f"the worker's resident memory: {memory:.0f} MB")


if __name__ == "__main__":
    main()
