"""--held-out DIR without a holdout fraction: the folder that is certified also gives each
class's held-out fidelity and specificity, from the same pass."""

import pytest
import torch

from phpn.api import open_model
from phpn.cli import main
from phpn.demos import get_demo
from phpn.images.batches import load_batch
from phpn.method.part_metrics import fidelity_and_specificity
from phpn.method.refine import part_signs
from phpn.pipeline.discover import HELDOUT_FOLDER
from phpn.pipeline.features import backbone_features, prepare_backbone
from phpn.runs.store import load_run


@pytest.mark.slow
def test_the_certified_folder_gives_the_held_out_fidelity(tmp_path, capsys):
    demo = get_demo("fashion-mnist")
    out = tmp_path / "run"
    assert main(["discover", "--demo", "fashion-mnist", "--classes", "0,1", "--images-per-class", "10", "--device",
                 "cpu", "--workers", "0", "--quiet", "--held-out", str(demo.explain_dir()), "--out", str(out)]) == 0
    assert "held-out fidelity: median 0." in capsys.readouterr().out
    run = load_run(out)
    assert run.meta["data"]["heldout_from"] == HELDOUT_FOLDER and run.meta["certificate_held_out"]["passed"]
    session = open_model(demo="fashion-mnist")
    backbone = prepare_backbone(session.split, torch.device("cpu"))
    for row, c in enumerate(run.class_indices.tolist()):
        record = run.class_meta(c)
        assert record["heldout_images"] == len(record["heldout_paths"]) == 50
        x, kept, _ = load_batch(demo.explain_dir(), record["heldout_paths"], session.preprocess)
        feats = backbone_features(backbone, x, torch.device("cpu"), False).float()
        signs = part_signs(torch.tensor(record["part_share"], dtype=torch.float64)).tolist()
        fid, spec = fidelity_and_specificity(feats, run.prototypes[row].float(), run.nmf_prototypes[row], signs)
        assert record["fidelity_heldout"] == pytest.approx(fid, abs=1e-5)
        assert record["specificity_heldout"] == pytest.approx(spec, abs=1e-5)
