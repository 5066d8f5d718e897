"""Overlay rendering: heat map blending, box colours, caption fitting, PNG writing."""
import cv2
import numpy as np

from utils.visualize import GT_COLOR, PRED_COLOR, heatmap_overlay, render_overlay, save_rgb


def test_heatmap_overlay_follows_the_map():
    image = np.full((64, 64, 3), 128, np.uint8)
    score = np.zeros((8, 8), np.float32)
    score[:, 4:] = 1.0  # right half hot
    out = heatmap_overlay(image, score)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert out[32, 60, 0] > out[32, 60, 2]  # JET high = red on the right
    assert out[32, 4, 2] > out[32, 4, 0]  # JET low = blue on the left


def test_boxes_and_caption_are_drawn(tmp_path):
    image = np.zeros((100, 100, 3), np.uint8)
    long_caption = "001.A_very_long_class_name_that_would_not_fit  IoU 0.75 @ 0.4"
    out = render_overlay(image, np.zeros((7, 7)), pred_box=[10, 10, 50, 50], gt_boxes=[[60, 60, 90, 90]],
                         caption=long_caption)
    assert tuple(out[30, 10]) == PRED_COLOR and tuple(out[75, 60]) == GT_COLOR
    assert out[0:16, 30:60].max() > 150  # the caption, shrunk to fit, is drawn in white
    path = save_rgb(tmp_path / "sub" / "overlay.png", out)
    assert np.array_equal(cv2.imread(str(path))[:, :, ::-1], out)
