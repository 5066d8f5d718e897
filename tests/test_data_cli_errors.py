"""Bad input through tools/check_dataset.py: exit 2, one 'error:' line naming the path, nothing written."""
import contextlib
import io
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from PIL import Image

from DataLoader import make_demo_dataset
from conftest import REPO_ROOT
from tools.check_dataset import main as check_main
from utils.errors import run_cli

CHECK = str(REPO_ROOT / "tools" / "check_dataset.py")


def edit_line(path, lineno, text):
    lines = path.read_text().splitlines()
    lines[lineno - 1] = text
    path.write_text("\n".join(lines) + "\n")


def truncate(path):
    path.write_bytes(path.read_bytes()[:150])


def image(path, size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size).save(path)


def imagenet_root(root):
    image(root / "train/n01440764/a.JPEG")
    image(root / "val/ILSVRC2012_val_00000001.JPEG")
    return root


def wsol_root(root):
    image(root / "images/test/c/x.jpg")
    image(root / "images/mask/x_m.png")
    meta = root / "meta/test"
    meta.mkdir(parents=True)
    (meta / "image_ids.txt").write_text("test/c/x.jpg\n")
    (meta / "class_labels.txt").write_text("test/c/x.jpg,0\n")
    (meta / "localization.txt").write_text("test/c/x.jpg,mask/x_m.png,mask/x_ignore.png\n")
    return root


