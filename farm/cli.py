"""`farm`: thin commands, one library call each. User mistakes print one line and exit 2."""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from pathlib import Path

from .errors import FarmError

# Per model call at 1 megapixel on an RTX 2060 laptop: the seed's 70 s for 20 steps of a
# two-call sampler at 1024². Only for `farm plan`'s rough estimate.
_SECONDS_PER_CALL_MP = 1.75
_TWO_CALL_SAMPLERS = ("heun", "dpm_2", "dpm2", "2s", "dpmpp_sde")


def _load_plan(spec_path: str, recorded_seeds: dict | None = None):
    from .plan import plan_job
    from .spec import load_spec

    job = load_spec(spec_path)
    return plan_job(job, Path(spec_path).resolve().parent, spec_path, recorded_seeds)


def _train_runs(job, spec_path: str, run_dir: Path, reg_folders: dict | None = None):
    """Each variant of a training job as a TrainRun, with its dataset's step math.

    Variants whose `reg_data_dir` is `generated:NAME` train on `reg_folders[NAME]` once those
    images exist; before that (for `farm plan`) stand-ins of the planned images fix the math."""
    from .artifacts import resolve_model
    from .dataset import dataset_for, step_math
    from .regularization import GENERATED, planned_reg_items
    from .train import TrainRun

    base = Path(spec_path).resolve().parent
    try:
        model_path = resolve_model(job.model, base)
    except FarmError as exc:
        raise FarmError(f"{spec_path}: model: {exc}") from None
    runs = []
    for name, options in job.runs().items():
        generated = (options.reg_data_dir or "")[len(GENERATED):] if (options.reg_data_dir or "").startswith(GENERATED) else ""
        if generated and reg_folders is not None:
            options = options.model_copy(update={"reg_data_dir": str(reg_folders[generated])})
        try:
            if generated and reg_folders is None:
                dataset = dataset_for(options.model_copy(update={"reg_data_dir": None}), base)
                subset, items = planned_reg_items(generated, job.reg_sets[generated], base)
                dataset.subsets.append(subset)
                dataset.items.extend(items)
            else:
                dataset = dataset_for(options, base)
        except FarmError as exc:
            raise FarmError(f"{spec_path}: variants.{name}: {exc}") from None
        math = step_math(dataset, options.gradient_accumulation_steps, options.max_train_epochs,
                         options.max_train_steps)
        runs.append((TrainRun(run=name, model_path=str(model_path), model_name=job.model, options=options,
                              data_base=str(base), out_dir=str((run_dir / "train" / name).resolve())), math))
    return runs


def _evaluation(job, spec_path: str, recorded_seeds: dict | None):
    """(replan, seeds): replan(checkpoints) plans the evaluate sweep over the files known so far."""
    from .plan import plan_job, resolve_seeds

    evaluation = job.evaluation_job()
    if evaluation is None:
        return (lambda checkpoints: []), {}, None
    evaluation, seeds = resolve_seeds(evaluation, recorded_seeds)
    base = Path(spec_path).resolve().parent
    plans = {}

    def replan(checkpoints):
        plans["last"] = plan_job(evaluation, base, spec_path, checkpoints=checkpoints)
        return plans["last"].tasks

    return replan, seeds, plans


def _plan_training(args, job) -> int:
    from .plan import plan_job
    from .train import planned_checkpoints

    runs = _train_runs(job, args.spec, Path(args.out or "runs") / job.job)
    print(f"job {job.job}: {len(runs)} training run(s)")
    files = {}
    for train, math in runs:
        files[train.run] = planned_checkpoints(train.options, math.max_train_steps, math.steps_per_epoch, math.epochs)
        print(f"  {train.run}: " + "; ".join(math.lines()) + f"; checkpoints: {files[train.run]}")
    evaluation = job.evaluation_job()
    if evaluation:
        from .spec import LoraChoice

        one_lora = evaluation.axes.model_copy(update={"lora": [LoraChoice()]})
        one_lora._order = evaluation.axes._order
        plan = plan_job(evaluation.model_copy(update={"axes": one_lora}), Path(args.spec).resolve().parent, args.spec)
        cells = len(plan.tasks) + plan.folded
        values = sum(files[choice.run] if choice.run else 1 for choice in evaluation.axes.lora)
        print(f"  evaluate: {cells} images per checkpoint, {cells * values} in all, each rendered as soon as "
              "its checkpoint is written")
    return 0


