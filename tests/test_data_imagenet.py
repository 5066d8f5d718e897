import pytest
from PIL import Image

from DataLoader import build_dataset
from DataLoader.dataset import size_difference_warning, size_differences
from DataLoader.loader import collate_samples
from utils.boxes import gt_boxes_sat
from utils.errors import DataError

WNIDS = ["n01440764", "n01443537", "n02102040"]
# val image -> (wnid, size, boxes); image 2 has two boxes
VAL = {
    1: ("n01443537", (40, 30), [[2, 3, 20, 25]]),
    2: ("n01440764", (32, 48), [[1, 1, 16, 20], [10, 12, 30, 47]]),
    3: ("n02102040", (36, 36), [[5, 5, 36, 36]]),
}


def val_name(i):
    return f"ILSVRC2012_val_{i:08d}"


def write_image(path, size):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (90, 120, 150)).save(path)


def write_xml(path, wnid, size, boxes):
    objects = "".join(f"<object><name>{wnid}</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
                      f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>" for b in boxes)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"<annotation><filename>{path.stem}</filename><size><width>{size[0]}</width>"
                    f"<height>{size[1]}</height><depth>3</depth></size>{objects}</annotation>")


def write_csv(path):
    rows = [f"{val_name(i)},{' '.join(f'{wnid} ' + ' '.join(map(str, b)) for b in boxes)}"
            for i, (wnid, _, boxes) in VAL.items()]
    path.write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")


def write_val_gt(path):
    rows = [f"{wnid}\\{val_name(i)}.JPEG {w} {h} ; {' '.join(str(v) for b in boxes for v in b)}"
            for i, (wnid, (w, h), boxes) in VAL.items()]
    path.write_text("\n".join(rows) + "\n")


@pytest.fixture
def imagenet(tmp_path):
    root = tmp_path / "ILSVRC2012"
    for k, wnid in enumerate(WNIDS):
        for j in range(2):
            write_image(root / "train" / wnid / f"{wnid}_{j}.JPEG", (32 + k, 32))
    for i, (_, size, _) in VAL.items():
        write_image(root / "val" / f"{val_name(i)}.JPEG", size)
    return root


def check_val(dataset):
    assert dataset.classes == WNIDS and len(dataset) == 3
    for index, (i, (wnid, size, boxes)) in enumerate(VAL.items()):
        sample = dataset[index]
        assert sample["label"] == WNIDS.index(wnid)
        assert sample["size"] == size
        assert sample["image_id"] == f"val/{val_name(i)}.JPEG"
        assert sample["boxes"].tolist() == boxes


def test_train_folders_give_sorted_wnid_labels(imagenet):
    train = build_dataset("imagenet", imagenet, "train")
    assert train.classes == WNIDS
    assert [item.label for item in train.items] == [0, 0, 1, 1, 2, 2]
    assert train.items[2].image_id == "train/n01443537/n01443537_0.JPEG"
    assert set(train[0]) == {"image", "label", "index"}


def test_val_boxes_from_xml_folder_multi_box(imagenet):
    for i, (wnid, size, boxes) in VAL.items():
        write_xml(imagenet / "val_boxes" / f"{val_name(i)}.xml", wnid, size, boxes)
    check_val(build_dataset("imagenet", imagenet, "test"))


def test_xml_files_beside_flat_val_images(imagenet):
    for i, (wnid, size, boxes) in VAL.items():
        write_xml(imagenet / "val" / f"{val_name(i)}.xml", wnid, size, boxes)
    check_val(build_dataset("imagenet", imagenet, "test"))


def test_val_boxes_from_loc_csv_multi_box(imagenet):
    write_csv(imagenet / "LOC_val_solution.csv")
    check_val(build_dataset("imagenet", imagenet, "test"))


@pytest.mark.parametrize("boxes", ["xml", "csv"])
def test_kaggle_download_layout(imagenet, tmp_path, boxes):
    """Kaggle's ILSVRC/Data/CLS-LOC/{train,val}: its boxes are found where Kaggle puts them (the XML folder under
    ILSVRC/Annotations, the CSV beside ILSVRC/), and a root above the images is told the path to pass."""
    kaggle = tmp_path / "kaggle"
    images = kaggle / "ILSVRC" / "Data" / "CLS-LOC"
    images.parent.mkdir(parents=True)
    imagenet.rename(images)
    if boxes == "xml":
        for i, (wnid, size, image_boxes) in VAL.items():
            write_xml(kaggle / "ILSVRC" / "Annotations" / "CLS-LOC" / "val" / f"{val_name(i)}.xml", wnid, size,
                      image_boxes)
    else:
        write_csv(kaggle / "LOC_val_solution.csv")
    check_val(build_dataset("imagenet", images, "test"))
    for root in (kaggle, kaggle / "ILSVRC"):
        with pytest.raises(DataError, match=f"; did you mean --data-root {images}\\?$"):
            build_dataset("imagenet", root, "test")


