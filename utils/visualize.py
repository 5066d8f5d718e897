"""Overlays of localization maps: heat map blended on the image, predicted box (green), GT boxes (red)."""
import os
import unicodedata
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from utils.cv import cv2

PRED_COLOR = (0, 255, 0)  # RGB
GT_COLOR = (255, 0, 0)


def heatmap_overlay(image: np.ndarray, score_map: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a [0, 1] score map (any size, resized bilinearly) as a JET heat map onto an RGB uint8 image."""
    h, w = image.shape[:2]
    resized = cv2.resize(np.asarray(score_map, dtype=np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    heat = cv2.applyColorMap(np.uint8(np.clip(resized, 0, 1) * 255), cv2.COLORMAP_JET)[:, :, ::-1]
    return np.uint8(np.clip((1 - alpha) * image.astype(np.float32) + alpha * heat, 0, 255))


def draw_boxes(image: np.ndarray, boxes: Sequence[Sequence[float]], color, thickness: int = 2) -> np.ndarray:
    """Draw (x0, y0, x1, y1) boxes on a copy of an RGB uint8 image."""
    out = np.ascontiguousarray(image).copy()
    for x0, y0, x1, y1 in np.asarray(boxes, dtype=np.float64).reshape(-1, 4):
        cv2.rectangle(out, (int(x0), int(y0)), (int(x1), int(y1)), color, thickness)
    return out


def drawable(text) -> str:
    """``text`` as OpenCV's Hershey fonts can draw it: they have ASCII only and draw every byte of another
    character's UTF-8 as '?' ('héron' -> 'h??ron'); accents are dropped ('heron'), other characters one '?'."""
    text = unicodedata.normalize("NFKD", str(text))
    return "".join(c if c.isascii() else "?" for c in text if not unicodedata.combining(c))


def fit_scale(lines, width, scale, thickness=1, font=cv2.FONT_HERSHEY_SIMPLEX, smallest=0.1):
    """The largest font scale up to ``scale`` at which every one of ``lines`` is at most ``width`` pixels wide
    (``smallest`` if none is), measured by OpenCV at that scale: its fonts are drawn at a few discrete sizes
    (OpenCV 5), so that shrinking the scale in proportion to the width can leave the text as wide as before."""
    lines = [lines] if isinstance(lines, str) else lines
    while scale > smallest and max(cv2.getTextSize(line, font, scale, thickness)[0][0] for line in lines) > width:
        scale = max(smallest, scale * 0.95)
    return scale


def render_overlay(image: np.ndarray, score_map: np.ndarray, pred_box=None, gt_boxes=None,
                   caption: Optional[str] = None, gt_mask=None) -> np.ndarray:
    """Heat map + predicted box + GT boxes (or the outline of a GT mask of the image's size) + an optional
    caption, as an RGB uint8 image."""
    out = heatmap_overlay(image, score_map)
    if gt_boxes is not None and len(gt_boxes):
        out = draw_boxes(out, gt_boxes, GT_COLOR)
    if gt_mask is not None:
        contours, _ = cv2.findContours(np.asarray(gt_mask, np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        out = cv2.drawContours(np.ascontiguousarray(out).copy(), contours, -1, GT_COLOR, 2)
    if pred_box is not None:
        out = draw_boxes(out, [pred_box], PRED_COLOR)
    if caption:
        caption = drawable(caption)
        font, scale = cv2.FONT_HERSHEY_SIMPLEX, 0.4
        scale = fit_scale(caption, out.shape[1] - 8, scale, thickness=3, font=font)  # shrink to fit the width
        cv2.putText(out, caption, (4, 12), font, scale, (0, 0, 0), 3, cv2.LINE_AA)
        cv2.putText(out, caption, (4, 12), font, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def encoded(path, image: np.ndarray) -> bytes:
    """A BGR uint8 image as the bytes of the file format of ``path``'s extension (PNG, JPEG, ...). Encoded in
    memory and written by Python, a full disk or a folder without permission is an OSError naming its cause
    (cv2.imwrite returns False for both, after printing libpng's own error line)."""
    ok, data = cv2.imencode(Path(path).suffix, image)
    if not ok:
        raise ValueError(f"{path}: OpenCV could not encode the image as {Path(path).suffix}")
    return data.tobytes()


def save_rgb(path, image: np.ndarray) -> Path:
    """Write an RGB uint8 image (PNG/JPEG by extension), creating parent folders; whole (:func:`write_image`): a
    full disk left a truncated or empty PNG among the overlays of train.py's final test, which writes them in
    place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_image(path, np.ascontiguousarray(image[:, :, ::-1]))
    return path


def write_image(path, image: np.ndarray) -> None:
    """Write a BGR uint8 image (format by extension) whole: through a temporary file beside ``path`` renamed in
    place, so that a figure that cannot be written (a full disk) leaves the previous one as it was; an OSError
    naming ``path`` then (callers say it in one line: writing_outputs)."""
    path = Path(path)
    data = encoded(path, image)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as err:
        raise OSError(err.errno, err.strerror, str(path)) from None
    finally:
        if tmp.exists():
            tmp.unlink()


SERIES_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]  # RGB


def line_panel(title, series, x_range, y_range, size=(480, 360)):
    """One line plot drawn with OpenCV, as an RGB uint8 image: ``series`` = {name: (x values, y values)}."""
    (x0, x1), (y0, y1), (width, height) = x_range, y_range, size
    left, right, top, bottom = 48, 12, 28, 36
    image = np.full((height, width, 3), 255, np.uint8)

    def point(x, y):
        return (int(left + (x - x0) / (x1 - x0) * (width - left - right)),
                int(height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom)))
    cv2.rectangle(image, point(x0, y0), point(x1, y1), (0, 0, 0), 1)
    for k in range(6):
        fraction = k / 5
        x, y = x0 + fraction * (x1 - x0), y0 + fraction * (y1 - y0)
        cv2.putText(image, f"{x:g}", (point(x, y0)[0] - 8, height - bottom + 16), cv2.FONT_HERSHEY_SIMPLEX,
                    0.35, (0, 0, 0), 1, cv2.LINE_AA)
        cv2.putText(image, f"{y:g}", (4, point(x0, y)[1] + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (0, 0, 0), 1,
                    cv2.LINE_AA)
    for k, (name, (xs, ys)) in enumerate(series.items()):
        color = SERIES_COLORS[k % len(SERIES_COLORS)]
        line = np.array([point(x, y) for x, y in zip(xs, ys)], np.int32)
        if len(line):
            cv2.polylines(image, [line], False, color, 2, cv2.LINE_AA)
        cv2.putText(image, drawable(name), (left + 8, top + 16 + 14 * k), cv2.FONT_HERSHEY_SIMPLEX, 0.4, color,
                    1, cv2.LINE_AA)
    cv2.putText(image, drawable(title), (left, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return image


def bar_panel(title, labels, series, y_range, size=(480, 360)):
    """Grouped bars drawn with OpenCV, as an RGB uint8 image: one group per label (written upright below
    its group), one bar per series (``series`` = {name: one value per label}); bars 6 to 24 pixels wide,
    the panel wider than ``size`` when the groups need it."""
    (y0, y1), height = y_range, size[1]
    left, right, top, gap = 48, 12, 28, 4
    font, scale = cv2.FONT_HERSHEY_SIMPLEX, 0.35
    names = [drawable(label)[:28] for label in labels]
    bottom = 8 + max([cv2.getTextSize(name, font, scale, 1)[0][0] for name in names] + [0])
    bar_width = int(np.clip((size[0] - left - right) // max(1, len(names)) // max(1, len(series)), 6, 24))
    group = len(series) * bar_width + gap
    width = max(size[0], left + right + len(names) * group)
    image = np.full((height + bottom, width, 3), 255, np.uint8)
    base = height - 8

    def level(y):
        return int(base - (min(max(y, y0), y1) - y0) / (y1 - y0) * (base - top))
    cv2.rectangle(image, (left, level(y1)), (width - right, base), (0, 0, 0), 1)
    for k in range(6):
        y = y0 + k / 5 * (y1 - y0)
        cv2.putText(image, f"{y:g}", (4, level(y) + 4), font, scale, (0, 0, 0), 1, cv2.LINE_AA)
    for g, name in enumerate(names):
        x = left + gap + g * group
        for k, values in enumerate(series.values()):
            if values[g] is not None:
                cv2.rectangle(image, (x + k * bar_width, level(values[g])), (x + (k + 1) * bar_width - 1, base),
                              SERIES_COLORS[k % len(SERIES_COLORS)], -1)
        text_width = cv2.getTextSize(name, font, scale, 1)[0][0]
        strip = np.full((12, text_width + 2, 3), 255, np.uint8)
        cv2.putText(strip, name, (1, 9), font, scale, (0, 0, 0), 1, cv2.LINE_AA)
        strip = cv2.rotate(strip, cv2.ROTATE_90_CLOCKWISE)  # reads top to bottom
        column = x + max(0, (group - gap - strip.shape[1]) // 2)
        image[base + 4:base + 4 + strip.shape[0], column:column + strip.shape[1]] = strip[:, :width - column]
    for k, name in enumerate(series):
        cv2.putText(image, drawable(name), (left + 8, top + 16 + 14 * k), font, 0.4,
                    SERIES_COLORS[k % len(SERIES_COLORS)], 1, cv2.LINE_AA)
    cv2.putText(image, drawable(title), (left, 18), font, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return image


def stack_panels(rows):
    """Panels side by side in each row, rows top to bottom (narrower rows padded white), as one image."""
    lines = []
    for row in rows:
        height = max(panel.shape[0] for panel in row)
        lines.append(np.concatenate([np.pad(panel, ((0, height - panel.shape[0]), (0, 0), (0, 0)),
                                            constant_values=255) for panel in row], axis=1))
    width = max(line.shape[1] for line in lines)
    return np.concatenate([np.pad(line, ((0, 0), (0, width - line.shape[1]), (0, 0)), constant_values=255)
                           for line in lines], axis=0)


def plot_curves(path, panels, panel_size=(480, 360)):
    """Line plots side by side, drawn with OpenCV: ``panels`` = [(title, x values, {name: y values},
    (x_min, x_max), (y_min, y_max))]. Writes a PNG and returns its path."""
    return save_rgb(path, stack_panels([[line_panel(title, {name: (xs, ys) for name, ys in series.items()},
                                                    x_range, y_range, panel_size)
                                         for title, xs, series, x_range, y_range in panels]]))
