"""tools/predict.py: the crop-to-original box mapping, the script end to end on CPU, unreadable and repeated
images, the per-block maps."""
import csv
import json
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from utils.boxes import crop_box_to_original, gt_boxes_sat
from Model import build_model, model_spec
from evaluator import main as eval_main
from tools.predict import full_image_map, main as predict_main
from utils.checkpoint import save_checkpoint
from utils.errors import run_cli

from test_evaluation import ARCH, CLASS_NAMES, save_nano_checkpoint, tiny_demo
from test_evaluator_cli import run_script
from conftest import folder_locked_by, refused_for_lock


def test_crop_box_maps_back_to_original_pixels():
    # the whole 224 crop of a 512x256 image is its central 224/256 part
    np.testing.assert_allclose(crop_box_to_original([0, 0, 224, 224], (512, 256), 256, 224), [32, 16, 480, 240])
    original = np.array([[100.0, 50.0, 300.0, 200.0]])
    crop = gt_boxes_sat(original, (400, 300))  # truncates to whole crop pixels
    np.testing.assert_allclose(crop_box_to_original(crop[0], (400, 300), 256, 224), original[0], atol=400 / 256)
    np.testing.assert_allclose(crop_box_to_original([-20, 0, 300, 10], (100, 100), 256, 224), [0, 6.25, 100, 10.16],
                               atol=0.01)  # clipped to the image
    score = full_image_map(np.ones((64, 64)), 73, 64)
    assert score.shape == (73, 73) and score.sum() == 64 * 64 and score[4, 4] == 1 and score[3, 3] == 0


def test_predict_end_to_end(tmp_path):
    checkpoint = save_nano_checkpoint(tmp_path / "nano.pth", best_thr=0.35)
    rng = np.random.default_rng(0)
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    sizes = {folder / "a.jpg": (90, 60), folder / "sub" / "b.png": (50, 80), tmp_path / "single.jpg": (64, 64)}
    for path, (w, h) in sizes.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), np.uint8)).save(path)
    out = tmp_path / "out"
    proc = run_script("tools/predict.py", "--checkpoint", checkpoint, "--output-dir", out, "--device", "cpu",
                      folder, tmp_path / "single.jpg")  # the script, as users run it
    assert proc.returncode == 0, proc.stderr
    assert len([line for line in proc.stdout.splitlines() if " box [" in line]) == 3
    record = json.loads((out / "predictions.json").read_text())
    assert record["threshold"] == 0.35 and len(record["predictions"]) == 3
    for pred in record["predictions"]:
        w, h = sizes[type(folder)(pred["image"])]
        x0, y0, x1, y1 = pred["box"]
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h and pred["image_size"] == [w, h]
        assert pred["class_name"] in ("001.Ringed_Disc", "002.Checkered_Square", "003.Striped_Triangle")
        assert len(pred["top5"]) == 3 and pred["top5"][0]["score"] == pred["score"]
        assert Image.open(pred["overlay"]).size == (w, h)



def test_bad_path_is_one_error_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(predict_main, ["--checkpoint", "unused.pth", str(tmp_path / "missing.jpg"), "--output-dir",
                               str(tmp_path / "out")])  # not the default output/predict: a user's may be there
    assert exit_info.value.code == 2
    expected = f"error: {tmp_path / 'missing.jpg'}: not found (expected an image file or a folder of images)\n"
    assert capsys.readouterr().err == expected
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("no image here")
    with pytest.raises(SystemExit):
        run_cli(predict_main, ["--checkpoint", "unused.pth", str(tmp_path / "notes"), "--output-dir",
                               str(tmp_path / "out")])
    assert capsys.readouterr().err == f"error: {tmp_path / 'notes'}: no image files in this folder\n"
    assert not (tmp_path / "out").exists()


