"""Overlay rendering: heat map blending, box colours, caption fitting, PNG writing."""
import errno
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from tools.make_figures import main as make_figures
from utils.errors import OutputError, run_cli
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


def full_disk_write(path, data):
    """Path.write_bytes on a full disk: part of the file written, then ENOSPC."""
    with open(path, "wb") as file:
        file.write(data[:10])
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_make_figures_draws_the_architecture_and_a_grid_of_a_runs_overlays(tmp_path, monkeypatch, capsys):
    from tools import make_figures as module
    from tools.make_figures import main as make_figures
    # no demo run: the grid is skipped, in the one line that says what was drawn (it was skipped silently)
    monkeypatch.setattr(module, "__file__", str(tmp_path / "repo" / "tools" / "make_figures.py"))
    make_figures(["--output-dir", str(tmp_path / "arch")])
    assert capsys.readouterr().out == (f"drew {tmp_path / 'arch' / 'architecture.png'}; skipped demo_overlays.png: "
                                       f"no demo run at {tmp_path / 'repo' / 'output' / 'demo'} (python train.py "
                                       "--config config/demo.yaml writes one; or give --demo-run)\n")
    assert sorted(p.name for p in (tmp_path / "arch").iterdir()) == ["architecture.png"]
    # a full disk: one line naming the file and the cause, not 'drew ...' with exit 0 (nor libpng's own error
    # line, as cv2.imwrite printed); the figure already there is left whole
    before = (tmp_path / "arch" / "architecture.png").read_bytes()
    monkeypatch.setattr(Path, "write_bytes", full_disk_write)
    with pytest.raises(OutputError, match=r"^could not write \S+/arch/architecture.png: no space left on the device$"):
        make_figures(["--output-dir", str(tmp_path / "arch")])
    assert capsys.readouterr().out == ""
    assert sorted(p.name for p in (tmp_path / "arch").iterdir()) == ["architecture.png"]
    assert (tmp_path / "arch" / "architecture.png").read_bytes() == before
    monkeypatch.undo()
    run = tmp_path / "demo_run"
    colours = {"001.a": [(0, 0, 255), (0, 255, 0), (255, 0, 0)], "002.b": [(9, 9, 9)]}
    for name, fills in colours.items():
        (run / "overlays" / name).mkdir(parents=True)
        for k, fill in enumerate(fills):
            cv2.imwrite(str(run / "overlays" / name / f"{k}.png"), np.full((40, 60, 3), fill, np.uint8))
    make_figures(["--demo-run", str(run), "--output-dir", str(tmp_path / "img"), "--per-class", "2"])
    assert capsys.readouterr().out == (f"drew {tmp_path / 'img' / 'architecture.png'} and "
                                       f"{tmp_path / 'img' / 'demo_overlays.png'} (from {run / 'overlays'})\n")
    assert cv2.imread(str(tmp_path / "img" / "architecture.png")) is not None
    grid = cv2.imread(str(tmp_path / "img" / "demo_overlays.png"))
    assert grid.shape == (2 * 160, 2 * 160, 3)  # a row per class, the first 2 overlays of each, 160 px tiles
    assert (grid[80, 80] == (0, 0, 255)).all() and (grid[80, 240] == (0, 255, 0)).all()
    assert (grid[240, 80] == (9, 9, 9)).all() and (grid[240, 240] == 255).all()  # a short class: padded white


def test_make_figures_reads_nested_class_folders_and_names_an_unreadable_png(tmp_path):
    import pytest

    from tools.make_figures import main as make_figures
    from utils.errors import DataError
    run = tmp_path / "folder_run"  # a folder dataset's overlays: overlays/test/<class>/<name>.png
    for name, fill in (("a", (0, 0, 255)), ("b", (0, 255, 0))):
        (run / "overlays" / "test" / name).mkdir(parents=True)
        cv2.imwrite(str(run / "overlays" / "test" / name / "0.png"), np.full((40, 40, 3), fill, np.uint8))
    make_figures(["--demo-run", str(run), "--output-dir", str(tmp_path / "img"), "--per-class", "1"])
    grid = cv2.imread(str(tmp_path / "img" / "demo_overlays.png"))
    assert grid.shape == (2 * 160, 160, 3)  # one row per class folder, not one blank row for test/
    assert (grid[80, 80] == (0, 0, 255)).all() and (grid[240, 80] == (0, 255, 0)).all()
    (run / "overlays" / "test" / "a" / "0.png").write_text("not a png")
    with pytest.raises(DataError, match="0.png: not a readable PNG"):
        make_figures(["--demo-run", str(run), "--output-dir", str(tmp_path / "img2")])


