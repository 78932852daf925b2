"""The renderer on CPU with the tiny model: determinism and LoRA behaviour, no Ray."""

import io

import numpy as np
import pytest
from PIL import Image

from farm.sweep.plan import plan_job
from farm.sweep.spec import parse_spec


def tasks_for(lora_dir, axes, model="tiny:sdxl", **defaults):
    data = {"job": "r", "model": model, "axes": axes,
            "defaults": {"prompt": "photo of a w0ut3r man", "negative": "blurry", "seed": 1234,
                         "steps": 3, "width": 64, "height": 64, "sampler": "euler", **defaults}}
    return plan_job(parse_spec(data), lora_dir).tasks


def pixels(result) -> np.ndarray:
    assert result.status == "ok", result.error
    return np.asarray(Image.open(io.BytesIO(result.png)).convert("RGB"), dtype=np.int16)


def test_same_task_twice_gives_identical_png(renderer, lora_dir):
    task = tasks_for(lora_dir, {"lora": ["subject-000001"]})[0]
    first, second = renderer.render(task), renderer.render(task)
    assert first.status == second.status == "ok"
    assert first.image_sha256 == second.image_sha256 and first.png == second.png


def test_seed_and_prompt_change_the_image(renderer, lora_dir):
    tasks = tasks_for(lora_dir, {"seed": [1, 2], "prompt": ["a man", "a cat"]})
    hashes = {renderer.render(t).image_sha256 for t in tasks}
    assert len(hashes) == 4


def test_strength_zero_equals_no_lora(renderer, lora_dir):
    none, zero, full = tasks_for(lora_dir, {"lora": ["none", {"file": "subject-000001", "strength": 0.0},
                                                     "subject-000001"]})
    base = pixels(renderer.render(none))
    assert np.array_equal(pixels(renderer.render(zero)), base)
    assert np.abs(pixels(renderer.render(full)) - base).max() > 0  # the LoRA does change pixels


def test_lora_a_b_a_gives_a_again(renderer, lora_dir):
    a, b = tasks_for(lora_dir, {"lora": ["subject-000001", "subject-000002"]})
    first = pixels(renderer.render(a))
    other = pixels(renderer.render(b))
    again = pixels(renderer.render(a))
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_switching_between_cached_adapters_does_not_reload(renderer, lora_dir):
    tasks = tasks_for(lora_dir, {"lora": ["subject-000001", "subject-000002"], "strength": [0.5, 1.0]})
    for task in tasks:
        renderer.render(task)
    loads = renderer.adapters.loads
    for task in tasks:
        assert renderer.render(task).status == "ok"
    assert renderer.adapters.loads == loads


@pytest.mark.parametrize("content, expected", [
    (b"", "file changed since the job was planned"),
    (b"\x80\x04\x95pickle", "file changed since the job was planned"),
])
def test_a_changed_lora_fails_only_its_task(renderer, lora_dir, tmp_path, content, expected):
    path = tmp_path / "broken.safetensors"
    # subject-000003 is loaded by no other test: a cached adapter would (rightly) not be re-read
    path.write_bytes((lora_dir / "subject-000003.safetensors").read_bytes())
    broken, good = tasks_for(tmp_path, {"lora": ["broken", "none"]})
    path.write_bytes(content)
    result = renderer.render(broken)
    assert result.status == "failed" and expected in result.error and str(path) in result.error
    assert renderer.render(good).status == "ok"


def test_corrupt_and_foreign_loras_fail_with_a_clear_error(renderer, lora_dir, tmp_path):
    from safetensors.torch import save_file
    import torch

    (tmp_path / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}xxxxxx")
    save_file({"lora_unet_foo.lora_down.weight": torch.zeros(4, 7)}, tmp_path / "foreign.safetensors")
    tasks = tasks_for(tmp_path, {"lora": ["garbage", "foreign", "none"]})
    garbage, foreign, good = tasks
    result = renderer.render(garbage)
    assert result.status == "failed" and "not a readable .safetensors file" in result.error
    result = renderer.render(foreign)
    assert result.status == "failed" and "foreign.safetensors" in result.error
    assert renderer.render(good).status == "ok"


def faulty_run(run, faults):
    """The renderer's sampling run behind a boundary that injects GPU failures: `faults` is
    consumed one per attempt ("oom": raise CUDA out-of-memory; "black": an all-black image, as
    an fp16 VAE's NaNs decode; None: the real image)."""
    faults = list(faults)

    def attempt(task, sampler):
        import torch

        fault = faults.pop(0) if faults else None
        if fault == "oom":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        image = run(task, sampler)
        return Image.new("RGB", image.size) if fault == "black" else image

    return attempt


@pytest.fixture
def faulty(renderer, lora_dir):
    """The shared renderer with its sampling run behind `faulty_run`; restored afterwards."""
    task = tasks_for(lora_dir, {"lora": ["subject-000001"]})[0]
    clean = renderer.render(task)
    real = renderer._run
    yield renderer, task, clean, lambda faults: setattr(renderer, "_run", faulty_run(real, faults))
    del renderer._run  # the instance attribute goes; the method is back
    renderer.memory_steps, renderer.vae_upcast = [], False
    renderer.pipe.vae.disable_tiling()
    renderer.pipe.vae.to(renderer.pipe.unet.dtype)


def test_out_of_memory_is_retried_with_lower_memory_settings(faulty):
    renderer, task, clean, inject = faulty
    inject(["oom"])
    result = renderer.render(task)
    assert result.status == "ok" and result.png == clean.png  # 64 px: tiling changes nothing
    assert "out of memory: vae_tiling on" in result.notes
    inject(["oom", "oom"])  # no lower setting left on the CPU: a clear failure, not a crash
    failed = renderer.render(task)
    assert failed.status == "failed" and "out of GPU memory" in failed.error and not failed.retryable


def test_a_black_image_is_retried_with_the_vae_upcast_and_never_written_as_ok(faulty):
    renderer, task, clean, inject = faulty
    inject(["black"])
    result = renderer.render(task)
    assert result.status == "ok" and result.png == clean.png and "VAE upcast" in result.notes
    inject(["black", "black"])
    failed = renderer.render(task)
    assert failed.status == "failed" and "black image twice" in failed.error and not failed.png


def test_after_a_forced_vae_upcast_the_next_task_renders_in_the_original_dtype(lora_dir):
    """The upcast is for the task that needed it: a worker in bf16 (or fp16) goes back to it."""
    import torch

    from farm.render.pipeline import PipelineOptions
    from farm.render.renderer import Renderer

    renderer = Renderer(PipelineOptions(device="cpu", dtype="bf16", threads=1))
    first, second = (tasks_for(lora_dir, {"seed": [seed]}, steps=2)[0] for seed in (1, 2))
    clean = renderer.render(second)
    real, seen = renderer._run, []

    def observed(task, sampler):
        seen.append(renderer.pipe.vae.dtype)
        return real(task, sampler)

    renderer._run = faulty_run(observed, ["black"])
    upcast = renderer.render(first)
    assert upcast.status == "ok" and "VAE upcast" in upcast.notes
    assert seen == [torch.bfloat16, torch.float32]
    again = renderer.render(second)
    assert seen[-1] == torch.bfloat16 and renderer.pipe.vae.dtype == torch.bfloat16
    assert again.png == clean.png and again.notes == ""
