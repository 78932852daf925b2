"""The `farm` command as a user runs it (subprocesses, real Ray, tiny model)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from local_cluster import assert_exactly_once, kill_marked

ROOT = Path(__file__).resolve().parents[1]


def farm(*args, cwd=ROOT, timeout=600):
    """`farm ...` in a subprocess with a RAY_TMPDIR of its own (`farm run` is given `--local`: it
    must not join, and lend its GPUs to the shared pool of, the tests' session cluster)."""
    import tempfile

    ray_tmp = tempfile.mkdtemp(prefix="sdfarm-cli-")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    try:
        return subprocess.run([sys.executable, "-m", "farm.cli", *map(str, args)], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=timeout)
    finally:
        kill_marked(f"RAY_TMPDIR={ray_tmp}".encode())
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_plan_prints_counts_without_rendering(farm_cache, tmp_path):
    result = farm("plan", "jobs/demo.yaml", "--out", tmp_path / "never")
    assert result.returncode == 0, result.stderr
    assert "job demo: 28 images (32 grid cells, 4 share an image)" in result.stdout
    assert "model/LoRA groups: 4" in result.stdout
    assert "0 already ok, 28 to render" in result.stdout
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("spec, message", [
    ("job: x\nmodel: tiny:sdxl\ndefaults: {prompt: a}\naxes:\n  lora: [none, {file: a, strength: 5}]\n",
     "bad.yaml: axes.lora[1].strength: must be between 0 and 2"),
    ("job: x\nmodel: nowhere/model\ndefaults: {prompt: a}\n", "bad.yaml: model: "),
    ("job: x\nmodel: tiny:sdxl\ndefaults: {prompt: a, sampler: turbo}\n", "defaults.sampler: unknown sampler 'turbo'"),
])
def test_user_mistakes_are_one_line_and_exit_2(farm_cache, tmp_path, spec, message):
    (tmp_path / "bad.yaml").write_text(spec)
    for command in ("plan", "run"):
        result = farm(command, tmp_path / "bad.yaml", "--out", tmp_path / "out")
        assert result.returncode == 2
        assert message in result.stderr and "Traceback" not in result.stderr
        assert result.stderr.strip().count("\n") == 0


def test_grid_on_a_missing_run_is_one_line(tmp_path):
    result = farm("grid", tmp_path / "nothing", "--rows", "lora", "--cols", "prompt")
    assert result.returncode == 2 and "no manifest rows yet" in result.stderr and "Traceback" not in result.stderr


def test_tiny_lora_command_writes_a_loadable_file(farm_cache, tmp_path):
    result = farm("tiny-lora", tmp_path / "x.safetensors", "--rank", "2")
    assert result.returncode == 0, result.stderr
    from safetensors import safe_open

    with safe_open(tmp_path / "x.safetensors", "pt") as handle:
        keys = list(handle.keys())
    assert keys and all("lora" in key for key in keys)
    assert (tmp_path / "x.safetensors").stat().st_mode & 0o044 == 0o044  # readable by Ray workers


@pytest.mark.slow
def test_demo_job_end_to_end(farm_cache, tmp_path):
    """`farm run` then `farm grid` on jobs/demo.yaml, then a second run that resumes."""
    out = tmp_path / "demo"
    result = farm("run", "jobs/demo.yaml", "--out", out, "--gpus", "2", "--quiet", "--local")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "28 rendered, 0 failed" in result.stdout
    table = pq.read_table(out / "manifest")
    assert table.num_rows == 28 and set(table["status"].to_pylist()) == {"ok"}
    assert len(set(table["worker"].to_pylist())) == 2
    assert set(table["scheduler"].to_pylist()) == {"dpmpp_2s_ancestral normal"}  # k-diffusion's, as the spec asks
    grid = farm("grid", out, "--rows", "lora", "--cols", "prompt")
    assert grid.returncode == 0, grid.stderr
    pages = sorted((out / "grids").glob("*.png"))
    assert len(pages) == 2  # one per strength
    assert Image.open(pages[0]).size[0] == 128 * 5  # row labels + 4 prompts at the 128 px minimum cell
    assert f"results page: {out / 'results' / 'index.html'}" in grid.stdout
    assert "window.SDFARM" in (out / "results" / "data.js").read_text()
    again = farm("run", "jobs/demo.yaml", "--out", out, "--gpus", "2", "--quiet", "--local")
    assert again.returncode == 0 and "0 rendered, 0 failed, 28 already done" in again.stdout


@pytest.mark.parametrize("command", [["jobs"], ["status", "sdfarm-x-1"], ["pause", "sdfarm-x-1"], ["pool"],
                                     ["submit", "jobs/demo.yaml"]])
def test_queue_commands_without_a_cluster_say_so_in_one_line(command):
    result = farm(*command, "--address", "http://127.0.0.1:9")  # port 9 (discard): nothing listens
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("farm: error: --address http://127.0.0.1:9: no Ray Jobs API there")
    assert "Traceback" not in result.stderr


def test_submit_checks_the_spec_before_reaching_for_the_cluster(tmp_path):
    (tmp_path / "bad.yaml").write_text("job: x\nmodel: tiny:sdxl\ndefaults: {prompt: a, steps: 0}\n")
    result = farm("submit", tmp_path / "bad.yaml", "--address", "http://127.0.0.1:9")
    assert result.returncode == 2
    assert "bad.yaml: defaults.steps" in result.stderr and "Jobs API" not in result.stderr


@pytest.mark.slow
def test_driver_killed_9_mid_run_then_resumed_renders_only_what_is_missing(farm_cache, tmp_path):
    """kill -9 of `farm run` at about half way; the rerun renders only tasks without an `ok`
    row, and every PNG written before the kill keeps its bytes."""
    import hashlib
    import json
    import signal
    import tempfile
    import time

    spec = tmp_path / "long.yaml"
    spec.write_text(json.dumps({"job": "long", "model": "tiny:sdxl",
                                "defaults": {"prompt": "photo of a w0ut3r man", "steps": 6, "width": 64, "height": 64},
                                "axes": {"seed": list(range(120))}}))
    out = tmp_path / "out"
    ray_tmp = Path(tempfile.mkdtemp(prefix="sdfarm-kill-"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_TMPDIR": str(ray_tmp)}
    env.pop("RAY_ADDRESS", None)  # set by the tests' own ray.init: `farm run` would join that cluster
    command = [sys.executable, "-m", "farm.cli", "run", str(spec), "--out", str(out), "--gpus", "2", "--quiet",
               "--no-dashboard", "--chunk", "2", "--local"]
    try:
        driver = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while len(list(out.rglob("*.png"))) < 60 and time.monotonic() < deadline and driver.poll() is None:
            time.sleep(0.2)
        assert driver.poll() is None, "the run ended before half way: make it longer"
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        # the local Ray it started dies with it, as a crash would leave it
        kill_marked(f"RAY_TMPDIR={ray_tmp}".encode())
        committed = {r["task_id"]: r["image_sha256"] for r in pq.read_table(out / "manifest").to_pylist()}
        before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.rglob("*.png")}
        # a rewrite of deterministic output has the same bytes: the file itself (inode, mtime) must stay
        # (also PNGs whose rows the kill lost: the resumed run renders those tasks again)
        stamps = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.rglob("*.png")}
        assert 0 < len(committed) <= len(stamps) == len(before) < 120
        again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert again.returncode == 0, again.stderr[-2000:]
        assert f"{120 - len(committed)} rendered, 0 failed, {len(committed)} already done of 120" in again.stdout
    finally:
        kill_marked(f"RAY_TMPDIR={ray_tmp}".encode())
        shutil.rmtree(ray_tmp, ignore_errors=True)
    rows = assert_exactly_once(out, 120)  # one ok row a task in the raw parts: no duplicates
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.rglob("*.png")}
    assert all(after[name] == sha for name, sha in before.items()), "a PNG written before the kill changed"
    rewritten = [name for name, stamp in stamps.items()
                 if ((out / "images" / name[:2] / name).stat().st_ino,
                     (out / "images" / name[:2] / name).stat().st_mtime_ns) != stamp]
    assert not rewritten, f"{len(rewritten)} PNGs written before the kill were written again"
    assert all(r["image_sha256"] == committed[r["task_id"]] for r in rows if r["task_id"] in committed)
    assert not [p for p in out.rglob("*") if p.name.startswith(".")], "temp files left behind"



