"""`farm`: thin commands, one library call each. User mistakes print one line and exit 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from farm.errors import ClusterError, FarmError, UsageError, first_line
from farm.cluster.jobqueue import DEFAULT_ADDRESS, duration

# Per model call at 1 megapixel on an RTX 2060 laptop: the seed's 70 s for 20 steps of a
# two-call sampler at 1024². Only for `farm plan`'s rough estimate.
_SECONDS_PER_CALL_MP = 1.75
_TWO_CALL_SAMPLERS = ("heun", "dpm_2", "dpm2", "2s", "dpmpp_sde")


def estimate_s(tasks) -> float:
    from farm.sweep.samplers import fold

    total = 0.0
    for task in tasks:
        calls = 2 if any(s in fold(task.sampler) for s in _TWO_CALL_SAMPLERS) else 1
        total += task.steps * calls * task.width * task.height / 1024**2 * _SECONDS_PER_CALL_MP
    return total


def _spec_dir(args) -> Path:
    return Path(args.spec).resolve().parent


def _study(args):
    from farm.train.study import Study

    return Study(args.job, _spec_dir(args), args.source, Path(args.out).resolve())


def _pipeline_options(args):
    from farm.render.pipeline import PipelineOptions

    return PipelineOptions(device=args.device, dtype=args.dtype, vae_tiling=args.vae_tiling,
                           cpu_offload=args.cpu_offload)


def cmd_plan(args) -> int:
    from farm.runs.manifest import RunFolder
    from farm.sweep.plan import plan_job
    from farm.sweep.spec import TrainJob

    if isinstance(args.job, TrainJob):
        print("\n".join(_study(args).describe()))
        return 0
    run = RunFolder(args.out)
    plan = plan_job(args.job, _spec_dir(args), args.source, run.load_run_info().get("seeds"))
    tasks = plan.tasks
    print(f"job {plan.job.job}: {len(tasks)} images", end="")
    print(f" ({len(tasks) + plan.folded} grid cells, {plan.folded} share an image)" if plan.folded else "")
    for sweep, table in plan.job.sweep_jobs():
        where = f"sweep {sweep}: " if sweep else ""
        counts = ", ".join(f"{name} {len(table.axes.values(name))}" for name in table.axes.names())
        print(f"  {where}axes: {counts or 'none'}")
    print(f"  models: {len({t.model_sha256 for t in tasks})}; model/LoRA groups: {len(plan.groups)} "
          f"(a render worker loads a LoRA once per group it takes)")
    for location, seed in plan.seeds.items():
        print(f"  {location}: -1 → {seed} (fixed for this run)")
    done = run.done_ids()
    left = [t for t in tasks if t.task_id not in done]
    print(f"  in {run.root}: {len(tasks) - len(left)} already ok, {len(left)} to render")
    print(f"  est. time: {duration(estimate_s(left) / args.gpus)} on {args.gpus} RTX 2060-class GPU(s) "
          f"({_SECONDS_PER_CALL_MP} s per model call per megapixel; your GPU will differ)")
    return 0


def _runs_root() -> Path:
    """Where submitted jobs' run folders go on the head: $SDFARM_RUNS, else ~/sdfarm/runs."""
    return Path(os.environ.get("SDFARM_RUNS") or Path.home() / "sdfarm" / "runs").expanduser()


def _stop_on_sigterm() -> None:
    """`farm cancel` / `ray job stop` send SIGTERM: end like Ctrl-C, keeping what is done."""
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def _keep_spec_folder(args) -> None:
    """A submitted job starts in a working dir Ray may delete while the job runs: copy it into
    the run folder (which also records what the job ran with) and work from there."""
    import shutil

    copy = Path(args.out) / "spec"
    shutil.copytree(Path.cwd(), copy, dirs_exist_ok=True)
    os.chdir(copy)
    args.spec = str(copy / Path(args.spec).name)


def _open_shared_pool(args, options):
    """The cluster's warm pool when this run joined a running cluster; None for a local Ray."""
    from farm.cluster.pool import SharedPool

    key = args.job_key or f"{args.job.job}@{Path(args.out).resolve()}"
    return SharedPool(key, args.priority, options)


