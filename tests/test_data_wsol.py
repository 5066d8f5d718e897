import numpy as np
import pytest
from PIL import Image

import DataLoader.formats.annotations as annotations
import DataLoader.formats.wsol as wsol
from DataLoader import build_dataset, build_loader, load_mask
from DataLoader.check import check_split
from utils.cv import cv2
from utils.errors import DataError


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def write_image(path, size):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (10, 200, 30)).save(path)


def write_metadata(meta, ids, labels, sizes=None, localization=None):
    write(meta / "image_ids.txt", "".join(f"{i}\n" for i in ids))
    write(meta / "class_labels.txt", "".join(f"{i},{label}\n" for i, label in zip(ids, labels)))
    if sizes:
        write(meta / "image_sizes.txt", "".join(f"{i},{w},{h}\n" for i, (w, h) in zip(ids, sizes)))
    if localization:
        write(meta / "localization.txt", "".join(f"{line}\n" for line in localization))


@pytest.fixture
def boxes_set(tmp_path):
    """ILSVRC-style ids with a train, a train-fullsup val and a test split."""
    images, meta = tmp_path / "images", tmp_path / "metadata"
    for i in range(4):
        write_image(images / f"train/n0{i % 2}/img{i}.JPEG", (40, 30))
    write_image(images / "val2/a.JPEG", (40, 30))
    write_image(images / "val/ILSVRC2012_val_00000001.JPEG", (50, 40))
    write_image(images / "val/ILSVRC2012_val_00000002.JPEG", (30, 30))
    write_metadata(meta / "train", [f"train/n0{i % 2}/img{i}.JPEG" for i in range(4)], [0, 1, 0, 1])
    write_metadata(meta / "val", ["val2/a.JPEG"], [1], [(40, 30)], ["val2/a.JPEG,1,2,30,20"])
    ids = ["val/ILSVRC2012_val_00000001.JPEG", "val/ILSVRC2012_val_00000002.JPEG"]
    write_metadata(meta / "test", ids, [1, 0], [(50, 40), (30, 30)],
                   [f"{ids[0]},1,1,20,20", f"{ids[0]},25,10,50,40", f"{ids[1]},0,0,29,29"])
    return images, meta


@pytest.fixture
def mask_set(tmp_path):
    """OpenImages-style: PNG instance masks and an ignore mask per image."""
    images, meta = tmp_path / "OpenImages", tmp_path / "metadata"
    ids = ["test/c1/x.jpg", "test/c2/y.jpg"]
    for image_id in ids:
        write_image(images / image_id, (32, 32))
    for name, region in (("x_m1", (0, 0, 8, 8)), ("x_m2", (20, 20, 32, 32)), ("x_ig", (0, 0, 16, 16)),
                         ("y_m1", (4, 4, 12, 12))):
        mask = np.zeros((32, 32), np.uint8)
        mask[region[1]:region[3], region[0]:region[2]] = 255
        (images / "mask").mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask).save(images / "mask" / f"{name}.png")
    write_metadata(meta / "test", ids, [0, 1], [(32, 32), (32, 32)],
                   [f"{ids[0]},mask/x_m1.png,mask/x_ig.png", f"{ids[0]},mask/x_m2.png,", f"{ids[1]},mask/y_m1.png,"])
    write_metadata(meta / "train", ids, [0, 1])
    return images, meta


def test_box_metadata_splits(boxes_set):
    images, meta = boxes_set
    train = build_dataset("wsol", images, "train", metadata_root=meta)
    assert len(train) == 4 and train.num_classes == 2 and train.classes == ["0", "1"]
    assert set(train[0]) == {"image", "label", "index"}
    val = build_dataset("wsol", images, "val", metadata_root=meta)
    assert val[0]["image_id"] == "val2/a.JPEG" and val[0]["boxes"].tolist() == [[1, 2, 30, 20]]
    test = build_dataset("wsol", images, "test", metadata_root=meta)
    sample = test[0]
    assert sample["label"] == 1 and sample["size"] == (50, 40)
    assert sample["image_id"] == "val/ILSVRC2012_val_00000001.JPEG"
    assert sample["boxes"].tolist() == [[1, 1, 20, 20], [25, 10, 50, 40]]
    assert "mask_paths" not in sample
    batch = next(iter(build_loader(test, 2, train=False, workers=0)))
    assert batch["image"].shape == (2, 3, 224, 224) and batch["label"].tolist() == [1, 0]
    assert [b.shape[0] for b in batch["boxes"]] == [2, 1] and batch["num_skipped"] == 0