# --- README "Commands": options and behaviours a user relies on -----------------------------------

def _axis_counts(stdout: str) -> dict[str, int]:
    """`farm plan`'s "axes: seed 3, prompt 2" line as {axis: values}."""
    import re

    line = next(line for line in stdout.splitlines() if line.strip().startswith("axes:"))
    return {name: int(count) for name, count in re.findall(r"(\w+) (\d+)", line.split("axes:", 1)[1])}


def test_override_files_deep_merge_over_the_spec_in_order(tmp_path):
    """`--override FILE` (repeatable) deep-merges a YAML file over the spec, later files winning;
    `--scale tiny` applies the spec folder's tiny.yaml and names the run folder runs/<job>-tiny."""
    (tmp_path / "job.yaml").write_text("job: ovr\nmodel: tiny:sdxl\n"
                                       "defaults: {prompt: a, steps: 2, width: 64, height: 64}\n"
                                       "axes: {seed: [1, 2], prompt: [a, b]}\n")
    (tmp_path / "more-seeds.yaml").write_text("axes: {seed: [1, 2, 3]}\n")  # prompt axis must survive
    (tmp_path / "one-seed.yaml").write_text("axes: {seed: [9]}\n")
    (tmp_path / "tiny.yaml").write_text("axes: {prompt: [a, b, c, d]}\n")
    (tmp_path / "bad.yaml").write_text("defaults: {steps: 0}\n")
    plain = farm("plan", tmp_path / "job.yaml", "--out", tmp_path / "o")
    assert plain.returncode == 0, plain.stderr
    assert _axis_counts(plain.stdout) == {"seed": 2, "prompt": 2} and "job ovr: 4 images" in plain.stdout
    merged = farm("plan", tmp_path / "job.yaml", "--override", tmp_path / "more-seeds.yaml", "--out", tmp_path / "o")
    assert merged.returncode == 0, merged.stderr
    assert _axis_counts(merged.stdout) == {"seed": 3, "prompt": 2} and "job ovr: 6 images" in merged.stdout
    both = farm("plan", tmp_path / "job.yaml", "--override", tmp_path / "more-seeds.yaml",
                "--override", tmp_path / "one-seed.yaml", "--out", tmp_path / "o")
    assert both.returncode == 0 and _axis_counts(both.stdout) == {"seed": 1, "prompt": 2}, both.stderr
    tiny = farm("plan", tmp_path / "job.yaml", "--scale", "tiny", "--override", tmp_path / "more-seeds.yaml",
                cwd=tmp_path)
    assert tiny.returncode == 0, tiny.stderr
    assert _axis_counts(tiny.stdout) == {"seed": 3, "prompt": 4}
    assert f"{Path('runs') / 'ovr-tiny'}: 0 already ok, 12 to render" in tiny.stdout  # run folder runs/<job>-tiny
    bad = farm("plan", tmp_path / "job.yaml", "--override", tmp_path / "bad.yaml")
    assert bad.returncode == 2 and "defaults.steps" in bad.stderr and bad.stderr.count("\n") == 1


