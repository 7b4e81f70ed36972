"""Pictures and reports: colormaps, overlays, patch grids, figures, HTML reports, run zips."""
import base64
import io
import re
import zipfile

import numpy as np
import pytest
import torch
from conftest import tiny_split
from PIL import Image

from phpn.images.folders import scan_image_folder
from phpn.pipeline.discover import DiscoveryConfig, discover
from phpn.show import report, viz
from phpn.show.explanation import Explanation


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    """One discovery on the tiny model, shared by the tests of this module."""
    from conftest import TinyNet

    from phpn.head import LoadedModel
    from phpn.images.preprocess import Preprocess

    torch.manual_seed(0)
    model = TinyNet().eval()
    loaded = LoadedModel(model=model, arch="tiny", num_classes=4, sha256="a" * 64,
                         preprocess=Preprocess(resize=16, crop=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)),
                         class_names=["red", "green", "blue", "grey"], source="test")
    root = tmp_path_factory.mktemp("viz") / "images"
    rng = np.random.default_rng(0)
    for c, tint in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200), (120, 120, 120)]):
        (root / str(c)).mkdir(parents=True)
        for i in range(8):
            arr = np.clip(rng.normal(0, 60, (20, 20, 3)) + np.array(tint), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / str(c) / f"img{i:02d}.png")
    data = scan_image_folder(root, class_names=loaded.class_names, num_classes=4)
    split = tiny_split(model)
    run = discover(loaded, split, data, loaded.preprocess, DiscoveryConfig(k=3, device="cpu", lbfgs_iter=20))
    run.meta["certificate"] = {"images": 32, "top1_agreement": 1.0, "max_logit_diff": 1e-7, "max_abs_logit": 2.0,
                               "max_head_error": 1e-16, "mean_head_error": 1e-17, "relative_logit_diff": 5e-8,
                               "passed": True}
    return loaded, root, run, split, data


@pytest.fixture
def tiny_run(tiny_world):
    return tiny_world[2:]


@pytest.fixture
def tiny_loaded(tiny_world):
    return tiny_world[0]


@pytest.fixture
def image_folder(tiny_world):
    return tiny_world[1]


def test_colormaps_span_their_ends():
    rgb = viz.colormap(np.array([0.0, 0.5, 1.0]), "signed")
    assert rgb.dtype == np.uint8 and rgb.shape == (3, 3)
    assert tuple(rgb[0]) == viz.NEGATIVE_RGB  # "subtracts" is grey, not blue
    assert rgb[2, 0] > 2 * rgb[2, 2]  # red end
    assert np.all(rgb[1] > 240)  # white middle
    heat = viz.colormap(np.linspace(0, 1, 5), "heat")
    assert heat[0].sum() < heat[-1].sum()
    assert np.array_equal(viz.colormap(np.array([-3.0, 7.0]), "heat"), viz.colormap(np.array([0.0, 1.0]), "heat"))


def test_one_colour_per_prototype_and_none_is_the_negative_grey():
    assert len(set(viz.PALETTE)) == len(viz.PALETTE) >= 12
    for color in viz.PALETTE:
        r, g, b = viz.hex_to_rgb(color)
        assert max(r, g, b) - min(r, g, b) >= 35, color  # coloured: never mistaken for the grey
    assert viz.NEGATIVE_COLOR not in viz.PALETTE
    assert viz.hex_to_rgb(viz.NEGATIVE_COLOR) == viz.NEGATIVE_RGB


def _grey_photo(size=28, level=100):
    return Image.new("RGB", (size, size), (level, level, level))


def test_a_weak_prototype_is_drawn_on_its_own_scale():
    img = _grey_photo(56)
    strong = np.zeros((7, 7))
    strong[1:4, 1:4] = 10.0
    weak = strong / 1000
    color = viz.prototype_color(2)
    own_strong = np.asarray(viz.prototype_overlay(img, strong, 0.8, colors=[color]))
    own_weak = np.asarray(viz.prototype_overlay(img, weak, 0.8, colors=[color]))
    assert np.array_equal(own_strong, own_weak)  # each scaled to its own range
    shared_weak = np.asarray(viz.map_overlay(img, weak, color, opacity=0.8, scale=10.0))
    muted = np.asarray(viz.prototype_overlay(img, np.zeros((7, 7)), 0.8, colors=[color]))
    assert np.abs(shared_weak.astype(int) - muted).max() <= 1  # on a shared scale it vanishes
    assert viz.overlay_contrast(own_weak, weak, color) > 30 * viz.overlay_contrast(shared_weak, weak, color) + 30
    assert viz.scale_caption(viz.own_scale(weak)).startswith("full colour = 0.01 ")