def test_mask_metadata_and_pxap_masks(mask_set):
    images, meta = mask_set
    test = build_dataset("wsol", images, "test", metadata_root=meta)
    first, second = test[0], test[1]
    assert first["mask_paths"] == [str(images / "mask/x_m1.png"), str(images / "mask/x_m2.png")]
    assert first["ignore_path"] == str(images / "mask/x_ig.png")
    assert second["ignore_path"] is None and first["boxes"].shape == (0, 4)
    foreground, ignore = load_mask(first["mask_paths"], first["ignore_path"], size=32)
    assert foreground.sum() == 64 + 144 and foreground[0, 0] and foreground[31, 31]
    assert ignore.sum() == 256 - 64 and not (ignore & foreground).any()
    foreground, ignore = load_mask(second["mask_paths"], None, size=16)
    assert foreground.shape == (16, 16) and foreground.sum() == 16 and not ignore.any()


def test_metadata_errors(boxes_set, tmp_path):
    images, meta = boxes_set
    with pytest.raises(DataError, match="needs --metadata-root"):
        build_dataset("wsol", images, "test")
    with pytest.raises(DataError, match="metadata folder not found"):
        build_dataset("wsol", images, "test", metadata_root=tmp_path / "none")
    ids = ["val/ILSVRC2012_val_00000001.JPEG", "val/ILSVRC2012_val_00000002.JPEG"]
    write(meta / "test" / "class_labels.txt", f"{ids[0]},1\n{ids[1]},2\n")
    with pytest.raises(DataError, match=r"test/class_labels.txt line 2: label 2 outside the class range 0..1"):
        build_dataset("wsol", images, "test", metadata_root=meta)
    write(meta / "test" / "class_labels.txt", f"{ids[0]},1\n{ids[1]},x\n")
    with pytest.raises(DataError, match=r"test/class_labels.txt line 2: expected 'image_id,class'"):
        build_dataset("wsol", images, "test", metadata_root=meta)
    write(meta / "val" / "localization.txt", "val2/a.JPEG,1,2,42,20\n")
    with pytest.raises(DataError, match=r"val/localization.txt line 1: box \(1, 2, 42, 20\) lies outside the 40x30"):
        build_dataset("wsol", images, "val", metadata_root=meta)
    write(meta / "val" / "localization.txt", "val2/b.JPEG,1,2,30,20\n")
    with pytest.raises(DataError, match=r"localization.txt line 1: image 'val2/b.JPEG' is not listed"):
        build_dataset("wsol", images, "val", metadata_root=meta)
    (images / "val2/a.JPEG").unlink()
    with pytest.raises(DataError, match=r"val/image_ids.txt line 1: file .*a.JPEG not found"):
        build_dataset("wsol", images, "val", metadata_root=meta)


def test_missing_mask_file(mask_set):
    images, meta = mask_set
    (images / "mask/x_m2.png").unlink()
    with pytest.raises(DataError, match=r"localization.txt lines 1, 2: file .*x_m2.png not found"):
        build_dataset("wsol", images, "test", metadata_root=meta)


def test_a_16_bit_mask_is_read_at_its_depth(mask_set):
    """Any non-zero pixel is foreground, in a 16-bit mask too (read as its high byte, values 1 ... 255 were 0)."""
    images, meta = mask_set
    mask = np.zeros((32, 32), np.uint16)
    mask[4:12, 4:12] = 1
    Image.fromarray(mask).save(images / "mask/y_m1.png")
    second = build_dataset("wsol", images, "test", metadata_root=meta)[1]
    foreground, _ = load_mask(second["mask_paths"], None, size=32)
    assert foreground.sum() == 64


def test_a_mask_with_an_exif_orientation_is_read_as_stored(mask_set):
    """As its image is (PIL, no EXIF turn; cv2.imread turned it: the mask over other pixels, unwarned)."""
    images, meta = mask_set
    mask = np.zeros((32, 32), np.uint8)
    mask[0:8, 0:16] = 255  # the top-left corner, 16 wide, 8 high
    image = Image.fromarray(mask)
    exif = image.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees to display
    image.save(images / "mask/y_m1.png", exif=exif.tobytes())
    second = build_dataset("wsol", images, "test", metadata_root=meta)[1]
    foreground, _ = load_mask(second["mask_paths"], None, size=32)
    assert (foreground == (mask > 0)).all()


