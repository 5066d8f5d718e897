import os

import pytest
from PIL import Image

from DataLoader import build_dataset
from utils.errors import DataError


@pytest.fixture
def custom(tmp_path):
    root = tmp_path / "mydata"
    for split, count in (("train", 2), ("test", 1)):
        for name in ("cat", "dog"):
            for k in range(count):
                (root / split / name).mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (40, 20), (1, 2, 3)).save(root / split / name / f"{k}.png")
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    return root


def test_class_folders_and_optional_boxes(custom):
    train = build_dataset("folder", custom, "train")
    assert train.classes == ["cat", "dog"] and len(train) == 4
    assert [item.label for item in train.items] == [0, 0, 1, 1]
    test = build_dataset("folder", custom, "test")
    assert test[0]["boxes"].shape == (0, 4) and test[0]["image_id"] == "test/cat/0.png"
    (custom / "boxes.csv").write_text("image,x0,y0,x1,y1\ntest/dog/0.png,1,2,30,18\ntest/dog/0.png,0,0,5,5\n"
                                      "test/cat/0.png,3,3,9,9\n")
    test = build_dataset("folder", custom, "test")
    assert test[1]["boxes"].tolist() == [[1, 2, 30, 18], [0, 0, 5, 5]] and test[1]["size"] == (40, 20)
    assert test[0]["boxes"].tolist() == [[3, 3, 9, 9]] and test[1]["label"] == 1
    # the same paths written as ./test/... or absolute name the same images
    (custom / "boxes.csv").write_text(f"./test/dog/0.png,1,2,30,18\n{custom}/test/cat/0.png,3,3,9,9\n")
    test = build_dataset("folder", custom, "test")
    assert test[1]["boxes"].tolist() == [[1, 2, 30, 18]] and test[0]["boxes"].tolist() == [[3, 3, 9, 9]]


