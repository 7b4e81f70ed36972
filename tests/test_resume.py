"""An interrupted discovery resumes from its saved groups and gives the same run."""

import pytest
import torch
from conftest import tiny_split

from phpn.errors import Cancelled, ConfigError, RunError
from phpn.images.folders import scan_image_folder
from phpn.pipeline.discover import DiscoveryConfig, discover
from phpn.runs.resume import MANIFEST, discard_progress

# 0 MB: one class per group, so the tiny folder's 4 classes make 4 groups.
CONFIG = DiscoveryConfig(k=2, device="cpu", memory_budget_mb=0, lbfgs_iter=20)


def _run(tiny_loaded, data, config=CONFIG, **kw):
    return discover(tiny_loaded, tiny_split(tiny_loaded.model), data, tiny_loaded.preprocess, config,
                    certify=True, workers=0, **kw)


def _stop_in_second_group():
    """A progress callback that stops the NMF of the second group (the first is saved by then)."""
    refined = []

    def progress(stage, done, total):
        if stage == "refine" and done >= 1:
            refined.append(done)
        if stage == "nmf" and refined:
            raise Cancelled()

    return progress


def _same_run(a, b):
    for name in ("prototypes", "nmf_prototypes", "alpha", "class_indices", "head_rows", "head_bias"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.meta["classes"] == b.meta["classes"]
    ca, cb = dict(a.meta["certificate"]), dict(b.meta["certificate"])
    ca.pop("seconds"), cb.pop("seconds")
    assert ca == cb and ca["passed"] and ca["images"] == 48


def test_interrupted_discovery_resumes_to_the_same_run(tiny_loaded, image_folder, tmp_path):
    data = scan_image_folder(image_folder, num_classes=4)
    whole = _run(tiny_loaded, data)
    assert whole.meta["groups"] == 4

    progress_dir = tmp_path / ".run.progress"
    with pytest.raises(Cancelled):
        _run(tiny_loaded, data, progress=_stop_in_second_group(), progress_dir=progress_dir)
    assert sorted(p.name for p in progress_dir.iterdir()) == ["group-00000.json", "group-00000.safetensors",
                                                               MANIFEST]

    seen = []
    resumed = _run(tiny_loaded, data, progress=lambda s, d, t: seen.append((s, d, t)),
                   progress_dir=progress_dir, resume=True)
    assert ("features", 36, 36) in seen and not any(s == "features" and t != 36 for s, _, t in seen)
    _same_run(whole, resumed)
    assert len(list(progress_dir.glob("group-*.json"))) == 4
    discard_progress(progress_dir)
    assert not progress_dir.exists()


def test_resume_refuses_progress_from_other_settings(tiny_loaded, image_folder, tmp_path):
    data = scan_image_folder(image_folder, num_classes=4)
    progress_dir = tmp_path / ".run.progress"
    with pytest.raises(Cancelled):
        _run(tiny_loaded, data, progress=_stop_in_second_group(), progress_dir=progress_dir)
    other = DiscoveryConfig(k=3, device="cpu", memory_budget_mb=0, lbfgs_iter=20)
    with pytest.raises(ConfigError, match="was made with another model, images or settings"):
        _run(tiny_loaded, data, other, progress_dir=progress_dir, resume=True)
    # Without --resume the old progress is replaced and every group is done again.
    seen = []
    _run(tiny_loaded, data, other, progress=lambda s, d, t: seen.append((s, d, t)), progress_dir=progress_dir)
    assert ("features", 48, 48) in seen


def test_a_folder_phpn_did_not_write_is_never_used_for_progress(tiny_loaded, image_folder, tmp_path):
    data = scan_image_folder(image_folder, num_classes=4)
    foreign = tmp_path / ".run.progress"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(RunError, match=r"is a folder that is not a phpn discovery progress folder \(it holds notes.txt\)"):
        _run(tiny_loaded, data, progress_dir=foreign)
    discard_progress(foreign)
    assert (foreign / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_cli_interrupted_then_resumed_writes_the_uninterrupted_run(tmp_path, monkeypatch, capsys):
    import phpn.progress
    from phpn.cli import main
    from phpn.runs.store import load_run

    args = ["discover", "--demo", "fashion-mnist", "--images-per-class", "3", "--memory-budget", "0", "--k", "2",
            "--device", "cpu", "--workers", "0", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0

    class CtrlCInSecondGroup(phpn.progress.TqdmProgress):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.stop = _stop_in_second_group()

        def __call__(self, stage, done, total):
            try:
                self.stop(stage, done, total)
            except Cancelled:
                raise KeyboardInterrupt from None

    with monkeypatch.context() as m:
        m.setattr(phpn.progress, "TqdmProgress", CtrlCInSecondGroup)
        assert main([*args, "--out", str(tmp_path / "run")]) == 130
    assert "run the same command with --resume" in capsys.readouterr().err
    assert len(list((tmp_path / ".run.progress").glob("group-*.json"))) == 1 and not (tmp_path / "run").exists()
    assert main([*args, "--out", str(tmp_path / "run"), "--resume"]) == 0
    whole, resumed = load_run(tmp_path / "whole"), load_run(tmp_path / "run")
    for name in ("prototypes", "nmf_prototypes", "alpha", "class_indices"):
        assert torch.equal(getattr(whole, name), getattr(resumed, name)), name
    assert resumed.meta["certificate"]["images"] == 30 and resumed.meta["certificate"]["passed"]
    assert not (tmp_path / ".run.progress").exists()
