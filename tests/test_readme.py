"""The Python snippets of docs/evaluation.md run as written from the repository root (random weights, no download)."""
import re
import subprocess
import sys

import pytest

from conftest import REPO_ROOT


DOC = REPO_ROOT / "docs" / "evaluation.md"


def python_blocks(section):
    """The ```python blocks of the docs/evaluation.md section titled ``section`` (up to the next ## heading)."""
    text = DOC.read_text(encoding="utf-8")
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", body, flags=re.S)


@pytest.mark.parametrize("section", ["Using the model in your code", "Export: ONNX and torch.hub"])
def test_documented_python_snippets_run_as_written(section):
    blocks = python_blocks(section)
    assert blocks, f"no python block in {DOC.name} section {section!r}"
    for code in blocks:
        out = subprocess.run([sys.executable, "-"], input=code, cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, f"{DOC.name} {section!r} snippet failed:\n{out.stderr[-3000:]}"
