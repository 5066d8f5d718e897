"""tools/predict.py: the crop-to-original box mapping, and the script end to end on CPU."""
import json

import numpy as np
import pytest
from PIL import Image

from DataLoader.transforms import boxes_protocol_a
from tools.predict import crop_box_to_original, full_image_map, main as predict_main
from utils.errors import run_cli

from test_evaluation import save_nano_checkpoint
from test_evaluator_cli import run_script


def test_crop_box_maps_back_to_original_pixels():
    # the whole 224 crop of a 512x256 image is its central 224/256 part
    np.testing.assert_allclose(crop_box_to_original([0, 0, 224, 224], (512, 256), 256, 224), [32, 16, 480, 240])
    original = np.array([[100.0, 50.0, 300.0, 200.0]])
    crop = boxes_protocol_a(original, (400, 300))  # truncates to whole crop pixels
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
                      folder, tmp_path / "single.jpg")
    assert proc.returncode == 0, proc.stderr
    assert len([line for line in proc.stdout.splitlines() if " box [" in line]) == 3
    record = json.loads((out / "predictions.json").read_text())
    assert record["threshold"] == 0.35 and len(record["predictions"]) == 3
    for pred in record["predictions"]:
        w, h = sizes[type(folder)(pred["image"])]
        x0, y0, x1, y1 = pred["box"]
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h and pred["image_size"] == [w, h]
        assert pred["class_name"] in ("Ringed_Disc", "Checkered_Square", "Striped_Triangle")
        assert len(pred["top5"]) == 3 and pred["top5"][0]["score"] == pred["score"]
        assert Image.open(pred["overlay"]).size == (w, h)



def test_bad_path_is_one_error_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(predict_main, ["--checkpoint", "unused.pth", str(tmp_path / "missing.jpg")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'missing.jpg'}: not found (expected an image file or a folder of images)\n"
