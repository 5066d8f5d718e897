import numpy as np
import pytest
import torch

from reference_boxes import naive_sat_boxes, random_maps
from utils.boxes import max_iou, sat_box, sat_boxes, sat_map
from utils.metrics import SATLocAccumulator, per_class_metrics, topk_correct
from utils.selection import update_best


@pytest.fixture(scope="module")
def original(official_boxes):
    return official_boxes


def test_reproduces_official_boxes_and_ious(original):
    for i, loc_map in enumerate(original["maps"]):
        boxes = sat_boxes(sat_map(loc_map), original["thresholds"])
        np.testing.assert_array_equal(boxes, original["boxes"][i], err_msg=f"map {i}")
        np.testing.assert_array_equal(max_iou(boxes, original["gt_boxes"][i][None]), original["iou"][i])


def test_normalize_map_sat():
    norm = sat_map(np.arange(196, dtype=np.float32).reshape(14, 14))
    assert norm.shape == (224, 224) and norm.dtype == np.float32
    assert norm.min() == 0 and 0.9999 < norm.max() < 1
    assert not sat_map(np.full((14, 14), 0.5)).any()  # constant map -> zeros


def test_no_foreground_gives_whole_crop():
    np.testing.assert_array_equal(sat_boxes(np.zeros((224, 224), np.float32), [0.3, 0.5]),
                                  [[0, 0, 224, 224]] * 2)


def test_largest_component_and_exclusive_box():
    norm = np.zeros((224, 224), np.float32)
    norm[10:20, 30:35] = 0.9  # 50 pixels
    norm[100:110, 100:120] = 0.6  # 200 pixels, gone above 0.6
    np.testing.assert_array_equal(sat_boxes(norm, [0.5, 0.6]), [[100, 100, 120, 110], [30, 10, 35, 20]])


def test_diagonal_pixels_are_8_connected():
    norm = np.zeros((224, 224), np.float32)
    norm[[5, 6, 7], [5, 6, 7]] = 1  # 3 diagonal pixels: one component of 3
    norm[50, 50:52] = 1  # 2 pixels
    np.testing.assert_array_equal(sat_boxes(norm, [0.5]), [[5, 5, 8, 8]])


def test_tie_takes_first_component_in_raster_order():
    # OpenCV's 2x2-block labelling numbers A (rows 1-2, column 0) before B (row 0, columns 5-6);
    # the official code (skimage labels + a stable sort by size) keeps B, met first in raster order.
    norm = np.zeros((224, 224), np.float32)
    norm[1:3, 0] = 1
    norm[0, 5:7] = 1
    np.testing.assert_array_equal(sat_boxes(norm, [0.5]), [[5, 0, 7, 1]])


def test_matches_reference_on_random_maps():
    thresholds = [0.2, 0.3, 0.35, 0.4, 0.45, 0.6]
    for loc_map in random_maps(24, seed=1):
        np.testing.assert_array_equal(sat_boxes(sat_map(loc_map), thresholds),
                                      naive_sat_boxes(loc_map, thresholds))


def test_predict_box_is_the_row_at_that_threshold(original):
    loc_map = original["maps"][5]
    np.testing.assert_array_equal(sat_box(torch.from_numpy(loc_map), 0.35), original["boxes"][5][1])


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


def test_accumulator_ious_are_the_official_ones(original):
    maps, gt, logits, labels = _fixture_batch(original)
    acc = SATLocAccumulator(original["thresholds"])
    np.testing.assert_array_equal(acc.update(torch.from_numpy(maps), gt, logits, labels), original["iou"])
    assert acc.compute()["num_images"] == 68


