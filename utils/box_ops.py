"""Box helpers shared by the two localization protocols: IoU with the +1 pixel convention (the official
``utils/accuracy.py``'s ``IoU`` and wsolevaluation's ``calculate_multiple_iou``)."""
import numpy as np
import torch


def as_numpy(x, dtype=None):
    """Tensor (detached, moved to the CPU; half precision widened exactly) or array-like -> numpy."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = (x.float() if x.dtype in (torch.float16, torch.bfloat16) else x).numpy()
    return np.asarray(x, dtype=dtype)


def iou_plus1(boxes_a, boxes_b):
    """IoU matrix (N, M) of x0y0x1y1 boxes, areas counted as (x1 - x0 + 1) * (y1 - y0 + 1).

    A non-positive union (only possible for malformed boxes) gives IoU 0, as in wsolevaluation.
    """
    a = as_numpy(boxes_a, np.float64).reshape(-1, 4)[:, None, :]
    b = as_numpy(boxes_b, np.float64).reshape(-1, 4)[None, :, :]
    inter_w = np.maximum(0, np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]) + 1)
    inter_h = np.maximum(0, np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]) + 1)
    inter = inter_w * inter_h
    area_a = (a[..., 2] - a[..., 0] + 1) * (a[..., 3] - a[..., 1] + 1)
    area_b = (b[..., 2] - b[..., 0] + 1) * (b[..., 3] - b[..., 1] + 1)
    union = area_a + area_b - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def max_iou(pred_boxes, gt_boxes):
    """For each predicted box (N, 4), its best IoU over the image's GT boxes (K, 4) -> (N,)."""
    return iou_plus1(pred_boxes, gt_boxes).max(axis=1)
