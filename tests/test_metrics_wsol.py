import numpy as np
import pytest
import torch

from reference_boxes import naive_wsol_boxes, random_maps
from utils.boxes import WSOL_THRESHOLDS, contour_boxes, wsol_map
from utils.errors import DataError
from utils.metrics import PxAPAccumulator, WSOLBoxAccumulator


def _score(*regions, value=1.0):
    """224x224 score map (already in [0, 1]) with `value` on each (y0, y1, x0, x1) slice."""
    score = np.zeros((224, 224))
    for y0, y1, x0, x1 in regions:
        score[y0:y1, x0:x1] = value
    return score


def _box_result(maps, gts):
    acc = WSOLBoxAccumulator()
    acc.update(maps, [np.array(gt) for gt in gts])
    return acc.compute()


def test_score_map_resize_and_normalise():
    score = wsol_map(torch.rand(14, 14))
    assert score.shape == (224, 224) and score.dtype == np.float64
    assert score.min() == 0 and score.max() == 1
    np.testing.assert_array_equal(wsol_map(score), score)  # idempotent on a score map
    assert not wsol_map(np.full((224, 224), 0.3)).any()  # constant -> zeros
    nan_map = np.ones((14, 14))
    nan_map[0, 0] = np.nan
    assert not wsol_map(nan_map).any()


def test_saved_score_map_gives_identical_counts(tmp_path):
    raw = random_maps(3, seed=4)
    for i, loc_map in enumerate(raw):
        np.save(tmp_path / f"{i}.npy", wsol_map(loc_map))
    reread = np.stack([np.load(tmp_path / f"{i}.npy") for i in range(3)])
    gts = [np.array([[30, 40, 150, 170]])] * 3
    direct, from_file = WSOLBoxAccumulator(), WSOLBoxAccumulator()
    direct.update(np.stack(raw), gts)
    from_file.update(reread, gts)
    assert all(np.array_equal(direct.state()[k], from_file.state()[k]) for k in direct.COUNTERS)


def test_unimodal_blob():
    all_boxes, largest = contour_boxes(_score((50, 100, 60, 120)), [0.0, 0.5, 0.99])
    np.testing.assert_array_equal(largest, [[60, 50, 120, 100]] * 3)
    assert all(b.tolist() == [[60, 50, 120, 100]] for b in all_boxes)
    result = _box_result([_score((50, 100, 60, 120))], [[[60, 50, 119, 99]]])  # IoU 3000 / 3111
    assert result["maxboxacc"] == result["maxboxaccv2"] == 100.0
    assert result["maxboxacc_threshold"] == 0.0


def test_binarisation_is_strictly_above_int_t_times_max():
    score = _score((40, 140, 40, 140), value=0.5)  # uint8 127
    score[80:100, 80:100] = 1.0  # uint8 255
    _, largest = contour_boxes(score, [0.49, 0.5])  # levels 124 (127 kept) and 127 (127 dropped)
    np.testing.assert_array_equal(largest, [[40, 40, 140, 140], [80, 80, 100, 100]])


def test_box_is_clipped_to_223():
    _, largest = contour_boxes(_score((200, 224, 210, 224)), [0.5])
    np.testing.assert_array_equal(largest, [[210, 200, 223, 223]])


def test_all_zero_map_gives_zero_boxes():
    all_boxes, largest = contour_boxes(wsol_map(np.zeros((14, 14))), WSOL_THRESHOLDS)
    assert not largest.any() and all(b.tolist() == [[0, 0, 0, 0]] for b in all_boxes)
    result = _box_result([np.zeros((14, 14))], [[[0, 0, 9, 9]]])  # IoU 1 / 100
    assert result["maxboxacc"] == result["maxboxaccv2"] == 0.0


def test_multimodal_largest_vs_all_contours():
    big_and_small = _score((20, 120, 10, 110), (150, 190, 150, 190))
    result = _box_result([big_and_small], [[[150, 150, 189, 189]]])  # GT on the small blob
    assert result["maxboxacc"] == 0.0  # the largest contour is the big blob
    assert result["maxboxaccv2"] == 100.0
    assert result["maxboxaccv2_per_iou"] == {30: 100.0, 50: 100.0, 70: 100.0}

    dim_big = _score((20, 120, 10, 110), value=0.6)
    dim_big[150:190, 150:190] = 1.0  # above 0.6 only the small blob is left
    result = _box_result([dim_big], [[[150, 150, 189, 189]]])
    assert result["maxboxacc"] == 100.0 and result["maxboxacc_threshold"] == pytest.approx(0.6)


