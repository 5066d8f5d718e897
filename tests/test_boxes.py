import numpy as np
import pytest
import torch

from utils.boxes import iou_plus1, max_iou, sat_box, wsol_map
from utils.metrics import CounterState


def test_iou_plus1_hand_computed():
    a = np.array([[0, 0, 9, 9]])  # 10 x 10 pixels under the +1 convention
    b = np.array([[5, 5, 14, 14], [9, 0, 18, 9], [10, 10, 20, 20], [0, 0, 9, 9]])
    # overlap 5x5 of 100 + 100; shared column of 1x10; disjoint; identical
    np.testing.assert_allclose(iou_plus1(a, b), [[25 / 175, 10 / 190, 0.0, 1.0]])


def test_iou_plus1_degenerate_and_shapes():
    zero = np.array([0, 0, 0, 0])  # a single pixel under the +1 convention
    assert iou_plus1(zero, [[0, 0, 9, 9]])[0, 0] == pytest.approx(1 / 100)
    assert iou_plus1([[5, 5, 3, 3]], [[5, 5, 3, 3]])[0, 0] == 0.0  # malformed: non-positive union
    assert iou_plus1(np.zeros((3, 4)), torch.zeros(2, 4)).shape == (3, 2)


@pytest.mark.parametrize("to_box", [lambda m: sat_box(m, 0.4), wsol_map])
def test_a_batch_of_maps_where_one_map_is_taken_is_a_one_line_error(to_box):
    """model(images)'s maps (B, h, w) given whole: OpenCV took them as an image of h x w pixels and B channels
    (sat_box: 'too many values to unpack'; wsol_map: a (224, 224, B) map, silently)."""
    with pytest.raises(ValueError, match=r"a localization map is 2-D \(h, w\), got shape \(2, 14, 14\).*loc_maps\[0\]"):
        to_box(torch.rand(2, 14, 14))
    assert np.shape(to_box(torch.rand(14, 14))) in ((4,), (224, 224))

def test_max_iou_takes_best_gt_box():
    pred = np.array([[0, 0, 9, 9], [20, 20, 29, 29]])
    gt = np.array([[20, 20, 29, 29], [0, 0, 4, 9]])
    np.testing.assert_allclose(max_iou(pred, gt), [0.5, 1.0])


class _Toy(CounterState):
    COUNTERS = ("num_images", "hits")

    def __init__(self):
        self.num_images = np.zeros((), np.int64)
        self.hits = np.zeros(3, np.int64)


def test_counter_state_merge_and_reduce():
    a, b = _Toy(), _Toy()
    a.num_images += 2
    a.hits += [1, 2, 0]
    b.num_images += 1
    b.hits += [0, 1, 1]
    a.merge(b.state())
    assert int(a.num_images) == 3 and a.hits.tolist() == [1, 3, 1]
    a.reduce(lambda x: torch.from_numpy(x) * 2)  # e.g. an all-reduce over two identical ranks
    assert int(a.num_images) == 6 and a.hits.tolist() == [2, 6, 2] and a.num_images.shape == ()
    with pytest.raises(ValueError, match="no images"):
        _Toy()._check_nonempty()