def test_a_mask_of_another_aspect_ratio_is_warned_by_the_check(mask_set):
    """Masks are stretched to 224 x 224 as their images are: one of another aspect ratio than its image lies over
    other pixels, silently; one of another size but the same aspect ratio is fine."""
    images, meta = mask_set
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(images / "mask/x_m2.png")  # twice the size: not warned
    report = check_split(build_dataset("wsol", images, "test", metadata_root=meta), "test")
    assert report.bad == [] and report.mask_warning() is None
    Image.fromarray(np.zeros((16, 32), np.uint8)).save(images / "mask/y_m1.png")  # 32 wide, 16 high
    report = check_split(build_dataset("wsol", images, "test", metadata_root=meta), "test")
    assert report.mask_warning() == (
        f"test split: 1 image(s) have a mask of another aspect ratio, first {images / 'mask/y_m1.png'} (32x16, its "
        "image 32x32): masks are resized to 224 x 224 as their images are (wsolevaluation's rule), so such a mask "
        "does not lie over its object")


def test_two_ignore_masks_of_one_image_are_refused(mask_set):
    """wsolevaluation reads one ignore mask per image; a second on another line was silently dropped."""
    images, meta = mask_set
    ids = ["test/c1/x.jpg", "test/c2/y.jpg"]
    write(meta / "test/localization.txt", f"{ids[0]},mask/x_m1.png,mask/x_ig.png\n{ids[0]},mask/x_m2.png,"
          f"mask/x_m1.png\n{ids[1]},mask/y_m1.png,\n")
    with pytest.raises(DataError, match=r"localization.txt lines 1, 2: image 'test/c1/x.jpg' has two ignore masks, "
                                        r"mask/x_ig.png and mask/x_m1.png"):
        build_dataset("wsol", images, "test", metadata_root=meta)
    write(meta / "test/localization.txt", f"{ids[0]},mask/x_m1.png,\n{ids[0]},mask/x_m2.png,mask/x_ig.png\n"
          f"{ids[1]},mask/y_m1.png,\n")  # the one ignore mask on a later line, or the same on each: fine
    assert build_dataset("wsol", images, "test", metadata_root=meta)[0]["ignore_path"] == str(images / "mask/x_ig.png")


def test_cub_format_with_metadata(tmp_path):
    write_metadata(tmp_path / "meta/val", ["001.A/a.jpg"], [0], [(20, 20)], ["001.A/a.jpg,0,0,10,10"])
    release, flat = tmp_path / "CUB_200_2011", tmp_path / "dataset_CUB"
    write_image(release / "images/001.A/a.jpg", (20, 20))  # the CUB release: images under images/
    write_image(flat / "001.A/a.jpg", (20, 20))  # wsolevaluation's dataset/CUB: class folders at the root
    for root in (release, flat):
        sample = build_dataset("cub", root, "val", metadata_root=tmp_path / "meta")[0]
        assert sample["image_id"] == "001.A/a.jpg" and sample["boxes"].tolist() == [[0, 0, 10, 10]]


def test_box_outside_the_size_image_sizes_txt_states_names_that_line(tmp_path):
    meta = tmp_path / "meta/val"
    write_image(tmp_path / "CUB_200_2011/images/001.A/a.jpg", (40, 30))
    write_image(tmp_path / "CUB_200_2011/images/001.A/b.jpg", (40, 30))
    ids = ["001.A/a.jpg", "001.A/b.jpg"]
    write_metadata(meta, ids, [0, 0], [(40, 30), (20, 15)], [f"{ids[0]},0,0,10,10", f"{ids[1]},1,2,30,20"])
    with pytest.raises(DataError) as err:  # the box fits the 40x30 file: the stated size is wrong
        build_dataset("cub", tmp_path / "CUB_200_2011", "val", metadata_root=tmp_path / "meta")
    assert str(err.value) == (f"{meta / 'localization.txt'} line 2: box (1, 2, 30, 20) lies outside the 20x15 image "
                              f"that {meta / 'image_sizes.txt'} line 2 states (likely a wrong size there: compare "
                              "it with the image file)")


