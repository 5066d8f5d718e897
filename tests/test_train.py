"""train.py end to end on a tiny generated CUB-layout dataset: outputs, checkpoints, kill-and-resume,
few-shot, trainable subsets, flags and user errors."""
import functools
import json
import logging
import os
import signal
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from DataLoader import make_demo_dataset
from Model import build_model, build_model_from_checkpoint, checkpoint_weights
from utils.checkpoint import read_checkpoint
from utils.errors import CheckpointError, ConfigError, run_cli
from evaluator import main as eval_main
from train import build_loaders, log_short_classes, main
from utils.config import parse_config
from utils.distributed import init_distributed
import utils.logger
from utils.logger import code_version

from test_evaluation import save_nano_checkpoint
from conftest import OFFICIAL_ARCH, OFFICIAL_CKPT, OFFICIAL_MODEL_KWARGS, REPO_ROOT, wait_for_file

# Tiny runs: 3 classes x 8 train / 4 test images of 64 px, nano model at 64 px, batch 8, on the CPU (bit-identical
# runs; on a GPU machine, test_train_py_end_to_end runs at device auto and tests/test_device.py on CUDA).
TINY = ["--config", str(REPO_ROOT / "config" / "demo.yaml"), "--img-size", "64", "--resize-size", "72",
        "--batch-size", "8", "--eval-batch-size", "12", "--eval-start-epoch", "1", "--eval-every", "1", "--workers",
        "0", "--log-every", "1", "--warmup-epochs", "0", "--overlays", "0", "--no-tencrop",
        "--no-report-best-threshold", "--device", "cpu"]


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
    started = time.perf_counter()
    proc = train_py(*args(data_root, out, "--epochs", "2", "--overlays", "2", "--lr", "2e-3",
                                       "--lr-schedule", "constant", "--tencrop", "--report-best-threshold",
                                       "--device", "auto"))  # the GPU where there is one, as users run it
    proc_seconds = time.perf_counter() - started
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert epochs_logged(out) == [1, 2]
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"train_loss", "train_ce", "train_area", "train_norm", "train_acc1", "train_lr", "test_top1_loc",
            "test_gt_known_loc", "test_best_threshold", "test_time"} <= set(record)
    assert 0 < record["test_time"] < proc_seconds
    assert record["train_lr"] == 2e-3
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["epochs"], saved["lr"], saved["batch_size"], saved["data_root"]) == (2, 2e-3, 8, data_root)
    log = (out / "log.txt").read_text()
    assert "model selection on the test split" in log and "test results of" in log
    assert "evaluated 12 images in" in log  # the final test's time
    assert f"written to {out / 'results.json'}; the overlays to {out / 'overlays'}" in log  # (the README's demo)
    # where it ran, in log.txt alone: the command, the code's commit, the versions, the device
    assert f"INFO command: {Path(sys.executable).name} train.py --config " in log
    assert f" --data-root {data_root} --output-dir {out} --epochs 2 " in log
    head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True)
    code = f"git {head.stdout.strip()}" if head.returncode == 0 else "commit unknown"
    assert f"INFO environment: code {code}" in log and f"torch {torch.__version__}, " in log
    assert "environment:" not in proc.stdout + proc.stderr
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert len(list((out / "overlays").rglob("*.png"))) == 2

    last = read_checkpoint(out / "checkpoints" / "last.pth")  # weights_only=True
    assert last["epoch"] == 2 and last["arch"] == "deit_sat_nano_patch16_224" and last["img_size"] == 64
    assert {"optimizer", "scheduler", "scaler", "rng_states", "config", "best", "best_thr", "class_names"} <= set(last)
    assert last["best_thr"] in saved["eval_thresholds"] and len(last["rng_states"]) == 1
    model, meta = build_model_from_checkpoint(out / "checkpoints" / "best.pth")
    results = json.loads((out / "results.json").read_text())
    assert results["epoch"] == meta["epoch"] == last["best"]["best.pth"]["epoch"]
    assert (results["threshold"], results["tencrop"], results["precision"], results["num_images"]) == \
        (0.4, True, "fp32", 12)
    assert results["train_precision"] == "fp32"  # (TINY: --device cpu, amp false)
    section = results["at_best_threshold"]  # as the evaluators' metrics.json holds it
    assert section["chosen_on"] == "test" and results["best_threshold"] in saved["eval_thresholds"]
    # The top level is what the evaluator CLI reports for best.pth with its defaults (CUB: 0.4, ten-crop, fp32).
    eval_main(["--checkpoint", str(out / "checkpoints" / "best.pth"), "--data-root", data_root, "--output-dir",
               str(tmp_path / "eval"), "--workers", "0", "--eval-batch-size", "12"])  # the run's batch: same sums
    official = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert official["threshold"] == 0.4 and official["tencrop"] and official["precision"] == "fp32"
    assert official["training_config"] == saved  # what the checkpoint was trained with (tools/compare.py's notes)
    keys = ("top1_loc", "top5_loc", "gt_known_loc", "top1_cls", "top5_cls", "iou30", "iou50", "iou70", "num_images")
    assert {key: results[key] for key in keys} == {key: official[key] for key in keys}


