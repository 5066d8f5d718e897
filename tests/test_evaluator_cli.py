"""evaluator.py and evaluator_ImageNet.py end to end on small generated data with a random nano model;
flag defaults and --config precedence; one-line errors for bad checkpoints."""
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO_ROOT
from DataLoader import build_dataset
from DataLoader.transforms import boxes_protocol_b
from utils.errors import ConfigError, run_cli
from utils.eval_cli import main, parse_args
from utils.metrics_wsol import WSOLBoxAccumulator

from test_evaluation import save_nano_checkpoint, tiny_demo

SAT_KEYS = ("num_images", "top1_cls", "top5_cls", "gt_known_loc", "top1_loc", "top5_loc", "iou30", "iou50", "iou70")
WSOL_KEYS = ("maxboxacc", "maxboxaccv2")
WNIDS = ["n01440764", "n01443537", "n02102040"]


def run_script(script, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1")  # tiny model: one thread is faster on a busy machine
    return subprocess.run([sys.executable, str(REPO_ROOT / script), *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=REPO_ROOT, timeout=300)


@pytest.fixture(scope="module")
def cub(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cub")
    return tiny_demo(tmp / "demo"), save_nano_checkpoint(tmp / "nano.pth")


@pytest.fixture
def keep_logging():
    """main() configures the root logger; give pytest its handlers back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
        if handler not in handlers:
            handler.close()
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def test_cub_evaluator_both_protocols_end_to_end(cub, tmp_path):
    root, checkpoint = cub
    out = tmp_path / "out"
    proc = run_script("evaluator.py", "--data-root", root, "--checkpoint", checkpoint, "--protocol", "both",
                      "--save-scoremaps", out / "scoremaps", "--save-images", out / "images", "--max-images", 5,
                      "--output-dir", out, "--batch-size", 5, "--workers", 1, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert "Protocol A (official SAT)" in proc.stdout and "Protocol B (wsolevaluation" in proc.stdout
    assert "Top-1 Loc" in proc.stdout and "MaxBoxAccV2" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_images"] == 12 and metrics["tencrop"] is True and metrics["thresholds"] == [0.4]
    assert metrics["checkpoint"] == str(checkpoint) and metrics["arch"] == "deit_sat_nano_patch16_224"
    for key in SAT_KEYS[1:] + WSOL_KEYS:
        assert 0 <= metrics[key] <= 100, key
    assert set(metrics["maxboxaccv2_per_iou"]) == {"30", "50", "70"}
    assert metrics["best_thresholds"]["sat"] == 0.4 and "maxboxacc" in metrics["best_thresholds"]["wsol"]
    assert "Protocol B" in (out / "log.txt").read_text()

    dataset = build_dataset("cub", root, "test", lambda image: image)
    rescored = WSOLBoxAccumulator()
    for sample in dataset:  # the score maps, named by image id, re-scored as the benchmark would
        score = np.load(out / "scoremaps" / f"{sample['image_id']}.npy")
        assert score.shape == (224, 224) and score.dtype == np.float64 and score.min() >= 0 and score.max() <= 1
        rescored.update(score[None], [boxes_protocol_b(sample["boxes"], sample["size"])])
    assert rescored.compute()["maxboxacc"] == metrics["maxboxacc"]
    assert rescored.compute()["maxboxaccv2"] == metrics["maxboxaccv2"]
    overlays = sorted((out / "images").rglob("*.png"))
    assert len(overlays) == 5 and overlays[0].relative_to(out / "images").parts[0].startswith("001.")
    assert Image.open(overlays[0]).size == (64, 64)


def _write_imagenet(root):
    """ILSVRC2012 layout: train/<wnid>/ for the classes, 6 flat val images, LOC_val_solution.csv."""
    rng = np.random.default_rng(1)
    rows = []
    for k, wnid in enumerate(WNIDS):
        (root / "train" / wnid).mkdir(parents=True)
        Image.new("RGB", (40, 40)).save(root / "train" / wnid / "a.JPEG")
        for j in range(2):
            name = f"ILSVRC2012_val_{2 * k + j + 1:08d}"
            (root / "val").mkdir(exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (48, 60, 3), np.uint8)).save(root / "val" / f"{name}.JPEG")
            rows.append(f"{name},{wnid} 5 6 40 30 {wnid} 20 20 58 46")
    (root / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    return root


def test_imagenet_evaluator_with_config_file(tmp_path):
    root = _write_imagenet(tmp_path / "ILSVRC2012")
    checkpoint = save_nano_checkpoint(tmp_path / "nano.pth", num_classes=len(WNIDS))
    config = tmp_path / "eval.yaml"
    config.write_text(f"checkpoint: {checkpoint}\nthresholds: [0.3, 0.5]\nbatch_size: 4\nworkers: 0\n"
                      f"device: cpu\nprotocol: wsol\n")
    out = tmp_path / "out"
    proc = run_script("evaluator_ImageNet.py", "--data-root", root, "--config", config, "--protocol", "sat",
                      "--output-dir", out, "--save-images", out / "images")
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["protocol"] == "sat" and metrics["thresholds"] == [0.3, 0.5] and metrics["tencrop"] is False
    assert metrics["num_images"] == 6 and metrics["data_format"] == "imagenet"
    assert all(0 <= metrics[key] <= 100 for key in SAT_KEYS[1:]) and "maxboxacc" not in metrics
    assert len(metrics["gt_known_loc_per_threshold"]) == 2 and "per threshold" in proc.stdout
    assert sorted(p.name for p in (out / "images" / "val").iterdir())[0] == "ILSVRC2012_val_00000001.png"


def test_official_defaults_and_config_precedence(tmp_path):
    cub = parse_args(["--checkpoint", "c.pth"], "cub")
    assert cub.thresholds == [0.4] and cub.tencrop and cub.protocol == "sat" and cub.format == "cub"
    imagenet = parse_args(["--checkpoint", "c.pth", "--data-root", "d"], "imagenet")
    assert imagenet.thresholds == [0.3] and not imagenet.tencrop
    config = tmp_path / "c.yaml"
    config.write_text("batch_size: 7\ntencrop: false\nthresholds: [0.2, 0.25]\ndata_root: /data\n")
    args = parse_args(["--config", str(config), "--checkpoint", "c.pth", "--batch-size", "3"], "cub")
    assert (args.batch_size, args.tencrop, args.thresholds, args.data_root) == (3, False, [0.2, 0.25], "/data")
    config.write_text("batch_size: 7\nthreshold: 0.3\n")
    with pytest.raises(ConfigError, match=r"unknown key 'threshold'"):
        parse_args(["--config", str(config), "--checkpoint", "c.pth"], "cub")
    config.write_text("batch_size: seven\n")
    with pytest.raises(ConfigError, match=r"c.yaml: argument --batch-size: invalid int value"):
        parse_args(["--config", str(config), "--checkpoint", "c.pth"], "cub")
    with pytest.raises(SystemExit):
        parse_args(["--data-root", "d"], "imagenet")  # --checkpoint missing


def _one_error_line(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda a: main(a, kind="cub"), argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: ")
    return err


def test_checkpoint_errors_are_one_line(cub, tmp_path, capsys, keep_logging):
    root, _ = cub
    common = ["--data-root", str(root), "--output-dir", str(tmp_path / "out"), "--workers", "0", "--device", "cpu"]
    not_a_checkpoint = tmp_path / "notes.pth"
    not_a_checkpoint.write_text("hello")
    other_classes = save_nano_checkpoint(tmp_path / "five.pth", num_classes=5)
    assert str(not_a_checkpoint) in _one_error_line(capsys, ["--checkpoint", str(not_a_checkpoint), *common])
    err = _one_error_line(capsys, ["--checkpoint", str(other_classes), *common])
    assert str(other_classes) in err and "5 classes" in err and "has 3" in err

    proc = run_script("evaluator.py", "--checkpoint", tmp_path / "absent.pth", *common)  # the real script
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"error: checkpoint {tmp_path / 'absent.pth'}: file not found"
