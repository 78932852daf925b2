"""`scripts/bench`: ratios measured side by side in one run (absolute times on a shared machine
are noise; the ratios are the figures). Tiny model, CPU, one torch thread per worker.

    python -m farm.bench [--quick] [--out runs/bench]      # prints the table, writes results.json

`--only NAME` runs one part (efficiency, scaling, lora, affinity, plan, grid, pipelined).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGETS = {
    "farm_efficiency": (">=", 0.97),
    "scaling_2_nodes": (">=", 1.9),
    "lora_switch_vs_render": ("<=", 0.01),
    "cached_vs_naive_swap": (">=", 50.0),
    "plan_1m_seconds": ("<=", 10.0),
    "plan_1m_peak_gb": ("<=", 1.0),
    "pipelined_vs_sequential": ("<=", 0.7),
}


def _spec(tasks: int, size: int = 64, steps: int = 4, loras: int = 0) -> dict:
    """A render job of exactly `tasks` images (prompt × seed), optionally over tiny LoRAs."""
    axes: dict = {"prompt": [f"photo of a w0ut3r man, pose {i}" for i in range(10)]}
    per_lora = tasks // max(loras, 1)
    axes["seed"] = list(range(per_lora // 10))
    if loras:
        axes = {"lora": [f"tiny:lora/bench-{i}" for i in range(loras)], **axes}
    return {"job": "bench", "model": "tiny:sdxl", "axes": axes,
            "defaults": {"steps": steps, "width": size, "height": size, "sampler": "euler", "cfg": 5,
                         "negative": "blurry"}}


def _plan(data: dict):
    from farm.sweep.plan import plan_job
    from farm.sweep.spec import parse_spec

    return plan_job(parse_spec(data, "bench"), Path.cwd(), "bench")


def farm_efficiency(tasks: int, rounds: int = 2) -> dict:
    """Bare in-process loop vs the farm with one warm worker, same tasks, same thread count.
    Rounds alternate bare / farm and the best of each counts, which takes out most of the noise
    other processes on a shared machine add."""
    import ray
    import torch

    from farm.cluster.actors import start_workers
    from farm.cluster.dispatch import run_plan
    from farm.runs.manifest import RunFolder
    from farm.render.pipeline import PipelineOptions
    from farm.render.renderer import Renderer

    plan = _plan(_spec(tasks))
    torch.set_num_threads(1)
    renderer = Renderer(PipelineOptions(device="cpu", threads=1))
    renderer.render_many(plan.tasks[:10])  # load + warm up
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False)
    bare, farm = [], []
    try:
        started = time.perf_counter()
        pool = start_workers(1, PipelineOptions(), use_gpus=True)
        ray.get(pool[0].render_batch.remote(plan.tasks[:10]))  # load + warm up, as a warm pool is
        cold_start = time.perf_counter() - started
        for _ in range(rounds):
            bare.append(_time_call(lambda: renderer.render_many(plan.tasks)))
            with tempfile.TemporaryDirectory() as out:
                began = time.perf_counter()
                summary = run_plan(plan, RunFolder(out), pool=pool, quiet=True)
                farm.append(time.perf_counter() - began)
            assert summary.ok == tasks, summary.errors[:3]
    finally:
        ray.shutdown()
    best_bare, best_farm = min(bare), min(farm)
    return {"farm_efficiency": best_bare / best_farm, "bare_s": best_bare, "farm_s": best_farm,
            "overhead_ms_per_task": (best_farm - best_bare) / tasks * 1000, "worker_start_s": cold_start,
            "farm_efficiency_with_start": best_bare / (best_farm + cold_start)}


def scaling(tasks: int) -> dict:
    """One worker vs two workers on two Ray nodes (a real 2-node cluster on this machine)."""
    import ray
    from ray.cluster_utils import Cluster

    from farm.cluster.actors import start_workers
    from farm.cluster.dispatch import run_plan
    from farm.runs.manifest import RunFolder
    from farm.render.pipeline import PipelineOptions

    plan = _plan(_spec(tasks))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "num_gpus": 0, "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=1, num_gpus=1) for _ in range(2)]
    ray.init(address=cluster.address)
    try:
        walls = {1: [], 2: []}
        workers = start_workers(2, PipelineOptions(), use_gpus=True)  # one per node (one GPU each)
        ray.get([worker.render_batch.remote(plan.tasks[:10]) for worker in workers])
        pools = {1: workers[:1], 2: workers}
        for _ in range(2):  # alternate, best of each
            for count, pool in pools.items():
                with tempfile.TemporaryDirectory() as out:
                    run = functools.partial(run_plan, plan, RunFolder(out), pool=pool, quiet=True)
                    walls[count].append(_time_call(run))
        walls = {count: min(times) for count, times in walls.items()}
        placed = len(nodes)
    finally:
        ray.shutdown()
        cluster.shutdown()
    return {"scaling_2_nodes": walls[1] / walls[2], "one_worker_s": walls[1], "two_workers_s": walls[2],
            "nodes": placed}


def lora_switching(groups: int) -> dict:
    """Cached adapter switch vs one 128 px / 20-step render; vs reloading pipeline + LoRA from disk;
    and whether fusing a LoRA pays for long same-LoRA runs."""
    import torch

    from farm.render.lora import adapter_name
    from farm.render.pipeline import PipelineOptions, load_pipeline
    from farm.render.renderer import Renderer
    from farm.sweep.samplers import resolve_sampler

    torch.set_num_threads(1)
    plan = _plan(_spec(20, size=128, steps=20, loras=2))
    a, b = plan.tasks[0], next(t for t in plan.tasks if t.group != plan.tasks[0].group)
    renderer = Renderer(PipelineOptions(device="cpu", threads=1))
    renderer.render(a), renderer.render(b)
    switches = []
    for i in range(50):
        switches.append(renderer.adapters.activate((a if i % 2 else b).loras))
    switch = statistics.median(switches)
    unfused = statistics.median(renderer.render(a).render_s for _ in range(5))
    pipe = renderer.pipe
    pipe.fuse_lora(adapter_names=[adapter_name(a.loras[0])], lora_scale=a.loras[0].strength)
    sampler = resolve_sampler(a.sampler)
    fused = statistics.median(_time_call(lambda: renderer._run(a, sampler)) for _ in range(5))
    pipe.unfuse_lora()
    naive = []
    for _ in range(max(2, groups)):
        began = time.perf_counter()
        fresh = load_pipeline(a.model_path, PipelineOptions(device="cpu", threads=1))
        fresh.load_lora_weights(a.loras[0].path, adapter_name="x")
        naive.append(time.perf_counter() - began)
        del fresh
    return {"lora_switch_vs_render": switch / unfused, "switch_ms": switch * 1000, "render_128px_20_s": unfused,
            "cached_vs_naive_swap": statistics.median(naive) / switch, "naive_reload_s": statistics.median(naive),
            "fused_render_s": fused, "fuse_saves": 1 - fused / unfused}


def _time_call(fn) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def affinity() -> dict:
    """LoRA switches for the first seed's study order (14 × 10 checkpoints, strength and prompt
    tables) on 2 workers: the farm's affinity queue vs a naive FIFO. Equal render times; chunks of 4."""
    from farm.cluster.dispatch import AffinityQueue, make_chunks

    class Task:
        def __init__(self, group):
            self.group = group

    tasks = []
    for variant in range(14):
        for epoch in range(10):
            tasks += [Task((variant, epoch))] * 10  # strength table row
    for variant in range(14):
        for epoch in range(10):
            tasks += [Task((variant, epoch))] * 12  # prompt table row
    chunks = [tasks[i:i + 4] for i in range(0, len(tasks), 4)]
    fifo_switches, last = 0, {}
    for index, chunk in enumerate(chunks):  # FIFO: chunks go out in order, alternating workers
        worker = index % 2
        fifo_switches += worker in last and last[worker] != chunk[0].group
        last[worker] = chunk[0].group
    ordered = sorted(tasks, key=lambda t: t.group)  # the farm plans by group first
    queue = AffinityQueue(make_chunks(ordered, 4))
    while queue:
        for worker in (0, 1):
            queue.take(worker)
    return {"affinity_switches": queue.switches, "fifo_switches": fifo_switches,
            "affinity_vs_fifo": queue.switches / max(fifo_switches, 1)}