def test_val_images_the_boxes_do_not_name_are_left_out_with_a_warning(imagenet, caplog):
    write_csv(imagenet / "LOC_val_solution.csv")
    write_image(imagenet / "val" / f"{val_name(4)}.JPEG", (30, 30))
    write_image(imagenet / "val" / f"{val_name(5)}.JPEG", (30, 30))
    with caplog.at_level("WARNING", logger="sat"):
        check_val(build_dataset("imagenet", imagenet, "test"))
    csv = imagenet / "LOC_val_solution.csv"
    assert caplog.messages == [f"{imagenet / 'val'} holds 5 images, the val boxes ({csv}) name 3: the other 2 are "
                               "not evaluated"]


def test_val_boxes_from_official_val_gt_list_with_sorted_val(imagenet):
    write_val_gt(imagenet / "val_gt.txt")
    for i, (wnid, _, _) in VAL.items():
        (imagenet / "val" / wnid).mkdir()
        (imagenet / "val" / f"{val_name(i)}.JPEG").rename(imagenet / "val" / wnid / f"{val_name(i)}.JPEG")
    dataset = build_dataset("imagenet", imagenet, "test")
    check_val(dataset)
    assert dataset.items[0].path == f"val/n01443537/{val_name(1)}.JPEG"


def test_val_gt_sizes_map_the_boxes_where_they_differ_from_the_files(imagenet):
    # val_gt.txt states twice each file's size (the files are half-size copies), boxes in the stated pixels,
    # except image 3, whose stated size is its file's
    rows = [f"{wnid}\\{val_name(i)}.JPEG {w * k} {h * k} ; {' '.join(str(v * k) for b in boxes for v in b)}"
            for i, (wnid, (w, h), boxes) in VAL.items() for k in [1 if i == 3 else 2]]
    (imagenet / "val_gt.txt").write_text("\n".join(rows) + "\n")
    dataset = build_dataset("imagenet", imagenet, "test")
    samples = [dataset[index] for index in range(len(dataset))]  # boxes beyond the files' pixels: no error
    assert [s["size"] for s in samples] == [(80, 60), (64, 96), (36, 36)]
    assert [s["file_size"] for s in samples] == [size for _, size, _ in VAL.values()]
    # the official load_test_bbox: int(max(x / W * 256 - 16, 0)), int(min(x / W * 256 - 16, 223)), W from the
    # list (the file's W, H would give 9, 35, 223, 223)
    assert gt_boxes_sat(samples[0]["boxes"], samples[0]["size"]).tolist() == [[0, 9, 112, 197]]
    batch = collate_samples(samples)
    assert size_differences(batch) == 2 and size_difference_warning(2).startswith("2 image(s) are not the size")
    assert size_differences({"size": batch["size"]}) == 0  # a batch built by hand