def test_the_check_of_a_split_reads_its_masks(mask_set):
    images, meta = mask_set
    dataset = build_dataset("wsol", images, "test", metadata_root=meta)
    assert check_split(dataset, "test").bad == []
    (images / "mask/x_ig.png").write_bytes(b"garbage")  # an ignore mask, as the evaluation reads it
    (images / "mask/y_m1.png").write_bytes((images / "mask/x_m1.png").read_bytes()[:60])  # cut short
    bad = check_split(dataset, "test").bad
    assert [path for path, _ in bad] == [dataset.image_path(0), dataset.image_path(1)]
    assert bad[0][1] == f"mask {images / 'mask/x_ig.png'}: not an image file PIL recognises"
    assert bad[1][1].startswith(f"mask {images / 'mask/y_m1.png'}: ")


def test_listing_and_box_line_errors(boxes_set):
    """An image listed twice would count twice; an empty split would fail only after training; a box line short
    of a column is no mask line; a negative or non-number coordinate is said as such."""
    images, meta = boxes_set
    ids = ["val/ILSVRC2012_val_00000001.JPEG", "val/ILSVRC2012_val_00000002.JPEG"]
    test = meta / "test"

    def error(split="test"):
        with pytest.raises(DataError) as err:
            build_dataset("wsol", images, split, metadata_root=meta)
        return str(err.value)

    write(test / "image_ids.txt", f"{ids[0]}\n{ids[1]}\n{ids[0]}\n")
    assert error() == f"{test / 'image_ids.txt'} line 3: image '{ids[0]}' is listed twice (line 1)"
    write(meta / "train" / "image_ids.txt", "train/n00/img0.JPEG\n" * 2)
    assert error("train") == f"{meta / 'train/image_ids.txt'} line 2: image 'train/n00/img0.JPEG' is listed twice " \
                             "(line 1)"
    write(test / "image_ids.txt", "\n")
    assert error() == (f"{test / 'image_ids.txt'}: lists no images (expected wsolevaluation metadata: image_ids.txt, "
                       "class_labels.txt, image_sizes.txt, localization.txt)")
    write(test / "image_ids.txt", f"{ids[0]}\n{ids[1]}\n")
    for line, said in ((f"{ids[0]},1,1,20", "line 1: expected 'image_id,x0,y0,x1,y1' (one line per box)"),
                       (f"{ids[0]},-5,1,20,20", "line 1: box (-5, 1, 20, 20) has a negative coordinate"),
                       (f"{ids[0]},nan,1,20,20", "line 1: box (nan, 1, 20, 20) has a coordinate that is no finite")):
        write(test / "localization.txt", f"{line}\n{ids[1]},0,0,29,29\n")
        assert error().startswith(f"{test / 'localization.txt'} {said}"), line


def test_size_warning_names_image_sizes_txt(boxes_set):
    images, meta = boxes_set
    ids = ["val/ILSVRC2012_val_00000001.JPEG", "val/ILSVRC2012_val_00000002.JPEG"]
    write(meta / "test" / "image_sizes.txt", f"{ids[0]},60,40\n{ids[1]},30,30\n")  # the file is 50x40
    report = check_split(build_dataset("wsol", images, "test", metadata_root=meta), "test")
    assert report.bad == [] and f"({meta / 'test/image_sizes.txt'} line 1 states 60x40, the file is 50x40)" in \
        report.size_warning()


def test_a_class_number_no_training_image_has_is_warned(boxes_set, caplog):
    """Labels 0, 1 and 3: class 2 is a class of its own with no image (the classes are 0 to the largest label)."""
    images, meta = boxes_set
    write_metadata(meta / "train", [f"train/n0{i % 2}/img{i}.JPEG" for i in range(4)], [0, 1, 3, 1])
    with caplog.at_level("WARNING", logger="sat"):
        train = build_dataset("wsol", images, "train", metadata_root=meta)
    assert len(train.classes) == 4
    assert caplog.messages == [f"{meta / 'train' / 'class_labels.txt'}: no image of class 2 (the classes are 0 to "
                               "the largest label, 3)"]
    caplog.clear()
    write_metadata(meta / "train", [f"train/n0{i % 2}/img{i}.JPEG" for i in range(4)], [0, 1, 0, 1])
    with caplog.at_level("WARNING", logger="sat"):
        build_dataset("wsol", images, "train", metadata_root=meta)
    assert caplog.messages == []


