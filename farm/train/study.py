"""A training job as a whole: reg sets → training runs → evaluation renders. No Ray in here.

This is where a `TrainJob` spec turns into work: each variant into a `TrainRun` with sd-scripts'
step math, each `reg_sets` entry into a render job, and the `evaluate` sweep(s) into render
tasks re-planned as checkpoints appear. The dispatcher runs what this module prepares.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from farm.errors import FarmError
from farm.models.artifacts import resolve_model
from farm.sweep.plan import Plan, plan_job
from farm.sweep.spec import RenderJob, TrainJob
from farm.train.checkpoints import planned_checkpoints
from farm.train.dataset import StepMath, dataset_for, step_math
from farm.train.regularization import GENERATED, planned_reg_items
from farm.train.trainer import TrainRun


@dataclass
class Study:
    """A training job bound to its spec folder and run folder."""

    job: TrainJob
    spec_dir: Path
    source: str  # the spec file, for error messages
    run_dir: Path

    def model_path(self, plan_only: bool = False) -> str:
        """The base model's path; with `plan_only`, the spec's reference when it cannot be resolved."""
        try:
            return str(resolve_model(self.job.model, self.spec_dir))
        except FarmError as exc:
            if plan_only:  # planning needs no weights: step math and counts come from the data
                return self.job.model
            raise _in_spec(exc, f"{self.source}: model") from None

    def runs(self, reg_folders: dict[str, Path] | None = None,
             plan_only: bool = False) -> list[tuple[TrainRun, StepMath]]:
        """Each variant as a TrainRun with its step math. Variants whose `reg_data_dir` is
        `generated:NAME` train on `reg_folders[NAME]`; before those exist (planning), stand-ins
        of the planned images fix the math."""
        model_path = self.model_path(plan_only)
        result = []
        for name, options in self.job.runs().items():
            reg = options.reg_data_dir or ""
            generated = reg[len(GENERATED):] if reg.startswith(GENERATED) else ""
            try:
                if generated and reg_folders is None:
                    dataset = dataset_for(options.model_copy(update={"reg_data_dir": None}), self.spec_dir)
                    subset, items = planned_reg_items(generated, self.job.reg_sets[generated], self.spec_dir)
                    dataset.subsets.append(subset)
                    dataset.items.extend(items)
                else:
                    if generated:
                        options = options.model_copy(update={"reg_data_dir": str(reg_folders[generated])})
                    dataset = dataset_for(options, self.spec_dir)
            except FarmError as exc:
                raise _in_spec(exc, f"{self.source}: variants.{name}") from None
            maths = step_math(dataset, options.gradient_accumulation_steps, options.max_train_epochs,
                              options.max_train_steps)
            run = TrainRun(run=name, model_path=model_path, model_name=self.job.model, options=options,
                           data_base=str(self.spec_dir), out_dir=str((self.run_dir / "train" / name).resolve()))
            result.append((run, maths))
        return result

    def subject(self) -> dict:
        """Whom the study trains on, for scoring: the first variant's instance photos (not its reg
        images) and the token and class word of their kohya folder (`9_w0ut3r man`: the token is
        the first word, the class the rest). Recorded in run.json so `farm score RUN` needs no spec."""
        name, options = next(iter(self.job.runs().items()))
        try:
            instances = dataset_for(options.model_copy(update={"reg_data_dir": None}), self.spec_dir).instances
        except FarmError as exc:
            raise _in_spec(exc, f"{self.source}: variants.{name}") from None
        words = instances[0].subset.class_tokens.split() if instances else []
        return {"photos": sorted({str(Path(item.path).resolve()) for item in instances}),
                "token": words[0] if len(words) > 1 else "", "class_word": " ".join(words[1:]) or " ".join(words),
                "where": f"{self.source}: variants.{name} train_data_dir"}

    def check(self) -> None:
        """Fail now, with a one-line error, on a missing model or dataset: before Ray starts."""
        self.model_path()
        self.runs(plan_only=True)

    def describe(self) -> list[str]:
        """What `farm plan` prints for a training job."""
        lines = [f"job {self.job.job}: {len(self.job.variants)} training run(s)"]
        if self.model_path(plan_only=True) == self.job.model and not self.job.model.startswith("tiny:"):
            lines.append(f"  (model {self.job.model} not found: planned without it)")
        files = {}
        for run, maths in self.runs(plan_only=True):
            files[run.run] = planned_checkpoints(run.options, maths.max_train_steps, maths.steps_per_epoch,
                                                 maths.epochs)
            lines.append(f"  {run.run}: " + "; ".join(maths.lines()) + f"; checkpoints: {files[run.run]}")
        for name, reg in self.job.reg_sets.items():
            lines.append(f"  reg set {name}: {len(planned_reg_items(name, reg, self.spec_dir)[1])} images to render")
        evaluation = self.job.evaluation_job()
        if evaluation:
            counts = evaluation_cells(evaluation, files, self.spec_dir)
            for sweep, count in counts.items():
                lines.append(f"  evaluate{' sweep ' + sweep if sweep else ''}: {count} cells")
            lines.append(f"  evaluate: {sum(counts.values())} grid cells in all, each rendered as soon as its "
                         "checkpoint is written (an image two tables share is rendered once)")
        return lines


def _in_spec(exc: FarmError, where: str) -> FarmError:
    """The same kind of error (a DatasetError stays one), its message led by where in the spec it arose."""
    return type(exc)(f"{where}: {exc}")


def evaluation_cells(job: RenderJob, checkpoints_per_run: dict[str, int], spec_dir: Path) -> dict[str, int]:
    """Grid cells per sweep before any checkpoint exists: the product of the axis lengths, where a
    `{run: v002}` value counts as that run's planned checkpoints and style `*` as every style."""
    from farm.sweep.plan import StyleAxis

    counts = {}
    for sweep, table in job.sweep_jobs():
        axes, zipped = table.axes, {name for group in table.zip for name in group}

        def length(name: str, axes=axes, table=table) -> int:
            values = axes.values(name)
            if name in ("lora", "model"):
                return sum(_run_values(value, checkpoints_per_run) for value in values)
            if name == "style":
                return len(StyleAxis(table, spec_dir, "evaluate").names())
            return len(values)

        factors = [length(name) for name in axes.names() if name not in zipped]
        factors += [length(group[0]) for group in table.zip]
        counts[sweep or ""] = math.prod(factors)
    return counts


