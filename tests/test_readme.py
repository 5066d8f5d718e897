"""The Python snippets of README.md and docs/evaluation.md run as written from the repository root (random weights,
no download)."""
import re
import subprocess
import sys

import pytest

from conftest import REPO_ROOT


def python_blocks(doc, section):
    """The ```python blocks of the section of ``doc`` titled ``section`` (up to the next ## heading)."""
    text = (REPO_ROOT / doc).read_text(encoding="utf-8")
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", body, flags=re.S)


@pytest.mark.parametrize("doc, section", [("README.md", "Using SAT in your code"),
                                          ("docs/evaluation.md", "Using the model in your code"),
                                          ("docs/evaluation.md", "Export: ONNX and torch.hub")])
def test_documented_python_snippets_run_as_written(doc, section):
    blocks = python_blocks(doc, section)
    assert blocks, f"no python block in {doc} section {section!r}"
    for code in blocks:
        out = subprocess.run([sys.executable, "-"], input=code, cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, f"{doc} {section!r} snippet failed:\n{out.stderr[-3000:]}"