def test_kill_and_resume_gives_the_uninterrupted_run(data_root, tmp_path):
    epochs = ["--epochs", "3"]  # bit-identical on the CPU; CUDA: tests/test_device.py
    reference = tmp_path / "reference"
    main(args(data_root, reference, *epochs))

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "train.py", *args(data_root, out, *epochs)], cwd=REPO_ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = out / "checkpoints" / "last.pth"
    wait_for_file(proc, last)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = read_checkpoint(last)["epoch"]
    assert done < 3, "the run ended before it could be killed"
    main(args(data_root, out, *epochs, "--resume"))  # (the resume in this process, as the reference run)
    assert f"resumed from {last}: {done} of 3 epochs done" in (out / "log.txt").read_text()
    assert epochs_logged(out) == [1, 2, 3]
    a, b = (read_checkpoint(path / "checkpoints" / "last.pth") for path in (reference, out))
    assert a["epoch"] == b["epoch"] == 3
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert json.loads((reference / "results.json").read_text()) == \
        {**json.loads((out / "results.json").read_text()), "checkpoint": str(reference / "checkpoints" / "best.pth")}


def test_resume_that_changes_workers_from_or_to_0_says_the_crops_change(data_root, tmp_path):
    """--workers 0 draws the random crops from the main process's RNG, workers from (seed, epoch, image): a resume
    across 0 no longer gives the uninterrupted run, which the change's warning says; between workers it does."""
    out = tmp_path / "run"
    main(args(data_root, out, "--epochs", "1"))  # TINY: --workers 0
    main(args(data_root, out, "--epochs", "1", "--workers", "1", "--resume"))  # no epoch left: the final test
    log = (out / "log.txt").read_text()
    assert "resume: workers was 0 in the checkpoint, now 1; the random crops and flips are drawn differently " \
           "with --workers 0 than with workers, so the resumed run will differ from the uninterrupted one (resume " \
           "with --workers 0 to continue it exactly)" in log
    main(args(data_root, out, "--epochs", "1", "--workers", "2", "--resume"))
    assert "resume: workers was 0 in the checkpoint, now 2; the random crops" in (out / "log.txt").read_text()


def test_resume_of_a_checkpoint_from_another_folder_is_no_change_of_output_dir(data_root, tmp_path, monkeypatch):
    """--resume PATH without --config from another folder goes on in the run's folder, named there by its full
    path: not a changed output_dir (it warned 'resume: output_dir was ...' and config.yaml said it was trained
    with the relative one)."""
    monkeypatch.chdir(tmp_path)
    main(args(data_root, Path("run"), "--epochs", "1"))
    (tmp_path / "other").mkdir()
    monkeypatch.chdir(tmp_path / "other")
    main(["--resume", "../run/checkpoints/last.pth", "--epochs", "2"])
    out = tmp_path / "run"
    assert epochs_logged(out) == [1, 2] and "resume: output_dir" not in (out / "log.txt").read_text()
    assert [line for line in (out / "config.yaml").read_text().splitlines() if line.startswith("# resumed")] == \
        ["# resumed after 1 epoch(s), trained with the values before: epochs 1 -> 2"]


def test_resume_drops_metrics_of_unsaved_epochs_and_extends_a_run(data_root, tmp_path, monkeypatch):
    out = tmp_path / "run"
    main(args(data_root, out, "--epochs", "1"))
    with open(out / "metrics.jsonl", "a") as f:  # as if killed after logging epoch 2, before its last.pth
        f.write(json.dumps({"epoch": 2, "train_loss": 0.0}) + "\n{\"epoch\": 3, \"trunc")
    main(args(data_root, out, "--epochs", "2", "--resume"))
    assert epochs_logged(out) == [1, 2]
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[1])["train_loss"] > 0
    log = (out / "log.txt").read_text()
    assert "resume: epochs was 1 in the checkpoint, now 2" in log
    # config.yaml holds the values now and says what the epochs before were trained with (it said epochs: 2 alone)
    resumed = ["# resumed after 1 epoch(s), trained with the values before: epochs 1 -> 2"]
    assert [line for line in (out / "config.yaml").read_text().splitlines() if line.startswith("# resumed")] == resumed
    # --resume on a finished run: nothing to train, the final test runs again; the run named by a relative path
    # is the folder the checkpoint recorded, not a change
    monkeypatch.chdir(tmp_path)
    main(args(data_root, Path("run"), "--epochs", "2", "--resume"))
    assert epochs_logged(out) == [1, 2]
    assert "resume: output_dir" not in (out / "log.txt").read_text()[len(log):]
    assert [line for line in (out / "config.yaml").read_text().splitlines() if line.startswith("# resumed")] == resumed
    # fewer epochs than done: refused before config.yaml is rewritten with them
    config = (out / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=rf"^--resume {re.escape(str(out / 'checkpoints' / 'last.pth'))}: 2 epochs "
                       r"done, more than --epochs 1: a run is not shortened once trained; --epochs 2 runs its final "
                       r"test again, --overwrite \(or a new --output-dir\) trains 1 epoch\(s\) anew$"):
        main(args(data_root, out, "--epochs", "1", "--resume"))
    assert (out / "config.yaml").read_text() == config and epochs_logged(out) == [1, 2]
    # a changed model or global batch: refused before the weights load (it trained the 3-block weights as 1 block)
    last = out / "checkpoints" / "last.pth"
    with pytest.raises(ConfigError, match=rf"^--resume {re.escape(str(last))}: the run was trained with "
                       r"num_spatial_blocks 3 \(now 1\), batch_size 8 \(now 4\), which a resumed run keeps \(the "
                       r"model; the schedule counts steps of that batch\): resume with those values .* or start a "
                       r"new run from its weights \(all but the classifier head, which starts anew\) with "
                       r"--pretrained"):
        main(args(data_root, out, "--epochs", "3", "--resume", "--num-spatial-blocks", "1", "--batch-size", "4"))
    # a few-shot subset where the run trained on all images: its epochs would be another length (steps lost)
    with pytest.raises(ConfigError, match=r"images_per_class null \(now 2\), which a resumed run keeps \(the epochs "
                       r"are steps over that few-shot subset\)"):
        main(args(data_root, out, "--epochs", "3", "--resume", "--images-per-class", "2"))
    assert (out / "config.yaml").read_text() == config
    # refused before the log, the data and the model: from another folder it read the data, built the model and
    # left <output_dir>/log.txt; now nothing is written, not even the folder, and the data is not read (no root)
    log, elsewhere = (out / "log.txt").read_text(), tmp_path / "elsewhere"
    with pytest.raises(ConfigError, match=r"num_spatial_blocks 3 \(now 1\), which a resumed run keeps"):
        main(args(str(tmp_path / "no_data"), elsewhere / "output", "--epochs", "3", "--resume", str(last),
                  "--num-spatial-blocks", "1"))
    assert not elsewhere.exists() and (out / "log.txt").read_text() == log