def cmd_run(args) -> int:
    from farm.cluster.connect import connect
    from farm.cluster.dispatch import run_plan, run_study
    from farm.runs.manifest import RunFolder
    from farm.sweep.plan import plan_job
    from farm.cluster.jobqueue import print_progress
    from farm.sweep.spec import TrainJob

    _stop_on_sigterm()
    if args.job_key:
        _keep_spec_folder(args)
    run = RunFolder(args.out)
    info = run.load_run_info()
    if info.get("job") and info["job"] != args.job.job:
        raise UsageError(f"{run.root}: holds job {info['job']!r}, not {args.job.job!r}; use another --out")
    options = _pipeline_options(args)
    training = isinstance(args.job, TrainJob)
    if training:  # check the model and every variant's data before starting anything
        _study(args).check()
    else:  # plan (and fix -1 seeds) before starting anything
        plan = plan_job(args.job, _spec_dir(args), args.source, info.get("seeds"))
        run.save_run_info({"job": plan.job.job, "spec": args.source, "seeds": plan.seeds, "axes": plan.axis_labels})
    started_ray = connect(args.address, args.gpus, dashboard=not args.no_dashboard, allow_open=args.allow_open_cluster,
                          local=args.local)
    pool = None if started_ray else _open_shared_pool(args, options)
    try:
        if pool is not None and not training:
            pool.check_models([t.model_path for t in plan.tasks])
        common = dict(actors=args.actors, chunk_size=args.chunk, options=options, quiet=args.quiet, pool=pool,
                      recycle_after=args.recycle_after, task_timeout_s=args.task_timeout)
        if training:
            from farm.train.study import run_training_job

            runs, summary = run_training_job(
                _study(args), info.get("seeds"),
                render=lambda plan, folder: run_plan(plan, folder, **common),
                train_and_evaluate=lambda trains, replan: run_study(trains, replan, run, **common))
        else:
            summary = run_plan(plan, run, **common)
        final = {"total": summary.total, "done": summary.ok + summary.skipped, "failed": summary.failed, "left": 0,
                 "eta_s": 0, "updated": time.time()}
        if pool is not None:
            pool.final_progress = final  # the keeper keeps it for `farm jobs`
    finally:
        if pool is not None:
            pool.close()
        if started_ray:
            import ray

            ray.shutdown()
    if args.job_key:
        print_progress(final)
    if training:
        print(f"{args.job.job}: {len(run.read_checkpoints())} checkpoints from {len(runs)} run(s) in {run.train_dir}")
        print("evaluation: ", end="")
    print(f"{summary.ok} rendered, {summary.failed} failed, {summary.skipped} already done of {summary.total} "
          f"in {summary.wall_s:.1f} s ({summary.lora_switches} LoRA group switches)")
    for error in summary.failed_runs + summary.errors[:5]:
        print(f"  failed: {error}", file=sys.stderr)
    print(f"manifest: {run.manifest_dir}")
    return 1 if summary.failed or summary.failed_runs else 0


def cmd_submit(args) -> int:
    from farm.cluster import jobqueue

    passed = []
    for flag in ("device", "chunk", "recycle_after", "dtype", "cpu_offload"):
        if getattr(args, flag) is not None:
            passed += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    if args.vae_tiling:
        passed.append("--vae-tiling")
    submission_id = jobqueue.submit(args.address, args.spec, args.job.job, overrides=args.override,
                                    scale=args.scale, priority=args.priority, out=args.out_on_head,
                                    pipeline_args=passed)
    print(submission_id)
    return 0


def cmd_jobs(args) -> int:
    from farm.cluster import jobqueue

    jobs = jobqueue.farm_jobs(args.address)
    for job in jobs:
        print(jobqueue.describe(job, jobqueue.progress_of(args.address, job)))
    if not jobs:
        print("no farm jobs on this cluster (farm submit SPEC)")
    _print_dashboard(args.address)
    return 0


def _print_dashboard(address: str | None) -> None:
    from farm.cluster.connect import dashboard_hint
    from farm.cluster.jobqueue import api_address

    print(f"dashboard: {api_address(address)} ({dashboard_hint()})")


def cmd_status(args) -> int:
    from farm.cluster import jobqueue

    job = jobqueue.job_info(args.address, args.job_id)
    print(jobqueue.describe(job, jobqueue.progress_of(args.address, job)))
    if job.message:
        print(f"  {job.message.strip().splitlines()[-1]}")
    logs = jobqueue.log_tail(args.address, job, 5000).strip().splitlines()
    errors = [line for line in logs if line.startswith("farm: ") or "failed:" in line]
    for line in errors[-5:]:
        print(f"  {line}")
    return 0


