"""The benchmark runs and reports what it claims (numbers only checked for sense, not speed)."""
import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_benchmark_smoke():
    proc = subprocess.run([sys.executable, "-m", "phpn.evaluate.speed", "--classes", "3", "--baseline-classes", "1",
                           "--device", "cpu", "--json"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["classes"] == 3 and r["shape_per_class"] == [1470, 2048] and r["k"] == 3
    assert r["speedup_vs_sklearn_nmf"] > 0 and r["phpn_total_s"] > 0
    assert r["error_ratio_phpn_over_sklearn"] <= 1.02
    assert r["max_head_error"] < 1e-12
    assert 0 < r["refine_objective_drop"] < 1


@pytest.mark.slow
def test_end_to_end_benchmark_times_every_stage_and_certifies():
    proc = subprocess.run([sys.executable, "-m", "phpn.evaluate.speed", "--end-to-end", "--classes", "2", "--images", "2",
                           "--workers", "1", "--device", "cpu", "--json"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["classes"] == 2 and r["images"] == 4 and r["workers"] == 1
    assert (r["decode"], r["decode_mode"]) == ("auto", "cpu (Pillow)")  # auto decodes on the GPU only with CUDA
    assert set(r["stages_s"]) == {"decode (waiting on the workers)", "features + logits (model)", "NMF",
                                  "refinement", "certificate", "save"}
    assert all(s >= 0 for s in r["stages_s"].values()) and r["pure_forward_images_per_s"] > 0
    assert r["certificate_passed"] and r["certificate_images"] == 4 and r["certificate_pass"] == "one pass"
    assert r["max_relative_logit_diff"] <= 1e-4
    assert r["feature_stage_over_pure_forward"] == pytest.approx(
        r["feature_stage_images_per_s"] / r["pure_forward_images_per_s"])


@pytest.mark.slow
def test_end_to_end_benchmark_refuses_gpu_decoding_without_a_gpu():
    proc = subprocess.run([sys.executable, "-m", "phpn.evaluate.speed", "--end-to-end", "--decode", "gpu", "--device", "cpu"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "--decode gpu needs the model on a CUDA device, but it runs on cpu" in proc.stderr
