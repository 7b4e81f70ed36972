import os
import sys

# Idle OpenMP threads spin by default, which slows every other process on a small shared CPU.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from phpn.cli import main  # noqa: E402

sys.exit(main())
