"""Stanford Dogs, Stanford Cars and FGVC-Aircraft read in their release formats (small generated copies:
MATLAB files written with scipy.io.savemat, VOC XML and text files as distributed)."""
import re
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from DataLoader import build_dataset
from DataLoader.build import LOADERS
from DataLoader.check import check_split
from tools.check_dataset import main as check_main
from utils.config import load_yaml, parse_config
from utils.errors import DataError, run_cli


def train_boxes(fmt, root):
    """The boxes the format's reader gives the training items (the training dataset keeps none: it reads none)."""
    return [None if item.boxes is None else item.boxes.tolist() for item in LOADERS[fmt](root, "train")[1]]

CONFIGS = Path(__file__).resolve().parents[1] / "config"


def image(path, size):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (90, 120, 30)).save(path)


def cell(strings):
    """A MATLAB N x 1 cell array of char arrays."""
    column = np.empty((len(strings), 1), dtype=object)
    column[:, 0] = strings
    return column


# ---------------------------------------------------------------- Stanford Dogs
DOG_CLASSES = ["n02085620-Chihuahua", "n02085782-Japanese_spaniel"]
# (folder index, file stem, (W, H), boxes x0 y0 x1 y1 as in the XML, split)
DOGS = [
    (0, "n02085620_10074", (40, 30), [(4, 3, 30, 25)], "train"),
    (0, "n02085620_1152", (36, 36), [(0, 2, 35, 36)], "test"),
    (1, "n02085782_17", (50, 32), [(1, 1, 20, 30), (24, 5, 49, 31)], "test"),
    (1, "n02085782_82", (30, 40), [(2, 2, 28, 38)], "train"),
    (1, "n02085782_919", (32, 32), [(5, 6, 25, 27)], "train"),
]


def voc_xml(stem, size, boxes):
    objects = "".join(
        f"<object><name>dog</name><pose>Unspecified</pose><truncated>0</truncated><difficult>0</difficult>"
        f"<bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
        for x0, y0, x1, y1 in boxes)
    return (f"<annotation><folder>{stem.split('_')[0]}</folder><filename>{stem}</filename><source>"
            f"<database>ImageNet database</database></source><size><width>{size[0]}</width><height>{size[1]}"
            f"</height><depth>3</depth></size><segment>0</segment>{objects}</annotation>\n")


def write_dogs_list(path, rows):
    scipy.io.savemat(path, {"file_list": cell([f"{DOG_CLASSES[c]}/{stem}.jpg" for c, stem, *_ in rows]),
                            "annotation_list": cell([f"{DOG_CLASSES[c]}/{stem}" for c, stem, *_ in rows]),
                            "labels": np.array([[c + 1] for c, *_ in rows], np.float64)})


@pytest.fixture
def dogs(tmp_path):
    root = tmp_path / "StanfordDogs"
    for c, stem, size, boxes, _ in DOGS:
        image(root / "Images" / DOG_CLASSES[c] / f"{stem}.jpg", size)
        xml = root / "Annotation" / DOG_CLASSES[c] / stem  # no extension, as released
        xml.parent.mkdir(parents=True, exist_ok=True)
        xml.write_text(voc_xml(stem, size, boxes))
    (root / "lists").mkdir()
    for split in ("train", "test"):
        write_dogs_list(root / "lists" / f"{split}_list.mat", [row for row in DOGS if row[4] == split])
    return root


def test_dogs_release(dogs):
    train, test = build_dataset("dogs", dogs, "train"), build_dataset("dogs", dogs, "test")
    assert train.classes == test.classes == DOG_CLASSES
    assert [(item.path, item.label) for item in train.items] == [
        ("n02085620-Chihuahua/n02085620_10074.jpg", 0), ("n02085782-Japanese_spaniel/n02085782_82.jpg", 1),
        ("n02085782-Japanese_spaniel/n02085782_919.jpg", 1)]
    assert train_boxes("dogs", dogs) == [[[4, 3, 30, 25]], [[2, 2, 28, 38]], [[5, 6, 25, 27]]]
    first, second = test[0], test[1]
    assert (first["label"], first["size"], first["boxes"].tolist()) == (0, (36, 36), [[0, 2, 35, 36]])
    assert (second["label"], second["size"]) == (1, (50, 32))
    assert second["boxes"].tolist() == [[1, 1, 20, 30], [24, 5, 49, 31]]  # every dog of the image


