import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED = os.path.join(os.path.dirname(ROOT), "shared")


@pytest.fixture
def shakespeare_path():
    """The standard tiny Shakespeare text from ../shared/, or a skip when this checkout has none."""
    path = os.path.join(SHARED, "data", "tinyshakespeare.txt")
    if not os.path.exists(path):
        pytest.skip("../shared/data/tinyshakespeare.txt is not present")
    return path
