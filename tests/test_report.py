"""Explanation reports say where they come from: the image, the model, the run, the predicted and
the explained class, the labelled class when known, and the certificate (with its warning)."""
from __future__ import annotations

import html

import pytest
from conftest import tiny_split

from phpn.config import SHARED_PART_MIN_COSINE, no_shared_parts, shared_parts
from phpn.images.folders import scan_image_folder
from phpn.method.certify import chance_warning, format_certificate
from phpn.pipeline.discover import DiscoveryConfig, discover
from phpn.show import compose, report


@pytest.fixture
def explained(tiny_loaded, image_folder):
    from phpn.api import explain_image

    data = scan_image_folder(image_folder, class_names=tiny_loaded.class_names, num_classes=4)
    split = tiny_split(tiny_loaded.model)
    run = discover(tiny_loaded, split, data, tiny_loaded.preprocess, DiscoveryConfig(k=2, device="cpu"))
    run.meta["certificate"] = {"images": 48, "top1_agreement": 1.0, "agreed": 48, "max_logit_diff": 1e-7,
                               "max_abs_logit": 2.0, "relative_logit_diff": 5e-8, "max_head_error": 1e-9,
                               "mean_head_error": 1e-10, "passed": True, "labelled_images": 48, "correct": 40,
                               "labelled_classes": 4, "seconds": 0.25}

    class Session:  # the parts of ModelSession explain_image uses
        preprocess = tiny_loaded.preprocess
        class_names = tiny_loaded.class_names

    network = run.network(split)
    best = explain_image(Session(), network, image_folder / "2" / "img05.png")
    other = next(c for c in range(4) if c != best.top[0][0])
    return run, explain_image(Session(), network, image_folder / "2" / "img05.png", class_index=other), best


def test_provenance_names_image_model_run_classes_and_certificate(explained):
    run, e, best = explained
    top, name, _, p = best.top[0]
    rows = dict(compose.provenance(e, run, image_name="2/img05.png", model_label="my model", run_label="runs/a",
                                  true_class=2))
    assert rows["Image"] == "2/img05.png"
    assert rows["Model"] == "my model · tiny, sha256 aaaaaaaaaaaa…"
    assert rows["Run"] == f"runs/a · made {run.meta['created']} · k = 2"
    assert rows["Predicted class"] == f"{name} ({top}), probability {100 * p:.1f}%"
    assert rows["Explained class"] == (f"{e.class_name} ({e.class_index}) (not the predicted class: this report "
                                       "explains another class's score)")
    right = "the model is right" if top == 2 else "the model is WRONG on this image"
    assert rows["Labelled class"] == f"blue (2): {right}"
    assert rows["Certificate"] == format_certificate(run.meta["certificate"])
    assert "agrees with the model on 48 of 48 images" in rows["Certificate"]
    assert "accuracy on the 48 labelled images: 83.3% (40 right)" in rows["Certificate"]


def test_the_report_carries_its_provenance_and_the_chance_warning(explained, tiny_loaded):
    run, e, _ = explained
    page = report.explanation_report(e, run, preprocess=tiny_loaded.preprocess, image_name="2/img05.png",
                                     model_label="my <model>")
    assert f"<h1>Why “{e.class_name}”? — 2/img05.png</h1>" in page
    assert "my &lt;model&gt; · tiny" in page and "<script" not in page
    assert html.escape(format_certificate(run.meta["certificate"])) in page
    assert "Warning:" not in page  # 40 of 48: far from chance
    run.meta["certificate"]["correct"] = 13
    page = report.explanation_report(e, run, preprocess=tiny_loaded.preprocess)
    assert f'<p class="bad">Warning: {html.escape(chance_warning(run.meta["certificate"]))}</p>' in page
    unnamed = getattr(e, "source", "") or "an image without a name"  # the explanation's own source, if any
    assert f"— {html.escape(str(unnamed))}</h1>" in page


def _report_images(page: str) -> dict:
    """{alt text: picture} of the images embedded in a report."""
    import base64
    import io
    import re

    import numpy as np
    from PIL import Image

    found = {}
    for uri, alt in re.findall(r'<img src="data:image/png;base64,([^"]+)"[^>]*alt="([^"]*)"', page):
        found.setdefault(html.unescape(alt), []).append(np.asarray(Image.open(io.BytesIO(base64.b64decode(uri)))))
    return found


