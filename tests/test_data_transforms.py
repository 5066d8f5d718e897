import numpy as np
import pytest
import torch
from PIL import Image

from DataLoader import transforms as T
from utils.boxes import gt_boxes_sat, gt_boxes_wsol


@pytest.fixture
def image():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8))


def test_protocol_a_boxes_match_hand_computed_values():
    boxes = [[10, 20, 300, 200], [390, 10, 400, 300]]
    # x0: 10/400*256-16 = -9.6 -> 0; y0: 20/300*256-16 = 1.07 -> 1; x1: 176; y1: 154.67 -> 154.
    # second box: x0 233.6 -> 233 (no upper clip on x0), y0 -> 0, x1 240 -> 223, y1 240 -> 223.
    expected = [[0, 1, 176, 154], [233, 0, 223, 223]]
    out = gt_boxes_sat(boxes, (400, 300))
    assert out.dtype.kind == "i" and out.tolist() == expected


def test_protocol_a_other_sizes_and_truncation_toward_zero():
    # resize 320, crop 288 -> shift 16, clip 287; x1 = 10/400*320-16 = -8 stays -8 (int of a negative).
    assert gt_boxes_sat([[0, 0, 10, 150]], (400, 300), 320, 288).tolist() == [[0, 0, -8, 144]]


def test_protocol_a_shift_is_the_centre_crop_offset_for_odd_gaps(image):
    # resize 75, crop 64: CenterCrop cuts at round(5.5) = 6 (ties to even), not 11 // 2 = 5
    assert gt_boxes_sat([[8, 8, 40, 40]], (80, 80), 75, 64).tolist() == [[1, 1, 31, 31]]
    resized = np.asarray(image.resize((75, 75), Image.BILINEAR))
    crop = np.asarray(T.test_transform(64, 75).transforms[1](Image.fromarray(resized)))
    assert np.array_equal(crop, resized[6:70, 6:70])


def test_protocol_b_boxes_match_hand_computed_values():
    # 10*224/400 = 5.6 -> 5; 20*224/300 = 14.93 -> 14; 300*224/400 = 168; 200*224/300 = 149.33 -> 149.
    assert gt_boxes_wsol(np.array([[10., 20., 300., 200.]]), (400, 300)).tolist() == [[5, 14, 168, 149]]
    assert gt_boxes_wsol(torch.tensor([[0., 0., 400., 300.]]), (400, 300)).tolist() == [[0, 0, 224, 224]]


def test_image_transform_shapes(image):
    assert T.train_transform()(image).shape == (3, 224, 224)
    assert T.test_transform()(image).shape == (3, 224, 224)
    assert T.wsol_transform()(image).shape == (3, 224, 224)
    assert T.test_transform(32, 40)(image).shape == (3, 32, 32)


def test_tencrop_shape_and_centre_index(image):
    crops = T.tencrop_transform()(image)
    assert crops.shape == (10, 3, 224, 224)
    assert torch.allclose(crops[4], T.test_transform()(image))
    assert torch.allclose(crops[9], T.test_transform()(image.transpose(Image.FLIP_LEFT_RIGHT)))


def test_denormalize_inverts_normalisation(image):
    restored = T.denormalize(T.wsol_transform(80)(image.resize((80, 80))))
    assert restored.dtype == np.uint8 and restored.shape == (80, 80, 3)
    assert np.abs(restored.astype(int) - np.asarray(image.resize((80, 80)))).max() <= 1


def test_normalisation_is_imagenets_mean_and_std():
    """A pixel (255, 0, 128) -> ((1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (128 / 255 - 0.406) / 0.225), the
    ImageNet statistics DeiT was trained with, in every view."""
    image = Image.new("RGB", (40, 30), (255, 0, 128))
    expected = torch.tensor([2.2489083, -2.0357143, 0.4264924]).view(3, 1, 1)
    for view in (T.train_transform(16, 20), T.test_transform(16, 20), T.wsol_transform(16)):
        torch.testing.assert_close(view(image), expected.expand(3, 16, 16), atol=1e-6, rtol=0)
    torch.testing.assert_close(T.tencrop_transform(16, 20)(image), expected.expand(10, 3, 16, 16), atol=1e-6, rtol=0)