def test_resume_applies_a_changed_lr_and_weight_decay_and_refuses_another_trainable(data_root, tmp_path):
    """--lr / --weight-decay on --resume are used from the first resumed step (the checkpoint's optimizer and
    schedule held the old ones: warned as changed, trained unchanged); --trainable / --decay-tokens, whose
    parameter groups the optimizer's state is of, are refused in one line (a traceback from torch before)."""
    out = tmp_path / "run"
    main(args(data_root, out, "--epochs", "1", "--lr-schedule", "constant", "--lr", "1e-3"))
    main(args(data_root, out, "--epochs", "2", "--lr-schedule", "constant", "--lr", "5e-3", "--weight-decay", "0.2",
              "--resume"))
    lrs = [json.loads(line)["train_lr"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert lrs == [1e-3, 5e-3]
    groups = read_checkpoint(out / "checkpoints" / "last.pth")["optimizer"]["param_groups"]
    assert sorted(group["weight_decay"] for group in groups) == [0.0, 0.2]
    assert {group["lr"] for group in groups} == {group["initial_lr"] for group in groups} == {5e-3}
    for flag, message in ((["--trainable", "head"], "trainable all (now head)"),
                          (["--no-decay-tokens"], "decay_tokens true (now false)")):
        with pytest.raises(ConfigError, match=rf"the run was trained with {re.escape(message)}, which a resumed run "
                           r"keeps \(the optimizer's state is of those parameter groups\)"):
            main(args(data_root, out, "--epochs", "3", "--lr-schedule", "constant", "--resume", *flag))
    assert epochs_logged(out) == [1, 2]
    # a best*.pth holds no optimizer state: its resume builds a new optimizer, of whichever parameters
    best = read_checkpoint(out / "checkpoints" / "best.pth")["epoch"]
    main(args(data_root, out, "--epochs", "3", "--lr-schedule", "constant", "--resume",
              str(out / "checkpoints" / "best.pth"), "--trainable", "head"))
    assert epochs_logged(out) == list(range(1, best + 1)) + list(range(best + 1, 4))


def test_resume_keeps_the_seed_of_a_few_shot_subset(tmp_path):
    """The seed picks a few-shot subset's images: another seed on resume is refused for a few-shot run only."""
    from types import SimpleNamespace

    from utils.checkpoint import check_unchanged

    saved = {"arch": "deit_sat_tiny_patch16_224", "batch_size": 8, "images_per_class": 5, "seed": 6}
    with pytest.raises(ConfigError, match=r"trained with seed 6 \(now 7\), which a resumed run keeps \(the epochs"):
        check_unchanged(saved, SimpleNamespace(**dict(saved, seed=7)), tmp_path / "last.pth")
    check_unchanged(dict(saved, images_per_class=None), SimpleNamespace(**dict(saved, images_per_class=None, seed=7)),
                    tmp_path / "last.pth")  # the whole split: another seed only reorders the epochs (a warning)


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


def test_few_shot_larger_than_a_class_is_said(data_root, caplog):
    """--images-per-class above a class's images uses all of them: said, as the run is named by the number."""
    from DataLoader import build_dataset
    train_set = build_dataset("cub", data_root, "train", images_per_class=10)  # 3 classes of 8 training images
    with caplog.at_level(logging.WARNING, logger="sat"):
        log_short_classes(train_set, 10)
        log_short_classes(build_dataset("cub", data_root, "train", images_per_class=8), 8)
    assert [record.getMessage() for record in caplog.records] == [
        "--images-per-class 10: 3 of the 3 classes have fewer training images (as few as 8): all of theirs are used"]


def test_accumulation_and_no_amp_flags(data_root, tmp_path):
    out = tmp_path / "run"
    main(args(data_root, out, "--epochs", "1", "--accum-steps", "2", "--no-amp", "--lr-schedule", "cosine"))
    record = json.loads((out / "metrics.jsonl").read_text())
    assert record["train_steps"] == 3 and record["train_images"] == 24  # 6 micro-batches of 4
    log = (out / "log.txt").read_text()
    assert "global batch 8 = 4 per process x 2 accumulation steps, fp32" in log


def test_loss_weights_weigh_the_total_and_are_said_and_recorded(data_root, tmp_path):
    out = tmp_path / "run"
    main(args(data_root, out, "--epochs", "1", "--area-loss-weight", "0", "--norm-loss-weight", "0.5"))
    record = json.loads((out / "metrics.jsonl").read_text())
    assert record["train_area"] > 0 and record["train_norm"] > 0  # the terms, unweighted
    assert record["train_loss"] == pytest.approx(record["train_ce"] + 0.5 * record["train_norm"], rel=1e-5)
    assert "loss = ce + 0 x area + 0.5 x norm (official: weights 1)" in (out / "log.txt").read_text()
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["area_loss_weight"], saved["norm_loss_weight"]) == (0.0, 0.5)


def test_both_protocols_record_the_wsol_metrics_too(data_root, tmp_path):
    out = tmp_path / "run"
    main(args(data_root, out, "--epochs", "1", "--eval-protocol", "both", "--selection-metric", "maxboxaccv2"))
    record = json.loads((out / "metrics.jsonl").read_text())
    assert {"test_top1_loc", "test_best_threshold", "test_maxboxacc", "test_maxboxaccv2", "test_wsol_top1_cls"} \
        <= set(record)
    results = json.loads((out / "results.json").read_text())
    assert results["selection"]["metric"] == "maxboxaccv2" and results["eval_protocol"] == "both"
    assert results["selection"]["value"] == record["test_maxboxaccv2"] and results["threshold"] == 0.4
    assert {"top1_loc", "gt_known_loc", "maxboxacc", "maxboxaccv2"} <= set(results)
    assert "best_threshold" not in results and "at_best_threshold" not in results  # --report-best-threshold's
    log = (out / "log.txt").read_text()
    assert f"MaxBoxAccV2 {record['test_maxboxaccv2']:.2f}" in log and "maxboxaccv2" in log.split("test results")[-1]


@pytest.mark.parametrize("extra, message", [
    (["--batch-size", "6", "--accum-steps", "4"], "batch_size 6 (global, per optimizer step) must be a multiple"),
    (["--val-split"], "no 'val' split"),
    (["--resume", "missing.pth"], "missing.pth: file not found"),
    (["--batch-size", "64", "--drop-last"], "fewer than one batch (--batch-size 64) with drop_last: no batch to "
                                            "train on; lower --batch-size or give --no-drop-last"),
])
def test_user_errors_are_one_line(data_root, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, args(data_root, tmp_path / "run", "--epochs", "1", *extra))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and message in err, err


def test_train_py_error_exit_without_traceback(data_root, tmp_path):
    proc = train_py(*args(data_root, tmp_path / "run", "--images-per-class", "0"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr == "error: --images-per-class: expected an integer >= 1 or null, got '0'\n", proc.stderr


def test_imagenet_script_needs_a_data_root(tmp_path):
    with pytest.raises(ConfigError, match="the ImageNet scripts need --data-root"):
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


def write_metadata(root, meta):
    """wsolevaluation-style metadata of a CUB-layout folder: its train and test splits, and a train-fullsup
    'val' split of the first train image of each class."""
    def table(name):
        return [line.split() for line in (root / name).read_text().splitlines()]
    ids, labels = dict(table("images.txt")), dict(table("image_class_labels.txt"))
    boxes = {key: list(map(float, box)) for key, *box in table("bounding_boxes.txt")}
    is_train = dict(table("train_test_split.txt"))
    train = [k for k in ids if is_train[k] == "1"]
    val = [next(k for k in train if labels[k] == label) for label in sorted(set(labels.values()))]
    for split, keys in (("train", train), ("val", val), ("test", [k for k in ids if is_train[k] == "0"])):
        (meta / split).mkdir(parents=True)
        (meta / split / "image_ids.txt").write_text("".join(f"{ids[k]}\n" for k in keys))
        (meta / split / "class_labels.txt").write_text("".join(f"{ids[k]},{int(labels[k]) - 1}\n" for k in keys))
        (meta / split / "image_sizes.txt").write_text("".join(f"{ids[k]},64,64\n" for k in keys))
        (meta / split / "localization.txt").write_text("".join(
            f"{ids[k]},{x:g},{y:g},{x + w:g},{y + h:g}\n" for k in keys for x, y, w, h in [boxes[k]]))


def test_training_with_val_split_selects_on_val_and_tests_on_test(data_root, tmp_path, monkeypatch, capsys):
    meta = tmp_path / "metadata"
    write_metadata(Path(data_root), meta)
    out = tmp_path / "run"
    monkeypatch.setattr(utils.logger, "FILE_BAR_SECONDS", 0)  # stderr is no terminal here: a bar line per update
    main(args(data_root, out, "--epochs", "1", "--val-split", "--metadata-root", str(meta)))
    bars = {line.split(":")[0] for line in capsys.readouterr().err.splitlines() if "%|" in line}
    assert bars == {"epoch 1", "epoch 1 val", "final test"}  # each evaluation's bar says which it is
    record = json.loads((out / "metrics.jsonl").read_text())
    assert record["val_num_images"] == 3 and "test_top1_loc" not in record
    assert "model selection on the val split (3 images)" in (out / "log.txt").read_text()
    results = json.loads((out / "results.json").read_text())
    assert results["split"] == "test" and results["num_images"] == 12


def test_val_split_reports_the_wsol_metrics_of_test_at_vals_map_threshold(data_root, tmp_path):
    """The fair wsol protocol: best.pth's val MaxBoxAcc threshold is applied to test (results.json's
    at_wsol_threshold, labelled chosen_on val), beside test's own maxima."""
    meta = tmp_path / "metadata"
    write_metadata(Path(data_root), meta)
    out = tmp_path / "run"
    main(args(data_root, out, "--epochs", "1", "--val-split", "--metadata-root", str(meta), "--eval-protocol", "both"))
    record = json.loads((out / "metrics.jsonl").read_text())
    results = json.loads((out / "results.json").read_text())
    assert results["selection"]["wsol_threshold"] == record["val_maxboxacc_threshold"]
    fixed = results["at_wsol_threshold"]
    assert fixed["chosen_on"] == "val" and fixed["wsol_threshold"] == record["val_maxboxacc_threshold"]
    assert set(fixed) >= {"boxacc", "boxaccv2", "boxaccv2_per_iou"} and fixed["boxacc"] <= results["maxboxacc"]


def test_best_pth_is_the_first_epoch_with_the_best_loc_sum_and_loads_into_the_official_class(data_root, tmp_path):
    out = tmp_path / "run"
    main(args(data_root, out, "--epochs", "3", "--lr", "3e-3", "--lr-schedule", "constant"))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    loc = [r["test_top1_loc"] + r["test_gt_known_loc"] for r in records]
    top1 = [r["test_top1_loc"] for r in records]
    expected = {"best.pth": loc.index(max(loc)) + 1, "best_top1_loc.pth": top1.index(max(top1)) + 1}
    for name, epoch in expected.items():
        saved = read_checkpoint(out / "checkpoints" / name)
        assert saved["epoch"] == epoch and saved["best_thr"] == records[epoch - 1]["test_best_threshold"], name
    # the official SAT class's state dict: no 'module.' prefix, its smoothing kernel 'weight' included
    weights = read_checkpoint(out / "checkpoints" / "best.pth")["model"]
    assert "weight" in weights and not any(key.startswith("module.") for key in weights)
    assert weights["weight"].shape == (1, 1, 3, 3)


def test_checkpoint_weights_have_the_official_names_and_shapes():
    # The official class at width 48 (12 blocks, 10 classes) saved 'module.'-prefixed keys; our model at the
    # same size, saved as training saves it, must match them one to one (so load_state_dict(strict=True) works).
    official = torch.load(OFFICIAL_CKPT, map_location="cpu", weights_only=False)["model"]
    official = {key.removeprefix("module."): value.shape for key, value in official.items()}
    model = build_model(OFFICIAL_ARCH, num_classes=10, **OFFICIAL_MODEL_KWARGS)
    ours = {key: value.shape for key, value in checkpoint_weights(model).items()}
    assert ours == official


def test_compile_flag_trains_and_compiles_the_full_batch_once(data_root, tmp_path, monkeypatch):
    # TorchDynamo traces the model as with the default backend; a counting eager backend skips inductor's code
    # generation (30 s on a 2-core machine), which is torch's concern, not this project's
    graphs = []

    def counting_backend(graph, example_inputs):
        graphs.append([tuple(x.shape) for x in example_inputs if torch.is_tensor(x) and x.shape[1:] == (3, 64, 64)])
        return graph.forward

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=counting_backend))
    out = tmp_path / "run"
    # 24 images in batches of 10, 10 and 4 over 2 epochs: the batch of 4 runs eagerly instead of a second compile
    main(args(data_root, out, "--epochs", "2", "--compile", "--batch-size", "10", "--eval-start-epoch", "2"))
    assert epochs_logged(out) == [1, 2]
    assert graphs == [[(10, 3, 64, 64)]]  # one graph, compiled once, for the full batch
    assert not any(key.startswith("_orig_mod.") for key in read_checkpoint(out / "checkpoints" / "best.pth")["model"])


def test_cpu_runs_on_a_gpu_machine_pin_nothing(data_root, tmp_path, monkeypatch):
    """--device cpu where CUDA is available: the loaders used to pin their batches anyway (a CUDA context in
    each process, and in a forked test rank a failure). Here CUDA is announced but absent, so any pinning
    fails ("no NVIDIA driver"). train.py's loaders, then evaluator.py end to end."""
    cfg = parse_config(args(data_root, tmp_path / "run", "--workers", "2"), "train")
    info = init_distributed("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    train_loader, selection_loader, test_loader, _ = build_loaders(cfg, "cub", data_root, info, micro_batch=8)
    train_loader.sampler.set_epoch(0)
    for loader in (train_loader, selection_loader, test_loader):
        assert not next(iter(loader))["image"]["pixels"].is_pinned()
    checkpoint = save_nano_checkpoint(tmp_path / "nano.pth")
    record = eval_main(["--data-root", data_root, "--checkpoint", str(checkpoint), "--workers", "2", "--device",
                        "cpu", "--output-dir", str(tmp_path / "eval"), "--eval-batch-size", "12"])
    assert record["num_images"] == 12


def test_existing_run_folder_is_refused_without_resume_or_overwrite(data_root, tmp_path, capsys):
    out = tmp_path / "run"
    main(args(data_root, out, "--epochs", "1"))
    before = (out / "metrics.jsonl").read_text()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, args(data_root, out, "--epochs", "1"))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert "holds a previous run" in err and "--resume to continue it, --overwrite to start again" in err
    assert (out / "metrics.jsonl").read_text() == before  # nothing touched
    last, best = out / "checkpoints" / "last.pth", (out / "checkpoints" / "best.pth").read_bytes()
    last.rename(tmp_path / "last.pth")  # a finished run without its last.pth is not a start: --resume is refused
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, args(data_root, out, "--epochs", "1", "--resume"))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err == (
        f"error: --resume: {out} holds a previous run (checkpoints/best.pth, checkpoints/best_gt_known_loc.pth, "
        f"checkpoints/best_top1_loc.pth, results.json) but no checkpoints/last.pth: --resume "
        f"{out / 'checkpoints' / 'best.pth'} continues from its weights, --overwrite starts again\n")
    assert (out / "checkpoints" / "best.pth").read_bytes() == best and not last.exists()
    (tmp_path / "last.pth").rename(last)
    (out / "overlays").mkdir()
    (out / "image_cache").mkdir()  # left by an interrupted --cache-images run
    (out / "image_cache" / "test.cache").write_bytes(b"x")
    main(args(data_root, out, "--epochs", "1", "--overwrite"))
    assert epochs_logged(out) == [1] and not (out / "overlays").exists() and not (out / "image_cache").exists()
    assert (out / "log.txt").read_text().count("config ") == 1  # the old log went too
    evaluated = tmp_path / "evaluated"  # an evaluator's output folder: not a place to start a run, even --overwrite
    evaluated.mkdir()
    (evaluated / "metrics.json").write_text("{}")
    capsys.readouterr()
    with pytest.raises(SystemExit):
        run_cli(main, args(data_root, evaluated, "--epochs", "1", "--overwrite"))
    assert capsys.readouterr().err == f"error: {evaluated} holds an evaluator's outputs (metrics.json): choose " \
        "another --output-dir\n"
    assert sorted(p.name for p in evaluated.iterdir()) == ["metrics.json"]
    with pytest.raises(SystemExit):  # --resume with no run there starts one: refused as well
        run_cli(main, args(data_root, evaluated, "--epochs", "1", "--resume"))
    assert "holds an evaluator's outputs (metrics.json)" in capsys.readouterr().err
    (tmp_path / "afile").write_text("x")
    for folder in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        with pytest.raises(SystemExit):
            run_cli(main, args(data_root, folder, "--epochs", "1"))
        assert capsys.readouterr().err == f"error: --output-dir {folder}: a file, or inside one; expected a folder\n"