def test_accumulator_metrics_hand_checked(original):
    """Four fixture maps whose official IoUs at thresholds 0.3 / 0.35 / 0.4 / 0.45 are
    A (map 5): .635 .670 .651 .630   B (map 12): .357 .406 .462 .505
    C (map 3): .185 .215 .264 .343   D (map 6): 0 0 0 0
    A and C are classified right, B's class is 2nd (top-5 only), D's class is last of 10."""
    index = [5, 12, 3, 6]
    labels = torch.tensor([0, 1, 2, 3])
    logits = torch.zeros(4, 10)
    logits[0, 0] = logits[2, 2] = 1
    logits[1, 0], logits[1, 1] = 2, 1
    logits[3, 3] = -1
    acc = SATLocAccumulator(original["thresholds"])
    acc.update(original["maps"][index], [original["gt_boxes"][i][None] for i in index], logits, labels)
    result = acc.compute()
    assert result["num_images"] == 4
    assert result["top1_cls"] == 50.0 and result["top5_cls"] == 75.0  # A, C / A, B, C
    # IoU >= 0.5: A at every threshold, B at 0.45 only
    assert result["gt_known_loc_per_threshold"] == pytest.approx([25, 25, 25, 50])
    assert result["top1_loc_per_threshold"] == pytest.approx([25, 25, 25, 25])  # B is misclassified
    # GT-known + Top-1 hits per threshold: 2, 2, 2, 3 -> 0.45 is the best threshold
    assert result["best_threshold"] == pytest.approx(0.45)
    assert (result["gt_known_loc"], result["top1_loc"], result["top5_loc"]) == pytest.approx((50, 25, 50))
    assert (result["iou30"], result["iou50"], result["iou70"]) == pytest.approx((75, 50, 0))  # C: .343 >= 0.3


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


def official_percent(count, num_images):
    """A rate as the official code computes it: utils/accuracy.py's AverageMeter fed 100 or 0 per image
    (``updata(val, n)``: sum += val * n, cnt += n, avg = sum / cnt)."""
    total = cnt = 0.0
    for k in range(num_images):
        total += (100 if k < count else 0) * 1.0
        cnt += 1.0
    return total / cnt


def test_equal_hit_counts_are_ranked_as_the_official_floats_rank_them():
    """On the CUB test set (5,794 images), equal GT-known + Top-1 hit counts can give different official sums
    of percentages; the official ``>`` then picks the larger, which is not always the first."""
    n = 5794
    # thresholds: 5320 + 3682 = 4501 + 4501 hits, official sums 155.3676216775975 < 155.36762167759753
    result = _with_counts([0.3, 0.35], [5320, 4501], [3682, 4501], num_images=n)
    assert official_percent(5320, n) + official_percent(3682, n) < official_percent(4501, n) * 2
    assert result["best_threshold"] == 0.35
    assert (result["gt_known_loc"], result["top1_loc"]) == (official_percent(4501, n), official_percent(4501, n))
    # epochs (official train.py keeps best_loc on top1_acc + gt_acc > best_loc): 4502 + 4502 then 4503 + 4501
    best = {}
    for epoch, (gt_known, top1_loc) in enumerate([(4502, 4502), (4503, 4501)]):
        update_best(best, _with_counts([0.4], [gt_known], [top1_loc], num_images=n), "loc", epoch)
    assert official_percent(4502, n) * 2 < official_percent(4503, n) + official_percent(4501, n)
    assert best["best.pth"]["epoch"] == 2


def test_compute_without_images_raises():
    with pytest.raises(ValueError, match="no images"):
        SATLocAccumulator().compute()


def test_iou_exactly_at_each_level_counts_as_a_hit():
    """IoU >= 0.3 / 0.5 / 0.7 (the official evaluator's ``>=``), met exactly: the predicted box [0, 0, 9, 9] is
    100 pixels (+1 convention), the GT boxes [0, 0, 2|4|6, 9] 30, 50 and 70 pixels inside it."""
    acc = SATLocAccumulator([0.5])
    gt = [np.array([[0, 0, x1, 9]]) for x1 in (2, 4, 6)]  # IoU 0.3, 0.5, 0.7
    ious = acc.update_boxes(np.array([[[0, 0, 9, 9]]] * 3), gt, torch.eye(3) * 5, torch.arange(3))
    assert ious[:, 0].tolist() == [0.3, 0.5, 0.7]
    result = acc.compute_at(0.5)
    assert (result["iou30"], result["iou50"], result["iou70"]) == pytest.approx((100, 200 / 3, 100 / 3))
    assert result["gt_known_loc"] == result["top1_loc"] == result["top5_loc"] == pytest.approx(200 / 3)


