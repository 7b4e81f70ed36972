"""Two runs compared: the planted shortcut (assets/shortcut) against its clean twin, and two
discovery seeds of one model."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from test_audit import MARKED, MODEL_DEF, SHORTCUT, mark_prototype, shortcut_run

import phpn
from phpn.errors import ConfigError
from phpn.pipeline.compare import MATCH_THRESHOLD, SIMILARITY

pytestmark = pytest.mark.slow  # every test here starts from a costly fixture (a jailed worker, trained models, runs)


@pytest.fixture(scope="module")
def runs():
    torch.manual_seed(0)
    return {"clean": shortcut_run("clean"), "shortcut": shortcut_run("shortcut"),
            "shortcut seed 1": shortcut_run("shortcut", seed=1)}


@pytest.mark.slow
def test_clean_and_shortcut_models_pair_but_the_mark_prototype_stays_unmatched(runs):
    result = phpn.compare(runs["clean"], runs["shortcut"], SHORTCUT / "train")
    assert result.similarity == SIMILARITY and result.threshold == MATCH_THRESHOLD
    assert not result.vectors_comparable  # two models: only maps are compared
    assert result.prototypes == (15, 15)
    assert result.matched >= 9  # most parts of the two models are the same parts
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
def test_two_seeds_of_one_model_match_with_high_similarity(runs):
    result = phpn.compare(runs["shortcut"], runs["shortcut seed 1"], SHORTCUT / "train")
    assert result.vectors_comparable  # the same checkpoint and cut: prototype vectors are comparable
    assert result.matched >= 12
    sims = [p["similarity"] for c in result.classes for p in c["pairs"]]
    assert np.median(sims) > 0.9
    assert all(p["cosine"] is not None for c in result.classes for p in c["pairs"])


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


def test_runs_of_models_with_different_classes_are_refused(runs):
    demo = phpn.load_run(SHORTCUT.parent / "fashion-mnist" / "run")
    with pytest.raises(ConfigError) as err:
        phpn.compare(runs["shortcut"], demo, SHORTCUT / "train")
    assert str(err.value).startswith("The runs cannot be compared: their models have different classes (5 and 10).")


def test_cli_compare_json(runs, tmp_path, capsys):
    from phpn.cli import main

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
