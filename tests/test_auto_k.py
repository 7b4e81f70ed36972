"""--k auto: each class gets its own k at the elbow of NMF's error; the run stays exact and
every reader sees only the class's own prototypes."""


import pytest
import torch

from phpn.api import explain_image, open_model, open_run
from phpn.cli import main
from phpn.demos import get_demo
from phpn.errors import ConfigError
from phpn.method.nmf import elbow_k
from phpn.pipeline.discover import DiscoveryConfig
from phpn.runs.store import verify_run

ARGS = ["discover", "--demo", "fashion-mnist", "--images-per-class", "20", "--classes", "0,1,5,7,9",
        "--device", "cpu", "--workers", "0", "--quiet", "--json", "--k", "auto", "--k-max", "5"]


@pytest.fixture(scope="module")
def auto_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("auto") / "run"
    assert main([*ARGS, "--out", str(out)]) == 0
    return out


def test_each_class_gets_its_elbow_and_the_run_stays_exact(auto_run):
    run = verify_run(auto_run)
    classes = run.class_indices.tolist()
    ks = [run.class_k(c) for c in classes]
    assert all(2 <= k <= 5 for k in ks) and run.k == max(ks)
    assert min(ks) < max(ks)  # these classes do not all bend at the same k
    assert run.meta["config"]["auto_k"] == 5 and run.k_label == f"up to {run.k}, chosen per class"
    for row, (c, k) in enumerate(zip(classes, ks)):
        record = run.class_meta(c)
        assert len(record["fidelity"]) == len(record["alpha"]) == len(record["mean_contribution"]) == k
        curve = record["k_relative_errors"]
        assert (k, record["k_reason"]) == elbow_k([int(j) for j in curve], list(curve.values()))
        assert record["nmf_relative_error"] == curve[str(k)]  # the parts are the factorisation the curve measured
        assert int(torch.count_nonzero(run.prototypes[row, k:])) == 0  # unused slots are zero
        assert bool((run.prototypes[row, :k] != 0).any(1).all())
        assert run.class_prototypes(c).shape == (k, run.prototypes.shape[2])
    assert float(run.head_error().max()) < 1e-12
    assert run.meta["certificate"]["passed"]


def test_an_explanation_shows_the_class_own_prototypes_only(auto_run):
    session = open_model(demo="fashion-mnist")
    run = open_run(auto_run, session)
    network = run.network()
    small = min(run.class_indices.tolist(), key=run.class_k)
    assert network.class_k(small) == run.class_k(small) < run.k
    image = next(iter(sorted((get_demo("fashion-mnist").discovery_dir()).glob(f"0{small}_*/*.png"))))
    e = explain_image(session, network, image, class_index=small)
    assert e.k == run.class_k(small) and e.maps.shape[0] == e.k
    assert abs(float(e.contributions.sum()) + e.bias - e.logit) < 1e-4


def test_bad_automatic_k_settings_are_refused(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["discover", "--demo", "fashion-mnist", "--k", "several", "--out", "x"])
    assert stop.value.code == 2
    assert "expected a whole number or 'auto', got 'several'" in capsys.readouterr().err
    assert main(["discover", "--demo", "fashion-mnist", "--k", "4", "--k-max", "6", "--out", "x"]) == 2
    assert "A largest k (--k-max, auto_k) applies only to an automatic k." in capsys.readouterr().err
    with pytest.raises(ConfigError) as err:
        DiscoveryConfig(auto_k=30)
    assert err.value.problem == "The largest automatic k must be between 2 and 20, got 30."


def test_one_rule_turns_k_into_settings():
    from phpn.pipeline.discover import resolve_k

    assert resolve_k("auto") == (3, 8) and resolve_k("auto", 5) == (3, 5)
    assert resolve_k(4) == (4, None) and resolve_k(None, default_k=5) == (5, None)
    with pytest.raises(ConfigError, match="applies only to an automatic k"):
        resolve_k(4, 6)