def _run_values(choice, checkpoints_per_run: dict[str, int]) -> int:
    if not choice.run:
        return 1
    planned = checkpoints_per_run.get(choice.run, 0)
    return planned if choice.epochs == "all" else len(choice.epochs)


@dataclass
class Evaluation:
    """The evaluate sweep(s), re-planned as checkpoints appear; `-1` seeds fixed on first use."""

    job: RenderJob | None
    spec_dir: Path
    source: str
    seeds: dict[str, int] = field(default_factory=dict)
    last: Plan | None = None

    def replan(self, checkpoints: dict[str, list[tuple[int, str, str]]]) -> list:
        """Every evaluation task for the checkpoints written so far (run → (epoch, label, path)
        triples); the dispatcher queues only the tasks it has not seen."""
        if self.job is None:
            return []
        self.last = plan_job(self.job, self.spec_dir, self.source, self.seeds, checkpoints=checkpoints)
        self.seeds.update(self.last.seeds)
        return self.last.tasks

    @property
    def axis_labels(self) -> dict:
        return self.last.axis_labels if self.last else {}


def run_training_job(study: Study, recorded_seeds: dict | None, render: Callable, train_and_evaluate: Callable):
    """Reg sets first, then every run with its evaluation. `render(plan, folder)` renders a plan
    (the dispatcher's run_plan); `train_and_evaluate(trains, replan)` is its run_study. Call
    `study.check()` first, before starting Ray."""
    from farm.runs.manifest import RunFolder
    from farm.train.regularization import generate_reg_sets

    reg_folders = generate_reg_sets(study.job, study.spec_dir, study.run_dir, render)
    runs = study.runs(reg_folders)
    evaluation = Evaluation(study.job.evaluation_job(), study.spec_dir, study.source, dict(recorded_seeds or {}))
    evaluation.replan({})  # fixes any `-1` seed now, so an interrupted run resumes with the same ones
    info = {"job": study.job.job, "spec": study.source, "seeds": evaluation.seeds, "subject": study.subject()}
    RunFolder(study.run_dir).save_run_info(info)
    summary = train_and_evaluate([run for run, _ in runs], evaluation.replan)
    RunFolder(study.run_dir).save_run_info({**info, "axes": evaluation.axis_labels})
    return runs, summary