def cmd_cancel(args) -> int:
    from farm.cluster import jobqueue

    jobqueue.cancel(args.address, args.job_id)
    print(f"{args.job_id}: stopping (finished images and manifest rows are kept)")
    return 0


def cmd_pause(args) -> int:
    from farm.cluster import jobqueue

    pausing = args.command == "pause"
    if pausing:
        jobqueue.job_info(args.address, args.job_id)
        if not jobqueue.control(args.address, "pause", args.job_id).get("found"):
            raise ClusterError(f"{args.job_id}: not in the pool's queue (finished, or not started yet)")
        print(f"{args.job_id}: paused; its workers go to other jobs once their current chunks finish")
        return 0
    resumed = jobqueue.resume(args.address, args.job_id)
    print(resumed if resumed != args.job_id else f"{args.job_id}: resumed")
    return 0


def cmd_logs(args) -> int:
    from farm.cluster import jobqueue

    jobqueue.job_info(args.address, args.job_id)
    print(jobqueue.client(args.address).get_job_logs(args.job_id), end="")
    return 0


def cmd_pool(args) -> int:
    from farm.cluster import jobqueue

    status = jobqueue.control(args.address, "pool")
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    for name, worker in sorted(status["workers"].items()):
        holding = (worker.get("model_sha256") or "nothing")[:12]
        print(f"{name}: {worker.get('name', '?')} holds {holding} + {len(worker.get('adapters', []))} LoRA(s); "
              f"{worker.get('rendered', 0)} rendered, {worker.get('pipeline_loads', 0)} pipeline loads, "
              f"{worker.get('fetched', 0)} LoRA files and {worker.get('models_fetched', 0)} models fetched; "
              f"lent to {worker.get('held_by') or 'nobody'}")
        if worker.get("fetching"):
            fetching = worker["fetching"]
            print(f"  fetching model {fetching['model']}: {fetching['done'] / 2**30:.2f} of "
                  f"{fetching['total'] / 2**30:.2f} GiB")
    for key, job in status["jobs"].items():
        print(f"job {key}: priority {job['priority']}{' paused' if job['paused'] else ''}, "
              f"{job.get('done', 0)}/{job.get('total', 0)} done")
    _print_dashboard(args.address)
    return 0


def cmd_grafana(args) -> int:
    from farm.cluster.metrics import grafana_dashboard, ray_dashboards_folder
    from farm.files import write_atomic

    path = Path(args.dir or ray_dashboards_folder()) / "sdfarm_grafana_dashboard.json"
    write_atomic(path, json.dumps(grafana_dashboard(), indent=2).encode())
    print(path)
    return 0


def cmd_control(args) -> int:
    from farm.cluster.pool import run_control

    print(json.dumps(run_control(args.action, args.key)))
    return 0


def cmd_grid(args) -> int:
    from farm.runs.grid import make_grids
    from farm.runs.manifest import RunFolder

    paths = make_grids(args.run, args.rows, args.cols, args.pages, args.cell)
    for path in paths:
        print(path)
    print(f"index: {Path(args.run) / 'grids' / 'index.html'}")
    from farm.score.page import write_page

    print(f"results page: {write_page(RunFolder(args.run))}")
    return 0


def _subject(args, run):
    """The subject to score against: `--photos` (a kohya `img` folder, a `9_w0ut3r man` folder
    or any folder of photos, with --token / --class-word), else what a study recorded in run.json."""
    from farm.score.scorer import Subject

    recorded = run.load_run_info().get("subject")
    if not args.photos:
        if not recorded:
            raise UsageError(f"{run.root}: no subject recorded (only training studies record one); "
                             "give --photos DIR with the subject's training photos")
        subject = Subject.from_dict(recorded)
    else:
        subject = _subject_from_folder(Path(args.photos))
    return Subject(subject.photos, args.token if args.token is not None else subject.token,
                   args.class_word if args.class_word is not None else subject.class_word, subject.where)


