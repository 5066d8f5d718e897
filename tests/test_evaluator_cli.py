"""evaluator.py and evaluator_ImageNet.py end to end on small generated data with a random nano model;
one-line errors for bad checkpoints (flags and config files: tests/test_config.py)."""
import csv
import functools
import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO_ROOT
from DataLoader import DEFAULT_DEMO_ROOT, build_dataset, make_demo_dataset
from utils.boxes import gt_boxes_wsol
from utils.errors import CheckpointError, ConfigError, run_cli
from evaluator import check_trained_on_demo, main
from utils.metrics import WSOLBoxAccumulator

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
    proc = run_script("evaluator.py", "--data-root", root, "--checkpoint", checkpoint, "--eval-protocol", "both",
                      "--save-maps", out / "maps", "--overlays", 5, "--output-dir", out, "--eval-batch-size", 5,
                      "--workers", 1, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert "sat protocol (official SAT): 12 images, ten-crop classification, threshold 0.4" in proc.stdout
    assert "wsol protocol (wsolevaluation, 224x224" in proc.stdout and "WARNING" not in proc.stdout
    assert "Top-1 Loc" in proc.stdout and "MaxBoxAccV2" in proc.stdout
    assert "\r" not in proc.stderr  # stderr is a pipe: no progress bar redraws (a line a minute, none in seconds)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_images"] == 12 and metrics["tencrop"] is True and metrics["threshold"] == 0.4
    assert metrics["precision"] == "fp32" and "best_threshold" not in metrics
    assert metrics["checkpoint"] == str(checkpoint) and metrics["arch"] == "deit_sat_nano_patch16_224"
    assert metrics["num_spatial_blocks"] == 3  # the model's (a sweep over it: runs told apart)
    for key in SAT_KEYS[1:] + WSOL_KEYS:
        assert 0 <= metrics[key] <= 100, key
    assert set(metrics["maxboxaccv2_per_iou"]) == {"30", "50", "70"}
    assert 0 <= metrics["maxboxacc_threshold"] < 1
    assert "wsol protocol (wsolevaluation" in (out / "log.txt").read_text()

    dataset = build_dataset("cub", root, "test", lambda image: image)
    rescored = WSOLBoxAccumulator()
    for sample in dataset:  # the score maps, named by image id, re-scored as the benchmark would
        score = np.load(out / "maps" / "wsol" / f"{sample['image_id']}.npy")
        assert score.shape == (224, 224) and score.dtype == np.float64 and score.min() >= 0 and score.max() <= 1
        rescored.update(score[None], [gt_boxes_wsol(sample["boxes"], sample["size"])])
    assert rescored.compute()["maxboxacc"] == metrics["maxboxacc"]
    assert rescored.compute()["maxboxaccv2"] == metrics["maxboxaccv2"]
    overlays = sorted((out / "overlays").rglob("*.png"))
    assert len(overlays) == 5 and overlays[0].relative_to(out / "overlays").parts[0].startswith("001.")
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


@pytest.mark.skipif(sys.platform != "linux", reason="file-descriptor sharing of worker tensors is Linux's")
def test_a_large_evaluation_batch_fits_a_low_open_file_limit(tmp_path):
    """150 images in one batch from 2 workers at ulimit -n 64. When boxes were tensors, each image's crossed
    from its worker with its own file descriptor: this run hung on 'Too many open files' (and a batch of 256
    failed at the common limit of 1024, so that training crashed at its first evaluation)."""
    import resource

    root = make_demo_dataset(tmp_path / "demo", num_classes=3, train_per_class=1, test_per_class=50, image_size=48)
    checkpoint = save_nano_checkpoint(tmp_path / "nano.pth")

    def low_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    proc = subprocess.run([sys.executable, str(REPO_ROOT / "evaluator.py"), "--data-root", str(root),
                           "--checkpoint", str(checkpoint), "--eval-batch-size", "150", "--workers", "2",
                           "--output-dir", str(tmp_path / "out"), "--device", "cpu"],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=120, preexec_fn=low_limit,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["num_images"] == 150


def test_imagenet_evaluator_with_config_file(tmp_path):
    root = _write_imagenet(tmp_path / "ILSVRC2012")
    checkpoint = save_nano_checkpoint(tmp_path / "nano.pth", num_classes=len(WNIDS))
    config = tmp_path / "eval.yaml"
    config.write_text(f"checkpoint: {checkpoint}\nthresholds: [0.5, 0.3]\neval_batch_size: 4\neval_protocol: wsol\n")
    out = tmp_path / "out"
    proc = run_script("evaluator_ImageNet.py", "--data-root", root, "--config", config, "--eval-protocol", "sat",
                      "--output-dir", out, "--overlays", "all", "--workers", 0, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval_protocol"] == "sat" and metrics["threshold"] == 0.3 and metrics["tencrop"] is False
    assert metrics["search_thresholds"] == [0.5, 0.3] and metrics["thresholds"] == [0.3, 0.5]
    assert metrics["best_threshold"] in (0.3, 0.5) and "chosen on the evaluated split" in proc.stdout
    assert metrics["num_images"] == 6 and metrics["data_format"] == "imagenet"
    assert all(0 <= metrics[key] <= 100 for key in SAT_KEYS[1:]) and "maxboxacc" not in metrics
    assert len(metrics["gt_known_loc_per_threshold"]) == 2 and "per map threshold" in proc.stdout
    assert sorted(p.name for p in (out / "overlays" / "val").iterdir())[0] == "ILSVRC2012_val_00000001.png"


def _one_error_line(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda a: main(a), argv)
    lines = [line for line in capsys.readouterr().err.strip().replace("\r", "\n").splitlines()
             if line.strip() and not line.startswith("eval:")]  # the progress bar (and its clearing) aside
    assert exit_info.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_checkpoint_errors_are_one_line(cub, tmp_path, capsys, keep_logging):
    root, _ = cub
    common = ["--data-root", str(root), "--output-dir", str(tmp_path / "out"), "--workers", "0", "--device", "cpu"]
    not_a_checkpoint = tmp_path / "notes.pth"
    not_a_checkpoint.write_text("hello")
    other_classes = save_nano_checkpoint(tmp_path / "two.pth", num_classes=2)
    assert str(not_a_checkpoint) in _one_error_line(capsys, ["--checkpoint", str(not_a_checkpoint), *common])
    err = _one_error_line(capsys, ["--checkpoint", str(other_classes), *common])
    assert err == (f"error: checkpoint {other_classes} predicts 2 classes but the data has 3; classes outside the "
                   "model: 003.Striped_Triangle")
    assert _one_error_line(capsys, ["--checkpoint", str(root), *common]) == \
        f"error: checkpoint {root}: a folder, not a checkpoint file"
    other_model = tmp_path / "resnet.pth"  # another network's weights
    torch.save({"fc.weight": torch.zeros(2, 4), "fc.bias": torch.zeros(2)}, other_model)
    assert _one_error_line(capsys, ["--checkpoint", str(other_model), *common]) == \
        f"error: checkpoint {other_model} is not a SAT model (no pos_embed / head.weight)"

    proc = run_script("evaluator.py", "--checkpoint", tmp_path / "absent.pth", *common)  # the real script
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"error: checkpoint {tmp_path / 'absent.pth'}: file not found"


def test_compile_flag_compiles_the_full_forward_once_and_changes_no_number(cub, tmp_path, monkeypatch,
                                                                           keep_logging):
    # a counting eager backend traces the model as the default one does, without inductor's code generation
    graphs = []

    def counting_backend(graph, example_inputs):
        graphs.append([tuple(x.shape) for x in example_inputs if torch.is_tensor(x) and x.shape[1:] == (3, 64, 64)])
        return graph.forward

    root, checkpoint = cub
    common = ["--data-root", str(root), "--checkpoint", str(checkpoint), "--eval-batch-size", "5", "--workers", "0",
              "--device", "cpu", "--eval-protocol", "both"]
    eager = main([*common, "--output-dir", str(tmp_path / "eager")])
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=counting_backend))
    compiled = main([*common, "--output-dir", str(tmp_path / "compiled"), "--compile"])
    # 12 images in batches of 5, 5 and 2, 11 views each (ten crops and the wsol view): the last batch runs eagerly
    assert graphs == [[(55, 3, 64, 64)]]
    assert (eager["compile"], compiled["compile"]) == (False, True)
    assert {k: v for k, v in compiled.items() if k != "compile"} == \
        {k: v for k, v in eager.items() if k != "compile"}


def _read_per_image(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_per_image_csv_recomputes_the_summary_exactly(cub, tmp_path, capsys):
    root, checkpoint = cub
    out = tmp_path / "out"
    record = main(["--data-root", str(root), "--checkpoint", str(checkpoint), "--output-dir", str(out),
                   "--threshold", "0.35", "--eval-batch-size", "5", "--workers", "0", "--device", "cpu",
                   "--save-boxes", str(out / "boxes.json")])
    rows = _read_per_image(out / "per_image.csv")
    coco = json.loads((out / "boxes.json").read_text())
    assert [image["file_name"] for image in coco["images"]] == [row["image_id"] for row in rows]
    assert all((image["width"], image["height"]) == (64, 64) for image in coco["images"])
    for ann, row in zip(coco["annotations"], rows):
        x, y, w, h = ann["bbox"]
        assert [x, y, x + w, y + h] == pytest.approx([float(v) for v in row["box_original"].split()], abs=1e-9)
        assert ann["category_id"] == int(row["top5"].split()[0]) + 1
    assert len(rows) == record["num_images"] == 12 and rows[0]["image_id"].startswith("001.")
    labels = [int(row["label"]) for row in rows]
    top5 = [[int(c) for c in row["top5"].split()] for row in rows]
    ious = [float(row["iou"]) for row in rows]
    top1 = [t[0] == label for t, label in zip(top5, labels)]
    in_top5 = [label in t for t, label in zip(top5, labels)]
    recomputed = {
        "top1_cls": 100 * sum(top1) / 12, "top5_cls": 100 * sum(in_top5) / 12,
        "gt_known_loc": 100 * sum(i >= 0.5 for i in ious) / 12,
        "top1_loc": 100 * sum(t and i >= 0.5 for t, i in zip(top1, ious)) / 12,
        "top5_loc": 100 * sum(t and i >= 0.5 for t, i in zip(in_top5, ious)) / 12,
        **{f"iou{level}": 100 * sum(i >= level / 100 for i in ious) / 12 for level in (30, 50, 70)}}
    for key, value in recomputed.items():
        assert record[key] == pytest.approx(value, abs=1e-12), key
    assert [bool(int(row["cls_correct"])) for row in rows] == top1
    for row in rows:  # the crop box maps to original pixels through the centre crop: 64 of 73, offset 4
        crop, original = np.array(row["box_crop"].split(), float), np.array(row["box_original"].split(), float)
        np.testing.assert_allclose(original, np.clip((crop + 4) * 64 / 73, 0, 64))
    per_class = record["per_class"]
    assert list(per_class) == ["001.Ringed_Disc", "002.Checkered_Square", "003.Striped_Triangle"]
    assert [c["num_images"] for c in per_class.values()] == [4, 4, 4]
    assert sum(c["top1_cls"] for c in per_class.values()) / 3 == pytest.approx(record["top1_cls"])
    assert "GT-known Loc" in (out / "log.txt").read_text().split("per class")[1]
    # the table goes to log.txt alone: a line per class (1000 for ImageNet) scrolled the summary off the console
    console = capsys.readouterr().out
    assert "001.Ringed_Disc" not in console and "GT-known Loc" in console
    assert "INFO environment: code " in (out / "log.txt").read_text() and "environment:" not in console
    assert console.rstrip().endswith(f"the per-class table to {out / 'log.txt'}")


def test_class_subset_and_foreign_classes(cub, tmp_path, caplog, keep_logging):
    root, _ = cub
    bigger = save_nano_checkpoint(tmp_path / "five.pth", num_classes=5)
    common = ["--data-root", str(root), "--output-dir", str(tmp_path / "out"), "--workers", "0", "--device", "cpu",
              "--overwrite"]
    with caplog.at_level(logging.WARNING):
        record = main(["--checkpoint", str(bigger), *common])
    assert record["num_images"] == 12 and "class subset" in caplog.text and record["labels_matched_by"] == "name"
    foreign = tmp_path / "foreign.pth"  # another dataset's classes (none in common, another count): refused
    ckpt = torch.load(bigger, weights_only=True)
    ckpt["class_names"] = ["a", "b", "c", "d", "e"]
    torch.save(ckpt, foreign)
    with pytest.raises(CheckpointError, match=r"trained on other classes: none of its 5 class names is among the "
                                              r"data's 3 \(e.g. checkpoint 'a', data '001.Ringed_Disc'\)"):
        main(["--checkpoint", str(foreign), *common])
    renamed = tmp_path / "renamed.pth"  # the data's class count under other names: matched by index, said
    ckpt = torch.load(save_nano_checkpoint(tmp_path / "three.pth"), weights_only=True)
    ckpt["class_names"] = ["a", "b", "c"]
    torch.save(ckpt, renamed)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        record = main(["--checkpoint", str(renamed), *common])
    assert "data '001.Ringed_Disc' vs checkpoint 'a'" in caplog.text and record["labels_matched_by"] == "index"
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["labels_matched_by"] == "index"
    shifted = tmp_path / "shifted.pth"  # a class renamed: the others sort to other indices; by index they would
    ckpt["class_names"] = ["002.Checkered_Square", "003.Striped_Triangle", "zebra"]  # score as their neighbours
    torch.save(ckpt, shifted)
    with pytest.raises(CheckpointError, match=r"class '002.Checkered_Square' is its class 0 but the data's class 1, "
                                              r"and the data's class '001.Ringed_Disc' is not among the checkpoint's"):
        main(["--checkpoint", str(shifted), *common])
    reordered = tmp_path / "reordered.pth"  # the data's classes in another order: said as such (not a 'subset')
    ckpt = torch.load(save_nano_checkpoint(tmp_path / "three.pth"), weights_only=True)
    ckpt["class_names"] = ckpt["class_names"][::-1]
    torch.save(ckpt, reordered)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        record = main(["--checkpoint", str(reordered), *common])
    assert "the data has the checkpoint's 3 classes in another order: labels matched by name" in caplog.text
    assert "subset" not in caplog.text and record["labels_matched_by"] == "name"
    assert list(record["per_class"]) == ckpt["class_names"]


def test_official_format_checkpoint_needs_no_arch_and_nan_maps_are_one_line(cub, tmp_path, capsys, keep_logging):
    root, checkpoint = cub
    ckpt = torch.load(checkpoint, weights_only=True)
    official = tmp_path / "best_loc.pth.tar"  # the release format: 'module.' keys, no arch / classes recorded
    torch.save({"model": {f"module.{k}": v for k, v in ckpt["model"].items()}, "best_thr": 0.4, "epoch": 30},
               official)
    common = ["--data-root", str(root), "--output-dir", str(tmp_path / "out"), "--workers", "0", "--device", "cpu",
              "--overwrite"]
    record = main(["--checkpoint", str(official), *common])
    assert record["arch"] == "deit_sat_nano_patch16_224" and record["num_classes"] == 3
    capsys.readouterr()
    err = _one_error_line(capsys, ["--checkpoint", str(official), "--arch", "deit_sat_small_patch16_224", *common])
    assert "does not fit --arch deit_sat_small_patch16_224" in err and "deit_sat_nano_patch16_224" in err
    nan_maps = tmp_path / "nan_maps.pth"  # finite weights whose maps overflow to Inf / NaN
    ckpt["model"]["blocks.5.attn.qkv.weight"] *= 1e30
    torch.save(ckpt, nan_maps)
    err = _one_error_line(capsys, ["--checkpoint", str(nan_maps), *common])
    assert err.startswith(f"error: checkpoint {nan_maps}: the model outputs NaN/Inf") and "first 001." in err


def test_no_data_root_refuses_a_checkpoint_not_trained_on_the_demo(cub, tmp_path, capsys, keep_logging):
    """Without --data-root the evaluator reads the built-in demo data: a released checkpoint (no config) or one
    trained on a dataset is refused before anything is read, rather than scored on the demo's classes."""
    _, checkpoint = cub
    common = ["--output-dir", str(tmp_path / "out"), "--workers", "0", "--device", "cpu"]
    err = _one_error_line(capsys, ["--checkpoint", str(checkpoint), *common])
    assert err == (f"error: no --data-root: the evaluator would read the built-in demo data, but checkpoint "
                   f"{checkpoint} records no training data: pass --data-root (the dataset to evaluate on)")
    trained = torch.load(checkpoint, weights_only=False)
    trained["config"] = {"data_root": "/data/CUB_200_2011"}
    torch.save(trained, tmp_path / "cub.pth")
    err = _one_error_line(capsys, ["--checkpoint", str(tmp_path / "cub.pth"), *common])
    assert "checkpoint " + str(tmp_path / "cub.pth") + " was trained on /data/CUB_200_2011: pass --data-root" in err
    for demo in (None, str(DEFAULT_DEMO_ROOT), os.path.relpath(DEFAULT_DEMO_ROOT)):  # trained on the demo data
        check_trained_on_demo({"config": {"data_root": demo}}, "demo.pth")
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_a_resize_smaller_than_the_input_is_one_line(cub, tmp_path, capsys, keep_logging):
    root, checkpoint = cub  # a 64 px model
    err = _one_error_line(capsys, ["--checkpoint", str(checkpoint), "--data-root", str(root), "--resize-size", "48",
                                   "--output-dir", str(tmp_path / "out"), "--workers", "0", "--device", "cpu"])
    assert err == "error: resize_size 48 (--resize-size) is smaller than the input size 64: the tencrop view crops " \
                  "64 pixels of it"


def test_wsol_curves_threshold_and_overlays(cub, tmp_path):
    root, checkpoint = cub
    out = tmp_path / "out"
    record = main(["--data-root", str(root), "--checkpoint", str(checkpoint), "--output-dir", str(out),
                   "--eval-protocol", "wsol", "--wsol-threshold", "0.25", "--overlays", "2", "--workers", "0",
                   "--device", "cpu"])
    curves = json.loads((out / "wsol_curves.json").read_text())["box_accuracy"]
    assert len(curves["cam_thresholds"]) == 100 and max(curves["boxacc"]) == record["maxboxacc"]
    at = record["at_wsol_threshold"]
    assert at["wsol_threshold"] == 0.25 and at["boxacc"] == curves["boxacc"][25]
    assert at["boxaccv2_per_iou"][50] == curves["boxaccv2_per_iou"]["50"][25]
    assert Image.open(out / "wsol_curves.png").size[0] > 0
    rows = list(csv.DictReader(open(out / "per_image.csv")))  # each image's prediction, no sat box or IoU
    assert len(rows) == 12 and all(row["iou"] == "" and row["box_crop"] == "" and row["top5"] for row in rows)
    assert len(list((out / "overlays").rglob("*.png"))) == 2


def test_auto_protocol_is_classification_only_without_boxes_or_masks(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name in ("a", "b"):
            (tmp_path / "data" / split / name).mkdir(parents=True)
            pixels = rng.integers(0, 255, (40, 56, 3), np.uint8)
            Image.fromarray(pixels).save(tmp_path / "data" / split / name / "x.png")
    checkpoint = save_nano_checkpoint(tmp_path / "nano.pth", num_classes=2)
    out = tmp_path / "out"
    record = main(["--data-root", str(tmp_path / "data"), "--data-format", "folder", "--checkpoint", str(checkpoint),
                   "--output-dir", str(out), "--workers", "0", "--device", "cpu"])
    assert record["eval_protocol"] == "cls" and record["num_images"] == 2 and record["views"] == ["tencrop"]
    assert 0 <= record["top1_cls"] <= 100 and "gt_known_loc" not in record
    rows = list(csv.DictReader(open(out / "per_image.csv")))  # predictions: class and box, nothing to score
    assert len(rows) == 2 and all(row["iou"] == "" and len(row["box_original"].split()) == 4 for row in rows)
    (tmp_path / "maps").mkdir()  # saved maps of such data: nothing to score them against
    with pytest.raises(ConfigError, match=r"^--maps: the test split of \S+/data has neither boxes nor masks: no "
                                          r"localization to score$"):
        main(["--data-root", str(tmp_path / "data"), "--data-format", "folder", "--maps", str(tmp_path / "maps"),
              "--output-dir", str(tmp_path / "maps_out"), "--workers", "0", "--device", "cpu"])


def test_overlays_show_each_block_map_beside_the_fused_one(cub, tmp_path):
    """--overlay-blocks: one panel per spatial-aware block, then the fused map's panel, which is the plain
    overlay; the blocks' panels differ from it (each its own map and box)."""
    root, checkpoint = cub
    common = ["--data-root", str(root), "--checkpoint", str(checkpoint), "--overlays", "2", "--no-tencrop",
              "--workers", "0", "--device", "cpu"]
    main(common + ["--output-dir", str(tmp_path / "plain")])
    main(common + ["--output-dir", str(tmp_path / "blocks"), "--overlay-blocks"])
    plain = sorted((tmp_path / "plain" / "overlays").rglob("*.png"))
    assert len(plain) == 2
    for path in plain:
        fused = np.asarray(Image.open(path))
        panels = np.asarray(Image.open(tmp_path / "blocks" / "overlays" / path.relative_to(tmp_path / "plain" /
                                                                                           "overlays")))
        width = fused.shape[1]
        assert panels.shape == (fused.shape[0], width * 4, 3)  # the nano model's 3 spatial-aware blocks + fused
        assert np.array_equal(panels[:, 3 * width:], fused)
        assert not np.array_equal(panels[:, :width], fused)


def test_overlays_of_images_sharing_a_name_keep_the_extension(tmp_path):
    """a.jpg and a.png of one folder: their overlays are a.jpg.png and a.png.png (one overwrote the other);
    the others keep the documented name without the extension."""
    root = tmp_path / "own"
    for path in ("train/001.Ringed_Disc/t.jpg", "test/001.Ringed_Disc/a.jpg", "test/001.Ringed_Disc/a.png",
                 "test/002.Checkered_Square/b.jpg"):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 30), (200, 10, 10)).save(root / path)
    (root / "train/002.Checkered_Square").mkdir()
    Image.new("RGB", (40, 30)).save(root / "train/002.Checkered_Square/u.jpg")
    (root / "boxes.csv").write_text("test/001.Ringed_Disc/a.jpg,1,1,20,20\ntest/001.Ringed_Disc/a.png,1,1,20,20\n"
                                    "test/002.Checkered_Square/b.jpg,1,1,20,20\n")
    checkpoint = save_nano_checkpoint(tmp_path / "nano.pth", num_classes=2)
    main(["--data-format", "folder", "--data-root", str(root), "--checkpoint", str(checkpoint), "--overlays", "all",
          "--no-tencrop", "--workers", "0", "--device", "cpu", "--output-dir", str(tmp_path / "out")])
    assert sorted(str(p.relative_to(tmp_path / "out/overlays")) for p in (tmp_path / "out/overlays").rglob("*.png")) \
        == ["test/001.Ringed_Disc/a.jpg.png", "test/001.Ringed_Disc/a.png.png", "test/002.Checkered_Square/b.png"]


@pytest.mark.parametrize("config", ["CUB.yaml", "demo.yaml"])
def test_training_config_writes_nothing_outside_the_output_dir(cub, tmp_path, monkeypatch, config):
    """A training config given to the evaluator (as the docs suggest) reads its data / evaluation / test keys;
    its overlays key is a count (demo.yaml: 100) and every file goes under --output-dir, none into the working
    directory (where a count read as a folder name once wrote '0/' and '100/')."""
    root, checkpoint = cub
    cwd, out = tmp_path / "cwd", tmp_path / "out"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    record = main(["--config", str(REPO_ROOT / "config" / config), "--data-root", str(root), "--checkpoint",
                   str(checkpoint), "--output-dir", str(out), "--workers", "0", "--device", "cpu"])
    assert list(cwd.iterdir()) == []
    assert record["threshold"] == 0.4 and (out / "metrics.json").is_file()
    overlays = list((out / "overlays").rglob("*.png")) if (out / "overlays").exists() else []
    assert len(overlays) == (12 if config == "demo.yaml" else 0)  # all 12 test images of the tiny demo


def test_an_earlier_evaluation_is_kept_until_overwrite_replaces_it(cub, tmp_path, capsys, keep_logging):
    _, checkpoint = cub
    root = tiny_demo(tmp_path / "demo")
    out = tmp_path / "out"
    common = ["--checkpoint", str(checkpoint), "--data-root", str(root), "--output-dir", str(out), "--workers", "0",
              "--device", "cpu", "--eval-batch-size", "2"]
    main([*common, "--eval-protocol", "both", "--overlays", "3"])
    before = {path: path.read_bytes() for path in out.rglob("*") if path.is_file() and path.name != "log.txt"}
    assert {p.name for p in before} >= {"metrics.json", "per_image.csv", "wsol_curves.json", "wsol_curves.png"}
    capsys.readouterr()
    err = _one_error_line(capsys, common)
    assert err == (f"error: {out} holds a previous evaluation (metrics.json, per_image.csv, wsol_curves.json, "
                   "wsol_curves.png): --overwrite to replace it, or choose another --output-dir")
    dataset = build_dataset("cub", root, "test", lambda image: image)
    with open(dataset.image_path(9), "r+b") as f:  # the 5th batch: the first 4 have drawn their overlays by then
        f.truncate(300)
    err = _one_error_line(capsys, [*common, "--overwrite", "--overlays", "all"])
    assert "1 bad image of 12" in err
    assert {path: path.read_bytes() for path in before} == before  # nothing replaced by a run that failed
    assert sorted(p.name for p in out.iterdir()) == sorted({p.relative_to(out).parts[0] for p in before} | {"log.txt"})
    Image.new("RGB", (64, 64)).save(dataset.image_path(9))
    record = main([*common, "--overwrite", "--eval-protocol", "sat", "--overlays", "1"])
    assert record["eval_protocol"] == "sat" and json.loads((out / "metrics.json").read_text()) == record
    assert not (out / "wsol_curves.json").exists() and not (out / "overlays.partial").exists()
    assert len(list((out / "overlays").rglob("*.png"))) == 1  # none of the earlier three left
    assert not [p for p in out.iterdir() if ".partial" in p.name]


def test_output_paths_that_cannot_be_written_are_refused_before_evaluating(cub, tmp_path, capsys, keep_logging):
    root, checkpoint = cub
    common = ["--checkpoint", str(checkpoint), "--data-root", str(root), "--workers", "0", "--device", "cpu"]
    (tmp_path / "file").write_text("x")
    train_run = tmp_path / "train_run"  # train.py's final test drew overlays there
    (train_run / "overlays").mkdir(parents=True)
    (train_run / "overlays" / "a.png").write_bytes(b"drawn by the final test")
    (train_run / "results.json").write_text("{}")
    cases = {("--output-dir", tmp_path / "file"): f"--output-dir {tmp_path / 'file'}: a file, or inside one; "
             "expected a folder",
             ("--output-dir", train_run, "--overlays", "2"): f"{train_run} holds an overlays/ folder that no "
             "evaluation wrote (train.py's final test draws one): choose another --output-dir for the overlays",
             ("--save-boxes", tmp_path): f"--save-boxes {tmp_path}: a folder; expected the path of a JSON file",
             ("--save-boxes", tmp_path / "file" / "b.json"): f"--save-boxes {tmp_path / 'file' / 'b.json'}: a parent "
             "of it is a file, not a folder",
             ("--save-maps", tmp_path / "file"): f"--save-maps {tmp_path / 'file'}: not a folder",
             # files that are not earlier COCO boxes are never replaced: the checkpoint, the job's own outputs
             ("--save-boxes", checkpoint): f"--save-boxes {checkpoint}: an existing file that is not a COCO detection "
             "file (never replaced); choose another path",
             ("--save-boxes", tmp_path / "out" / "metrics.json"): f"--save-boxes {tmp_path / 'out' / 'metrics.json'}: "
             "a file this job writes itself; choose another path",
             ("--save-boxes", tmp_path / "coco.json"): f"--save-boxes {tmp_path / 'coco.json'}: holds earlier COCO "
             "boxes: --overwrite to replace them, or choose another path"}
    (tmp_path / "coco.json").write_text('{"images": [], "annotations": [], "categories": []}')
    for flags, message in cases.items():
        flags = [*map(str, flags)] + ([] if "--output-dir" in flags else ["--output-dir", str(tmp_path / "out")])
        assert _one_error_line(capsys, [*common, *flags]) == f"error: {message}"
    assert not (tmp_path / "out").exists()
    main([*common, "--output-dir", str(train_run)])  # no overlays drawn: training's are left alone
    assert (train_run / "overlays").is_dir() and (train_run / "metrics.json").exists()
    # beside that evaluation, still training's: --overwrite --overlays replaced them
    assert _one_error_line(capsys, [*common, "--output-dir", str(train_run), "--overlays", "2", "--overwrite"]) == \
        f"error: {cases[('--output-dir', train_run, '--overlays', '2')]}"
    main([*common, "--output-dir", str(train_run), "--overwrite"])
    assert [p.name for p in (train_run / "overlays").iterdir()] == ["a.png"]
    main([*common, "--output-dir", str(tmp_path / "out"), "--save-boxes", str(tmp_path / "coco.json"), "--overwrite"])
    assert len(json.loads((tmp_path / "coco.json").read_text())["images"]) == 12  # the earlier boxes replaced


def test_an_evaluation_stopped_by_a_bad_image_names_every_bad_image(cub, tmp_path, capsys, keep_logging):
    _, checkpoint = cub
    root = tiny_demo(tmp_path / "demo")
    dataset = build_dataset("cub", root, "test", lambda image: image)
    bad = [dataset.image_path(index) for index in (2, 9)]
    for path in bad:  # cut short: the header opens, decoding fails
        with open(path, "r+b") as f:
            f.truncate(300)
    err = _one_error_line(capsys, ["--checkpoint", str(checkpoint), "--data-root", str(root), "--output-dir",
                                   str(tmp_path / "out"), "--workers", "0", "--device", "cpu"])
    assert err.startswith(f"error: test split: 2 bad images of 12, first {bad[0]} (") and f", {bad[1]} (" in err


def test_imagenet_subset_with_a_nameless_checkpoint_of_more_classes_is_refused(tmp_path):
    """An official ImageNet file (no class names) on val images of a few wnids without train/: the wnids' class
    indices (their places among all 1000) are unknown; it scored them as the model's first classes. With train/
    (every wnid folder: here the model's 3) the indices are known and the run goes on."""
    root = _write_imagenet(tmp_path / "ILSVRC2012")
    checkpoint = tmp_path / "official.pth.tar"
    ckpt = torch.load(save_nano_checkpoint(tmp_path / "nano.pth", num_classes=5), weights_only=True)
    torch.save({"model": {f"module.{k}": v for k, v in ckpt["model"].items()}, "best_thr": 0.0}, checkpoint)
    shutil.rmtree(root / "train")
    proc = run_script("evaluator_ImageNet.py", "--data-root", root, "--checkpoint", checkpoint, "--output-dir",
                      tmp_path / "out", "--workers", 0, "--device", "cpu")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        f"error: the data has 3 of ImageNet's wnids ({WNIDS[0]}, ...) and checkpoint {checkpoint} records no class "
        "names for its 5 classes: their indices cannot be told from a subset; give the data its train/ with every "
        "wnid folder (the class list), or evaluate the whole val set"), proc.stderr[-2000:]


