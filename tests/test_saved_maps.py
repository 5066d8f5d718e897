"""evaluator.py --maps: saved maps scored as a checkpoint's outputs are. The round trip checkpoint ->
--save-maps -> --maps gives the checkpoint's numbers under both protocols; wsolevaluation-format maps give
wsolevaluation's own numbers (tests/fixtures/wsolevaluation); whole-image maps go through each protocol's
view; bad maps and predictions are one error line."""
import csv
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torchvision import transforms as T

from DataLoader import build_dataset
from evaluator import main
from tools.compare import main as compare
from tools.make_baseline_maps import main as make_baseline_maps
from utils.errors import ConfigError, run_cli
from utils.saved_maps import centre_view_map, check_room_for_maps, saved_maps_bytes

from test_evaluation import save_nano_checkpoint, tiny_demo
from test_evaluator_cli import _one_error_line, _write_imagenet, keep_logging  # noqa: F401 (a fixture)
from test_wsolevaluation_reference import EXPECTED, FIXTURES, make_maps, write_split_images

CPU = ["--workers", "0", "--device", "cpu"]
# metrics.json keys that name what was evaluated rather than measure it
SETTINGS = ("checkpoint", "arch", "num_spatial_blocks", "labels_matched_by", "precision", "compile", "gpu_decode",
            "maps", "predictions", "tencrop", "views", "training_config")
# the wsol view's own classification: a forward that saved maps do not have (their classes are reported once)
WSOL_VIEW_CLASSES = ("wsol_top1_cls", "wsol_top5_cls")


