"""Pictures of prototypes: colormaps, overlays, patch grids with boxes, plotly figures.

Everything here takes plain arrays / PIL images and returns new ones (inputs are never
modified). Maps are signed: positive where a prototype adds to its class logit, negative
where it subtracts. Conventions, the same on every page and in reports:

- one colour per prototype (:data:`PALETTE`): its map, its waterfall bar, its patch frames;
- "subtracts" is grey hatching (:data:`NEGATIVE_COLOR`), a colour no prototype uses;
- each prototype's map is scaled to its own range on the image (:func:`own_scale`), so a
  weak prototype is as visible as a strong one; the scale is stated next to the picture
  (:func:`scale_caption`), and the bars give the sizes;
- the photo under a map is muted (partly desaturated) so that a prototype's colour stands
  out even on a photo of the same hue (a blue prototype on a blue sky);
- the combined view (:func:`combined_overlay`) shows where prototypes overlap (stripes of
  both colours) and where the class map is negative (hatching), rather than picking one
  prototype per pixel;
- the raw feature-grid map (:func:`grid_image`) is drawn with a diverging colormap
  (blue < 0 < red) and nearest-neighbour cells, next to the smooth upsampled overlay,
  because upsampling alone can suggest a precision the grid does not have.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from phpn.config import SHARED_PART_MIN_COSINE
from phpn.config import shared_parts as config_shared_parts  # the rule; this one reads a run
from phpn.images.preprocess import load_image
from phpn.show.pictures import seen_picture

# tab10 then the light tab20 tones, without their greys (grey means "subtracts"):
# distinct for up to 18 prototypes.
PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf",
    "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d", "#9edae5",
)
NEGATIVE_COLOR = "#4d4d4d"  # "subtracts": drawn as hatching in this grey
NEGATIVE_RGB = (77, 77, 77)
BIAS_COLOR = "#9e9e9e"  # the bias and the total in a waterfall: neither a prototype nor "subtracts"
TOTAL_COLOR = "#2b2b2b"
NEGATIVE_PATTERN = "/"  # plotly bar pattern of a negative contribution
MUTE = 0.7  # how far the photo under a map is desaturated (0: as is, 1: grey)
SIMILAR_TOP = 3  # "shared parts": other classes' prototypes listed per prototype (and kept in a run's records)
GAMMA = 1.0  # opacity ∝ (value / scale) ** GAMMA: the peaks stand out from a broad low response
TOP_REGION = 0.5  # a map's "top region": at least this fraction of its own largest value (outlines, overlap)

# Anchors (position, RGB) of the colormaps; values in between are interpolated linearly.
_CMAPS = {
    # Grey for negative (subtracts), white at zero, ColorBrewer YlOrRd for positive: no blue, so
    # blue keeps meaning one prototype.
    "signed": [(0.0, NEGATIVE_RGB), (0.25, (150, 150, 150)), (0.5, (250, 250, 250)), (0.6, (254, 217, 118)),
               (0.72, (253, 141, 60)), (0.86, (227, 26, 28)), (1.0, (128, 0, 38))],
    # An inferno-like sequential map for non-negative values.
    "heat": [(0.0, (0, 0, 4)), (0.25, (87, 16, 110)), (0.5, (188, 55, 84)), (0.75, (249, 142, 9)),
             (1.0, (252, 255, 164))],
}


def prototype_color(i: int) -> str:
    return PALETTE[int(i) % len(PALETTE)]


def hex_to_rgb(color: str) -> tuple:
    c = color.lstrip("#")
    return tuple(int(c[j:j + 2], 16) for j in (0, 2, 4))


def colormap(values: np.ndarray, name: str = "signed") -> np.ndarray:
    """Map values in [0, 1] to uint8 RGB (..., 3) with the named colormap."""
    anchors = _CMAPS[name]
    pos = np.array([a[0] for a in anchors])
    rgb = np.array([a[1] for a in anchors], dtype=np.float64)
    v = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float64)), 0.0, 1.0)
    out = np.stack([np.interp(v, pos, rgb[:, ch]) for ch in range(3)], axis=-1)
    return np.round(out).astype(np.uint8)


def signed_scale(maps: np.ndarray) -> float:
    """A symmetric colour range: the largest |value| (never 0)."""
    m = float(np.nanmax(np.abs(maps))) if np.size(maps) else 0.0
    return m if m > 0 else 1.0


def as_rgb(image) -> np.ndarray:
    """PIL image or array (H, W) / (H, W, 1|3|4) -> uint8 (H, W, 3)."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(arr[:, :, :3])