@pytest.mark.parametrize("protocol, overlays, said", [
    ("wsol", 5, "--overlay-blocks not used: the wsol protocol's overlays show the fused map only"),
    ("sat", 0, "--overlay-blocks not used: no --overlays to draw"),
    ("sat", 5, None), ("both", "all", None)])
def test_overlay_blocks_that_draw_nothing_are_said(tmp_path, caplog, protocol, overlays, said):
    """--overlay-blocks drew no block panel with --eval-protocol wsol or without --overlays, and said nothing."""
    import argparse

    from evaluator import evaluate_settings
    from utils.distributed import DistInfo
    args = argparse.Namespace(overlays=overlays, overlay_blocks=True, thresholds=[], wsol_threshold=None,
                              threshold=0.4, box_processes=0, flags_given=frozenset())
    with caplog.at_level(logging.WARNING, logger="sat"):
        evaluate_settings(args, protocol, tmp_path, DistInfo())
    assert (said in caplog.text) if said else "--overlay-blocks" not in caplog.text


def test_an_evaluation_s_own_overlays_beside_a_checkpoints_folder_are_its_own(tmp_path):
    """A folder holding the user's checkpoints/ (evaluated into the folder of the checkpoint) was taken for a
    training run's: --overwrite --overlays was refused ('an overlays/ folder that no evaluation wrote', the one
    the last evaluation drew), and --overwrite alone kept the old overlays beside the new metrics."""
    from types import SimpleNamespace
    from evaluator import check_output_paths
    from utils.errors import ConfigError
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "best.pth").write_bytes(b"x")
    (tmp_path / "overlays").mkdir()
    (tmp_path / "metrics.json").write_text("{}")
    args = SimpleNamespace(overwrite=True, overlays=2, save_boxes=None, save_maps=None)
    assert check_output_paths(args, tmp_path) == ["metrics.json", "overlays"]
    (tmp_path / "metrics.jsonl").write_text("")  # a training run's folder: overlays/ is its final test's
    with pytest.raises(ConfigError, match="holds an overlays/ folder that no evaluation wrote"):
        check_output_paths(args, tmp_path)
    assert check_output_paths(SimpleNamespace(**{**vars(args), "overlays": 0}), tmp_path) == ["metrics.json"]