def plan_scale(tasks: int) -> dict:
    """Expand a `tasks`-image spec and check it against a manifest that already holds every other
    task (as a resumed run's would), in a fresh process so peak RSS is this work's own. The
    manifest is written by another process from the same plan, outside the clock."""
    spec = (
        "from farm.bench import _spec, _plan\n"
        f"n = {tasks}\n"
        "spec = _spec(n); spec['axes']['seed'] = list(range(n // 10))\n"
    )
    setup = spec + (
        "import sys, pyarrow as pa, pyarrow.parquet as pq\n"
        "ids = [t.task_id for t in _plan(spec).tasks][::2]\n"
        "pq.write_table(pa.table({'task_id': ids, 'status': ['ok'] * len(ids)}), sys.argv[1])\n"
    )
    measure = spec + (
        "import time, resource, sys\n"
        "import pyarrow.parquet as pq\n"
        "_plan(_spec(10))\n"  # build and hash the tiny model outside the clock
        "began = time.perf_counter()\n"
        "plan = _plan(spec)\n"
        "done = set(pq.read_table(sys.argv[1], columns=['task_id', 'status'])['task_id'].to_pylist())\n"
        "left = [t for t in plan.tasks if t.task_id not in done]\n"
        "elapsed = time.perf_counter() - began\n"
        "print(elapsed, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, len(plan.tasks), len(left))\n"
    )
    with tempfile.TemporaryDirectory() as out:
        rows = str(Path(out) / "rows.parquet")
        for code in (setup, measure):
            result = subprocess.run([sys.executable, "-c", code, rows], capture_output=True, text=True, timeout=1800)
            if result.returncode:
                raise RuntimeError(result.stderr[-2000:])
    elapsed, peak_gb, planned, left = result.stdout.split()[-4:]
    return {"plan_1m_seconds": float(elapsed), "plan_1m_peak_gb": float(peak_gb), "plan_tasks": int(planned),
            "plan_checked_left": int(left)}


