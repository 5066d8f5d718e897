import numpy as np
import pytest

from DataLoader import build_dataset, build_loader, check_data_root, make_demo_dataset
from utils.errors import DataError


@pytest.fixture
def cub(tmp_path):
    return make_demo_dataset(tmp_path / "CUB_200_2011", num_classes=3, train_per_class=5, test_per_class=2,
                             image_size=48)


def read_boxes(root):
    rows = [line.split() for line in (root / "bounding_boxes.txt").read_text().splitlines()]
    return {int(r[0]): [float(r[1]), float(r[2]), float(r[1]) + float(r[3]), float(r[2]) + float(r[4])] for r in rows}


def test_train_and_test_splits(cub):
    train, test = build_dataset("cub", cub, "train"), build_dataset("cub", cub, "test")
    assert (len(train), len(test)) == (15, 6)
    assert train.classes == ["001.Ringed_Disc", "002.Checkered_Square", "003.Striped_Triangle"]
    assert train.num_classes == 3
    sample = train[0]
    assert set(sample) == {"image", "label", "index"} and sample["image"].shape == (3, 224, 224)
    assert [train.items[i].label for i in range(len(train))] == [0] * 5 + [1] * 5 + [2] * 5


def test_test_items_carry_original_boxes_size_and_image_id(cub):
    test = build_dataset("cub", cub, "test")
    boxes = read_boxes(cub)
    sample = test[3]  # the second test image of class 2: ids 1-7 are class 1, 8-12 train, 13-14 test
    assert sample["label"] == 1 and sample["index"] == 3
    assert sample["image_id"] == "002.Checkered_Square/Checkered_Square_0007.jpg"
    assert sample["size"] == (48, 48)
    assert sample["boxes"].dtype == np.float32
    assert sample["boxes"].tolist() == [boxes[14]]


def test_several_boxes_per_image(cub):
    first = read_boxes(cub)[6]
    with open(cub / "bounding_boxes.txt", "a") as f:
        f.write("6 1.5 2.0 10.0 12.5\n")
    sample = build_dataset("cub", cub, "test")[0]  # image id 6 = first test image of class 1
    assert sample["boxes"].tolist() == [first, [1.5, 2.0, 11.5, 14.5]]


def test_few_shot_is_seeded_and_reproducible(cub):
    def chosen(seed):
        dataset = build_dataset("cub", cub, "train", images_per_class=2, seed=seed)
        return [item.path for item in dataset.items], [item.label for item in dataset.items]

    paths, labels = chosen(0)
    assert labels == [0, 0, 1, 1, 2, 2]
    assert chosen(0) == (paths, labels)
    assert any(chosen(seed)[0] != paths for seed in (1, 2, 3))
    assert len(build_dataset("cub", cub, "train", images_per_class=9).items) == 15


def test_few_shot_independent_of_worker_count(cub):
    dataset = build_dataset("cub", cub, "train", images_per_class=1, seed=3)
    seen = []
    for workers in (0, 2):
        loader = build_loader(dataset, 2, train=False, workers=workers)
        seen.append([index for batch in loader for index in batch["index"]])
    assert seen[0] == seen[1] == [0, 1, 2]


def test_unknown_split_and_format(cub):
    with pytest.raises(DataError, match="no 'val' split"):
        build_dataset("cub", cub, "val")
    with pytest.raises(DataError, match="unknown split"):
        build_dataset("cub", cub, "dev")
    with pytest.raises(DataError, match="unknown dataset format"):
        build_dataset("coco", cub, "train")


def test_box_outside_image_is_found_at_read_time(cub):
    lines = (cub / "bounding_boxes.txt").read_text().splitlines()
    lines[5] = "6 10.0 10.0 45.0 20.0"  # x1 = 55 > 48 + 1
    (cub / "bounding_boxes.txt").write_text("\n".join(lines) + "\n")
    test = build_dataset("cub", cub, "test")
    with pytest.raises(DataError, match=r"bounding_boxes.txt line 6: box \(10, 10, 55, 30\) lies outside the 48x48"):
        test[0]
    assert np.allclose(test.items[1].boxes, [read_boxes(cub)[7]])


def test_a_root_one_level_up_hints_the_one_subfolder_that_fits(tmp_path):
    def error(fmt, root):
        with pytest.raises(DataError) as err:
            check_data_root(fmt, root)
        return str(err.value)

    (tmp_path / "ILSVRC2012/train").mkdir(parents=True)  # any format: here ImageNet's train/ and/or val/
    (tmp_path / "notes").mkdir()
    assert error("imagenet", tmp_path).endswith(f"; did you mean --data-root {tmp_path / 'ILSVRC2012'}?")
    (tmp_path / "copy/val").mkdir(parents=True)  # two subfolders fit: no guess
    assert error("imagenet", tmp_path).endswith("(expected the ILSVRC2012 layout: train/<wnid>/ and/or val/)")
    crowded = tmp_path / "crowded"
    (crowded / "ILSVRC2012/val").mkdir(parents=True)
    for index in range(100):  # a large root is not searched
        (crowded / f"f{index}").touch()
    assert error("imagenet", crowded).endswith("and/or val/)")


