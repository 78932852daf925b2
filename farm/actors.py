"""Thin Ray actors around the renderer: one per GPU, each keeping its pipeline hot.

State (the pipeline, the adapter cache) lives on the actor, never in module globals. Each actor
takes `num_gpus=1`, so Ray pins it to one GPU (CUDA_VISIBLE_DEVICES) and never puts two on one
card; on a CPU-only cluster whose nodes declare logical GPUs the same placement holds and the
actor renders on the CPU with one torch thread (two 1-thread actors beat one 2-thread process).
"""

from __future__ import annotations

import platform
from dataclasses import replace

import ray

from .pipeline import PipelineOptions
from .plan import Task
from .render import Renderer, RenderResult


class RenderActor:
    """A render worker: `render_batch` takes tasks that share a model and LoRA set."""

    def __init__(self, index: int, options: PipelineOptions):
        import torch

        gpu_ids = ray.get_gpu_ids()
        self.slot = f"gpu{int(gpu_ids[0])}" if gpu_ids else f"cpu{index}"
        self.node = platform.node()
        if not torch.cuda.is_available() and options.threads is None:
            options = replace(options, threads=1)
        self.name = f"render:{self.slot}@{self.node}"
        self.renderer = Renderer(options, worker=self.name)

    def __repr__(self) -> str:  # the name the Ray dashboard shows for this actor
        return self.name

    def render_batch(self, tasks: list[Task]) -> list[RenderResult]:
        return self.renderer.render_many(tasks)

    def holds(self) -> dict:
        return {"name": self.name, "node": self.node, **self.renderer.holds()}


def start_render_actors(count: int, options: PipelineOptions, use_gpus: bool) -> list:
    """`count` render actors, each on its own (logical) GPU, or one CPU each if none are declared."""
    remote = ray.remote(RenderActor)
    resources = {"num_gpus": 1, "num_cpus": 0} if use_gpus else {"num_cpus": 1}
    return [remote.options(max_restarts=3, **resources).remote(i, options) for i in range(count)]