def test_the_last_line_says_where_the_overlays_and_saved_maps_are(cub, tmp_path, capsys, keep_logging):
    """--overlays and --save-maps wrote their folders without a word on the console: the last line names them."""
    root, checkpoint = cub
    out, maps = tmp_path / "out", tmp_path / "maps"
    main(["--data-root", str(root), "--checkpoint", str(checkpoint), "--output-dir", str(out), "--no-tencrop",
          "--overlays", "2", "--save-maps", str(maps), "--workers", "0", "--device", "cpu"])
    last = capsys.readouterr().out.rstrip().splitlines()[-1]
    assert last.endswith(f"; the overlays to {out / 'overlays'}; the maps to {maps}"), last
    assert (out / "overlays").is_dir() and (maps / "sat").is_dir()


def test_a_nameless_checkpoint_of_more_classes_is_evaluated_on_its_first_classes(cub, tmp_path, caplog, keep_logging):
    """A checkpoint that records no class names (the official releases) predicting more classes than the data
    has: labels are taken as its first classes, with a warning (the data's names are not wnids)."""
    root, _ = cub
    nameless = tmp_path / "nameless.pth"
    ckpt = torch.load(save_nano_checkpoint(tmp_path / "five.pth", num_classes=5), weights_only=True)
    del ckpt["class_names"]
    torch.save(ckpt, nameless)
    with caplog.at_level(logging.WARNING):
        record = main(["--checkpoint", str(nameless), "--data-root", str(root), "--output-dir", str(tmp_path / "out"),
                       "--workers", "0", "--device", "cpu"])
    assert "the data has 3 classes, the model predicts 5: evaluating on a class subset (labels taken as the " \
           "model's first 3 classes)" in caplog.text
    assert record["num_images"] == 12 and record["labels_matched_by"] == "index"