def test_dogs_lists_extracted_beside_images(dogs):
    for name in ("train_list.mat", "test_list.mat"):
        (dogs / "lists" / name).rename(dogs / name)
    assert len(build_dataset("dogs", dogs, "test")) == 2


def dogs_error(dogs, split="test"):
    with pytest.raises(DataError) as err:
        build_dataset("dogs", dogs, split)
    return str(err.value)


def test_dogs_bad_input(dogs):
    test_list = dogs / "lists" / "test_list.mat"
    rows = [row for row in DOGS if row[4] == "test"]
    scipy.io.savemat(test_list, {"file_list": cell([f"{DOG_CLASSES[1]}/n02085782_17.jpg"]),
                                 "annotation_list": cell([f"{DOG_CLASSES[1]}/n02085782_17"]),
                                 "labels": np.array([[3.0]])})
    assert dogs_error(dogs) == f"{test_list} entry 1: label 3 outside the class range 1..2"
    scipy.io.savemat(test_list, {"file_list": cell([f"{DOG_CLASSES[1]}/n02085782_17.jpg"]),
                                 "annotation_list": cell([f"{DOG_CLASSES[1]}/n02085782_17"]),
                                 "labels": np.array([[1.0]])})
    assert dogs_error(dogs) == (f"{test_list} entry 1: label 1 is class 'n02085620-Chihuahua' but the file is in "
                                f"'n02085782-Japanese_spaniel' ({dogs / 'Images' / DOG_CLASSES[0]} is a folder no "
                                "entry is in)")
    scipy.io.savemat(test_list, {"file_list": cell(["x.jpg"]), "labels": np.array([[1.0]])})
    assert dogs_error(dogs) == (f"{test_list}: no variable 'annotation_list' (expected variables file_list, "
                                f"annotation_list, labels (the Stanford Dogs release layout: Images/<wnid>-<breed>/, "
                                f"Annotation/<wnid>-<breed>/, train_list.mat and test_list.mat in lists/ or the "
                                f"root))")
    write_dogs_list(test_list, rows)
    xml = dogs / "Annotation" / DOG_CLASSES[1] / "n02085782_17"
    xml.write_text(voc_xml("n02085782_17", (50, 32), [(1, 1, 20, 30), (24, 5, 60, 31)]))
    assert dogs_error(dogs) == f"{xml}: box (24, 5, 60, 31) lies outside the 50x32 image"
    xml.unlink()
    assert dogs_error(dogs) == f"{test_list} entry 2: annotation {xml} not found"
    (dogs / "Annotation" / DOG_CLASSES[1] / "n02085782_82").unlink()  # a train image may have none
    assert [boxes is None for boxes in train_boxes("dogs", dogs)] == [False, True, False]
    (dogs / "Images" / DOG_CLASSES[0] / "n02085620_10074.jpg").unlink()
    assert dogs_error(dogs, "train") == (f"{dogs / 'lists/train_list.mat'} entry 1: image "
                                         f"{dogs / 'Images' / DOG_CLASSES[0] / 'n02085620_10074.jpg'} not found")
    test_list.unlink()
    assert dogs_error(dogs).startswith(f"{test_list}: file not found, nor {dogs / 'test_list.mat'} (expected the "
                                       "Stanford Dogs release layout")