@pytest.fixture(scope="module")
def cub(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cub")
    return tiny_demo(tmp / "demo"), save_nano_checkpoint(tmp / "nano.pth")


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("protocol", ["both", "wsol"])
def test_round_trip_gives_the_checkpoint_numbers(cub, tmp_path, protocol):
    root, checkpoint = cub
    common = ["--data-root", str(root), "--eval-protocol", protocol, "--threshold", "0.7", "--thresholds", "0.6",
              "0.7", "0.8", "--overlays", "3", "--eval-batch-size", "5", *CPU]
    direct = main(["--checkpoint", str(checkpoint), "--save-maps", str(tmp_path / "maps"),
                   "--output-dir", str(tmp_path / "direct"), *common])
    # the room checked before: the files as written, in 4 KiB blocks (the nano model's 4 x 4 grid at 64 px)
    written = sum(-(-path.stat().st_size // 4096) * 4096 for path in (tmp_path / "maps").rglob("*.npy"))
    assert written == saved_maps_bytes(direct["num_images"], protocol, grid=4) > 0
    saved = main(["--maps", str(tmp_path / "maps"), "--predictions", str(tmp_path / "direct" / "per_image.csv"),
                  "--output-dir", str(tmp_path / "saved"), *common])
    assert {k: v for k, v in saved.items() if k not in SETTINGS} == \
        {k: v for k, v in direct.items() if k not in SETTINGS + WSOL_VIEW_CLASSES}
    if protocol == "both":  # numbers that are not all zeros, on both protocols
        assert direct["top1_loc"] > 0 and direct["gt_known_loc"] > 0 and direct["maxboxacc"] > 0
        assert saved["img_size"] == 64 and saved["resize_size"] == 73  # the centre view of the saved maps
    for name in ("metrics.json", "wsol_curves.json"):
        on_disk = [json.loads((tmp_path / run / name).read_text()) for run in ("direct", "saved")]
        assert [{k: v for k, v in d.items() if k not in SETTINGS + WSOL_VIEW_CLASSES} for d in on_disk[:1]] == \
            [{k: v for k, v in d.items() if k not in SETTINGS} for d in on_disk[1:]]
    direct_rows, saved_rows = (_rows(tmp_path / run / "per_image.csv") for run in ("direct", "saved"))
    assert [{k: v for k, v in row.items() if k != "score"} for row in saved_rows] == \
        [{k: v for k, v in row.items() if k != "score"} for row in direct_rows]
    assert all(row["score"] == "" for row in saved_rows)  # saved maps' classes come without probabilities
    overlays = sorted(p.relative_to(tmp_path / "direct") for p in (tmp_path / "direct" / "overlays").rglob("*.png"))
    assert len(overlays) == 3 and all((tmp_path / "saved" / path).is_file() for path in overlays)
    for path in overlays if protocol == "both" else ():  # the centre view's pixels, the same map, box and caption
        assert np.array_equal(np.asarray(Image.open(tmp_path / "direct" / path)),
                              np.asarray(Image.open(tmp_path / "saved" / path)))


def test_top1_predictions_give_the_top1_metrics_of_top5_ones_and_no_top5(cub, tmp_path):
    # a method that gives its top-1 class alone could not be scored (five classes were required per image)
    root, _ = cub
    make_baseline_maps([str(tmp_path / "maps"), "--data-root", str(root), "--size", "8"])
    common = ["--maps", str(tmp_path / "maps"), "--data-root", str(root), "--eval-protocol", "both", *CPU]
    main([*common, "--output-dir", str(tmp_path / "none")])
    labels = {row["image_id"]: int(row["label"]) for row in _rows(tmp_path / "none" / "per_image.csv")}
    best = {image_id: (label + k % 2) % 3 for k, (image_id, label) in enumerate(labels.items())}  # half right
    (tmp_path / "top5.csv").write_text("image_id,top5\n" + "".join(
        f"{i},{c} {(c + 1) % 3} {(c + 2) % 3}\n" for i, c in best.items()))
    (tmp_path / "top1.csv").write_text("image_id,top1\n" + "".join(f"{i},{c}\n" for i, c in best.items()))
    top5, top1 = (main([*common, "--predictions", str(tmp_path / f"{name}.csv"), "--output-dir", str(tmp_path / name)])
                  for name in ("top5", "top1"))
    right = sum(best[i] == label for i, label in labels.items())
    assert top1["top1_cls"] == top5["top1_cls"] == pytest.approx(100 * right / len(labels)) and 0 < right < len(labels)
    assert top1["top1_loc"] == top5["top1_loc"] and top1["gt_known_loc"] == top5["gt_known_loc"]
    assert "top5_cls" not in top1 and "top5_loc" not in top1 and top5["top5_cls"] == 100  # 3 classes: all in top 5
    assert [row["top5"] for row in _rows(tmp_path / "top1" / "per_image.csv")] == [str(c) for c in best.values()]
    # that per_image.csv (a top5 column of one class each) is such predictions, as an evaluator's per_image.csv is
    again = main([*common, "--predictions", str(tmp_path / "top1" / "per_image.csv"), "--output-dir",
                  str(tmp_path / "again")])
    assert {k: v for k, v in again.items() if k != "predictions"} == {k: v for k, v in top1.items()
                                                                       if k != "predictions"}


def _wsol_split(tmp_path, dataset, kind, transform=None):
    """(data root with the split's images as empty files, masks copied; flat maps folder) of a fixture set."""
    images = tmp_path / "images"
    write_split_images(dataset, images)
    for image_id, loc_map in make_maps(dataset)[kind].items():
        path = tmp_path / "maps" / f"{image_id}.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, loc_map if transform is None else transform(loc_map))
    return ["--data-format", "wsol", "--data-root", str(images), "--metadata-root",
            str(FIXTURES / "metadata" / dataset), "--maps", str(tmp_path / "maps"), "--output-dir",
            str(tmp_path / "out"), *CPU]


@pytest.mark.parametrize("kind", ["scoremaps", "cams"])
def test_wsolevaluation_format_maps_give_its_numbers(tmp_path, kind):
    """224x224 score maps are scored as they are, raw maps of other sizes resized and normalised as its
    inference.py does; the last raw map is constant (scored once allowed)."""
    expected = EXPECTED["CUB"][kind]
    allow = ["--allow-constant-maps"] * (kind == "cams")
    record = main(_wsol_split(tmp_path / "cub", "CUB", kind) + ["--eval-protocol", "wsol", *allow])
    assert record["eval_protocol"] == "wsol" and record["num_images"] == 12
    assert record["maxboxacc"] == expected["maxboxacc"] and record["maxboxaccv2"] == expected["maxboxaccv2"]
    assert {str(k): v for k, v in record["maxboxaccv2_per_iou"].items()} == \
        expected["all_contours"]["max_box_acc_per_iou"]
    assert "top1_cls" not in record and "top1_loc" not in record  # no predictions: not reported, not zeros
    expected = EXPECTED["OpenImages"][kind]
    record = main(_wsol_split(tmp_path / "oi", "OpenImages", kind) + allow)
    assert record["pxap"] == expected["pxap"] and "maxboxacc" not in record


@pytest.mark.usefixtures("keep_logging")
def test_a_mask_of_another_aspect_ratio_is_counted_and_warned(tmp_path, caplog):
    """Masks are stretched to 224 x 224 as their images are: one of another aspect ratio than its image lies over
    other pixels, which nothing said (the fixture's masks are their images' sizes: not counted)."""
    argv = _wsol_split(tmp_path, "OpenImages", "scoremaps")
    assert "skewed_masks" not in main(argv) and "aspect ratio" not in caplog.text
    mask = tmp_path / "images" / "test/02wxyz/2c3d4e5f60718293_m02wxyz_00.png"  # of a 120 x 40 image
    Image.open(mask).resize((40, 40)).save(mask)
    record = main([*argv, "--overwrite"])
    assert record["skewed_masks"] == 1
    assert "1 of the 5 images have a mask of another aspect ratio than the image: masks are resized to 224 x 224 " \
           "as their images are" in caplog.text


@pytest.mark.usefixtures("keep_logging")
def test_score_maps_in_part_of_the_unit_range_are_not_normalised_again(tmp_path, caplog):
    """wsolevaluation's evaluation.py scores a 224x224 map in [0, 1] unchanged: maps squeezed into [0.2, 0.8]
    give its PxAP of 44.298 (min-max normalising them again would give back the 44.350 of the originals).
    --wsol-threshold on mask data reports the pixel IoU at that map threshold (a piou_threshold chosen on val,
    applied to test); it was warned as not used, with no way to apply val's threshold."""
    record = main(_wsol_split(tmp_path, "OpenImages", "scoremaps", lambda m: 0.2 + 0.6 * m) +
                  ["--wsol-threshold", "0.5"])
    assert "--wsol-threshold not used" not in caplog.text
    curve = json.loads((tmp_path / "out" / "wsol_curves.json").read_text())["pxap"]
    precision, recall = curve["precision"][50], curve["recall"][50]
    assert record["at_wsol_threshold"]["wsol_threshold"] == 0.5
    assert record["at_wsol_threshold"]["piou"] == pytest.approx(100 / (1 / precision + 1 / recall - 1), abs=1e-9)
    assert "pIoU" in (tmp_path / "out" / "log.txt").read_text()
    assert record["pxap"] == pytest.approx(44.298, abs=5e-4)
    assert abs(record["pxap"] - EXPECTED["OpenImages"]["scoremaps"]["pxap"]) > 0.04


def test_whole_image_maps_go_through_each_protocols_view(cub, tmp_path):
    root, _ = cub
    dataset = build_dataset("cub", root, "test", lambda image: image)
    whole = np.random.default_rng(0).random((30, 50)).astype(np.float32)
    image = Image.fromarray(whole)  # a float image through the image's own transform: Resize, then CenterCrop
    assert np.array_equal(centre_view_map(whole, 256, 224), np.asarray(T.CenterCrop(224)(T.Resize((256, 256))(image))))
    for item in dataset.items:  # oracle maps: 1 on the GT box, 0 elsewhere, at a quarter of the image's resolution
        x0, y0, x1, y1 = item.boxes[0] / 4
        oracle = np.zeros((16, 16), np.float32)
        oracle[int(np.ceil(y0)):int(y1), int(np.ceil(x0)):int(x1)] = 1
        path = tmp_path / "oracle" / f"{item.image_id}.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, oracle)
    record = main(["--data-root", str(root), "--maps", str(tmp_path / "oracle"), "--eval-protocol", "both",
                   "--output-dir", str(tmp_path / "out"), *CPU])
    assert record["img_size"] == 224 and record["resize_size"] == 256  # no views.json: the official centre view
    assert record["gt_known_loc"] == 100.0 and record["maxboxacc"] == 100.0 and record["iou70"] > 50


def test_whole_image_maps_score_alike_at_any_scale_and_offset(cub, tmp_path):
    """A map of any range: the sat protocol's 1e-5 in (m - min) / (max - min + 1e-5) and its float32 resize
    saw maps scaled by 1e-5 (GT-known Loc 27 -> 2 on the demo data) or offset by 1000 differently."""
    root, _ = cub
    make_baseline_maps([str(tmp_path / "maps"), "--data-root", str(root), "--size", "7"])
    for name, change in (("small", lambda m: m * 1e-5), ("offset", lambda m: 1000 + 1e-4 * m)):
        for path in (tmp_path / "maps").rglob("*.npy"):
            target = tmp_path / name / path.relative_to(tmp_path / "maps")
            target.parent.mkdir(parents=True, exist_ok=True)
            np.save(target, change(np.load(path).astype(np.float64)))
    keys = ("gt_known_loc", "iou30", "iou50", "iou70", "maxboxacc", "maxboxaccv2")
    records = [main(["--data-root", str(root), "--maps", str(tmp_path / name), "--eval-protocol", "both",
                     "--output-dir", str(tmp_path / f"out_{name}"), *CPU]) for name in ("maps", "small", "offset")]
    scores = [{key: record[key] for key in keys} for record in records]
    assert scores[1] == scores[0] and scores[2] == scores[0]


@pytest.mark.usefixtures("keep_logging")
def test_flags_and_files_left_unused_are_said(cub, tmp_path, caplog):
    root, _ = cub
    make_baseline_maps([str(tmp_path / "maps"), "--data-root", str(root), "--size", "8"])
    common = ["--data-root", str(root), "--maps", str(tmp_path / "maps"), *CPU]
    stray = tmp_path / "maps" / "009.Other" / "Other_0001.jpg.npy"  # maps of images not in the split: said
    stray.parent.mkdir()
    np.save(stray, np.eye(8))
    (tmp_path / "maps" / "notes.txt").write_text("not a map")
    record = main([*common, "--eval-protocol", "wsol", "--thresholds", "0.3", "0.5", "--output-dir",
                   str(tmp_path / "wsol")])
    assert f"--maps {tmp_path / 'maps'}: 1 map file(s) of images not in the test split, ignored (first: {stray}): " \
           "maps of another split or dataset version?" in caplog.text
    assert record["search_thresholds"] == [] and "best_threshold" not in record  # it recorded [0.3, 0.5]
    assert "--thresholds not used: the wsol protocol does not read it" in caplog.text
    assert "--threshold not used" not in caplog.text  # its default is not said
    record = main([*common, "--eval-protocol", "sat", "--wsol-threshold", "0.5", "--output-dir", str(tmp_path / "sat")])
    assert "--wsol-threshold not used: the sat protocol does not read it" in caplog.text
    assert "at_wsol_threshold" not in record
    # the sat protocol's map threshold and ten-crop, given with wsol, were dropped without a word
    record = main([*common, "--eval-protocol", "wsol", "--threshold", "0.3", "--tencrop", "--output-dir",
                   str(tmp_path / "wsol_flags")])
    assert "--threshold and --tencrop not used: the wsol protocol does not read them" in caplog.text
    assert "threshold" not in record and not record["tencrop"]


def test_imagenet_layout_and_wsol_overlays(tmp_path):
    root = _write_imagenet(tmp_path / "ILSVRC2012")
    boxes = (root / "LOC_val_solution.csv").rename(tmp_path / "LOC_val_solution.csv")  # boxes kept elsewhere
    make_baseline_maps([str(tmp_path / "maps"), "--data-root", str(root), "--data-format", "imagenet", "--size", "20",
                        "--val-boxes", str(boxes)])
    record = main(["--data-root", str(root), "--val-boxes", str(boxes), "--maps", str(tmp_path / "maps"),
                   "--eval-protocol", "wsol",
                   "--overlays", "all", "--output-dir", str(tmp_path / "out"), *CPU], imagenet=True)
    assert record["data_format"] == "imagenet" and record["num_images"] == 6 and 0 <= record["maxboxacc"] <= 100
    overlays = sorted((tmp_path / "out" / "overlays" / "val").iterdir())
    assert len(overlays) == 6 and Image.open(overlays[0]).size == (224, 224)  # drawn at MaxBoxAcc's threshold


def test_baseline_maps_need_a_new_folder_and_sane_values(cub, tmp_path, capsys):
    root, _ = cub
    (tmp_path / "used" / "sat").mkdir(parents=True)  # e.g. a --save-maps folder: its sat/ maps would be scored
    (tmp_path / "file").write_text("x")
    for flags, message in (([tmp_path / "used"], f"{tmp_path / 'used'}: not empty; expected a new or empty folder "
                                                 "(maps already there would be scored with these)"),
                           ([tmp_path / "m", "--sigma", "0"], "--sigma: expected a number >= 0.001, got '0'"),
                           ([tmp_path / "m", "--size", "0"], "--size: expected an integer >= 1, got '0'"),
                           ([tmp_path / "m", "--img-size", "64", "--resize-size", "32"], "--resize-size 32: the "
                            "centre view crops --img-size 64 pixels of it, resize to at least that"),
                           ([tmp_path / "m", "--sig", "0.3"], "unknown flag --sig (did you mean --sigma?)"),
                           ([tmp_path / "m", "--img-size", "64"], "--img-size and --resize-size go together (the "
                            "centre img_size crop of a resize_size image)"),
                           ([tmp_path / "file" / "m"], f"could not write {tmp_path / 'file' / 'm'}/001.Ringed_Disc: "
                                                       "Not a directory")):
        with pytest.raises(SystemExit):
            run_cli(make_baseline_maps, [*map(str, flags), "--data-root", str(root)])
        assert capsys.readouterr().err.startswith(f"error: {message}")
    assert not (tmp_path / "m").exists()


def test_baseline_maps_that_fill_the_disk_leave_no_part(cub, tmp_path, capsys, monkeypatch):
    """A full disk part-way: one line that says so (numpy's words alone: '50176 requested and 6112 written'), and
    none of the maps written is left to be scored as the method's maps of the split."""
    root, _ = cub
    save, saved = np.save, []

    def fills(path, array):
        if saved:
            raise OSError("50176 requested and 6112 written")
        saved.append(path)
        save(path, array)

    monkeypatch.setattr(np, "save", fills)
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "new", tmp_path / "empty"):
        saved.clear()
        with pytest.raises(SystemExit):
            run_cli(make_baseline_maps, [str(out), "--data-root", str(root)])
        assert capsys.readouterr().err == f"error: could not write {out}: 50176 requested and 6112 written (a short " \
            "write: the disk or quota is probably full)\n"
        assert saved and not saved[0].exists()
    assert not (tmp_path / "new").exists() and not any((tmp_path / "empty").iterdir())


def test_evaluate_your_own_method_example(cub, tmp_path, capsys):
    """docs/evaluation.md's worked example on demo data: SAT's saved maps and a centred Gaussian baseline
    (scored with and without SAT's predictions), compared."""
    root, checkpoint = cub
    data = ["--data-root", str(root), "--eval-protocol", "both", *CPU]
    main(["--checkpoint", str(checkpoint), "--save-maps", str(tmp_path / "maps_sat"),
          "--output-dir", str(tmp_path / "eval_sat"), *data])
    make_baseline_maps([str(tmp_path / "maps_gaussian"), "--data-root", str(root), "--img-size", "64",
                        "--resize-size", "73"])  # the nano model's centre view
    assert np.load(tmp_path / "maps_gaussian" / "001.Ringed_Disc" / "Ringed_Disc_0002.jpg.npy").shape == (224, 224)
    predictions = str(tmp_path / "eval_sat" / "per_image.csv")
    sat = main(["--maps", str(tmp_path / "maps_sat"), "--predictions", predictions,
                "--output-dir", str(tmp_path / "eval_sat_maps"), *data])
    gaussian = main(["--maps", str(tmp_path / "maps_gaussian"), "--predictions", predictions,
                     "--output-dir", str(tmp_path / "eval_gaussian"), *data])
    alone = main(["--maps", str(tmp_path / "maps_gaussian"), "--output-dir", str(tmp_path / "eval_alone"), *data])
    assert gaussian["top1_cls"] == sat["top1_cls"]  # the same classes, other maps, the same centre view
    assert (gaussian["img_size"], gaussian["resize_size"]) == (sat["img_size"], sat["resize_size"]) == (64, 73)
    assert {k: v for k, v in alone.items() if k in ("gt_known_loc", "maxboxacc", "maxboxaccv2")} == \
        {k: v for k, v in gaussian.items() if k in ("gt_known_loc", "maxboxacc", "maxboxaccv2")}
    assert not {"top1_cls", "top5_cls", "top1_loc", "top5_loc"} & set(alone)
    log = (tmp_path / "eval_alone" / "log.txt").read_text()
    assert "no --predictions: no Top-1 / Top-5 Loc or Cls" in log and "n/a" in log
    capsys.readouterr()
    table = compare([str(tmp_path / "eval_sat_maps"), str(tmp_path / "eval_gaussian"), str(tmp_path / "eval_alone"),
                     "--output-dir", str(tmp_path / "compare")])["metrics"]
    assert table["gt_known_loc"] == {"eval_sat_maps": sat["gt_known_loc"], "eval_gaussian": gaussian["gt_known_loc"],
                                     "eval_alone": alone["gt_known_loc"]}
    assert table["top1_loc"]["eval_alone"] is None
    assert "eval_sat_maps vs eval_alone, per image on the 12 images" in capsys.readouterr().out


def _bad(tmp_path, name, loc_map):
    path = tmp_path / name / "001.Ringed_Disc" / "Ringed_Disc_0002.jpg.npy"
    shutil.copytree(tmp_path / "good", tmp_path / name)
    np.save(path, loc_map)
    return path


@pytest.mark.usefixtures("keep_logging")
def test_bad_maps_and_predictions_are_one_line(cub, tmp_path, capsys):
    root, _ = cub
    make_baseline_maps([str(tmp_path / "good"), "--data-root", str(root), "--size", "8"])
    common = ["--data-root", str(root), "--output-dir", str(tmp_path / "out"), "--overwrite", *CPU]

    def error(*flags):
        return _one_error_line(capsys, ["--maps", *map(str, flags), *common])

    missing = tmp_path / "missing"
    shutil.copytree(tmp_path / "good", missing)
    (missing / "002.Checkered_Square" / "Checkered_Square_0003.jpg.npy").unlink()
    image_id = "002.Checkered_Square/Checkered_Square_0003.jpg"
    assert error(missing) == f"error: no map for image {image_id}: {missing / image_id}.npy (or .png) not found"
    # several missing: counted and named before any is scored (the evaluation stopped at the first, naming it alone)
    folder = missing / "002.Checkered_Square"
    for name in ("Checkered_Square_0002", "Checkered_Square_0004"):
        (folder / f"{name}.jpg.npy").rename(folder / f"{name}.npy")
    assert error(missing) == (
        f"error: maps {missing}: no map for 3 of the {len(list((tmp_path / 'good').rglob('*.npy')))} images of the "
        "test split, first 002.Checkered_Square/Checkered_Square_0002.jpg, 002.Checkered_Square/Checkered_Square_0003"
        f".jpg, 002.Checkered_Square/Checkered_Square_0004.jpg (expected <image_id>.npy or .png); found "
        f"{folder}/Checkered_Square_0002.npy: name each map <image_id>.npy (or .png), the image id with its extension "
        "and subfolders, e.g. 002.Checkered_Square/Checkered_Square_0002.jpg.npy")
    nan = np.ones((8, 8), np.float32)
    nan[2, 3] = np.nan
    path = _bad(tmp_path, "nan", nan)
    assert error(tmp_path / "nan") == f"error: map {path}: holds NaN or Inf"
    path = _bad(tmp_path, "constant", np.full((8, 8), 0.5, np.float32))
    assert error(tmp_path / "constant").startswith(f"error: map {path}: constant (0.5), it localizes nothing; "
                                                   "--allow-constant-maps scores it")
    assert main(["--maps", str(tmp_path / "constant"), "--allow-constant-maps", *common])["num_images"] == 12
    capsys.readouterr()
    path = _bad(tmp_path, "rgb", np.ones((8, 8, 3), np.float32))
    assert error(tmp_path / "rgb") == \
        f"error: map {path}: shape (8, 8, 3), expected a non-empty 2-D map (height, width)"
    for name, content in (("text", b"0.1 0.2\n0.3 0.4\n"), ("npz", b"PK\x03\x04")):  # np.savetxt's, np.savez's
        path = _bad(tmp_path, name, np.zeros(1))
        path.write_bytes(content)  # numpy called the text "pickled (object) data"; an .npz gave a traceback
        assert error(tmp_path / name) == \
            f"error: map {path}: not a NumPy .npy file (no NPY header), expected an array written by np.save"
    assert error(tmp_path / "good", "--overlay-blocks") == "error: --overlay-blocks with --maps: saved maps hold the " \
        "fused map only (a checkpoint's block maps: --checkpoint, or tools/predict.py --overlay-blocks)"
    assert error(tmp_path / "good", "--eval-protocol", "cls") == "error: --maps with --eval-protocol cls: maps are " \
        "scored by a localization protocol (sat, wsol or both); classification alone needs a --checkpoint"
    (tmp_path / "sat_only" / "sat").mkdir(parents=True)  # saved with --eval-protocol sat
    assert error(tmp_path / "sat_only", "--eval-protocol", "both") == (
        f"error: maps {tmp_path / 'sat_only'}: no wsol/ folder, which the wsol protocol reads (saved with another "
        "--eval-protocol?)")

    ids = [item.image_id for item in build_dataset("cub", root, "test", lambda image: image).items]
    table = tmp_path / "predictions.csv"

    def predictions(rows, header="image_id,top5"):
        table.write_text("\n".join([header] + rows) + "\n")
        return error(tmp_path / "good", "--predictions", table)

    good = [f"{image_id},0 1 2" for image_id in ids]
    assert predictions(good[1:]) == f"error: predictions {table}: no prediction for 1 image(s) of the split, first " \
                                    f"{ids[0]}"
    assert predictions(good + ["stranger.jpg,0 1 2"]) == f"error: predictions {table}: 1 image id(s) not in the " \
                                                         "evaluated split, first stranger.jpg (line 14)"
    assert predictions(good[:1] + [f"{ids[1]},0 3 1"] + good[2:]) == f"error: predictions {table} line 3: class 3 " \
                                                                     "out of range (the data has 3 classes: 0 to 2)"
    assert predictions(good[:1] + [f"{ids[1]},0 1"] + good[2:]) == f"error: predictions {table} line 3: top5 '0 1', " \
                                                                   "expected 3 distinct class indices, best first"
    assert predictions(good[:1] + [f"{ids[1]},0"] + good[2:]) == f"error: predictions {table} line 3: top5 '0', " \
        "expected 3 distinct class indices, best first (a method's top-1 classes alone: a column top1 instead)"
    assert predictions([f"{i},0 1" for i in ids], "image_id,top1") == f"error: predictions {table} line 2: top1 " \
                                                                     "'0 1', expected one class index"
    assert predictions(good, "id,classes").startswith(f"error: predictions {table}: no column image_id")
    assert _one_error_line(capsys, ["--checkpoint", "x.pth", "--predictions", str(table), *common]) == \
        "error: --predictions goes with --maps (a checkpoint predicts its own classes)"
    table.write_bytes(b"image_id,top5\n\xff\xfe,0 1 2\n")
    assert error(tmp_path / "good", "--predictions", table) == f"error: predictions {table}: not UTF-8 text " \
        "(expected a CSV with image_id and top5 columns)"
    assert error(tmp_path / "good", "--predictions", tmp_path) == f"error: predictions {tmp_path}: a folder, not a file"
    assert error(table) == f"error: maps {table}: a file (expected a folder of maps named <image_id>.npy)"
    view_file = tmp_path / "good" / "views.json"
    expected = 'expected {"img_size": N, "resize_size": M} with M >= N >= 16'
    for text, message in (("{bad", "not a maps view file (JSONDecodeError: "),
                          ('{"img_size": 64}', "not a maps view file (KeyError: 'resize_size'); " + expected),
                          ('{"img_size": "a", "resize_size": 72}', '{"img_size": "a", "resize_size": 72}; ' + expected),
                          ('{"img_size": 64, "resize_size": 32}', '{"img_size": 64, "resize_size": 32}; ' + expected)):
        view_file.write_text(text)
        assert error(tmp_path / "good").startswith(f"error: {view_file}: {message}")


@pytest.mark.usefixtures("keep_logging")
def test_flags_of_the_forward_are_named_as_unused_with_maps(cub, tmp_path, caplog):
    root, _ = cub
    make_baseline_maps([str(tmp_path / "maps"), "--data-root", str(root), "--size", "8"])
    with caplog.at_level(logging.WARNING):
        main(["--maps", str(tmp_path / "maps"), "--data-root", str(root), "--amp", "--compile",
              "--arch", "deit_sat_tiny_patch16_224", "--tencrop", "--output-dir", str(tmp_path / "out"), *CPU])
    # --arch and --tencrop were dropped without a word (a model's setting, views of a forward: saved maps have none)
    assert "--maps: --amp, --compile, --arch, --tencrop not used (saved maps need no model, no forward and no " \
        "decoding)" in caplog.text


@pytest.mark.usefixtures("keep_logging")
def test_save_maps_at_or_above_the_output_dir_is_refused(cub, tmp_path, capsys):
    """--save-maps naming the --output-dir (or a folder above it) passed the check (a new folder), then the maps'
    folder, moved in place last, replaced it: metrics.json, per_image.csv and log.txt were gone without a word;
    maps inside its overlays/ went with the overlays/ folder the new overlays replaced."""
    root, checkpoint = cub
    data = ["--checkpoint", str(checkpoint), "--data-root", str(root), *CPU]
    out = tmp_path / "eval"
    assert _one_error_line(capsys, [*data, "--output-dir", str(out), "--save-maps", f"{out}/"]) == \
        f"error: --save-maps {out}/: is the --output-dir (its maps would replace the evaluation's files); choose " \
        f"a folder of its own, e.g. {out / 'maps'}"
    assert _one_error_line(capsys, [*data, "--output-dir", str(out / "sub"), "--save-maps", str(out)]) == \
        f"error: --save-maps {out}: holds the --output-dir {out / 'sub'} (its maps would replace the " \
        f"evaluation's files); choose a folder of its own, e.g. {out / 'sub' / 'maps'}"
    maps = out / "overlays" / "maps"  # the maps were deleted with the overlays/ folder the new overlays replaced
    assert _one_error_line(capsys, [*data, "--output-dir", str(out), "--overlays", "2", "--save-maps", str(maps)]) \
        == f"error: --save-maps {maps}: inside the overlays/ folder of the --output-dir (replaced whole by the " \
        f"evaluation's overlays); choose a folder of its own, e.g. {out / 'maps'}"
    assert not out.exists()


@pytest.mark.usefixtures("keep_logging")
def test_save_maps_dot_is_one_error_line(cub, tmp_path, capsys, monkeypatch):
    """--save-maps . (run from the empty folder meant for the maps) ended in a ValueError traceback ('.' has an
    empty name: the maps are written beside their folder, under its name), leaving an empty --output-dir."""
    root, checkpoint = cub
    (tmp_path / "maps").mkdir()
    monkeypatch.chdir(tmp_path / "maps")
    out = tmp_path / "eval"
    assert _one_error_line(capsys, ["--checkpoint", str(checkpoint), "--data-root", str(root), *CPU,
                                    "--output-dir", str(out), "--save-maps", "."]) == \
        f"error: --save-maps .: name the folder by its path, e.g. {tmp_path / 'maps'} (it is written beside it and " \
        "moved in place once the evaluation is complete)"
    assert not out.exists()


@pytest.mark.usefixtures("keep_logging")
def test_save_maps_replaces_only_earlier_maps_and_only_once_complete(cub, tmp_path, capsys):
    """A --save-maps folder holding maps is refused without --overwrite (two evaluations' maps mixed would be
    scored as one method's), one holding anything else always; with --overwrite the earlier maps are replaced
    whole once the evaluation is complete, and stay as they were when it fails."""
    root, checkpoint = cub
    maps, data = tmp_path / "maps", ["--checkpoint", str(checkpoint), "--data-root", str(root), *CPU]
    main([*data, "--save-maps", str(maps), "--eval-protocol", "both", "--output-dir", str(tmp_path / "e1")])
    before = sorted((str(p), p.stat().st_mtime_ns) for p in maps.rglob("*"))
    assert (maps / "wsol").is_dir() and (maps / "sat").is_dir()
    assert _one_error_line(capsys, [*data, "--save-maps", str(maps), "--output-dir", str(tmp_path / "e2")]) == \
        f"error: --save-maps {maps}: holds earlier saved maps: --overwrite to replace them (once this evaluation " \
        "is complete), or choose another folder"
    make_baseline_maps([str(tmp_path / "gaussian"), "--data-root", str(root), "--size", "8"])
    assert _one_error_line(capsys, [*data, "--save-maps", str(tmp_path / "gaussian"), "--overwrite",
                                    "--output-dir", str(tmp_path / "e2")]) == \
        f"error: --save-maps {tmp_path / 'gaussian'}: holds other files than saved maps (001.Ringed_Disc, " \
        "002.Checkered_Square, 003.Striped_Triangle); choose a new or empty folder"
    broken = tmp_path / "broken"  # the evaluation stops at its 10th image, after maps of the first were written
    shutil.copytree(root, broken)
    path = Path(build_dataset("cub", broken, "test", lambda image: image).image_path(9))
    path.write_bytes(path.read_bytes()[:300])
    _one_error_line(capsys, [*data[:2], "--data-root", str(broken), *CPU, "--eval-batch-size", "4", "--save-maps",
                             str(maps), "--overwrite", "--output-dir", str(tmp_path / "e3")])
    assert sorted((str(p), p.stat().st_mtime_ns) for p in maps.rglob("*")) == before
    assert not (tmp_path / "maps.partial").exists()
    main([*data, "--save-maps", str(maps), "--overwrite", "--eval-protocol", "sat", "--output-dir",
          str(tmp_path / "e4")])
    assert sorted(p.name for p in maps.iterdir()) == ["sat", "views.json"]  # the earlier wsol/ maps gone


def test_a_missing_map_names_the_file_it_may_be_under(tmp_path):
    """Maps named as the image with its extension replaced (``x.npy``, ``x.png``, as most tools write them) or
    without the id's subfolders were 'not found', and the warning on the unmatched files asked whether they were
    of another split: the error now names the file found and the name expected."""
    from utils.saved_maps import read_map
    from utils.errors import DataError

    image_id = "001.Ringed_Disc/Ringed_Disc_0002.jpg"
    (tmp_path / "001.Ringed_Disc").mkdir()
    for misnamed in ("001.Ringed_Disc/Ringed_Disc_0002.npy", "Ringed_Disc_0002.jpg.png"):
        np.save(tmp_path / "map.npy", np.eye(4))
        (tmp_path / "map.npy").rename(tmp_path / misnamed)
        with pytest.raises(DataError) as err:
            read_map(tmp_path, image_id)
        assert str(err.value) == (
            f"no map for image {image_id}: {tmp_path / image_id}.npy (or .png) not found; found "
            f"{tmp_path / misnamed}: name each map <image_id>.npy (or .png), the image id with its extension and "
            f"subfolders, e.g. {image_id}{Path(misnamed).suffix}")
        (tmp_path / misnamed).unlink()
    with pytest.raises(DataError) as err:
        read_map(tmp_path, image_id)
    assert str(err.value) == f"no map for image {image_id}: {tmp_path / image_id}.npy (or .png) not found"


def test_an_unreadable_png_map_is_said_as_an_unreadable_image(tmp_path):
    """A .png map PIL does not read said 'unreadable (UnidentifiedImageError: cannot identify image file <path>)':
    the path twice, and a 0-byte file not called empty, where the data check and training say why_unreadable's."""
    from utils.saved_maps import read_map
    from utils.errors import DataError

    (tmp_path / "a.jpg.png").write_bytes(b"not a png")
    (tmp_path / "b.jpg.png").write_bytes(b"")
    for image_id, why in (("a.jpg", "not an image file PIL recognises"), ("b.jpg", "empty file (0 bytes)")):
        with pytest.raises(DataError) as err:
            read_map(tmp_path, image_id)
        assert str(err.value) == f"map {tmp_path / image_id}.png: unreadable ({why})"

def test_a_sat_folder_without_its_views_file_is_said(cub, tmp_path, caplog):
    """Whole-image maps put into DIR/sat/ (as if the folders were one per protocol) were scored as SAT's raw maps
    of the centre crop without a word (IoU 0.99 -> 0.80 for maps that are the GT box): --save-maps always writes
    DIR/views.json, so a sat/ folder without it is named in a warning."""
    root, _ = cub
    make_baseline_maps([str(tmp_path / "maps" / "sat"), "--data-root", str(root), "--size", "8"])
    common = ["--data-root", str(root), "--maps", str(tmp_path / "maps"), "--eval-protocol", "sat", *CPU]
    warning = f"--maps {tmp_path / 'maps'}: a sat/ folder without the views.json that --save-maps writes beside it"
    main([*common, "--output-dir", str(tmp_path / "out")])
    assert warning in caplog.text
    # what to do with maps of another view (an earlier version's --save-scoremaps wrote sat/ without views.json)
    assert f"maps of another view (an earlier version's --save-scoremaps or --save-maps of a model of another input " \
           f"size): write {tmp_path / 'maps' / 'views.json'} beside sat/, e.g. {{\"img_size\": 128, " \
           f"\"resize_size\": 144}} (the model's input and resize sizes)" in caplog.text
    caplog.clear()
    (tmp_path / "maps" / "views.json").write_text('{"img_size": 224, "resize_size": 256}')
    main([*common, "--output-dir", str(tmp_path / "out"), "--overwrite"])
    assert warning not in caplog.text and "metrics written" in caplog.text


def test_a_views_file_that_cannot_be_written_is_one_line(tmp_path):
    """evaluator.py --save-maps on a disk filled by the maps: views.json, written last, ended in an OSError
    traceback (one line expected, naming the file)."""
    from utils.errors import OutputError
    from utils.saved_maps import write_saved_view
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputError, match=r"^could not write \S*/file/maps\.partial(/views\.json)?: "):
        write_saved_view(tmp_path / "file" / "maps.partial", 224, 256)


@pytest.mark.parametrize("mode", ["L", "I;16", "I"])
def test_png_maps_read_as_their_values_in_the_unit_range(tmp_path, monkeypatch, mode):
    """8- and 16-bit grey PNG maps are the npy map they were written from, scaled to [0, 1]. Pillow up to 10.1
    (requirements.txt admits 9.0+) opens a 16-bit grey PNG in mode I, not I;16: such maps were refused as 'a I
    PNG, expected grayscale (8 or 16 bit)'. An RGB PNG is still refused in one line."""
    from utils.errors import DataError
    from utils.saved_maps import read_map

    full = 255 if mode == "L" else 65535
    values = np.arange(12, dtype=np.int64).reshape(3, 4) * (full // 11)
    Image.fromarray(values.astype(np.uint8 if mode == "L" else np.uint16)).save(tmp_path / "a.jpg.png")
    if mode == "I":  # Pillow <= 10.1's reading of the same file
        real_open = Image.open

        def old_open(path, *args, **kwargs):
            with real_open(path, *args, **kwargs) as image:
                return image.convert("I") if image.mode == "I;16" else image.copy()
        monkeypatch.setattr(Image, "open", old_open)
    with Image.open(tmp_path / "a.jpg.png") as image:
        assert image.mode == mode or (mode, image.mode) == ("I;16", "I")  # (the latter: Pillow <= 10.1)
    np.testing.assert_allclose(read_map(tmp_path, "a.jpg"), values / full, rtol=1e-6)
    Image.new("RGB", (4, 3), (10, 20, 30)).save(tmp_path / "b.jpg.png")
    with pytest.raises(DataError, match=r"b\.jpg\.png: a RGB PNG, expected grayscale \(8 or 16 bit\)$"):
        read_map(tmp_path, "b.jpg")


@pytest.mark.usefixtures("keep_logging")
def test_flags_that_saved_maps_cannot_serve_are_one_line(cub, tmp_path, capsys):
    """--save-maps / --save-boxes with --maps, and a --resize-size the maps' centre view cannot take, are refused
    before any map is read."""
    root, _ = cub
    make_baseline_maps([str(tmp_path / "whole"), "--data-root", str(root), "--size", "8"])  # whole-image maps
    make_baseline_maps([str(tmp_path / "view"), "--data-root", str(root), "--size", "8", "--img-size", "64",
                        "--resize-size", "72"])  # with views.json: the centre crop of a 72 x 72 image
    common = ["--data-root", str(root), "--output-dir", str(tmp_path / "out"), *CPU]

    def error(maps, *flags):
        return _one_error_line(capsys, ["--maps", str(tmp_path / maps), *map(str, flags), *common])

    assert error("whole", "--save-maps", tmp_path / "again") == "error: --save-maps with --maps: the maps are saved " \
                                                                "already"
    assert error("whole", "--save-boxes", tmp_path / "boxes.json") == "error: --save-boxes with --maps: COCO " \
        "detections need class scores, which saved maps and predictions do not carry (per_image.csv holds the boxes)"
    assert error("whole", "--resize-size", 200) == "error: --resize-size 200: the centre view crops 224 pixels, " \
                                                   "resize to at least 224"
    assert error("view", "--resize-size", 80) == f"error: --resize-size 80: the maps in {tmp_path / 'view'} are of " \
        f"the centre crop of a 72x72 image ({tmp_path / 'view' / 'views.json'})"
    assert not (tmp_path / "out" / "metrics.json").exists() and not (tmp_path / "again").exists()


@pytest.mark.usefixtures("keep_logging")
def test_maps_the_disk_has_no_room_for_are_refused_before_the_evaluation(cub, tmp_path, capsys, monkeypatch):
    """ImageNet's 50,000 val images take 20 GB of wsol maps (float64, 224 x 224): a disk without that room is
    said at the start, not by a failed write at the end; nothing is written."""
    assert saved_maps_bytes(50000, "wsol", grid=14) == 50000 * 405504  # 401,536-byte files in 4 KiB blocks
    assert saved_maps_bytes(50000, "sat", grid=14) == 50000 * 4096
    root, checkpoint = cub
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 ** 9, 10 ** 9 - 50000, 50000))
    maps = tmp_path / "new" / "maps"  # (not made yet: the room of the disk it goes to)
    assert _one_error_line(capsys, ["--checkpoint", str(checkpoint), "--data-root", str(root), "--save-maps",
                                    str(maps), "--eval-protocol", "both", "--output-dir", str(tmp_path / "out"),
                                    *CPU]) == \
        f"error: --save-maps {maps}: the maps of 12 images need 4.9 MB, {tmp_path} has 0.1 MB free (free some " \
        "space or save them on a larger disk)"
    assert not (tmp_path / "new").exists() and not (tmp_path / "out" / "metrics.json").exists()


