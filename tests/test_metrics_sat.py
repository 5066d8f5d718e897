import numpy as np
import pytest
import torch

from tools.bench_boxes import naive_sat_boxes, random_maps
from utils.box_ops import max_iou
from utils.metrics_sat import (SATLocAccumulator, boxes_at_thresholds, normalize_map_sat, predict_box,
                               topk_correct)


@pytest.fixture(scope="module")
def original(original_sat_dir):
    with np.load(original_sat_dir / "original_boxes.npz") as data:
        return {key: data[key] for key in data.files}


def test_reproduces_official_boxes_and_ious(original):
    for i, cam_map in enumerate(original["maps"]):
        boxes = boxes_at_thresholds(normalize_map_sat(cam_map), original["thresholds"])
        np.testing.assert_array_equal(boxes, original["boxes"][i], err_msg=f"map {i}")
        np.testing.assert_array_equal(max_iou(boxes, original["gt_boxes"][i][None]), original["iou"][i])


def test_normalize_map_sat():
    norm = normalize_map_sat(np.arange(196, dtype=np.float32).reshape(14, 14))
    assert norm.shape == (224, 224) and norm.dtype == np.float32
    assert norm.min() == 0 and 0.9999 < norm.max() < 1
    assert not normalize_map_sat(np.full((14, 14), 0.5)).any()  # constant map -> zeros


def test_no_foreground_gives_whole_crop():
    np.testing.assert_array_equal(boxes_at_thresholds(np.zeros((224, 224), np.float32), [0.3, 0.5]),
                                  [[0, 0, 224, 224]] * 2)


def test_largest_component_and_exclusive_box():
    norm = np.zeros((224, 224), np.float32)
    norm[10:20, 30:35] = 0.9  # 50 pixels
    norm[100:110, 100:120] = 0.6  # 200 pixels, gone above 0.6
    np.testing.assert_array_equal(boxes_at_thresholds(norm, [0.5, 0.6]), [[100, 100, 120, 110], [30, 10, 35, 20]])


def test_diagonal_pixels_are_8_connected():
    norm = np.zeros((224, 224), np.float32)
    norm[[5, 6, 7], [5, 6, 7]] = 1  # 3 diagonal pixels: one component of 3
    norm[50, 50:52] = 1  # 2 pixels
    np.testing.assert_array_equal(boxes_at_thresholds(norm, [0.5]), [[5, 5, 8, 8]])


def test_tie_takes_first_component_in_raster_order():
    # OpenCV's 2x2-block labelling numbers A (rows 1-2, column 0) before B (row 0, columns 5-6);
    # the official code (skimage labels + a stable sort by size) keeps B, met first in raster order.
    norm = np.zeros((224, 224), np.float32)
    norm[1:3, 0] = 1
    norm[0, 5:7] = 1
    np.testing.assert_array_equal(boxes_at_thresholds(norm, [0.5]), [[5, 0, 7, 1]])


def test_matches_naive_reference_on_random_maps():
    thresholds = [0.2, 0.3, 0.35, 0.4, 0.45, 0.6]
    for cam_map in random_maps(24, seed=1):
        np.testing.assert_array_equal(boxes_at_thresholds(normalize_map_sat(cam_map), thresholds),
                                      naive_sat_boxes(cam_map, thresholds))


def test_predict_box_is_the_row_at_that_threshold(original):
    cam_map = original["maps"][5]
    np.testing.assert_array_equal(predict_box(torch.from_numpy(cam_map), 0.35), original["boxes"][5][1])


def test_topk_correct_numpy_and_few_classes():
    scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]])
    top1, top5 = topk_correct(scores, np.array([2, 0]))
    assert top1.tolist() == [False, True] and top5.tolist() == [True, True]


def _fixture_batch(original, seed=0):
    rng = np.random.default_rng(seed)
    n = len(original["maps"])
    logits = torch.from_numpy(rng.normal(size=(n, 10)).astype(np.float32))
    labels = torch.from_numpy(rng.integers(0, 10, size=n))
    gt = [box[None] for box in original["gt_boxes"]]
    return original["maps"], gt, logits, labels


def test_accumulator_against_fixture_ious(original):
    maps, gt, logits, labels = _fixture_batch(original)
    acc = SATLocAccumulator(original["thresholds"])
    np.testing.assert_array_equal(acc.update(torch.from_numpy(maps), gt, logits, labels), original["iou"])
    result = acc.compute()

    top1 = (logits.argmax(1) == labels).numpy()
    top5 = (logits.topk(5, 1).indices == labels[:, None]).any(1).numpy()
    hit = original["iou"] >= 0.5
    gt_known = 100 * hit.mean(0)
    top1_loc = 100 * (hit & top1[:, None]).mean(0)
    best = int(np.argmax(hit.sum(0) + (hit & top1[:, None]).sum(0)))
    assert result["num_images"] == 70
    assert result["top1_cls"] == pytest.approx(100 * top1.mean())
    assert result["top5_cls"] == pytest.approx(100 * top5.mean())
    np.testing.assert_allclose(result["gt_known_loc_per_threshold"], gt_known)
    np.testing.assert_allclose(result["top1_loc_per_threshold"], top1_loc)
    assert result["best_threshold"] == original["thresholds"][best]
    assert result["gt_known_loc"] == pytest.approx(gt_known[best]) == result["iou50"]
    assert result["top1_loc"] == pytest.approx(top1_loc[best])
    assert result["top5_loc"] == pytest.approx(100 * (hit[:, best] & top5).mean())
    assert result["iou30"] == pytest.approx(100 * (original["iou"][:, best] >= 0.3).mean())
    assert result["iou70"] == pytest.approx(100 * (original["iou"][:, best] >= 0.7).mean())


def test_merge_equals_single_pass(original):
    maps, gt, logits, labels = _fixture_batch(original, seed=1)
    single = SATLocAccumulator(original["thresholds"])
    single.update(maps, gt, logits, labels)
    parts = [SATLocAccumulator(original["thresholds"]) for _ in range(2)]
    for part, sl in zip(parts, (slice(0, 33), slice(33, 70))):
        part.update(maps[sl], gt[sl], logits[sl], labels[sl])
    assert parts[0].merge(parts[1].state()).compute() == single.compute()


def _with_counts(thresholds, gt_known, top1_loc, num_images=10):
    acc = SATLocAccumulator(thresholds)
    state = acc.state()
    state["num_images"] = np.array(num_images)
    state["iou_hits"][1] = gt_known
    state["top1_loc"] = np.array(top1_loc)
    return acc.merge(state).compute()


def test_best_threshold_maximises_gt_known_plus_top1_first_on_ties():
    assert _with_counts([0.3, 0.4, 0.5], [5, 6, 7], [5, 6, 3])["best_threshold"] == 0.4
    assert _with_counts([0.3, 0.4, 0.5], [4, 6, 5], [6, 4, 5])["best_threshold"] == 0.3  # three-way tie
    result = _with_counts([0.3, 0.4], [0, 0], [0, 0])
    assert result["best_threshold"] == 0.3 and result["gt_known_loc"] == 0.0


def test_compute_without_images_raises():
    with pytest.raises(ValueError, match="no images"):
        SATLocAccumulator().compute()