def test_an_image_listed_twice_is_an_error(cub):
    """Under a second id, with its own label, split and box lines: scored twice if read (a repeated id is the
    annotation reader's error)."""
    image_id, path = (cub / "images.txt").read_text().splitlines()[-1].split()
    new = str(len((cub / "images.txt").read_text().splitlines()) + 1)
    for name in ("images.txt", "image_class_labels.txt", "train_test_split.txt", "bounding_boxes.txt"):
        last = (cub / name).read_text().splitlines()[-1].split()
        with open(cub / name, "a") as f:
            f.write(" ".join([new, *last[1:]]) + "\n")
    boxes = cub / "bounding_boxes.txt"
    lines = len(boxes.read_text().splitlines())
    with pytest.raises(DataError) as err:
        build_dataset("cub", cub, "test")
    assert str(err.value) == f"image {cub / 'images' / path} is listed twice in the test split ({boxes} line " \
                             f"{lines - 1}; {boxes} line {lines}): it would count twice"


@pytest.mark.parametrize("outside", ["absolute", "../../elsewhere/x.jpg"])
def test_an_image_path_leading_out_of_images_is_an_error(cub, outside):
    """An images.txt path that is absolute or climbs out with '..' was read from wherever it led, and the image's
    overlay (<output_dir>/overlays/<id>.png) and saved map (--save-maps DIR/sat/<id>.npy) were written there."""
    elsewhere = cub.parent / "elsewhere"
    elsewhere.mkdir()
    lines = (cub / "images.txt").read_text().splitlines()
    image_id, path = lines[5].split()  # a test image
    (elsewhere / "x.jpg").write_bytes((cub / "images" / path).read_bytes())
    relpath = str(elsewhere / "x.jpg") if outside == "absolute" else outside
    lines[5] = f"{image_id} {relpath}"
    (cub / "images.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        build_dataset("cub", cub, "test")
    assert str(err.value) == f"{cub / 'images.txt'} line 6: image {relpath!r} is not under {cub / 'images'} " \
                             "(expected a path relative to it, without '..' leading out of it)"
    lines[5] = f"{image_id} 001.Ringed_Disc/../{path}"  # '..' that stay inside are a path like another
    (cub / "images.txt").write_text("\n".join(lines) + "\n")
    assert build_dataset("cub", cub, "test").items[0].path == f"001.Ringed_Disc/../{path}"


def test_an_image_listed_twice_under_another_spelling_is_an_error(cub):
    """001.X/./a.jpg is 001.X/a.jpg: the check compared the strings, so the image was scored twice (and its
    overlay and saved map, one file, written twice)."""
    lines = (cub / "images.txt").read_text().splitlines()
    first, path = lines[5].split()
    second = lines[6].split()[0]  # another test image of the class
    folder, name = path.split("/")
    lines[6] = f"{second} {folder}/./{name}"
    (cub / "images.txt").write_text("\n".join(lines) + "\n")
    boxes = cub / "bounding_boxes.txt"
    with pytest.raises(DataError) as err:
        build_dataset("cub", cub, "test")
    assert str(err.value) == f"image {cub / 'images' / folder / '.' / name} is listed twice in the test split " \
                             f"({boxes} line {first}; {boxes} line {second}): it would count twice"


def test_a_class_name_listed_twice_is_an_error(cub):
    """metrics.json's per_class and the per-class table are keyed by the name: one class's numbers were lost."""
    (cub / "classes.txt").write_text('1 Bird/Sparrow, "house"\n2 Bird/Sparrow, "house"\n3 Other\n')
    with pytest.raises(DataError) as err:
        build_dataset("cub", cub, "test")
    assert str(err.value) == f"{cub / 'classes.txt'} line 2: class name 'Bird/Sparrow, \"house\"' again (first on " \
                             "line 1)"


def test_a_file_name_with_a_unicode_line_separator_is_read(cub):
    """U+0085 (NEL) or U+2028 may be part of a file name; str.splitlines() broke images.txt's line there, and the
    error named the next line ('expected 'image_id relative_path', got ...')."""
    lines = (cub / "images.txt").read_text().splitlines()
    image_id, path = lines[5].split()
    renamed = path.replace("_0", "\u0085\u2028_0")
    (cub / "images" / path).rename(cub / "images" / renamed)
    lines[5] = f"{image_id} {renamed}"
    (cub / "images.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert build_dataset("cub", cub, "test").items[0].path == renamed