def test_threshold_outside_unit_interval_is_rejected(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(predict_main, ["--checkpoint", "unused.pth", "--threshold", "1.5", str(tmp_path)])
    assert exit_info.value.code == 2  # one line, no usage
    assert capsys.readouterr().err == "error: --threshold: expected a number in [0, 1], got '1.5'\n"
    with pytest.raises(SystemExit):  # as the scripts say it (it was argparse's "invalid choice: 'mps' (choose ...")
        run_cli(predict_main, ["--checkpoint", "unused.pth", "--device", "mps", str(tmp_path)])
    assert capsys.readouterr().err == "error: --device: expected one of auto, cuda, cpu, got 'mps'\n"


def test_a_non_square_checkpoint_is_refused_in_one_line(tmp_path, capsys):
    # its model_spec recorded one side (img_size 64): the rebuild failed as "does not fit the model (1 keys
    # differ, first: pos_embed ..."; rebuilt as (64, 96), the square crop would end in an AssertionError traceback
    model = build_model(ARCH, num_classes=2, img_size=(64, 96))
    path = tmp_path / "wide.pth"
    save_checkpoint(dict(model_spec(model, ARCH), model=model.state_dict()), path)
    Image.new("RGB", (40, 30)).save(tmp_path / "photo.png")
    for script, flags in ((predict_main, [str(tmp_path / "photo.png"), "--output-dir", str(tmp_path / "out")]),
                          (eval_main, ["--data-root", str(tmp_path), "--output-dir", str(tmp_path / "eval")])):
        with pytest.raises(SystemExit) as exit_info:
            run_cli(script, ["--checkpoint", str(path), "--device", "cpu", *flags])
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.splitlines()[-1] == (
            f"error: checkpoint {path} takes 64 x 96 inputs (height x width); the evaluators and tools/predict.py "
            "take square crops only: use the model in Python (docs/evaluation.md) or tools/export_onnx.py")
    assert not (tmp_path / "out").exists()  # (the evaluator keeps its log.txt of the error)


def test_whole_crop_maps_back_on_a_wide_image():
    # 400x100 image: resized to 256x256, the 224 crop starts at 16; x scale 400/256, y scale 100/256
    np.testing.assert_allclose(crop_box_to_original([0, 0, 224, 224], (400, 100), 256, 224), [25, 6.25, 375, 93.75])
    np.testing.assert_allclose(crop_box_to_original([100, 50, 120, 60], (400, 100), 256, 224),
                               [116 * 400 / 256, 66 * 100 / 256, 136 * 400 / 256, 76 * 100 / 256])


def test_coco_output_matches_the_evaluator(tmp_path):
    root = tiny_demo(tmp_path / "demo")
    checkpoint = save_nano_checkpoint(tmp_path / "nano.pth")
    wide = tmp_path / "wide.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 400, 3), np.uint8)).save(wide)
    eval_main(["--data-root", str(root), "--checkpoint", str(checkpoint), "--no-tencrop", "--threshold", "0.35",
               "--eval-batch-size", "12", "--workers", "0", "--device", "cpu", "--output-dir", str(tmp_path / "eval")])
    with open(tmp_path / "eval" / "per_image.csv", newline="") as f:
        rows = {row["image_id"]: row for row in csv.DictReader(f)}
    images = [root / "images" / image_id for image_id in rows]
    coco_path = tmp_path / "pseudo.json"
    predict_main(["--checkpoint", str(checkpoint), "--threshold", "0.35", "--eval-batch-size", "12", "--device", "cpu",
                  "--output-dir", str(tmp_path / "pred"), "--save-boxes", str(coco_path), *map(str, images), str(wide)])
    coco = json.loads(coco_path.read_text())
    # schema: what detection libraries (pycocotools, detectron2, mmdet) read
    assert set(coco) == {"images", "annotations", "categories"}
    assert [c["name"] for c in coco["categories"]] == CLASS_NAMES and [c["id"] for c in coco["categories"]] == [1, 2, 3]
    image_ids = {image["id"] for image in coco["images"]}
    assert len(image_ids) == len(coco["images"]) == 13
    for image in coco["images"]:
        assert set(image) == {"id", "file_name", "width", "height"} and Path(image["file_name"]).is_file()
    for ann in coco["annotations"]:
        assert {"id", "image_id", "category_id", "bbox", "score", "area", "iscrowd"} <= set(ann)
        assert ann["image_id"] in image_ids and ann["category_id"] in (1, 2, 3) and 0 <= ann["score"] <= 1
        x, y, w, h = ann["bbox"]
        assert w > 0 and h > 0 and ann["area"] == pytest.approx(w * h)
    by_file = {image["file_name"]: image for image in coco["images"]}
    anns = {ann["image_id"]: ann for ann in coco["annotations"]}
    wide_image = by_file[str(wide)]
    assert (wide_image["width"], wide_image["height"]) == (400, 60)
    x, y, w, h = anns[wide_image["id"]]["bbox"]
    assert 0 <= x and x + w <= 400 and 0 <= y and y + h <= 60
    hits = []
    for image_id, row in rows.items():  # the same boxes as the evaluator's, in original pixels
        x, y, w, h = anns[by_file[str(root / "images" / image_id)]["id"]]["bbox"]
        assert [x, y, x + w, y + h] == pytest.approx([float(v) for v in row["box_original"].split()], abs=1e-9)
        hits.append(int(row["gt_known"]))
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert 100 * sum(hits) / len(hits) == pytest.approx(metrics["gt_known_loc"])


def write_images(folder, sizes, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name, (w, h) in sizes.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), np.uint8)).save(folder / name)
    return folder