def test_tiny_model_command_builds_the_tiny_sdxl_as_a_diffusers_folder(farm_cache, tiny_model, tmp_path):
    """`farm tiny-model DIR`: the folder is a diffusers SDXL, and the same model `tiny:sdxl` names
    (a task on it has the same id: same files, same bytes)."""
    import json

    from farm.sweep.plan import plan_job
    from farm.sweep.spec import parse_spec

    result = farm("tiny-model", tmp_path / "tiny")
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()) == tmp_path / "tiny"
    index = json.loads((tmp_path / "tiny" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert {"unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"} <= set(index)
    assert list((tmp_path / "tiny" / "unet").glob("*.safetensors"))

    def ids(model):
        spec = {"job": "t", "model": model, "defaults": {"prompt": "a", "steps": 2, "width": 64, "height": 64,
                                                       "seed": 3}}
        return [t.task_id for t in plan_job(parse_spec(spec), tmp_path).tasks]

    assert ids("tiny") == ids("tiny:sdxl")


@pytest.fixture(scope="module")
def paged_run(renderer, lora_dir, tmp_path_factory):
    """A run folder rendered in-process: lora (2) × prompt (2) × seed (2) × cfg (2), 64 px."""
    from farm.runs.manifest import ManifestWriter, RunFolder
    from farm.sweep.plan import plan_job
    from farm.sweep.spec import parse_spec

    plan = plan_job(parse_spec({"job": "paged", "model": "tiny:sdxl",
                                "defaults": {"steps": 2, "width": 64, "height": 64},
                                "axes": {"lora": ["none", "subject-000001"], "prompt": ["a cat", "a dog"],
                                         "seed": [1, 2], "cfg": [5, 7]}}), lora_dir)
    run = RunFolder(tmp_path_factory.mktemp("paged"))
    run.save_run_info({"job": "paged", "axes": plan.axis_labels})
    writer = ManifestWriter(run)
    for task in plan.tasks:
        writer.add(renderer.render(task))
    writer.flush()
    return run.root


def _contains(page, tile) -> bool:
    """Whether `tile` (H×W×3) appears somewhere in `page`, pixel for pixel."""
    import numpy as np

    h, w = tile.shape[:2]
    ys, xs = np.nonzero((page[:-1, :-1] == tile[0, 0]).all(-1) & (page[1:, 1:] == tile[1, 1]).all(-1))
    return any(y + h <= page.shape[0] and x + w <= page.shape[1] and np.array_equal(page[y:y + h, x:x + w], tile)
               for y, x in zip(ys, xs))


def test_grid_pages_option_makes_one_page_per_value(paged_run):
    """`farm grid DIR --rows A --cols B --pages C`: one PNG per page in DIR/grids/ (the other
    varying axes page too), the pages going by C first; each page holds exactly its images, and
    index.html names each page's settings."""
    import numpy as np

    result = farm("grid", paged_run, "--rows", "lora", "--cols", "seed", "--pages", "cfg")
    assert result.returncode == 0, result.stderr
    pages = sorted((paged_run / "grids").glob("lora-x-seed-*.png"))
    assert len(pages) == 4 and [Path(line) for line in result.stdout.splitlines()[:4]] == pages
    order = [("5", "a cat"), ("5", "a dog"), ("7", "a cat"), ("7", "a dog")]  # by --pages cfg first
    index = (paged_run / "grids" / "index.html").read_text()
    sections = index.split("<section>")[1:]
    assert [("cfg: " + cfg in text, "prompt: " + prompt in text) for (cfg, prompt), text in zip(order, sections)] \
        == [(True, True)] * 4, sections
    rows = pq.read_table(paged_run / "manifest").to_pylist()
    for page_path, (cfg, prompt) in zip(pages, order):
        page = np.asarray(Image.open(page_path).convert("RGB"))
        for row in rows:  # each image, scaled to the 128 px cell by repeating pixels
            tile = np.asarray(Image.open(paged_run / row["image_path"]).convert("RGB")).repeat(2, 0).repeat(2, 1)
            assert _contains(page, tile) == (row["prompt"] == prompt and row["cfg"] == float(cfg)), \
                (page_path.name, row["prompt"], row["cfg"])
    bad = farm("grid", paged_run, "--rows", "lora", "--cols", "seed", "--pages", "nope")
    assert bad.returncode == 2 and "--pages nope: not an axis" in bad.stderr and bad.stderr.count("\n") == 1


@pytest.fixture(scope="module")
def seeded_run(farm_cache, tmp_path_factory):
    """`farm run` twice on a spec with `seed: -1` and a LoRA that fails at render time, with
    --device cpu --dtype bf16; what each run left behind."""
    import json
    from types import SimpleNamespace

    import torch
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("seeded")
    # a LoRA whose keys fit no module of the model: planning takes it, loading it fails
    save_file({"lora_unet_foo.lora_down.weight": torch.zeros(4, 7)}, folder / "broken.safetensors")
    spec = folder / "seeded.yaml"
    spec.write_text(json.dumps({"job": "seeded", "model": "tiny:sdxl",
                                "defaults": {"prompt": "photo of a man", "steps": 2, "width": 64, "height": 64,
                                             "sampler": "euler", "seed": -1},
                                "axes": {"lora": ["none", "broken"]}}))
    out = folder / "out"
    command = ("run", spec, "--out", out, "--gpus", "1", "--quiet", "--local", "--no-dashboard",
               "--device", "cpu", "--dtype", "bf16")
    first = farm(*command)
    info = json.loads((out / "run.json").read_text())
    rows = pq.read_table(out / "manifest").to_pylist()
    pngs = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.rglob("*.png")}
    second = farm(*command)
    return SimpleNamespace(spec=spec, out=out, first=first, second=second, info=info, rows=rows, pngs=pngs,
                           info_after=json.loads((out / "run.json").read_text()),
                           rows_after=pq.read_table(out / "manifest").to_pylist())


def test_a_run_with_failed_tasks_exits_1(seeded_run):
    """"Exit 0 when all ok, 1 when some failed": the failed task is named, the rest is kept; a
    rerun tries only the failed one again (and fails it again)."""
    first, second = seeded_run.first, seeded_run.second
    assert first.returncode == 1, first.stderr[-2000:]
    assert "1 rendered, 1 failed, 0 already done of 2" in first.stdout
    assert "failed:" in first.stderr and "broken.safetensors" in first.stderr and "Traceback" not in first.stderr
    assert second.returncode == 1, second.stderr[-2000:]
    assert "0 rendered, 1 failed, 1 already done of 2" in second.stdout
    assert sorted(r["status"] for r in seeded_run.rows) == ["failed", "ok"]


def test_minus_one_seeds_are_fixed_at_plan_time_and_kept_in_run_json(seeded_run):
    """`seed: -1`: random, fixed once at plan time and kept in run.json: every image has it, a rerun
    keeps it (and rewrites no PNG), `farm plan --out` shows it; a new run folder draws another."""
    seeds = seeded_run.info["seeds"]
    assert list(seeds) == ["defaults.seed"]
    seed = seeds["defaults.seed"]
    assert isinstance(seed, int) and 0 <= seed < 2**64
    assert {r["seed"] for r in seeded_run.rows} == {seed}
    assert seeded_run.info_after["seeds"] == seeds
    assert {r["seed"] for r in seeded_run.rows_after} == {seed}
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in seeded_run.out.rglob("*.png")} == seeded_run.pngs
    shown = farm("plan", seeded_run.spec, "--out", seeded_run.out)
    assert shown.returncode == 0, shown.stderr
    assert f"defaults.seed: -1 → {seed} (fixed for this run)" in shown.stdout
    assert "1 already ok, 1 to render" in shown.stdout
    fresh = farm("plan", seeded_run.spec, "--out", seeded_run.out.parent / "fresh")
    assert "defaults.seed: -1 → " in fresh.stdout and f"-1 → {seed} " not in fresh.stdout


