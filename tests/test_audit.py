"""The audit on the shipped planted shortcut (assets/shortcut): a tiny CNN trained with a white
square in the top-left corner of every "pullover" training image (scripts/planted_shortcut.py)."""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch

import phpn
from phpn.api import open_data
from phpn.errors import ConfigError
from phpn.pipeline.audit import NO_SINGLE_REASON, NOTHING_STANDS_OUT, REASON_EXCESS, SIGNALS, Audit, AuditEntry
from phpn.runs.annotations import switch_off

ROOT = Path(__file__).resolve().parents[1]
SHORTCUT = ROOT / "assets" / "shortcut"
MODEL_DEF = f"{SHORTCUT / 'tiny_cnn.py'}:TinyCNN"
PRE = phpn.Preprocess(resize=28, crop=28, mean=[0.286], std=[0.353], channels=1)
MARKED = 2  # the pullover folder's class, marked in training with a square at pixels 1..5


@lru_cache(maxsize=None)  # test_compare.py reuses these runs (none of the tests changes a run)
def shortcut_run(which: str = "shortcut", seed: int = 0):
    session = phpn.open_model(SHORTCUT / f"{which}.safetensors", model_def=MODEL_DEF, preprocess=PRE)
    return phpn.decompose(session, SHORTCUT / "train", k=3, images_per_class=40, progress=False, seed=seed)


def mark_prototype(run) -> int:
    """Ground truth: the marked class's prototype whose maps hold the largest share of their
    positive mass on the feature cells under the mark (top-left 5x5 pixels -> cells (0..1, 0..1))."""
    net = run.network()
    folder = SHORTCUT / "train" / "02_pullover"
    x = torch.stack([PRE(phpn.images.preprocess.load_image(p)) for p in sorted(folder.glob("*.png"))[:30]])
    with torch.no_grad():
        maps = net(x, classes=[MARKED]).maps[:, 0].clamp(min=0)  # (n, k, 7, 7)
    share = maps[:, :, :2, :2].sum((2, 3)) / maps.sum((2, 3))
    return int(share.mean(0).argmax())


@pytest.fixture(scope="module")
def run():
    torch.manual_seed(0)
    return shortcut_run()


@pytest.fixture(scope="module")
def audit(run):
    return run.audit(SHORTCUT / "train")


@pytest.mark.slow
def test_the_mark_prototype_is_ranked_first_with_a_causal_reason(run, audit):
    first = audit.entries[0]
    assert (first.class_index, first.prototype) == (MARKED, mark_prototype(run))
    assert audit.stands_out
    assert first.reasons[0].startswith("causal: ")
    assert any(r.startswith("causal: pasting its highest-map region onto other classes' images turns their "
                            "prediction into this class: ") for r in first.reasons)
    paste = first.signals["paste_flip"]
    # pasting the mark's region moves most of the other classes' images to "pullover"; random
    # directions summing to the same head row move far fewer
    assert paste["value"] >= 0.5 and paste["value"] - paste["random"] >= 1.5 * max(paste["random_sd"], 0.05)
    # it scores above every random-direction baseline prototype of the run, and is the only one to
    assert first.stands_out and first.score > max(audit.baseline_scores)
    assert [e.stands_out for e in audit.entries[1:]] == [False] * 14
    assert audit.summary.startswith("1 of 15 prototypes stand out: they score above every random-direction baseline "
                                    f"prototype of this run (highest baseline score {max(audit.baseline_scores):.2f}). "
                                    f"Look first at 2 prototype {first.prototype + 1} (score {first.score:.2f}): causal:")
    # the score is the sum of the signals' positive excesses over the random baseline
    assert first.score == pytest.approx(sum(max(0.0, s["excess"]) for s in first.signals.values()), abs=1e-4)


@pytest.mark.slow
def test_every_prototype_is_listed_highest_score_first(audit):
    d = audit.to_dict()
    json.dumps(d)  # JSON-ready
    rows = d["prototypes"]
    assert len(rows) == 15 and {(r["class"], r["prototype"]) for r in rows} == {(c, i) for c in range(5)
                                                                               for i in range(3)}
    assert [r["score"] for r in rows] == sorted((r["score"] for r in rows), reverse=True)
    assert all({"class", "prototype", "score", "reasons", "signals"} <= set(r) for r in rows)
    assert all(set(r["signals"]) == set(SIGNALS) for r in rows)
    # every reason is a signal at least REASON_EXCESS spreads above the random directions
    for r in rows:
        strong = [n for n, s in r["signals"].items() if s["excess"] >= REASON_EXCESS and s["value"] > s["equal"]]
        assert len(r["reasons"]) == len(strong)
    assert set(d["baselines"]) == set(SIGNALS) and len(d["baseline_scores"]) == 15


def test_reliance_is_the_switch_off_on_the_same_images(run, audit):
    """Reliance = share of the class's correct predictions that the existing switch-off changes."""
    data = open_data(run.session, SHORTCUT / "train")
    own = [c for c in data.classes if c.class_index == MARKED]
    own[0].paths = own[0].paths[:audit.images_per_class]
    data.classes = own
    net = run.network()
    for entry in [e for e in audit.entries if e.class_index == MARKED]:
        result = switch_off(net, data, run.session.preprocess, {MARKED: [entry.prototype]})
        correct = round(result.original_accuracy * result.images)
        lost = sum(1 for ch in result.changed if ch["true"] == MARKED and ch["original"] == MARKED)
        assert entry.signals["reliance"]["value"] == pytest.approx(lost / correct, abs=1e-12)


def test_nothing_stands_out_is_said_plainly():
    quiet = Audit(entries=[AuditEntry(0, "a", 0, 1.25, [], {})], images=4, images_per_class=2, baselines={},
                  baseline_scores=[0.5, 2.0])
    assert not quiet.stands_out
    assert quiet.summary == NOTHING_STANDS_OUT + " Highest score here 1.25; highest baseline score 2.00."
    assert quiet.summary.startswith("Nothing stands out: no prototype scores above every random-direction baseline")
    assert NO_SINGLE_REASON in quiet.text()


def test_audit_without_images_says_what_to_pass(run):
    detached = phpn.DecomposedRun.attach(run, run.session)
    detached.meta = {**run.meta, "data": {"root": "/nowhere/at/all"}}
    with pytest.raises(ConfigError, match="Pass the images"):
        detached.audit()


def test_cli_audit_json(run, tmp_path, capsys):
    from phpn.cli import main

    path = run.save(tmp_path / "run")
    code = main(["audit", str(path), "--checkpoint", str(SHORTCUT / "shortcut.safetensors"), "--model-def", MODEL_DEF,
                 "--data", str(SHORTCUT / "train"), "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    rows = out["prototypes"]
    assert [r["score"] for r in rows] == sorted((r["score"] for r in rows), reverse=True)
    assert (rows[0]["class"], rows[0]["prototype"]) == (MARKED, mark_prototype(run))
    assert rows[0]["reasons"][0].startswith("causal: ")
    assert np.isclose(rows[0]["score"], run.audit(SHORTCUT / "train").entries[0].score)
    # kept beside the run, and given back when the run is reopened
    assert out["saved_to"] == str(path / "audit.json") and out["save_note"] == ""
    kept = phpn.open_run(path, run.session).last_audit
    assert kept.to_dict() == {key: value for key, value in out.items() if key not in ("saved_to", "save_note")}
