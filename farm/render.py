"""Render tasks on one device: a hot pipeline plus its adapter cache. No Ray in here.

One task is one pipeline call with its own `torch.Generator(device).manual_seed(seed)`: batching
several seeds into one call changes pixels by ~1e-6 depending on the batch's make-up, which
would make an image depend on its neighbours, so batches of tasks are looped, not stacked.
"""

from __future__ import annotations

import hashlib
import io
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
        self.model_sha256 = task.model_sha256
        self.base_scheduler_config = dict(self.pipe.scheduler.config)
        self.adapters = AdapterCache(self.pipe, self.max_adapters, lambda lora: self.locate(lora) if self.locate
                                     else Path(lora.path))
        self.pipeline_loads += 1

    def render(self, task: Task) -> RenderResult:
        """Render one task; a problem with this task becomes a failed result, not an exception."""
        started_at = datetime.now(timezone.utc)
        result = RenderResult(task=task, status="failed", device=describe_device(self.device),
                              worker=self.worker, started_at=started_at)
        try:
            self._ensure_model(task)
            result.lora_switch_s = self.adapters.apply(task.loras)
            sampler = resolve_sampler(task.sampler)
            result.scheduler = sampler.describe()
            began = time.perf_counter()
            image = self._run(task, sampler)
            result.render_s = time.perf_counter() - began
            result.png = encode_png(image, parameters_text(task, result.scheduler, __version__))
            result.image_sha256 = hashlib.sha256(result.png).hexdigest()
            result.status = "ok"
        except FarmError as exc:
            result.error = str(exc)
        except Exception as exc:  # one bad task must not take the actor down with it
            result.error = (f"{type(exc).__name__}: {exc}".splitlines() or [""])[0][:500]
        result.finished_at = datetime.now(timezone.utc)
        return result

    def _run(self, task: Task, sampler):
        import torch

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