def test_multi_box_images():
    maps = [_score((20, 120, 10, 110), (150, 190, 150, 190))] * 2
    gts = [[[150, 150, 189, 189]], [[150, 150, 189, 189], [10, 20, 109, 119]]]  # second: both objects
    result = _box_result(maps, gts)
    assert result["maxboxacc"] == 50.0
    assert result["maxboxaccv2"] == 100.0


def test_hole_contours_count_for_all_contours():
    ring = _score((50, 150, 50, 150))
    ring[80:120, 80:120] = 0
    all_boxes, largest = contour_boxes(ring, [0.5])
    assert sorted(all_boxes[0].tolist()) == [[50, 50, 150, 150], [79, 79, 121, 121]]  # outer and hole
    np.testing.assert_array_equal(largest, [[50, 50, 150, 150]])
    result = _box_result([ring], [[[80, 80, 119, 119]]])  # GT on the hole: IoU 0.865 with its box
    assert result["maxboxacc"] == 0.0
    assert result["maxboxaccv2_per_iou"] == {30: 100.0, 50: 100.0, 70: 100.0}


def test_matches_reference_implementation():
    maps = [wsol_map(m) for m in random_maps(12, seed=2)]
    maps.append(_score((10, 30, 10, 30), (100, 120, 100, 120)))  # equal areas: the first contour wins
    for score in maps:
        all_boxes, largest = contour_boxes(score)
        ref_all, ref_largest = naive_wsol_boxes(score, WSOL_THRESHOLDS)
        np.testing.assert_array_equal(largest, ref_largest)
        assert all(np.array_equal(a, r) for a, r in zip(all_boxes, ref_all))


def test_box_accumulator_merge_and_v2_average():
    maps = np.stack(random_maps(10, seed=3))
    gts = [np.array([[20, 30, 120, 150], [140, 10, 220, 90]])] * 10
    single = WSOLBoxAccumulator()
    single.update(maps, gts)
    parts = [WSOLBoxAccumulator(), WSOLBoxAccumulator()]
    parts[0].update(maps[:4], gts[:4])
    parts[1].update(torch.from_numpy(maps[4:]), gts[4:])
    result = single.compute()
    assert parts[0].merge(parts[1].state()).compute() == result
    assert result["maxboxaccv2"] == pytest.approx(np.mean(list(result["maxboxaccv2_per_iou"].values())))
    assert set(result["maxboxaccv2_threshold_per_iou"]) == {30, 50, 70}


def _pxap(maps, masks, ignore=None):
    acc = PxAPAccumulator()
    acc.update(np.stack(maps), np.stack(masks), None if ignore is None else np.stack(ignore))
    return acc.compute()


def test_pxap_perfect_and_inverted_maps():
    mask = _score((50, 150, 60, 120)).astype(bool)
    perfect = _pxap([mask.astype(np.float64)], [mask])
    assert perfect["pxap"] == pytest.approx(100.0) and perfect["piou"] == pytest.approx(100.0)
    # inverted: foreground scores 0, so it is only recalled at the lowest threshold, with the
    # precision of "everything is foreground"
    inverted = _pxap([1.0 - mask], [mask.astype(np.uint8)])
    assert inverted["pxap"] == pytest.approx(100.0 * mask.mean())


def test_pxap_two_level_map():
    mask = _score((0, 10, 0, 10)).astype(bool)  # 100 foreground pixels
    score = _score((0, 10, 0, 10), (100, 110, 100, 110))  # and 100 background pixels scored 1
    assert _pxap([score], [mask])["pxap"] == pytest.approx(50.0)  # precision 0.5 at recall 1


def test_pxap_ignores_ignore_region_outside_foreground():
    mask = _score((50, 150, 60, 120)).astype(bool)
    score = mask.astype(np.float64)
    score[0:20, 0:20] = 1.0  # false positives ...
    ignore = np.zeros_like(mask)
    ignore[0:20, 0:20] = True  # ... inside an ignore region
    ignore[60:70, 70:80] = True  # overlapping the foreground: stays foreground
    assert _pxap([score], [mask])["pxap"] < 100.0
    assert _pxap([score], [mask], [ignore])["pxap"] == pytest.approx(100.0)


