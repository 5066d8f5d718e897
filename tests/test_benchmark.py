"""tools/benchmark.py in a small configuration: it runs the engine paths and reports sane numbers."""
import json
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

SMALL = ["--arch", "deit_sat_nano_patch16_224", "--img-size", "64", "--batch-size", "2", "--steps", "1",
         "--warmup", "1", "--num-classes", "3", "--device", "cpu"]


def run(*argv):
    out = subprocess.run([sys.executable, "tools/benchmark.py", *SMALL, *argv], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_train_benchmark_with_naive_baseline():
    result = run("--mode", "train", "--compare-naive")
    assert (result["mode"], result["attention"], result["steps"], result["batch_size"]) == ("train", "fused", 1, 2)
    assert result["images_per_second"] > 0 and result["peak_memory_mb"] > 0
    assert result["baseline"]["attention"] == "naive" and result["baseline"]["precision"] == "fp32"
    assert result["speedup"] == pytest.approx(result["images_per_second"] / result["baseline"]["images_per_second"],
                                              rel=1e-2)


def test_eval_benchmark_reports_box_cost():
    result = run("--mode", "eval", "--protocol", "both", "--no-amp", "--attention", "naive")
    assert (result["mode"], result["protocol"], result["precision"], result["attention"]) == (
        "eval", "both", "fp32", "naive")
    assert result["images_per_second"] > 0 and result["box_ms_per_image"] > 0
    assert result["thresholds"] == [0.3, 0.35, 0.4, 0.45]