def enlarge(image, min_size: int = 224) -> Image.Image:
    """Scale a small image up (nearest neighbour, whole factor) so its pixels stay crisp."""
    img = image if isinstance(image, Image.Image) else Image.fromarray(as_rgb(image))
    img = img.convert("RGB")
    factor = max(1, int(np.ceil(min_size / max(1, min(img.size)))))
    if factor == 1:
        return img
    return img.resize((img.width * factor, img.height * factor), Image.NEAREST)


def upsample(map2d: np.ndarray, size: tuple, mode: str = "bicubic") -> np.ndarray:
    """A feature-grid map (h, w) resized to ``size`` = (height, width)."""
    t = torch.as_tensor(np.asarray(map2d, dtype=np.float32))[None, None]
    kwargs = {} if mode == "nearest" else {"align_corners": False}
    out = F.interpolate(t, size=tuple(int(s) for s in size), mode=mode, **kwargs)
    return out[0, 0].numpy()


def grid_image(map2d: np.ndarray, size: int = 224, lines: bool = True,
               color: Optional[str] = None) -> Image.Image:
    """The raw feature-grid map, one flat cell per position, on its own scale (:func:`own_scale`).

    With ``color`` (a prototype's map): white to that colour where it adds, white to grey
    where it subtracts. Without (a class map): grey < 0 < yellow-red.
    """
    m = np.asarray(map2d, dtype=np.float64)
    v = np.clip(m / own_scale(m), -1, 1)
    if color is None:
        rgb = colormap(0.5 + 0.5 * v, "signed")
    else:
        white = np.array([250.0, 250.0, 250.0])
        target = np.where((v >= 0)[..., None], np.array(hex_to_rgb(color), dtype=np.float64),
                          np.array(NEGATIVE_RGB, dtype=np.float64))
        rgb = np.round(white + np.abs(v)[..., None] * (target - white)).astype(np.uint8)
    h, w = m.shape
    cell = max(1, int(round(size / max(h, w))))
    img = Image.fromarray(rgb).resize((w * cell, h * cell), Image.NEAREST)
    if lines and cell >= 6:
        draw = ImageDraw.Draw(img)
        for r in range(1, h):
            draw.line([(0, r * cell), (w * cell, r * cell)], fill=(200, 200, 200), width=1)
        for c in range(1, w):
            draw.line([(c * cell, 0), (c * cell, h * cell)], fill=(200, 200, 200), width=1)
    return img


def heat_overlay(image, map2d: np.ndarray, opacity: float = 0.6, mode: str = "bicubic",
                 signed: bool = True) -> Image.Image:
    """Image blended with a heat map of ``map2d`` upsampled to the image size.

    Signed (a class map): yellow-red where it adds (opacity ∝ value), grey hatching where it
    subtracts, over the muted photo; on its own scale, as every map.
    """
    base = mute(image)
    up = upsample(map2d, base.shape[:2], mode)
    if signed:
        rel = np.clip(up / signed_scale(up), -1, 1)
        rgb = colormap(0.5 + 0.5 * np.clip(rel, 0, 1), "signed").astype(np.float64)
        alpha = (opacity * np.clip(rel, 0, 1))[..., None]
        out = _hatch((1 - alpha) * base + alpha * rgb, np.clip(-rel, 0, 1), opacity)
    else:
        lo, hi = float(up.min()), float(up.max())
        rgb = colormap((up - lo) / (hi - lo) if hi > lo else np.zeros_like(up), "heat").astype(np.float64)
        alpha = np.full(up.shape + (1,), float(opacity))
        out = (1 - alpha) * base + alpha * rgb
    return Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8))