def test_dogs_image_path_leading_out_of_images_refused(dogs):
    """A file_list entry in its breed's folder whose '..' lead out of Images/ is refused, as in the other formats."""
    test_list = dogs / "lists" / "test_list.mat"
    file = f"{DOG_CLASSES[0]}/../../elsewhere.jpg"
    image(dogs / "elsewhere.jpg", (36, 36))
    scipy.io.savemat(test_list, {"file_list": cell([file]), "annotation_list": cell([f"{DOG_CLASSES[0]}/x"]),
                                 "labels": np.array([[1.0]])})
    assert dogs_error(dogs) == (f"{test_list} entry 1: image {file!r} is not under {dogs / 'Images'} (expected a "
                                "path relative to it, without '..' leading out of it)")


def test_an_image_listed_twice_is_named_by_its_list_entries(dogs, aircraft):
    """The repeat is said where it is (the list's entries / lines), in either split, not as its annotation file."""
    train_list = dogs / "lists" / "train_list.mat"
    rows = [row for row in DOGS if row[4] == "train"]
    write_dogs_list(train_list, rows + rows[:1])
    assert dogs_error(dogs, "train") == (f"{train_list} entry 4: image {DOG_CLASSES[0]}/n02085620_10074.jpg is "
                                         "listed twice (entry 1)")
    for split in ("trainval", "test"):
        listing = aircraft / "data" / f"images_variant_{split}.txt"
        lines = listing.read_text().splitlines()
        listing.write_text("\n".join(lines + lines[:1]) + "\n")
        image_id = lines[0].split()[0]
        assert aircraft_error(aircraft, "test" if split == "test" else "train") == (
            f"{listing} line {len(lines) + 1}: image {image_id!r} is listed twice (line 1)")


def test_dogs_folder_that_is_no_breed(dogs):
    """A folder in Images/ that the lists do not use would be a class of its own (a 121-way head on the real
    data) or shift every label after it: refused, naming the folder."""
    (dogs / "Images" / "resized").mkdir()  # sorts after the breeds: a class no image has
    assert dogs_error(dogs) == (f"{dogs / 'Images/resized'}: a folder after the highest label of "
                                f"{dogs / 'lists/test_list.mat'} (a class no image has; 1 such folder(s)): move it "
                                "out of Images/")
    (dogs / "Images" / "resized").rename(dogs / "Images" / "extra")  # sorts first: every label is off by one
    assert dogs_error(dogs, "train").endswith(f"but the file is in 'n02085620-Chihuahua' ({dogs / 'Images/extra'} "
                                              "is a folder no entry is in)")
    (dogs / "Images" / "extra").rmdir()
    for folder in DOG_CLASSES:
        for file in (dogs / "Images" / folder).iterdir():
            file.unlink()
        (dogs / "Images" / folder).rmdir()
    assert dogs_error(dogs) == (f"{dogs / 'Images'}: no class folders (expected the Stanford Dogs release layout: "
                                "Images/<wnid>-<breed>/, Annotation/<wnid>-<breed>/, train_list.mat and test_list.mat "
                                "in lists/ or the root)")


# ---------------------------------------------------------------- Stanford Cars
CAR_CLASSES = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Acura TL Sedan 2012"]
# split: [(fname, (W, H), (x1, y1, x2, y2) 1-based inclusive, class 1-based)]
CARS = {
    "train": [("00001.jpg", (40, 30), (3, 2, 38, 29), 1), ("00002.jpg", (36, 24), (1, 1, 36, 24), 3),
              ("00003.jpg", (30, 30), (5, 5, 20, 20), 2)],
    "test": [("00001.jpg", (44, 28), (2, 3, 44, 28), 2), ("00002.jpg", (30, 40), (4, 6, 25, 33), 3)],
}
CAR_FILES = {"train": "cars_train_annos.mat", "test": "cars_test_annos_withlabels.mat"}
CAR_FIELDS = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")