def estimate_s(tasks) -> float:
    from .samplers import fold

    total = 0.0
    for task in tasks:
        calls = 2 if any(s in fold(task.sampler) for s in _TWO_CALL_SAMPLERS) else 1
        total += task.steps * calls * task.width * task.height / 1024**2 * _SECONDS_PER_CALL_MP
    return total


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def cmd_plan(args) -> int:
    from .manifest import RunFolder
    from .spec import TrainJob, load_spec

    job = load_spec(args.spec)
    if isinstance(job, TrainJob):
        return _plan_training(args, job)
    run = RunFolder(args.out) if args.out else None
    seeds = run.load_run_info().get("seeds") if run else None
    plan = _load_plan(args.spec, seeds)
    tasks = plan.tasks
    print(f"job {plan.job.job}: {len(tasks)} images", end="")
    print(f" ({len(tasks) + plan.folded} grid cells, {plan.folded} share an image)" if plan.folded else "")
    for name in plan.job.axes.names():
        print(f"  axis {name}: {len(plan.job.axes.values(name))} values")
    models = Counter(t.model for t in tasks)
    print(f"  models: {len(models)}; model/LoRA groups: {len(plan.groups)} "
          f"(a render actor loads a LoRA once per group it takes)")
    for location, seed in plan.seeds.items():
        print(f"  {location}: -1 → {seed} (fixed for this run)")
    if run:
        done = run.done_ids()
        left = [t for t in tasks if t.task_id not in done]
        print(f"  in {run.root}: {len(tasks) - len(left)} already ok, {len(left)} to render")
        tasks = left
    gpus = args.gpus
    estimate = estimate_s(tasks) / gpus
    print(f"  est. time: {_hms(estimate)} on {gpus} RTX 2060-class GPU(s) "
          f"({_SECONDS_PER_CALL_MP} s per model call per megapixel; your GPU will differ)")
    return 0


def cmd_run(args) -> int:
    from .dispatch import connect, run_plan
    from .manifest import RunFolder
    from .pipeline import PipelineOptions

    from .spec import TrainJob, load_spec

    run = RunFolder(args.out)
    info = run.load_run_info()
    if isinstance(load_spec(args.spec), TrainJob):
        return _run_training(args, run, info)
    plan = _load_plan(args.spec, info.get("seeds") if info.get("job") else None)
    if info.get("job") and info["job"] != plan.job.job:
        raise FarmError(f"{run.root}: holds job {info['job']!r}, not {plan.job.job!r}; use another --out")
    run.save_run_info({"job": plan.job.job, "spec": str(Path(args.spec).resolve()), "seeds": plan.seeds,
                       "axes": plan.axis_labels})
    options = PipelineOptions(device=args.device, dtype=args.dtype, vae_tiling=args.vae_tiling,
                              cpu_offload=args.cpu_offload)
    started_ray = connect(args.address, args.gpus)
    try:
        summary = run_plan(plan, run, actors=args.actors, chunk_size=args.chunk, options=options,
                           quiet=args.quiet)
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    print(f"{plan.job.job}: {summary.ok} rendered, {summary.failed} failed, {summary.skipped} already done "
          f"of {summary.total} in {summary.wall_s:.1f} s ({summary.lora_switches} LoRA group switches)")
    for error in summary.errors[:5]:
        print(f"  failed: {error}", file=sys.stderr)
    print(f"manifest: {run.manifest_dir}")
    print(f"images:   {run.root / 'images'}")
    return 1 if summary.failed else 0


