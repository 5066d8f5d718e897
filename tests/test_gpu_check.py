"""tools/gpu_table.py on the outputs of a real `tools/gpu_check.sh --device cpu --quick` run (captured in
tests/fixtures/gpu_check_runs; the full quick run takes minutes on a 2-core machine), the shell scripts'
syntax, and make_benchmark_data.py --learnable."""
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "tools"))

import gpu_table  # noqa: E402
from make_benchmark_data import LEARNABLE_CLASSES, learnable_template, make_benchmark_data  # noqa: E402
from make_benchmark_data import main as make_data_main  # noqa: E402
from utils.errors import run_cli  # noqa: E402

RUNS = REPO_ROOT / "tests" / "fixtures" / "gpu_check_runs"


@pytest.fixture
def runs(tmp_path):
    shutil.copytree(RUNS, tmp_path / "runs")
    return tmp_path / "runs"


def load(name):
    return json.loads((RUNS / name).read_text())


def epoch2(name):
    lines = (RUNS / name / "metrics.jsonl").read_text().splitlines()
    return json.loads(lines[-1])


def test_check_rows_read_the_runs_and_compare_with_their_references(runs):
    rows = gpu_table.check_rows(runs)
    assert len(rows) == 13
    fp32, bf16 = load("step_fp32.json")["images_per_second"], load("step_bf16.json")["images_per_second"]
    pil, cache = epoch2("train_pil_fp32"), epoch2("train_cache_bf16")
    by_what = {row.what: row for row in rows}
    train = by_what["`train.py`, PIL decoding in the workers (default), fp32, epoch 2"]
    assert train.number == pil["train_images_per_sec"]
    assert train.ratio == f"{pil['train_images_per_sec'] / fp32:.2f} of the fp32 step"
    assert train.met == ("yes" if round(pil["train_images_per_sec"] / fp32, 2) >= 0.9 else "no")
    cached = by_what["`train.py --cache-images --amp`, epoch 2"]
    assert cached.ratio == f"{cache['train_images_per_sec'] / bf16:.2f} of the bf16 step"
    centre = load("eval_centre.json")
    row = next(r for r in rows if r.what.startswith("evaluation, centre crop, PIL"))
    assert row.number == centre["images_per_second"] and row.ratio == f"{centre['end_to_end_vs_data']:.2f} of data-only"
    tencrop = load("eval_tencrop.json")
    row = next(r for r in rows if r.what.startswith("evaluation, ten-crop"))
    assert row.ratio == f"{tencrop['images_per_second'] / tencrop['forward_images_per_second']:.2f} of forward-only"
    row = next(r for r in rows if r.what.startswith("`evaluator.py --gpu-decode`"))
    assert row.what.endswith("16 images") and row.number == 7  # "16 images in 2.2 s (7 images/s"
    assert row.target == ">= 2,500 img/s" and row.met == "no"
    assert row.ratio == f"process start to exit {float((RUNS / 'evaluator_gpu_decode' / 'wall_s').read_text()):.1f} s"
    assert rows[-1].value == "not run" and rows[-1].met == "not run"  # no test suite in --quick


@pytest.mark.parametrize("share, met", [(0.95, "yes"), (0.897, "yes"), (0.85, "no")])
def test_train_row_meets_its_target_at_ninety_percent_of_the_step(runs, share, met):
    fp32 = load("step_fp32.json")["images_per_second"]
    path = runs / "train_pil_fp32" / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    records[-1]["train_images_per_sec"] = share * fp32
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    row = gpu_table.train_row(runs, "train_pil_fp32", "train", fp32, "fp32")
    assert (row.met, row.ratio) == (met, f"{share:.2f} of the fp32 step")


