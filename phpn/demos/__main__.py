"""``python -m phpn.demos list`` | ``python -m phpn.demos views DEST``.

``views`` (re)writes the imagenet-lite0 discovery folder: the views of the bundled photos.
"""
from __future__ import annotations

import sys

from phpn.demos import DEMOS
from phpn.demos import lite0_photos as lite0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["list"] and len(argv) == 1:
        for demo in DEMOS.values():
            print(f"{demo.name}: {demo.title}")
        return 0
    if argv[:1] == ["views"] and len(argv) == 2:
        dest = lite0.write_views(argv[1])
        print(f"wrote {len(lite0.PHOTOS)} classes x {len(lite0.VIEWS)} views of 1 photo to {dest}")
        return 0
    print(__doc__.split("\n")[0], file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