def png_header(width, height):
    """A PNG holding only its header: RGB, ``width`` x ``height``."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IEND", b""))


def test_unreadable_images_are_skipped_and_a_file_given_twice_is_predicted_once(tmp_path, capsys):
    checkpoint = save_nano_checkpoint(tmp_path / "nano.pth")
    folder = write_images(tmp_path / "photos", {"good.jpg": (40, 30), "cut.png": (64, 64)})
    data = (folder / "cut.png").read_bytes()
    (folder / "cut.png").write_bytes(data[:len(data) // 2])  # truncated
    (folder / "broken.jpg").write_bytes(b"not an image")
    (folder / "huge.png").write_bytes(png_header(100_000, 100_000))  # PIL's DecompressionBombError, no OSError
    (folder / "sub").mkdir()
    again = folder / "sub" / ".." / "good.jpg"  # the same file, spelt otherwise
    record = predict_main(["--checkpoint", str(checkpoint), "--device", "cpu", "--output-dir", str(tmp_path / "out"),
                           str(folder), str(folder / "good.jpg"), str(again)])
    err = capsys.readouterr().err.splitlines()
    assert [pred["image"] for pred in record["predictions"]] == [str(folder / "good.jpg")]
    unreadable = ("broken.jpg", "cut.png", "huge.png")
    assert [item["image"] for item in record["skipped"]] == [str(folder / name) for name in unreadable]
    assert len(err) == 4 and err[-1] == "3 of 4 images skipped: unreadable (named above)"
    for line, name in zip(err, unreadable):
        assert line.startswith(f"warning: {folder / name}: not a readable image (") and line.endswith("; skipped")
        assert line.count(name) == 1  # PIL's message named the file a second time
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good.png", "predictions.json"]
    assert json.loads((tmp_path / "out" / "predictions.json").read_text()) == record


def test_no_readable_image_is_an_error(tmp_path, capsys):
    """... and leaves nothing new behind: the --output-dir (and --save-boxes folder) it made are removed, a folder
    that was there stays (the failed run left an empty out/deeper/)."""
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (tmp_path / "kept").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(predict_main, ["--checkpoint", str(save_nano_checkpoint(tmp_path / "nano.pth")), "--device", "cpu",
                               "--output-dir", str(tmp_path / "out" / "deeper"), str(tmp_path / "broken.jpg"),
                               "--save-boxes", str(tmp_path / "kept" / "coco" / "boxes.json")])
    err = capsys.readouterr().err.splitlines()
    assert exit_info.value.code == 2 and err[-1] == "error: none of the 1 images could be read"
    assert err[0].startswith(f"warning: {tmp_path / 'broken.jpg'}: not a readable image (")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.jpg", "kept", "nano.pth"]
    assert not any((tmp_path / "kept").iterdir())


def test_a_model_giving_nan_scores_is_one_error_line_and_writes_no_nan(tmp_path, capsys):
    """finite weights whose scores overflow: predictions.json held "score": NaN (refused by strict JSON parsers),
    where the evaluators stop with one line naming the checkpoint"""
    path = save_nano_checkpoint(tmp_path / "nano.pth")
    state = torch.load(path, weights_only=False)
    state["model"]["head.weight"] = state["model"]["head.weight"] * 3e38  # finite, the logits are not
    save_checkpoint({key: value for key, value in state.items() if key != "format_version"}, path)
    Image.new("RGB", (40, 30), (90, 120, 30)).save(tmp_path / "photo.png")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(predict_main, ["--checkpoint", str(path), "--device", "cpu", "--output-dir", str(tmp_path / "out"),
                               str(tmp_path / "photo.png")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: checkpoint {path}: the model outputs NaN/Inf scores or maps for 1 image(s) of a batch, first "
        f"{tmp_path / 'photo.png'}")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("num_spatial_blocks", [3, 1])
def test_blocks_draws_each_spatial_aware_block_beside_the_fused_map(tmp_path, num_spatial_blocks):
    torch.manual_seed(0)
    model = build_model(ARCH, num_classes=3, img_size=64, num_spatial_blocks=num_spatial_blocks)
    checkpoint = tmp_path / "nano.pth"
    save_checkpoint({"model": model.state_dict(), **model_spec(model, ARCH, CLASS_NAMES,
                                                              num_spatial_blocks=num_spatial_blocks)}, checkpoint)
    folder = write_images(tmp_path / "photos", {"wide.jpg": (90, 60)})
    record = predict_main(["--checkpoint", str(checkpoint), "--device", "cpu", "--output-dir", str(tmp_path / "out"),
                           "--overlay-blocks", str(folder)])
    [pred] = record["predictions"]
    blocks = [str(k) for k in range(7 - num_spatial_blocks, 7)]  # the nano model's last blocks of 6
    assert list(pred["block_boxes"]) == blocks
    panels = np.asarray(Image.open(pred["blocks_overlay"]))
    assert Path(pred["blocks_overlay"]).name == "wide_blocks.png" and panels.shape == (60, 90 * (len(blocks) + 1), 3)
    fused, overlay = panels[:, -90:], np.asarray(Image.open(pred["overlay"]))
    below_caption = slice(20, None)
    assert np.array_equal(fused[below_caption], overlay[below_caption])  # the fused panel is the overlay
    if num_spatial_blocks == 1:  # one block: its map is the fused map
        assert pred["block_boxes"]["6"] == pred["box"]
        assert np.array_equal(panels[below_caption, :90], fused[below_caption])
    else:
        assert not np.array_equal(panels[below_caption, :90], panels[below_caption, 90:180])


def test_earlier_predictions_are_refused_then_replaced_and_inputs_never_overwritten(tmp_path, capsys):
    checkpoint = save_nano_checkpoint(tmp_path / "nano.pth")
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(1)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), np.uint8)).save(photos / name)
    originals = {p.name: p.read_bytes() for p in photos.iterdir()}
    common = ["--checkpoint", str(checkpoint), "--device", "cpu", "--output-dir", str(photos)]
    first = predict_main([*common, str(photos)])  # overlays into the input folder: new names, inputs kept
    assert [Path(p["overlay"]).name for p in first["predictions"]] == ["a_2.png", "b_2.png"]
    assert all((photos / name).read_bytes() == data for name, data in originals.items())
    with pytest.raises(SystemExit) as exit_info:
        run_cli(predict_main, [*common, str(photos / "a.png")])
    assert exit_info.value.code == 2 and capsys.readouterr().err == (
        f"error: {photos} holds a previous prediction run (predictions.json): --overwrite to replace it, or choose "
        "another --output-dir\n")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(SystemExit):  # a run that fails leaves the earlier predictions whole
        run_cli(predict_main, [*common, "--overwrite", str(tmp_path / "broken.png")])
    assert sorted(p.name for p in photos.iterdir()) == ["a.png", "a_2.png", "b.png", "b_2.png", "predictions.json"]
    time.sleep(1.1)
    mine = Image.fromarray(rng.integers(0, 255, (40, 40, 3), np.uint8))
    mine.save(photos / "b_2.png")  # the user's own file, saved under an earlier overlay's name
    second = predict_main([*common, "--overwrite", str(photos)])  # the earlier overlays are not inputs
    assert [Path(p["image"]).name for p in second["predictions"]] == ["a.png", "b.png", "b_2.png"]
    assert [Path(p["overlay"]).name for p in second["predictions"]] == ["a_2.png", "b_3.png", "b_2_2.png"]
    assert sorted(p.name for p in photos.iterdir()) == ["a.png", "a_2.png", "b.png", "b_2.png", "b_2_2.png",
                                                         "b_3.png", "predictions.json"]
    assert np.array_equal(np.asarray(Image.open(photos / "b_2.png")), np.asarray(mine))
    assert all((photos / name).read_bytes() == data for name, data in originals.items())


def test_predictions_into_a_folder_another_job_writes_are_refused(tmp_path, capsys):
    checkpoint = save_nano_checkpoint(tmp_path / "nano.pth")
    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    out = tmp_path / "out"
    with folder_locked_by(out, "tools/predict.py") as holder:
        with pytest.raises(SystemExit) as exit_info:
            run_cli(predict_main, ["--checkpoint", str(checkpoint), "--output-dir", str(out), "--device", "cpu",
                                   str(tmp_path / "a.png")])
        assert exit_info.value.code == 2
        assert refused_for_lock(capsys.readouterr().err.rstrip("\n"), out, "tools/predict.py", holder)
        assert [path.name for path in out.iterdir()] == [".lock"]


def test_a_coco_path_that_cannot_be_written_is_refused_before_predicting(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(predict_main, ["--checkpoint", "unused.pth", "--save-boxes", str(tmp_path / "file" / "boxes.json"),
                               "--output-dir", str(tmp_path / "out"), str(tmp_path / "file")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"error: --save-boxes {tmp_path / 'file' / 'boxes.json'}: a parent of it is a " \
                                      "file, not a folder\n"


def test_save_boxes_never_replaces_an_input_or_the_predictions(tmp_path, capsys):
    """--save-boxes naming an input image, the checkpoint or predictions.json is refused before anything is read
    (it used to be replaced by the COCO file); an earlier COCO file needs --overwrite."""
    image = tmp_path / "a.jpg"
    Image.new("RGB", (20, 20)).save(image)
    (tmp_path / "boxes.json").write_text('{"images": [], "annotations": [], "categories": []}')
    cases = {image: "an existing file that is not a COCO detection file (never replaced); choose another path",
             tmp_path / "out" / "predictions.json": "a file this job writes itself; choose another path",
             tmp_path / "boxes.json": "holds earlier COCO boxes: --overwrite to replace them, or choose another path"}
    for path, message in cases.items():
        with pytest.raises(SystemExit):
            run_cli(predict_main, ["--checkpoint", "unused.pth", "--output-dir", str(tmp_path / "out"),
                                   "--save-boxes", str(path), str(image)])
        assert capsys.readouterr().err == f"error: --save-boxes {path}: {message}\n"
    assert Image.open(image).size == (20, 20) and not (tmp_path / "out").exists()


def test_an_overlay_never_takes_the_save_boxes_name(tmp_path):
    """--save-boxes out/a.png with an input a.jpg: the overlay is a_2.png (it was a.png, then replaced by the
    COCO file, and predictions.json named a JSON file as the overlay)."""
    checkpoint = save_nano_checkpoint(tmp_path / "nano.pth", best_thr=0.4)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), np.uint8)).save(tmp_path / "a.jpg")
    out = tmp_path / "out"
    record = predict_main(["--checkpoint", str(checkpoint), "--output-dir", str(out), "--device", "cpu",
                           "--save-boxes", str(out / "a.png"), str(tmp_path / "a.jpg")])
    assert Path(record["predictions"][0]["overlay"]).name == "a_2.png"
    assert Image.open(out / "a_2.png").size == (60, 40)
    assert json.loads((out / "a.png").read_text())["annotations"][0]["bbox"]


def test_an_input_with_a_long_file_name_gets_an_overlay_name_that_fits(tmp_path):
    """A photo named with 240 bytes (a name file systems take) stopped the run: its overlay, written as
    <stem>.partial.png until the run was complete, was a name too long ('File name too long')."""
    checkpoint = save_nano_checkpoint(tmp_path / "nano.pth", best_thr=0.4)
    photo = tmp_path / ("é" * 118 + ".jpg")  # 240 bytes of UTF-8
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), np.uint8)).save(photo)
    out = tmp_path / "out"
    record = predict_main(["--checkpoint", str(checkpoint), "--output-dir", str(out), "--device", "cpu",
                           "--overlay-blocks", str(photo)])
    pred = record["predictions"][0]
    assert Path(pred["overlay"]).name == "é" * 100 + ".png" and Path(pred["overlay"]).is_file()
    assert Path(pred["blocks_overlay"]).name == "é" * 100 + "_blocks.png" and Path(pred["blocks_overlay"]).is_file()


@pytest.mark.parametrize("old, new", [("--coco=x.json", "--save-boxes"), ("--blocks", "--overlay-blocks"),
                                      ("--batch-size", "--eval-batch-size")])
def test_the_earlier_flag_names_say_their_new_names(tmp_path, capsys, old, new):
    """The flags are named as the evaluators name the same things; the earlier names say so in one line."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(predict_main, ["--checkpoint", "unused.pth", old, "4", str(tmp_path)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"error: {old.split('=')[0]} was renamed: use {new} (as the evaluators call it)\n"


