"""train.py end to end on a tiny generated CUB-layout dataset: outputs, checkpoints, kill-and-resume,
few-shot, trainable subsets, flags and user errors."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from DataLoader import make_demo_dataset
from Model import build_model_from_checkpoint
from utils.checkpoint import read_checkpoint
from utils.errors import ConfigError, run_cli
from utils.trainer import main

from conftest import REPO_ROOT

# Tiny runs: 3 classes x 8 train / 4 test images of 64 px, nano model at 64 px, batch 8.
TINY = ["--config", str(REPO_ROOT / "config" / "demo.yaml"), "--img-size", "64", "--resize-size", "72",
        "--batch-size", "8", "--eval-batch-size", "12", "--eval-every", "1", "--workers", "0", "--log-every", "1",
        "--warmup-epochs", "0", "--save-images", "0"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return str(make_demo_dataset(tmp_path_factory.mktemp("data") / "cub", num_classes=3, train_per_class=8,
                                 test_per_class=4, image_size=64))


def args(data_root, out, *extra):
    return [*TINY, "--data-root", data_root, "--output-dir", str(out), *extra]


def train_py(*argv, timeout=240, env=None):
    return subprocess.run([sys.executable, "train.py", *argv], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


def epochs_logged(out):
    return [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_train_py_end_to_end(data_root, tmp_path):
    out = tmp_path / "run"
    proc = train_py(*args(data_root, out, "--epochs", "2", "--save-images", "2", "--lr", "2e-3",
                                       "--lr-schedule", "constant"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert epochs_logged(out) == [1, 2]
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"train_loss", "train_ce", "train_area", "train_norm", "train_acc1", "train_lr", "test_top1_loc",
            "test_gt_known_loc", "test_best_threshold"} <= set(record)
    assert record["train_lr"] == 2e-3
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["epochs"], saved["lr"], saved["batch_size"], saved["data_root"]) == (2, 2e-3, 8, data_root)
    log = (out / "log.txt").read_text()
    assert "model selection and threshold on the test split" in log and "test results of" in log
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert len(list((out / "images").rglob("*.png"))) == 2

    last = read_checkpoint(out / "checkpoints" / "last.pth")  # weights_only=True
    assert last["epoch"] == 2 and last["arch"] == "deit_sat_nano_patch16_224" and last["img_size"] == 64
    assert {"optimizer", "scheduler", "scaler", "rng_states", "config", "best", "best_thr", "class_names"} <= set(last)
    assert last["best_thr"] in saved["eval_thresholds"] and len(last["rng_states"]) == 1
    model, meta = build_model_from_checkpoint(out / "checkpoints" / "best.pth")
    results = json.loads((out / "results.json").read_text())
    assert results["epoch"] == meta["epoch"] == last["best"]["epoch"]
    assert results["best_threshold"] == meta["best_thr"] and results["num_images"] == 12
    assert {"top1_loc", "gt_known_loc", "top1_cls", "top5_cls", "iou30", "iou70"} <= set(results)


def test_kill_and_resume_gives_the_uninterrupted_run(data_root, tmp_path):
    epochs = ["--epochs", "3", "--device", "cpu"]  # bit-identical on the CPU; CUDA: tests/test_device.py
    reference = tmp_path / "reference"
    main(args(data_root, reference, *epochs))

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "train.py", *args(data_root, out, *epochs)], cwd=REPO_ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = out / "checkpoints" / "last.pth"
    deadline = time.time() + 180
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = read_checkpoint(last)["epoch"]
    assert done < 3, "the run ended before it could be killed"
    resumed = train_py(*args(data_root, out, *epochs, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {last}: {done} of 3 epochs done" in (out / "log.txt").read_text()
    assert epochs_logged(out) == [1, 2, 3]
    a, b = (read_checkpoint(path / "checkpoints" / "last.pth") for path in (reference, out))
    assert a["epoch"] == b["epoch"] == 3
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert json.loads((reference / "results.json").read_text()) == \
        {**json.loads((out / "results.json").read_text()), "checkpoint": str(reference / "checkpoints" / "best.pth")}


def test_resume_drops_metrics_of_unsaved_epochs_and_extends_a_run(data_root, tmp_path):
    out = tmp_path / "run"
    main(args(data_root, out, "--epochs", "1"))
    with open(out / "metrics.jsonl", "a") as f:  # as if killed after logging epoch 2, before its last.pth
        f.write(json.dumps({"epoch": 2, "train_loss": 0.0}) + "\n{\"epoch\": 3, \"trunc")
    main(args(data_root, out, "--epochs", "2", "--resume"))
    assert epochs_logged(out) == [1, 2]
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[1])["train_loss"] > 0
    log = (out / "log.txt").read_text()
    assert "resume: epochs was 1 in the checkpoint, now 2" in log
    # --resume on a finished run: nothing to train, the final test runs again
    main(args(data_root, out, "--epochs", "2", "--resume"))
    assert epochs_logged(out) == [1, 2]


def test_resume_without_checkpoint_starts_from_scratch(data_root, tmp_path):
    out = tmp_path / "run"
    main(args(data_root, out, "--epochs", "1", "--resume"))
    log = (out / "log.txt").read_text()
    assert f"--resume: no {out / 'checkpoints' / 'last.pth'} yet, starting from scratch" in log
    assert epochs_logged(out) == [1]


def test_few_shot_and_trainable_subset(data_root, tmp_path):
    out = tmp_path / "run"
    main(args(data_root, out, "--epochs", "1", "--images-per-class", "4", "--batch-size", "4", "--trainable", "sat"))
    record = json.loads((out / "metrics.jsonl").read_text())
    assert record["train_images"] == 12 and record["train_steps"] == 3  # 3 classes x 4 images, batch 4
    last = read_checkpoint(out / "checkpoints" / "last.pth")
    model, _ = build_model_from_checkpoint(out / "checkpoints" / "last.pth")
    optimized = sum(len(group["params"]) for group in last["optimizer"]["param_groups"])
    assert optimized == len(model.spatial_parameters())
    assert "trainable (sat)" in (out / "log.txt").read_text()


def test_accumulation_and_no_amp_flags(data_root, tmp_path):
    out = tmp_path / "run"
    main(args(data_root, out, "--epochs", "1", "--accum-steps", "2", "--no-amp", "--lr-schedule", "cosine"))
    record = json.loads((out / "metrics.jsonl").read_text())
    assert record["train_steps"] == 3 and record["train_images"] == 24  # 6 micro-batches of 4
    log = (out / "log.txt").read_text()
    assert "global batch 8 = 4 per process x 2 accumulation steps, fp32" in log


@pytest.mark.parametrize("extra, message", [
    (["--batch-size", "6", "--accum-steps", "4"], "batch_size 6 (global, per optimizer step) must be a multiple"),
    (["--val-split"], "no 'val' split"),
    (["--resume", "missing.pth"], "missing.pth: file not found"),
    (["--batch-size", "64"], "fewer than one batch"),
])
def test_user_errors_are_one_line(data_root, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, args(data_root, tmp_path / "run", "--epochs", "1", *extra))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and message in err, err


def test_train_py_error_exit_without_traceback(data_root, tmp_path):
    proc = train_py(*args(data_root, tmp_path / "run", "--images-per-class", "0"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: images_per_class must be at least 1"), proc.stderr


def test_imagenet_script_needs_a_data_root(tmp_path):
    with pytest.raises(ConfigError, match="train_ImageNet.py needs --data-root"):
        main([*TINY, "--output-dir", str(tmp_path)], imagenet=True)


def test_unreadable_train_image_skipped_or_fatal_with_strict_data(tmp_path):
    root = make_demo_dataset(tmp_path / "cub", num_classes=3, train_per_class=8, test_per_class=4, image_size=64)
    split = dict(line.split() for line in (root / "train_test_split.txt").read_text().splitlines())
    paths = dict(line.split() for line in (root / "images.txt").read_text().splitlines())
    broken = root / "images" / paths[next(i for i, is_train in split.items() if is_train == "1")]
    broken.write_bytes(broken.read_bytes()[:100])  # truncated file
    # PYTHONWARNINGS=ignore (common on clusters) must not hide which file was skipped
    proc = train_py(*args(str(root), tmp_path / "skip", "--epochs", "1", "--workers", "1"),
                    env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (tmp_path / "skip" / "log.txt").read_text()
    assert "1 unreadable training images skipped" in log
    assert f"skipping unreadable image {broken}" in log
    strict = train_py(*args(str(root), tmp_path / "strict", "--epochs", "1", "--strict-data", "--workers", "2"))
    assert strict.returncode == 2 and "Traceback" not in strict.stderr
    error_lines = [line for line in strict.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and broken.name in error_lines[0]
