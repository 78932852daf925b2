"""Render tasks on one device: a hot pipeline plus its adapter cache. No Ray in here.

The pipeline supplies the modules (text encoders, UNet, VAE); the sampling around them is
ComfyUI's and A1111's, not diffusers' (`farm.render.sampling`, `farm.render.conditioning`), so a farm image is the
image those tools give for the same settings. One task is one sampling run with its own noise:
batching several seeds changes pixels by ~1e-6 depending on the batch's make-up, which would make
an image depend on its neighbours, so batches of tasks are looped, not stacked.
"""

from __future__ import annotations

import hashlib
import io
import os
import platform
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

from farm import __version__
from farm.errors import FarmError, RenderError, first_line
from farm.render.lora import AdapterCache
from farm.render import memory
from farm.render.pipeline import PipelineOptions, describe_device, enable_vae_tiling, load_planned, pick_device
from farm.sweep.plan import Task
from farm.render.pnginfo import parameters_text
from farm.render.conditioning import encode_pair
from farm.sweep.samplers import resolve_sampler
from farm.render.sampling import model_sigmas, sample


@dataclass
class RenderResult:
    """What came of one task: the PNG bytes (when ok) and the facts the manifest records."""

    task: Task
    status: str  # ok | failed
    png: bytes = b""
    image_sha256: str = ""
    error: str = ""
    scheduler: str = ""
    device: str = ""
    dtype: str = ""  # the UNet's dtype that rendered it: float16 | bfloat16 | float32
    node: str = field(default_factory=platform.node)
    worker: str = ""
    render_s: float = 0.0
    lora_switch_s: float = 0.0
    started_at: datetime | None = None
    finished_at: datetime | None = None
    retryable: bool = False  # failed for a reason another worker may not have
    notes: str = ""  # memory fallbacks or VAE upcasts this render needed


def _injected_fault() -> None:
    """SDFARM_FAULT=render makes this process's renders fail as a broken GPU's do; =hang makes
    them hang. Only the fault-injection tests set it, on one worker, to prove the farm routes
    around such a worker."""
    fault = os.environ.get("SDFARM_FAULT")
    if fault == "render":
        raise RuntimeError("CUDA error: an illegal memory access was encountered (injected: SDFARM_FAULT)")
    if fault == "hang":  # a deadlocked driver call: only a timeout gets the worker back
        time.sleep(3600)


def is_black(image) -> bool:
    """All pixels 0: what an fp16 VAE's NaNs decode to."""
    return image.getextrema() in (((0, 0),) * len(image.getbands()), (0, 0))