def test_ctrl_c_prints_one_line_with_the_resume_command(data_root, tmp_path):
    out = tmp_path / "run"
    argv = args(data_root, out, "--epochs", "50")
    # (SIGINT as at a terminal: a shell starts background jobs with it ignored, which train.py then inherits)
    proc = subprocess.Popen([sys.executable, "train.py", *argv], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    last = out / "checkpoints" / "last.pth"
    wait_for_file(proc, last)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stdout.splitlines() if "interrupted" in line]
    assert len(lines) == 1, stdout[-2000:]
    assert "interrupted in epoch" in lines[0] and f"{last} holds" in lines[0]
    command = lines[0].split("resume with: ")[1]
    assert command.startswith("python train.py ") and command.endswith(" --resume") and str(out) in command


def test_training_on_data_without_boxes_is_classification_only(tmp_path):
    root = tmp_path / "folder"
    for split, count in (("train", 6), ("test", 2)):
        for label, colour in enumerate(((200, 30, 30), (30, 30, 200))):
            (root / split / f"c{label}").mkdir(parents=True)
            for k in range(count):
                Image.new("RGB", (40, 40), colour).save(root / split / f"c{label}" / f"{k}.png")
    out = tmp_path / "run"
    main(args(str(root), out, "--data-format", "folder", "--epochs", "1", "--tencrop"))
    log = (out / "log.txt").read_text()
    assert "evaluation: classification only (eval_protocol auto; the evaluation split has neither boxes nor " \
           "masks); best.pth by top1_cls (selection_metric loc does not exist" in log
    results = json.loads((out / "results.json").read_text())
    assert results["eval_protocol"] == "cls" and results["selection"]["metric"] == "top1_cls"
    assert {"top1_cls", "top5_cls", "num_images"} <= set(results) and "top1_loc" not in results
    assert results["num_images"] == 4 and results["tencrop"]  # classification on the official view, as evaluator.py
    assert "(epoch 1, cls, ten-crop classification, fp32)" in log
    evaluated = eval_main(["--data-format", "folder", "--data-root", str(root), "--checkpoint",
                           str(out / "checkpoints" / "best.pth"), "--output-dir", str(tmp_path / "eval"),
                           "--workers", "0", "--device", "cpu"])
    assert evaluated["views"] == ["tencrop"] and evaluated["top1_cls"] == results["top1_cls"]
    assert not (out / "checkpoints" / "best_top1_loc.pth").exists()
    with pytest.raises(ConfigError, match="eval_protocol sat needs boxes in the evaluation split, which has "
                                          "neither boxes nor masks: use --eval-protocol cls"):
        main(args(str(root), tmp_path / "sat", "--data-format", "folder", "--epochs", "1", "--eval-protocol", "sat"))


