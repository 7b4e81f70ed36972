"""Self-contained HTML reports (one file, images embedded as base64 PNG, no scripts) and
run archives.

- :func:`class_report`: a class's prototypes: contribution, fidelity, α, top training
  patches, maps on a few class images, shared parts.
- :func:`explanation_report`: one image explained for one class, as the Explain page shows it
  (:func:`explanation_html` lays out :func:`phpn.show.compose.compose_explanation`'s view).
- :func:`run_zip_bytes`: a saved run folder (or an unsaved run) as a zip, in memory.
- :func:`audit_findings` / :func:`audit_html`: the audit's findings (rank, score, reasons) with the
  expert's verdicts from the notes, for the reports, the zip's audit.json and the Audit page.
"""
from __future__ import annotations

import base64
import html
import io
import json
import tempfile
import zipfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional, Sequence

from PIL import Image

from phpn.config import MAP_OPACITY, class_name, no_shared_parts
from phpn.images.preprocess import Preprocess
from phpn.method.certify import chance_warning, format_certificate
from phpn.runs.annotations import prototype_label, prototype_labels, prototype_note_html, verdict_words
from phpn.runs.audit_record import audit_record
from phpn.runs.provenance import origin_words
from phpn.runs.store import save_run
from phpn.show import viz
from phpn.show.compose import ExplanationView, Panel, Waterfall, compose_explanation
from phpn.show.pictures import seen_image  # a folder or the Python API's in-memory images

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1100px;color:#222}
h1{font-size:1.6em;margin-bottom:0}h2{font-size:1.25em;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:28px}
h3{font-size:1.05em;margin:18px 0 6px}.meta{color:#666;font-size:.9em}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:4px 8px;font-size:.9em;text-align:right}
th{background:#f5f5f5}td.l,th.l{text-align:left}.proto{border:1px solid #e3e3e3;border-radius:6px;padding:10px 14px;margin:12px 0}
.row{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}.fig{text-align:center;font-size:.85em;color:#555}
.fig img{display:block;image-rendering:pixelated;border:1px solid #ccc}.ok{color:#1a7f37;font-weight:600}
.bad{color:#cf222e;font-weight:600}.sw{display:inline-block;width:14px;height:14px;border-radius:3px;vertical-align:middle;margin-right:6px}
.note{background:#f6f8fa;border-left:3px solid #999;padding:6px 10px;font-size:.9em}
details{margin:10px 0}summary{cursor:pointer;padding:4px 0}
"""

REPORT_SIZE = 196  # an explanation report's overview pictures, in pixels: four fit in a page's width


def data_uri(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _img(image: Image.Image, caption: str = "", width: Optional[int] = None) -> str:
    w = f' width="{int(width)}"' if width else ""
    box = f' style="width:{int(width)}px"' if width else ""  # a long caption wraps under its picture
    cap = f"<div>{html.escape(caption)}</div>" if caption else ""
    return f'<div class="fig"{box}><img src="{data_uri(image)}"{w} alt="{html.escape(caption)}">{cap}</div>'


def _esc(x) -> str:
    return html.escape(str(x))


def _page(title: str, body: str) -> str:
    made = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{_esc(title)}</title>"
            f"<style>{_CSS}</style></head><body>{body}<p class=\"meta\">Made by phpn on {made}. Self-contained: "
            "every image is embedded in this file.</p></body></html>")


def _bars_svg(values: Sequence[float], labels: Sequence[str], colors: Sequence[str], width: int = 520,
              row: int = 24) -> str:
    """Horizontal bars (signed) as inline SVG."""
    vals = [float(v) for v in values]
    m = max([abs(v) for v in vals] + [1e-12])
    label_w, pad = 150, 60
    zero = label_w + (width - label_w - pad) / 2 if min(vals) < 0 else label_w
    span = (width - label_w - pad) / (2 if min(vals) < 0 else 1)
    h = row * len(vals) + 8
    parts = [f'<svg width="{width}" height="{h}" font-size="12">']
    for i, (v, lab, col) in enumerate(zip(vals, labels, colors)):
        y = 4 + i * row
        w = abs(v) / m * span
        x = zero if v >= 0 else zero - w
        parts.append(f'<text x="{label_w - 6}" y="{y + row * 0.65}" text-anchor="end">{_esc(lab)}</text>')
        parts.append(f'<rect x="{x:.1f}" y="{y + 3}" width="{max(w, 1):.1f}" height="{row - 8}" fill="{col}"/>')
        tx = x + w + 4 if v >= 0 else x - 4
        anchor = "start" if v >= 0 else "end"
        parts.append(f'<text x="{tx:.1f}" y="{y + row * 0.65}" text-anchor="{anchor}">{v:+.3f}</text>')
    parts.append(f'<line x1="{zero}" y1="0" x2="{zero}" y2="{h}" stroke="#999"/></svg>')
    return "".join(parts)


def _patch_tiles(entries: Sequence[dict], root, preprocess, color: str, size: int) -> list:
    tiles = []
    for e in entries:
        seen = seen_image(root, e["path"], preprocess)
        if seen is not None:
            tiles.append(viz.patch_pair(seen, e["box"], color, size))
    return tiles


def _certificate_html(cert: Optional[dict]) -> str:
    if not cert:
        return "<p>No certificate recorded in this run.</p>"
    ok = cert.get("passed")
    verdict, _, rest = format_certificate(cert).partition(": ")
    out = f'<p><span class="{"ok" if ok else "bad"}">{verdict}</span>: {_esc(rest)}.</p>'
    warning = chance_warning(cert)
    if warning:
        out += f'<p class="bad">Warning: {_esc(warning)}</p>'
    return out


def class_report(run, class_index: int, *, image_root=None, preprocess=None, network=None, map_images: int = 4,
                 patch_size: int = 112, similar_top: int = 3, notes=None, audit=None) -> str:
    """HTML report of one class's prototypes (see module doc); with ``audit``
    (:class:`phpn.pipeline.audit.Audit` or its dict), a short Audit section on the class."""
    preprocess = preprocess or Preprocess.from_dict(run.preprocess_info)
    meta = run.class_meta(class_index)
    names = run.class_names
    name = class_name(names, class_index)
    k = run.class_k(class_index)
    colors = [viz.prototype_color(i) for i in range(k)]
    labels = prototype_labels(notes, class_index, k)
    contrib = meta["mean_contribution"]
    shares = viz.contribution_shares(contrib)
    similar = viz.shared_parts(run, class_index, top=similar_top)

    maps_block = {}
    if network is not None and image_root is not None and map_images > 0:
        paths = list(meta.get("paths", []))[:map_images]
        pictures, maps, _, _ = viz.class_maps(network, preprocess, image_root, paths, class_index)
        for i in range(k if len(pictures) else 0):
            maps_block[i] = [(viz.prototype_overlay(viz.enlarge(p, 112), m[i], 0.6, colors=[colors[i]]),
                              f"full colour = {viz.own_scale(m[i]):.3g}") for p, m in zip(pictures, maps)]

    model = run.model_info
    body = [f"<h1>{_esc(name)} — {k} part-prototypes</h1>",
            f'<p class="meta">Model {_esc(model.get("arch", "?"))}{_esc(_origin(model))} '
            f'(sha256 {_esc(model.get("sha256", "")[:12])}…), '
            f'class {class_index}, {meta.get("images", "?")} discovery images, run made {_esc(run.created or "?")}.</p>',
            "<h2>Exactness</h2>", _certificate_html(run.recorded_certificate),
            '<p class="note">The prototypes of a class sum exactly to its row of the classifier head, so the '
            "decomposed network gives the same logits as the original model. Each prototype's contribution to an "
            "image's logit is the mean of its map over the feature grid.</p>",
            "<h2>Contributions</h2>",
            "<p>Mean contribution to the logit over the class's images (share of logit − bias):</p>",
            _bars_svg(contrib, [f"{lab} ({100 * s:.0f}%)" for lab, s in zip(labels, shares)], colors),
            "<table><tr><th class=l>prototype</th><th>mean contribution</th><th>share</th><th>α</th>"
            "<th>map fidelity</th></tr>"]
    for i in range(k):
        body.append(f'<tr><td class=l><span class="sw" style="background:{colors[i]}"></span>{_esc(labels[i])}</td>'
                    f"<td>{contrib[i]:.3f}</td><td>{100 * shares[i]:.1f}%</td><td>{meta['alpha'][i]:.3g}</td>"
                    f"<td>{meta['fidelity'][i]:.3f}</td></tr>")
    body.append("</table>")
    body.append(f'<p class="meta">Residual ratio ‖R‖/‖v‖ {meta["residual_ratio"]:.3f}; refinement objective '
                f'{meta["objective_before"]:.4g} → {meta["objective_after"]:.4g}; negative α: {meta["negative_alpha"]}.</p>')

    body.append("<h2>Prototypes</h2>")
    for i in range(k):
        tiles = _patch_tiles(meta["top_patches"][i], image_root, preprocess, colors[i], patch_size)
        body.append(f'<div class="proto"><h3><span class="sw" style="background:{colors[i]}"></span>{_esc(labels[i])}: '
                    f"contribution {contrib[i]:.3f} ({100 * shares[i]:.0f}%), fidelity {meta['fidelity'][i]:.3f}</h3>")
        body.append(prototype_note_html(notes, class_index, i, meta["fidelity"][i]))
        if tiles:
            body.append("<div>What it looks for (its top training patches, boxed, each zoomed beside its image):</div>")
            body.append(_img(viz.image_grid(tiles, columns=3)))
        else:
            body.append("<p class=meta>The training images are not available here.</p>")
        if maps_block.get(i):
            body.append("<div>Where it fires on a few class images (colour: adds to the logit; grey hatching: "
                        "subtracts; each map on its own scale, its largest |value| at full colour):</div>")
            body.append('<div class="row">' + "".join(_img(im, cap) for im, cap in maps_block[i]) + "</div>")
        if similar[i]:
            items = ", ".join(f"{_esc(class_name(names, s['class_index']))} "
                              f"{_esc(prototype_label(notes, s['class_index'], s['prototype']))} (cos {s['cosine']:.2f})"
                              for s in similar[i])
            body.append(f"<p>Shared parts — most similar prototypes of other classes: {items}.</p>")
        else:
            body.append(f"<p>Shared parts: {_esc(no_shared_parts())}.</p>")
        body.append("</div>")
    body.append(audit_html(audit, notes, class_index))
    return _page(f"phpn: {name}", "".join(body))


def _origin(model_meta: dict) -> str:
    """' from <the upload's name> (how it was loaded)' for a run made in the app, else ''."""
    words = origin_words(model_meta)
    return f" from {words}" if words else ""


def _waterfall_svg(w: Waterfall, width: int = 620, row: int = 24) -> str:
    """The waterfall as inline SVG: floating bars from the bias to the logit."""
    bars = [(s.label, s.start, s.end, s.value, s.color) for s in w.steps] + [
        (w.total_label, 0.0, w.logit, w.logit, w.total_color)]
    lo = min([0.0] + [min(a, b) for _, a, b, _, _ in bars])
    hi = max([0.0] + [max(a, b) for _, a, b, _, _ in bars])
    label_w, pad = 190, 60
    scale = (width - label_w - pad) / ((hi - lo) or 1.0)

    def x(v: float) -> float:
        return label_w + (v - lo) * scale

    h = row * len(bars) + 8
    parts = [f'<svg width="{width}" height="{h}" font-size="12">']
    for i, (label, a, b, value, color) in enumerate(bars):
        y = 4 + i * row
        x0, x1 = sorted((x(a), x(b)))
        parts.append(f'<text x="{label_w - 6}" y="{y + row * 0.65}" text-anchor="end">{_esc(label)}</text>')
        parts.append(f'<rect x="{x0:.1f}" y="{y + 3}" width="{max(x1 - x0, 1):.1f}" height="{row - 8}" '
                     f'fill="{color}"/>')
        parts.append(f'<text x="{x1 + 4:.1f}" y="{y + row * 0.65}">{value:+.3f}</text>')
    parts.append(f'<line x1="{x(0.0):.1f}" y1="0" x2="{x(0.0):.1f}" y2="{h}" stroke="#999"/></svg>')
    return "".join(parts)


def _panel(panel: Panel) -> str:
    return _img(panel.picture, panel.caption, panel.width)


def explanation_html(view: ExplanationView, audit=None, notes=None, compact: bool = False) -> str:
    """The page of an explanation (:func:`phpn.show.compose.compose_explanation`), laid out as HTML;
    with ``audit``, the audit's findings on the explained class. ``compact`` (a notebook's inline
    display) shows the answer (the pictures and the waterfall) and folds the details, the
    prototypes' own sections included, under headings a click opens."""
    v = view

    def section(title: str, content: str) -> str:
        if compact:
            return f"<details><summary><b>{_esc(title)}</b></summary>{content}</details>"
        return f"<h2>{_esc(title)}</h2>{content}"

    provenance = ("<table>" + "".join(f"<tr><th class=l>{_esc(a)}</th><td class=l>{_esc(b)}</td></tr>"
                                      for a, b in v.provenance) + "</table>")
    top = ("<table><tr><th class=l>class</th><th>logit</th><th>probability</th></tr>"
           + "".join(f"<tr><td class=l>{_esc(n)} ({c})</td><td>{lg:.3f}</td><td>{100 * p:.2f}%</td></tr>"
                     for c, n, lg, p in v.top) + "</table>")
    looks = [f'<p class="meta">{_esc(v.patches_note)}</p>'] if v.patches_note else []
    for p in v.prototypes:
        flags = "".join(f" <code>{_esc(f)}</code>" for f in p.flags)
        looks.append(f'<div class="proto"><h3><span class="sw" style="background:{p.color}"></span>{_esc(p.title)}'
                     f"{flags}: {_esc(p.summary)}</h3>")
        if p.warning:
            looks.append(f'<p class="bad">{_esc(p.warning)}</p>')
        if p.description:
            looks.append(f'<p class="note">{_esc(p.description)}</p>')
        looks.append('<div class="row">' + _panel(p.where) + _panel(p.grid)
                     + (_panel(p.looks_like) if p.looks_like else "") + "</div></div>")
    body = [f"<h1>{_esc(v.title)} — {_esc(v.image_name)}</h1>",
            (f'<p class="bad">Warning: {_esc(v.chance_warning)}</p>' if v.chance_warning else ""),
            section("Image, model, run and certificate", provenance) if compact else provenance,
            f'<p class="meta">{_esc(v.equation)}.</p>',
            '<div class="row">', *[_panel(p) for p in v.overview], "</div>",
            "<p>" + " ".join(f'<span class="sw" style="background:{c}"></span>{_esc(lab)}' for lab, c in v.legend)
            + "</p>"]
    if compact:  # the answer first: how the logit is made, then what each prototype looks like
        body += [f"<h2>{_esc(v.waterfall.title)}</h2>{_waterfall_svg(v.waterfall)}",
                 section("This looks like that", "".join(looks)), section("Top predictions", top)]
    else:
        body += [section("Top predictions", top), f"<h2>{_esc(v.waterfall.title)}</h2>{_waterfall_svg(v.waterfall)}",
                 section("This looks like that", "".join(looks))]
    body.append(audit_html(audit, notes, v.class_index))
    return _page(f"phpn: why {v.class_name}? ({v.image_name})", "".join(body))


def explanation_report(explanation, run, *, image_root=None, preprocess=None, opacity: float = MAP_OPACITY,
                       mode: str = "bicubic", patches: int = 4, size: int = REPORT_SIZE,
                       image_name: Optional[str] = None, model_label: Optional[str] = None,
                       run_label: Optional[str] = None, true_class: Optional[int] = None, notes=None,
                       audit=None) -> str:
    """HTML report of one image explained for one class (:class:`phpn.show.explanation.Explanation`),
    with its provenance (:func:`phpn.show.compose.provenance`) at the top: the panels of the Explain page."""
    return explanation_html(compose_explanation(
        explanation, run, notes=notes, image_root=image_root, preprocess=preprocess, opacity=opacity, mode=mode,
        size=size, patches=patches, image_name=image_name, model_label=model_label, run_label=run_label,
        true_class=true_class), audit=audit, notes=notes)


def _audit_dict(audit) -> dict:
    return audit.to_dict() if hasattr(audit, "to_dict") else dict(audit)


def audit_findings(audit, notes=None, class_index: Optional[int] = None) -> list:
    """The audit's prototypes (of ``class_index`` only, when given), highest score first, each with
    its rank among all prototypes, score, reasons and the expert's verdict from ``notes``
    ("spurious", "background", "dismissed" or None)."""
    rows = []
    for rank, e in enumerate(_audit_dict(audit)["prototypes"], 1):
        if class_index is not None and int(e["class"]) != int(class_index):
            continue
        verdict = notes.verdict(e["class"], e["prototype"]) if notes is not None else None
        rows.append({"rank": rank, "class": int(e["class"]), "class_name": e["class_name"],
                     "prototype": int(e["prototype"]), "score": float(e["score"]),
                     "stands_out": bool(e["stands_out"]), "reasons": list(e["reasons"]), "verdict": verdict})
    return rows


def audit_json(audit, notes=None) -> dict:
    """The audit as saved in a run's zip (audit.json): its dict, each prototype with the expert's verdict."""
    d = _audit_dict(audit)
    verdicts = {(r["class"], r["prototype"]): r["verdict"] for r in audit_findings(d, notes)}
    return {**d, "prototypes": [{**e, "verdict": verdicts[(int(e["class"]), int(e["prototype"]))]}
                                for e in d["prototypes"]]}


def audit_html(audit, notes=None, class_index: Optional[int] = None) -> str:
    """A short "Audit" section: the audit's summary and its findings on ``class_index`` (rank among
    all prototypes, score, reasons, the expert's verdict); '' without an audit."""
    if audit is None:
        return ""
    d = _audit_dict(audit)
    rows = audit_findings(d, notes, class_index)
    out = [f"<h2>Audit</h2><p>{_esc(d['summary'])}</p>",
           f'<p class="meta">{len(d["prototypes"])} prototypes audited on {d["images"]} labelled images; rank among '
           "all of them, highest score first; score: the sum of the signals' excesses over random-direction "
           "prototypes of the same run.</p>"]
    if not rows:
        return "".join(out)
    out.append("<table><tr><th>rank</th><th class=l>prototype</th><th>score</th><th class=l>reasons</th>"
               "<th class=l>expert's verdict</th></tr>")
    for r in rows:
        label = prototype_label(notes, r["class"], r["prototype"])
        who = label if class_index is not None else f"{r['class_name']} {label}"
        stands = " (stands out)" if r["stands_out"] else ""
        reasons = "<br>".join(_esc(x) for x in r["reasons"]) or "—"
        verdict = verdict_words(r["verdict"])
        out.append(f"<tr><td>{r['rank']}</td><td class=l>{_esc(who)}{stands}</td><td>{r['score']:.2f}</td>"
                   f"<td class=l>{reasons}</td><td class=l>{_esc(verdict)}</td></tr>")
    out.append("</table>")
    return "".join(out)


def run_zip_bytes(run, name: Optional[str] = None, notes=None, audit=None) -> bytes:
    """The run's folder as a zip (saved first to a temporary folder when it has none); with
    ``notes`` (phpn.runs.annotations.Annotations), those as the zip's annotations.json; with
    ``audit``, that audit as audit.json, naming the run (the expert's verdicts are in the notes)."""
    tmp = None
    try:
        folder = Path(run.path) if run.path is not None and Path(run.path).is_dir() else None
        if folder is None:
            tmp = tempfile.TemporaryDirectory(prefix="phpn-run-")
            saved_path = run.path
            folder = save_run(run, Path(tmp.name) / (name or "run"))
            run.path = saved_path  # keep the run's own notion of where it is saved
        top = name or folder.name
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            for p in sorted(folder.rglob("*")):
                replaced = (notes is not None and p.name == "annotations.json") or (audit is not None
                                                                                  and p.name == "audit.json")
                if p.is_file() and not replaced:
                    zf.write(p, f"{top}/{p.relative_to(folder).as_posix()}")
            if notes is not None and notes.notes:
                zf.writestr(f"{top}/annotations.json", json.dumps(notes.to_dict(), indent=1, ensure_ascii=False))
            if audit is not None:  # as kept beside a run: it names this run, so it travels and comes back
                found = audit.to_dict() if hasattr(audit, "to_dict") else dict(audit)
                zf.writestr(f"{top}/audit.json", json.dumps(audit_record(run, found), indent=1, ensure_ascii=False))
        return buf.getvalue()
    finally:
        if tmp is not None:
            tmp.cleanup()