@pytest.mark.usefixtures("sigterm_not_handled_fails")
@pytest.mark.parametrize("stop, status", [("SIGTERM", 143), ("Ctrl-C", 130)])
def test_stopped_predictions_keep_the_earlier_ones_and_say_so(tmp_path, monkeypatch, caplog, stop, status):
    """SIGTERM or Ctrl-C once every image is predicted: the earlier predictions as they were, no partial file and
    one line (SIGTERM ended it silently and left the .partial.png overlays, Ctrl-C gave a traceback); partial
    files a killed run left are removed by the next run."""
    import os
    import signal
    import tools.predict as tool
    checkpoint, out = save_nano_checkpoint(tmp_path / "nano.pth"), tmp_path / "out"
    image = tmp_path / "a.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), np.uint8)).save(image)
    flags = ["--checkpoint", str(checkpoint), "--output-dir", str(out), "--device", "cpu", str(image)]
    predict_main(flags)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.name != ".lock"}
    original = tool.predict

    def stopped(*args):
        original(*args)  # every overlay staged
        if stop == "SIGTERM":
            os.kill(os.getpid(), signal.SIGTERM)
        raise KeyboardInterrupt

    monkeypatch.setattr(tool, "predict", stopped)
    with pytest.raises(SystemExit) as exit_info:
        predict_main([*flags, "--overwrite"])
    assert exit_info.value.code == status
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != ".lock"} == before
    assert f"stopped: no predictions written (the outputs in {out} are as they were); " \
           f"{'stopped by SIGTERM' if stop == 'SIGTERM' else 'interrupted'}" in caplog.text
    monkeypatch.undo()
    (out / "a.partial.png").write_bytes(b"left by a killed run")
    predict_main([*flags, "--overwrite"])
    assert sorted(p.name for p in out.iterdir() if p.name != ".lock") == ["a.png", "predictions.json"]


