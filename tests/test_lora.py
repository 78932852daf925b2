"""Hostile and damaged LoRA files: each fails only its own task with one line naming the file,
nothing in them is ever executed, and the renderer answers the next task correctly."""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path

import pytest

from farm.errors import FarmError
from farm.sweep.plan import plan_job
from farm.sweep.spec import parse_spec


class Canary:
    """Unpickling this creates a file: proof that a pickle was loaded."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def good_bytes(lora_dir: Path) -> bytes:
    return (lora_dir / "subject-000001.safetensors").read_bytes()


def safetensors_bytes(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def retyped(lora_dir: Path, change) -> bytes:
    from safetensors.torch import load, save

    tensors = load(good_bytes(lora_dir))
    change(tensors)
    return save(tensors)


def wrong_rank(tensors: dict) -> None:
    import torch

    key = next(k for k in tensors if "up" in k)
    tensors[key] = torch.randn(tensors[key].shape[0], tensors[key].shape[1] * 2)


def sd15_keys(tensors: dict) -> None:
    import torch

    tensors.clear()
    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    tensors.update({f"{stem}.lora_down.weight": torch.randn(4, 320), f"{stem}.lora_up.weight": torch.randn(320, 4),
                    f"{stem}.alpha": torch.tensor(4.0)})


def to_int(tensors: dict) -> None:
    import torch

    for key in tensors:
        tensors[key] = (tensors[key] * 100).to(torch.int32)


CASES = {
    "empty": (lambda d, c: b"", "not a readable .safetensors file"),
    "truncated": (lambda d, c: good_bytes(d)[: len(good_bytes(d)) // 2], "not a readable .safetensors file"),
    "header-too-large": (lambda d, c: struct.pack("<Q", 1 << 40) + b"{}", "not a readable .safetensors file"),
    "header-past-end": (lambda d, c: struct.pack("<Q", 4096) + b'{"a": 1}', "not a readable .safetensors file"),
    "non-json-header": (lambda d, c: struct.pack("<Q", 8) + b"notjson!", "not a readable .safetensors file"),
    "overlapping-offsets": (lambda d, c: safetensors_bytes(
        {"a.lora.down.weight": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
         "a.lora.up.weight": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, bytes(24)),
        "not a readable .safetensors file"),
    "wrong-dtype": (lambda d, c: retyped(d, to_int), "LoRA weights are floating point"),
    "sd15-lora": (lambda d, c: retyped(d, sd15_keys), "cannot apply to this model"),
    "wrong-rank": (lambda d, c: retyped(d, wrong_rank), "cannot apply to this model"),
    "renamed-pickle": (lambda d, c: pickle.dumps(Canary(str(c))), "not a readable .safetensors file"),
}


@pytest.fixture(scope="module")
def reference(renderer, lora_dir):
    """A good task and its bytes, rendered before any hostile file is seen."""
    task = plan_job(parse_spec({"job": "ok", "model": "tiny:sdxl", "defaults": {
        "prompt": "photo of a w0ut3r man", "steps": 2, "width": 64, "height": 64, "seed": 3},
        "axes": {"lora": ["subject-000002"]}}), lora_dir).tasks[0]
    result = renderer.render(task)
    assert result.status == "ok"
    return task, result.png


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_damaged_or_hostile_lora_fails_its_task_in_one_line(case, renderer, reference, lora_dir, tmp_path):
    make, expected = CASES[case]
    canary = tmp_path / "canary"
    path = tmp_path / f"{case}.safetensors"
    path.write_bytes(make(lora_dir, canary))
    task = plan_job(parse_spec({"job": "x", "model": "tiny:sdxl", "defaults": {
        "prompt": "a", "steps": 2, "width": 64, "height": 64}, "axes": {"lora": [case]}}), tmp_path).tasks[0]
    result = renderer.render(task)
    assert result.status == "failed"
    assert expected in result.error and str(path) in result.error, result.error
    assert "\n" not in result.error and len(result.error) < 600
    assert not canary.exists(), "a pickle was loaded"
    good_task, good_png = reference
    again = renderer.render(good_task)  # the same renderer, right after
    assert again.status == "ok" and again.png == good_png


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin", ".pth"])
def test_pickle_formats_are_refused_at_planning(suffix, tmp_path):
    canary = tmp_path / "canary"
    (tmp_path / f"evil{suffix}").write_bytes(pickle.dumps(Canary(str(canary))))
    with pytest.raises(FarmError, match="pickles that can run code"):
        plan_job(parse_spec({"job": "x", "model": "tiny:sdxl", "defaults": {"prompt": "a"},
                             "axes": {"lora": [f"evil{suffix}"]}}), tmp_path)
    assert not canary.exists()


def test_a_symlink_out_of_the_allowed_folders_is_refused(tmp_path, lora_dir, monkeypatch):
    monkeypatch.setenv("SDFARM_ROOTS", str(tmp_path / "jobs"))
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes(good_bytes(lora_dir))
    os.symlink(outside, jobs / "sneaky.safetensors")
    with pytest.raises(FarmError, match="sneaky.safetensors: resolves outside the folders jobs may read"):
        plan_job(parse_spec({"job": "x", "model": "tiny:sdxl", "defaults": {"prompt": "a"},
                             "axes": {"lora": ["sneaky"]}}), jobs)
    os.symlink(jobs / ".." / "elsewhere.safetensors", jobs / "inside-link.safetensors")
    with pytest.raises(FarmError, match="outside the folders"):
        plan_job(parse_spec({"job": "x", "model": "tiny:sdxl", "defaults": {"prompt": "a"},
                             "axes": {"lora": ["../elsewhere"]}}), jobs)


@pytest.mark.slow
def test_250_load_switch_unload_cycles_keep_memory_flat(renderer, reference, tmp_path):
    """Five LoRAs through a 4-slot adapter cache: cycles switch between the cached ones, every
    tenth brings in the fifth (a load that unloads the least recently used, which later loads
    again), and every seventh turns LoRAs off. RSS after warm-up stays within 5 %."""
    import psutil

    from farm.models.artifacts import sha256_file
    from farm.render.lora import AdapterCache
    from farm.sweep.plan import LoraUse
    from farm.models.tiny import save_tiny_lora

    loras = []
    for index in range(5):
        path = tmp_path / f"leak{index}.safetensors"
        save_tiny_lora(path, f"leak-{index}")
        loras.append(LoraUse(name=f"leak{index}", path=str(path), sha256=sha256_file(path), strength=0.8))
    cache = AdapterCache(renderer.pipe, max_adapters=4)
    process = psutil.Process()
    try:
        for cycle in range(250):
            lora = loras[4] if cycle % 10 == 9 else loras[cycle % 4]
            cache.activate([] if cycle % 7 == 6 else [lora])
            if cycle == 49:
                warm = process.memory_info().rss
        grown = process.memory_info().rss / warm - 1
    finally:
        for name in list(cache.loaded):
            renderer.pipe.delete_adapters(name)
        renderer.pipe.enable_lora()
        renderer.adapters.active, renderer.adapters.enabled = (), True
    assert cache.loads >= 40  # loads and unloads, not only switches
    assert grown <= 0.05, f"RSS grew {grown:.1%} over 200 cycles"
    task, png = reference
    assert renderer.render(task).png == png  # the renderer is as it was
