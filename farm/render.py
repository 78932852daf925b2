"""Render tasks on one device: a hot pipeline plus its adapter cache. No Ray in here.

One task is one pipeline call with its own `torch.Generator(device).manual_seed(seed)`: batching
several seeds into one call changes pixels by ~1e-6 depending on the batch's make-up, which
would make an image depend on its neighbours, so batches of tasks are looped, not stacked.
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

from . import __version__
from .errors import FarmError
from .lora import AdapterCache
from .pipeline import PipelineOptions, describe_device, load_pipeline, pick_device
from .plan import Task
from .pnginfo import parameters_text
from .samplers import resolve_sampler


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


class Renderer:
    """Keeps one pipeline loaded (switching models only when a task needs another)."""

    def __init__(self, options: PipelineOptions = PipelineOptions(), worker: str = "", max_adapters: int = 8):
        self.options = options
        self.device = pick_device(options.device)
        self.worker = worker
        self.max_adapters = max_adapters
        self.pipe = None
        self.model_sha256 = ""
        self.base_scheduler_config = None
        self.adapters: AdapterCache | None = None
        self.locate = None  # LoraUse → local Path; None: the planned path
        self.memory_steps: list[str] = []
        self.vae_upcast = False
        self.notes: list[str] = []
        self.pipeline_loads = 0

    def holds(self) -> dict:
        """What this renderer has loaded: the dispatcher prefers tasks that need no switch."""
        loaded = list(self.adapters.loaded) if self.adapters else []
        return {"model_sha256": self.model_sha256, "adapters": loaded, "pipeline_loads": self.pipeline_loads,
                "lora_loads": self.adapters.loads if self.adapters else 0}

    def _ensure_model(self, task: Task) -> None:
        if self.pipe is not None and self.model_sha256 == task.model_sha256:
            return
        self.pipe = None  # free the old pipeline before loading the next
        self.pipe = load_pipeline(task.model_path, self.options)
        self.memory_steps, self.vae_upcast = [], False
        self.model_sha256 = task.model_sha256
        self.base_scheduler_config = dict(self.pipe.scheduler.config)
        self.adapters = AdapterCache(self.pipe, self.max_adapters, lambda lora: self.locate(lora) if self.locate
                                     else Path(lora.path))
        self.pipeline_loads += 1

    def render(self, task: Task) -> RenderResult:
        """Render one task; a problem with this task becomes a failed result, not an exception."""
        started_at = datetime.now(timezone.utc)
        self.notes = []
        result = RenderResult(task=task, status="failed", device=describe_device(self.device),
                              worker=self.worker, started_at=started_at)
        try:
            self._ensure_model(task)
            result.lora_switch_s = self.adapters.apply(task.loras)
            sampler = resolve_sampler(task.sampler)
            result.scheduler = sampler.describe()
            began = time.perf_counter()
            image = self._run_checked(task, sampler)
            result.render_s = time.perf_counter() - began
            result.png = encode_png(image, parameters_text(task, result.scheduler, __version__))
            result.image_sha256 = hashlib.sha256(result.png).hexdigest()
            result.status = "ok"
            result.notes, self.notes = "; ".join(self.notes), []
        except FarmError as exc:  # the task's own problem (a damaged file, a black image): final
            result.error = str(exc)
        except Exception as exc:  # one bad task must not take the actor down with it
            result.error = (f"{type(exc).__name__}: {exc}".splitlines() or [""])[0][:500]
            result.retryable = True  # may be this worker's problem: the dispatcher tries another
        result.finished_at = datetime.now(timezone.utc)
        return result

    def _run_checked(self, task: Task, sampler):
        """One render, surviving the GPU's two classic failures:

        - CUDA out of memory: free the cache and retry with lower-memory settings, one step at a
          time (VAE tiling, then model CPU offload, then sequential offload); they stay on for
          this worker's later tasks, since the next image would run out the same way.
        - A black image (NaN from an fp16 VAE): retry once with the VAE in fp32; a second black
          image fails the task. A black image is never written as `ok`.
        """
        import torch

        while True:
            try:
                image = self._run(task, sampler)
            except torch.cuda.OutOfMemoryError:
                if not self._lower_memory():
                    raise FarmError(f"out of GPU memory at {task.width}x{task.height} even with VAE tiling and "
                                    "sequential CPU offload; render smaller") from None
                continue
            if not is_black(image):
                return image
            if self.vae_upcast:
                raise FarmError("black image twice, the second time with the VAE in fp32 (NaN in the model?)")
            self._upcast_vae()

    def _lower_memory(self) -> bool:
        """Take the next lower-memory step; False when none is left."""
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        steps = [("vae_tiling", lambda: self.pipe.vae.enable_tiling())]
        if self.device.startswith("cuda"):  # offloading to the CPU means nothing on the CPU
            steps += [("model_offload", self.pipe.enable_model_cpu_offload),
                      ("sequential_offload", self.pipe.enable_sequential_cpu_offload)]
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
        import torch

        _injected_fault()
        self.pipe.scheduler = sampler.build(self.base_scheduler_config)
        generator = torch.Generator(device="cpu" if self.device == "mps" else self.device)
        generator.manual_seed(task.seed)
        with torch.inference_mode():
            output = self.pipe(
                # "" is encoded like A1111 and ComfyUI do; None would zero SDXL's negative embedding
                prompt=task.prompt, negative_prompt=task.negative_prompt,
                num_inference_steps=task.steps, guidance_scale=task.cfg,
                width=task.width, height=task.height, generator=generator,
            )
        return output.images[0]

    def render_many(self, tasks: Iterable[Task]) -> list[RenderResult]:
        return [self.render(task) for task in tasks]
