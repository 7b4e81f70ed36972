"""How long the command line takes to answer, beside ``python -c "import torch"`` in the same run.

    python scripts/cli_startup.py [--repeats 5]

Prints each command's median wall time over the repeats and its ratio to importing torch, so a
loaded machine slows both sides alike. ``phpn --help``, ``--version`` and a wrong argument must not
import torch, numpy or Pillow (tests/test_cli.py checks that too).
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time


def _seconds(command: list, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    # The installed console script when there is one, else the module (the same code either way).
    phpn = [shutil.which("phpn")] if shutil.which("phpn") else [sys.executable, "-m", "phpn"]
    cases = {
        "import torch": [sys.executable, "-c", "import torch"],
        "phpn --help": [*phpn, "--help"],
        "phpn --version": [*phpn, "--version"],
        "phpn discover --k x (argument error)": [*phpn, "discover", "--k", "x", "--out", "x"],
        "python -c 'pass' (the interpreter alone)": [sys.executable, "-c", "pass"],
    }
    _seconds(cases["import torch"], 1)  # warm the file cache, so the first case is not penalised
    times = {name: _seconds(command, args.repeats) for name, command in cases.items()}
    torch_s = times["import torch"]
    print(f"median of {args.repeats} runs each ({' '.join(phpn)})")
    for name, seconds in times.items():
        print(f"  {name:42s} {seconds:7.3f} s   {seconds / torch_s:6.3f} x import torch")


if __name__ == "__main__":
    main()
