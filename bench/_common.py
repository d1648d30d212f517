"""Shared bits of the bench scripts: the default data path and importing the project."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared/data/hapt-wisdm-format/hapt_users01-24_raw.txt"

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