def test_the_report_draws_each_map_on_its_own_scale_as_the_app_does(explained, tiny_loaded):
    """The raw grid and the overlay of every prototype are on that map's own scale (as on the
    Explain page), not on one scale shared by the prototypes, and each says its scale."""
    import numpy as np

    from phpn.config import MAP_OPACITY
    from phpn.show import viz

    run, e, _ = explained
    scales = [viz.own_scale(m) for m in e.maps]
    assert max(scales) > 1.05 * min(scales)  # a shared scale would draw the weaker map fainter
    images = _report_images(report.explanation_report(e, run, preprocess=tiny_loaded.preprocess, size=196))
    picture = viz.enlarge(e.image, 196)
    grids, overlays = images["raw feature grid, the same scale"], []
    for i, m in enumerate(e.maps):
        color = viz.prototype_color(i)
        assert np.array_equal(grids[i], np.asarray(viz.grid_image(m, 150, color=color)))
        overlays += images["where, on this image: " + viz.scale_caption(scales[i])]
        assert np.array_equal(overlays[i], np.asarray(viz.prototype_overlay(picture, m, MAP_OPACITY, colors=[color])))
        # full colour (or full grey where it subtracts most) at the map's largest |value|, whichever is strongest
        full = viz.hex_to_rgb(color) if m.max() >= -m.min() else viz.NEGATIVE_RGB
        assert np.abs(grids[i].reshape(-1, 3).astype(int) - full).max(axis=1).min() == 0


def test_the_class_report_names_prototypes_as_the_expert_did_and_escapes_the_names(explained, tiny_loaded):
    from phpn.runs.annotations import Annotations
    from phpn.show import viz

    run = explained[0]
    notes = Annotations.for_run(run)
    for c in run.class_indices.tolist():
        for p in range(run.k):
            notes.set(c, p, name=f"part {c}.{p}")
    notes.set(2, 0, name="<b>beak</b>")
    page = report.class_report(run, 2, preprocess=tiny_loaded.preprocess, notes=notes)
    assert "<b>beak</b>" not in page and page.count("prototype 1 “&lt;b&gt;beak&lt;/b&gt;”") >= 3  # bars, table, title
    for found in viz.prototype_similarity(run.prototypes, run.class_indices, 2, top=3):
        found = shared_parts(found)  # only those that count as shared parts
        if not found:
            assert f"<p>Shared parts: {no_shared_parts()}.</p>" in page
            continue
        shared = ", ".join(f"{html.escape(run.class_names[s['class_index']])} prototype {s['prototype'] + 1} "
                           f"“part {s['class_index']}.{s['prototype']}” (cos {s['cosine']:.2f})" for s in found)
        assert f"Shared parts — most similar prototypes of other classes: {shared}.</p>" in page


def test_prototypes_with_nothing_in_common_are_no_shared_parts(explained, tiny_loaded):
    """A cosine of 0.00 is listed nowhere: the report, the Class browser and the API share one rule."""
    from phpn.show import viz

    run = explained[0]
    record = run.class_meta(2)
    others = [c for c in run.class_indices.tolist() if c != 2]
    record["similar_prototypes"] = [[{"class_index": others[0], "prototype": 0, "cosine": 0.0},
                                     {"class_index": others[1], "prototype": 1, "cosine": 0.0}],
                                    [{"class_index": others[0], "prototype": 1, "cosine": SHARED_PART_MIN_COSINE},
                                     {"class_index": others[2], "prototype": 0, "cosine": 0.0}]]
    assert viz.shared_parts(run, 2) == [[], [{"class_index": others[0], "prototype": 1,
                                               "cosine": SHARED_PART_MIN_COSINE}]]
    page = report.class_report(run, 2, preprocess=tiny_loaded.preprocess)
    assert "(cos 0.00)" not in page
    assert page.count("Shared parts — most similar prototypes of other classes:") == 1
    assert (f"Shared parts — most similar prototypes of other classes: {run.class_names[others[0]]} prototype 2 "
            f"(cos {SHARED_PART_MIN_COSINE:.2f}).</p>") in page
    assert page.count(f"<p>Shared parts: {no_shared_parts()}.</p>") == 1
    assert no_shared_parts() == "no prototype of another class points the same way (cosine 0.1 or more)"