def _subject_from_folder(folder: Path):
    """Photos under `folder`; the token and class from kohya's `<repeats>_<token> <class>` name."""
    import re

    from farm.score.scorer import Subject
    from farm.train.dataset import list_images

    if not folder.is_dir():
        raise UsageError(f"--photos {folder}: no such folder")
    kohya = re.compile(r"^\d+_(.+)$")
    folders = [folder] if kohya.match(folder.name) else sorted(p for p in folder.iterdir() if kohya.match(p.name))
    folders = folders or [folder]
    photos = tuple(str(p.resolve()) for f in folders for p in list_images(f))
    if not photos:
        raise UsageError(f"--photos {folder}: no images there")
    match = kohya.match(folders[0].name)
    words = match[1].split() if match else []
    return Subject(photos, words[0] if len(words) > 1 else "", " ".join(words[1:]), f"--photos {folder}")


def cmd_score(args) -> int:
    from farm.score.scorer import score_run

    run = _existing_run(args.run)
    subject = _subject(args, run)
    clip = args.clip
    if not clip:
        print("scores: no --clip model given: CLIP-T and CLIP-I are skipped (faces only)")
    started = time.monotonic()
    if args.cluster:
        from farm.cluster.connect import connect
        from farm.cluster.scoring import score_on_cluster

        started_ray = connect(args.address, args.gpus, dashboard=False, local=args.local)
        try:
            done, kept, warnings = score_on_cluster(run, subject, clip, args.device, again=args.again)
        finally:
            if started_ray:
                import ray

                ray.shutdown()
    else:
        done, kept, warnings = score_run(run, subject, clip, args.device, again=args.again)
    for warning in warnings:
        print(f"scores: warning: {warning}")
    print(f"scores: {done} images scored, {kept} already scored, in {time.monotonic() - started:.1f} s "
          f"(subject: {len(subject.photos)} photos, token {subject.token!r}, class {subject.class_word!r})")
    print(f"scores: {run.root / 'scores'}")
    return 0


def cmd_report(args) -> int:
    from farm.score.report import write_report

    from farm.score.page import write_page

    run = _existing_run(args.run)
    path = write_report(run, args.margin)
    report = json.loads((path.parent / "report.json").read_text())
    best = report["best"]
    print(f"rule: {report['rule']}")
    print(f"best: {best['label']} (variant {best['variant']})" if best else "best: none")
    print(f"report: {path}")
    print(f"results page: {write_page(run)}")
    return 0


def cmd_page(args) -> int:
    from farm.score.page import write_page

    print(f"results page: {write_page(_existing_run(args.run))}")
    return 0


def _existing_run(folder: str):
    from farm.runs.manifest import RunFolder

    run = RunFolder(folder)
    if not run.parts():
        raise UsageError(f"{folder}: no manifest there (not a run folder, or nothing rendered yet)")
    return run


def cmd_info(args) -> int:
    """Each PNG's A1111 `parameters` text, as A1111's PNG-info tab shows it."""
    from farm.render.pnginfo import read_png_parameters

    for index, image in enumerate(args.images):
        path = Path(image)
        if not path.is_file():
            raise UsageError(f"{image}: no such image file")
        try:
            text = read_png_parameters(path)
        except OSError as exc:
            raise UsageError(f"{image}: not a readable image: {first_line(exc)}") from None
        if len(args.images) > 1:
            print(("\n" if index else "") + f"{image}:")
        print(text or "(no parameters)")
    return 0


def cmd_tiny_model(args) -> int:
    from farm.models.tiny import save_tiny_model

    print(save_tiny_model(Path(args.dir)))
    return 0


def cmd_tiny_lora(args) -> int:
    from farm.models.tiny import save_tiny_lora

    print(save_tiny_lora(Path(args.file), args.name or Path(args.file).stem, args.rank))
    return 0