def test_training_on_mask_data_selects_on_pxap(tmp_path):
    images, meta = tmp_path / "images", tmp_path / "metadata"
    rng = np.random.default_rng(0)
    rows = {"train": [], "test": []}
    for split, count in (("train", 4), ("test", 2)):
        for label in range(2):
            for k in range(count):
                image_id = f"{split}/c{label}/{k}.png"
                pixels = rng.integers(0, 60, (48, 48, 3), dtype=np.uint8)
                pixels[10:30, 12:36] = (220, 40, 40) if label == 0 else (40, 40, 220)
                (images / image_id).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).save(images / image_id)
                rows[split].append((image_id, label))
    (images / "mask").mkdir()
    mask = np.zeros((48, 48), np.uint8)
    mask[10:30, 12:36] = 255
    Image.fromarray(mask).save(images / "mask" / "object.png")
    for split, entries in rows.items():
        (meta / split).mkdir(parents=True)
        (meta / split / "image_ids.txt").write_text("".join(f"{i}\n" for i, _ in entries))
        (meta / split / "class_labels.txt").write_text("".join(f"{i},{label}\n" for i, label in entries))
        (meta / split / "image_sizes.txt").write_text("".join(f"{i},48,48\n" for i, _ in entries))
        if split == "test":
            (meta / split / "localization.txt").write_text("".join(f"{i},mask/object.png,\n" for i, _ in entries))
    out = tmp_path / "run"
    main(args(str(images), out, "--data-format", "wsol", "--metadata-root", str(meta), "--epochs", "1",
              "--batch-size", "4"))
    assert "evaluation: wsol protocol (eval_protocol auto; the evaluation split has masks); best.pth " \
           "by pxap" in (out / "log.txt").read_text()
    record = json.loads((out / "metrics.jsonl").read_text())
    assert 0 <= record["test_pxap"] <= 100 and "test_top1_loc" not in record
    results = json.loads((out / "results.json").read_text())
    assert results["eval_protocol"] == "wsol" and results["selection"]["metric"] == "pxap" and "pxap" in results