def test_photos_are_turned_as_their_exif_orientation_says(tmp_path):
    """A phone photo stored 60 x 40 with orientation 6 (rotate 90 degrees clockwise) is shown 40 x 60: its size,
    box and overlay are of the turned image (they were of the stored one: the overlay came out sideways)."""
    photo = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), np.uint8)).save(photo, exif=exif)
    record = predict_main(["--checkpoint", str(save_nano_checkpoint(tmp_path / "nano.pth")), "--output-dir",
                           str(tmp_path / "out"), "--device", "cpu", str(photo)])
    pred = record["predictions"][0]
    assert pred["image_size"] == [40, 60]
    x0, y0, x1, y1 = pred["box"]
    assert 0 <= x0 <= x1 <= 40 and 0 <= y0 <= y1 <= 60
    assert Image.open(pred["overlay"]).size[1] > Image.open(pred["overlay"]).size[0]  # portrait, as shown


def test_a_checkpoint_without_a_threshold_gets_the_evaluators_default_said(tmp_path, capsys):
    """Official ImageNet files record best_thr 0: a 1000-class model is boxed at evaluator_ImageNet.py's 0.3 (it
    was 0.4, silently), others at evaluator.py's 0.4."""
    image = tmp_path / "a.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), np.uint8)).save(image)
    for classes, threshold, script in ((1000, 0.3, "evaluator_ImageNet.py"), (3, 0.4, "evaluator.py")):
        checkpoint = save_nano_checkpoint(tmp_path / f"c{classes}.pth", num_classes=classes, best_thr=0)
        record = predict_main(["--checkpoint", str(checkpoint), "--output-dir", str(tmp_path / f"o{classes}"),
                               "--device", "cpu", str(image)])
        assert record["threshold"] == threshold
        assert f"{checkpoint} records no map threshold (best_thr 0): using {threshold}, {script}'s default" in \
            capsys.readouterr().err


