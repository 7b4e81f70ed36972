"""Pictures of prototypes: colormaps, overlays, patch grids with boxes, plotly figures.

Everything here takes plain arrays / PIL images and returns new ones (inputs are never
modified). Maps are signed: positive where a prototype adds to its class logit, negative
where it subtracts. Conventions:

- one colour per prototype (:data:`PALETTE`), the same on every page and in reports;
- a prototype's map over an image: its colour where it adds (opacity ∝ value), a
  neutral grey where it subtracts;
- the raw feature-grid map (:func:`grid_image`) is drawn with a diverging colormap
  (blue < 0 < red) and nearest-neighbour cells, next to the smooth upsampled overlay,
  because upsampling alone can suggest a precision the grid does not have.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

# tab10 then the light tab20 tones: distinct for up to 20 prototypes.
PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
    "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5",
)
NEGATIVE_RGB = (90, 90, 110)

# Anchors (position, RGB) of the colormaps; values in between are interpolated linearly.
_CMAPS = {
    # ColorBrewer RdBu (reversed): blue for negative, white at zero, red for positive.
    "signed": [(0.0, (5, 48, 97)), (0.15, (33, 102, 172)), (0.3, (67, 147, 195)), (0.42, (146, 197, 222)),
               (0.5, (247, 247, 247)), (0.58, (244, 165, 130)), (0.7, (214, 96, 77)), (0.85, (178, 24, 43)),
               (1.0, (103, 0, 31))],
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
    import torch
    import torch.nn.functional as F

    t = torch.as_tensor(np.asarray(map2d, dtype=np.float32))[None, None]
    kwargs = {} if mode == "nearest" else {"align_corners": False}
    out = F.interpolate(t, size=tuple(int(s) for s in size), mode=mode, **kwargs)
    return out[0, 0].numpy()


def grid_image(map2d: np.ndarray, size: int = 224, vmax: Optional[float] = None, lines: bool = True) -> Image.Image:
    """The raw feature-grid map, one flat cell per position, blue < 0 < red."""
    m = np.asarray(map2d, dtype=np.float64)
    vmax = vmax or signed_scale(m)
    rgb = colormap(0.5 + 0.5 * m / vmax, "signed")
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


def heat_overlay(image, map2d: np.ndarray, opacity: float = 0.5, vmax: Optional[float] = None,
                 mode: str = "bicubic", signed: bool = True) -> Image.Image:
    """Image blended with a (signed) heat map of ``map2d`` upsampled to the image size."""
    base = as_rgb(image).astype(np.float64)
    up = upsample(map2d, base.shape[:2], mode)
    if signed:
        vmax = vmax or signed_scale(up)
        rgb = colormap(0.5 + 0.5 * up / vmax, "signed").astype(np.float64)
        alpha = opacity * np.clip(np.abs(up) / vmax, 0, 1)[..., None]
    else:
        lo, hi = float(up.min()), float(up.max())
        rgb = colormap((up - lo) / (hi - lo) if hi > lo else np.zeros_like(up), "heat").astype(np.float64)
        alpha = np.full(up.shape + (1,), float(opacity))
    out = (1 - alpha) * base + alpha * rgb
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))


def prototype_overlay(image, maps: np.ndarray, opacity: float = 0.6, colors: Optional[Sequence[str]] = None,
                      vmax: Optional[float] = None, show: Optional[Sequence[int]] = None, mode: str = "bicubic",
                      negative: bool = True) -> Image.Image:
    """The image coloured by prototype maps (k, h, w).

    Each pixel takes the colour of the prototype that adds most there, with opacity
    proportional to that value (relative to ``vmax``, by default the largest |value| over
    the maps shown). With one prototype this is its own map; where its value is negative
    (and ``negative``) the pixel is tinted grey instead.
    """
    base = as_rgb(image).astype(np.float64)
    maps = np.asarray(maps, dtype=np.float64)
    if maps.ndim == 2:
        maps = maps[None]
    k = maps.shape[0]
    show = list(range(k)) if show is None else [int(i) for i in show]
    colors = list(colors) if colors is not None else [prototype_color(i) for i in range(k)]
    if not show:
        return Image.fromarray(base.astype(np.uint8))
    up = np.stack([upsample(maps[i], base.shape[:2], mode) for i in show])  # (s, H, W)
    vmax = vmax or signed_scale(up)
    best = up.argmax(0)
    value = np.take_along_axis(up, best[None], 0)[0]
    palette = np.array([hex_to_rgb(colors[i]) for i in show], dtype=np.float64)
    rgb = palette[best]
    alpha = opacity * np.clip(value / vmax, 0, 1)[..., None]
    out = (1 - alpha) * base + alpha * rgb
    if negative and len(show) == 1:
        neg = opacity * np.clip(-value / vmax, 0, 1)[..., None]
        out = (1 - neg) * out + neg * np.array(NEGATIVE_RGB, dtype=np.float64)
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))


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


def patch_grid(images: Sequence, boxes: Sequence[Sequence[float]], color: str = "#ffcc00", size: int = 112,
               columns: int = 6) -> Image.Image:
    """ProtoPNet-style: a prototype's top training images, each with its patch boxed."""
    return image_grid([patch_tile(im, b, color, size) for im, b in zip(images, boxes)], columns=columns)


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