def test_deit_weights_are_looked_for_before_the_data_and_not_on_resume(data_root, tmp_path, monkeypatch):
    """An offline node is told at once that the DeiT weights cannot be fetched (it read and checked the whole
    dataset first); a --resume takes its weights from the checkpoint and needs no network."""
    huggingface_hub = pytest.importorskip("huggingface_hub", reason="no huggingface_hub (optional for timm)")
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "https://sat-hub-probe.invalid")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for key in [key for key in os.environ if "proxy" in key.lower()]:
        monkeypatch.delenv(key)
    deit = ["--arch", "deit_sat_tiny_patch16_224", "--pretrained", "true"]
    with pytest.raises(CheckpointError, match="^could not get the DeiT weights of deit_sat_tiny_patch16_224 from "
                                              "the timm hub"):
        main(args(str(tmp_path / "no_data_here"), tmp_path / "new", *deit))
    with pytest.raises(CheckpointError, match=f"^pretrained weights {re.escape(str(tmp_path / 'deit_typo.pth'))}: file "
                                              r"not found \(expected a weights file, or --pretrained false for "
                                              r"random initialisation\)$"):
        main(args(str(tmp_path / "no_data_here"), tmp_path / "new", "--pretrained", str(tmp_path / "deit_typo.pth")))
    out = tmp_path / "run"
    main(args(data_root, out, "--epochs", "1", "--arch", "deit_sat_tiny_patch16_224", "--pretrained", "false"))
    main(args(data_root, out, "--epochs", "2", *deit, "--resume"))
    assert epochs_logged(out) == [1, 2]


