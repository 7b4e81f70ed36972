"""Pages that stay fast on a large run: the network that reads only the classes it explains,
"shared parts" kept in each class's record, and the app's Classes, Explain and Mistakes pages
reading only the shards of the classes they show."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_split
from PIL import Image

import phpn.runs.store as runs
from phpn.api import explain_image, open_model, open_run
from phpn.config import shared_parts
from phpn.errors import ConfigError
from phpn.images.folders import scan_image_folder
from phpn.method.network import LazyPrototypeNetwork, PrototypeNetwork
from phpn.pipeline.discover import DiscoveryConfig, add_similar_prototypes, discover
from phpn.pipeline.mistakes import contrast_image
from phpn.runs.store import load_run, save_run
from phpn.show import viz

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("large_run", ROOT / "scripts" / "large_run.py")
large_run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(large_run)

CLASSES, K, D = 600, 3, 8
PER_SHARD = 50  # classes a shard in the saved run


@pytest.fixture
def shard_reads(monkeypatch):
    """The classes of every shard read from disk, in order (one list per shard read)."""
    reads = []
    original = runs._Shards._read

    def counting(self, number):
        reads.append(list(self.entries[number]["classes"]))
        return original(self, number)

    monkeypatch.setattr(runs._Shards, "_read", counting)
    return reads


@pytest.fixture(scope="module")
def large(tmp_path_factory):
    """A synthetic run of 600 classes in 12 shards, its model (1x1 convolution, mean, the run's
    head) and a few pictures; the classes' records keep their shared parts as discovery does."""
    run = large_run.synthetic_run(CLASSES, k=K, features=D, top=1, images=2)
    records = list(run.meta["classes"])
    for record in records:
        del record["similar_prototypes"]
    add_similar_prototypes(records, run.prototypes, run.class_indices, torch.device("cpu"))
    folder = tmp_path_factory.mktemp("large")
    torch.manual_seed(0)
    session = open_model(large_run.PooledLinear(run.head_rows, run.head_bias).eval(),
                         preprocess=large_run.PREPROCESS)
    run.meta["model"].update(arch=session.loaded.arch, sha256=session.loaded.sha256,
                             feature_layer=session.split.feature_layer, head_layer=session.split.head_layer)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runs, "SHARD_BYTES", PER_SHARD * (K * D * 12 + K * 8))
        path = save_run(run, folder / "run")
    images = folder / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(images / f"{i}.png")
    return path, run, session, images


def _shard(class_index: int) -> list:
    start = class_index // PER_SHARD * PER_SHARD
    return list(range(start, start + PER_SHARD))


