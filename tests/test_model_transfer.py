"""Base models sent between nodes: by content hash, in blocks, checked file by file and as a
whole, resumed after a copy was cut short, fetched once per node however many workers want it.
(The same code runs on a real second node in test_pool.py.)"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pytest

from farm.errors import ModelError
from farm.models import artifacts
from farm.models.artifacts import HashCache, fetched_model, model_listing


@pytest.fixture
def model_folder(tmp_path) -> Path:
    """A diffusers-shaped folder: weights, configs, a tokenizer file (and a file no hash covers)."""
    folder = tmp_path / "planning-node" / "my-sdxl"
    for name, size in (("unet/diffusion_pytorch_model.safetensors", 300_000), ("unet/config.json", 500),
                       ("vae/diffusion_pytorch_model.safetensors", 120_000), ("tokenizer/vocab.json", 9_000),
                       ("model_index.json", 700)):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(hashlib.sha256(name.encode()).digest() * (size // 32) + name.encode())
    (folder / "unet" / "notes.md").write_text("not part of the model")
    return folder


@pytest.fixture
def node_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "other-node-cache"
    monkeypatch.setenv("SDFARM_NODE_CACHE", str(cache))
    monkeypatch.setattr(artifacts, "FETCH_BLOCK", 16_384)  # many blocks, so a copy can be cut mid-file
    return cache


class Source:
    """The planning node's side: reads blocks of the listed files and counts the bytes sent."""

    def __init__(self, root: Path, listing: dict, fail_after: int | None = None):
        self.root, self.listing, self.fail_after = root, listing, fail_after
        self.sent, self.lock = 0, threading.Lock()

    def __call__(self, name: str, offset: int, length: int) -> bytes:
        path = self.root if self.listing["kind"] == "file" else self.root / name
        with self.lock:
            if self.fail_after is not None and self.sent >= self.fail_after:
                raise ConnectionError("the worker was killed mid-transfer")
            with open(path, "rb") as handle:
                handle.seek(offset)
                block = handle.read(length)
            self.sent += len(block)
        return block


def same_files(a: Path, b: Path) -> bool:
    names = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    return names == sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file()) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names)


def test_a_folder_model_arrives_whole_and_hashes_as_planned(model_folder, node_cache):
    sha = HashCache().model(model_folder)
    listing = model_listing(model_folder)
    source = Source(model_folder, listing)
    path, fetched = fetched_model(sha, listing, source)
    assert path == node_cache / "models" / sha and fetched == source.sent == sum(s for _, s, _ in listing["files"])
    assert HashCache().model(path) == sha
    assert not (path / "unet" / "notes.md").exists()  # what the model hash does not cover is not sent
    (model_folder / "unet" / "notes.md").unlink()
    assert same_files(model_folder, path)
    again = Source(model_folder, listing)
    assert fetched_model(sha, listing, again) == (path, 0) and again.sent == 0  # once per node


def test_a_copy_cut_short_goes_on_from_where_it_stopped(model_folder, node_cache):
    sha, listing = HashCache().model(model_folder), model_listing(model_folder)
    total = sum(size for _, size, _ in listing["files"])
    cut = Source(model_folder, listing, fail_after=200_000)  # inside the UNet's weights
    with pytest.raises(ConnectionError):
        fetched_model(sha, listing, cut)
    assert not (node_cache / "models" / sha).exists()  # nothing half-fetched under the model's name
    resumed = Source(model_folder, listing)
    path, fetched = fetched_model(sha, listing, resumed)
    assert resumed.sent == fetched == total - cut.sent  # only what was missing
    assert HashCache().model(path) == sha


def test_two_workers_of_one_node_fetch_a_model_once(model_folder, node_cache):
    sha, listing = HashCache().model(model_folder), model_listing(model_folder)
    source, results = Source(model_folder, listing), []
    threads = [threading.Thread(target=lambda: results.append(fetched_model(sha, listing, source)))
               for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert source.sent == sum(size for _, size, _ in listing["files"])
    assert sorted(fetched for _, fetched in results) == [0, 0, source.sent]
    assert len({path for path, _ in results}) == 1


def test_a_single_file_checkpoint_keeps_its_suffix(tmp_path, node_cache):
    checkpoint = tmp_path / "sd_xl_base_1.0.safetensors"
    checkpoint.write_bytes(b"\x08" * 70_000)
    sha, listing = HashCache().model(checkpoint), model_listing(checkpoint)
    path, _ = fetched_model(sha, listing, Source(checkpoint, listing))
    assert path == node_cache / "models" / f"{sha}.safetensors" and path.read_bytes() == checkpoint.read_bytes()
    assert not list((node_cache / "models").glob("*.partial"))


def test_other_bytes_than_planned_are_refused_and_not_kept(model_folder, node_cache):
    sha, listing = HashCache().model(model_folder), model_listing(model_folder)
    with pytest.raises(ModelError, match="lists other files than the plan hashed"):
        fetched_model("0" * 64, listing, Source(model_folder, listing))
    weights = model_folder / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"!")  # changed on the planning node after it listed
    with pytest.raises(ModelError, match="other bytes than it listed"):
        fetched_model(sha, listing, Source(model_folder, listing))
    assert not (node_cache / "models" / sha).exists()
    assert not (node_cache / "models" / f"{sha}.partial" / "vae" / "diffusion_pytorch_model.safetensors").exists()