def test_epoch_log_line_names_the_metrics_as_the_tables_and_json_do(caplog):
    """The epoch's evaluation line: the printed tables' metric names (not the JSON keys) in every protocol, and the
    map threshold it is at by its JSON key, best_threshold, of eval_thresholds."""
    import types
    from train import log_epoch
    cfg, stats = types.SimpleNamespace(epochs=2), dict(num_skipped=0, time=1.0, data_wait=0.0, loss=1.0, ce=1.0,
                                                        area=0.1, norm=0.1, acc1=50.0, lr=1e-4)
    sat = dict(top1_loc=10.0, gt_known_loc=20.0, top1_cls=30.0, best_threshold=0.35, maxboxaccv2=40.0)
    with caplog.at_level(logging.INFO, logger="sat"):
        log_epoch(cfg, 0, stats, sat, set(), "test", types.SimpleNamespace(sat=True))
        log_epoch(cfg, 0, stats, dict(pxap=50.0, top1_cls=30.0), set(), "test", types.SimpleNamespace(sat=False))
    lines = [record.getMessage() for record in caplog.records]
    assert lines[0] == "epoch 1 test: Top-1 Loc 10.00  GT-known Loc 20.00  Top-1 Cls 30.00  (at best_threshold 0.35 " \
                       "of eval_thresholds)  MaxBoxAccV2 40.00"
    assert lines[2] == "epoch 1 test: PxAP 50.00  Top-1 Cls 30.00"


