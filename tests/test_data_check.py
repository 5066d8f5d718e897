"""The check of built splits before training (DataLoader/check.py) and tools/check_dataset.py, which uses it:
truncated files with intact headers, boxes outside their image, the one-line error, workers = one process."""
import io
import logging
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from DataLoader import WSOLDataset, build_dataset, make_demo_dataset
from DataLoader.formats.annotations import Item
from DataLoader.check import CHUNK, CheckReport, check_split, check_splits
from tools.check_dataset import main as check_main
from utils.errors import DataError, run_cli

from conftest import REPO_ROOT


def noise(size, seed=0):
    """An image of noise: its pixel data spans most of the file, so a cut lands inside it."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def encoded(image, fmt):
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def split_of(folder, files, boxes=None):
    """An evaluation split of ``files`` (names under ``folder``), each with its box from ``boxes`` if any."""
    boxes = boxes or {}
    items = [Item(name, 0, boxes=np.array([boxes[name]], np.float32) if name in boxes else None,
                  source=f"boxes.txt line {index + 1}") for index, name in enumerate(files)]
    return WSOLDataset(folder, items, ["thing"], lambda image: image, evaluation=True)


@pytest.fixture
def cub(tmp_path):
    return make_demo_dataset(tmp_path / "cub", num_classes=2, train_per_class=3, test_per_class=2, image_size=40)


def cub_paths(root, train):
    """Image paths of the train (or test) images of a CUB-layout folder, in images.txt order."""
    is_train = dict(line.split() for line in (root / "train_test_split.txt").read_text().splitlines())
    return [root / "images" / path for image_id, path in
            (line.split() for line in (root / "images.txt").read_text().splitlines())
            if is_train[image_id] == ("1" if train else "0")]


def test_truncated_jpeg_with_a_valid_header_is_found(tmp_path):
    data = encoded(noise((64, 48)), "JPEG")
    (tmp_path / "cut.jpg").write_bytes(data[:len(data) * 2 // 3])
    (tmp_path / "whole.jpg").write_bytes(data)
    with Image.open(tmp_path / "cut.jpg") as image:
        assert image.size == (64, 48)  # the header alone finds nothing wrong
    report = check_split(split_of(tmp_path, ["whole.jpg", "cut.jpg"]), "test")
    assert report.checked == 2
    assert report.bad == [(str(tmp_path / "cut.jpg"), "truncated JPEG: no end marker")]


def test_png_without_iend_is_found(tmp_path):
    data = encoded(noise((40, 40)), "PNG")
    (tmp_path / "cut.png").write_bytes(data[:len(data) // 2])
    report = check_split(split_of(tmp_path, ["cut.png"]), "test")
    assert report.bad == [(str(tmp_path / "cut.png"), "truncated PNG: no IEND chunk")]


def test_an_image_over_twice_the_decompression_bomb_limit_is_bad_not_a_traceback(tmp_path, monkeypatch):
    """PIL's DecompressionBombError (an image of more than 2 x MAX_IMAGE_PIXELS, e.g. a 200-megapixel photo) is no
    OSError: it is a bad image in the check, skipped in training, a DataError in evaluation, as others are."""
    noise((40, 30)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # 1200 pixels: over twice the limit
    reason = "DecompressionBombError: Image size (1200 pixels) exceeds limit of 1000 pixels, could be " \
             "decompression bomb DOS attack."
    assert check_split(split_of(tmp_path, ["big.png"]), "test").bad == [(str(tmp_path / "big.png"), reason)]
    items = [Item("big.png", 0)]
    train = WSOLDataset(tmp_path, items, ["thing"], lambda image: image, evaluation=False)
    assert train[0].message == f"skipping unreadable image {tmp_path / 'big.png'} ({reason})"
    with pytest.raises(DataError, match=re.escape(f"unreadable image {tmp_path / 'big.png'} ({reason})")):
        split_of(tmp_path, ["big.png"])[0]


def test_an_image_between_one_and_two_bomb_limits_loads_without_a_python_warning(tmp_path):
    """PIL loads an image of 1 to 2 x MAX_IMAGE_PIXELS (a large photo) with a DecompressionBombWarning: two lines
    naming no file, from every loader worker each epoch, in a batch job's output. It is read as any image.
    (A process of its own: pytest resets the warning filters that importing the package sets.)"""
    noise((40, 30)).save(tmp_path / "big.png")
    code = ("import sys; from PIL import Image; from DataLoader.dataset import WSOLDataset; "
            "from DataLoader.formats.annotations import Item; Image.MAX_IMAGE_PIXELS = 1000; "  # 1200 px: 1-2 x
            "sample = WSOLDataset(sys.argv[1], [Item('big.png', 0)], ['thing'], lambda image: image, "
            "evaluation=False)[0]; "
            "print(type(sample).__name__)")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert done.stdout.strip() != "Skipped"


def test_complete_files_pass_with_padding_or_bytes_after_the_end_marker(tmp_path):
    """Zero padding is stripped; other bytes after the marker make the check decode the file, which succeeds,
    as it does in training."""
    data = encoded(noise((32, 32)), "JPEG")
    (tmp_path / "padded.jpg").write_bytes(data + b"\0" * 100)
    (tmp_path / "trailer.jpg").write_bytes(data + b"camera trailer")
    noise((20, 20)).save(tmp_path / "other.bmp")
    (tmp_path / "empty.jpg").write_bytes(b"")
    files = ["padded.jpg", "trailer.jpg", "other.bmp", "empty.jpg", "absent.jpg"]
    for decode in (False, True):
        assert check_split(split_of(tmp_path, files), "test", decode=decode).bad == [
            (str(tmp_path / "empty.jpg"), "empty file (0 bytes)"),
            (str(tmp_path / "absent.jpg"), "file not found")]


def test_good_split_passes(cub):
    for split in ("train", "test"):
        dataset = build_dataset("cub", cub, split, lambda image: image)
        for decode in (False, True):
            report = check_split(dataset, split, decode=decode)
            assert (report.split, report.checked, report.bad) == (split, len(dataset), [])


def test_box_outside_its_image_is_found(tmp_path):
    noise((40, 30)).save(tmp_path / "a.jpg")
    noise((40, 30)).save(tmp_path / "b.jpg")
    report = check_split(split_of(tmp_path, ["a.jpg", "b.jpg"], {"a.jpg": (1, 1, 39, 29), "b.jpg": (2, 3, 45, 20)}),
                         "test")
    assert report.bad == [(str(tmp_path / "b.jpg"),
                           "boxes.txt line 2: box (2, 3, 45, 20) lies outside the 40x30 image")]


def test_bad_evaluation_images_are_one_error_line(cub):
    paths = cub_paths(cub, train=False)
    for path in paths:
        path.write_bytes(path.read_bytes()[:-30])
    train, test = (build_dataset("cub", cub, split, lambda image: image) for split in ("train", "test"))
    with pytest.raises(DataError) as err:
        check_splits(train, {"test": test})
    assert str(err.value) == (f"test split: 4 bad images of 4, first {paths[0]} (truncated JPEG: no end marker), "
                              f"{paths[1]} (truncated JPEG: no end marker), {paths[2]} (truncated JPEG: no end "
                              "marker), ... (tools/check_dataset.py lists them all)")
    paths[0].write_bytes(b"")
    (test.items, test.evaluation) = (test.items[:1], True)
    with pytest.raises(DataError) as err:
        check_splits(train, {"test": test})
    assert str(err.value) == f"test split: 1 bad image of 1: {paths[0]} (empty file (0 bytes))"


def test_bad_train_images_are_skipped_unless_strict(cub, caplog):
    bad = cub_paths(cub, train=True)[1]
    bad.write_bytes(bad.read_bytes()[:-30])
    boxes = cub / "bounding_boxes.txt"  # a train box outside its image: training does not use it
    boxes.write_text("1 10 10 90 20\n" + "".join(line + "\n" for line in boxes.read_text().splitlines()[1:]))
    train, test = (build_dataset("cub", cub, split, lambda image: image) for split in ("train", "test"))
    with caplog.at_level(logging.INFO, logger="sat"):
        reports = check_splits(train, {"test": test})  # the train split only when asked
        assert [(r.split, r.checked, r.bad) for r in reports] == [("test", 4, [])]
        reports = check_splits(train, {"test": test}, check_train=True)
    assert [(r.split, r.checked, len(r.bad)) for r in reports] == [("test", 4, 0), ("train", 6, 1)]
    messages = [record.getMessage() for record in caplog.records]
    assert f"train split: 1 bad image of 6: {bad} (truncated JPEG: no end marker) (skipped in training; " \
           "--strict-data makes them an error)" in messages
    assert re.fullmatch(r"checked the headers, end markers and boxes of the test split \(4 images\) and the train "
                        r"split \(6 images\) in \d+\.\ds", messages[-1])
    with pytest.raises(DataError, match=f"^train split: 1 bad image of 6: {re.escape(str(bad))} "):
        check_splits(train, {"test": test}, check_train=True, strict=True)


def test_workers_find_what_one_process_finds(tmp_path):
    """More than two tasks of CHUNK items, read by two worker processes: the same report, in dataset order."""
    files = [f"{index:04d}.jpg" for index in range(2 * CHUNK + 40)]
    good = encoded(noise((16, 16)), "JPEG")
    for name in files:
        (tmp_path / name).write_bytes(good)
    cut, missing, boxed = files[3], files[CHUNK + 1], files[-1]
    (tmp_path / cut).write_bytes(good[:-10])
    (tmp_path / missing).unlink()
    dataset = split_of(tmp_path, files, {boxed: (0, 0, 30, 10)})
    serial, parallel = check_split(dataset, "test", workers=0), check_split(dataset, "test", workers=2)
    assert serial.bad == parallel.bad == [
        (str(tmp_path / cut), "truncated JPEG: no end marker"), (str(tmp_path / missing), "file not found"),
        (str(tmp_path / boxed), f"boxes.txt line {len(files)}: box (0, 0, 30, 10) lies outside the 16x16 image")]
    assert serial.checked == parallel.checked == len(files)
    # several processes, each its share (every third item), then merged: the same report, in dataset order
    merged = CheckReport.merged([check_split(dataset, "test", shard=(k, 3)) for k in range(3)])
    assert merged.bad == serial.bad and merged.checked == len(files) and merged.positions == [3, CHUNK + 1,
                                                                                              len(files) - 1]


def test_check_dataset_counts_the_test_boxes_it_read_and_reports_truncated_files(cub, capsys):
    run_cli(check_main, ["--data-format", "cub", "--data-root", str(cub)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[:-1] == ["train: 6 images, 2 classes, 0 bad",
                          "test: 4 images, 2 classes, 4 boxes, 0 with masks, 0 bad"]
    assert re.fullmatch(r"checked the headers, end markers and boxes of 10 images in \d+\.\ds", lines[-1])
    boxes = cub / "bounding_boxes.txt"  # a train image without a box is fine: training needs none
    boxes.write_text("".join(line + "\n" for line in boxes.read_text().splitlines()[1:]))
    bad = cub_paths(cub, train=False)[0]
    bad.write_bytes(bad.read_bytes()[:-30])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(check_main, ["--data-format", "cub", "--data-root", str(cub)])
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    assert out.splitlines()[:-1] == ["train: 6 images, 2 classes, 0 bad",
                                     "test: 4 images, 2 classes, 4 boxes, 0 with masks, 1 bad",
                                     f"  {bad}: truncated JPEG: no end marker"]
    assert err == f"error: test split: 1 bad image of 4: {bad} (truncated JPEG: no end marker)\n"


def test_training_stops_before_its_first_step_on_a_truncated_test_image(cub, tmp_path):
    from train import main

    bad = cub_paths(cub, train=False)[1]
    bad.write_bytes(bad.read_bytes()[:-30])
    out = tmp_path / "run"
    argv = ["--config", str(REPO_ROOT / "config" / "demo.yaml"), "--data-root", str(cub), "--output-dir", str(out),
            "--epochs", "1", "--device", "cpu", "--workers", "0", "--batch-size", "2"]
    message = f"test split: 1 bad image of 4: {bad} (truncated JPEG: no end marker)"
    for _ in range(2):  # the same command again meets the same error: the folder holds no previous run
        with pytest.raises(DataError) as err:
            main(argv)
        assert str(err.value) == message
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()
    assert not (out / "results.json").exists()
    assert message in (out / "log.txt").read_text()


def test_strict_data_with_several_processes_checks_the_training_split_first(cub):
    """A bad training image with --strict-data would stop one process alone mid-epoch (the others waiting for its
    gradients): with several processes it is found before training; with one, it stops training where met."""
    from types import SimpleNamespace
    from train import check_data

    bad = cub_paths(cub, train=True)[2]
    bad.write_bytes(bad.read_bytes()[:-30])
    train_set, test_set = (build_dataset("cub", cub, split) for split in ("train", "test"))
    cfg = SimpleNamespace(workers=0, check_train_split=False, strict_data=True)
    one, two = (SimpleNamespace(is_main=True, rank=0, world_size=n, distributed=False) for n in (1, 2))
    check_data(cfg, one, train_set, {"test": test_set})  # not checked
    with pytest.raises(DataError, match=re.escape(f"train split: 1 bad image of 6: {bad} (truncated JPEG")):
        check_data(cfg, two, train_set, {"test": test_set})
    check_data(SimpleNamespace(**{**vars(cfg), "strict_data": False}), two, train_set,
               {"test": test_set})  # skipped in training: nothing to stop


def test_check_dataset_checks_the_few_shot_subset_training_uses(tmp_path, capsys):
    """--images-per-class: by default the tool checks the subset training draws with its default seed (6), not
    another one; the images outside it are broken here, so checking another subset would report them."""
    root = make_demo_dataset(tmp_path / "cub", num_classes=2, train_per_class=6, test_per_class=3, image_size=40)
    chosen = {item.path for item in build_dataset("cub", root, "train", images_per_class=2, seed=6).items}
    assert chosen != {item.path for item in build_dataset("cub", root, "train", images_per_class=2, seed=0).items}
    for path in cub_paths(root, train=True):
        if str(path.relative_to(root / "images")) not in chosen:
            path.write_bytes(path.read_bytes()[:-30])
    run_cli(check_main, ["--data-format", "cub", "--data-root", str(root), "--split", "train", "test",
                         "--images-per-class", "2"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "train: 4 images, 2 classes, 0 bad"
    assert lines[1] == "test: 6 images, 2 classes, 6 boxes, 0 with masks, 0 bad"  # whole, as training evaluates


def test_a_process_whose_check_breaks_tells_the_others(cub, monkeypatch):
    """With several processes each checks its share and the reports are gathered: one whose check breaks (a
    worker killed, a bug) sends the others its failure through the same gather, so that none waits for its report
    in vain, and raises its own error."""
    import DataLoader.check as check

    sent = []
    monkeypatch.setattr(check, "check_split", lambda *args, **kwargs: (_ for _ in ()).throw(RuntimeError("boom")))
    test_set = build_dataset("cub", cub, "test")
    with pytest.raises(RuntimeError, match="boom"):
        check.check_splits(None, {"test": test_set}, shard=(1, 2), gather=lambda report: sent.append(report))
    assert sent == ["the data check failed on process 1: RuntimeError: boom"]