def test_per_class_metrics_hand_checked():
    """Each class's Top-1 Cls / Top-1 Loc / GT-known Loc from its own rows' flags; a flag that is None (no classes
    predicted) leaves its metric out; a label without a name is named by its number."""
    rows = [{"label": 0, "cls_correct": True, "top1_loc": True, "gt_known": True},
            {"label": 0, "cls_correct": False, "top1_loc": False, "gt_known": True},
            {"label": 1, "cls_correct": True, "top1_loc": False, "gt_known": False},
            {"label": 2, "cls_correct": None, "top1_loc": None, "gt_known": True}]
    assert per_class_metrics(rows, ["a", "b"]) == {
        "a": {"num_images": 2, "top1_cls": 50.0, "top1_loc": 50.0, "gt_known_loc": 100.0},
        "b": {"num_images": 1, "top1_cls": 100.0, "top1_loc": 0.0, "gt_known_loc": 0.0},
        "2": {"num_images": 1, "gt_known_loc": 100.0}}


def test_top5_is_five_classes_deep():
    """Scores 6, 5, ..., 0 for classes 0 .. 6: class 4 is the 5th (a top-5 hit), class 5 the 6th (a miss)."""
    scores = torch.arange(6.0, -1, -1).expand(3, 7)
    top1, top5 = topk_correct(scores, torch.tensor([0, 4, 5]))
    assert top1.tolist() == [True, False, False] and top5.tolist() == [True, True, False]


def test_searched_thresholds_alone_report_the_classification_too():
    """sat_metrics with --thresholds and no reported threshold (model selection): the classification keys come
    from the search's accumulator, Top-5 included. Three images of 6 classes, the label ranked 1st, 2nd and 6th:
    Top-1 1 of 3, Top-5 2 of 3."""
    from utils.metrics import sat_metrics
    acc = SATLocAccumulator([0.3, 0.5])
    scores = torch.tensor([[9., 1, 2, 3, 4, 5], [1., 2, 9, 8, 7, 0], [6., 5, 4, 3, 2, 1]])
    boxes = np.array([[[0, 0, 9, 9], [0, 0, 9, 9]]] * 3)
    acc.update_boxes(boxes, [np.array([[0, 0, 9, 9]])] * 3, scores, torch.tensor([0, 3, 5]))
    out = sat_metrics(acc, None, [0.3, 0.5])
    assert (out["num_images"], out["top1_cls"], out["top5_cls"]) == (3, pytest.approx(100 / 3), pytest.approx(200 / 3))


def test_per_threshold_table_columns_line_up():
    # the 'GT-known / Top-1' cells are wider than their header ('0.4'): header and values must still line up
    from utils.metrics import format_tables
    metrics = {"num_images": 4, "threshold": 0.4, "top1_cls": 50.0, "top5_cls": 100.0, "top1_loc": 25.0,
               "top5_loc": 50.0, "gt_known_loc": 50.0, "iou30": 75.0, "iou50": 50.0, "iou70": 25.0,
               "thresholds": [0.4, 0.3], "gt_known_loc_per_threshold": [50.0, 75.0],
               "top1_loc_per_threshold": [25.0, 50.0]}
    for table in format_tables(metrics, "sat", "centre-crop").split("\n\n"):
        header, values = table.splitlines()[1:]
        assert [i for i, c in enumerate(header) if c == "|"] == [i for i, c in enumerate(values) if c == "|"], table
        assert len(header) == len(values), table


def test_per_class_metrics_reads_the_rows_once():
    """The rows are grouped by class in one pass, not scanned once per class (ImageNet: 1,000 classes x 50,000
    rows, a second per evaluation and per process)."""
    class Rows(list):
        passes = 0

        def __iter__(self):
            Rows.passes += 1
            return super().__iter__()

    rows = Rows({"label": k % 50, "cls_correct": True, "top1_loc": False, "gt_known": True} for k in range(200))
    result = per_class_metrics(rows, None)
    assert len(result) == 50 and result["7"] == {"num_images": 4, "top1_cls": 100.0, "top1_loc": 0.0,
                                                 "gt_known_loc": 100.0}
    assert Rows.passes == 1
