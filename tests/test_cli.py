"""The `farm` command as a user runs it (subprocesses, real Ray, tiny model)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from local_cluster import kill_marked

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
        assert 0 < len(committed) <= len(before) < 120
        again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert again.returncode == 0, again.stderr[-2000:]
        assert f"{120 - len(committed)} rendered, 0 failed, {len(committed)} already done of 120" in again.stdout
    finally:
        kill_marked(f"RAY_TMPDIR={ray_tmp}".encode())
        shutil.rmtree(ray_tmp, ignore_errors=True)
    rows = pq.read_table(out / "manifest").to_pylist()
    assert len(rows) == 120 and len({r["task_id"] for r in rows}) == 120  # no duplicates, even in raw parts
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.rglob("*.png")}
    assert all(after[name] == sha for name, sha in before.items()), "a PNG written before the kill changed"
    assert all(r["image_sha256"] == committed[r["task_id"]] for r in rows if r["task_id"] in committed)
    assert not [p for p in out.rglob("*") if p.name.startswith(".")], "temp files left behind"

