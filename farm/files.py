"""Writing files so that readers see all of a file or none of it, even when the writer is killed.

Every file the farm leaves for another process or a later run (images, manifest parts, run.json,
checkpoints, training state, the hash cache, fetched copies, built models) is written under a
hidden temp name beside its target and renamed into place: a rename is atomic on one filesystem.
What a killed writer leaves behind matches `TEMP_GLOB` and is never read as data.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

TEMP_GLOB = ".*.tmp"  # a temp file (or folder) a killed writer left behind


def _temp_beside(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")


def crash_point(point: str) -> None:
    """SDFARM_CRASH_AT=<stage>-temp|<stage>-renamed kills this process there, as a power cut or
    kill -9 would: the fault-injection tests prove a run survives a crash at every such point."""
    if os.environ.get("SDFARM_CRASH_AT") == point:
        os._exit(137)


@contextmanager
def replacing(path: Path, durable: bool = False, stage: str = "file") -> Iterator[Path]:
    """A temp path to write `path`'s new content to (for writers that want a path: safetensors,
    torch.save); renamed over `path` when the block ends without an error, removed when it fails.
    `durable` fsyncs before the rename, so the file survives a power cut too."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_beside(path)
    try:
        yield tmp
        if durable:
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # Ray workers run as other users on real clusters
        crash_point(f"{stage}-temp")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    crash_point(f"{stage}-renamed")


def write_atomic(path: Path, data: bytes, durable: bool = True, stage: str = "file") -> None:
    """Write `data` to `path` all or nothing. `durable` (the default) fsyncs first; images skip it
    (a lost image only means its task renders again: its manifest row is written after it)."""
    with replacing(path, durable=durable, stage=stage) as tmp:
        tmp.write_bytes(data)


def make_readable(root: Path) -> None:
    """diffusers writes .safetensors as 0600; Ray workers run as other users on real clusters."""
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)


def publish_folder(build: Callable[[Path], Path], target: Path) -> Path:
    """`build(tmp)` makes a folder (or file) inside a temp folder beside `target`, which is then
    renamed into place: a crash never leaves half a model. An existing `target` is kept as is."""
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
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