def test_explaining_one_image_reads_its_class_shard_only_and_is_exact(large, shard_reads):
    path, run, session, images = large
    opened = open_run(path, session)
    network = opened.lazy_network(session.split)
    assert shard_reads == []  # opening and building read no shard
    explained = explain_image(session, network, images / "0.png")
    c = explained.class_index
    assert shard_reads == [_shard(c)] and network.cached_classes == [c]
    x = session.preprocess.normalise(session.preprocess.geometry(Image.open(images / "0.png").convert("RGB")))[None]
    with torch.no_grad():
        model_logits = session.loaded.model(x)[0]
    assert explained.logit == pytest.approx(float(model_logits[c]), abs=1e-4)
    assert c == int(model_logits.argmax())  # every class is decomposed: the top one is explained
    assert explained.bias + float(explained.contributions.sum()) == pytest.approx(explained.logit, abs=1e-4)
    np.testing.assert_allclose(explained.maps.mean((1, 2)), explained.contributions, rtol=0, atol=1e-5)
    full = explain_image(session, PrototypeNetwork(session.split, run.prototypes, run.class_indices), images / "0.png")
    np.testing.assert_allclose(explained.contributions, full.contributions, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(explained.maps, full.maps, rtol=1e-5, atol=1e-5)


def test_the_lazy_network_gives_the_full_networks_numbers_in_float64(large, shard_reads):
    path, run, session, _ = large
    opened = load_run(path)
    lazy = opened.lazy_network(session.split, dtype=torch.float64)
    full = PrototypeNetwork(session.split, run.prototypes, run.class_indices, dtype=torch.float64)
    features = torch.rand(2, D, 7, 7, dtype=torch.float64)
    picked = [7, 560, 8]
    ours, theirs = lazy.explain_features(features, picked), full.explain_features(features, picked)
    assert ours.maps.shape == (2, 3, K, 7, 7) and ours.classes == picked
    torch.testing.assert_close(ours.contributions, theirs.contributions, rtol=0, atol=1e-12)
    torch.testing.assert_close(ours.maps, theirs.maps, rtol=0, atol=1e-12)
    torch.testing.assert_close(ours.logits, theirs.logits, rtol=0, atol=1e-10)  # the head, = Σ prototypes + bias
    torch.testing.assert_close(ours.contributions.sum(-1) + ours.bias[picked], ours.logits[:, picked], rtol=0, atol=1e-10)
    assert shard_reads == [_shard(7), _shard(560)]
    assert lazy.class_k(560) == K and sorted(lazy.cached_classes) == [7, 8, 560]
    with pytest.raises(ConfigError, match="Class 600 has no prototypes in this run."):
        lazy.explain_features(features, [600])


def test_the_cache_keeps_the_last_classes_only(large, shard_reads):
    path, _, session, _ = large
    lazy = load_run(path).lazy_network(session.split, cached_classes=2)
    features = torch.rand(1, D, 7, 7)
    for c in (1, 2, 3, 1):
        lazy.explain_features(features, [c], with_maps=False)
    assert lazy.cached_classes == [3, 1]  # least recently used first
    assert shard_reads == [_shard(1)]  # the run keeps the shard it read


def test_a_class_with_fewer_prototypes_has_zero_rows_past_its_own_k():
    split_weight = torch.randn(3, 4, dtype=torch.float64)
    own = {0: torch.randn(2, 4, dtype=torch.float64), 1: torch.randn(3, 4, dtype=torch.float64)}
    own[0][-1] = split_weight[0] - own[0][0]
    own[1][-1] = split_weight[1] - own[1][:2].sum(0)
    from phpn.head import HeadSplit

    split = HeadSplit(backbone=torch.nn.Identity(), weight=split_weight, bias=torch.zeros(3, dtype=torch.float64))
    lazy = LazyPrototypeNetwork(split, [0, 1], lambda c: own[c], k=3, dtype=torch.float64)
    padded = torch.stack([torch.cat([own[0], torch.zeros(1, 4, dtype=torch.float64)]), own[1]])
    full = PrototypeNetwork(split, padded, [0, 1], dtype=torch.float64)
    assert [lazy.class_k(c) for c in (0, 1)] == [full.class_k(c) for c in (0, 1)] == [2, 3]
    features = torch.rand(2, 4, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(lazy.explain_features(features, [0, 1]).maps, full.explain_features(features, [0, 1]).maps)
    with pytest.raises(ValueError, match=r"class 0's prototypes must be \(k, D\) with k from 1 to 2"):
        LazyPrototypeNetwork(split, [0], lambda c: own[1], k=2).class_k(0)


def test_class_maps_shared_parts_and_why_a_not_b_read_the_shown_classes_only(large, shard_reads):
    path, run, session, images = large
    opened = open_run(path, session)
    network = opened.lazy_network(session.split)
    pictures, maps, contributions, kept = viz.class_maps(network, session.preprocess, images, ["0.png", "1.png"], 123)
    assert maps.shape == (2, K, 7, 7) and kept == ["0.png", "1.png"]
    shared = viz.shared_parts(opened, 123)
    assert shard_reads == [_shard(123)]
    # The kept shared parts are the formula's, computed over every prototype.
    expected = viz.prototype_similarity(run.prototypes, run.class_indices, 123)
    assert len(shared) == K
    for ours, theirs in zip(shared, expected):
        _same_found(ours, theirs)
    contrast = contrast_image(session, network, images / "1.png", 130, 599)
    assert shard_reads == [_shard(123), _shard(599)]  # 130 shares 123's shard
    assert contrast.bias_a + contrast.contributions_a.sum() == pytest.approx(contrast.logit_a, abs=1e-4)
    assert contrast.bias_b + contrast.contributions_b.sum() == pytest.approx(contrast.logit_b, abs=1e-4)


def test_a_run_without_kept_shared_parts_computes_them_from_every_prototype(large, shard_reads, tmp_path):
    path, run, _, _ = large
    older_run = load_run(path)  # saved again as by a phpn that kept no shared parts (run.json is sealed)
    older_run.meta["classes"] = [dict(record) for record in older_run.meta["classes"]]
    for record in older_run.meta["classes"][:PER_SHARD]:
        del record["similar_prototypes"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runs, "SHARD_BYTES", PER_SHARD * (K * D * 12 + K * 8))
        older = save_run(older_run, tmp_path / "older")
    shard_reads.clear()
    opened = load_run(older)
    assert viz.shared_parts(opened, 5, top=2) == viz.prototype_similarity(run.prototypes, run.class_indices, 5, top=2)
    assert len(shard_reads) == CLASSES // PER_SHARD  # the old way: every shard
    shard_reads.clear()
    fresh = load_run(path)
    assert len(viz.shared_parts(fresh, 5, top=viz.SIMILAR_TOP + 1)[0]) == viz.SIMILAR_TOP + 1  # more than kept
    assert len(shard_reads) == CLASSES // PER_SHARD


def _same_found(ours: list, theirs: list) -> None:
    """The same prototypes in the same order, cosines equal to float64 rounding."""
    assert [(s["class_index"], s["prototype"]) for s in ours] == [(s["class_index"], s["prototype"]) for s in theirs]
    assert [s["cosine"] for s in ours] == pytest.approx([s["cosine"] for s in theirs], rel=0, abs=1e-12)


def test_similar_prototypes_in_blocks_equal_the_formula_one_prototype_at_a_time():
    g = torch.Generator().manual_seed(3)
    p = torch.randn(7, 3, 5, dtype=torch.float64, generator=g)
    p[2, 2] = 0  # a class with k = 2: its third slot is empty
    classes = [10, 11, 12, 13, 14, 15, 16]
    blocks = viz.similar_prototypes(p, classes, top=4, block_elements=1)  # one class a block
    whole = viz.similar_prototypes(p, classes, top=4)
    assert len(whole) == len(blocks) == 7 and all(len(found) == 3 for found in whole)
    unit = torch.nn.functional.normalize(p.reshape(21, 5), dim=1).numpy()
    for row in range(7):
        one_class = viz.prototype_similarity(p, classes, classes[row], top=4)
        for i in range(3):
            _same_found(one_class[i], whole[row][i])
            _same_found(blocks[row][i], whole[row][i])
            if row == 2 and i == 2:
                assert whole[row][i] == []  # an empty slot finds nothing
                continue
            cos = unit @ unit[row * 3 + i]
            others = [(cos[j], j) for j in range(21) if j // 3 != row and j != 8 and cos[j] >= 0]
            best = sorted(others, reverse=True)[:4]
            _same_found(whole[row][i], [{"class_index": classes[j // 3], "prototype": j % 3, "cosine": v}
                                        for v, j in best])
    assert all(s["class_index"] != 12 or s["prototype"] != 2 for found in whole for s in sum(found, []))
    p[4, 0] = p[1, 1] * 3  # the same direction in two classes
    assert viz.prototype_similarity(p, classes, 14, top=1)[0] == [
        {"class_index": 11, "prototype": 1, "cosine": pytest.approx(1.0, abs=1e-12)}]
    assert viz.prototype_similarity(p, classes, 14, top=1, min_cosine=1.5) == [[], [], []]


def test_discovery_keeps_each_classes_shared_parts_in_its_record(tiny_loaded, image_folder, tmp_path, shard_reads):
    data = scan_image_folder(image_folder, class_names=tiny_loaded.class_names, num_classes=4)
    run = discover(tiny_loaded, tiny_split(tiny_loaded.model), data, tiny_loaded.preprocess,
                   DiscoveryConfig(k=2, device="cpu", solver="none"))
    from phpn.method.part_metrics import FIELDS

    assert "similar_prototypes" in FIELDS
    for c in range(4):
        kept = run.class_meta(c)["similar_prototypes"]
        expected = viz.prototype_similarity(run.prototypes, run.class_indices, c)
        assert len(kept) == 2 and all(len(found) == 3 for found in kept)  # k = 2; 3 other classes
        for ours, theirs in zip(kept, expected):
            _same_found(ours, theirs)
    opened = load_run(save_run(run, tmp_path / "run"))
    assert viz.shared_parts(opened, 2) == [shared_parts(found) for found in run.class_meta(2)["similar_prototypes"]]


def test_switching_prototypes_off_explains_those_classes_only(tiny_loaded, image_folder, tmp_path, shard_reads,
                                                             monkeypatch):
    from phpn.runs.annotations import switch_off

    split = tiny_split(tiny_loaded.model)
    data = scan_image_folder(image_folder, class_names=tiny_loaded.class_names, num_classes=4)
    run = discover(tiny_loaded, split, data, tiny_loaded.preprocess, DiscoveryConfig(k=2, device="cpu", solver="none"))
    monkeypatch.setattr(runs, "SHARD_BYTES", 1)  # one class a shard
    opened = load_run(save_run(run, tmp_path / "run"))
    lazy = opened.lazy_network(split)
    ours = switch_off(lazy, data, tiny_loaded.preprocess, {1: [0]})
    theirs = switch_off(run.network(split), data, tiny_loaded.preprocess, {1: [0]})
    assert shard_reads == [[1]]
    assert ours.to_dict() == theirs.to_dict() and ours.images == 48


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("streamlit") is None, reason="needs streamlit")
def test_the_pages_read_only_the_shards_of_the_classes_they_show(tmp_path, monkeypatch, shard_reads):
    from test_app import _app, _clean, _demo_ready, _errors, _same_browser

    if not _demo_ready():
        pytest.skip("the fashion-mnist demo assets are not there")
    for name, value in {"PHPN_UPLOAD_DIR": tmp_path.parent / f"{tmp_path.name}-uploads",
                        "PHPN_DATA_ROOTS": tmp_path, "PHPN_WRITABLE_ROOTS": tmp_path,
                        "PHPN_SETTINGS_FILE": tmp_path / "no-settings.toml"}.items():
        monkeypatch.setenv(name, str(value))  # as test_app's fixture does: this visitor's files in tmp_path
    monkeypatch.delenv("PHPN_ALLOW_CODE", raising=False)
    monkeypatch.setattr(runs, "SHARD_BYTES", 1)  # one class a shard
    at = _app().run()
    at.switch_page("pages/discover.py").run()
    at.text_input(key="save_path").set_value("lazy")
    at.button(key="save_run").click().run()
    _clean(at)
    folder = at.session_state["run"].saved_to
    run = load_run(folder)  # the demo's run, with each class's shared parts kept as discovery keeps them
    add_similar_prototypes(list(run.meta["classes"]), run.prototypes, run.class_indices, torch.device("cpu"))
    save_run(run, folder, overwrite=True)

    shard_reads.clear()
    again = _same_browser(at, monkeypatch)  # a reload: the URL reopens the saved run on class 3
    again.query_params.update(run="my runs / lazy")
    again.query_params["class"] = "3"
    again.run()
    _clean(again)
    assert shard_reads == []
    again.switch_page("pages/classes.py").run()
    _clean(again)
    assert not _errors(again) and again.selectbox(key="browser_class").value == 3
    assert shard_reads == [[3]]  # its record, prototypes, shared parts and maps
    names = run.class_names
    kept = run.class_meta(3)["similar_prototypes"]
    shared = [c.value for c in again.caption if c.value.startswith("Shared parts")]
    assert len(shared) == len(kept) == run.class_k(3)
    for caption, found in zip(shared, kept):
        assert f"{names[found[0]['class_index']]} prototype {found[0]['prototype'] + 1} " \
               f"(cos {found[0]['cosine']:.2f})" in caption

    shard_reads.clear()
    again.switch_page("pages/explain.py").run()
    _clean(again)
    shown = again.session_state["explained"]
    e = shown["explanation"]
    assert shard_reads == ([] if e.class_index == 3 else [[e.class_index]])
    assert e.bias + float(e.contributions.sum()) == pytest.approx(e.logit, abs=1e-4)
    model, data = again.session_state["model"], again.session_state["data"]
    full = explain_image(model.session, run.network(model.session.split), data.explain_root / shown["label"],
                         e.class_index)
    assert e.logit == pytest.approx(full.logit, abs=1e-4)
    np.testing.assert_allclose(e.contributions, full.contributions, rtol=1e-5, atol=1e-5)

    shard_reads.clear()
    again.switch_page("pages/mistakes.py").run()
    again.radio(key="mistakes_source").set_value("The demo's held-out images")
    again.number_input(key="mistakes_cap").set_value(2)
    again.button(key="mistakes_predict").click().run()
    _clean(again)
    assert not _errors(again)
    title = next(s.value for s in again.subheader if "logit gap" in s.value)
    a, b = (int(again.selectbox(key=key).value) for key in sorted(k for k in again.session_state
                                                                   if str(k).startswith("contrast_")))
    assert names[a] in title and names[b] in title
    assert sorted(shard_reads) == sorted([c] for c in {a, b} - {3, e.class_index})  # why A not B: A's and B's


def test_the_python_api_explains_through_the_classes_it_needs(large, shard_reads):
    import phpn

    path, run, session, images = large
    opened = phpn.load_run(path, session.loaded.model)
    explained = opened.explain(images / "2.png")
    assert shard_reads == [_shard(explained.class_index)]
    assert explained.bias + float(explained.contributions.sum()) == pytest.approx(explained.logit, abs=1e-4)
    opened.explain(images / "2.png", class_index=599)
    assert shard_reads[1:] == ([] if explained.class_index // PER_SHARD == 599 // PER_SHARD else [_shard(599)])


def test_a_run_opened_lazily_keeps_the_last_shards_only(large, monkeypatch):
    path, run, _, _ = large
    monkeypatch.setattr(runs, "KEPT_SHARDS", 2)
    opened = load_run(path)
    for c in (0, 60, 120, 10):  # shards 0, 1, 2, then 0 again
        assert torch.equal(opened.class_prototypes(c), run.prototypes[c])
    assert list(opened.__dict__["_shards"]._tensors) == [2, 0]  # least recently used first
    assert opened.class_meta(60) == run.meta["classes"][60]  # records stay
    assert torch.equal(opened.class_prototypes(61), run.prototypes[61])  # read again, checksum checked