def test_an_imagenet_run_without_a_threshold_gets_the_imagenet_default(tmp_path, capsys):
    """A train_ImageNet.py checkpoint on a class subset that records no best_thr (best.pth selected by the wsol
    protocol) is boxed at evaluator_ImageNet.py's 0.3, as its run was tested, not at evaluator.py's 0.4."""
    image = tmp_path / "a.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), np.uint8)).save(image)
    checkpoint = save_nano_checkpoint(tmp_path / "inet.pth", num_classes=3, best_thr=None)
    meta = torch.load(checkpoint, weights_only=False)
    save_checkpoint({**meta, "config": {"data_format": "imagenet", "threshold": 0.3}}, checkpoint)
    record = predict_main(["--checkpoint", str(checkpoint), "--output-dir", str(tmp_path / "o"), "--device", "cpu",
                           str(image)])
    assert record["threshold"] == 0.3
    assert "using 0.3, evaluator_ImageNet.py's default" in capsys.readouterr().err


def test_a_full_disk_at_predictions_json_names_the_file(tmp_path, capsys, monkeypatch):
    """predictions.json into a full disk: the error named the --output-dir folder, not the file (a full disk's
    OSError names none); nothing is left of the run."""
    import errno
    import os
    checkpoint = save_nano_checkpoint(tmp_path / "nano.pth")
    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    out = tmp_path / "out"
    write_text = Path.write_text

    def full(path, text, *args, **kwargs):
        if path.name.startswith("predictions"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write_text(path, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(predict_main, ["--checkpoint", str(checkpoint), "--output-dir", str(out), "--device", "cpu",
                               str(tmp_path / "a.png")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err == f"error: could not write {out / 'predictions.json'}: no space left on the device\n"
    assert not out.exists()