@pytest.mark.parametrize("outside", ["absolute", "../elsewhere/x.JPEG", "val/../../elsewhere/x.JPEG"])
def test_an_image_id_leading_out_of_the_data_root_is_an_error(boxes_set, outside):
    """An image_ids.txt id that is absolute or climbs out with '..' was read from wherever it led, and its
    overlay and saved map (named after the id) were written there, outside the output folders."""
    images, meta = boxes_set
    write_image(images.parent / "elsewhere" / "x.JPEG", (40, 30))
    image_id = str(images.parent / "elsewhere" / "x.JPEG") if outside == "absolute" else outside
    write_metadata(meta / "val", [image_id], [1], [(40, 30)], [f"{image_id},1,2,30,20"])
    with pytest.raises(DataError) as err:
        build_dataset("wsol", images, "val", metadata_root=meta)
    assert str(err.value) == f"{meta / 'val' / 'image_ids.txt'} line 1: image {image_id!r} is not under {images} " \
                             "(expected a path relative to it, without '..' leading out of it)"


def test_the_train_split_reads_its_class_labels_once(boxes_set, monkeypatch):
    """The train split's class_labels.txt (ILSVRC: 1.28 M lines) gives its labels and the class count in one
    read; an evaluation split reads it for the class count alone."""
    reads, read_lines = [], annotations.read_lines
    def counted(path, expected):
        reads.append(str(path))
        return read_lines(path, expected)
    monkeypatch.setattr(annotations, "read_lines", counted)
    monkeypatch.setattr(wsol, "read_lines", counted)  # an evaluation split reads the label column alone
    images, meta = boxes_set
    train = build_dataset("wsol", images, "train", metadata_root=meta)
    assert train.classes == ["0", "1"] and len(train) == 4
    assert sum(path.endswith("train/class_labels.txt") for path in reads) == 1
    reads.clear()
    assert build_dataset("wsol", images, "test", metadata_root=meta).classes == ["0", "1"]
    assert sum(path.endswith("train/class_labels.txt") for path in reads) == 1


def test_an_evaluation_split_reads_the_train_label_column_alone(boxes_set, monkeypatch):
    """The class count of an evaluation split: the largest label of train/class_labels.txt (ILSVRC: 1.28 M
    lines) without read_table's rows; a blank line there is skipped and a malformed one named as read_table does."""
    images, meta = boxes_set
    read_table = annotations.read_table
    monkeypatch.setattr(wsol, "read_table", lambda path, *args, **kwargs: pytest.fail(f"read_table({path})")
                        if str(path).endswith("train/class_labels.txt") else read_table(path, *args, **kwargs))
    assert build_dataset("wsol", images, "test", metadata_root=meta).classes == ["0", "1"]
    monkeypatch.setattr(wsol, "read_table", read_table)
    labels = meta / "train" / "class_labels.txt"
    lines = labels.read_text().splitlines()
    labels.write_text("\n".join(lines[:2] + ["  ", lines[2].replace(",0", ", 2 ")] + lines[3:]) + "\n")
    assert build_dataset("wsol", images, "test", metadata_root=meta).classes == ["0", "1", "2"]
    labels.write_text("\n".join(lines[:2] + ["", lines[2].replace(",0", ";0")] + lines[3:]) + "\n")
    with pytest.raises(DataError) as err:
        build_dataset("wsol", images, "test", metadata_root=meta)
    assert str(err.value) == f"{labels} line 4: expected 'image_id,class', got 'train/n00/img2.JPEG;0'"


def test_listed_images_are_checked_without_a_path_object_each(boxes_set, monkeypatch):
    """Each image_ids.txt id that exists is checked with os.path (a Path object each: seconds at 1.28 M ids);
    a missing one is named as before."""
    images, meta = boxes_set
    existing = wsol._existing
    monkeypatch.setattr(wsol, "_existing", lambda *args: pytest.fail("a Path per existing image"))
    assert len(build_dataset("wsol", images, "train", metadata_root=meta)) == 4
    monkeypatch.setattr(wsol, "_existing", existing)
    (images / "train/n01/img3.JPEG").unlink()
    with pytest.raises(DataError) as err:
        build_dataset("wsol", images, "train", metadata_root=meta)
    assert str(err.value) == \
        f"{meta / 'train' / 'image_ids.txt'} line 4: file {images / 'train/n01/img3.JPEG'} not found"


