"""SDXL LoRA training (DreamBooth with prior preservation), kohya-compatible in and out. No Ray.

kohya's option names and meanings, peft for the adapters, diffusers for the noise schedule and
the learning-rate schedules; no LoRA math by hand. This module is the loop (epochs, accumulation
windows, when to save); the parts it wires live beside it:

    model.py        the pipeline, its trained part (LoRA adapters or the whole UNet), optimizer
    inputs.py       latents and caption embeddings of a batch, cached where nothing trains them
    step.py         the loss of a batch and one optimizer step
    checkpoints.py  kohya-named checkpoint files (metadata.py: their `ss_*` / `modelspec.*` keys)
    resume.py       the saved training state and the run folder's fingerprint
    progress.py     log.csv, the progress bar or log lines; chart.py: loss.png

Determinism is what makes resume exact: a batch's order comes from (seed, epoch) and its noise
from (seed, step), so a run restarted from its saved state computes the same steps as one that
never stopped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Iterator

from farm.sweep.spec import TrainOptions
from farm.train.chart import plot_loss
from farm.train.checkpoints import Checkpoint, CheckpointWriter, checkpoint_name
from farm.train.dataset import Dataset, step_math
from farm.train.inputs import BatchInputs
from farm.train.metadata import KohyaMetadata
from farm.train.model import TrainingModel, mixed_precision_dtype
from farm.train.progress import LOG_FILE, OnStep, Progress
from farm.train.resume import Position, RunState, fingerprint
from farm.train.step import DenoisingLoss, OptimizerStep


class Trainer:
    """One training run: model + dataset + options → checkpoints in `out_dir`.

    `mode: lora` trains peft adapters and writes kohya LoRA files; `mode: dreambooth` trains the
    whole UNet (kohya's sdxl_train.py) and writes each checkpoint as a diffusers model folder and
    as one single-file SDXL `.safetensors`. `loss`, `optimizer` and `save_checkpoint` are public
    so tests can step a run by hand."""

    def __init__(self, run: str, model_path: str, model_name: str, dataset: Dataset, options: TrainOptions,
                 out_dir: Path, device: str | None = None, pipeline=None):
        from farm.models.sdxl import quiet_libraries
        from farm.render.pipeline import PipelineOptions, pick_device

        quiet_libraries()
        self.run, self.model_name, self.dataset, self.options = run, model_name, dataset, options
        self.out_dir = Path(out_dir)
        self.on_step: OnStep | None = None
        self.device = pick_device(device)
        self.math = step_math(dataset, options.gradient_accumulation_steps, options.max_train_epochs,
                              options.max_train_steps)
        self.dtype = mixed_precision_dtype(options, self.device)
        # `pipeline` (PipelineOptions) carries single_file_config for a single-file model
        self.model = TrainingModel(model_path, options, self.device, self.dtype, pipeline or PipelineOptions(),
                                   self.math.max_train_steps)
        self.inputs = BatchInputs(self.model, dataset, options)
        self.loss = DenoisingLoss(self.model, self.inputs, dataset, options)
        metadata = KohyaMetadata(run, model_name, self.model, dataset, options, self.math)
        self.checkpoints = CheckpointWriter(run, self.model, options, metadata, self.out_dir)
        self.state = RunState(run, self.out_dir, self.model)

    @property
    def pipe(self):
        return self.model.pipe

    @property
    def optimizer(self):
        return self.model.optimizer

    def fingerprint(self) -> str:
        """What determines this run's weights: model, options, images and captions."""
        return fingerprint(self.model.model_path, self.options, self.dataset)

    def save_checkpoint(self, name: str, epoch: int, step: int, started_at: datetime, final: bool,
                        by_step: bool = False) -> Checkpoint:
        return self.checkpoints.save(name, epoch, step, started_at, final, by_step)

    def train(self, stop_after_steps: int | None = None, progress: bool = False) -> Iterator[Checkpoint]:
        """Run (or resume) to max_train_steps, yielding each checkpoint as it is written.

        `stop_after_steps` ends the run early after saving state (tests use it to stand in for a
        crash at a known point); `progress` shows a tqdm bar instead of ~10 log lines."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.state.claim(self.fingerprint())
        resumed = self.state.load()
        self.inputs.precompute_and_park()
        at = resumed or Position.start()
        report = Progress(self.run, self.out_dir, self.math.max_train_steps, self.math.epochs, at.step,
                          resumed is not None, progress, self.on_step)
        try:
            finished = yield from self._epochs(at, stop_after_steps, report)
        finally:
            report.close()
        if finished:
            plot_loss(self.out_dir / LOG_FILE, self.out_dir / "loss.png", title=f"{self.run}: loss")

    def _epochs(self, at: Position, stop_after_steps: int | None, report: Progress):
        """The epochs from `at` on, saving as the options say; returns False when stopped early.

        State is saved at each epoch's end, so a crash loses at most one epoch of steps; a step
        or epoch checkpoint is never written at the run's end, where the final one is."""
        o, total, epochs = self.options, self.math.max_train_steps, self.math.epochs
        accumulation = o.gradient_accumulation_steps
        optimizer_step = OptimizerStep(self.model, self.loss)
        step, skip, started_at = at.step, at.batch_in_epoch, at.started_at
        for epoch in range(at.epoch, epochs + 1):
            batches = self.dataset.epoch_batches(o.seed, epoch)
            for index in range(skip, len(batches), accumulation):
                began = time.perf_counter()
                loss = optimizer_step(batches[index:index + accumulation], step)
                step += 1
                report.step(step, epoch, loss, self.model.lr_scheduler.get_last_lr()[0], time.perf_counter() - began)
                if o.save_every_n_steps and step % o.save_every_n_steps == 0 and step < total:
                    yield self.save_checkpoint(checkpoint_name(o.output_name, step=step), epoch, step, started_at,
                                               False, by_step=True)
                if step >= total:
                    break
                if stop_after_steps and step >= stop_after_steps:
                    self.state.save(Position(epoch, step, index + accumulation, started_at))
                    return False
            skip = 0
            if step >= total:
                break
            if o.save_every_n_epochs and epoch % o.save_every_n_epochs == 0 and epoch < epochs:
                yield self.save_checkpoint(checkpoint_name(o.output_name, epoch=epoch), epoch, step, started_at, False)
            self.state.save(Position(epoch + 1, step, 0, started_at))
        yield self.save_checkpoint(checkpoint_name(o.output_name), epochs, step, started_at, True)
        return True


@dataclass(frozen=True)
class TrainRun:
    """One variant of a training job, as a record a worker on any node can run from."""

    run: str
    model_path: str
    model_name: str
    options: TrainOptions
    data_base: str  # the folder the options' dataset paths are relative to (the spec's)
    out_dir: str


def train_run(job: TrainRun, device: str | None = None, progress: bool = False,
              on_step: OnStep | None = None, pipeline=None) -> Iterator[Checkpoint]:
    """Train (or resume) one run, yielding its checkpoints as they are written; the model is
    released (collected, CUDA cache emptied) when the run ends or fails.

    `on_step(step, loss, seconds)` sees every optimizer step (the worker turns it into metrics);
    `pipeline` (PipelineOptions) carries the worker's `single_file_config`."""
    from farm.render.memory import release
    from farm.train.dataset import dataset_for

    dataset = dataset_for(job.options, Path(job.data_base))
    trainer = Trainer(job.run, job.model_path, job.model_name, dataset, job.options, Path(job.out_dir), device,
                      pipeline)
    trainer.on_step = on_step
    try:
        yield from trainer.train(progress=progress)
    finally:
        del trainer
        release()
