"""The benchmark runs and reports what it claims (numbers only checked for sense, not speed)."""
import json
import subprocess
import sys


def test_benchmark_smoke():
    proc = subprocess.run([sys.executable, "-m", "phpn.bench", "--classes", "3", "--baseline-classes", "1",
                           "--device", "cpu", "--json"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["classes"] == 3 and r["shape_per_class"] == [1470, 2048] and r["k"] == 3
    assert r["speedup_vs_sklearn_nmf"] > 0 and r["phpn_total_s"] > 0
    assert r["error_ratio_phpn_over_sklearn"] <= 1.02
    assert r["max_head_error"] < 1e-12
    assert 0 < r["refine_objective_drop"] < 1