def prototype_similarity(prototypes, class_indices: Sequence[int], class_index: int, top: int = 3,
                         min_cosine: float = 0.0) -> list:
    """"Shared parts": for each prototype of ``class_index``, the most similar prototypes of
    other classes by cosine similarity of the prototype vectors.

    ``prototypes`` is (Cd, k, D) (a run's refined prototypes). Returns one list per
    prototype of dicts {class_index, prototype, cosine}, best first.
    """
    p = np.asarray(prototypes.detach().cpu().double() if hasattr(prototypes, "detach") else prototypes,
                   dtype=np.float64)
    classes = [int(c) for c in (class_indices.tolist() if hasattr(class_indices, "tolist") else class_indices)]
    row = classes.index(int(class_index))
    cd, k, d = p.shape
    flat = p.reshape(cd * k, d)
    norms = np.linalg.norm(flat, axis=1, keepdims=True)
    unit = flat / np.where(norms > 0, norms, 1.0)
    out = []
    for i in range(k):
        sims = unit @ unit[row * k + i]
        sims = sims.reshape(cd, k)
        sims[row] = -np.inf  # other classes only
        order = np.argsort(sims, axis=None)[::-1]
        found = []
        for flat_idx in order:
            r, j = divmod(int(flat_idx), k)
            s = float(sims[r, j])
            if not np.isfinite(s) or s < min_cosine or len(found) >= top:
                break
            found.append({"class_index": classes[r], "prototype": j, "cosine": s})
        out.append(found)
    return out


def class_maps(network, preprocess, root, paths: Sequence[str], class_index: int):
    """Prototype maps of ``class_index`` on a few images of a folder.

    Returns (pictures as seen by the model [PIL], maps (n, k, h, w), contributions (n, k),
    kept paths); unreadable images are left out.
    """
    import torch

    from .data import load_image

    pictures, tensors, kept = [], [], []
    for rel in paths:
        try:
            seen = preprocess.geometry(load_image(Path(root) / rel))
        except Exception:
            continue
        pictures.append(seen)
        tensors.append(preprocess.normalise(seen))
        kept.append(rel)
    if not tensors:
        return [], np.zeros((0,)), np.zeros((0,)), []
    device = network.prototypes.device
    with torch.inference_mode():
        feats = network.backbone(torch.stack(tensors).to(device)).float()
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
    import plotly.graph_objects as go

    c = np.asarray(mean_contribution, dtype=np.float64)
    k = len(c)
    labels = list(labels) if labels is not None else [f"prototype {i + 1}" for i in range(k)]
    colors = list(colors) if colors is not None else [prototype_color(i) for i in range(k)]
    shares = contribution_shares(c)
    fig = go.Figure(go.Bar(x=labels, y=c, marker_color=colors,
                           text=[f"{v:.2f} ({100 * s:.0f}%)" for v, s in zip(c, shares)], textposition="auto",
                           hovertemplate="%{x}: %{y:.3f}<extra></extra>"))
    fig.update_yaxes(title="mean contribution to the logit", zeroline=True)
    return _layout(fig, height, title)


def figure_waterfall(bias: float, contributions: Sequence[float], logit: float,
                     labels: Optional[Sequence[str]] = None, colors: Optional[Sequence[str]] = None,
                     title: Optional[str] = None, height: int = 340):
    """From the bias to the logit, one step per prototype's contribution."""
    import plotly.graph_objects as go

    c = [float(v) for v in contributions]
    labels = list(labels) if labels is not None else [f"prototype {i + 1}" for i in range(len(c))]
    fig = go.Figure(go.Waterfall(
        orientation="v", measure=["absolute"] + ["relative"] * len(c) + ["total"],
        x=["bias"] + labels + ["logit"], y=[float(bias)] + c + [float(logit)],
        text=[f"{float(bias):+.2f}"] + [f"{v:+.2f}" for v in c] + [f"{float(logit):.2f}"], textposition="outside",
        increasing=dict(marker=dict(color="#d62728")), decreasing=dict(marker=dict(color="#1f77b4")),
        totals=dict(marker=dict(color="#444444")), connector=dict(line=dict(color="#999999", width=1))))
    fig.update_yaxes(title="logit")
    return _layout(fig, height, title)


def figure_top_predictions(top: Sequence, height: int = 220, title: Optional[str] = None):
    """Horizontal bars of the top classes' probabilities; ``top`` is [(index, name, logit, prob)]."""
    import plotly.graph_objects as go

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
    import plotly.graph_objects as go

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
    import plotly.graph_objects as go

    fig = go.Figure(go.Bar(x=list(values), y=[float(v) if v is not None else 0.0 for v in values.values()],
                           marker_color=[PALETTE[i % len(PALETTE)] for i in range(len(values))]))
    fig.update_yaxes(title=ytitle)
    return _layout(fig, height, title)