def test_overlays_keep_size_do_not_touch_inputs_and_hatch_what_subtracts():
    img = _grey_photo(28)
    maps = np.zeros((3, 7, 7))
    maps[0, 1, 1] = 2.0
    maps[1, 5, 5] = 1.0
    maps[2, 3, 3] = -1.0
    before = maps.copy()
    out = viz.prototype_overlay(img, maps, 0.8)
    assert out.size == (28, 28)
    assert np.array_equal(maps, before)
    arr = np.asarray(out).astype(int)
    for i, (y, x) in enumerate([(6, 6), (22, 22)]):  # each prototype's colour at its own peak
        assert np.abs(arr[y, x] - viz.hex_to_rgb(viz.prototype_color(i))).max() < 60, (i, arr[y, x])
    assert np.array_equal(arr[27, 0], [100, 100, 100])  # far from every peak: the (grey) photo
    single = np.asarray(viz.prototype_overlay(img, maps[2], 0.8, colors=["#ff0000"])).astype(int)
    centre = single[10:18, 10:18].reshape(-1, 3)
    assert (centre[:, 0] > 150).sum() == 0  # negative values are never drawn in the prototype's colour
    assert (np.abs(centre - viz.NEGATIVE_RGB).max(axis=1) < 20).sum() >= 8  # grey hatching
    assert (np.abs(centre - 100).max(axis=1) < 6).sum() >= 8  # between the stripes: the photo
    outlined = np.asarray(viz.prototype_overlay(img, maps[0], 0.0, colors=["#ff0000"], outline=True)).astype(int)
    assert (np.abs(outlined - [255, 0, 0]).max(axis=2) == 0).sum() >= 8  # the top region's outline
    heat = viz.heat_overlay(img, maps.sum(0), 0.5)
    assert heat.size == (28, 28)


def test_the_combined_view_shows_overlap_and_negative_regions_not_an_argmax():
    img = _grey_photo(56)
    maps = np.zeros((3, 8, 8))
    maps[0, :, :4] = 10.0  # strong, left half
    maps[1, :, 2:6] = 0.1  # weak, overlapping the middle: visible despite the strong one
    maps[2, :, 6:] = -0.5  # the class map is negative on the right
    colors = [viz.prototype_color(i) for i in range(3)]
    arr = np.asarray(viz.combined_overlay(img, maps, colors, opacity=1.0, outline=False)).astype(int)

    def near(px, color, tol=30):
        return np.abs(px - np.array(viz.hex_to_rgb(color))).max(axis=-1) < tol

    left, middle, right = arr[10:46, 2:10], arr[10:46, 24:32], arr[10:46, 50:54]
    assert near(left, colors[0]).mean() > 0.9
    assert near(middle, colors[0]).mean() > 0.2 and near(middle, colors[1]).mean() > 0.2  # stripes of both
    assert near(right, viz.NEGATIVE_COLOR).mean() > 0.2 and not near(right, colors[2]).any()
    outlined = np.asarray(viz.combined_overlay(img, maps, colors, opacity=0.0, outline=True)).astype(int)
    assert near(outlined, colors[1], 1).sum() > 20  # the weak prototype's outline


def test_grid_image_shows_cells_not_smoothing():
    m = np.arange(16, dtype=float).reshape(4, 4) - 8
    g = np.asarray(viz.grid_image(m, size=40, lines=False))
    assert g.shape == (40, 40, 3)
    assert len({tuple(px) for px in g[:10, :10].reshape(-1, 3)}) == 1  # one flat cell


def test_upsample_and_enlarge():
    assert viz.upsample(np.ones((7, 7)), (28, 28)).shape == (28, 28)
    assert viz.enlarge(Image.new("RGB", (28, 28)), 100).size == (112, 112)
    assert viz.enlarge(Image.new("RGB", (300, 200)), 100).size == (300, 200)


def test_patch_grid_draws_boxes_and_zooms():
    img = Image.new("RGB", (28, 28), (0, 0, 0))
    img.paste((255, 255, 255), (4, 4, 12, 12))
    tile = viz.patch_tile(img, [4, 4, 12, 12], "#ffcc00", size=112)
    arr = np.asarray(tile)
    assert tile.size == (112, 112)
    assert tuple(arr[16, 30]) == (255, 204, 0)  # on the box edge (4 px * 4)
    assert tuple(arr[100, 100]) == (0, 0, 0)
    pair = viz.patch_pair(img, [4, 4, 12, 12], "#ffcc00", size=112)
    zoom = np.asarray(pair)[:, 112 + 2:]
    assert pair.size == (112 + 2 + 112 + 2 * 2, 112 + 2 * 2)
    assert tuple(zoom[0, 0]) == (255, 204, 0)  # framed in the prototype's colour
    assert (zoom[10:100, 10:100] == 255).all()  # the 8 px patch fills the 112 px zoom
    grid = viz.patch_grid([img] * 5, [[0, 0, 8, 8]] * 5, size=50, columns=3, zoom=False)
    assert grid.size == (3 * 50 + 4 * 4, 2 * 50 + 3 * 4)
    zoomed = viz.patch_grid([img] * 5, [[0, 0, 8, 8]] * 5, size=50, columns=3)
    assert zoomed.size == (3 * (50 + 2 + 50 + 4) + 4 * 4, 2 * (50 + 4) + 3 * 4)
    assert viz.crop_patch(img, [4, 4, 12, 12], 32).size == (32, 32)