def grid_speed(images: int) -> dict:
    """`farm grid` over a run of `images` PNGs vs plain decode + paste of the same files."""
    from PIL import Image

    from farm.render.renderer import RenderResult, encode_png
    from farm.runs.grid import build_pages, make_grids
    from farm.runs.manifest import ManifestWriter, RunFolder

    plan = _plan({**_spec(images), "axes": {"prompt": [f"p{i}" for i in range(12)],
                                            "seed": list(range(-(-images // 12)))}})
    with tempfile.TemporaryDirectory() as out:
        run = RunFolder(out)
        writer = ManifestWriter(run, every_rows=1000)
        tile = Image.new("RGB", (64, 64), (90, 120, 150))
        for task in plan.tasks[:images]:
            writer.add(RenderResult(task=task, status="ok", png=encode_png(tile, "x"), image_sha256="0" * 64))
        writer.flush()
        began = time.perf_counter()
        make_grids(out, "seed", "prompt", cell_px=64)
        farm = time.perf_counter() - began
        grid_cells = sum(len(page.cells) for page in build_pages(run, "seed", "prompt"))
        paths = sorted(Path(out, "images").rglob("*.png"))
        began = time.perf_counter()
        canvas = Image.new("RGB", (64 * 12, 64 * len(paths) // 12 + 64))
        for i, path in enumerate(paths):
            with Image.open(path) as image:
                canvas.paste(image.convert("RGB"), (64 * (i % 12), 64 * (i // 12)))
        plain = time.perf_counter() - began
    return {"grid_s_per_image": farm / images, "plain_s_per_image": plain / images, "grid_vs_plain": farm / plain,
            "grid_cells": grid_cells, "plain_cells": len(paths)}


def pipelined_study() -> dict:
    """2 variants × 3 epochs with their evaluation renders on 2 workers: the farm's pipelined
    schedule vs training everything first and rendering after."""
    import ray

    from farm.cluster.dispatch import run_plan, run_study
    from farm.runs.manifest import RunFolder
    from farm.sweep.spec import parse_spec
    from farm.train.study import Evaluation, Study
    from farm.models.tiny import write_tiny_dataset

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_tiny_dataset(tmp / "data", images=4, repeats=4)
        spec = {"job": "pipe", "model": "tiny:sdxl",
                "train": {"train_data_dir": "data/img", "resolution": 64, "train_batch_size": 2,
                          "max_train_epochs": 3, "save_every_n_epochs": 1},
                "variants": {"v1": {}, "v2": {"network_dim": 8}},
                "evaluate": {"defaults": {"steps": 8, "width": 64, "height": 64, "seed": 1},
                             "axes": {"prompt": [f"photo of a w0ut3r man {i}" for i in range(16)]}}}
        job = parse_spec(spec, "pipe")
        ray.init(num_cpus=2, num_gpus=2, include_dashboard=False)
        try:
            walls = {}
            for mode in ("pipelined", "sequential"):
                folder = RunFolder(tmp / mode)
                study = Study(job, tmp, "pipe", folder.root)
                trains = [run for run, _ in study.runs(plan_only=True)]
                evaluation = Evaluation(job.evaluation_job(), tmp, "pipe")
                began = time.perf_counter()
                if mode == "pipelined":
                    run_study(trains, evaluation.replan, folder, quiet=True)
                else:
                    run_study(trains, lambda checkpoints: [], folder, quiet=True)
                    known = {}
                    for row in folder.read_checkpoints():
                        checkpoint = (row["epoch"], row["label"], str(folder.root / row["path"]))
                        known.setdefault(row["run"], []).append(checkpoint)
                    from farm.sweep.plan import Plan

                    tasks = evaluation.replan(known)
                    run_plan(Plan(job=evaluation.job, tasks=tasks), folder, quiet=True)
                walls[mode] = time.perf_counter() - began
        finally:
            ray.shutdown()
    return {"pipelined_vs_sequential": walls["pipelined"] / walls["sequential"],
            "pipelined_s": walls["pipelined"], "sequential_s": walls["sequential"]}


def gpu_mode(model: str, device: str = "cuda", size: int = 1024, steps: int = 20, repeats: int = 3) -> dict:
    """A real SDXL on the user's GPU: s/image with the farm's 6 GB-card settings (fp16, VAE upcast
    for decoding, VAE tiling, model CPU offload) vs plain diffusers in fp16 with everything on the
    GPU (fp32 would not fit a 6 or 12 GB card at all), the farm's own memory plan for this card,
    and the cached LoRA switch. Running out of memory is a result (`*_error`), not a crash: the
    plain baseline does not fit a 6 GB card. `device="cpu"` with the tiny model tests this path."""
    import torch
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_kohya
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    from farm.models import kohya
    from farm.models.artifacts import sha256_file
    from farm.render.lora import AdapterCache
    from farm.render.pipeline import PipelineOptions, load_pipeline
    from farm.sweep.plan import LoraUse

    def seconds_per_image(pipe) -> float:
        # a plain diffusers pipeline call is the yardstick here, with its own DPM++ 2M Karras
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, use_karras_sigmas=True)
        times = []
        for i in range(repeats + 1):  # the first call warms up (kernels, allocator) and is dropped
            generator = torch.Generator(device="cpu").manual_seed(i)
            began = time.perf_counter()
            pipe("photo of a w0ut3r man", num_inference_steps=steps, width=size, height=size, generator=generator)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - began)
        return statistics.median(times[1:])

    from farm.render.memory import free_vram, model_sizes, plan_render, release
    from farm.render.pipeline import memory_options

    on_gpu = device.startswith("cuda")
    dtype = torch.float16 if on_gpu else torch.float32
    results: dict = {"gpu_device": torch.cuda.get_device_name(0) if on_gpu else device}
    free = free_vram(device)
    if free is not None:
        results["gpu_free_gb"] = free / 1024**3
        plan = plan_render(free, model_sizes(model), memory_options(PipelineOptions(), dtype))
        results["gpu_memory_plan"] = plan.describe()

    def measured(name: str, load) -> object | None:
        """s/image and peak memory of one setting; out of memory is recorded as the result."""
        pipe = None
        try:
            pipe = load()
            results[f"gpu_{name}_s_per_image"] = seconds_per_image(pipe)
            if on_gpu:
                results[f"gpu_{name}_peak_gb"] = torch.cuda.max_memory_allocated() / 1024**3
        except torch.cuda.OutOfMemoryError:
            results[f"gpu_{name}_error"] = "out of memory"
            pipe = None
        release()
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        return pipe

    def plain_pipeline():
        pipe = StableDiffusionXLPipeline.from_pretrained(model, dtype=dtype, use_safetensors=True,
                                                         local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(device)

    measured("plain", plain_pipeline)
    release()  # the plain pipeline is gone before the farm's loads
    options = PipelineOptions(device=device, dtype="fp16" if on_gpu else "fp32", vae_tiling=True,
                              cpu_offload="model" if on_gpu else "none")
    farm = measured("farm", lambda: load_pipeline(model, options))
    if farm is None:
        return results
    # two random LoRAs shaped for this UNet (B randomised: a zero-init LoRA would do nothing)
    loras = []
    with tempfile.TemporaryDirectory() as folder:
        for index in range(2):
            config = LoraConfig(r=8, lora_alpha=8, target_modules=list(kohya.ATTENTION_LORA_TARGETS))
            farm.unet.add_adapter(config, adapter_name=f"probe{index}")
            state = {f"unet.{k}": v.detach().clone().normal_(0, 0.01)
                     for k, v in get_peft_model_state_dict(farm.unet, adapter_name=f"probe{index}").items()}
            farm.unet.delete_adapters(f"probe{index}")
            path = Path(folder) / f"probe{index}.safetensors"
            save_file({k: v.contiguous() for k, v in convert_state_dict_to_kohya(state).items()}, path)
            loras.append(LoraUse(f"probe{index}", str(path), sha256_file(path), 1.0))
        cache = AdapterCache(farm)
        cache.activate(loras[:1]), cache.activate(loras[1:])
        switches = [cache.activate(loras[i % 2: i % 2 + 1]) for i in range(20)]
    results["gpu_lora_switch_ms"] = statistics.median(switches) * 1000
    results["gpu_lora_loads"] = cache.loads  # 22 switches between two LoRAs: each read from disk once
    if "gpu_plain_s_per_image" in results:
        results["gpu_farm_vs_plain"] = results["gpu_farm_s_per_image"] / results["gpu_plain_s_per_image"]
    return results


def _verdict(name: str, value: float) -> str:
    if name not in TARGETS:
        return ""
    op, target = TARGETS[name]
    ok = value >= target if op == ">=" else value <= target
    return f"{'met' if ok else 'MISSED'} ({op} {target:g})"


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    parser = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--out", default="runs/bench", help="where results.json goes")
    parser.add_argument("--only", action="append", help="run only these parts (repeatable)")
    parser.add_argument("--gpu", metavar="MODEL", help="GPU mode: a real SDXL diffusers folder on CUDA "
                        "(farm 6 GB defaults vs plain diffusers, LoRA switch); skips the CPU parts")
    args = parser.parse_args(argv)
    q = args.quick
    parts = {
        "efficiency": lambda: farm_efficiency(60 if q else 500),
        "scaling": lambda: scaling(40 if q else 200),
        "lora": lambda: lora_switching(2 if q else 3),
        "affinity": affinity,
        "plan": lambda: plan_scale(10_000 if q else 1_000_000),
        "grid": lambda: grid_speed(120 if q else 3080),
        "pipelined": pipelined_study,
    }
    results: dict = {"quick": q}
    if args.gpu:
        parts = {"gpu": lambda: gpu_mode(args.gpu)}
    for name, part in parts.items():
        if args.only and name not in args.only:
            continue
        began = time.perf_counter()
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        results.update(part())
        results[f"{name}_bench_s"] = time.perf_counter() - began
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"{'figure':32} {'value':>12}  target")
    for name, value in results.items():
        if isinstance(value, float):
            print(f"{name:32} {value:12.4g}  {_verdict(name, value)}")
        elif name.endswith(("_error", "_plan")):
            print(f"{name:32} {value}")
    print(f"\nresults: {out / 'results.json'}; reproduce with: scripts/bench" + (" --quick" if q else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