def test_save_boxes_with_the_wsol_protocol_alone_is_one_line(cub, tmp_path, capsys, keep_logging):
    root, checkpoint = cub
    err = _one_error_line(capsys, ["--checkpoint", str(checkpoint), "--data-root", str(root), "--eval-protocol",
                                   "wsol", "--save-boxes", str(tmp_path / "boxes.json"), "--output-dir",
                                   str(tmp_path / "out"), "--workers", "0", "--device", "cpu"])
    assert err == "error: --save-boxes writes the sat protocol's boxes: use --eval-protocol both (or sat / cls)"
    assert not (tmp_path / "boxes.json").exists() and not (tmp_path / "out" / "metrics.json").exists()


def test_no_data_root_evaluates_a_demo_checkpoint_on_the_demo_data(tmp_path, monkeypatch, caplog, keep_logging):
    """The documented use without --data-root: a checkpoint trained on the demo data is evaluated on it, the
    demo data written first where it is missing (here a small one, in place of data/demo_cub)."""
    import DataLoader.eval_loader as eval_loader
    import evaluator
    demo = tmp_path / "demo_cub"
    monkeypatch.setattr(eval_loader, "DEFAULT_DEMO_ROOT", demo)
    monkeypatch.setattr(evaluator, "DEFAULT_DEMO_ROOT", demo)
    monkeypatch.setattr(eval_loader, "make_demo_dataset", tiny_demo)
    checkpoint = torch.load(save_nano_checkpoint(tmp_path / "nano.pth"), weights_only=True)
    checkpoint["config"] = {"data_root": None}  # train.py without --data-root
    torch.save(checkpoint, tmp_path / "demo.pth")
    with caplog.at_level(logging.INFO):
        record = main(["--checkpoint", str(tmp_path / "demo.pth"), "--output-dir", str(tmp_path / "out"),
                       "--workers", "0", "--device", "cpu"])
    assert f"no --data-root: using the built-in demo data at {demo} (CUB layout)" in caplog.text
    assert record["num_images"] == 12 and (demo / "images.txt").is_file()