def _spec_arguments(p) -> None:
    p.add_argument("spec")
    p.add_argument("--override", action="append", default=[], metavar="FILE",
                   help="YAML deep-merged over the spec (repeatable); it wins over the spec")
    p.add_argument("--scale", choices=["tiny"], help="tiny: apply the spec folder's tiny.yaml override "
                   "(the tiny model, a procedural subject, fewer steps)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="farm", description="SDXL render farm on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plan", help="dry run: counts, LoRA groups, step math, est. time; renders nothing")
    _spec_arguments(p)
    p.add_argument("--out", help="a run folder: also show what is already done there (default: runs/<job>)")
    p.add_argument("--gpus", type=int, default=1, help="GPUs to divide the time estimate by")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("run", help="render (or train) a job spec on the Ray cluster (starts a local one if none)")
    _spec_arguments(p)
    p.add_argument("--out", help="run folder (default: runs/<job>); running again resumes")
    p.add_argument("--address", help="Ray address of a cluster (default: a running one, else local)")
    p.add_argument("--local", action="store_true", help="start a Ray of this run's own even if one runs "
                   "on this machine (default: join it and share its warm pool)")
    p.add_argument("--actors", type=int, help="workers (default: one per GPU)")
    p.add_argument("--gpus", type=int, help="logical GPUs of a local Ray started here "
                   "(default: CUDA devices, else CPU cores)")
    p.add_argument("--chunk", type=int, default=4, help="tasks per worker call (default 4)")
    p.add_argument("--device", help="cuda, cpu, ... (default: cuda when there is one)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    p.add_argument("--vae-tiling", action="store_true", help="decode in tiles (small GPUs)")
    p.add_argument("--cpu-offload", default="none", choices=["none", "model", "sequential"])
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--recycle-after", type=int, default=0, metavar="N", help="replace a worker by a fresh "
                   "process after N images (if its memory grows over a long run; default never)")
    p.add_argument("--task-timeout", type=float, default=600, metavar="S", help="restart a worker that "
                   "spends more than S seconds on one image and render it elsewhere (default 600; 0: never)")
    p.add_argument("--no-dashboard", action="store_true", help="a local Ray started here runs without "
                   "its dashboard (default: on, at 127.0.0.1)")
    p.add_argument("--priority", type=int, default=0, help="on a running cluster's shared pool: higher "
                   "priority jobs take free workers first (default 0)")
    p.add_argument("--allow-open-cluster", action="store_true", help="join a cluster whose dashboard is "
                   "reachable from the network without token auth (refused by default)")
    p.add_argument("--job-key", help=argparse.SUPPRESS)  # set by `farm submit`: the job's name in the pool
    p.set_defaults(func=cmd_run)

    address_help = f"Ray dashboard / Jobs API address (default: $RAY_API_SERVER_ADDRESS, else {DEFAULT_ADDRESS})"
    p = sub.add_parser("submit", help="queue a job spec on the cluster through the Ray Jobs API; prints its id")
    _spec_arguments(p)
    p.add_argument("--priority", type=int, default=0, help="higher runs first (default 0)")
    p.add_argument("--address", help=address_help)
    p.add_argument("--out", dest="out_on_head", help="run folder on the head (default: $SDFARM_RUNS/<job>, "
                   "$SDFARM_RUNS defaulting to ~/sdfarm/runs)")
    p.add_argument("--device", help="cuda, cpu, ... for the job's workers")
    p.add_argument("--chunk", type=int, help="tasks per worker call")
    p.add_argument("--recycle-after", type=int, metavar="N", help="replace a pool worker by a fresh process "
                   "after N of this job's images")
    # the job's own pipeline options: a pool worker holding other ones reloads for this job
    p.add_argument("--dtype", choices=["auto", "fp32", "fp16", "bf16"])
    p.add_argument("--vae-tiling", action="store_true", help="decode in tiles (small GPUs)")
    p.add_argument("--cpu-offload", choices=["none", "model", "sequential"],
                   help="at least this much offload (the worker's memory plan may pick more)")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("jobs", help="the cluster's farm jobs: state, progress, ETA, priority")
    p.add_argument("--address", help=address_help)
    p.set_defaults(func=cmd_jobs)
    for name, func, text in (("status", cmd_status, "one job's state, progress and last errors"),
                             ("cancel", cmd_cancel, "stop a job (what is done stays; resume later)"),
                             ("pause", cmd_pause, "hold a job: its workers go to other jobs"),
                             ("resume", cmd_pause, "release a paused job, or resubmit a stopped one"),
                             ("logs", cmd_logs, "a job's driver log")):
        p = sub.add_parser(name, help=text)
        p.add_argument("job_id")
        p.add_argument("--address", help=address_help)
        p.set_defaults(func=func)

    p = sub.add_parser("pool", help="the shared workers: node, what each holds, what it has done")
    p.add_argument("--address", help=address_help)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_pool)

    # runs on the head inside a control job
    p = sub.add_parser("grafana", help="write the farm's Grafana dashboard JSON (images/s, s/image, LoRA switches, "
                                       "queue depth, training loss) beside Ray's own dashboards")
    p.add_argument("dir", nargs="?", help="folder (default: this machine's Ray session dashboards folder, "
                                          "where `ray start --head` writes Ray's)")
    p.set_defaults(func=cmd_grafana)

    p = sub.add_parser("control", help="(run on the head by pause/resume/pool)")
    p.add_argument("action", choices=["pause", "resume", "pool"])
    p.add_argument("key", nargs="?", default="")
    p.set_defaults(func=cmd_control)

    p = sub.add_parser("grid", help="labelled grids and index.html from a run's manifest")
    p.add_argument("run", help="run folder")
    p.add_argument("--rows", required=True, help="axis for rows (e.g. lora)")
    p.add_argument("--cols", required=True, help="axis for columns (e.g. prompt)")
    p.add_argument("--pages", action="append", help="axis per page (repeatable); other varying axes page too")
    p.add_argument("--cell", type=int, help="cell size in px (default: image width, 128..512)")
    p.set_defaults(func=cmd_grid)

    p = sub.add_parser("score", help="likeness / leakage (faces) and CLIP-T / CLIP-I scores for a run's images")
    p.add_argument("run", help="run folder")
    p.add_argument("--photos", help="the subject's training photos (default: what the study recorded)")
    p.add_argument("--token", help="the subject's instance token (default: from the kohya folder name)")
    p.add_argument("--class-word", help="the class word (default: from the kohya folder name)")
    p.add_argument("--clip", help="a CLIP model folder (transformers layout) for CLIP-T / CLIP-I; tiny:clip in tests")
    p.add_argument("--device", help="cuda, cpu, ... (default: cuda when there is one)")
    p.add_argument("--again", action="store_true", help="score every image again")
    p.add_argument("--cluster", action="store_true",
                   help="score on the Ray cluster's GPU workers (joins --address or a running cluster, else a local "
                        "Ray) instead of in this process")
    p.add_argument("--address", help="with --cluster: the Ray cluster to join")
    p.add_argument("--local", action="store_true", help="with --cluster: a local Ray of this command's own")
    p.add_argument("--gpus", type=int, help="with --cluster and a local Ray: logical GPUs (default: one per core)")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("report", help="per checkpoint scores, the ranking and its rule, charts → RUN/report/")
    p.add_argument("run", help="run folder")
    p.add_argument("--margin", type=float, default=0.05,
                   help="how much closer to the subject than the no-LoRA baseline class-only faces may be")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("page", help="the results page (RUN/results/index.html): any axes live, full images with PNG "
                                    "info and scores, heat maps, the report; static, works from file://")
    p.add_argument("run", help="run folder")
    p.set_defaults(func=cmd_page)

    p = sub.add_parser("info", help="an image's PNG info (A1111 `parameters`: prompt, sampler, seed, hashes)")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("tiny-model", help="build the tiny random-weight SDXL (tests, demo)")
    p.add_argument("dir")
    p.set_defaults(func=cmd_tiny_model)

    p = sub.add_parser("tiny-lora", help="write a tiny random LoRA for the tiny model")
    p.add_argument("file")
    p.add_argument("--name", help="seed name (default: the file name)")
    p.add_argument("--rank", type=int, default=4)
    p.set_defaults(func=cmd_tiny_lora)
    return parser


def _load_job(args) -> None:
    """Read the spec (with overrides) once; every command works from `args.job`."""
    from farm.sweep.spec import load_spec

    overrides = list(args.override)
    if args.scale:
        overrides.insert(0, str(_spec_dir(args) / f"{args.scale}.yaml"))
    args.job = load_spec(args.spec, overrides)
    args.source = args.spec + "".join(f" + {o}" for o in overrides)
    suffix = f"-{args.scale}" if args.scale else ""
    if getattr(args, "job_key", None):  # a submitted job: its run folder is on the head
        args.out = str(_runs_root() / (args.out or args.job.job + suffix))
    elif hasattr(args, "out") and not args.out:
        args.out = str(Path("runs") / (args.job.job + suffix))


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights come from local files, never a hub
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # import-time notices, e.g. no torchvision
    args = build_parser().parse_args(argv)
    try:
        if hasattr(args, "spec"):
            _load_job(args)
        return args.func(args)
    except FarmError as exc:  # one line, even when it quotes a spec's text
        print(f"farm: error: {' '.join(str(exc).splitlines())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("farm: interrupted; finished images and manifest rows are kept, run again to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
