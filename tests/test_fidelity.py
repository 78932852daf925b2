"""Whole images against ComfyUI's algorithm: a farm render must be the image ComfyUI's KSampler
gives for the same settings (its sigmas, noise, sampler, CFG and 8-bit conversion), built here
independently from ComfyUI's and k-diffusion's math on the same diffusers modules."""

import io
import math
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from farm.sweep.plan import plan_job
from farm.sweep.spec import parse_spec
from tests.comfy_reference import comfy_reference_image

SAMPLERS = ["euler", "euler_ancestral", "heun", "dpm_2", "dpm_2_ancestral", "lms", "dpmpp_2m",
            "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m_sde"]
SCHEDULES = ["normal", "karras"]
PROMPT, NEGATIVE, SEED, STEPS, CFG, SIDE = "photo of a w0ut3r man", "blurry", 156680208, 4, 5.0, 64


def farm_task(tiny_model, **defaults):
    data = {"job": "fidelity", "model": str(tiny_model),
            "defaults": {"prompt": PROMPT, "negative": NEGATIVE, "seed": SEED, "steps": STEPS, "cfg": CFG,
                         "width": SIDE, "height": SIDE, **defaults}}
    return plan_job(parse_spec(data), tiny_model.parent).tasks[0]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


@pytest.fixture(scope="module")
def reference_inputs(renderer, tiny_model):
    """The modules and text embeddings the reference samples with: diffusers' own encode_prompt
    (a short prompt is one 77-token chunk, where every tool encodes alike)."""
    import torch

    renderer.render(farm_task(tiny_model, sampler="euler"))  # loads the pipeline
    pipe = renderer.pipe
    with torch.no_grad():
        cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(PROMPT, negative_prompt=NEGATIVE, device="cpu")
    time_ids = torch.tensor([[SIDE, SIDE, 0, 0, SIDE, SIDE]], dtype=torch.float32)
    return pipe, cond, pooled, uncond, uncond_pooled, time_ids


def test_farm_images_match_comfyuis_algorithm(renderer, tiny_model, reference_inputs):
    pipe, cond, pooled, uncond, uncond_pooled, time_ids = reference_inputs
    table = {}
    for schedule in SCHEDULES:
        for sampler in SAMPLERS:
            result = renderer.render(farm_task(tiny_model, sampler=f"{sampler}_{schedule}", prompt_syntax="comfyui"))
            assert result.status == "ok", result.error
            farm = np.asarray(Image.open(io.BytesIO(result.png)).convert("RGB"))
            reference = np.asarray(comfy_reference_image(
                pipe.unet, pipe.vae, cond, pooled, uncond, uncond_pooled, time_ids, SEED, STEPS, CFG, sampler,
                schedule, SIDE, SIDE).convert("RGB"))
            table[f"{sampler} {schedule}"] = psnr(farm, reference)
    print("\nPSNR farm vs ComfyUI's algorithm (dB):\n" + "\n".join(f"  {k:28s} {v:.1f}" for k, v in table.items()))
    assert min(table.values()) >= 45, table


def test_another_seed_is_far_from_the_reference(renderer, tiny_model, reference_inputs):
    """The PSNR bar means something: a different seed is far below it."""
    pipe, cond, pooled, uncond, uncond_pooled, time_ids = reference_inputs
    result = renderer.render(farm_task(tiny_model, sampler="euler", seed=SEED + 1))
    farm = np.asarray(Image.open(io.BytesIO(result.png)).convert("RGB"))
    reference = np.asarray(comfy_reference_image(pipe.unet, pipe.vae, cond, pooled, uncond, uncond_pooled,
                                                 time_ids, SEED, STEPS, CFG, "euler", "normal", SIDE, SIDE)
                           .convert("RGB"))
    assert psnr(farm, reference) < 30


_RENDER_IN_A_FRESH_PROCESS = """
import sys
from pathlib import Path
from farm.render.pipeline import PipelineOptions
from farm.sweep.plan import plan_job
from farm.render.renderer import Renderer
from farm.sweep.spec import parse_spec
model = Path(sys.argv[1])
data = {"job": "fidelity", "model": str(model), "defaults": {"prompt": "photo of (a w0ut3r man:1.2)",
        "seed": 4242, "steps": 3, "width": 64, "height": 64, "sampler": sys.argv[2]}}
task = plan_job(parse_spec(data), model.parent).tasks[0]
result = Renderer(PipelineOptions(device="cpu", threads=1)).render(task)
assert result.status == "ok", result.error
sys.stdout.buffer.write(result.png)
"""


@pytest.mark.parametrize("sampler", ["dpmpp_2s_ancestral", "dpmpp_sde_karras"])
def test_same_task_renders_identically_in_two_processes(tiny_model, sampler):
    """Stochastic samplers included: their noise comes from the seed, not from process state."""
    runs = [subprocess.run([sys.executable, "-c", _RENDER_IN_A_FRESH_PROCESS, str(tiny_model), sampler],
                           capture_output=True, check=True).stdout for _ in range(2)]
    assert runs[0] == runs[1] and runs[0].startswith(b"\x89PNG")


def _png(renderer, tiny_model, prompt: str, syntax: str = "a1111") -> np.ndarray:
    result = renderer.render(farm_task(tiny_model, prompt=prompt, sampler="euler", prompt_syntax=syntax))
    assert result.status == "ok", result.error
    return np.asarray(Image.open(io.BytesIO(result.png)).convert("RGB"))


@pytest.mark.parametrize("syntax", ["a1111", "comfyui"])
def test_emphasis_renders_as_the_tools_read_it(renderer, tiny_model, syntax):
    plain = _png(renderer, tiny_model, "photo of a man", syntax)
    assert np.array_equal(_png(renderer, tiny_model, "(photo of a man:1.0)", syntax), plain)
    assert not np.array_equal(_png(renderer, tiny_model, "(photo of a man:1.3)", syntax), plain)


def test_text_after_token_75_still_changes_the_image(renderer, tiny_model):
    """Past CLIP's 77 tokens the prompt goes on in a second chunk, as in A1111 and ComfyUI,
    instead of being cut."""
    head = " ".join(["portrait"] * 80)
    red, blue = _png(renderer, tiny_model, head + " red hat"), _png(renderer, tiny_model, head + " blue hat")
    assert not np.array_equal(red, blue)