# name: (prepare(root) -> CLI arguments, pattern the single error line must match). ``root`` starts as a
# copy of a demo CUB release (3 classes, ids 1-4 train / 5-6 test per class, 48x48) unless the case's
# name is in OWN_DATA.
CASES = {
    "missing data root": (
        lambda root: ["--data-format", "cub", "--data-root", str(root / "absent")],
        r"data root \S+absent: not found \(expected the CUB-200-2011 release layout\)"),
    "val boxes for a format that has its own": (  # ignored without a word before
        lambda root: ["--data-format", "cub", "--data-root", str(root), "--val-boxes", str(root / "gt.csv")],
        r"--val-boxes \S+gt.csv: only the imagenet and folder formats read it \(here: cub\)"),
    "data root is a file": (
        lambda root: ["--data-format", "cub", "--data-root", str(root / "images.txt")],
        r"data root \S+images.txt: a file, not a folder \(expected the CUB-200-2011 release layout\)"),
    "missing annotation file": (
        lambda root: (root / "image_class_labels.txt").unlink() or ["--data-format", "cub", "--data-root", str(root)],
        r"data root \S+: missing image_class_labels.txt \(expected the CUB-200-2011 release layout\)"),
    "wrong column count": (
        lambda root: edit_line(root / "images.txt", 3, "3") or ["--data-format", "cub", "--data-root", str(root)],
        r"\S+images.txt line 3: expected 'image_id relative_path', got '3'"),
    "non-numeric value": (
        lambda root: edit_line(root / "bounding_boxes.txt", 2, "2 a 1 2 3") or
        ["--data-format", "cub", "--data-root", str(root)],
        r"\S+bounding_boxes.txt line 2: expected 'image_id x y width height', got '2 a 1 2 3'"),
    "image listed but absent": (
        lambda root: (root / "images/001.Ringed_Disc/Ringed_Disc_0004.jpg").unlink() or
        ["--data-format", "cub", "--data-root", str(root)],
        r"\S+images.txt line 4: image \S+/images/001.Ringed_Disc/Ringed_Disc_0004.jpg not found"),
    "box outside the image": (
        lambda root: edit_line(root / "bounding_boxes.txt", 6, "6 10.0 4.0 45.0 8.0") or
        ["--data-format", "cub", "--data-root", str(root)],
        r"test split: 1 bad image of 6: \S+.jpg \(\S+bounding_boxes.txt line 6: box \(10, 4, 55, 12\) lies outside "
        r"the 48x48 image\)"),
    "box with x1 <= x0": (
        lambda root: edit_line(root / "bounding_boxes.txt", 2, "2 10.0 4.0 -3.0 8.0") or
        ["--data-format", "cub", "--data-root", str(root)],
        r"\S+bounding_boxes.txt line 2: box \(10, 4, 7, 12\) has x1 <= x0 or y1 <= y0"),
    "label outside the class range": (
        lambda root: edit_line(root / "image_class_labels.txt", 5, "5 4") or
        ["--data-format", "cub", "--data-root", str(root)],
        r"\S+image_class_labels.txt line 5: label 4 outside the class range 1..3"),
    "class ids out of order": (
        lambda root: edit_line(root / "classes.txt", 2, "3 002.Checkered_Square") or
        ["--data-format", "cub", "--data-root", str(root)],
        r"\S+classes.txt line 2: expected class id 2 \(ids 1..N in order\), got 3"),
    "no classes listed": (
        lambda root: (root / "classes.txt").write_text("") or ["--data-format", "cub", "--data-root", str(root)],
        r"\S+classes.txt: no classes listed"),
    "is_training_image other than 0 or 1": (
        lambda root: edit_line(root / "train_test_split.txt", 1, "1 2") or
        ["--data-format", "cub", "--data-root", str(root)],
        r"\S+train_test_split.txt line 1: expected 'image_id is_training_image' with is_training_image 0 or 1, "
        r"got '1 2'"),
    "box of an image not in images.txt": (
        lambda root: edit_line(root / "bounding_boxes.txt", 2, "99 1.0 1.0 2.0 2.0") or
        ["--data-format", "cub", "--data-root", str(root)],
        r"\S+bounding_boxes.txt line 2: image id 99 is not listed in images.txt"),
    "malformed LOC_val_solution.csv": (
        lambda root: (imagenet_root(root) / "LOC_val_solution.csv").write_text(
            "ImageId,PredictionString\nILSVRC2012_val_00000001,n01440764 1 2 3\n") and
        ["--data-format", "imagenet", "--data-root", str(root), "--split", "test"],
        r"\S+LOC_val_solution.csv line 2: expected 'ImageId,wnid xmin ymin xmax ymax \[wnid xmin ymin xmax ymax "
        r"\.\.\.\]', got 'ILSVRC2012_val_00000001,n01440764 1 2 3'"),
    "non-numeric box in LOC_val_solution.csv": (
        lambda root: (imagenet_root(root) / "LOC_val_solution.csv").write_text(
            "ImageId,PredictionString\nILSVRC2012_val_00000001,n01440764 1 2 x 4\n") and
        ["--data-format", "imagenet", "--data-root", str(root), "--split", "test"],
        r"\S+LOC_val_solution.csv line 2: expected 'ImageId,wnid .*', got 'ILSVRC2012_val_00000001,n01440764 1 2 x "
        r"4'"),
    "unreadable train image with --strict-data": (
        lambda root: truncate(root / "images/002.Checkered_Square/Checkered_Square_0001.jpg") or
        ["--data-format", "cub", "--data-root", str(root), "--split", "train", "--strict-data"],
        r"train split: 1 bad image of 12: \S+Checkered_Square_0001.jpg \(OSError: Truncated File Read\)"),
    "unreadable test image": (
        lambda root: (root / "images/002.Checkered_Square/Checkered_Square_0005.jpg").write_bytes(b"") or
        ["--data-format", "cub", "--data-root", str(root), "--split", "test"],
        r"test split: 1 bad image of 6: \S+Checkered_Square_0005.jpg \(empty file \(0 bytes\)\)"),
    "malformed val_gt.txt": (
        lambda root: (imagenet_root(root) / "val_gt.txt").write_text(
            "n01440764\\ILSVRC2012_val_00000001.JPEG 40 30 ; 1 2 3\n") and
        ["--data-format", "imagenet", "--data-root", str(root), "--split", "test"],
        r"\S+val_gt.txt line 1: expected '<wnid>\\<file> W H ; x0 y0 x1 y1 \[x0 y0 x1 y1 \.\.\.\]', "
        r"got 'n01440764\\ILSVRC2012_val_00000001.JPEG 40 30 ; 1 2 3'"),
    "missing --val-boxes file": (
        lambda root: imagenet_root(root) and
        ["--data-format", "imagenet", "--data-root", str(root), "--split", "test", "--val-boxes", str(root / "gt.csv")],
        r"\S+gt.csv: val boxes not found \(expected a folder of PASCAL-VOC XML files, LOC_val_solution.csv or "
        r"val_gt.txt\)"),
    "missing ignore mask": (
        lambda root: wsol_root(root) and ["--data-format", "wsol", "--data-root", str(root / "images"),
                                          "--split", "test", "--metadata-root", str(root / "meta")],
        r"\S+localization.txt line 1: file \S+mask/x_ignore.png not found"),
    "folder data read as cub": (
        lambda root: image(root / "train/c/x.jpg") or image(root / "test/c/x.jpg") or
        ["--data-format", "cub", "--data-root", str(root)],
        r"data root \S+: missing images/, images.txt, image_class_labels.txt, train_test_split.txt, "
        r"bounding_boxes.txt, classes.txt \(expected the CUB-200-2011 release layout\); its entries fit "
        r"--data-format folder"),
    "imagenet data read as cub": (  # the folder format's entries fit it too: the ImageNet scripts are named
        lambda root: imagenet_root(root) and ["--data-format", "cub", "--data-root", str(root)],
        r"data root \S+: missing images/, images.txt, image_class_labels.txt, train_test_split.txt, "
        r"bounding_boxes.txt, classes.txt \(expected the CUB-200-2011 release layout\); it looks like ILSVRC2012 "
        r"\(wnid folders / ILSVRC2012_val_ files\): train_ImageNet.py and evaluator_ImageNet.py read it \(the "
        r"tools, such as tools/check_dataset.py: --data-format imagenet\)$"),
    "release extracted into the data root": (  # the CUB tarball extracts to CUB_200_2011/ (here: data/)
        lambda root: ["--data-format", "cub", "--data-root", str(root.parent)],
        r"data root (\S+): missing images/, images.txt, image_class_labels.txt, train_test_split.txt, "
        r"bounding_boxes.txt, classes.txt \(expected the CUB-200-2011 release layout\); "
        r"did you mean --data-root \1/data\?"),
    "a folder inside the release given as the root": (  # its parent fits: named
        lambda root: ["--data-format", "cub", "--data-root", str(root / "images"), "--split", "test"],
        r"data root (\S+)/images: missing images/, .* \(expected the CUB-200-2011 release layout\); "
        r"did you mean --data-root \1\?$"),
    "cub data read as aircraft": (  # CUB has images/ as FGVC-Aircraft's data/ does, but no variants.txt
        lambda root: ["--data-format", "aircraft", "--data-root", str(root), "--split", "test"],
        r"data root \S+: has none of data/variants.txt, variants.txt \(expected the FGVC-Aircraft 2013b release "
        r"layout: data/images/, .*\); its entries fit --data-format cub$"),
    "cub data read as imagenet": (
        lambda root: ["--data-format", "imagenet", "--data-root", str(root), "--split", "test"],
        r"data root \S+: has none of train/, val/ \(expected the ILSVRC2012 layout: train/<wnid>/ and/or val/\); "
        r"its entries fit --data-format cub \(a flag of train.py / evaluator.py; the ImageNet scripts read only "
        r"the ILSVRC2012 layout\)"),
}


