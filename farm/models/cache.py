"""The farm's cache folder: built models, fetched copies and the hash cache live under it."""

from __future__ import annotations

import os
from pathlib import Path


def farm_cache() -> Path:
    """The farm's cache root: $SDFARM_CACHE, else ~/.cache/sdfarm."""
    return Path(os.environ.get("SDFARM_CACHE") or Path.home() / ".cache" / "sdfarm")