def test_shares_sum_to_one_and_keep_sign():
    s = viz.contribution_shares([2.0, 1.0, -1.0])
    assert s.sum() == pytest.approx(1.0) and s[2] < 0
    z = viz.contribution_shares([1.0, -1.0])
    assert np.abs(z).sum() == pytest.approx(1.0)


def test_shared_parts_find_the_same_direction_in_another_class():
    p = torch.zeros(3, 2, 4, dtype=torch.float64)
    p[0, 0] = torch.tensor([1.0, 0, 0, 0])
    p[0, 1] = torch.tensor([0, 1.0, 0, 0])
    p[1, 1] = torch.tensor([2.0, 0.1, 0, 0])  # class 5, prototype 2 ~ class 3, prototype 1
    p[1, 0] = torch.tensor([0, 0, 1.0, 0])
    p[2, 0] = torch.tensor([0, 0.5, 0, 1.0])
    p[2, 1] = torch.tensor([0, 0, 0, 1.0])
    sims = viz.prototype_similarity(p, [3, 5, 7], 3, top=2)
    assert len(sims) == 2
    assert sims[0][0]["class_index"] == 5 and sims[0][0]["prototype"] == 1 and sims[0][0]["cosine"] > 0.99
    assert all(s["class_index"] != 3 for s in sims[0] + sims[1])
    assert sims[1][0]["class_index"] == 7 and sims[1][0]["prototype"] == 0


def test_figures_have_one_bar_per_prototype_in_its_colour_and_a_true_waterfall():
    fig = viz.figure_contributions([1.0, 0.5, -0.2])
    assert len(fig.data[0].y) == 3
    assert list(fig.data[0].marker.pattern.shape) == ["", "", viz.NEGATIVE_PATTERN]
    colors = [viz.prototype_color(i) for i in range(3)]
    wf = viz.figure_waterfall(0.3, [1.0, 0.5, -0.2], 1.6, colors=colors).data[0]
    assert list(wf.x) == ["bias", "prototype 1", "prototype 2", "prototype 3", "logit"]
    assert list(wf.marker.color) == [viz.BIAS_COLOR] + colors + [viz.TOTAL_COLOR]
    assert list(wf.marker.pattern.shape) == ["", "", "", viz.NEGATIVE_PATTERN, ""]
    ends = np.asarray(wf.base) + np.asarray(wf.y)
    assert ends[1:4] == pytest.approx([1.3, 1.8, 1.6])  # each step starts where the last ended
    assert wf.y[-1] == pytest.approx(1.6) and ends[3] == pytest.approx(wf.y[-1])
    top = viz.figure_top_predictions([(1, "a", 3.0, 0.7), (0, "b", 1.0, 0.2)])
    assert len(top.data[0].x) == 2


def _lite0_ready() -> bool:
    try:
        from phpn.demos import get_demo

        return (get_demo("imagenet-lite0").run_dir / "run.json").is_file()
    except Exception:  # noqa: BLE001 - the weights package is optional
        return False


@pytest.mark.skipif(not _lite0_ready(), reason="the imagenet-lite0 demo is not installed")
@pytest.mark.parametrize("photo", ["chelsea", "coffee", "astronaut"])
def test_every_prototype_is_visible_on_natural_photos(photo):
    """The real EfficientNet-Lite0 demo on real photos: every prototype of the predicted class
    that adds somewhere takes its colour where it fires (contrast in RGB units), and more
    clearly than on one scale shared by the prototypes."""
    skimage_data = pytest.importorskip("skimage.data")
    from phpn.api import explain_image, open_model, open_run
    from phpn.demos import get_demo

    session = open_model(demo="imagenet-lite0")
    run = open_run(get_demo("imagenet-lite0").run_dir, session)
    network = run.network()
    e = explain_image(session, network, Image.fromarray(getattr(skimage_data, photo)()))
    picture = viz.enlarge(e.image, 224)
    shared = viz.signed_scale(e.maps)
    gains = []
    for i in range(len(e.contributions)):
        assert e.maps[i].max() > 0
        color = viz.prototype_color(i)
        own = viz.overlay_contrast(viz.prototype_overlay(picture, e.maps[i], 0.7, colors=[color]), e.maps[i], color)
        on_shared = viz.overlay_contrast(viz.map_overlay(picture, e.maps[i], color, opacity=0.7, scale=shared),
                                         e.maps[i], color)
        assert own >= 25, (photo, i, own)
        gains.append(own - on_shared)
    assert min(gains) >= 0 and max(gains) > 0