def test_explicit_val_boxes_path_wins(imagenet, tmp_path):
    write_csv(imagenet / "LOC_val_solution.csv")
    (imagenet / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n")  # would give no images
    write_val_gt(tmp_path / "my_gt.txt")
    check_val(build_dataset("imagenet", imagenet, "test", val_boxes=tmp_path / "my_gt.txt"))


def test_classes_from_boxes_without_train_folder(imagenet):
    write_csv(imagenet / "LOC_val_solution.csv")
    for path in sorted((imagenet / "train").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    (imagenet / "train").rmdir()
    check_val(build_dataset("imagenet", imagenet, "test"))


def test_val_errors(imagenet):
    with pytest.raises(DataError, match="no ImageNet val boxes found"):
        build_dataset("imagenet", imagenet, "test")
    (imagenet / "val_gt.txt").write_text(f"n09999999\\{val_name(1)}.JPEG 40 30 ; 2 3 20 25\n")
    with pytest.raises(DataError, match=r"val_gt.txt line 1: label 'n09999999' is not one of the 3 classes"):
        build_dataset("imagenet", imagenet, "test")
    (imagenet / "val_gt.txt").write_text(f"n01440764\\{val_name(1)}.JPEG 40 30 ; 2 3 20\n")
    with pytest.raises(DataError, match=r"val_gt.txt line 1: expected"):
        build_dataset("imagenet", imagenet, "test")
    (imagenet / "val_gt.txt").write_text(f"n01440764\\{val_name(1)}.JPEG 40 30 ; 2 3 45 25\n")
    with pytest.raises(DataError, match=r"val_gt.txt line 1: box \(2, 3, 45, 25\) lies outside the 40x30 image"):
        build_dataset("imagenet", imagenet, "test")
    (imagenet / "val_gt.txt").write_text(f"n01440764\\{val_name(7)}.JPEG 40 30 ; 2 3 20 25\n")
    with pytest.raises(DataError, match=f"image .*{val_name(7)}.* not found"):
        build_dataset("imagenet", imagenet, "test")
    write_xml(imagenet / "val_boxes" / "bad.xml", "n01440764", (40, 30), [[2, 3, 20, 25]])
    (imagenet / "val_boxes" / "bad.xml").write_text("<annotation><size><width>40</width>")
    with pytest.raises(DataError, match=r"bad.xml line 1: malformed XML"):
        build_dataset("imagenet", imagenet, "test")
    (imagenet / "val_boxes" / "bad.xml").write_text("<annotation><size><width>40</width></size></annotation>")
    with pytest.raises(DataError, match=r"bad.xml: no <size/height> \(expected a number there\)"):
        build_dataset("imagenet", imagenet, "test")
    (imagenet / "val_boxes" / "bad.xml").write_text("<annotation><size><width>40</width><height>x</height></size>"
                                                    "</annotation>")
    with pytest.raises(DataError, match=r"bad.xml: expected a number in <size/height>, got 'x'"):
        build_dataset("imagenet", imagenet, "test")
    with pytest.raises(DataError, match=r"ILSVRC2012 has no 'val' split of its own .*; a held-out 'val' split "
                                        r"\(--val-split\) needs wsolevaluation metadata: --metadata-root DIR"):
        build_dataset("imagenet", imagenet, "val")


def test_a_bom_uppercase_xml_and_repeated_lines(imagenet):
    """As Excel / Notepad write CSVs (a UTF-8 BOM) and as some copies name the XML files; an image listed twice
    would be evaluated twice."""
    csv = imagenet / "LOC_val_solution.csv"
    write_csv(csv)
    csv.write_bytes(b"\xef\xbb\xbf" + csv.read_bytes())
    check_val(build_dataset("imagenet", imagenet, "test"))
    lines = csv.read_text(encoding="utf-8-sig").splitlines()
    csv.write_text("\n".join(lines + [lines[2]]) + "\n")
    with pytest.raises(DataError, match=f"LOC_val_solution.csv line 5: image {val_name(2)} again \\(first at "
                                        ".*LOC_val_solution.csv line 3\\)"):
        build_dataset("imagenet", imagenet, "test")
    csv.unlink()
    for i, (wnid, size, boxes) in VAL.items():
        write_xml(imagenet / "val_boxes" / f"{val_name(i)}.XML", wnid, size, boxes)
    check_val(build_dataset("imagenet", imagenet, "test"))


def test_an_empty_train_wnid_folder_is_refused(imagenet):
    """A train/<wnid>/ folder without images would be a class no image has (the model one class too many, the
    labels of the wnids sorted after it shifted): refused for either split, naming it, as the folder format does."""
    write_csv(imagenet / "LOC_val_solution.csv")
    (imagenet / "train" / "n01000000").mkdir()
    for split in ("train", "test"):
        with pytest.raises(DataError, match=f"^{imagenet / 'train' / 'n01000000'}: a class folder with no image "):
            build_dataset("imagenet", imagenet, split)


def test_an_empty_train_folder_of_a_val_class_is_a_class_for_the_test_split(imagenet):
    """Evaluating, a train/<wnid>/ folder without images whose wnid the val boxes name (its train images not
    extracted) is that class, at its sorted place: the val labels stay right (it was refused, and removing it as
    the error said left its val images without a class)."""
    write_csv(imagenet / "LOC_val_solution.csv")
    for image in (imagenet / "train" / WNIDS[1]).iterdir():
        image.unlink()
    check_val(build_dataset("imagenet", imagenet, "test"))
    with pytest.raises(DataError, match=f"^{imagenet / 'train' / WNIDS[1]}: a class folder with no image "):
        build_dataset("imagenet", imagenet, "train")


def test_the_val_box_source_found_is_logged(imagenet, caplog):
    """Where several box sources exist, the one read (the first in the documented order) is said."""
    write_csv(imagenet / "LOC_val_solution.csv")
    for i, (wnid, size, boxes) in VAL.items():
        write_xml(imagenet / "val_boxes" / f"{val_name(i)}.xml", wnid, size, boxes)
    with caplog.at_level("INFO", logger="sat"):
        check_val(build_dataset("imagenet", imagenet, "test"))
    assert f"val boxes: {imagenet / 'val_boxes'} (3 images) (the first found; --val-boxes PATH names another)" \
        in caplog.messages
    caplog.clear()
    with caplog.at_level("INFO", logger="sat"):
        check_val(build_dataset("imagenet", imagenet, "test", val_boxes=imagenet / "LOC_val_solution.csv"))
    assert f"val boxes: {imagenet / 'LOC_val_solution.csv'} (3 images)" in caplog.messages
