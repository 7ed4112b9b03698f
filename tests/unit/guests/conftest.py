"""Make the repository's ``guests`` recipes importable.

The editable install ships only ``phd`` and ``sut``; the guest recipes are
build scripts that live next to them, so their tests import them from the
repository root.
"""

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[3])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