def test_piou_at_a_fixed_map_threshold():
    """compute_at: the pixel IoU at a map threshold chosen on another split; at piou_threshold it is piou."""
    mask = _score((0, 10, 0, 10)).astype(bool)  # 100 foreground pixels
    score = 0.35 * _score((0, 10, 0, 5)) + 0.65 * _score((0, 10, 5, 10)) + 0.15 * _score((100, 110, 100, 105))
    acc = PxAPAccumulator()
    acc.update(score[None], mask[None], normalised=True)
    assert acc.compute_at(0.3) == {"wsol_threshold": 0.3, "piou": pytest.approx(100.0)}  # all 100, no false one
    assert acc.compute_at(0.6)["piou"] == pytest.approx(50.0)  # half of them
    assert acc.compute_at(0.1)["piou"] == pytest.approx(100 / 150 * 100)  # all, and 50 false positives
    best = acc.compute()
    assert acc.compute_at(best["piou_threshold"])["piou"] == best["piou"]
    with pytest.raises(ValueError, match="not on the wsolevaluation grid"):
        acc.compute_at(0.555)
    # reported as written, without np.arange's noise (0.5700000000000001, 0.29000000000000004)
    assert [acc.compute_at(t)["wsol_threshold"] for t in (0.57, 0.29)] == [0.57, 0.29]


def test_pxap_merge_equals_single_pass_and_input_checks():
    maps = np.stack(random_maps(6, seed=5))
    masks = np.zeros((6, 224, 224), np.uint8)
    masks[:, 60:160, 40:150] = 1
    single = PxAPAccumulator()
    single.update(maps, masks)
    parts = [PxAPAccumulator(), PxAPAccumulator()]
    parts[0].update(maps[:2], masks[:2])
    parts[1].update(maps[2:], masks[2:])
    assert parts[0].merge(parts[1].state()).compute() == single.compute()
    with pytest.raises(ValueError, match="masks must be"):
        single.update(maps[:1], masks[:1, :100])
    with pytest.raises(ValueError, match="cam_thresholds"):
        PxAPAccumulator(np.arange(0.1, 1, 0.1))
    # every mask empty: the data's fault, a one-line DataError (evaluator.py printed a traceback)
    with pytest.raises(DataError, match="masks of the 1 evaluated images hold no foreground pixel"):
        _pxap([maps[0]], [np.zeros((224, 224), bool)])


def test_images_whose_mask_is_empty_are_counted():
    """An empty mask is scored as wsolevaluation scores it (all background), and counted: likely a broken file."""
    mask = _score((0, 10, 0, 10)).astype(bool)
    acc = PxAPAccumulator()
    acc.update(np.stack([_score((0, 10, 0, 10))] * 3), np.stack([mask, np.zeros_like(mask), mask]), normalised=True)
    assert acc.compute()["empty_masks"] == 1
    merged = PxAPAccumulator().merge(acc.state()).merge(acc.state())
    assert merged.compute()["empty_masks"] == 2
    full = PxAPAccumulator()
    full.update(_score((0, 10, 0, 10))[None], mask[None], normalised=True)
    assert "empty_masks" not in full.compute()


def _boundary_images():
    """Four score maps and GT boxes whose IoUs are hand-checked: a 9x9 blob at rows / columns 10-18 has the box
    [10, 10, 19, 19] (100 pixels, +1 convention) at every map threshold; GT [10, 10, 12|14|16, 19] covers 30, 50
    and 70 of them (IoU exactly 0.3, 0.5, 0.7). The fourth map has a larger second blob, and its GT is the small
    blob's box: hit by all contours (IoU 1), missed by the largest."""
    blob = _score((10, 19, 10, 19))
    two = _score((10, 19, 10, 19), (100, 200, 100, 200))
    gts = [np.array([[10, 10, x1, 19]]) for x1 in (12, 14, 16)] + [np.array([[10, 10, 19, 19]])]
    return [blob, blob, blob, two], gts


def test_box_iou_exactly_at_the_iou_threshold_counts():
    """wsolevaluation counts IoU >= threshold / 100 (MaxBoxAcc at 0.5, MaxBoxAccV2 at 0.3 / 0.5 / 0.7)."""
    result = _box_result(*_boundary_images())
    assert result["maxboxacc"] == 50.0  # largest contour: images 2 (IoU 0.5) and 3 (0.7)
    assert result["maxboxaccv2_per_iou"] == {30: 100.0, 50: 75.0, 70: 50.0}
    assert result["maxboxaccv2"] == pytest.approx(75.0)


def test_box_accuracy_at_a_fixed_map_threshold_hand_checked():
    """compute_at: BoxAcc from the largest contour, BoxAccV2 the mean of its per-IoU accuracies."""
    acc = WSOLBoxAccumulator()
    maps, gts = _boundary_images()
    acc.update(np.stack(maps), gts, normalised=True)
    fixed = acc.compute_at(0.5)
    assert fixed["wsol_threshold"] == 0.5 and fixed["boxacc"] == 50.0
    assert fixed["boxaccv2_per_iou"] == {30: 100.0, 50: 75.0, 70: 50.0}
    assert fixed["boxaccv2"] == pytest.approx(75.0)