def write_car_annotations(path, rows, fields=CAR_FIELDS):
    annotations = np.zeros((1, len(rows)), dtype=[(field, object) for field in fields])
    for index, (fname, _, box, label) in enumerate(rows):
        values = dict(zip(CAR_FIELDS, [np.uint16(v) for v in box] + [np.uint8(label), fname]))
        annotations[0, index] = tuple(values[field] for field in fields)
    scipy.io.savemat(path, {"annotations": annotations})


@pytest.fixture
def cars(tmp_path):
    root = tmp_path / "stanford_cars"
    (root / "devkit").mkdir(parents=True)
    scipy.io.savemat(root / "devkit" / "cars_meta.mat",
                     {"class_names": np.array(CAR_CLASSES, dtype=object).reshape(1, -1)})
    for split, rows in CARS.items():
        for fname, size, *_ in rows:
            image(root / f"cars_{split}" / fname, size)
        write_car_annotations(root / "devkit" / CAR_FILES[split], rows)
    return root


def test_cars_release(cars):
    train, test = build_dataset("cars", cars, "train"), build_dataset("cars", cars, "test")
    assert train.classes == test.classes == CAR_CLASSES
    assert [(item.path, item.label) for item in train.items] == [
        ("cars_train/00001.jpg", 0), ("cars_train/00002.jpg", 2), ("cars_train/00003.jpg", 1)]
    assert train_boxes("cars", cars) == [[[3, 2, 38, 29]], [[1, 1, 36, 24]], [[5, 5, 20, 20]]]
    first, second = test[0], test[1]
    # 1-based inclusive: the box of the first test image touches the right and bottom edges (x2 = W, y2 = H)
    assert (first["label"], first["size"], first["boxes"].tolist()) == (1, (44, 28), [[2, 3, 44, 28]])
    assert (second["label"], second["boxes"].tolist()) == (2, [[4, 6, 25, 33]])


def test_cars_devkit_files_in_the_root(cars):
    for path in (cars / "devkit").iterdir():
        path.rename(cars / path.name)
    assert len(build_dataset("cars", cars, "test")) == 2


def test_cars_kaggle_mirror(cars):
    """Kaggle's copy unpacks the devkit into car_devkit/devkit/, each image folder into itself, and names the
    test labels as a browser's second download."""
    (cars / "car_devkit").mkdir()
    (cars / "devkit").rename(cars / "car_devkit" / "devkit")
    kaggle_test = cars / "cars_test_annos_withlabels (1).mat"
    (cars / "car_devkit" / "devkit" / CAR_FILES["test"]).rename(kaggle_test)
    for split in CARS:
        (cars / f"cars_{split}").rename(cars / "inner")
        (cars / f"cars_{split}").mkdir()
        (cars / "inner").rename(cars / f"cars_{split}" / f"cars_{split}")
    train, test = build_dataset("cars", cars, "train"), build_dataset("cars", cars, "test")
    assert train.classes == CAR_CLASSES and train.items[0].path == "cars_train/cars_train/00001.jpg"
    assert [(item.label, item.boxes.tolist()) for item in test.items] == [(1, [[2, 3, 44, 28]]), (2, [[4, 6, 25, 33]])]
    assert test.items[0].source.startswith(f"{kaggle_test} annotations entry 1")


def write_all_images_annotations(path, tests):
    """cars_annos.mat of the car_ims/ layout: every image of CARS renumbered, train ones first."""
    rows = CARS["train"] + CARS["test"]
    fields = ("relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test")
    annotations = np.zeros((1, len(rows)), dtype=[(field, object) for field in fields])
    for index, ((_, _, box, label), test) in enumerate(zip(rows, tests)):
        annotations[0, index] = (f"car_ims/{index + 1:06d}.jpg", *map(np.uint16, box), np.uint8(label),
                                 np.uint8(test))
    scipy.io.savemat(path, {"annotations": annotations,
                            "class_names": np.array(CAR_CLASSES, dtype=object).reshape(1, -1)})


