"""One explanation composer: the Explain page, the HTML report and the PNG draw the same view
(phpn.show.compose), so the panels, their captions, the expert's names and the waterfall are the
same in all three."""
from __future__ import annotations

import base64
import html
import io
import re

import numpy as np
import pytest
from conftest import tiny_split
from PIL import Image

from phpn.images.folders import scan_image_folder
from phpn.pipeline.discover import DiscoveryConfig, discover
from phpn.runs.annotations import Annotations
from phpn.show import report, viz
from phpn.show.compose import compose_explanation
from phpn.show.explanation import png_parts, render_png


@pytest.fixture
def explained(tiny_loaded, image_folder):
    """A run of k = 3 on the tiny model, an image explained for its top class with the run and
    its images attached, and notes naming, flagging and describing its second prototype."""
    from phpn.api import explain_image

    data = scan_image_folder(image_folder, class_names=tiny_loaded.class_names, num_classes=4)
    split = tiny_split(tiny_loaded.model)
    run = discover(tiny_loaded, split, data, tiny_loaded.preprocess, DiscoveryConfig(k=3, device="cpu"))

    class Session:  # the parts of ModelSession explain_image uses
        preprocess = tiny_loaded.preprocess
        class_names = tiny_loaded.class_names

    e = explain_image(Session(), run.network(split), image_folder / "2" / "img05.png")
    e.run, e.image_root, e.source = run, image_folder, "2/img05.png"
    notes = Annotations.for_run(run)
    notes.set(e.class_index, 1, name="<b>beak</b>", flags=["background"], description="Fires on the beak.")
    return e, run, notes


def _html_sections(page: str) -> tuple:
    """(the overview's captions, per prototype (heading, captions)) of an explanation report."""
    head, _, rest = page.partition("<h2>This looks like that</h2>")
    overview = re.findall(r'<div class="row">(.*?)</div><p>', head, re.S)[0]
    captions = [html.unescape(c) for c in re.findall(r'alt="([^"]*)"', overview)]
    protos = []
    for block in rest.split('<div class="proto">')[1:]:
        heading = html.unescape(re.sub(r"<[^>]+>", "", re.search(r"<h3>(.*?)</h3>", block).group(1)))
        protos.append((heading, [html.unescape(c) for c in re.findall(r'alt="([^"]*)"', block)]))
    return captions, protos


def test_the_view_names_the_prototypes_as_the_notes_do_and_its_waterfall_adds_up(explained):
    e, run, notes = explained
    view = compose_explanation(e, run, notes=notes, image_root=e.image_root)
    k = len(e.contributions)
    assert k == 3 and len(view.prototypes) == k
    assert [p.label for p in view.prototypes] == ["prototype 1", "prototype 2 “<b>beak</b>”", "prototype 3"]
    assert [label for label, _ in view.legend] == [p.label for p in view.prototypes]
    assert view.prototypes[1].flags == ("background",) and view.prototypes[1].description == "Fires on the beak."
    assert view.title == f"Why “{e.class_name}”?" and view.image_name == "2/img05.png"
    # One waterfall: the bias, then each prototype under its name, from where the last one ended.
    w = view.waterfall
    assert w.labels == ["bias"] + [p.label for p in view.prototypes]
    assert w.colors == [viz.BIAS_COLOR] + [viz.prototype_color(i) for i in range(k)]
    assert w.values[0] == e.bias and np.array_equal(w.values[1:], e.contributions)
    assert sum(w.values) == pytest.approx(e.logit, abs=1e-5)
    assert w.steps[-1].end == pytest.approx(w.logit, abs=1e-5) and w.logit == e.logit
    assert all(a.end == pytest.approx(b.start, abs=1e-12) for a, b in zip(w.steps, w.steps[1:]))
    meta = run.class_meta(e.class_index)
    for i, p in enumerate(view.prototypes):
        assert p.contribution == float(e.contributions[i]) and p.mean_contribution == meta["mean_contribution"][i]
        assert p.summary == (f"contributes {e.contributions[i]:+.3f} here (class mean "
                             f"{meta['mean_contribution'][i]:+.3f}; map fidelity {meta['fidelity'][i]:.2f})")
        assert p.looks_like is not None and p.looks_like.caption == "looks like: its top training patches"
    assert view.patches_note is None
    # Without the training images, a note says so instead of the patches.
    bare = compose_explanation(e, run, notes=notes)
    assert bare.patches_note and all(p.looks_like is None for p in bare.prototypes)