def test_resume_of_a_file_that_is_not_a_training_checkpoint_is_refused_before_the_log(tmp_path):
    """An official release file (epoch 30, no optimizer or config) was told '30 epochs done, more than --epochs 1
    ... --epochs 30 runs its final test again' (which then refused it), and with --epochs 31 was refused only once
    the data was read and the model built (left <output_dir>/log.txt): now one line, nothing written, data unread."""
    from test_model import official_format_file
    path = official_format_file(build_model("deit_sat_nano_patch16_224", num_classes=2, img_size=64),
                                tmp_path / "best_loc.pth.tar")
    out = tmp_path / "run"
    for epochs in ("1", "31"):
        with pytest.raises(CheckpointError, match=rf"^{re.escape(str(path))} is not a training checkpoint of this "
                           r"project \(no optimizer, scheduler, config, best\); to start from its weights use "):
            main(args(str(tmp_path / "no_data"), out, "--epochs", epochs, "--resume", str(path)))
        assert not out.exists()


def test_a_process_batch_of_one_image_under_ddp_prints_no_torch_warning(tmp_path):
    """A batch of one image in a process (an unreadable image skipped, a global batch of one per process) made
    DDP print torch's multi-line 'Grad strides do not match bucket view strides' UserWarning in each process,
    across the progress bar (the class and spatial tokens' gradients are views into the sequence's)."""
    import warnings
    from types import SimpleNamespace
    import torch.distributed as dist
    from conftest import rendezvous
    from train import build_training_model
    cfg = SimpleNamespace(arch="deit_sat_nano_patch16_224", img_size=64, drop_path=0.0, num_spatial_blocks=3,
                          attn_impl="fused", trainable="all", compile=False)
    dist.init_process_group("gloo", init_method=rendezvous(tmp_path), rank=0, world_size=1)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _, ddp = build_training_model(cfg, 2, SimpleNamespace(device=torch.device("cpu"), distributed=True), 1,
                                          pretrained=False)
            logits, _ = ddp(torch.randn(1, 3, 64, 64))
            logits.sum().backward()
    finally:
        dist.destroy_process_group()
    assert not [str(w.message) for w in caught if "Grad strides" in str(w.message)]


def test_a_format_other_than_the_demo_s_needs_a_data_root(tmp_path, capsys):
    """Without --data-root train.py trains on the built-in demo data, which is in the CUB layout: another
    --data-format is refused in one line."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, [*TINY, "--data-format", "folder", "--output-dir", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: data_format folder needs --data-root (only the built-in demo data " \
                                      "needs none)\n"
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_train_split_smaller_than_one_batch_is_said(data_root, tmp_path, caplog):
    cfg = parse_config(args(data_root, tmp_path / "run", "--batch-size", "64"), "train")
    with caplog.at_level(logging.WARNING, logger="sat"):
        train_loader = build_loaders(cfg, "cub", data_root, init_distributed("cpu"), micro_batch=64)[0]
    assert "the train split has 24 images, fewer than one batch (--batch-size 64): each epoch is one partial " \
           "batch" in caplog.text
    assert len(train_loader) == 1


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_the_code_version_names_the_commit_and_uncommitted_changes(tmp_path):
    """log.txt's environment line: the commit of the code, '+ uncommitted changes' when a tracked file differs
    from it (an untracked one does not count), 'commit unknown' for a copy without .git."""
    assert code_version(tmp_path) == "commit unknown (not a git checkout, or git not available)"
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "sat.py").write_text("x = 1\n")
    subprocess.run([*git, "add", "sat.py"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "first"], check=True)
    sha = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    (tmp_path / "notes.txt").write_text("untracked")
    assert code_version(tmp_path) == f"git {sha[:12]}"
    (tmp_path / "sat.py").write_text("x = 2\n")
    assert code_version(tmp_path) == f"git {sha[:12]} + uncommitted changes"