def test_cars_all_images_layout(tmp_path):
    root = tmp_path / "stanford_cars"
    for index, (_, size, *_) in enumerate(CARS["train"] + CARS["test"]):
        image(root / "car_ims" / f"{index + 1:06d}.jpg", size)
    write_all_images_annotations(root / "cars_annos.mat", [0, 0, 0, 1, 1])
    train, test = build_dataset("cars", root, "train"), build_dataset("cars", root, "test")
    assert train.classes == CAR_CLASSES
    assert [(item.path, item.label) for item in train.items] == [
        ("car_ims/000001.jpg", 0), ("car_ims/000002.jpg", 2), ("car_ims/000003.jpg", 1)]
    assert [(item.path, item.label, item.boxes.tolist()) for item in test.items] == [
        ("car_ims/000004.jpg", 1, [[2, 3, 44, 28]]), ("car_ims/000005.jpg", 2, [[4, 6, 25, 33]])]
    assert test[0]["size"] == (44, 28)
    write_all_images_annotations(root / "cars_annos.mat", [0, 0, 2, 1, 1])
    assert cars_error(root) == f"{root / 'cars_annos.mat'} annotations entry 3: expected test 0 or 1, got 2"


def first_problem(fmt, root, split):
    """The DataError message of building ``split``, else the reason of its first bad item."""
    with pytest.raises(DataError) as err:
        for _, reason in check_split(build_dataset(fmt, root, split), split).bad[:1]:
            raise DataError(reason)
    return str(err.value)


def cars_error(cars, split="test"):
    return first_problem("cars", cars, split)


def test_cars_bad_input(cars):
    meta = cars / "devkit" / "cars_meta.mat"
    scipy.io.savemat(meta, {"class_names": np.array(CAR_CLASSES[:2] * 2, dtype=object).reshape(1, -1)})
    assert cars_error(cars) == (f"data root {cars}: the cars data names classes 0 and 2 (counted from 0) alike, "
                                f"{CAR_CLASSES[0]!r}: class names must differ (results per class are keyed by name)")
    scipy.io.savemat(meta, {"class_names": np.array(CAR_CLASSES, dtype=object).reshape(1, -1)})
    path = cars / "devkit" / CAR_FILES["test"]
    write_car_annotations(path, [("00001.jpg", None, (2, 3, 44, 28), 4)])
    assert cars_error(cars) == f"{path} annotations entry 1: label 4 outside the class range 1..3"
    write_car_annotations(path, [("00001.jpg", None, (2, 3, 46, 28), 2)])
    assert cars_error(cars) == f"{path} annotations entry 1: box (2, 3, 46, 28) lies outside the 44x28 image"
    write_car_annotations(path, [("00009.jpg", None, (2, 3, 40, 28), 2)])
    assert cars_error(cars) == f"{path} annotations entry 1: image {cars / 'cars_test' / '00009.jpg'} not found"
    image(cars.parent / "elsewhere.jpg", (44, 28))  # read, and its overlay written, outside the data root
    write_car_annotations(path, [("../../elsewhere.jpg", None, (2, 3, 40, 28), 2)])
    assert cars_error(cars) == (f"{path} annotations entry 1: image 'cars_test/../../elsewhere.jpg' is not under "
                                f"{cars} (expected a path relative to it, without '..' leading out of it)")
    write_car_annotations(path, CARS["test"], fields=CAR_FIELDS[:4] + ("fname",))
    assert cars_error(cars) == (f"{path}: variable 'annotations' has no field 'class' (expected a struct array "
                                f"with fields {', '.join(CAR_FIELDS)})")
    path.unlink()
    assert cars_error(cars).startswith(f"{path}: file not found (the test labels come separately from the devkit)")
    path.write_text("not a MATLAB file\n")
    assert cars_error(cars).startswith(f"{path}: not a readable MATLAB file (")