def test_a_mask_with_an_alpha_channel_is_refused_in_the_check_and_the_evaluation(mask_set):
    """A cut-out (the object opaque, the rest transparent, its colour black) read as grey alone was an empty
    mask, silently; refused by the data check and by the evaluation's read, in one line naming it."""
    images, meta = mask_set
    cutout = np.zeros((32, 32, 4), np.uint8)
    cutout[4:12, 4:20, 3] = 255
    Image.fromarray(cutout, "RGBA").save(images / "mask/y_m1.png")
    dataset = build_dataset("wsol", images, "test", metadata_root=meta)
    reason = f"mask {images / 'mask/y_m1.png'}: has transparent pixels (mode RGBA), which are not read: expected " \
             "a grayscale mask, its non-zero pixels the foreground (save the alpha channel as the mask)"
    assert check_split(dataset, "test").bad == [(dataset.image_path(1), reason)]
    with pytest.raises(DataError) as err:
        load_mask(dataset[1]["mask_paths"], None)
    assert str(err.value) == reason
    Image.fromarray(cutout[:, :, 3], "L").save(images / "mask/y_m1.png")  # its alpha channel as the mask
    assert check_split(dataset, "test").bad == [] and load_mask(dataset[1]["mask_paths"], None)[0].any()


def test_a_mask_opaque_everywhere_is_read_and_a_palette_cut_out_refused(mask_set):
    """An alpha channel opaque everywhere (matplotlib's imsave writes masks so) hides nothing: read by its grey
    level, as before and as wsolevaluation reads it. A palette PNG with a transparent colour is a cut-out too."""
    images, meta = mask_set
    dataset = build_dataset("wsol", images, "test", metadata_root=meta)
    grey = np.zeros((32, 32), np.uint8)
    grey[4:12, 4:20] = 255
    for mode, channels in (("RGBA", [grey, grey, grey]), ("LA", [grey])):
        Image.fromarray(np.stack([*channels, np.full_like(grey, 255)], -1), mode).save(images / "mask/y_m1.png")
        assert check_split(dataset, "test").bad == []
        assert load_mask(dataset[1]["mask_paths"], None)[0].sum() > 0
    palette = Image.fromarray((grey > 0).astype(np.uint8), "P")
    palette.putpalette([0, 0, 0, 0, 0, 0])  # both colours black: the object told by its transparency alone
    palette.save(images / "mask/y_m1.png", transparency=0)
    reason = f"mask {images / 'mask/y_m1.png'}: has transparent pixels (mode P), which are not read: expected " \
             "a grayscale mask, its non-zero pixels the foreground (save the alpha channel as the mask)"
    assert check_split(dataset, "test").bad == [(dataset.image_path(1), reason)]
    with pytest.raises(DataError, match="has transparent pixels"):
        load_mask(dataset[1]["mask_paths"], None)
    hdr = images / "mask/y_m1.hdr"  # a mask cv2 reads and PIL does not: read as before, no PIL traceback
    cv2.imwrite(str(hdr), np.repeat((grey > 0).astype(np.float32)[:, :, None], 3, axis=2))
    assert load_mask([str(hdr)], None)[0].sum() > 0


def test_a_mask_opencv_cannot_read_is_named_by_the_data_check(mask_set):
    """The data check reads a mask's header with PIL, the evaluation reads the mask with OpenCV: a mask PIL reads
    and OpenCV does not (.tga, .pcx; .gif with OpenCV 4.8, the floor) passed the check, and the evaluation
    stopped on it after the evaluation pass ('unreadable mask'). The check names it, before any work."""
    images, meta = mask_set
    grey = np.zeros((32, 32), np.uint8)
    grey[4:12, 4:20] = 255
    Image.fromarray(grey).save(images / "mask/y_m1.png", format="TGA")  # PIL reads it; OpenCV has no reader
    dataset = build_dataset("wsol", images, "test", metadata_root=meta)
    reason = f"mask {images / 'mask/y_m1.png'}: unreadable by OpenCV {cv2.__version__}, which the evaluation " \
             "reads masks with (expected a grayscale PNG)"
    assert check_split(dataset, "test").bad == [(dataset.image_path(1), reason)]
    with pytest.raises(DataError, match="unreadable mask"):
        load_mask(dataset[1]["mask_paths"], None)
    Image.fromarray(grey).save(images / "mask/y_m1.png")
    assert check_split(dataset, "test").bad == []
