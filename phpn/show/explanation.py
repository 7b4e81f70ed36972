"""One image explained for one class, as an object that shows itself.

:class:`Explanation` holds the numbers (logit = Σ contributions + bias, per-prototype where-maps,
the top classes) and renders them: inline in Jupyter (``_repr_html_``: a self-contained page,
images embedded as base64 PNGs, no scripts, no network), as one PNG picture (``to_image``),
or to a file (``save("x.png" | "x.html")``). Both show one view,
:func:`phpn.show.compose.compose_explanation` (the Explain page's too): the HTML is laid out by
:func:`phpn.show.report.explanation_html`, the picture here.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from phpn.atomic import atomic_file
from phpn.errors import ConfigError
from phpn.show.compose import ExplanationView, Panel, Waterfall, compose_explanation
from phpn.show.pictures import seen_image
from phpn.show.report import REPORT_SIZE, explanation_html
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

    def view(self, notes=None, size: int = 224, **options) -> ExplanationView:
        """What is shown (:func:`phpn.show.compose.compose_explanation`), named by ``notes`` when given."""
        return compose_explanation(self, self.run, notes=notes, image_root=self.image_root,
                                   preprocess=self.preprocess, size=size, **options)

    def to_html(self, notes=None) -> str:
        """A self-contained HTML page (the one the app's Export page offers)."""
        if self.run is None:
            raise ConfigError("This explanation does not know its run, so it cannot be written as a page.",
                              "Make it with run.explain(image).")
        return explanation_html(self.view(notes, size=REPORT_SIZE))

    def _repr_html_(self) -> str:
        """The page's body inline (Jupyter), compact (the details fold), its styles scoped to it so
        the notebook keeps its own."""
        self.to_html()  # the same refusal as the page when the run is unknown
        return html_fragment(explanation_html(self.view(None, size=REPORT_SIZE), compact=True))

    def to_image(self, size: int = 224, notes=None) -> Image.Image:
        """One picture of the same panels: the image, all prototypes, the class map, the waterfall
        from the bias to the logit and, per prototype, its map and its top training patches."""
        return render_png(self.view(notes, size=size))

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

    def save(self, path, notes=None) -> Path:
        """Write ``path`` as a PNG picture or a self-contained HTML page (by its extension), its
        prototypes named by ``notes`` when given."""
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix not in SAVE_FORMATS:
            raise ConfigError(f"Cannot save an explanation as '{path.suffix or path.name}'.",
                              f"Use a file name ending in {' or '.join(SAVE_FORMATS)}.")
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as fh:
            if suffix == ".png":
                self.to_image(notes=notes).save(fh, format="PNG")
            else:
                fh.write(self.to_html(notes).encode("utf-8"))
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


_FONT = "DejaVuSans.ttf"  # wide Unicode (Σ, ×, “ ”); Pillow's own font where it is not installed
_WITHOUT_GLYPHS = {"Σ": "sum of", "×": "x", "—": "-"}  # what Pillow's own font cannot draw
_INK, _MUTED, _BAD = (20, 20, 20), (85, 85, 85), (207, 34, 46)
_PAD = 8


def _font(size: int):
    try:
        return ImageFont.truetype(_FONT, size)
    except OSError:
        try:
            return ImageFont.load_default(size=size)
        except TypeError:  # Pillow < 10.1 has one bitmap size
            return ImageFont.load_default()


def _drawable(text: str, font) -> str:
    if getattr(font, "path", "").endswith(_FONT):
        return text
    for glyph, words in _WITHOUT_GLYPHS.items():
        text = text.replace(glyph, words)
    return text


def _lines(text: str, font, width: int) -> list:
    """``text`` broken into lines no wider than ``width`` pixels (a word longer than that stays whole)."""
    lines, line = [], ""
    for word in _drawable(text, font).split(" "):
        trial = f"{line} {word}" if line else word
        if line and font.getlength(trial) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return lines + [line] if line else lines


def _text(text: str, width: int, size: int = 13, fill=_INK, swatch: Optional[str] = None) -> Image.Image:
    """A paragraph, wrapped to ``width``; with ``swatch``, a square of that colour before it."""
    font = _font(size)
    indent = size + 6 if swatch else 0
    lines = [line for paragraph in text.split("\n") for line in _lines(paragraph, font, width - indent)]
    step = size + 5
    img = Image.new("RGB", (width, step * len(lines) + 4), "white")
    draw = ImageDraw.Draw(img)
    if swatch:
        draw.rectangle([0, 3, size, size + 3], fill=swatch)
    for r, line in enumerate(lines):
        draw.text((indent, 2 + r * step), line, fill=fill, font=font)
    return img


def _panel(panel: Panel, width: int) -> Image.Image:
    """A picture ``width`` wide (nearest neighbour: the grid cells stay crisp) and its caption under it."""
    picture = panel.picture.convert("RGB")
    height = max(1, round(picture.height * width / picture.width))
    caption = _text(panel.caption, width, 12, _MUTED)
    img = Image.new("RGB", (width, height + caption.height + 2), "white")
    img.paste(picture.resize((width, height), Image.NEAREST if picture.width < width else Image.LANCZOS), (0, 0))
    img.paste(caption, (0, height + 2))
    return img


def _row(tiles: list) -> Image.Image:
    img = Image.new("RGB", (sum(t.width for t in tiles) + _PAD * (len(tiles) - 1), max(t.height for t in tiles)),
                    "white")
    x = 0
    for tile in tiles:
        img.paste(tile, (x, 0))
        x += tile.width + _PAD
    return img


def _legend(legend: tuple, width: int) -> Image.Image:
    font, x, y, step = _font(12), 0, 0, 18
    placed = []
    for label, color in legend:
        text = _drawable(label, font)
        w = 16 + int(font.getlength(text)) + 14
        if x and x + w > width:
            x, y = 0, y + step
        placed.append((x, y, text, color))
        x += w
    img = Image.new("RGB", (width, y + step + 2), "white")
    draw = ImageDraw.Draw(img)
    for x, y, text, color in placed:
        draw.rectangle([x, y + 2, x + 12, y + 14], fill=color)
        draw.text((x + 16, y + 1), text, fill=_INK, font=font)
    return img


def _waterfall(w: Waterfall, width: int) -> Image.Image:
    """Floating bars from the bias through each prototype's contribution to the logit (PIL, no plotting
    library): the view's steps, labels and colours."""
    bars = [(s.label, s.start, s.end, s.value, s.color) for s in w.steps] + [
        (w.total_label, 0.0, w.logit, w.logit, w.total_color)]
    lo = min([0.0] + [min(a, b) for _, a, b, _, _ in bars])
    hi = max([0.0] + [max(a, b) for _, a, b, _, _ in bars])
    font = _font(13)
    left = min(width // 3, max(int(font.getlength(_drawable(lab, font))) for lab, *_ in bars) + 16)
    row, right = 26, 70
    scale = (width - left - right) / ((hi - lo) or 1.0)

    def x(v: float) -> float:
        return left + (v - lo) * scale

    img = Image.new("RGB", (width, row * len(bars) + 4), "white")
    draw = ImageDraw.Draw(img)
    for r, (label, a, b, value, fill) in enumerate(bars):
        y = r * row
        draw.text((4, y + 4), _drawable(label, font), fill=_INK, font=font)
        x0, x1 = sorted((x(a), x(b)))
        draw.rectangle([x0, y + 3, max(x1, x0 + 1), y + row - 5], fill=fill)
        draw.text((x1 + 4, y + 4), f"{value:+.3f}", fill=_INK, font=font)
    draw.line([(x(0.0), 0), (x(0.0), img.height)], fill=(150, 150, 150))
    return img


def png_parts(view: ExplanationView) -> list:
    """The picture's blocks, top to bottom, each drawn the width of the picture: ("text", text,
    font size, colour, swatch colour or None), ("panels", [Panel]), ("legend", legend) or
    ("waterfall", waterfall); in the order of the Explain page and the HTML report."""
    v = view
    parts = [("text", f"{v.title} — {v.image_name}", 18, _INK, None)]
    if v.chance_warning:
        parts.append(("text", f"Warning: {v.chance_warning}", 13, _BAD, None))
    parts += [("text", "\n".join(f"{what}: {value}" for what, value in v.provenance), 12, _MUTED, None),
              ("text", v.equation, 14, _INK, None), ("panels", list(v.overview)), ("legend", v.legend),
              ("text", "Top predictions", 16, _INK, None),
              ("text", "\n".join(f"{n} ({c}): logit {lg:.3f}, probability {100 * p:.2f}%" for c, n, lg, p in v.top),
               12, _INK, None),
              ("text", v.waterfall.title, 16, _INK, None), ("waterfall", v.waterfall),
              ("text", "This looks like that", 16, _INK, None)]
    if v.patches_note:
        parts.append(("text", v.patches_note, 12, _MUTED, None))
    for p in v.prototypes:
        flags = "".join(f" [{f}]" for f in p.flags)
        parts.append(("text", f"{p.title}{flags}: {p.summary}", 14, _INK, p.color))
        if p.warning:
            parts.append(("text", p.warning, 12, _BAD, None))
        if p.description:
            parts.append(("text", p.description, 12, _MUTED, None))
        parts.append(("panels", [p.where, p.grid] + ([p.looks_like] if p.looks_like else [])))
    return parts


def _block(part: tuple, width: int) -> Image.Image:
    kind = part[0]
    if kind == "text":
        _, text, font_size, fill, swatch = part
        return _text(text, width, font_size, fill, swatch)
    if kind == "legend":
        return _legend(part[1], width)
    if kind == "waterfall":
        return _waterfall(part[1], width)
    tiles = []
    for panel in part[1]:  # each at its own width, the last made to fit
        room = width - sum(t.width for t in tiles) - _PAD * len(tiles)
        tiles.append(_panel(panel, min(panel.width, room)))
    return _row(tiles)


def render_png(view: ExplanationView) -> Image.Image:
    """The view (:func:`phpn.show.compose.compose_explanation`) as one picture: the same panels,
    captions, labels and waterfall as the Explain page and the HTML report (:func:`png_parts`)."""
    width = 4 * view.size + 3 * _PAD
    blocks = [_block(part, width) for part in png_parts(view)]
    canvas = Image.new("RGB", (width + 2 * _PAD, sum(b.height for b in blocks) + _PAD * (len(blocks) + 1)), "white")
    y = _PAD
    for block in blocks:
        canvas.paste(block, (_PAD, y))
        y += block.height + _PAD
    return canvas
