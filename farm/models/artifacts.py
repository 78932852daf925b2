"""Model and LoRA files: where a spec's reference points, whether it is safe to load, its hash.

Content hashes (not paths) identify models and LoRAs in task ids, so a renamed file renders
nothing twice and a re-trained file with the same name renders again. Hashing a 7 GB SDXL
checkpoint takes a while, so hashes are cached by (path, size, mtime).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from pathlib import Path

from farm.errors import LoraError, ModelError
from farm.files import replacing, write_atomic
from farm.models.cache import farm_cache
from farm.models.tiny import is_tiny, resolve_tiny

PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl"}
_HASH_CACHE_NAME = "sha256-cache.json"


def _refuse_pickle(path: Path, error: type[Exception]) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise error(f"{path}: {path.suffix} files are Python pickles that can run code when loaded; "
                    "convert it to .safetensors")


def allowed_roots(base: Path) -> list[Path]:
    """Folders a job's paths may point into: its spec's folder, the farm's cache, and the folders
    in $SDFARM_ROOTS (`:`-separated; unset: your home folder). A spec that arrives over the
    network then cannot make a worker read /etc or another user's files, by path or symlink."""
    extra = os.environ.get("SDFARM_ROOTS")
    listed = [Path(p) for p in extra.split(os.pathsep) if p] if extra is not None else [Path.home()]
    return [root.expanduser().resolve() for root in (base, farm_cache(), *listed)]


def inside_roots(given: Path, base: Path, error: type[Exception] = ModelError) -> Path:
    """`given` resolved (symlinks and `..` followed), refused unless it stays in allowed_roots."""
    try:
        path = given.expanduser().resolve()
        path.exists()  # a name too long for the filesystem fails here, not later in a worker
    except (OSError, ValueError, RuntimeError) as exc:  # NUL bytes, ENAMETOOLONG, symlink loops
        raise error(f"{given!r}: not a usable path ({getattr(exc, 'strerror', None) or exc})") from None
    roots = allowed_roots(base)
    if not any(path.is_relative_to(root) for root in roots) and not _in_run_folder(path):
        raise error(f"{given}: resolves outside the folders jobs may read ({', '.join(map(str, roots))}); "
                    "add its folder to SDFARM_ROOTS")
    return path


def open_regular(path: Path, error: type[Exception] = ModelError):
    """`path` (as inside_roots returns it: resolved) opened for reading in binary, refused unless it is
    a regular file. Its last part is not followed if it became a symlink since it was checked, and a
    FIFO or device put in its place is refused instead of blocking the planner."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        reason = "became a symlink after it was checked" if exc.errno == errno.ELOOP else exc.strerror
        raise error(f"{path}: cannot read ({reason})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise error(f"{path}: not a regular file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: Path, limit: int, error: type[Exception] = ModelError) -> bytes:
    """At most `limit + 1` bytes of a regular file (see open_regular): more than `limit` tells the
    caller the file is too large without reading all of it."""
    with open_regular(path, error) as handle:
        try:
            return handle.read(limit + 1)
        except OSError as exc:
            raise error(f"{path}: cannot read ({exc.strerror})") from None


def _in_run_folder(path: Path) -> bool:
    """Inside a run folder the farm made (one with manifest parts): regularization sets and
    checkpoints the farm itself wrote, wherever --out put them."""
    return any(next((folder / "manifest").glob("part-*.parquet"), None) is not None for folder in path.parents)


def resolve_model(reference: str, base: Path) -> Path:
    """A model reference (`tiny:sdxl`, a diffusers folder or a `.safetensors` file) → its path."""
    if is_tiny(reference):
        return resolve_tiny(reference)
    path = inside_roots(base / reference, base, ModelError)
    _refuse_pickle(path, ModelError)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelError(f"{path}: not a diffusers model folder (no model_index.json)")
        return path
    if not path.exists():
        raise ModelError(f"{path}: model not found")
    if path.suffix.lower() != ".safetensors":
        raise ModelError(f"{path}: a model is a diffusers folder or a .safetensors checkpoint")
    return path


def resolve_lora(reference: str, base: Path) -> Path:
    """A LoRA reference (`tiny:lora/NAME` or a `.safetensors` path) → its path."""
    if is_tiny(reference):
        return resolve_tiny(reference)
    given = (base / reference).expanduser()
    if not given.name or given.name in (".", ".."):
        raise LoraError(f"{reference!r}: not a LoRA file name")
    _refuse_pickle(given, LoraError)
    if given.suffix.lower() != ".safetensors":  # A1111 tags name LoRAs without the extension
        given = given.with_name(given.name + ".safetensors")
    path = inside_roots(given, base, LoraError)
    _refuse_pickle(path, LoraError)
    if not path.is_file():
        raise LoraError(f"{path}: LoRA file not found")
    return path


def sha256_file(path: Path) -> str:
    return file_hashes(path)[0]


def file_hashes(path: Path) -> tuple[str, str]:
    """(sha256 of the file, its AddNet hash), read once. The AddNet hash is the sha256 of what
    follows a safetensors file's header (8-byte little-endian length, then that many bytes of
    JSON): the hash A1111 writes as `Lora hashes` and looks LoRAs up by, and sd-scripts'
    `sshs_model_hash`. It ignores the metadata, so retitling a file keeps it. "" for a file that
    is not safetensors-shaped."""
    whole, tensors = hashlib.sha256(), hashlib.sha256()
    with open(path, "rb") as handle:
        head = handle.read(8)
        whole.update(head)
        header_left = int.from_bytes(head, "little") if len(head) == 8 else -1
        for block in iter(lambda: handle.read(1 << 20), b""):
            whole.update(block)
            if header_left >= 0:
                skip = min(header_left, len(block))
                header_left -= skip
                tensors.update(block[skip:])
    return whole.hexdigest(), tensors.hexdigest() if header_left == 0 else ""


def _model_files(folder: Path) -> list[Path]:
    """What determines a diffusers folder's output: weights, configs and tokenizer files."""
    keep = {".safetensors", ".json", ".txt", ".model"}
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in keep
                  and not p.name.startswith("."))


