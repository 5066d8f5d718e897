"""The Python snippets of README.md and docs/evaluation.md run as written from the repository root (random weights,
no download)."""
import re

import pytest
from PIL import Image

from conftest import REPO_ROOT
from DataLoader import build_dataset
from DataLoader.build import SPLITS


def python_blocks(doc, section):
    """The ```python blocks of the section of ``doc`` titled ``section`` (up to the next ## heading)."""
    text = (REPO_ROOT / doc).read_text(encoding="utf-8")
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", body, flags=re.S)


@pytest.mark.parametrize("doc, section", [("README.md", "Using SAT in your code"),
                                          ("docs/evaluation.md", "Using the model in your code"),
                                          ("docs/evaluation.md", "Export: ONNX and torch.hub")])
def test_documented_python_snippets_run_as_written(doc, section, monkeypatch):
    """Each block as a script run from the repository root (whose folder is on sys.path, as for `python -`
    started there), in this process: a fresh interpreter would only import torch and timm again."""
    blocks = python_blocks(doc, section)
    assert blocks, f"no python block in {doc} section {section!r}"
    monkeypatch.chdir(REPO_ROOT)
    for code in blocks:
        exec(compile(code, f"{doc}, section {section!r}", "exec"), {"__name__": "__main__"})


def heading_anchors(path):
    """The anchors GitHub gives the headings of a markdown file: lower case, punctuation dropped, spaces as -."""
    anchors = set()
    for heading in re.findall(r"^#+ (.*)$", path.read_text(encoding="utf-8"), flags=re.M):
        anchor = unique = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        suffix = 0
        while unique in anchors:  # a repeated heading: -1, -2 ...
            suffix += 1
            unique = f"{anchor}-{suffix}"
        anchors.add(unique)
    return anchors


def test_links_between_the_docs_reach_their_files_and_headings():
    docs = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
    broken = []
    for doc in docs:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target):  # a web address
                continue
            file, _, anchor = target.partition("#")
            path = (doc.parent / file).resolve() if file else doc
            if not path.exists() or (anchor and anchor not in heading_anchors(path)):
                broken.append(f"{doc.relative_to(REPO_ROOT)}: {target}")
    assert not broken


def test_the_quick_start_states_the_versions_requirements_admit():
    """README's 'admits torch A - B, torchvision C - D' is requirements.txt's ranges: each lower bound, and the
    minor version below each cap."""
    requirements = (REPO_ROOT / "requirements.txt").read_text()
    pins = {name: (low, high) for name, low, high in
            re.findall(r"^(torch|torchvision)>=([\d.]+),<([\d.]+)$", requirements, flags=re.M)}
    stated = re.search(r"admits torch ([\d.]+) - ([\d.]+), torchvision ([\d.]+) - ([\d.]+)",
                       (REPO_ROOT / "README.md").read_text())
    assert stated and set(pins) == {"torch", "torchvision"}

    def below(cap):
        major, minor = cap.split(".")
        return f"{major}.{int(minor) - 1}"
    assert stated.groups() == (pins["torch"][0], below(pins["torch"][1]),
                               pins["torchvision"][0], below(pins["torchvision"][1]))


def test_the_datasets_page_names_every_split_the_folder_format_reads(tmp_path):
    """Your own data: each split the folder reader builds (val/ too: --val-split, evaluator.py --split val) is
    named on the datasets page as ROOT/<split>/."""
    for split in SPLITS:
        (tmp_path / split / "cat").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / split / "cat" / "0.png")
    text = (REPO_ROOT / "docs" / "datasets.md").read_text(encoding="utf-8")
    section = text.split("\n## Your own data (`folder`)\n", 1)[1].split("\n## ", 1)[0]
    for split in SPLITS:
        assert len(build_dataset("folder", tmp_path, split)) == 1
        assert f"`ROOT/{split}/" in section, f"datasets.md does not name the folder format's {split}/ split"


def test_the_training_page_config_table_states_the_config_files_values():
    """docs/training.md's table of configs (batch, lr, epochs, area_thr, arch) restates the files: one source."""
    from utils.config import load_yaml
    text = (REPO_ROOT / "docs" / "training.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `config/(\w+\.yaml)` \| [^|]* \| ([^|]*) \| ([^|]*) \| ([^|]*) \| ([^|]*) \| ([^|]*) \|$",
                      text, flags=re.M)
    checked = 0
    for name, arch, batch, lr, epochs, area_thr in rows:
        if not batch.strip():  # "as CUB": no numbers of its own
            continue
        cfg = load_yaml(REPO_ROOT / "config" / name)
        assert arch.split()[0] == cfg["arch"], name
        assert (int(batch), float(lr), int(epochs), float(area_thr)) == \
            (cfg["batch_size"], cfg["lr"], cfg["epochs"], cfg["area_thr"]), name
        checked += 1
    assert checked == 4, rows  # CUB, ILSVRC, ILSVRC_fewshot, demo