def test_captions_and_figure_labels_fit_whatever_sizes_the_font_is_drawn_at():
    """OpenCV 5 draws its fonts at a few discrete sizes: a scale shrunk in proportion to the width drew the
    caption of a 224 px overlay past its right edge and the architecture's labels onto their boxes' borders."""
    from tools.make_figures import GREY, box
    caption = "001.A_very_long_class_name_that_would_not_fit  IoU 0.75 @ 0.4"
    image = np.zeros((60, 224, 3), np.uint8)
    drawn = (render_overlay(image, np.zeros((7, 7)), caption=caption) != render_overlay(image, np.zeros((7, 7))))
    columns = np.flatnonzero(drawn.any(axis=(0, 2)))
    assert columns.min() >= 2 and columns.max() < 224 - 2  # drawn from x = 4 with a 3 px outline
    panel = np.full((60, 400, 3), 255, np.uint8)
    box(panel, 20, 5, 370, 55, GREY, "spatial-aware block 1: softmax(QK^T/sqrt(d)) @ (P * V)", 0.45)
    assert (panel[10:50, 23:28] == GREY).all() and (panel[10:50, 363:368] == GREY).all()  # margins untouched


def test_a_caption_with_accents_is_drawn_as_its_ascii_letters():
    """OpenCV's fonts have ASCII only and drew each byte of a class name's 'é' as '?' ('grey h??ron'): accents
    are dropped, so that the overlay reads as the ASCII caption does."""
    image = np.zeros((40, 224, 3), np.uint8)
    accented, plain = (render_overlay(image, np.zeros((7, 7)), caption=f"grey h{e}ron  IoU 0.75 @ 0.4")
                       for e in ("\u00e9", "e"))
    assert np.array_equal(accented, plain)


def test_make_figures_refuses_an_output_file_and_a_run_without_overlays_in_one_line(tmp_path, capsys):
    (tmp_path / "file.png").write_text("x")
    (tmp_path / "bare_run").mkdir()
    (tmp_path / "empty_run" / "overlays" / "001.a").mkdir(parents=True)
    for argv, message in (
            (["--output-dir", str(tmp_path / "file.png")], f"--output-dir {tmp_path / 'file.png'}: not a folder"),
            (["--demo-run", str(tmp_path / "bare_run"), "--output-dir", str(tmp_path / "img")],
             f"--demo-run {tmp_path / 'bare_run'}: no overlays/ folder (expected the output folder of a demo run)"),
            (["--demo-run", str(tmp_path / "empty_run"), "--output-dir", str(tmp_path / "img")],
             f"{tmp_path / 'empty_run' / 'overlays'}: no overlays (class folders of PNGs) in it")):
        with pytest.raises(SystemExit) as exit_info:
            run_cli(make_figures, argv)
        assert exit_info.value.code == 2 and capsys.readouterr().err == f"error: {message}\n"
    assert (tmp_path / "file.png").read_text() == "x" and not (tmp_path / "img" / "demo_overlays.png").exists()


def test_save_rgb_on_a_full_disk_leaves_no_partial_png(tmp_path, monkeypatch):
    """train.py's final test draws its overlays in place: a full disk left an empty or cut PNG among them (a later
    look took it for an overlay), named by no error (the OSError of a full disk names no file)."""
    image = np.zeros((8, 8, 3), np.uint8)
    kept = save_rgb(tmp_path / "kept.png", image)
    before = kept.read_bytes()
    monkeypatch.setattr(Path, "write_bytes", full_disk_write)
    for path in (tmp_path / "new.png", kept):
        with pytest.raises(OSError) as info:
            save_rgb(path, np.full((8, 8, 3), 255, np.uint8))
        assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.png"] and kept.read_bytes() == before
