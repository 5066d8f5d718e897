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