def own_scale(map2d: np.ndarray) -> float:
    """The value drawn at full colour for one prototype on one image: its largest |value|
    (never 0). Each prototype gets its own, so a weak one stays visible."""
    return signed_scale(map2d)


def scale_caption(scale: float) -> str:
    """How a map drawn with :func:`own_scale` reads, for a caption."""
    return f"full colour = {float(scale):.3g} (its own largest |value| here); hatching: subtracts"


def mute(image) -> np.ndarray:
    """The photo under a map, float (H, W, 3): partly desaturated so prototype colours stand out."""
    base = as_rgb(image).astype(np.float64)
    grey = base @ np.array([0.299, 0.587, 0.114])
    return (1 - MUTE) * base + MUTE * grey[..., None]


def _stripes(shape: tuple, period: int, direction: int = 1) -> np.ndarray:
    """A boolean (H, W) pattern of diagonal stripes, half on, half off."""
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    return ((xx + direction * yy) // max(1, period // 2)) % 2 == 0


def _period(shape: tuple) -> int:
    return max(4, int(round(min(shape[:2]) / 28)))


def _edges(mask: np.ndarray, width: int) -> np.ndarray:
    """The boundary of a boolean mask, ``width`` pixels thick (inside the mask)."""
    inner = mask.copy()
    for _ in range(max(1, int(width))):
        shrunk = inner.copy()
        shrunk[1:] &= inner[:-1]
        shrunk[:-1] &= inner[1:]
        shrunk[:, 1:] &= inner[:, :-1]
        shrunk[:, :-1] &= inner[:, 1:]
        inner = shrunk
    return mask & ~inner


def _hatch(out: np.ndarray, strength: np.ndarray, opacity: float) -> np.ndarray:
    """Grey hatching where ``strength`` (H, W) in [0, 1] is positive: "subtracts"."""
    stripes = _stripes(strength.shape, _period(strength.shape), -1)
    beta = (min(1.0, opacity + 0.2) * strength * stripes)[..., None]
    return (1 - beta) * out + beta * np.array(NEGATIVE_RGB, dtype=np.float64)


def map_overlay(image, map2d: np.ndarray, color: str, *, opacity: float = 0.7, scale: Optional[float] = None,
                mode: str = "bicubic", outline: bool = False, negative: bool = True) -> Image.Image:
    """One prototype's map over the image, in its colour.

    The photo is muted (:func:`mute`); the colour's opacity is ``opacity`` × value / ``scale``
    (by default :func:`own_scale` of the map, as everywhere phpn draws maps; another ``scale``
    only serves to measure what the own scale gains); negative values are hatched grey; with
    ``outline`` the top region (≥ :data:`TOP_REGION` of the scale) is outlined in the colour.
    """
    base = mute(image)
    m = np.asarray(map2d, dtype=np.float64)
    scale = float(scale) if scale else own_scale(m)
    up = upsample(m, base.shape[:2], mode) / scale
    pos = np.clip(up, 0, 1)
    alpha = (opacity * pos ** GAMMA)[..., None]
    rgb = np.array(hex_to_rgb(color), dtype=np.float64)
    out = (1 - alpha) * base + alpha * rgb
    if negative:
        out = _hatch(out, np.clip(-up, 0, 1), opacity)
    if outline:
        out[_edges(pos >= TOP_REGION, max(1, min(base.shape[:2]) // 100))] = rgb
    return Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8))


def combined_overlay(image, maps: np.ndarray, colors: Optional[Sequence[str]] = None, *, opacity: float = 0.7,
                     mode: str = "bicubic", outline: bool = True, negative: bool = True,
                     show: Optional[Sequence[int]] = None) -> Image.Image:
    """All prototypes at once, each scaled to its own range.

    A pixel takes the colour of the prototype strongest there relative to its own range;
    where a second prototype is also in its top region, the pixel is striped with both
    colours (overlap); where the class map (the sum of all maps) is negative, grey hatching
    (subtracts). With ``outline`` each prototype's top region is outlined in its colour.
    """
    base = mute(image)
    maps = np.asarray(maps, dtype=np.float64)
    if maps.ndim == 2:
        maps = maps[None]
    k = maps.shape[0]
    show = list(range(k)) if show is None else [int(i) for i in show]
    colors = list(colors) if colors is not None else [prototype_color(i) for i in range(k)]
    if not show:
        return Image.fromarray(np.clip(np.round(base), 0, 255).astype(np.uint8))
    up = np.stack([upsample(maps[i], base.shape[:2], mode) for i in show])  # (s, H, W)
    rel = np.clip(up / np.array([own_scale(maps[i]) for i in show])[:, None, None], 0, 1)
    palette = np.array([hex_to_rgb(colors[i]) for i in show], dtype=np.float64)
    order = np.argsort(-rel, axis=0)
    first = order[0]
    value = np.take_along_axis(rel, first[None], 0)[0]
    rgb = palette[first]
    if len(show) > 1:
        second = order[1]
        second_value = np.take_along_axis(rel, second[None], 0)[0]
        overlap = (second_value >= TOP_REGION) & _stripes(value.shape, _period(value.shape))
        rgb = np.where(overlap[..., None], palette[second], rgb)
    alpha = (opacity * value ** GAMMA)[..., None]
    out = (1 - alpha) * base + alpha * rgb
    if negative:
        total = up.sum(0)
        out = _hatch(out, np.clip(-total / signed_scale(total), 0, 1), opacity)
    if outline:
        width = max(1, min(base.shape[:2]) // 110)
        for j in range(len(show)):
            out[_edges(rel[j] >= TOP_REGION, width)] = palette[j]
    return Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8))


def prototype_overlay(image, maps: np.ndarray, opacity: float = 0.7, colors: Optional[Sequence[str]] = None,
                      show: Optional[Sequence[int]] = None, mode: str = "bicubic", negative: bool = True,
                      outline: bool = False) -> Image.Image:
    """The image coloured by prototype maps: one map (h, w) or several (k, h, w), each on its
    own scale (:func:`own_scale`; the rule of every page and report, see the module doc).

    One map: :func:`map_overlay`. Several maps: :func:`combined_overlay`.
    """
    maps = np.asarray(maps, dtype=np.float64)
    if maps.ndim == 3 and maps.shape[0] == 1 and show is None:
        maps = maps[0]
    if maps.ndim == 2:
        color = (list(colors) if colors is not None else [prototype_color(0)])[0]
        return map_overlay(image, maps, color, opacity=opacity, mode=mode, outline=outline, negative=negative)
    return combined_overlay(image, maps, colors, opacity=opacity, mode=mode, outline=True, negative=negative,
                            show=show)


def overlay_contrast(overlay, map2d: np.ndarray, color: str, top: float = 0.2, mode: str = "bicubic") -> float:
    """How visible a prototype's map is in a picture, in RGB units (0-441).

    The mean distance to the prototype's colour of the pixels outside the map's top
    ``top`` fraction, minus the same for the pixels inside it: large when the region the
    prototype fires on visibly takes its colour and the rest does not; near 0 when the
    colour fades out or the photo already has that hue everywhere.
    """
    arr = as_rgb(overlay).astype(np.float64)
    up = upsample(np.asarray(map2d, dtype=np.float64), arr.shape[:2], mode)
    inside = up >= np.quantile(up, 1 - top)
    if inside.all() or not inside.any():
        return 0.0
    dist = np.linalg.norm(arr - np.array(hex_to_rgb(color), dtype=np.float64), axis=-1)
    return float(dist[~inside].mean() - dist[inside].mean())


def scale_box(box: Sequence[float], factor: float) -> list:
    return [float(v) * factor for v in box]


def draw_box(image, box: Sequence[float], color: str = "#ffcc00", width: int = 2) -> Image.Image:
    """A copy of ``image`` with the rectangle [x0, y0, x1, y1] drawn on it."""
    img = (image if isinstance(image, Image.Image) else Image.fromarray(as_rgb(image))).convert("RGB").copy()
    x0, y0, x1, y1 = [float(v) for v in box]
    draw = ImageDraw.Draw(img)
    draw.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=hex_to_rgb(color), width=int(width))
    return img