@pytest.mark.parametrize("name", ["metrics.json", "boxes.json"])
def test_a_full_disk_at_the_results_names_the_file(cub, tmp_path, capsys, keep_logging, monkeypatch, name):
    """The results written into a full disk: the error named the --output-dir folder ("could not write out: no
    space left on the device"), not the file (a full disk's OSError names none); nothing partial is left."""
    import errno
    import pathlib
    _, checkpoint = cub
    out, boxes = tmp_path / "out", tmp_path / "boxes.json"
    write_text = pathlib.Path.write_text

    def full(path, text, *args, **kwargs):
        if path.name.startswith(pathlib.Path(name).stem):
            write_text(path, text[:10], *args, **kwargs)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write_text(path, text, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", full)
    err = _one_error_line(capsys, ["--checkpoint", str(checkpoint), "--data-root", str(tiny_demo(tmp_path / "demo")),
                                   "--output-dir", str(out), "--workers", "0", "--device", "cpu",
                                   "--save-boxes", str(boxes)])
    assert err == f"error: could not write {out / name if name == 'metrics.json' else boxes}: no space left on the " \
                  "device"
    assert sorted(p.name for p in out.iterdir()) == ["log.txt"] and not boxes.exists()


def test_out_of_memory_is_one_line_in_log_txt_with_the_evaluator_s_flags(cub, tmp_path, capsys, keep_logging,
                                                                         monkeypatch):
    """The CPU allocator's real refusal: the terminal's line named '--amp' and 'a smaller batch' (the evaluator's
    flag is --eval-batch-size), and log.txt held the traceback instead of that line."""
    _, checkpoint = cub
    out = tmp_path / "out"
    monkeypatch.setattr("evaluator.evaluate", lambda *args, **kwargs: torch.empty(2 ** 50, dtype=torch.uint8))
    err = _one_error_line(capsys, ["--checkpoint", str(checkpoint), "--data-root", str(tiny_demo(tmp_path / "demo")),
                                   "--output-dir", str(out), "--workers", "0", "--device", "cpu"])
    assert err.startswith("error: out of memory (torch: [enforce fail at ") and \
        err.endswith("; less is needed with a smaller --eval-batch-size or --amp)")
    log = (out / "log.txt").read_text()
    assert err in log and "Traceback" not in log
