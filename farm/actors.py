"""Thin Ray actors: one worker per GPU that renders, and trains when the queue says so.

State (the pipeline, the adapter cache, a trainer) lives on the actor, never in module globals.
Each worker takes `num_gpus=1`, so Ray pins it to one GPU (CUDA_VISIBLE_DEVICES) and never puts
two on one card; on a CPU-only cluster whose nodes declare logical GPUs the same placement holds
and the worker runs on the CPU with one torch thread (two 1-thread workers beat one 2-thread
process). A worker holds either a render pipeline or a training run, never both at once, so a
6 GB card fits either.
"""

from __future__ import annotations

import platform
from dataclasses import replace
from typing import Iterator

import ray

from .pipeline import PipelineOptions
from .plan import Task
from .render import Renderer, RenderResult


class GpuWorker:
    """`render_batch` takes tasks that share a model and LoRA set; `train` streams checkpoints."""

    def __init__(self, index: int, options: PipelineOptions):
        import torch

        gpu_ids = ray.get_gpu_ids()
        self.slot = f"gpu{int(gpu_ids[0])}" if gpu_ids else f"cpu{index}"
        self.node = platform.node()
        if not torch.cuda.is_available():
            torch.set_num_threads(options.threads or 1)
            options = replace(options, threads=options.threads or 1)
        self.options = options
        self.name = f"worker:{self.slot}@{self.node}"
        self.renderer = Renderer(options, worker=self.name)

    def __repr__(self) -> str:  # the name the Ray dashboard shows for this actor
        return self.name

    def render_batch(self, tasks: list[Task]) -> list[RenderResult]:
        return self.renderer.render_many(tasks)

    def train(self, job) -> Iterator:
        """Run one training run (a `train.TrainRun`), yielding each Checkpoint as it is saved."""
        from .train import train_run

        self.renderer = Renderer(self.options, worker=self.name)  # drop the render pipeline first
        for checkpoint in train_run(job, self.options.device):
            yield replace(checkpoint, node=self.node)

    def holds(self) -> dict:
        return {"name": self.name, "node": self.node, **self.renderer.holds()}


def start_workers(count: int, options: PipelineOptions, use_gpus: bool) -> list:
    """`count` workers, each on its own (logical) GPU, or one CPU each if none are declared."""
    remote = ray.remote(GpuWorker)
    resources = {"num_gpus": 1, "num_cpus": 0} if use_gpus else {"num_cpus": 1}
    return [remote.options(max_restarts=3, **resources).remote(i, options) for i in range(count)]
