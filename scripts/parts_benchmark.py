"""The parts benchmark (phpn.evaluate.benchmark): phpn's prototypes beside the NMF parts,
pytorch-grad-cam's Deep Feature Factorization and two baselines, over disjoint draws.

    python scripts/parts_benchmark.py --out docs/benchmarks/parts-benchmark.json

Prints the table (mean ± standard deviation over the draws, then the paired differences
and whether each one exceeds its 95% interval); with --out, writes the JSON (every draw's
details) and the table beside it (.md). ``--help`` lists the options.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from phpn.evaluate.benchmark import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