def test_missing_or_failed_runs_show_as_not_run(runs):
    shutil.rmtree(runs / "train_cache_bf16")
    (runs / "eval_tencrop.json").write_text("Traceback (most recent call last):\n")  # a run that failed
    (runs / "step_fp32.json").unlink()  # no reference: the PIL train row cannot be compared
    rows = {row.what: row for row in gpu_table.check_rows(runs)}
    assert rows["`train.py --cache-images --amp`"].met == "not run"
    assert rows["evaluation, ten-crop, PIL, end to end (`benchmark --data-root`)"].value == "not run"
    assert rows["training step alone, fp32, in-memory batches"].value == "not run"
    pil = next(r for w, r in rows.items() if w.startswith("`train.py`, PIL"))
    assert (pil.ratio, pil.met) == ("no step rate", "not run")


@pytest.mark.parametrize("summary, counts, met", [
    ("= 3 failed, 300 passed, 12 skipped in 181.20s (0:03:01) =", {"failed": 3, "passed": 300, "skipped": 12}, "no"),
    ("308 passed, 2 skipped, 1 warning in 95.11s (0:01:35)", {"passed": 308, "skipped": 2}, "yes"),
    ("1 passed, 1 error in 3.02s", {"passed": 1, "errors": 1}, "no"),
])
def test_suite_row_from_pytest_summary(runs, summary, counts, met):
    (runs / "pytest.txt").write_text(f"....F...\nFAILED tests/test_x.py::test_y - assert 1 == 2\n{summary}\n")
    assert gpu_table.pytest_counts(runs / "pytest.txt") == counts
    row = gpu_table.suite_row(runs)
    assert row.met == met and row.ratio == "failed: tests/test_x.py::test_y"


def test_suite_row_of_a_stopped_verbose_run_counts_the_tests_so_far_and_names_the_failures(runs):
    (runs / "pytest.txt").write_text(
        "[gw0] [ 10%] PASSED tests/test_a.py::test_one \n[gw1] [ 20%] FAILED tests/test_b.py::test_two[cuda] \n"
        "[gw0] [ 30%] SKIPPED tests/test_c.py::test_three \n"
        "[gw2] [ 40%] PASSED tests/test_a.py::test_four[1 failed, 3 passed in 2.00s] \n")  # an id, not the summary
    assert gpu_table.pytest_counts(runs / "pytest.txt") == {"passed": 2, "failed": 1, "skipped": 1, "stopped": True}
    row = gpu_table.suite_row(runs)
    assert (row.value, row.met) == ("2 passed, 1 failed, 1 skipped", "no")
    assert row.ratio == "stopped at its time limit: counts so far; failed: tests/test_b.py::test_two[cuda]"
    (runs / "pytest.txt").write_text(  # without pytest-xdist
        "tests/test_a.py::test_one PASSED  [ 50%]\ntests/test_a.py::test_two[x] ERROR [100%]\n")
    row = gpu_table.suite_row(runs)
    assert (row.value, row.met) == ("1 passed, 1 errors", "no")
    assert row.ratio.split("; ")[1] == "failed: tests/test_a.py::test_two[x]"
    (runs / "pytest.txt").write_text("[gw0] [ 10%] PASSED tests/test_a.py::test_one \n")
    assert gpu_table.suite_row(runs).met == "not run"


def write_results(runs, name, gt_known_loc, top1_cls):
    (runs / name).mkdir(parents=True)
    (runs / name / "results.json").write_text(json.dumps({"gt_known_loc": gt_known_loc, "top1_cls": top1_cls}))


def test_accuracy_rows_pass_when_the_fast_mean_lies_within_the_official_seeds(tmp_path):
    for seed, (loc, cls) in enumerate([(60.0, 80.0), (64.0, 82.0), (62.0, 81.0)], 1):
        write_results(tmp_path, f"acc_official_s{seed}", loc, cls)
    for seed, (loc, cls) in enumerate([(61.0, 84.0), (65.0, 85.0), (63.0, 83.0)], 1):
        write_results(tmp_path, f"acc_fast_s{seed}", loc, cls)
    loc, cls = gpu_table.accuracy_rows(tmp_path)
    assert (loc.number, loc.met) == (63.0, "yes") and loc.ratio.startswith("official 60.00-64.00")
    assert loc.ratio.endswith("same seed, fast - official: mean +1.00 (+1.00, +1.00, +1.00)")
    assert (cls.number, cls.met) == (84.0, "no")  # above the official seeds' range: not within it
    assert cls.ratio.endswith("mean +3.00 (+4.00, +3.00, +2.00)")
    shutil.rmtree(tmp_path / "acc_fast_s3")
    assert gpu_table.accuracy_rows(tmp_path)[1].ratio.endswith("mean +3.50 (+4.00, +3.00)")  # the seeds both ran
    shutil.rmtree(tmp_path / "acc_official_s2")
    shutil.rmtree(tmp_path / "acc_official_s3")
    assert all(row.met == "not run" for row in gpu_table.accuracy_rows(tmp_path))  # one seed is no spread