# ---------------------------------------------------------------- FGVC-Aircraft
# variants.txt order is the class order (not alphabetical); names hold spaces and slashes.
VARIANTS = ["707-320", "Cessna 172", "F/A-18"]
# (image id, (W, H), box as in images_box.txt, variant, split)
AIRCRAFT = [
    ("1025794", (48, 36), (0, 4, 40, 30), "707-320", "trainval"),
    ("0034309", (40, 30), (2, 1, 39, 29), "F/A-18", "test"),
    ("0056978", (36, 40), (0, 0, 20, 35), "Cessna 172", "test"),
    ("1340192", (30, 30), (3, 3, 25, 25), "Cessna 172", "trainval"),
    ("2054409", (30, 30), (1, 2, 28, 27), "F/A-18", "trainval"),
]


@pytest.fixture
def aircraft(tmp_path):
    root = tmp_path / "fgvc-aircraft-2013b"
    data = root / "data"
    for image_id, size, *_ in AIRCRAFT:
        image(data / "images" / f"{image_id}.jpg", size)
    (data / "variants.txt").write_text("\n".join(VARIANTS) + "\n")
    for split in ("trainval", "test"):
        (data / f"images_variant_{split}.txt").write_text(
            "".join(f"{image_id} {variant}\n" for image_id, _, _, variant, s in AIRCRAFT if s == split))
    (data / "images_box.txt").write_text("".join(f"{image_id} {' '.join(map(str, box))}\n"
                                                 for image_id, _, box, *_ in AIRCRAFT))
    return root


def test_aircraft_release(aircraft):
    train, test = build_dataset("aircraft", aircraft, "train"), build_dataset("aircraft", aircraft, "test")
    assert train.classes == test.classes == VARIANTS
    assert [(item.path, item.label) for item in train.items] == [("1025794.jpg", 0), ("1340192.jpg", 1),
                                                                 ("2054409.jpg", 2)]
    assert train_boxes("aircraft", aircraft) == [[[0, 4, 40, 30]], [[3, 3, 25, 25]], [[1, 2, 28, 27]]]
    first, second = test[0], test[1]
    assert (first["label"], first["size"], first["boxes"].tolist()) == (2, (40, 30), [[2, 1, 39, 29]])
    assert (second["label"], second["boxes"].tolist()) == (1, [[0, 0, 20, 35]])  # kept as written (no shift)
    assert build_dataset("aircraft", aircraft / "data", "test").items[1].path == "0056978.jpg"


def aircraft_error(aircraft, split="test"):
    return first_problem("aircraft", aircraft, split)


def test_aircraft_bad_input(aircraft):
    data = aircraft / "data"
    boxes, test = data / "images_box.txt", data / "images_variant_test.txt"
    lines = boxes.read_text().splitlines()
    boxes.write_text("\n".join(lines[:2] + ["0056978 0 0 20"] + lines[3:]) + "\n")
    assert aircraft_error(aircraft) == f"{boxes} line 3: expected 'image_id xmin ymin xmax ymax', got '0056978 0 0 20'"
    boxes.write_text("\n".join(lines[:2] + ["0056978 0 0 20 42"] + lines[3:]) + "\n")
    assert aircraft_error(aircraft) == f"{boxes} line 3: box (0, 0, 20, 42) lies outside the 36x40 image"
    boxes.write_text("\n".join(lines[:2] + lines[3:]) + "\n")
    assert aircraft_error(aircraft) == (f"{boxes}: no entry for image '0056978' (listed in "
                                        "images_variant_test.txt)")
    test.write_text("0034309 F/A-18\n0056978 Boeing 747\n")
    assert aircraft_error(aircraft) == (f"{test} line 2: variant 'Boeing 747' is not listed in variants.txt "
                                        "(unknown class)")
    (data / "elsewhere.jpg").write_bytes((data / "images" / "0056978.jpg").read_bytes())
    test.write_text("0034309 F/A-18\n../elsewhere Cessna 172\n")  # read, and its overlay written, outside
    assert aircraft_error(aircraft) == (f"{test} line 2: image '../elsewhere.jpg' is not under {data / 'images'} "
                                        "(expected a path relative to it, without '..' leading out of it)")
    boxes.unlink()  # training needs no boxes; evaluation does
    assert all(item.boxes is None for item in build_dataset("aircraft", aircraft, "train").items)
    assert aircraft_error(aircraft) == f"{boxes}: file not found (expected 'image_id xmin ymin xmax ymax')"
    (data / "images_variant_trainval.txt").unlink()
    assert aircraft_error(aircraft, "train") == (f"{data / 'images_variant_trainval.txt'}: file not found "
                                                 "(expected 'image_id variant')")
    assert aircraft_error(aircraft, "val") == (f"{aircraft}: FGVC-Aircraft has no 'val' split here "
                                               "(train = trainval, test)")


