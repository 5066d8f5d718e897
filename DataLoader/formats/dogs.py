"""Stanford Dogs release: ``Images/<wnid>-<breed>/<file>.jpg``, ``Annotation/<wnid>-<breed>/<file>`` (PASCAL
VOC XML without extension, one <object> per dog) and ``lists/{train,test}_list.mat`` (``file_list``,
``annotation_list``, ``labels`` 1-based) or the same lists extracted next to ``Images/``."""
from pathlib import Path

from utils.errors import DataError

from .annotations import Item, check_label, check_under_root
from .folder import class_folders
from .imagenet import read_voc_xml
from .matlab import entry_integer, entry_text, read_mat

DOGS_LAYOUT = ("the Stanford Dogs release layout: Images/<wnid>-<breed>/, Annotation/<wnid>-<breed>/, "
               "train_list.mat and test_list.mat in lists/ or the root")
LIST_VARIABLES = ("file_list", "annotation_list", "labels")


def find_list(root, split):
    """``lists/<split>_list.mat``, or ``<split>_list.mat`` directly under the root (lists.tar extracted there)."""
    name = f"{split}_list.mat"
    for path in (root / "lists" / name, root / name):
        if path.is_file():
            return path
    raise DataError(f"{root / 'lists' / name}: file not found, nor {root / name} (expected {DOGS_LAYOUT})")


def load_dogs(root, split):
    """(image root, items, class names) of the 'train' or 'test' split of a Stanford Dogs release.

    Classes are the sorted ``Images/`` folders (the release's label order, as ImageFolder in the official
    code); a list entry whose label disagrees with its folder is an error. Items carry every box of their
    annotation file, in original pixels as written there (a test image must have one, a train image may not).
    """
    if split not in ("train", "test"):
        raise DataError(f"{root}: Stanford Dogs has no '{split}' split (train/test)")
    root = Path(root)
    classes = class_folders(root / "Images", DOGS_LAYOUT)
    path = find_list(root, split)
    lists = read_mat(path, LIST_VARIABLES, f"variables {', '.join(LIST_VARIABLES)} ({DOGS_LAYOUT})")
    files, annotations, labels = (lists[name] for name in LIST_VARIABLES)
    if not len(files) == len(annotations) == len(labels):
        raise DataError(f"{path}: file_list, annotation_list and labels differ in length "
                        f"({len(files)}, {len(annotations)}, {len(labels)})")
    files = [entry_text(file, path, f"entry {index}", "file_list '<wnid>-<breed>/<file>.jpg'")
             for index, file in enumerate(files, 1)]
    unlisted = sorted(set(classes) - {file.split("/")[0] for file in files})
    stray = f" ({root / 'Images' / unlisted[0]} is a folder no entry is in)" if unlisted else ""
    items, listed = [], {}
    for index, (file, annotation, label) in enumerate(zip(files, annotations, labels), 1):
        where = f"entry {index}"
        if listed.setdefault(file, index) != index:
            raise DataError(f"{path} {where}: image {file} is listed twice (entry {listed[file]})")
        label = entry_integer(label, path, where, "labels (1-based class index)")
        check_label(label, range(1, len(classes) + 1), f"{path} {where}")
        folder = file.split("/")[0]
        check_under_root(file, root / "Images", f"{path} {where}")
        if folder != classes[label - 1]:
            raise DataError(f"{path} {where}: label {label} is class {classes[label - 1]!r} but the "
                            f"file is in {folder!r}{stray}")
        if not (root / "Images" / file).is_file():
            raise DataError(f"{path} {where}: image {root / 'Images' / file} not found")
        item = Item(file, label - 1)
        xml = root / "Annotation" / entry_text(annotation, path, where, "annotation_list '<wnid>-<breed>/<file>'")
        if split == "test" and not xml.is_file():
            raise DataError(f"{path} {where}: annotation {xml} not found")
        if xml.is_file():
            record = read_voc_xml(xml)
            item.boxes, item.size, item.source = record.boxes, record.size, record.source
        items.append(item)
    if not items:
        raise DataError(f"{path}: lists no images (expected {DOGS_LAYOUT})")
    beyond = classes[max(item.label for item in items) + 1:]
    if beyond:  # the lists name every breed: a folder sorted after them would be a class of its own
        raise DataError(f"{root / 'Images' / beyond[0]}: a folder after the highest label of {path} (a class no "
                        f"image has; {len(beyond)} such folder(s)): move it out of Images/")
    return root / "Images", items, classes