def patch_tile(image, box: Sequence[float], color: str = "#ffcc00", size: int = 112) -> Image.Image:
    """The whole image, enlarged to about ``size`` px, with the patch ``box`` drawn on it."""
    img = image if isinstance(image, Image.Image) else Image.fromarray(as_rgb(image))
    img = img.convert("RGB")
    factor = size / max(img.size)
    big = img.resize((max(1, round(img.width * factor)), max(1, round(img.height * factor))),
                     Image.NEAREST if factor >= 2 else Image.BILINEAR)
    return draw_box(big, scale_box(box, factor), color, width=max(2, size // 50))


def crop_patch(image, box: Sequence[float], size: int = 96) -> Image.Image:
    """Just the patch inside ``box``, scaled to ``size`` px."""
    img = image if isinstance(image, Image.Image) else Image.fromarray(as_rgb(image))
    x0, y0, x1, y1 = [int(round(v)) for v in box]
    crop = img.convert("RGB").crop((x0, y0, max(x0 + 1, x1), max(y0 + 1, y1)))
    return crop.resize((size, size), Image.NEAREST if crop.width < size / 2 else Image.BILINEAR)


def image_grid(tiles: Sequence[Image.Image], columns: int = 6, pad: int = 4,
               background=(255, 255, 255)) -> Image.Image:
    """Tiles (any sizes) laid out row by row in one picture."""
    tiles = [t.convert("RGB") for t in tiles]
    if not tiles:
        return Image.new("RGB", (1, 1), background)
    columns = max(1, min(columns, len(tiles)))
    rows = (len(tiles) + columns - 1) // columns
    cw = max(t.width for t in tiles)
    ch = max(t.height for t in tiles)
    out = Image.new("RGB", (columns * cw + (columns + 1) * pad, rows * ch + (rows + 1) * pad), background)
    for i, t in enumerate(tiles):
        r, c = divmod(i, columns)
        out.paste(t, (pad + c * (cw + pad), pad + r * (ch + pad)))
    return out


def patch_pair(image, box: Sequence[float], color: str = "#ffcc00", size: int = 112) -> Image.Image:
    """The boxed context and, beside it, the patch zoomed to the same size, framed in ``color``."""
    context = patch_tile(image, box, color, size)
    zoom = crop_patch(image, box, size)
    frame = max(2, size // 40)
    out = Image.new("RGB", (context.width + size + 2 * frame + 2, max(context.height, size + 2 * frame)),
                    (255, 255, 255))
    out.paste(context, (0, 0))
    x = context.width + 2
    ImageDraw.Draw(out).rectangle([x, 0, x + size + 2 * frame - 1, size + 2 * frame - 1], fill=hex_to_rgb(color))
    out.paste(zoom, (x + frame, frame))
    return out


def patch_grid(images: Sequence, boxes: Sequence[Sequence[float]], color: str = "#ffcc00", size: int = 112,
               columns: int = 6, zoom: bool = True) -> Image.Image:
    """ProtoPNet-style: a prototype's top training images, each with its patch boxed and, with
    ``zoom``, the patch enlarged beside it (``columns`` counts such pairs)."""
    tile = patch_pair if zoom else patch_tile
    return image_grid([tile(im, b, color, size) for im, b in zip(images, boxes)], columns=columns)


def color_swatch(color: str, size: int = 14) -> str:
    """A small inline HTML square of ``color`` (for markdown / reports)."""
    return (f'<span style="display:inline-block;width:{size}px;height:{size}px;background:{color};'
            f'border-radius:3px;vertical-align:middle;margin-right:4px"></span>')


# --- numbers behind the pictures -----------------------------------------------------------

def contribution_shares(mean_contribution: Sequence[float]) -> np.ndarray:
    """Each prototype's share of the class's mean (logit − bias): contribution / Σ contributions.

    Shares sum to 1; a prototype that lowers the logit has a negative share. When the
    contributions largely cancel (|Σ| < half of Σ|c|), such shares would be huge and
    meaningless, so shares of the total absolute contribution (c / Σ|c|) are returned instead.
    """
    c = np.asarray(mean_contribution, dtype=np.float64)
    total, absolute = c.sum(), np.abs(c).sum()
    if absolute == 0:
        return np.zeros_like(c)
    if abs(total) >= 0.5 * absolute:
        return c / total
    return c / absolute


def similar_prototypes(prototypes, class_indices: Sequence[int], rows: Optional[Sequence[int]] = None,
                       top: int = SIMILAR_TOP, min_cosine: float = 0.0, device=None,
                       block_elements: int = 2 ** 25) -> list:
    """"Shared parts" of many classes at once: for each prototype of each class row in ``rows``
    (default: all), the ``top`` most similar prototypes of other classes by cosine similarity
    of the prototype vectors, at least ``min_cosine``, best first.

    ``prototypes`` is (Cd, k, D) (a run's refined prototypes, in run order). Zero rows (the
    unused slots of a class with fewer than k prototypes) are not prototypes: never listed,
    and a zero row finds nothing. Returns, per row, one list per prototype of dicts
    {class_index, prototype, cosine}. Computed in float64 on ``device``, a block of rows at a
    time (about ``block_elements`` similarities in memory).
    """
    p = torch.as_tensor(prototypes.detach() if hasattr(prototypes, "detach") else np.asarray(prototypes))
    p = p.to(device or p.device, torch.float64)
    classes = [int(c) for c in (class_indices.tolist() if hasattr(class_indices, "tolist") else class_indices)]
    cd, k, d = p.shape
    rows = list(range(cd)) if rows is None else [int(r) for r in rows]
    flat = p.reshape(cd * k, d)
    norms = flat.norm(dim=1)
    unit = flat / torch.where(norms > 0, norms, torch.ones_like(norms))[:, None]
    owner = torch.arange(cd * k, device=p.device) // k  # the class row of each prototype
    empty = norms == 0
    wanted = min(int(top), cd * k)
    out = []
    per_block = max(1, int(block_elements) // max(1, cd * k * k))
    for start in range(0, len(rows), per_block):
        block = torch.as_tensor(rows[start:start + per_block], device=p.device)
        queries = (block[:, None] * k + torch.arange(k, device=p.device)).reshape(-1)  # (b·k,)
        sims = unit[queries] @ unit.T  # (b·k, Cd·k)
        sims[owner[None, :] == block.repeat_interleave(k)[:, None]] = -torch.inf  # other classes only
        sims[:, empty] = -torch.inf
        sims[empty[queries]] = -torch.inf
        values, where = sims.topk(wanted, dim=1) if wanted else (sims[:, :0], sims[:, :0].long())
        values, where = values.cpu().tolist(), where.cpu().tolist()
        for b in range(len(block)):
            found = []
            for i in range(k):
                q = b * k + i
                found.append([{"class_index": classes[j // k], "prototype": j % k, "cosine": v}
                              for v, j in zip(values[q], where[q]) if np.isfinite(v) and v >= min_cosine])
            out.append(found)
    return out


def prototype_similarity(prototypes, class_indices: Sequence[int], class_index: int, top: int = SIMILAR_TOP,
                         min_cosine: float = 0.0) -> list:
    """"Shared parts": for each prototype of ``class_index``, the most similar prototypes of
    other classes by cosine similarity of the prototype vectors (:func:`similar_prototypes`).

    ``prototypes`` is (Cd, k, D) (a run's refined prototypes). Returns one list per
    prototype of dicts {class_index, prototype, cosine}, best first.
    """
    classes = [int(c) for c in (class_indices.tolist() if hasattr(class_indices, "tolist") else class_indices)]
    return similar_prototypes(prototypes, classes, rows=[classes.index(int(class_index))], top=top,
                              min_cosine=min_cosine)[0]


def shared_parts(run, class_index: int, top: int = SIMILAR_TOP,
                 min_cosine: float = SHARED_PART_MIN_COSINE) -> list:
    """"Shared parts" of a run's class, one list per prototype of its own k: of its ``top`` most
    similar prototypes of other classes, those that count as shared (:func:`phpn.config.shared_parts`:
    a cosine of at least ``min_cosine``; a cosine near 0 is nothing in common). Read from the
    class's record (``similar_prototypes``, kept by discovery: one shard read), or computed from
    every prototype of the run for a run made before discovery kept them or asked for more than
    it kept. The Class browser, the reports and ``phpn.api`` all list these."""
    stored = run.class_meta(class_index).get("similar_prototypes")
    if stored is not None and top <= SIMILAR_TOP:
        found = [list(similar[:top]) for similar in stored]
    else:
        found = prototype_similarity(run.prototypes, run.class_indices, class_index, top=top)[:run.class_k(class_index)]
    return [config_shared_parts(similar, min_cosine) for similar in found]


def class_maps(network, preprocess, root, paths: Sequence[str], class_index: int):
    """Prototype maps of ``class_index`` on a few images of a folder.

    Returns (pictures as seen by the model [PIL], maps (n, k, h, w), contributions (n, k),
    kept paths); unreadable images are left out.
    """
    pictures, tensors, kept = [], [], []
    for rel in paths:
        try:
            seen = seen_picture(load_image(Path(root) / rel), preprocess)  # grey for a grey model
        except Exception:
            continue
        pictures.append(seen)
        tensors.append(preprocess.normalise(seen))
        kept.append(rel)
    if not tensors:
        return [], np.zeros((0,)), np.zeros((0,)), []
    with torch.inference_mode():
        feats = network.backbone(torch.stack(tensors).to(network.backbone_device)).float()
        out = network.explain_features(feats, classes=[int(class_index)])
    return (pictures, out.maps[:, 0].cpu().numpy(), out.contributions[:, 0].cpu().numpy(), kept)


# --- plotly figures --------------------------------------------------------------------------

def _layout(fig, height: int, title: Optional[str] = None):
    fig.update_layout(height=height, margin=dict(l=10, r=10, t=40 if title else 10, b=10), title=title,
                      showlegend=False)
    return fig


def figure_contributions(mean_contribution: Sequence[float], labels: Optional[Sequence[str]] = None,
                         colors: Optional[Sequence[str]] = None, title: Optional[str] = None, height: int = 300):
    """Bar chart: each prototype's mean contribution to the class logit (and its share)."""
    import plotly.graph_objects as go  # noqa: PLC0415 - optional dependency

    c = np.asarray(mean_contribution, dtype=np.float64)
    k = len(c)
    labels = list(labels) if labels is not None else [f"prototype {i + 1}" for i in range(k)]
    colors = list(colors) if colors is not None else [prototype_color(i) for i in range(k)]
    shares = contribution_shares(c)
    fig = go.Figure(go.Bar(x=labels, y=c, marker=dict(color=colors, pattern=dict(
                               shape=[NEGATIVE_PATTERN if v < 0 else "" for v in c], fgcolor=NEGATIVE_COLOR)),
                           text=[f"{v:.2f} ({100 * s:.0f}%)" for v, s in zip(c, shares)], textposition="auto",
                           hovertemplate="%{x}: %{y:.3f}<extra></extra>"))
    fig.update_yaxes(title="mean contribution to the logit", zeroline=True)
    return _layout(fig, height, title)


def figure_waterfall(bias: float, contributions: Sequence[float], logit: float,
                     labels: Optional[Sequence[str]] = None, colors: Optional[Sequence[str]] = None,
                     title: Optional[str] = None, height: int = 340, start_label: str = "bias",
                     end_label: str = "logit"):
    """From the bias to the logit, one floating bar per prototype in its own colour; a
    contribution that subtracts is hatched. (Also a logit gap: from the bias difference.)"""
    import plotly.graph_objects as go  # noqa: PLC0415 - optional dependency

    c = [float(v) for v in contributions]
    k = len(c)
    labels = list(labels) if labels is not None else [f"prototype {i + 1}" for i in range(k)]
    colors = list(colors) if colors is not None else [prototype_color(i) for i in range(k)]
    starts = list(np.cumsum([float(bias)] + c)[:-1])
    x = [start_label] + labels + [end_label]
    base = [0.0] + starts + [0.0]
    y = [float(bias)] + c + [float(logit)]
    fig = go.Figure(go.Bar(
        x=x, y=y, base=base, marker=dict(color=[BIAS_COLOR] + colors[:k] + [TOTAL_COLOR],
                                         pattern=dict(shape=[""] + [NEGATIVE_PATTERN if v < 0 else "" for v in c] + [""],
                                                      fgcolor=NEGATIVE_COLOR)),
        text=[f"{float(bias):+.2f}"] + [f"{v:+.2f}" for v in c] + [f"{float(logit):.2f}"], textposition="outside",
        hovertemplate="%{x}: %{text}<extra></extra>"))
    fig.update_yaxes(title=end_label, zeroline=True)
    return _layout(fig, height, title)


def figure_top_predictions(top: Sequence, height: int = 220, title: Optional[str] = None):
    """Horizontal bars of the top classes' probabilities; ``top`` is [(index, name, logit, prob)]."""
    import plotly.graph_objects as go  # noqa: PLC0415 - optional dependency

    top = list(top)[::-1]
    fig = go.Figure(go.Bar(x=[t[3] for t in top], y=[f"{t[1]} ({t[0]})" for t in top], orientation="h",
                           marker_color="#4c78a8", text=[f"{100 * t[3]:.1f}%  logit {t[2]:.2f}" for t in top],
                           textposition="auto", hovertemplate="%{y}: %{x:.3f}<extra></extra>"))
    fig.update_xaxes(title="probability", range=[0, 1])
    return _layout(fig, height, title)


def figure_deletion(curves: Sequence[dict], title: Optional[str] = None, height: int = 320):
    """Deletion curves from ``phpn.evaluate``: mean own-class logit drop vs fraction deleted.

    ``curves`` is a list of {"name", "fractions", "values"} (already averaged).
    """
    import plotly.graph_objects as go  # noqa: PLC0415 - optional dependency

    fig = go.Figure()
    for i, c in enumerate(curves):
        fig.add_trace(go.Scatter(x=list(c["fractions"]), y=list(c["values"]), mode="lines+markers", name=c["name"],
                                 line=dict(color=PALETTE[i % len(PALETTE)])))
    fig.update_xaxes(title="fraction of pixels deleted")
    fig.update_yaxes(title="contribution")
    fig = _layout(fig, height, title)
    fig.update_layout(showlegend=True)
    return fig


def figure_bars(values: dict, title: Optional[str] = None, height: int = 260, ytitle: str = ""):
    """A plain bar chart of {label: value}."""
    import plotly.graph_objects as go  # noqa: PLC0415 - optional dependency

    fig = go.Figure(go.Bar(x=list(values), y=[float(v) if v is not None else 0.0 for v in values.values()],
                           marker_color=[PALETTE[i % len(PALETTE)] for i in range(len(values))]))
    fig.update_yaxes(title=ytitle)
    return _layout(fig, height, title)
