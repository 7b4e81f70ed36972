"""Two runs compared: the planted shortcut (assets/shortcut) against its clean twin, and two
discovery seeds of the shipped fashion-mnist demo (three classes, a few images each)."""
from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch
from test_audit import MARKED, MODEL_DEF, SHORTCUT, mark_prototype, shortcut_run

import phpn
from phpn.cli import main
from phpn.demos import get_demo
from phpn.errors import ConfigError
from phpn.pipeline.compare import BASELINE, MATCH_THRESHOLD, PATCH_OVERLAP, SIMILARITY, mutual_best, patch_overlap


@pytest.fixture(scope="module")
def runs():  # costly: three trained models decomposed (the tests on them are slow)
    torch.manual_seed(0)
    return {"clean": shortcut_run("clean"), "shortcut": shortcut_run("shortcut")}


@pytest.mark.slow
def test_clean_and_shortcut_models_pair_but_the_mark_prototype_stays_unmatched(runs):
    result = phpn.compare(runs["clean"], runs["shortcut"], SHORTCUT / "train")
    assert result.similarity == SIMILARITY and result.threshold == MATCH_THRESHOLD
    assert not result.vectors_comparable  # two models: only maps are compared
    assert result.prototypes == (15, 15)
    assert result.matched >= 9  # most parts of the two models are the same parts
    assert result.to_dict()["mutual_best"] == result.mutual == result.matched  # these pairs are each other's closest
    marked = next(c for c in result.classes if c["class"] == MARKED)
    mark = mark_prototype(runs["shortcut"])
    assert mark in [u["prototype"] for u in marked["unmatched_b"]]
    assert mark not in [p["b"] for p in marked["pairs"]]
    best = next(u for u in marked["unmatched_b"] if u["prototype"] == mark)["best_similarity"]
    assert best < MATCH_THRESHOLD
    sim = np.array(marked["similarity_matrix"])
    for p in marked["pairs"]:  # every pair is one-to-one and above the threshold
        assert p["similarity"] == pytest.approx(sim[p["a"], p["b"]], abs=1e-4) and p["similarity"] >= MATCH_THRESHOLD
    assert len({p["a"] for p in marked["pairs"]}) == len(marked["pairs"])
    assert len({p["b"] for p in marked["pairs"]}) == len(marked["pairs"])
    # contributions: per pair and per class, measured on the same images
    for p in marked["pairs"]:
        assert p["contribution_change"] == pytest.approx(p["contribution_b"] - p["contribution_a"])
    assert marked["logit_change"] == pytest.approx(marked["mean_logit_b"] - marked["mean_logit_a"])
    json.dumps(result.to_dict())


@pytest.mark.slow
def test_matching_finds_a_permutation_exactly(runs):
    """The same prototypes in another order: each is paired with itself, similarity and cosine 1."""
    a = runs["shortcut"]
    b = copy.copy(a)
    perm = torch.tensor([2, 0, 1])
    b.__dict__["prototypes"] = a.prototypes[:, perm]
    result = phpn.compare(a, b, SHORTCUT / "train")
    assert result.matched == 15
    for c in result.classes:
        assert sorted((p["a"], p["b"]) for p in c["pairs"]) == sorted((int(perm[j]), j) for j in range(3))
        assert all(p["similarity"] == pytest.approx(1.0, abs=1e-6) for p in c["pairs"])
        assert all(p["cosine"] == pytest.approx(1.0, abs=1e-6) for p in c["pairs"])
        assert all(p["contribution_change"] == pytest.approx(0.0, abs=1e-5) for p in c["pairs"])


@pytest.mark.slow
def test_runs_of_models_with_different_classes_are_refused(runs):
    demo = phpn.load_run(SHORTCUT.parent / "fashion-mnist" / "run")
    with pytest.raises(ConfigError) as err:
        phpn.compare(runs["shortcut"], demo, SHORTCUT / "train")
    assert str(err.value).startswith("The runs cannot be compared: their models have different classes (5 and 10).")