def test_record_rows_time_the_recipe_and_the_sustained_rate(tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(RUNS / "train_pil_fp32", runs / "cub_fast")
    (runs / "cub_fast" / "results.json").write_text("{}")
    (runs / "cub_fast" / "wall_s").write_text("95.5\n")
    shutil.copytree(RUNS / "train_cache_bf16", runs / "imagenet_pil_bf16")
    records = gpu_table.epoch_records(runs / "cub_fast")  # epochs of 13.1 s and 4.2 s; epoch 2 evaluated in 6 s
    records[1]["test_time"] = 6.0
    (runs / "cub_fast" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (runs / "cub_fast" / "stdout.txt").write_text("... INFO evaluated 5794 images in 20.2 s (287 images/s, loading")
    rows = gpu_table.record_rows(runs)
    assert (rows[0].value, rows[0].target, rows[0].met) == ("96 s to results.json", "< 120 s", "yes")
    assert rows[0].ratio.endswith("; training 17 s, 1 evaluation 6 s, final test 20 s, the rest 52 s")
    assert not any("--compile" in row.what for row in rows)  # no cub_fast_compile run (gpu_record.sh --compile-time)
    shutil.copytree(runs / "cub_fast", runs / "cub_fast_compile")
    assert gpu_table.record_rows(runs)[1].what == "the same with `--compile`"
    rate = epoch2("train_cache_bf16")["train_images_per_sec"]
    sustained = next(r for r in rows if r.what.startswith("ImageNet-sized sustained training rate, PIL"))
    assert sustained.number == rate and sustained.met == ("yes" if rate >= 2200 else "no")
    assert sustained.what.endswith("32 files")


def test_cli_writes_the_markdown_table_and_its_json(runs, tmp_path):
    out = subprocess.run([sys.executable, "tools/gpu_table.py", "check", str(runs), "--output",
                          str(tmp_path / "t.md"), "--note", "quick."], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    table = (tmp_path / "t.md").read_text()
    assert out.stdout.strip() == table.strip()
    env = load("env.json")
    assert f"{env['date']}, {env['card']}, {env['cores']} CPU cores, torch {env['torch']}" in table
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    assert lines[:2] == ["| what | measured | ratio | target | met |", "| :-- | --: | :-- | :-- | :-- |"]
    saved = json.loads((tmp_path / "t.json").read_text())
    assert [row["what"] for row in saved["rows"]] == [line.split(" | ")[0][2:] for line in lines[2:]]
    assert len(saved["rows"]) == 13 and saved["note"] == "quick."
    assert not list(tmp_path.glob(".t.*"))  # each written whole (a temporary file renamed): none left


def test_quick_rows_meet_no_target_and_a_table_of_failed_runs_fails(runs, tmp_path):
    """--quick measures the plumbing: no 'met: yes' (a 6 s nano run met the 2-minute goal); at a script's end, a
    table whose every run failed is an error (the scripts exited 0 with a table of 'not run')."""
    table = [sys.executable, "tools/gpu_table.py", "check", str(runs)]
    out = subprocess.run([*table, "--quick", "--final"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "| yes |" not in out.stdout and "| n/a (--quick) |" in out.stdout
    for name in runs.iterdir():
        if name.name not in ("env.json", "pytest.txt"):
            shutil.rmtree(name) if name.is_dir() else name.unlink()
    out = subprocess.run([*table, "--final"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and out.stderr.strip() == (f"error: no row was measured: every run failed (their "
                                                          f"output: {runs}/*/stdout.txt, {runs}/*.err)")


def test_each_run_leaves_the_table_so_far_and_the_runs_small_files(runs, tmp_path):
    """gpu_lib.sh's ``run`` ends with ``snapshot``: a script stopped at a time limit keeps what it measured."""
    (runs / "train_pil_fp32" / "checkpoints").mkdir(exist_ok=True)
    (runs / "train_pil_fp32" / "checkpoints" / "last.pth").write_bytes(bytes(4 * 2**20))  # 4 MB: left out
    out = tmp_path / "out"
    script = (f"source tools/gpu_lib.sh; RUNS={runs} OUTDIR={out} KIND=check NOTE=cut. TIMEOUT=30 T0=$(date +%s); "
              "mkdir -p $OUTDIR; run late_run echo measured")
    proc = subprocess.run(["bash", "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    table = (out / "gpu_check.md").read_text()
    assert "cut." in table and "| `train.py`, PIL decoding in the workers (default), fp32, epoch 2 | 7.6 img/s" in table
    assert json.loads((out / "gpu_check.json").read_text())["note"] == "cut."
    with tarfile.open(out / "gpu_check_runs.tgz") as tar:
        names = set(tar.getnames())
        assert tar.extractfile("./late_run/stdout.txt").read() == b"measured\n"
    assert {"./step_fp32.json", "./env.json", "./train_pil_fp32/metrics.jsonl"} <= names
    assert "./train_pil_fp32/checkpoints/last.pth" not in names


IGNORES_SIGTERM = "import signal, time; signal.signal(signal.SIGTERM, lambda *_: None); time.sleep(60)"


def test_a_run_that_outlives_its_timeout_is_killed_and_named_in_the_exit_status(runs, tmp_path):
    """A run that survives its timeout's SIGTERM (train.py and the evaluators handle it themselves; a process
    waiting for a hung thread never acts on it) is killed KILL_AFTER seconds later instead of running into the
    device machine's per-command limit with the rest of the script; failed runs are named and exit 3."""
    script = (f"source tools/gpu_lib.sh; RUNS={runs} OUTDIR={tmp_path / 'out'} KIND=check TIMEOUT=1 T0=$(date +%s); "
              "snapshot() { :; }; mkdir -p $OUTDIR; run fine true; run crashed false; "
              f"run stuck {sys.executable} -c '{IGNORES_SIGTERM}'; finish $OUTDIR/gpu_check.md")
    started = time.monotonic()
    proc = subprocess.run(["bash", "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=50,
                          env={**os.environ, "KILL_AFTER": "1"})
    assert time.monotonic() - started < 30
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout.splitlines()[-1] == "failed runs: crashed (exit 1) stuck (timed out)"
    assert (runs / "fine" / "wall_s").exists() and not (runs / "stuck" / "wall_s").exists()


def test_requirements_of_this_environment_are_met_and_unmet_ones_are_named(tmp_path):
    import numpy
    assert gpu_table.unmet_requirements() == []  # the suite runs where requirements.txt was installed
    reqs = tmp_path / "requirements.txt"
    reqs.write_text("# a comment\nnumpy>=1.0  # met\nnumpy>=99,<100\nno-such-package-sat>=1\nPyYAML\n")
    assert gpu_table.unmet_requirements(reqs) == [f"numpy {numpy.__version__} (needs <100,>=99)",
                                                  "no-such-package-sat missing (needs >=1)"]



def test_requirements_are_read_without_the_packaging_module(tmp_path, monkeypatch):
    """``packaging`` is neither a requirement nor a dependency of torch: a venv of torch alone (a GPU machine's)
    lacks it, and the check stopped with a traceback instead of naming the missing packages. pip's copy reads
    them."""
    monkeypatch.setitem(sys.modules, "packaging", None)
    monkeypatch.setitem(sys.modules, "packaging.requirements", None)
    reqs = tmp_path / "requirements.txt"
    reqs.write_text("numpy>=99,<100\nno-such-package-sat>=1\n")
    assert gpu_table.unmet_requirements(reqs)[1] == "no-such-package-sat missing (needs >=1)"

@pytest.mark.parametrize("script", ["gpu_check.sh", "gpu_record.sh"])
def test_scripts_stop_at_once_when_requirements_are_not_met(tmp_path, script):
    """A GPU machine brings its own packages: with one too old, every run would fail after minutes of device
    time; the scripts stop at the machine's description and say what to carry."""
    (tmp_path / "tools").mkdir()
    for name in (script, "gpu_lib.sh", "gpu_table.py"):
        shutil.copy(REPO_ROOT / "tools" / name, tmp_path / "tools" / name)
    (tmp_path / "requirements.txt").write_text("numpy>=99\n")
    out = subprocess.run(["bash", str(tmp_path / "tools" / script), "--device", "cpu", "--quick", "--work",
                          str(tmp_path / "work")], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OUT": str(tmp_path / "out")})
    assert out.returncode == 2
    assert "error: requirements are not met: numpy " in out.stdout and "(needs >=99)" in out.stdout
    assert "--wheels DIR" in out.stdout and "step_fp32" not in out.stdout and "## data" not in out.stdout
    # wheels for this Python (numpy's or scipy's downloaded by another Python would not install)
    python = subprocess.run(["python3", "-c", "import sys; print(*sys.version_info[:2], sep='.')"],
                            capture_output=True, text=True).stdout.strip()
    assert f"(pip download --no-deps --only-binary :all: --python-version {python} NAME==VERSION -d DIR)" in out.stdout
    assert (tmp_path / "out" / f"{script[:-3]}.log").read_text() == out.stdout


def test_the_check_with_its_suite_needs_pytest_at_once(tmp_path):
    """A machine without pytest showed it only at the end (the suite 'not run', exit 3, after the data and runs)."""
    (tmp_path / "tools").mkdir()
    shutil.copy(REPO_ROOT / "tools" / "gpu_table.py", tmp_path / "tools" / "gpu_table.py")
    (tmp_path / "requirements.txt").write_text("numpy\n")
    (tmp_path / "requirements-dev.txt").write_text("pytest>=999\nonnx>=999\n")  # (onnx: its tests skip without)
    env = [sys.executable, str(tmp_path / "tools" / "gpu_table.py"), "env", "--device", "cpu"]
    assert subprocess.run(env, capture_output=True, text=True, timeout=120).returncode == 0
    out = subprocess.run([*env, "--tests"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and out.stderr.startswith("error: requirements are not met: pytest ")
    assert "(needs >=999) for the test suite (requirements-dev.txt; or --no-tests)." in out.stderr
    assert "onnx" not in out.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a CUDA GPU")
@pytest.mark.parametrize("script", ["gpu_check.sh", "gpu_record.sh"])
def test_scripts_stop_at_once_without_a_cuda_gpu(tmp_path, script):
    """--device cuda (the default) where torch sees no GPU: every run would fail (they ran 5 minutes, wrote
    1.2 GB of data and exited 0). No folder is left behind by a check that ran nothing, but a --work folder made
    before stays: gpu_lib.sh's rule, shared by both scripts, so gpu_check.sh runs into a folder made before and
    gpu_record.sh into a new one."""
    work = tmp_path / "work"
    if script == "gpu_check.sh":
        work.mkdir()
    out = subprocess.run(["bash", str(REPO_ROOT / "tools" / script), "--work", str(work)],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "OUT": str(tmp_path)})
    assert out.returncode == 2 and "error: --device cuda, but torch " in out.stdout
    assert "sees no CUDA GPU: run this on a GPU machine, or with --device cpu --quick" in out.stdout
    assert not (work / "data").exists() and not (work / "runs").exists() and "## data" not in out.stdout
    assert work.is_dir() == (script == "gpu_check.sh")


@pytest.mark.parametrize("script", ["gpu_check.sh", "gpu_record.sh"])
def test_scripts_parse_and_refuse_unknown_options(script):
    path = REPO_ROOT / "tools" / script
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    out = subprocess.run(["bash", str(path), "--nope"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "unknown option --nope" in out.stderr
    for flags, message in ((["--timeout"], "error: --timeout needs a value (see --help)"),
                           (["--work", "--quick"], "error: --work needs a value (see --help)"),
                           (["--device", "gpu"], "error: --device gpu: expected cuda or cpu")):
        out = subprocess.run(["bash", str(path), *flags], capture_output=True, text=True, timeout=30)
        assert out.returncode == 2 and out.stderr.strip() == message, (flags, out.stderr)
    if script == "gpu_record.sh":
        out = subprocess.run(["bash", str(path), "--parts", "cub,cbu"], capture_output=True, text=True, timeout=30)
        assert out.returncode == 2
        assert out.stderr.strip() == "error: --parts: unknown part cbu (cub, imagenet, accuracy)"
    out = subprocess.run(["bash", str(path), "--help"], capture_output=True, text=True, timeout=30)
    header = path.read_text().split("\nset -u\n")[0].splitlines()[1:]  # the comment under the shebang, whole
    assert out.returncode == 0 and out.stdout.splitlines() == header and "# Options: --device" in out.stdout


def test_learnable_data_draws_each_class_object_with_its_exact_box(tmp_path):
    templates = {learnable_template(label)[1:] for label in range(LEARNABLE_CLASSES)}
    assert len(templates) == LEARNABLE_CLASSES  # every class its own object
    root = make_benchmark_data(tmp_path / "d", train=2, test=2, num_classes=2, min_size=64, max_size=80,
                               processes=1, learnable=True)
    boxes = [line.split()[1:] for line in (root / "bounding_boxes.txt").read_text().splitlines()]
    images = [line.split()[1] for line in (root / "images.txt").read_text().splitlines()]
    for relpath, (x, y, w, h) in zip(images, boxes):
        pixels = np.asarray(Image.open(root / "images" / relpath), np.int16)
        # the object is saturated, the background muted: the saturated pixels span the box
        saturated = (pixels.max(-1) - pixels.min(-1)) > 90
        ys, xs = np.nonzero(saturated)
        assert abs(xs.min() - float(x)) <= 2 and abs(xs.max() + 1 - float(x) - float(w)) <= 2
        assert abs(ys.min() - float(y)) <= 2 and abs(ys.max() + 1 - float(y) - float(h)) <= 2
    assert "class_001" in images[0] and "class_002" in images[1]


def test_learnable_data_refuses_more_classes_than_it_can_draw(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        run_cli(make_data_main, ["--output-dir", str(tmp_path / "d"), "--learnable", "--num-classes",
                                 str(LEARNABLE_CLASSES + 1)])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "error: --learnable draws at most 216 distinct classes, got --num-classes 217\n"
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("flags, message", [
    (["--num-classes", "0"], "--num-classes: expected an integer >= 1, got '0'"),
    (["--min-size", "100", "--max-size", "50"], "--max-size 50 is below --min-size 100"),
    (["--processes", "-1"], "--processes: expected an integer >= 1, got '-1'"),
    (["--train", "-2"], "--train: expected an integer >= 1, got '-2'"),
])
def test_benchmark_data_values_are_checked(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit):
        run_cli(make_data_main, ["--output-dir", str(tmp_path / "d"), *flags])
    assert capsys.readouterr().err == f"error: {message}\n" and not (tmp_path / "d").exists()


def test_benchmark_data_goes_into_a_new_folder(tmp_path, capsys):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "old.jpg").write_bytes(b"")
    with pytest.raises(SystemExit):
        run_cli(make_data_main, ["--output-dir", str(tmp_path / "d"), "--train", "1", "--test", "1"])
    assert capsys.readouterr().err == f"error: --output-dir {tmp_path / 'd'}: not empty; expected a new or empty " \
        "folder (images of another set would stay in it)\n"


def test_table_of_a_missing_runs_folder_is_one_line(tmp_path, capsys):
    for path, what in ((tmp_path / "nope", "not found"), (RUNS / "env.json", "not a folder")):
        with pytest.raises(SystemExit) as exit_info:
            gpu_table.main(["check", str(path)])
        assert exit_info.value.code == 2
        assert capsys.readouterr() == ("", f"error: {path}: {what} (expected the folder the runs of "
                                           "tools/gpu_check.sh wrote into)\n")
    for kind in ("check", "record"):  # none given: the same one line (argparse's usage and 'gpu_table.py: error:')
        with pytest.raises(SystemExit) as exit_info:
            gpu_table.main([kind])
        assert exit_info.value.code == 2
        assert capsys.readouterr() == ("", f"error: {kind} needs the runs folder (the folder the runs of "
                                           f"tools/gpu_{kind}.sh wrote into)\n")


def test_help_gives_the_whole_description(capsys):
    """--help gives the docstring whole (its first line alone stopped at 'against their')."""
    with pytest.raises(SystemExit):
        gpu_table.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "against their targets) and tools/gpu_record.sh (the one-GPU record" in text
    assert "python tools/gpu_table.py check RUNS" in text


def test_cli_output_cut_short_keeps_the_previous_table_and_leaves_no_temporary_file(runs, tmp_path, monkeypatch):
    from pathlib import Path
    (tmp_path / "t.md").write_text("previous table\n")
    (tmp_path / "t.json").write_text("{}\n")
    write_text = Path.write_text

    def full_disk(self, text, *args, **kwargs):  # half the text written, then the disk is full
        write_text(self, text[:len(text) // 2], *args, **kwargs)
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(OSError):
        gpu_table.main(["check", str(runs), "--output", str(tmp_path / "t.md")])
    monkeypatch.undo()
    assert (tmp_path / "t.md").read_text() == "previous table\n" and (tmp_path / "t.json").read_text() == "{}\n"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".t")) == []


def test_photo_data_has_images_of_the_sizes_asked_with_boxes_inside_and_is_seeded(tmp_path):
    """The default data (gpu_check.sh's measurements; --learnable aside): photo-sized JPEGs of a random size in
    [--min-size, --max-size], one box each, inside its image; the same seed draws the same set."""
    made = [make_benchmark_data(tmp_path / name, train=3, test=3, num_classes=2, min_size=40, max_size=56, seed=seed,
                                processes=1) for name, seed in (("a", 0), ("b", 0), ("c", 1))]
    images = [line.split()[1] for line in (made[0] / "images.txt").read_text().splitlines()]
    boxes = [[float(v) for v in line.split()[1:]] for line in (made[0] / "bounding_boxes.txt").read_text().splitlines()]
    assert len(images) == len(boxes) == 6
    for relpath, (x, y, w, h) in zip(images, boxes):
        with Image.open(made[0] / "images" / relpath) as image:
            width, height = image.size
        assert 40 <= width <= 56 and 40 <= height <= 56
        assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= width and y + h <= height

    def files(root):
        return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    assert files(made[0]) == files(made[1]) and files(made[0]) != files(made[2])


def test_gpu_lib_run_by_itself_says_which_scripts_to_run():
    """gpu_lib.sh is sourced by the two GPU scripts; run on its own (e.g. with --help) it did nothing, silently."""
    out = subprocess.run(["bash", "tools/gpu_lib.sh", "--help"], cwd=REPO_ROOT, capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 2 and out.stdout == ""
    assert "tools/gpu_check.sh and tools/gpu_record.sh" in out.stderr and len(out.stderr.splitlines()) == 1


@pytest.mark.skipif(shutil.which("sh") is None, reason="no sh")
def test_gpu_lib_run_with_sh_says_which_scripts_to_run():
    """`sh tools/gpu_lib.sh` (dash on Debian/Ubuntu) said only 'tools/gpu_lib.sh: 4: Bad substitution'."""
    out = subprocess.run(["sh", "tools/gpu_lib.sh"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and out.stdout == "" and "Bad substitution" not in out.stderr
    assert "tools/gpu_check.sh and tools/gpu_record.sh" in out.stderr and len(out.stderr.splitlines()) == 1
