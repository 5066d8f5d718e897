"""The wsol protocol's accumulators against numbers produced by wsolevaluation itself
(fixtures/wsolevaluation/README.md): MaxBoxAcc, MaxBoxAccV2 and PxAP, and the per-threshold counts and
score histograms behind them, on seeded maps of 224x224 and of raw low-resolution sizes."""
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from utils.boxes import gt_boxes_wsol
from DataLoader.formats.wsol import load_mask, load_wsol
from utils.metrics import IOU_THRESHOLDS, PxAPAccumulator, WSOLBoxAccumulator

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "wsolevaluation"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())
KINDS = ("scoremaps", "cams")


def _make_maps():
    spec = importlib.util.spec_from_file_location("make_maps", FIXTURES / "make_maps.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_maps


make_maps = _make_maps()


def write_split_images(dataset, image_root):
    """The fixture set's test images under ``image_root`` as empty placeholders (the readers check that they
    exist), with the fixture's masks."""
    ids = (FIXTURES / "metadata" / dataset / "test" / "image_ids.txt").read_text().split()
    for image_id in ids:
        (image_root / image_id).parent.mkdir(parents=True, exist_ok=True)
        (image_root / image_id).touch()
    if dataset == "OpenImages":
        shutil.copytree(FIXTURES / "masks" / "OpenImages", image_root, dirs_exist_ok=True)


def split_items(dataset, image_root):
    """The test split read by this project's wsolevaluation metadata reader (``write_split_images``)."""
    write_split_images(dataset, image_root)
    return load_wsol(image_root, FIXTURES / "metadata" / dataset, "test")[1]


@pytest.mark.parametrize("kind", KINDS)
def test_box_accuracy_equals_wsolevaluation(tmp_path, kind):
    expected = EXPECTED["CUB"][kind]
    maps = make_maps("CUB")[kind]
    acc = WSOLBoxAccumulator()
    for item in split_items("CUB", tmp_path):
        acc.update(maps[item.image_id][None], [gt_boxes_wsol(item.boxes, item.size)])
    metrics = acc.compute()
    assert metrics["num_images"] == expected["largest_contour"]["num_images"] == 12
    assert metrics["maxboxacc"] == expected["maxboxacc"]
    assert metrics["maxboxaccv2"] == expected["maxboxaccv2"]
    assert {str(iou): value for iou, value in metrics["maxboxaccv2_per_iou"].items()} == \
        expected["all_contours"]["max_box_acc_per_iou"]
    assert acc.hits_largest.tolist() == expected["largest_contour"]["num_correct_per_iou"]["50"]
    for row, iou in zip(acc.hits_all.tolist(), IOU_THRESHOLDS):
        assert row == expected["all_contours"]["num_correct_per_iou"][str(iou)]


@pytest.mark.parametrize("kind", KINDS)
def test_pxap_equals_wsolevaluation(tmp_path, kind):
    expected = EXPECTED["OpenImages"][kind]
    maps = make_maps("OpenImages")[kind]
    acc = PxAPAccumulator()
    for item in split_items("OpenImages", tmp_path):
        foreground, ignore = load_mask(item.mask_paths, item.ignore_path)
        acc.update(maps[item.image_id][None], foreground[None], ignore[None])
    assert acc.hist_fg.tolist() == expected["gt_true_score_hist"]
    assert acc.hist_bg.tolist() == expected["gt_false_score_hist"]
    assert acc.compute()["pxap"] == expected["pxap"]


def test_maps_cover_the_sizes_wsolevaluation_is_given():
    maps = make_maps("CUB")
    assert {m.shape for m in maps["scoremaps"].values()} == {(224, 224)}
    assert all(m.min() == 0 and m.max() == 1 for m in maps["scoremaps"].values())  # as its evaluation.py asks
    assert {m.shape for m in maps["cams"].values()} == {(14, 14), (7, 7), (28, 28), (10, 14)}
    assert np.ptp(maps["cams"][list(maps["cams"])[-1]]) == 0  # a constant map: zeros once normalised