def test_the_report_and_the_picture_show_the_views_panels_labels_and_captions(explained, tiny_loaded):
    e, run, notes = explained
    view = compose_explanation(e, run, notes=notes, image_root=e.image_root, size=196)
    page = report.explanation_report(e, run, image_root=e.image_root, preprocess=tiny_loaded.preprocess, notes=notes,
                                     image_name="2/img05.png")
    assert "<b>beak</b>" not in page  # the expert's name is text, never HTML
    captions, protos = _html_sections(page)
    assert captions == [p.caption for p in view.overview]
    assert len(protos) == len(view.prototypes) == 3
    for (heading, shown), p in zip(protos, view.prototypes):
        flags = "".join(f" {f}" for f in p.flags)
        assert heading == f"{p.title}{flags}: {p.summary}"
        assert shown == [p.where.caption, p.grid.caption, p.looks_like.caption]
    assert "Prototype 2 “<b>beak</b>” background: contributes" in protos[1][0]
    svg_labels = [html.unescape(t) for t in re.findall(r'text-anchor="end">([^<]*)</text>',
                                                        page.split("<svg", 1)[1].split("</svg>")[0])]
    assert svg_labels == view.waterfall.labels + ["logit"]
    # Each picture of the report is the view's own (the same pixels).
    uris = re.findall(r'<img src="data:image/png;base64,([^"]+)"', page)
    drawn = [p.picture for p in view.overview] + [q.picture for p in view.prototypes
                                                   for q in (p.where, p.grid, p.looks_like)]
    assert len(uris) == len(drawn)
    for uri, picture in zip(uris, drawn):
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(base64.b64decode(uri)))),
                              np.asarray(picture.convert("RGB")))

    # The picture: the same blocks, in the same order, with the same words.
    view = compose_explanation(e, run, notes=notes, image_root=e.image_root)
    parts = png_parts(view)
    rows = [part[1] for part in parts if part[0] == "panels"]
    assert [[q.caption for q in row] for row in rows] == [captions] + [shown for _, shown in protos]
    headings = [part[1] for part in parts if part[0] == "text" and part[4] is not None]
    assert headings == [f"{p.title}{''.join(f' [{f}]' for f in p.flags)}: {p.summary}" for p in view.prototypes]
    assert [part[1] for part in parts if part[0] == "waterfall"] == [view.waterfall]
    assert any(part[0] == "text" and part[1] == "Fires on the beak." for part in parts)
    picture = e.to_image(notes=notes)
    assert picture.width == 4 * 224 + 5 * 8
    assert np.array_equal(np.asarray(picture), np.asarray(render_png(view)))


def test_without_a_run_the_picture_still_draws_the_image_alone(explained):
    e, run, _ = explained
    e.run = None
    view = compose_explanation(e)
    assert [what for what, _ in view.provenance] == ["Image", "Predicted class", "Explained class"]
    assert view.chance_warning is None and view.patches_note is None
    assert all(p.mean_contribution is None and p.looks_like is None for p in view.prototypes)
    assert sum(view.waterfall.values) == pytest.approx(e.logit, abs=1e-5)
    assert e.to_image().size[0] == 4 * 224 + 5 * 8


def _plain(markdown: str) -> str:
    """A heading as read: without its tags, bold marks and code ticks."""
    return html.unescape(re.sub(r"<[^>]+>|\*\*|`", "", markdown)).strip()


def test_the_explain_page_shows_what_its_report_exports(tmp_path, monkeypatch):
    """On the demo, with a prototype named and flagged by the expert: the Explain page and the
    report the Export page builds from it show the same pictures with the same captions, the same
    headings and the same waterfall."""
    import json
    from pathlib import Path

    pytest.importorskip("streamlit.testing.v1")
    from streamlit.testing.v1 import AppTest

    from phpn.demos import get_demo

    demo = get_demo("fashion-mnist")
    if not (demo.assets_dir / "model.safetensors").is_file():
        pytest.skip("the fashion-mnist demo assets are not there")
    from test_app import app_settings_in

    app_settings_in(tmp_path, monkeypatch)  # workspaces beside the data root, never inside it
    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "app.py"), default_timeout=120).run()
    at.switch_page("pages/explain.py").run()
    e = at.session_state["explained"]["explanation"]
    at.session_state["run"].notes.set(e.class_index, 1, name="collar", flags=["background"])
    at.radio(key="explain_mode").set_value("nearest").run()
    assert not at.exception, [x.value for x in at.exception]
    shown = [c for img in at.image for c in img.captions]
    headings = [_plain(m.value) for m in at.markdown if ": contributes " in m.value]
    bars = json.loads(at.get("plotly_chart")[1].proto.spec)["data"][0]["x"]

    at.switch_page("pages/export.py").run()
    at.button(key="build_expl_report").click().run()
    assert not at.exception, [x.value for x in at.exception]
    page = at.session_state["explanation_report"][3]
    captions, protos = _html_sections(page)
    assert shown == captions + [c for _, cs in protos for c in cs]
    assert len(headings) == len(protos) == len(e.contributions) == 3
    assert headings == [h for h, _ in protos]
    assert headings[1].startswith("Prototype 2 “collar” background: contributes ")
    svg_labels = [html.unescape(t) for t in re.findall(r'text-anchor="end">([^<]*)</text>',
                                                        page.split("<svg", 1)[1].split("</svg>")[0])]
    assert bars == svg_labels == ["bias", "prototype 1", "prototype 2 “collar”", "prototype 3", "logit"]
    # Drawn as on the page: with its upsampling (nearest here) and opacity.
    first = re.search(r'<img src="data:image/png;base64,([^"]+)"[^>]*alt="all prototypes', page).group(1)
    view = compose_explanation(e, at.session_state["run"].run, mode="nearest", size=196,
                               opacity=at.session_state["explained"]["opacity"])
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(base64.b64decode(first)))),
                          np.asarray(view.overview[1].picture))