OWN_DATA = ("malformed val_gt.txt", "malformed LOC_val_solution.csv", "non-numeric box in LOC_val_solution.csv",
            "missing --val-boxes file", "missing ignore mask", "folder data read as cub",
            "imagenet data read as cub")


def listing(root):
    return sorted((str(p), p.stat().st_mtime_ns) for p in Path(root).rglob("*")) if root.exists() else []


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    base = make_demo_dataset(tmp_path_factory.mktemp("demo") / "cub", num_classes=3, train_per_class=4,
                             test_per_class=2, image_size=48)
    runs = {}
    for index, (name, (prepare, _)) in enumerate(CASES.items()):
        root = tmp_path_factory.mktemp(f"case{index}") / "data"
        if name in OWN_DATA:
            root.mkdir()
        else:
            shutil.copytree(base, root)
        args = prepare(root)
        runs[name] = (root, args, listing(root))
    for name, (root, args, before) in runs.items():  # in this process: the script's main under run_cli
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr), warnings.catch_warnings(), pytest.raises(SystemExit) as exit_info:
            warnings.simplefilter("ignore")
            run_cli(check_main, args)
        runs[name] = (exit_info.value.code, stderr.getvalue(), before, listing(root))
    return runs


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_error_line(results, name):
    code, stderr, before, after = results[name]
    assert code == 2, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert re.fullmatch(CASES[name][1], lines[0][len("error: "):]), lines[0]
    assert after == before  # nothing written


def test_unreadable_train_image_is_a_warning_without_strict(tmp_path):
    root = make_demo_dataset(tmp_path / "cub", num_classes=2, train_per_class=2, test_per_class=1, image_size=40)
    truncate(root / "images/001.Ringed_Disc/Ringed_Disc_0002.jpg")
    done = subprocess.run([sys.executable, CHECK, "--data-format", "cub", "--data-root", str(root)],
                          capture_output=True, text=True)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert done.stdout.splitlines()[:-1] == [
        "train: 4 images, 2 classes, 1 bad (skipped in training)",
        f"  {root / 'images/001.Ringed_Disc/Ringed_Disc_0002.jpg'}: OSError: Truncated File Read",
        "test: 2 images, 2 classes, 2 boxes, 0 with masks, 0 bad"]
    assert re.fullmatch(r"checked the headers, end markers and boxes of 6 images in \d+\.\ds",
                        done.stdout.splitlines()[-1])


def test_a_job_file_holds_the_report_before_its_error_line(tmp_path):
    """stdout and stderr into one file (a SLURM job's slurm-%j.out), stdout not unbuffered by the environment:
    the report's lines come in the order printed, the error line they lead to last (Python's block buffering of
    stdout put that line first, the report after it at exit)."""
    root = make_demo_dataset(tmp_path / "cub", num_classes=2, train_per_class=1, test_per_class=1, image_size=40)
    bad = root / "images/001.Ringed_Disc/Ringed_Disc_0002.jpg"  # the test image of class 1
    truncate(bad)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONUNBUFFERED"}
    with open(tmp_path / "job.out", "w") as job:
        done = subprocess.run([sys.executable, CHECK, "--data-format", "cub", "--data-root", str(root)],
                              stdout=job, stderr=subprocess.STDOUT, env=env)
    lines = (tmp_path / "job.out").read_text().splitlines()
    assert done.returncode == 2
    assert lines[0].startswith("train: ") and lines[-1].startswith(f"error: test split: 1 bad image of 2: {bad}")