class HashCache:
    """sha256 of files, remembered by (path, size, mtime) in a JSON file next to the tiny cache."""

    def __init__(self, path: Path | None = None):
        self.path = path or farm_cache() / _HASH_CACHE_NAME
        try:
            self.entries: dict = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.entries = {}
        self.dirty = False

    def file(self, path: Path) -> str:
        return self._entry(path)["sha256"]

    def addnet(self, path: Path) -> str:
        """The file's AddNet hash (see `file_hashes`): what A1111 records for a LoRA."""
        return self._entry(path)["addnet"]

    def _entry(self, path: Path) -> dict:
        stat = path.stat()
        key = str(path.resolve())
        stamp = [stat.st_size, stat.st_mtime_ns]
        entry = self.entries.get(key)
        if entry and entry["stamp"] == stamp and "addnet" in entry:
            return entry
        sha256, addnet = file_hashes(path)
        self.entries[key] = entry = {"stamp": stamp, "sha256": sha256, "addnet": addnet}
        self.dirty = True
        return entry

    def model(self, path: Path) -> str:
        """A file's sha256, or for a folder the sha256 of its files' relative names and hashes."""
        if path.is_file():
            return self.file(path)
        listing = [f"{p.relative_to(path).as_posix()} {self.file(p)}" for p in _model_files(path)]
        return hashlib.sha256("\n".join(listing).encode()).hexdigest()

    def save(self) -> None:
        if not self.dirty:
            return
        write_atomic(self.path, json.dumps(self.entries).encode(), durable=False)
        self.dirty = False


# --- Copies across nodes -----------------------------------------------------------------------
# Two laptops share no disk. A worker on a node other than the one a job was planned on never
# trusts a path (the same path may hold other bytes there, or nothing): it keeps content-addressed
# copies, fetched once in blocks from the planning node and checked against the plan's sha256.

FETCH_BLOCK = 16 << 20  # bytes per object-store transfer: big files never sit whole in memory


def node_cache_dir() -> Path:
    """This node's fetched copies: $SDFARM_NODE_CACHE, else `blobs/` in the sdfarm cache."""
    root = os.environ.get("SDFARM_NODE_CACHE")
    return Path(root) if root else farm_cache() / "blobs"


def shared_roots() -> list[Path]:
    """Folders every node sees with the same bytes ($SDFARM_SHARED_ROOTS, `:`-separated)."""
    value = os.environ.get("SDFARM_SHARED_ROOTS", "")
    return [Path(p).expanduser().resolve() for p in value.split(os.pathsep) if p]


def is_shared(path: str) -> bool:
    resolved = Path(path).resolve()
    return any(resolved.is_relative_to(root) for root in shared_roots())