def _run_training(args, run, info) -> int:
    from .dispatch import connect, run_study
    from .pipeline import PipelineOptions
    from .spec import load_spec

    from .dispatch import run_plan
    from .regularization import generate_reg_sets

    job = load_spec(args.spec)
    if info.get("job") and info["job"] != job.job:
        raise FarmError(f"{run.root}: holds job {info['job']!r}, not {job.job!r}; use another --out")
    _train_runs(job, args.spec, run.root)  # check every variant's data before anything runs
    replan, seeds, plans = _evaluation(job, args.spec, info.get("seeds"))
    run.save_run_info({"job": job.job, "spec": str(Path(args.spec).resolve()), "seeds": seeds})
    options = PipelineOptions(device=args.device, dtype=args.dtype, vae_tiling=args.vae_tiling,
                              cpu_offload=args.cpu_offload)
    started_ray = connect(args.address, args.gpus)
    try:
        render = lambda plan, folder: run_plan(plan, folder, actors=args.actors, chunk_size=args.chunk,  # noqa: E731
                                               options=options, quiet=args.quiet)
        reg_folders = generate_reg_sets(job, Path(args.spec).resolve().parent, run.root, render)
        runs = _train_runs(job, args.spec, run.root, reg_folders)
        for train, math in runs:
            print(f"{train.run}: " + "; ".join(math.lines()[:2]))
        summary = run_study([train for train, _ in runs], replan, run, actors=args.actors,
                            chunk_size=args.chunk, options=options, quiet=args.quiet)
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    if plans and "last" in plans:
        run.save_run_info({"job": job.job, "spec": str(Path(args.spec).resolve()), "seeds": seeds,
                           "axes": plans["last"].axis_labels})
    checkpoints = run.read_checkpoints()
    print(f"{job.job}: {len(checkpoints)} checkpoints from {len(runs)} run(s) in {run.train_dir}")
    print(f"evaluation: {summary.ok} rendered, {summary.failed} failed, {summary.skipped} already done "
          f"in {summary.wall_s:.1f} s")
    for error in summary.failed_runs + summary.errors[:5]:
        print(f"  failed: {error}", file=sys.stderr)
    print(f"manifest: {run.manifest_dir}")
    return 1 if summary.failed or summary.failed_runs else 0


def cmd_grid(args) -> int:
    from .grid import make_grids

    paths = make_grids(args.run, args.rows, args.cols, args.pages, args.cell)
    for path in paths:
        print(path)
    print(f"index: {Path(args.run) / 'grids' / 'index.html'}")
    return 0


def cmd_tiny_model(args) -> int:
    from .tiny import save_tiny_model

    print(save_tiny_model(Path(args.dir)))
    return 0


def cmd_tiny_lora(args) -> int:
    from .tiny import save_tiny_lora

    print(save_tiny_lora(Path(args.file), args.name or Path(args.file).stem, args.rank))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="farm", description="SDXL render farm on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plan", help="dry run: count images, LoRA groups and time; renders nothing")
    p.add_argument("spec")
    p.add_argument("--out", help="a run folder: also show what is already done there")
    p.add_argument("--gpus", type=int, default=1, help="GPUs to divide the time estimate by")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("run", help="render a job spec on the Ray cluster (starts a local one if none)")
    p.add_argument("spec")
    p.add_argument("--out", help="run folder (default: runs/<job>); running again resumes")
    p.add_argument("--address", help="Ray address of a cluster (default: a running one, else local)")
    p.add_argument("--actors", type=int, help="render actors (default: one per GPU)")
    p.add_argument("--gpus", type=int, help="logical GPUs of a local Ray started here "
                   "(default: CUDA devices, else CPU cores)")
    p.add_argument("--chunk", type=int, default=4, help="tasks per actor call (default 4)")
    p.add_argument("--device", help="cuda, cpu, ... (default: cuda when there is one)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    p.add_argument("--vae-tiling", action="store_true", help="decode in tiles (small GPUs)")
    p.add_argument("--cpu-offload", default="none", choices=["none", "model", "sequential"])
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("grid", help="labelled grids and index.html from a run's manifest")
    p.add_argument("run", help="run folder")
    p.add_argument("--rows", required=True, help="axis for rows (e.g. lora)")
    p.add_argument("--cols", required=True, help="axis for columns (e.g. prompt)")
    p.add_argument("--pages", action="append", help="axis per page (repeatable); other varying axes page too")
    p.add_argument("--cell", type=int, help="cell size in px (default: image width, 128..512)")
    p.set_defaults(func=cmd_grid)

    p = sub.add_parser("tiny-model", help="build the tiny random-weight SDXL (tests, demo)")
    p.add_argument("dir")
    p.set_defaults(func=cmd_tiny_model)

    p = sub.add_parser("tiny-lora", help="write a tiny random LoRA for the tiny model")
    p.add_argument("file")
    p.add_argument("--name", help="seed name (default: the file name)")
    p.add_argument("--rank", type=int, default=4)
    p.set_defaults(func=cmd_tiny_lora)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights come from local files, never a hub
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # import-time notices, e.g. no torchvision
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run" and not args.out:
            from .spec import load_spec

            args.out = str(Path("runs") / load_spec(args.spec).job)
        return args.func(args)
    except FarmError as exc:
        print(f"farm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("farm: interrupted; finished images and manifest rows are kept, run again to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