# ---------------------------------------------------------------- CLI and configs
def test_check_dataset_reports_each_format(dogs, cars, aircraft, capsys):
    for fmt, root in (("dogs", dogs), ("cars", cars), ("aircraft", aircraft)):
        run_cli(check_main, ["--data-format", fmt, "--data-root", str(root)])
    lines = capsys.readouterr().out.splitlines()
    assert [line for line in lines if not line.startswith("checked ")] == [
        "train: 3 images, 2 classes, 0 bad",
        "test: 2 images, 2 classes, 3 boxes, 0 with masks, 0 bad",
        "train: 3 images, 3 classes, 0 bad",
        "test: 2 images, 3 classes, 2 boxes, 0 with masks, 0 bad",
        "train: 3 images, 3 classes, 0 bad",
        "test: 2 images, 3 classes, 2 boxes, 0 with masks, 0 bad"]


def test_check_dataset_warns_of_an_xml_size_that_is_not_the_files(dogs, capsys):
    big = dogs / "Images" / DOG_CLASSES[0] / "n02085620_1152.jpg"
    image(big, (72, 72))  # its XML states 36x36, and its box fits that: boxes are mapped with 36x36
    run_cli(check_main, ["--data-format", "dogs", "--data-root", str(dogs), "--split", "test"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == [
        "test: 2 images, 2 classes, 3 boxes, 0 with masks, 0 bad",
        f"  warning: test split: 1 image(s) are not the size their box annotation states, first {big} "
        f"({dogs / 'Annotation' / DOG_CLASSES[0] / 'n02085620_1152'} states 36x36, the file is 72x72): their boxes "
        "are mapped into the crop with the stated size, as the official code does"]


def test_check_dataset_error_is_one_line(cars, capsys):
    write_car_annotations(cars / "devkit" / CAR_FILES["test"], [("00002.jpg", None, (4, 6, 25, 42), 3)])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(check_main, ["--data-format", "cars", "--data-root", str(cars), "--split", "test"])
    assert exit_info.value.code == 2
    assert re.fullmatch(r"error: test split: 1 bad image of 1: \S+00002.jpg \(\S+cars_test_annos_withlabels.mat "
                        r"annotations entry 1: box \(4, 6, 25, 42\) lies outside the 30x40 image\)\n",
                        capsys.readouterr().err)


@pytest.mark.parametrize("name, fmt", [("Dogs.yaml", "dogs"), ("Cars.yaml", "cars"), ("Aircraft.yaml", "aircraft")])
def test_configs_are_cubs_settings_on_their_format(name, fmt):
    values, cub = load_yaml(CONFIGS / name), load_yaml(CONFIGS / "CUB.yaml")
    assert set(values) == set(cub)
    assert values.pop("data_format") == fmt and values.pop("output_dir") == f"output/{fmt}"
    assert {key: value for key, value in cub.items() if key not in ("data_format", "output_dir")} == values
    cfg = parse_config(["--config", str(CONFIGS / name)])
    assert (cfg.data_format, cfg.lr, cfg.batch_size, cfg.epochs) == (fmt, 1e-4, 256, 30)