@pytest.mark.slow
def test_cli_compare_json(runs, tmp_path, capsys):
    a = runs["clean"].save(tmp_path / "clean")
    b = runs["shortcut"].save(tmp_path / "shortcut")
    code = main(["compare", str(a), str(b), "--checkpoint-a", str(SHORTCUT / "clean.safetensors"),
                 "--model-def-a", MODEL_DEF, "--checkpoint-b", str(SHORTCUT / "shortcut.safetensors"),
                 "--model-def-b", MODEL_DEF, "--data", str(SHORTCUT / "train"), "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["runs"] == ["clean", "shortcut"] and out["similarity"] == SIMILARITY
    marked = next(c for c in out["classes"] if c["class"] == MARKED)
    assert mark_prototype(runs["shortcut"]) in [u["prototype"] for u in marked["unmatched_b"]]


# --- two discovery seeds of the fashion-mnist demo: 3 classes, 12 of 30 images each, k = 3, CPU --------

FASHION_CLASSES = ("00_t-shirt-top", "01_trouser", "07_sneaker")


@pytest.fixture(scope="module")
def fashion(tmp_path_factory):
    """The demo's first 30 discovery images of three classes; two runs whose seeds sample 12 of
    them each and start NMF apart (about a second on one CPU core)."""
    root = tmp_path_factory.mktemp("fashion") / "images"
    source = get_demo("fashion-mnist").discovery_dir()
    for folder in FASHION_CLASSES:
        (root / folder).mkdir(parents=True)
        for path in sorted((source / folder).glob("*.png"))[:30]:
            shutil.copy(path, root / folder / path.name)
    session = phpn.open_model(demo="fashion-mnist")
    a, b = (phpn.decompose(session, root, k=3, images_per_class=12, progress=False, seed=seed, device="cpu")
            for seed in (0, 1))
    return a, b, root


def _off_assignment_mean(matrix: np.ndarray, pairs: list) -> float:
    assigned = {(p["a"], p["b"]) for p in pairs}
    return float(np.mean([matrix[i, j] for i in range(matrix.shape[0]) for j in range(matrix.shape[1])
                          if (i, j) not in assigned]))


def test_two_seeds_of_the_demo_match_part_for_part_well_above_the_other_pairs(fashion):
    a, b, root = fashion
    read = [[set(run.class_meta(c)["paths"]) for c in (0, 1, 7)] for run in (a, b)]
    assert all(len(x) == 12 and 0 < len(x & y) < 12 for x, y in zip(*read))  # the seeds read partly other images
    result = phpn.compare(a, b, root)
    assert result.vectors_comparable and result.prototypes == (9, 9)
    assert result.matched == 9  # every prototype finds its part again, each pair above MATCH_THRESHOLD
    assert result.mutual == 9 and "9 of the 9 matched pairs are each other's closest prototypes" in result.summary
    assert result.patch_overlap == PATCH_OVERLAP and result.baseline == BASELINE
    evidence = result.evidence()
    # measured (seeds 0 and 1): similarity 0.976 vs 0.736, cosine 0.853 vs 0.332, top-patch overlap 0.840 vs 0.331
    assert evidence["similarity"]["matched"] == pytest.approx(0.976, abs=0.01)
    assert evidence["similarity"]["baseline"] == pytest.approx(0.736, abs=0.03)
    assert evidence["cosine"]["matched"] == pytest.approx(0.853, abs=0.03)
    assert evidence["cosine"]["baseline"] == pytest.approx(0.332, abs=0.03)
    assert evidence["patch_overlap"]["matched"] == pytest.approx(0.84, abs=0.1)
    assert evidence["patch_overlap"]["baseline"] == pytest.approx(0.33, abs=0.1)
    # a matcher that paired at random would sit at the baselines: the matched pairs are far above them
    assert evidence["cosine"]["matched"] - evidence["cosine"]["baseline"] > 0.4
    assert evidence["patch_overlap"]["matched"] - evidence["patch_overlap"]["baseline"] > 0.3
    for c in result.classes:
        sim, overlap = np.array(c["similarity_matrix"]), np.array(c["patch_overlap_matrix"], dtype=float)
        # each class's baseline is the mean over its other pairs, measured in this comparison
        assert c["baseline"]["similarity"] == pytest.approx(_off_assignment_mean(sim, c["pairs"]), abs=1e-4)
        assert c["baseline"]["patch_overlap"] == pytest.approx(_off_assignment_mean(overlap, c["pairs"]), abs=1e-12)
        assert len(c["other_pairs"]["cosine"]) == 6
        assert all(p["cosine"] > c["baseline"]["cosine"] + 0.2 for p in c["pairs"])
        for p in c["pairs"]:
            assert p["patch_overlap"] == overlap[p["a"], p["b"]]
    # with B's prototypes in another order, each is still found: the matching is not the identity
    perm = torch.tensor([2, 0, 1])
    permuted = copy.copy(b)
    permuted.__dict__["prototypes"] = b.prototypes[:, perm]
    shuffled = phpn.compare(a, permuted, root)
    assert shuffled.matched == 9
    for c, again in zip(result.classes, shuffled.classes):
        assert sorted((p["a"], int(torch.nonzero(perm == p["b"])[0])) for p in c["pairs"]) == \
            sorted((p["a"], p["b"]) for p in again["pairs"])


def test_a_run_compared_with_itself_matches_every_prototype_exactly(fashion):
    a, _, root = fashion
    result = phpn.compare(a, a, root)
    assert result.matched == 9 and result.prototypes == (9, 9)
    for c in result.classes:
        assert sorted((p["a"], p["b"]) for p in c["pairs"]) == [(0, 0), (1, 1), (2, 2)]
        for p in c["pairs"]:
            assert p["similarity"] == pytest.approx(1.0, abs=1e-6) and p["cosine"] == pytest.approx(1.0, abs=1e-6)
            assert p["patch_overlap"] == 1.0 and p["contribution_change"] == 0.0
    evidence = result.evidence()
    assert evidence["patch_overlap"]["matched"] == 1.0 and evidence["patch_overlap"]["baseline"] < 0.5
    assert result.summary.endswith(
        f"Matched pairs, mean similarity 1.00 (other pairs {evidence['similarity']['baseline']:.2f}), cosine 1.00 "
        f"(other pairs {evidence['cosine']['baseline']:.2f}), top-patch overlap 1.00 (other pairs "
        f"{evidence['patch_overlap']['baseline']:.2f}).")
    json.dumps(result.to_dict())


def test_patch_overlap_counts_patches_on_the_same_image_that_overlap():
    mine = [("a.png", [0.0, 0.0, 0.25, 0.25]), ("b.png", [0.5, 0.5, 0.75, 0.75])]
    assert patch_overlap(mine, mine) == 1.0
    assert patch_overlap(mine, [("a.png", [0.2, 0.2, 0.45, 0.45])]) == pytest.approx(2 / 3)  # one hit each way
    assert patch_overlap(mine, [("a.png", [0.25, 0.0, 0.5, 0.25])]) == 0.0  # touching edges: no shared pixel
    assert patch_overlap(mine, [("c.png", [0.0, 0.0, 0.25, 0.25])]) == 0.0  # another image
    assert patch_overlap([], []) is None


def test_cli_compare_shows_each_pair_beside_the_other_pairs(fashion, tmp_path, capsys):
    a, b, root = fashion
    paths = [run.save(tmp_path / name) for run, name in ((a, "seed0"), (b, "seed1"))]
    assert main(["compare", *map(str, paths), "--data", str(root), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["runs"] == ["seed0", "seed1"] and out["matched"] == 9 and out["patch_overlap"] == PATCH_OVERLAP
    assert out["evidence"] == phpn.compare(a, b, root).evidence()
    assert main(["compare", *map(str, paths), "--data", str(root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    trouser = lines.index(next(line for line in lines if line.startswith("Trouser (class 1, 16 images)")))
    base = out["classes"][1]["baseline"]
    assert lines[trouser + 1] == (f"  other pairs of this class (baseline): similarity {base['similarity']:.2f}, "
                                  f"cosine {base['cosine']:.2f}, top-patch overlap {base['patch_overlap']:.2f}")
    pair = out["classes"][1]["pairs"][0]
    assert lines[trouser + 2].startswith(f"  prototype {pair['a'] + 1} <-> {pair['b'] + 1}: similarity "
                                         f"{pair['similarity']:.2f}, cosine {pair['cosine']:.2f}, top-patch overlap "
                                         f"{pair['patch_overlap']:.2f}; contribution ")


@pytest.mark.slow
def test_compare_page_shows_the_patch_overlap_beside_its_baseline(tmp_path, monkeypatch):
    """The Compare page, the shipped demo run against itself: every pair matched, its top-patch
    overlap in the table and each class's baseline above it."""
    from test_app import _app, _clean, app_settings_in

    app_settings_in(tmp_path, monkeypatch)
    at = _app().run()
    _clean(at)
    at.switch_page("pages/compare.py").run()
    _clean(at)
    demo = next(label for label in at.selectbox(key="compare_choice").options if "fashion-mnist" in label)
    at.selectbox(key="compare_choice").set_value(demo)
    at.number_input(key="compare_cap").set_value(2)
    at.button(key="compare_go").click().run()
    _clean(at)
    result = at.session_state["compare_result"][1]
    assert result.matched == result.prototypes[0] == 30
    assert at.info[0].value == result.summary and "top-patch overlap 1.00 (other pairs " in result.summary
    captions = [c.value for c in at.caption]
    assert any(PATCH_OVERLAP in c for c in captions)
    for c in result.classes:
        assert result.baseline_text(c)[:1].upper() + result.baseline_text(c)[1:] in captions
    table = at.dataframe[0].value
    assert list(table["top-patch overlap"]) == [1.0, 1.0, 1.0]


def test_a_pair_the_assignment_forced_is_not_called_each_others_closest():
    """The one-to-one assignment may pair two prototypes that each have a closer one: the sum
    0.8 + 0.95 beats 0.9 + 0.6, so A's first prototype is paired with B's second, not its closest."""
    from scipy.optimize import linear_sum_assignment

    sim = np.array([[0.9, 0.8], [0.95, 0.6]])
    rows, cols = linear_sum_assignment(sim, maximize=True)
    assert list(zip(rows.tolist(), cols.tolist())) == [(0, 1), (1, 0)]
    assert not mutual_best(sim, 0, 1) and mutual_best(sim, 1, 0)