def encode_png(image, parameters: str) -> bytes:
    """PNG bytes with A1111's `parameters` text chunk."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def guided_eps(unet, cond, uncond, time_ids, cfg: float):
    """The UNet's noise prediction with classifier-free guidance, `uncond + cfg·(cond − uncond)`,
    as a function of the scaled latent and the model timestep (what the samplers call).

    Positive and negative run as one batch when their token lengths agree; otherwise apart, which
    is what ComfyUI's repeat-to-a-common-length concat computes (attention over repeated keys
    and values is unchanged)."""
    import torch

    dtype = unet.dtype

    def run(x, t, embeds, pooled, count):
        added = {"text_embeds": pooled.to(dtype), "time_ids": time_ids.repeat(count, 1).to(dtype)}
        timestep = t.reshape(-1).to(x.device).expand(x.shape[0])
        out = unet(x.to(dtype), timestep, encoder_hidden_states=embeds.to(dtype), added_cond_kwargs=added).sample
        return out.float()

    def eps(x_in, t):
        if cond.embeds.shape == uncond.embeds.shape:
            both = run(torch.cat([x_in, x_in]), t, torch.cat([uncond.embeds, cond.embeds]),
                       torch.cat([uncond.pooled, cond.pooled]), 2)
            negative, positive = both.chunk(2)
        else:
            negative = run(x_in, t, uncond.embeds, uncond.pooled, 1)
            positive = run(x_in, t, cond.embeds, cond.pooled, 1)
        return negative + (positive - negative) * cfg

    return eps


def decode_image(vae, latent):
    """The latent as an 8-bit image: VAE decode of latent / scaling factor, (x + 1) / 2 clamped,
    then 255·x cut to uint8 as ComfyUI and A1111 both do (diffusers rounds instead). SDXL's VAE
    overflows in fp16, so a VAE whose config says `force_upcast` decodes in fp32."""
    import numpy as np
    import torch
    from PIL import Image

    upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    if upcast:
        vae.to(torch.float32)
    try:
        dtype = vae.dtype
        scaled = latent / vae.config.scaling_factor
        if getattr(vae.config, "shift_factor", None):
            scaled = scaled + vae.config.shift_factor
        pixels = vae.decode(scaled.to(dtype)).sample
    finally:
        if upcast:
            vae.to(torch.float16)
    pixels = ((pixels.float() + 1.0) / 2.0).clamp(0.0, 1.0)
    array = (255.0 * pixels[0].permute(1, 2, 0).cpu().numpy()).astype(np.uint8)
    return Image.fromarray(array)


class Renderer:
    """Keeps one pipeline loaded (switching models only when a task needs another).

    Between tasks the state is put back: a VAE upcast after a black image ends with its task,
    offload hooks come back after a LoRA that failed to load, and a model switch (or `close`)
    lets go of the old pipeline, collects it and empties the CUDA cache before the next loads.
    The memory plan the load chose is in `memory_plan` and in the notes of the task that loaded."""

    def __init__(self, options: PipelineOptions = PipelineOptions(), worker: str = "", max_adapters: int = 8):
        self.options = options
        self.device = pick_device(options.device)
        self.worker = worker
        self.max_adapters = max_adapters
        self.pipe = None
        self.model_sha256 = ""
        self.model_sigmas = None  # the checkpoint's 1000 training sigmas, from its beta schedule
        self.vae_scale = 8
        self.adapters: AdapterCache | None = None
        self.locate = None  # LoraUse → local Path; None: the planned path
        self.locate_model = None  # Task → local model path; None: the planned path
        self.memory_steps: list[str] = []  # lower-memory settings on (from the plan or an out-of-memory)
        self.memory_plan: memory.MemoryPlan | None = None
        self.vae_upcast = False
        self.vae_dtype = None  # the VAE's dtype as loaded, restored after an upcast
        self.notes: list[str] = []
        self.pipeline_loads = 0
        self.retired_lora_loads = 0

    def holds(self) -> dict:
        """What this renderer has loaded: the dispatcher prefers tasks that need no switch."""
        loaded = list(self.adapters.loaded) if self.adapters else []
        return {"model_sha256": self.model_sha256, "adapters": loaded, "pipeline_loads": self.pipeline_loads,
                "lora_loads": self.retired_lora_loads + (self.adapters.loads if self.adapters else 0),
                "memory_plan": self.memory_plan.describe() if self.memory_plan else ""}

    def close(self) -> None:
        """Let go of the pipeline (and the adapter cache that holds it too), collect it and hand
        its CUDA memory back, so the next pipeline or a training run has the whole card."""
        if self.adapters is not None:
            self.retired_lora_loads += self.adapters.loads
        self.pipe = self.adapters = self.model_sigmas = self.memory_plan = self.vae_dtype = None
        self.model_sha256 = ""
        self.memory_steps, self.vae_upcast = [], False
        memory.release()

    def _ensure_model(self, task: Task) -> None:
        if self.pipe is not None and self.model_sha256 == task.model_sha256:
            return
        if self.pipe is not None:  # never two pipelines at once
            self.close()
        path = self.locate_model(task) if self.locate_model else task.model_path
        pipe, plan, notes = load_planned(path, self.options)
        self.pipe, self.memory_plan = pipe, plan
        self.notes.extend(notes)
        self.memory_steps = {"none": [], "model": ["model_offload"],
                             "sequential": ["model_offload", "sequential_offload"]}[plan.offload]
        self.memory_steps = (["vae_tiling"] if plan.vae_tiling else []) + self.memory_steps
        self.vae_upcast, self.vae_dtype = False, pipe.vae.dtype
        self.model_sha256 = task.model_sha256
        self.model_sigmas = model_sigmas(dict(pipe.scheduler.config))
        self.vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        self.adapters = AdapterCache(pipe, self.max_adapters, self._lora_path, restore=self._restore_offload)
        self.pipeline_loads += 1

    def _lora_path(self, lora) -> Path:
        return self.locate(lora) if self.locate else Path(lora.path)

    def _restore_state(self) -> None:
        """Undo what a previous task changed for itself: a VAE upcast to fp32 (a black image)."""
        if self.vae_upcast and self.pipe is not None:
            self.pipe.vae.to(self.vae_dtype)
            self.vae_upcast = False

    def _restore_offload(self) -> None:
        """Put the offload hooks back (diffusers removes them while loading a LoRA, and a load
        that fails leaves them off: the pipeline would stay on the CPU)."""
        if "sequential_offload" in self.memory_steps:
            self.pipe.enable_sequential_cpu_offload(device=self.device)
        elif "model_offload" in self.memory_steps:
            self.pipe.enable_model_cpu_offload(device=self.device)
        else:
            self.pipe.to(self.device)

    def render(self, task: Task) -> RenderResult:
        """Render one task; a problem with this task becomes a failed result, not an exception."""
        started_at = datetime.now(timezone.utc)
        self.notes = []
        result = RenderResult(task=task, status="failed", device=describe_device(self.device),
                              worker=self.worker, started_at=started_at)
        try:
            self._restore_state()
            self._ensure_model(task)
            result.dtype = str(self.pipe.unet.dtype).removeprefix("torch.")
            result.lora_switch_s = self.adapters.activate(task.loras)
            sampler = resolve_sampler(task.sampler)
            result.scheduler = sampler.describe()
            began = time.perf_counter()
            image = self._run_checked(task, sampler)
            result.render_s = time.perf_counter() - began
            result.png = encode_png(image, parameters_text(task, sampler, __version__))
            result.image_sha256 = hashlib.sha256(result.png).hexdigest()
            result.status = "ok"
        except FarmError as exc:  # the task's own problem (a damaged file, a black image): final
            result.error = first_line(exc, 500)
        except Exception as exc:  # one bad task must not take the actor down with it
            result.error = first_line(exc, 500, with_type=True)
            result.retryable = True  # may be this worker's problem: the dispatcher tries another
        result.notes, self.notes = "; ".join(self.notes), []
        result.finished_at = datetime.now(timezone.utc)
        return result

    def _run_checked(self, task: Task, sampler):
        """One render, surviving the GPU's two classic failures:

        - CUDA out of memory: free the cache and retry with lower-memory settings, one step at a
          time (VAE tiling, then model CPU offload, then sequential offload); they stay on for
          this worker's later tasks, since the next image would run out the same way.
        - A black image (NaN from an fp16 VAE): retry once with the VAE in fp32; a second black
          image fails the task. A black image is never written as `ok`. The upcast lasts for
          this task only: the next one starts with the VAE in its own dtype again.
        """
        import torch

        while True:
            try:
                image = self._run(task, sampler)
            except torch.cuda.OutOfMemoryError:
                if not self._lower_memory():
                    raise RenderError(f"out of GPU memory at {task.width}x{task.height} even with VAE tiling and "
                                    "sequential CPU offload; render smaller") from None
                continue
            if not is_black(image):
                return image
            if self.vae_upcast:
                raise RenderError("black image twice, the second time with the VAE in fp32 (NaN in the model?)")
            self._upcast_vae()

    def _lower_memory(self) -> bool:
        """Take the next lower-memory step; False when none is left."""
        memory.release()
        steps = [("vae_tiling", lambda: enable_vae_tiling(self.pipe.vae))]
        if self.device.startswith("cuda"):  # offloading to the CPU means nothing on the CPU
            steps += [("model_offload", lambda: self.pipe.enable_model_cpu_offload(device=self.device)),
                      ("sequential_offload", lambda: self.pipe.enable_sequential_cpu_offload(device=self.device))]
        for name, step in steps:
            if name not in self.memory_steps:
                self.memory_steps.append(name)
                step()
                self.notes.append(f"out of memory: {name} on")
                return True
        return False

    def _upcast_vae(self) -> None:
        import torch

        self.pipe.vae.to(torch.float32)
        self.vae_upcast = True
        self.notes.append("black image: VAE upcast to fp32")

    def _run(self, task: Task, sampler):
        """One image the way ComfyUI's KSampler (or A1111, per `task.noise`) makes it: prompts
        encoded with the task's emphasis syntax, k-diffusion's sampler on the UNet with CFG, the
        noise drawn by the task's seed convention, the VAE decode cut (not rounded) to 8 bits."""
        import torch

        _injected_fault()
        pipe = self.pipe
        device = pipe._execution_device  # the GPU even when offload keeps weights on the CPU
        with torch.inference_mode():
            cond, uncond = encode_pair(pipe, task.prompt, task.negative_prompt, task.prompt_syntax, device)
            size = [task.height, task.width]
            time_ids = torch.tensor([size + [0, 0] + size], device=device, dtype=torch.float32)
            eps = guided_eps(pipe.unet, cond, uncond, time_ids, task.cfg)
            shape = (1, pipe.unet.config.in_channels, task.height // self.vae_scale, task.width // self.vae_scale)
            latent = sample(sampler, eps, shape=shape, seed=task.seed, steps=task.steps, noise=task.noise,
                            device=device, model_sigmas=self.model_sigmas)
            return decode_image(pipe.vae, latent)

    def render_many(self, tasks: Iterable[Task]) -> list[RenderResult]:
        return [self.render(task) for task in tasks]