def test_class_maps_average_to_the_contributions(tiny_run, tiny_loaded, image_folder):
    run, split, data = tiny_run
    net = run.network(split)
    paths = data.classes[1].paths[:3]
    pictures, maps, contrib, kept = viz.class_maps(net, tiny_loaded.preprocess, image_folder, paths + ["nope.png"], 1)
    assert len(pictures) == 3 and kept == paths
    assert maps.shape[:2] == (3, 3)
    assert np.allclose(maps.mean(axis=(2, 3)), contrib, atol=1e-5)


def _images_in(html_text: str) -> list:
    return re.findall(r'src="data:image/png;base64,([^"]+)"', html_text)


def test_class_report_is_self_contained(tiny_run, tiny_loaded, image_folder):
    run, split, _ = tiny_run
    html_text = report.class_report(run, 2, image_root=image_folder, preprocess=tiny_loaded.preprocess,
                                    network=run.network(split))
    assert html_text.startswith("<!DOCTYPE html>") and "blue" in html_text and "PASSED" in html_text
    assert "<script" not in html_text and "http://" not in html_text and "https://" not in html_text
    imgs = _images_in(html_text)
    assert len(imgs) >= 3 + 3  # a patch grid and map row per prototype
    Image.open(io.BytesIO(base64.b64decode(imgs[0]))).verify()
    # Without the images the report still builds.
    assert "not available" in report.class_report(run, 2, image_root=None, preprocess=tiny_loaded.preprocess)


def test_explanation_report(tiny_run, tiny_loaded, image_folder):
    run, split, _ = tiny_run
    net = run.network(split)
    from phpn.api import explain_image

    class Session:  # the parts of ModelSession explain_image uses
        preprocess = tiny_loaded.preprocess
        class_names = tiny_loaded.class_names

    e = explain_image(Session(), net, image_folder / "0" / "img00.png")
    assert isinstance(e, Explanation)
    html_text = report.explanation_report(e, run, image_root=image_folder, preprocess=tiny_loaded.preprocess)
    assert "Why" in html_text and len(_images_in(html_text)) >= 4 + 3 * 2
    assert "<script" not in html_text


def test_run_zip_holds_the_run_files(tiny_run, tmp_path):
    from phpn.runs.store import is_run_file, load_run, save_run

    run, _, _ = tiny_run
    run.path = None
    data = report.run_zip_bytes(run, "myrun")
    assert run.path is None  # an unsaved run stays unsaved
    names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    assert "myrun/run.json" in names and len(names) == 4  # run.json, the head, one shard's two files
    assert all(n.startswith("myrun/") and is_run_file(n[len("myrun/"):]) for n in names)
    save_run(run, tmp_path / "saved")
    data = report.run_zip_bytes(run)
    zipfile.ZipFile(io.BytesIO(data)).extractall(tmp_path / "unzipped")
    again = load_run(tmp_path / "unzipped" / "saved")
    assert torch.equal(again.prototypes, run.prototypes.double())
    run.path = None


def test_grid_and_class_maps_use_the_prototype_colour_and_grey_for_what_subtracts():
    m = np.array([[1.0, -1.0], [0.0, 0.5]])
    color = viz.prototype_color(3)
    g = np.asarray(viz.grid_image(m, size=20, lines=False, color=color)).astype(int)
    assert tuple(g[0, 0]) == viz.hex_to_rgb(color)  # full colour at its largest value
    assert tuple(g[0, 15]) == viz.NEGATIVE_RGB  # grey where it subtracts
    assert tuple(g[15, 0]) == (250, 250, 250)  # white at zero
    heat = np.asarray(viz.heat_overlay(_grey_photo(40), np.array([[0.0, -1.0], [0.0, 0.0]]), 1.0,
                                       mode="nearest")).astype(int)
    right_top = heat[2:18, 22:38].reshape(-1, 3)
    assert (np.abs(right_top - viz.NEGATIVE_RGB).max(axis=1) < 3).mean() > 0.3  # hatched grey
    assert (np.abs(right_top - 100).max(axis=1) < 3).mean() > 0.3  # and the photo between the stripes
