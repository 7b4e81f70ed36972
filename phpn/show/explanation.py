"""One image explained for one class, as an object that shows itself.

:class:`Explanation` holds the numbers (logit = Σ contributions + bias, per-prototype where-maps,
the top classes) and renders them: inline in Jupyter (``_repr_html_``: a self-contained page,
images embedded as base64 PNGs, no scripts, no network), as one PNG picture (``to_image``),
or to a file (``save("x.png" | "x.html")``). The HTML is :func:`phpn.show.report.explanation_report`;
the picture is drawn here with the same colours (``phpn.show.viz``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from phpn.atomic import atomic_file
from phpn.config import MAP_OPACITY
from phpn.errors import ConfigError
from phpn.show import viz
from phpn.show.pictures import seen_image
from phpn.show.report import explanation_report
from phpn.show.viz import crop_patch

SAVE_FORMATS = (".png", ".html")


@dataclass
class Explanation:
    """Everything shown for one image and one class."""

    image: Image.Image  # the resized, cropped picture the model saw
    class_index: int
    class_name: str
    logit: float
    bias: float
    contributions: np.ndarray  # (k,)
    maps: np.ndarray  # (k, H, W) on the feature grid; mean over (H, W) = contributions
    top: list  # [(class index, name, logit, probability)], best first
    decomposed: bool = True
    source: str = ""  # where the image came from (a file name), for reports
    run: object = field(default=None, repr=False)  # the run that explained it, for its prototypes' records
    preprocess: object = field(default=None, repr=False)
    image_root: object = field(default=None, repr=False)  # the discovery images (a folder or in memory)

    def __repr__(self) -> str:  # a line of numbers, never the arrays (the picture is _repr_html_)
        parts = " + ".join(f"{c:.3g}" for c in self.contributions)
        where = f" for {self.source}" if self.source else ""
        return (f"<Explanation{where}: {self.class_name} (class {self.class_index}), logit {self.logit:.4g} = "
                f"bias {self.bias:.3g} + {parts} ({self.k} prototypes, maps {'x'.join(map(str, self.maps.shape[1:]))})>")

    @property
    def class_map(self) -> np.ndarray:
        """The class activation map: the sum of the prototype maps."""
        return self.maps.sum(0)

    @property
    def k(self) -> int:
        return int(len(self.contributions))

    @property
    def top_patches(self) -> list:
        """Per prototype, its top training patches as the run records them ({path, score, box}, best
        first): what the prototype looks for."""
        return list(self.run.class_meta(self.class_index).get("top_patches", [])) if self.run is not None else []

    def patch_pictures(self, prototype: int, count: int = 4, size: int = 96) -> list:
        """Prototype ``prototype``'s top patches as pictures (crops of the discovery images as the
        model saw them); empty when those images cannot be read here."""
        entries = self.top_patches[prototype][:count] if prototype < len(self.top_patches) else []
        out = []
        for entry in entries:
            seen = seen_image(self.image_root, entry["path"], self.preprocess)
            if seen is not None:
                out.append(crop_patch(seen, entry["box"], size))
        return out

    def to_dict(self) -> dict:
        return {
            "image": self.source, "class": self.class_index, "class_name": self.class_name, "logit": self.logit,
            "bias": self.bias, "contributions": [float(c) for c in self.contributions],
            "contributions_plus_bias": float(self.contributions.sum() + self.bias),
            "top": [{"class": c, "name": n, "logit": lg, "probability": p} for c, n, lg, p in self.top],
        }

    # --- rendering ---------------------------------------------------------------------------

    def to_html(self) -> str:
        """A self-contained HTML page (the one the app's Export page offers)."""
        if self.run is None:
            raise ConfigError("This explanation does not know its run, so it cannot be written as a page.",
                              "Make it with run.explain(image).")
        return explanation_report(self, self.run, image_root=self.image_root, preprocess=self.preprocess)

    def _repr_html_(self) -> str:
        """The page's body inline (Jupyter), its styles scoped to it so the notebook keeps its own."""
        return html_fragment(self.to_html())

    def to_image(self, size: int = 224) -> Image.Image:
        """One picture: the image, all prototypes, the class map, each prototype's map and the
        waterfall from bias to logit."""
        return render_png(self, size)

    def show(self) -> None:
        """Display inline in Jupyter; elsewhere open the picture in the system's image viewer."""
        try:
            from IPython import get_ipython  # noqa: PLC0415 - optional dependency
            from IPython.display import display  # noqa: PLC0415 - optional dependency

            if get_ipython() is not None and getattr(get_ipython(), "kernel", None) is not None:
                display(self)
                return
        except ImportError:
            pass
        self.to_image().show()

    def save(self, path) -> Path:
        """Write ``path`` as a PNG picture or a self-contained HTML page (by its extension)."""
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix not in SAVE_FORMATS:
            raise ConfigError(f"Cannot save an explanation as '{path.suffix or path.name}'.",
                              f"Use a file name ending in {' or '.join(SAVE_FORMATS)}.")
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as fh:
            if suffix == ".png":
                self.to_image().save(fh, format="PNG")
            else:
                fh.write(self.to_html().encode("utf-8"))
        return path


_SCOPE = "phpn-explanation"


def html_fragment(page: str) -> str:
    """A self-contained HTML page as one ``<div>``: the body, and the page's CSS with every
    selector scoped to that div (``body`` becomes the div itself)."""
    style = re.search(r"<style>(.*?)</style>", page, re.S)
    body = re.search(r"<body>(.*)</body>", page, re.S)
    rules = []
    for selectors, block in re.findall(r"([^{}]+)\{([^{}]*)\}", style.group(1) if style else ""):
        scoped = [f".{_SCOPE}" if sel.strip() == "body" else f".{_SCOPE} {sel.strip()}"
                  for sel in selectors.split(",") if sel.strip()]
        rules.append(f"{','.join(scoped)}{{{block}}}")
    return f'<div class="{_SCOPE}"><style>{"".join(rules)}</style>{body.group(1) if body else page}</div>'


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def _waterfall(e: Explanation, width: int, colors: list) -> Image.Image:
    """Bars from the bias through each prototype's contribution to the logit (PIL, no plotting library)."""
    labels = ["bias"] + [f"prototype {i + 1}" for i in range(e.k)] + ["logit"]
    steps = [e.bias] + [float(c) for c in e.contributions]
    ends = np.cumsum(steps)
    starts = np.concatenate([[0.0], ends[:-1]])
    bars = list(zip(starts, ends)) + [(0.0, e.logit)]
    lo = min(0.0, *[min(a, b) for a, b in bars])
    hi = max(0.0, *[max(a, b) for a, b in bars])
    span = (hi - lo) or 1.0
    row, left, right = 26, 110, 70
    img = Image.new("RGB", (width, row * len(bars) + 30), "white")
    draw, font = ImageDraw.Draw(img), _font(13)
    draw.text((8, 4), "from bias to logit", fill=(40, 40, 40), font=font)
    scale = (width - left - right) / span

    def x(v: float) -> float:
        return left + (v - lo) * scale

    fills = ["#444444"] + colors + ["#222222"]
    for r, ((a, b), label, fill) in enumerate(zip(bars, labels, fills)):
        y = 26 + r * row
        draw.text((8, y + 4), label, fill=(40, 40, 40), font=font)
        x0, x1 = sorted((x(a), x(b)))
        draw.rectangle([x0, y + 3, max(x1, x0 + 1), y + row - 5], fill=fill)
        value = e.logit if label == "logit" else b - a
        draw.text((max(x0, x1) + 4, y + 4), f"{value:+.3f}", fill=(40, 40, 40), font=font)
    draw.line([(x(0.0), 22), (x(0.0), img.height)], fill=(150, 150, 150))
    return img


def render_png(e: Explanation, size: int = 224) -> Image.Image:
    colors = [viz.prototype_color(i) for i in range(e.k)]
    picture = viz.enlarge(e.image, size).resize((size, size))
    tiles = [(picture, "the image as the model sees it"),
             (viz.prototype_overlay(picture, e.maps, MAP_OPACITY, colors=colors), "all prototypes"),
             (viz.heat_overlay(picture, e.class_map, MAP_OPACITY), "class map = sum of prototype maps")]
    small = max(96, size * 2 // 3)
    protos = [(viz.prototype_overlay(picture, e.maps[i], MAP_OPACITY, colors=[colors[i]])
               .resize((small, small)),
               f"prototype {i + 1}: {float(e.contributions[i]):+.3f}") for i in range(e.k)]
    strip = (small - 2 * 4) // 3  # three top patches under each map: what the prototype looks for
    patches = [e.patch_pictures(i, 3, strip) for i in range(e.k)]
    patch_row = strip + 4 if any(patches) else 0
    pad, caption = 8, 20
    width = max(3 * (size + pad), min(len(protos), 6) * (small + pad)) + pad
    waterfall = _waterfall(e, width - 2 * pad, colors)
    proto_rows = -(-len(protos) // 6)
    height = (34 + (size + caption + pad) + proto_rows * (small + caption + patch_row + pad) + waterfall.height
              + 2 * pad)
    canvas = Image.new("RGB", (width, height), "white")
    draw, font = ImageDraw.Draw(canvas), _font(13)
    title = (f"{e.class_name} (class {e.class_index}): logit {e.logit:.3f} = bias {e.bias:.3f} "
             f"+ contributions {float(np.sum(e.contributions)):.3f}")
    draw.text((pad, 8), title, fill=(0, 0, 0), font=_font(15))
    y = 34
    for i, (tile, text) in enumerate(tiles):
        canvas.paste(tile.convert("RGB"), (pad + i * (size + pad), y))
        draw.text((pad + i * (size + pad), y + size + 3), text, fill=(60, 60, 60), font=font)
    y += size + caption + pad
    for i, (tile, text) in enumerate(protos):
        r, c = divmod(i, 6)
        top = y + r * (small + caption + patch_row + pad)
        for j, crop in enumerate(patches[i]):
            canvas.paste(crop.convert("RGB"), (pad + c * (small + pad) + j * (strip + 4), top + small + caption))
        canvas.paste(tile.convert("RGB"), (pad + c * (small + pad), top))
        draw.rectangle([pad + c * (small + pad), top + small + 2, pad + c * (small + pad) + 10, top + small + 12],
                       fill=colors[i])
        draw.text((pad + c * (small + pad) + 14, top + small + 1), text, fill=(60, 60, 60), font=font)
    y += proto_rows * (small + caption + patch_row + pad)
    canvas.paste(waterfall, (pad, y))
    return canvas
