import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from DataLoader import DEFAULT_DEMO_ROOT, build_dataset, make_demo_dataset
from DataLoader.demo import MANIFEST
from conftest import REPO_ROOT
from tools.make_demo_data import main as make_demo_data
from utils.errors import ConfigError, run_cli

SMALL = dict(num_classes=4, train_per_class=3, test_per_class=2, image_size=64)


def snapshot(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic_and_idempotent(tmp_path):
    first = make_demo_dataset(tmp_path / "a", **SMALL)
    second = make_demo_dataset(tmp_path / "b", **SMALL)
    files = snapshot(first)
    assert files == snapshot(second) and MANIFEST in files and len(files) == 6 + 4 * 5
    stamp = (first / "images.txt").stat().st_mtime_ns
    assert make_demo_dataset(first, **SMALL) == first
    assert (first / "images.txt").stat().st_mtime_ns == stamp
    assert snapshot(make_demo_dataset(tmp_path / "c", **dict(SMALL, seed=1))) != files


def test_half_written_folder_is_regenerated(tmp_path):
    root = make_demo_dataset(tmp_path / "demo", **SMALL)
    files = snapshot(root)
    (root / MANIFEST).unlink()
    (root / "bounding_boxes.txt").write_text("1 2 3\n")
    make_demo_dataset(root, **SMALL)
    assert snapshot(root) == files
    next((root / "images").rglob("*.jpg")).unlink()  # an image deleted since: written again, not "not found"
    make_demo_dataset(root, **SMALL)
    assert snapshot(root) == files


def test_a_manifest_cut_short_is_regenerated(tmp_path):
    """a kill while the manifest was written (in place) left it empty: every later run ended in a
    JSONDecodeError traceback instead of generating the folder again"""
    root = make_demo_dataset(tmp_path / "demo", **SMALL)
    files = snapshot(root)
    for text in ("", '{"generator": '):
        (root / MANIFEST).write_text(text)
        assert make_demo_dataset(root, **SMALL) == root
        assert snapshot(root) == files
    assert not [p.name for p in root.iterdir() if p.name.endswith(".tmp")]  # (written through a temporary file)


def test_reads_back_as_cub_with_tight_boxes(tmp_path):
    root = make_demo_dataset(tmp_path / "demo", **SMALL)
    train, test = build_dataset("cub", root, "train"), build_dataset("cub", root, "test")
    assert (len(train), len(test), test.num_classes) == (12, 8, 4)
    for index in range(len(test)):
        sample = test[index]
        x0, y0, x1, y1 = sample["boxes"][0].tolist()
        area = (x1 - x0) * (y1 - y0) / 64 ** 2
        assert 0.08 <= area <= 0.42 and 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
        pixels = np.asarray(Image.open(test.image_path(index)).convert("RGB"), np.float32)
        inside = pixels[int(y0):int(y1), int(x0):int(x1)]
        # the object's two class colours make the box region differ from the background
        assert np.abs(inside.mean((0, 1)) - pixels.mean((0, 1))).max() > 5


def test_default_location_and_cli(tmp_path, capsys):
    assert DEFAULT_DEMO_ROOT == REPO_ROOT / "data" / "demo_cub"
    cli = [sys.executable, str(REPO_ROOT / "tools" / "make_demo_data.py"), "--output-dir", str(tmp_path / "d")]
    done = subprocess.run(cli + ["--num-classes", "2", "--train-per-class", "1", "--test-per-class", "1"],
                          capture_output=True, text=True)
    assert done.returncode == 0 and (tmp_path / "d" / MANIFEST).is_file()
    with pytest.raises(SystemExit) as bad:  # the script's error path, in this process
        run_cli(make_demo_data, ["--output-dir", str(tmp_path / "e"), "--num-classes", "9"])
    assert bad.value.code == 2 and capsys.readouterr().err == "error: --num-classes: expected an integer in 2..6, " \
                                                              "got '9'\n"
    assert not (tmp_path / "e").exists()


def test_cli_defaults_are_the_built_in_demo(tmp_path, monkeypatch, capsys):
    # tools/make_demo_data.py without flags writes the data train.py uses without --data-root (make_demo_dataset's
    # defaults): a default of its own would make train.py regenerate the folder the tool wrote
    import inspect
    import tools.make_demo_data as tool
    calls = []
    monkeypatch.setattr(tool, "make_demo_dataset", lambda root, **kwargs: calls.append(kwargs) or root)
    make_demo_data(["--output-dir", str(tmp_path / "d")])
    built_in = {name: p.default for name, p in inspect.signature(make_demo_dataset).parameters.items()}
    assert calls == [{key: value for key, value in built_in.items() if key != "root"}]


@pytest.mark.parametrize("flag, value, expected", [("--num-classes", "1", "an integer in 2..6"),
                                                   ("--train-per-class", "0", "an integer >= 1"),
                                                   ("--test-per-class", "0", "an integer >= 1"),
                                                   ("--image-size", "8", "an integer >= 32")])
def test_bad_flags_are_named(tmp_path, capsys, flag, value, expected):
    """The script's line names the flag (it said 'demo needs at least 1 train and 1 test image per class and
    images of 32 px or more, got 50, 20, 8', the values unnamed and in no flag's order)."""
    with pytest.raises(SystemExit) as bad:
        run_cli(make_demo_data, ["--output-dir", str(tmp_path / "e"), flag, value])
    assert bad.value.code == 2
    assert capsys.readouterr().err == f"error: {flag}: expected {expected}, got {value!r}\n"
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("kwargs", [dict(num_classes=1), dict(train_per_class=0), dict(image_size=8)])
def test_bad_parameters(tmp_path, kwargs):
    with pytest.raises(ConfigError, match="demo"):
        make_demo_dataset(tmp_path, **kwargs)


def test_a_folder_of_another_dataset_is_not_written_over(tmp_path):
    """make_demo_data.py --output-dir data/CUB_200_2011 replaced the real images.txt, classes.txt, labels,
    split and boxes with the demo's, silently"""
    root = tmp_path / "cub"
    (root / "images" / "001.Black_footed_Albatross").mkdir(parents=True)
    (root / "images.txt").write_text("1 001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg\n")
    with pytest.raises(ConfigError, match=r"images.txt: lists images of another dataset \(001.Black_footed"):
        make_demo_dataset(root, **SMALL)
    assert (root / "images.txt").read_text().startswith("1 001.Black_footed") and not (root / MANIFEST).exists()
    (root / "images.txt").write_text("1 001.Ringed_Disc/Ringed_Disc_0001.jpg\n")  # a demo cut short: regenerated
    assert make_demo_dataset(root, **SMALL) == root and (root / MANIFEST).exists()
    assert len((root / "images.txt").read_text().splitlines()) == 4 * 5