def fetched_copy(sha256: str, suffix: str, size: int, read_block) -> tuple[Path, bool]:
    """A local file with exactly the bytes `sha256` names: (path, True when it was fetched now).

    `read_block(offset, length)` returns the source's bytes; the copy is written to a temp file,
    checked, then renamed, so a half-fetched or wrong copy is never visible under its name.
    """
    target = node_cache_dir() / f"{sha256}{suffix}"
    if target.is_file() and HashCache().file(target) == sha256:
        return target, False
    digest = hashlib.sha256()
    with replacing(target) as partial:
        with open(partial, "wb") as handle:
            offset = 0
            while offset < size:
                block = read_block(offset, min(FETCH_BLOCK, size - offset))
                if not block:
                    break
                handle.write(block)
                digest.update(block)
                offset += len(block)
        if digest.hexdigest() != sha256:
            raise LoraError(f"{sha256[:12]}{suffix}: the copy fetched from the planning node has other "
                            "bytes than the plan hashed (file changed there?); plan again")
    return target, True


# --- Base models across nodes ------------------------------------------------------------------
# A base model (a diffusers folder or one .safetensors file, often 7 GB) is sent like a LoRA: by
# content hash, in blocks, into this node's cache, checked file by file and as a whole against the
# plan's hash. Unlike a LoRA it is worth resuming: a copy cut short (a killed worker, a closed lid)
# keeps its bytes in `<sha>.partial/` and goes on from there. One worker per node fetches a model
# at a time (a file lock); the others wait for it and use its copy.

def model_listing(path: Path) -> dict:
    """What a node needs to fetch the model at `path`: {"kind": "file" | "folder", "files":
    [(relative name, size, sha256)]}, in the order (and with the names) its model hash covers."""
    hashes = HashCache()
    try:
        if path.is_file():
            files = [(path.name, path.stat().st_size, hashes.file(path))]
            kind = "file"
        else:
            files = [(p.relative_to(path).as_posix(), p.stat().st_size, hashes.file(p)) for p in _model_files(path)]
            kind = "folder"
    finally:
        hashes.save()
    return {"kind": kind, "files": files}


def _listing_hash(listing: dict) -> str:
    """The model hash a listing adds up to (HashCache.model's, from the per-file hashes)."""
    if listing["kind"] == "file":
        return listing["files"][0][2]
    return hashlib.sha256("\n".join(f"{name} {sha}" for name, _, sha in listing["files"]).encode()).hexdigest()


def fetched_model(sha256: str, listing: dict, read_block, on_progress=None) -> tuple[Path, int]:
    """This node's copy of the model `sha256`: (path, bytes fetched now). `read_block(name,
    offset, length)` reads the planning node's bytes; `on_progress(done, total)` sees each block."""
    import fcntl

    if _listing_hash(listing) != sha256:
        raise ModelError(f"{sha256[:12]}: the planning node lists other files than the plan hashed (model changed "
                         "there?); plan again")
    root = node_cache_dir() / "models"
    single = listing["kind"] == "file"
    target = root / (f"{sha256}{Path(listing['files'][0][0]).suffix}" if single else sha256)
    if target.exists():
        return target, 0
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{sha256}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another worker of this node fetching it: wait, then use its copy
        if target.exists():
            return target, 0
        partial = root / f"{sha256}.partial"
        total, done, fetched = sum(size for _, size, _ in listing["files"]), 0, 0
        for name, size, sha in listing["files"]:
            def read(offset, length, name=name):
                return read_block(name, offset, length)

            def progress(count, base=done):
                if on_progress:
                    on_progress(base + count, total)

            fetched += _resume_file(partial / name, size, sha, read, progress)
            done += size
        os.replace(partial / listing["files"][0][0] if single else partial, target)
        if single:
            partial.rmdir()
    return target, fetched


def _resume_file(path: Path, size: int, sha256: str, read, progress) -> int:
    """Bring `path` to `size` bytes read from `read(offset, length)`, going on from what it already
    holds, and check it against `sha256` (a wrong copy is removed: the next try starts over)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    have = path.stat().st_size if path.exists() else 0
    if have > size:
        path.unlink()
        have = 0
    fetched = 0
    with open(path, "ab") as handle:
        while have < size:
            block = read(have, min(FETCH_BLOCK, size - have))
            if not block:
                break
            handle.write(block)
            have += len(block)
            fetched += len(block)
            progress(have)
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != sha256:
        path.unlink()
        raise ModelError(f"{path.name}: the copy fetched from the planning node has other bytes than it listed "
                         "(file changed there?); plan again")
    progress(size)
    return fetched
