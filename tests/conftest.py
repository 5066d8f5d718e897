import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

# The spec and the official-code fixtures live beside the checkout (../shared); SAT_SHARED overrides.
SHARED_DIR = Path(os.environ.get("SAT_SHARED", REPO_ROOT.parent / "shared"))
ORIGINAL_SAT_DIR = SHARED_DIR / "fixtures" / "original_sat"


@pytest.fixture(scope="session")
def original_sat_dir():
    """Folder with the official-code fixtures; tests using it skip when ../shared is absent."""
    if not ORIGINAL_SAT_DIR.is_dir():
        pytest.skip(f"official SAT fixtures not found at {ORIGINAL_SAT_DIR} (set SAT_SHARED to ../shared)")
    return ORIGINAL_SAT_DIR
