"""The farm's cache folder and the one way things are published into it.

Built models, fetched copies and the hash cache all live under `$SDFARM_CACHE` (else
`~/.cache/sdfarm`); whatever is built there appears whole or not at all.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def farm_cache() -> Path:
    """The farm's cache root: $SDFARM_CACHE, else ~/.cache/sdfarm."""
    return Path(os.environ.get("SDFARM_CACHE") or Path.home() / ".cache" / "sdfarm")


def publish(build, target: Path) -> Path:
    """Build into a temp sibling and rename into place, so a crash never leaves half a model."""
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        built = build(tmp)
        make_readable(tmp)
        try:
            os.replace(built, target)
        except OSError:
            if not target.exists():  # lost a race to another process: theirs is as good
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def make_readable(root: Path) -> None:
    """diffusers writes .safetensors as 0600; Ray workers run as other users on real clusters."""
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