def test_device_and_dtype_options_reach_the_workers(seeded_run, lora_dir, renderer):
    """`--device cpu --dtype bf16`: the manifest records the device, and the pixels are those a bf16
    pipeline on the CPU renders (not the fp32 default's)."""
    from farm.render.pipeline import PipelineOptions
    from farm.render.renderer import Renderer
    from farm.sweep.plan import plan_job
    from farm.sweep.spec import load_spec

    ok = next(r for r in seeded_run.rows if r["status"] == "ok")
    assert ok["device"] == "cpu"
    plan = plan_job(load_spec(str(seeded_run.spec), []), seeded_run.spec.parent, str(seeded_run.spec),
                    seeded_run.info["seeds"])
    task = next(t for t in plan.tasks if t.task_id == ok["task_id"])
    bf16 = Renderer(PipelineOptions(device="cpu", dtype="bf16", threads=1)).render(task)
    assert bf16.status == "ok" and ok["image_sha256"] == bf16.image_sha256
    assert renderer.render(task).image_sha256 != ok["image_sha256"]  # fp32: the option made the difference


def test_farm_grafana_writes_a_dashboard_beside_rays(tmp_path):
    """`farm grafana` with no folder writes into Ray's session dashboards folder (under
    RAY_TMPDIR), where `ray start --head` writes Ray's own; each panel queries the farm's series."""
    import json

    env = {**os.environ, "RAY_TMPDIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "farm.cli", "grafana"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    path = Path(done.stdout.strip())
    assert path == tmp_path / "ray" / "session_latest" / "metrics" / "grafana" / "dashboards" / \
        "sdfarm_grafana_dashboard.json"
    dashboard = json.loads(path.read_text())
    assert dashboard["uid"] == "sdfarm" and len(dashboard["panels"]) == 8
    assert all(target["expr"].count("ray_sdfarm_") >= 1 for panel in dashboard["panels"] for target in panel["targets"])
    assert {panel["gridPos"]["x"] for panel in dashboard["panels"]} == {0, 12}  # two per row, none overlapping