def test_explicit_boxes_csv_and_errors(custom, tmp_path):
    (tmp_path / "b.csv").write_text("test/cat/0.png,3,3,2,9\n")
    with pytest.raises(DataError, match=r"b.csv line 1: box \(3, 3, 2, 9\) has x1 <= x0"):
        build_dataset("folder", custom, "test", val_boxes=tmp_path / "b.csv")
    (tmp_path / "b.csv").write_text("test/cat/9.png,3,3,5,9\n")
    with pytest.raises(DataError, match=r"b.csv line 1: image .*9.png not found"):
        build_dataset("folder", custom, "test", val_boxes=tmp_path / "b.csv")
    (tmp_path / "b.csv").write_text(f"{custom}/../elsewhere.png,3,3,5,9\n")
    (tmp_path / "elsewhere.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"b.csv line 1: image .*elsewhere.png is not under the data root"):
        build_dataset("folder", custom, "test", val_boxes=tmp_path / "b.csv")
    (custom / "test" / "bird").mkdir()
    with pytest.raises(DataError, match="bird: class folder is not one of the 2 train classes"):
        build_dataset("folder", custom, "test")
    with pytest.raises(DataError, match="val: not found"):
        build_dataset("folder", custom, "val")


def test_a_class_folder_without_images_is_refused(custom):
    """An empty train class folder (or one of files the reader skips) would be a class no image has, and shift
    the labels of the classes after it: refused when either split is loaded, naming it."""
    (custom / "train" / "aaa_empty").mkdir()
    (custom / "train" / "aaa_empty" / "notes.txt").write_text("not an image")
    for split in ("train", "test"):
        with pytest.raises(DataError) as err:
            build_dataset("folder", custom, split)
        assert str(err.value) == (f"{custom / 'train' / 'aaa_empty'}: a class folder with no image (.jpg, .jpeg, "
                                  ".png, .ppm, .bmp, .pgm, .tif, .tiff, .webp): remove it, or it would be a class of "
                                  "its own")


def test_boxes_csv_quoted_as_spreadsheets_write_it(custom):
    """A path holding a comma, double-quoted as csv writers do, is one field."""
    (custom / "test" / "cat" / "0.png").rename(custom / "test" / "cat" / "a,b.png")
    (custom / "boxes.csv").write_text('image,x0,y0,x1,y1\n"test/cat/a,b.png",3,3,9,9\n"test/dog/0.png", 1,2,30,18\n')
    test = build_dataset("folder", custom, "test")
    assert [(item.path, item.boxes.tolist()) for item in test.items] == [
        ("test/cat/a,b.png", [[3, 3, 9, 9]]), ("test/dog/0.png", [[1, 2, 30, 18]])]


def test_a_boxes_csv_without_a_box_of_the_split_is_refused(custom):
    """A boxes.csv that names none of an evaluation split's images (empty, or only train rows) is refused as one
    that misses some images is, not taken for data without boxes (evaluated as classification only)."""
    from DataLoader.eval_loader import resolve_protocol
    for text in ("image,x0,y0,x1,y1\n", "train/cat/0.png,1,1,5,5\n"):
        (custom / "boxes.csv").write_text(text)
        test = build_dataset("folder", custom, "test")
        with pytest.raises(DataError, match=r"2 of the 2 evaluation images have no boxes in .*boxes.csv \(first: "
                                            r"test/cat/0.png\); .*\(--eval-protocol cls\)"):
            resolve_protocol("auto", test)
        assert resolve_protocol("cls", test) == "cls"
    (custom / "boxes.csv").unlink()
    assert resolve_protocol("auto", build_dataset("folder", custom, "test")) == "cls"  # no file: no boxes


def test_images_in_a_folder_inside_a_class_folder_are_not_read_and_said(custom, caplog):
    """ImageFolder users keep images in sub-folders of a class: they are left out, with a warning naming them."""
    (custom / "train" / "dog" / "batch2" / "more").mkdir(parents=True)
    Image.new("RGB", (40, 20)).save(custom / "train" / "dog" / "batch2" / "5.png")
    with caplog.at_level("WARNING", logger="sat"):
        train = build_dataset("folder", custom, "train")
    assert len(train) == 4
    assert caplog.messages == [f"{custom / 'train'}: 1 folder(s) inside class folders (first: "
                               f"{custom / 'train' / 'dog' / 'batch2'}): the images in them are not read (only the "
                               "files directly in a class folder are)"]
    caplog.clear()
    with caplog.at_level("WARNING", logger="sat"):
        build_dataset("folder", custom, "test")
    assert caplog.messages == []


def test_photos_of_a_type_the_format_does_not_read_are_warned(custom, caplog):
    """An iPhone's .HEIC or a .gif in a class folder is not read (as torchvision's ImageFolder): said in one
    warning, where a notes.txt beside the images stays silent."""
    (custom / "test" / "dog" / "IMG_0001.HEIC").write_bytes(b"")
    (custom / "test" / "dog" / "clip.gif").write_bytes(b"GIF89a")
    with caplog.at_level("WARNING", logger="sat"):
        test = build_dataset("folder", custom, "test")
    assert len(test) == 2
    assert caplog.messages == [f"{custom / 'test'}: 2 image(s) of a type the folder format does not read (first: "
                               f"{custom / 'test' / 'dog' / 'IMG_0001.HEIC'}): not read; convert them to one of "
                               ".jpg, .jpeg, .png, .ppm, .bmp, .pgm, .tif, .tiff, .webp"]


def test_a_class_or_split_of_photos_of_an_unread_type_alone_says_so(custom, caplog):
    """A class folder of iPhone photos alone (.HEIC) is not 'a class folder with no image: remove it' (the user
    would remove the class), and a test split of them alone keeps the warning that says why it has no images."""
    for path in (custom / "train" / "dog").iterdir():
        path.rename(path.with_suffix(".HEIC"))
    with pytest.raises(DataError, match=r"train/dog: a class folder with photos of a type the folder format does "
                                        r"not read only: convert them to one of \.jpg, "):
        build_dataset("folder", custom, "train")
    for path in (custom / "train" / "dog").iterdir():
        path.rename(path.with_suffix(".png"))
    for name in ("cat", "dog"):
        (custom / "test" / name / "0.png").rename(custom / "test" / name / "0.heic")
    with caplog.at_level("WARNING", logger="sat"), pytest.raises(DataError, match="test: no images found"):
        build_dataset("folder", custom, "test")
    assert caplog.messages == [f"{custom / 'test'}: 2 image(s) of a type the folder format does not read (first: "
                               f"{custom / 'test' / 'cat' / '0.heic'}): not read; convert them to one of "
                               ".jpg, .jpeg, .png, .ppm, .bmp, .pgm, .tif, .tiff, .webp"]


def test_a_val_split_the_box_file_does_not_name_is_refused_naming_the_file(custom, tmp_path):
    """--val-split / --split val with a val/ folder: a box file of the test images only names itself in the
    refusal (the line named the data root alone, not which file lacks the val images' boxes)."""
    from DataLoader.eval_loader import resolve_protocol
    for name in ("cat", "dog"):
        (custom / "val" / name).mkdir(parents=True)
        Image.new("RGB", (40, 20), (1, 2, 3)).save(custom / "val" / name / "0.png")
    csv = tmp_path / "test_boxes.csv"
    csv.write_text("test/cat/0.png,1,1,5,5\ntest/dog/0.png,2,2,9,9\n")
    assert resolve_protocol("auto", build_dataset("folder", custom, "test", val_boxes=csv)) == "sat"
    with pytest.raises(DataError) as err:
        resolve_protocol("auto", build_dataset("folder", custom, "val", val_boxes=csv))
    assert str(err.value).startswith(f"{custom}: 2 of the 2 evaluation images have no boxes in {csv} (first: "
                                     "val/cat/0.png); ")


def test_boxes_csv_looks_each_image_up_once(custom, monkeypatch):
    """An image with several boxes (ImageNet-sized data: 50,000 images, 3 boxes each) is looked up on disk once,
    not once per box line; its boxes are all kept."""
    (custom / "boxes.csv").write_text("".join(f"test/dog/0.png,{k},0,{k + 5},5\n" for k in range(6)) +
                                      "test/cat/0.png,3,3,9,9\n./test/cat/0.png,0,0,4,4\n")
    looked_up, exists = [], os.path.exists
    monkeypatch.setattr(os.path, "exists", lambda p: looked_up.append(str(p)) or exists(p))
    test = build_dataset("folder", custom, "test")
    assert test[1]["boxes"].shape == (6, 4) and test[0]["boxes"].tolist() == [[3, 3, 9, 9], [0, 0, 4, 4]]
    assert sum(p.endswith("0.png") for p in looked_up) == 3  # dog/0.png, cat/0.png and ./cat/0.png: once each