def test_the_room_for_maps_is_that_of_the_disk_they_are_written_to(tmp_path, monkeypatch):
    """The maps are written beside the --save-maps folder (DIR.partial, moved in place at the end): a DIR that
    is a link to (or a mount point of) a larger disk does not lend its room to the disk they are written to."""
    (tmp_path / "large_disk").mkdir()
    (tmp_path / "maps").symlink_to(tmp_path / "large_disk", target_is_directory=True)
    large = (tmp_path / "large_disk").resolve()

    def room(path):  # 1 TB free on the large disk, 0.1 MB on the other
        free = 10 ** 12 if Path(path).resolve() == large else 10 ** 5
        return shutil._ntuple_diskusage(10 ** 12, 10 ** 12 - free, free)

    monkeypatch.setattr(shutil, "disk_usage", room)
    with pytest.raises(ConfigError, match=rf"^--save-maps {tmp_path / 'maps'}: the maps of 1000 images need "
                                          rf"405.5 MB, {tmp_path} has 0.1 MB free"):
        check_room_for_maps(tmp_path / "maps", 1000, "wsol", grid=14)
    assert check_room_for_maps(tmp_path / "large_disk" / "maps", 1000, "wsol", grid=14) == 1000 * 405504


@pytest.mark.usefixtures("keep_logging")
def test_a_maps_folder_given_as_a_link_is_refused_before_the_evaluation(cub, tmp_path, capsys):
    """The maps are written beside the folder and renamed onto it at the end: onto a link that failed ('Not a
    directory') after the whole evaluation, the maps lost; refused first, naming the folder to give."""
    root, checkpoint = cub
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert _one_error_line(capsys, ["--checkpoint", str(checkpoint), "--data-root", str(root), "--save-maps",
                                    str(tmp_path / "link"), "--output-dir", str(tmp_path / "out"), *CPU]) == \
        f"error: --save-maps {tmp_path / 'link'}: a link to {os.path.realpath(tmp_path / 'real')}: name that folder " \
        "(the maps are written beside the folder and moved in place once the evaluation is complete)"
    assert not (tmp_path / "out" / "metrics.json").exists()
    main(["--checkpoint", str(checkpoint), "--data-root", str(root), "--save-maps", str(tmp_path / "real"),
          "--output-dir", str(tmp_path / "out"), *CPU])
    assert len(list((tmp_path / "real" / "sat").rglob("*.npy"))) == 12
