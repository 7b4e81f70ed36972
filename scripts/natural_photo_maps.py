"""Are the prototype maps visible on natural photos? The EfficientNet-Lite0 demo (real
ImageNet weights, its shipped run) explains three photos from scikit-image (chelsea, coffee,
astronaut); for each prototype of the predicted class this prints the overlay's contrast
(phpn.show.viz.overlay_contrast, RGB units) as drawn by the app (each prototype on its own scale)
and on one scale shared by the class's prototypes, and saves a picture of all the maps.

    python scripts/natural_photo_maps.py [--out docs/screenshots/maps-natural-photos.png]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image  # noqa: E402

from phpn.api import explain_image, open_model, open_run  # noqa: E402
from phpn.config import MAP_OPACITY  # noqa: E402
from phpn.demos import get_demo  # noqa: E402
from phpn.show import viz  # noqa: E402

PHOTOS = ("chelsea", "coffee", "astronaut")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="where to save the picture (PNG)")
    args = parser.parse_args()
    from skimage import data as photos

    session = open_model(demo="imagenet-lite0")
    run = open_run(get_demo("imagenet-lite0").run_dir, session)
    network = run.network()
    rows = []
    print(f"{'photo':10s} {'class':12s} proto  contribution  own-scale  shared-scale")
    for name in PHOTOS:
        e = explain_image(session, network, Image.fromarray(getattr(photos, name)()))
        picture = viz.enlarge(e.image, 224).resize((160, 160), Image.BILINEAR)
        shared = viz.signed_scale(e.maps)
        tiles = [picture, viz.prototype_overlay(picture, e.maps, MAP_OPACITY)]
        for i in range(len(e.contributions)):
            color = viz.prototype_color(i)
            own = viz.prototype_overlay(picture, e.maps[i], MAP_OPACITY, colors=[color])
            one_scale = viz.map_overlay(picture, e.maps[i], color, opacity=MAP_OPACITY, scale=shared)
            print(f"{name:10s} {e.class_name[:12]:12s} {i + 1:5d}  {float(e.contributions[i]):+12.3f}  "
                  f"{viz.overlay_contrast(own, e.maps[i], color):9.1f}  "
                  f"{viz.overlay_contrast(one_scale, e.maps[i], color):12.1f}")
            tiles.append(own)
        tiles.append(viz.heat_overlay(picture, e.class_map, MAP_OPACITY))
        rows.append(viz.image_grid(tiles, columns=len(tiles)))
    if args.out:
        viz.image_grid(rows, columns=1).save(args.out)
        print(f"saved {args.out}: per photo, the image, all prototypes, each prototype, the class map")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
