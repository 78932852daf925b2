"""Training sweeps on the farm: real local Ray with two logical GPUs, tiny model, tiny dataset.

(`dispatch.run_study` is exercised through the `farm` library calls a user's `farm run` makes.)
"""

import json
import os
import signal
import threading
import time
from pathlib import Path

import pyarrow.compute as pc
import pytest

from farm.cluster.dispatch import run_study
from farm.runs.grid import build_pages
from farm.runs.manifest import RunFolder
from farm.sweep.spec import parse_spec
from farm.train.study import Evaluation, Study
from farm.models.tiny import write_tiny_dataset
from conftest import RAY_WORKER_MARK
from local_cluster import assert_exactly_once, processes_marked


def study_spec(tmp_path: Path, variants: dict, prompts=("photo of a man", "photo of a w0ut3r man")) -> Path:
    write_tiny_dataset(tmp_path / "data", images=4, repeats=1, reg_images=2)
    return {
        "job": "study", "model": "tiny:sdxl",
        "train": {"train_data_dir": "data/img", "resolution": 64, "train_batch_size": 2, "network_dim": 4,
                  "learning_rate": 1e-3, "max_train_epochs": 1, "save_every_n_epochs": 1},
        "variants": variants,
        "evaluate": {"defaults": {"steps": 2, "width": 64, "height": 64, "seed": 11},
                     "axes": {"prompt": list(prompts)}},
    }


def run(tmp_path, spec):
    job = parse_spec(spec, "study.yaml")
    folder = RunFolder(tmp_path / "out")
    study = Study(job, tmp_path, "study.yaml", folder.root)
    trains = [t for t, _ in study.runs(plan_only=True)]
    evaluation = Evaluation(job.evaluation_job(), tmp_path, "study.yaml")
    return folder, run_study(trains, evaluation.replan, folder, quiet=True)


def test_three_variants_on_two_gpus_evaluate_while_training(ray_cluster, tmp_path):
    spec = study_spec(tmp_path, {"v001": {}, "v002": {"max_train_epochs": 12, "reg_data_dir": "data/reg"},
                                 "v003": {"network_dim": 2}})
    folder, summary = run(tmp_path, spec)
    checkpoints = folder.read_checkpoints()
    by_run = {}
    for row in checkpoints:
        by_run.setdefault(row["run"], []).append(row)
    assert sorted(by_run) == ["v001", "v002", "v003"]
    assert len(by_run["v002"]) == 12 and len(by_run["v001"]) == 1
    assert all((folder.root / r["path"]).is_file() for r in checkpoints)
    assert (folder.root / by_run["v002"][-1]["loss_plot"]).is_file()
    assert summary.failed == 0 and summary.ok == 2 * len(checkpoints)
    table = folder.read()
    assert table.num_rows == 2 * len(checkpoints)
    first_render = pc.min(table["started_at"]).as_py()
    last_training = max(r["finished_at"] for r in by_run["v002"])
    assert first_render < last_training  # evaluation began while v002 was still training
    labels = {dict(row["axes"])["lora"] for row in table.to_pylist()}
    assert {"v001 epoch 1", "v002 epoch 1", "v002 epoch 12", "v003 epoch 1"} <= labels


def uninterrupted_lora(tmp_path, spec) -> dict:
    """The final LoRA of the spec's one variant trained in this process, without Ray and without a
    stop, with one torch thread as a CPU worker trains."""
    from dataclasses import replace

    import torch
    from safetensors.torch import load_file

    from farm.render.pipeline import PipelineOptions
    from farm.train.trainer import train_run

    job = parse_spec(spec, "study.yaml")
    (train, _), = Study(job, tmp_path, "study.yaml", tmp_path / "uninterrupted").runs(plan_only=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        final = list(train_run(train, pipeline=replace(PipelineOptions(), threads=1)))[-1]
    finally:
        torch.set_num_threads(threads)
    assert final.final
    return load_file(final.path)


def test_a_killed_worker_resumes_its_run_and_nothing_is_lost(ray_cluster, tmp_path):
    import psutil
    from safetensors.torch import load_file

    epochs, steps = 12, 24  # 4 images, batches of 2; a checkpoint every 4 epochs, state every epoch
    spec = study_spec(tmp_path, {"v001": {"max_train_epochs": epochs, "save_every_n_epochs": 4}})
    result = {}
    thread = threading.Thread(target=lambda: result.update(zip(("folder", "summary"), run(tmp_path, spec))))
    thread.start()
    log = tmp_path / "out" / "train" / "v001" / "log.csv"
    deadline = time.time() + 120
    while time.time() < deadline and (not log.is_file() or len(log.read_text().splitlines()) < 1 + 6):
        time.sleep(0.1)
    assert log.is_file(), "training never started"
    # only this session's cluster: its workers carry the mark; Ray titles a busy worker process with
    # its task's name ("ray::train v001", "ray::lora=v001 e1 ...")
    ours = set(processes_marked(RAY_WORKER_MARK.encode()))
    workers = [p for p in psutil.process_iter(["cmdline"]) if p.pid in ours
               and " ".join(p.info["cmdline"] or []).strip().startswith("ray::")]
    trainer = [p for p in workers if "train v001" in " ".join(p.info["cmdline"])]
    assert trainer, "no training worker found"
    lines_before = len(log.read_text().splitlines())  # a header, then one line a step
    os.kill(trainer[0].pid, signal.SIGKILL)  # kill -9, as the OOM killer would
    thread.join(timeout=300)
    assert not thread.is_alive()
    folder, summary = result["folder"], result["summary"]
    assert (summary.failed_runs, summary.failed) == ([], 0), (summary.failed_runs, summary.errors[:3])
    rows = folder.read_checkpoints()
    # the kill landed mid-run: the log had fewer steps than the run's, and the run still ended whole
    assert lines_before < 1 + steps, "the run had finished before the kill"
    assert [r["epoch"] for r in rows] == [4, 8, 12]
    assert rows[-1]["final"] and rows[-1]["step"] == steps
    assert summary.failed == 0
    assert_exactly_once(folder.root, 2 * len(rows))  # each checkpoint × 2 prompts, in the raw parts
    # resumed exactly: the final LoRA is, tensor for tensor, the one an uninterrupted run trains
    resumed, whole = load_file(folder.root / rows[-1]["path"]), uninterrupted_lora(tmp_path, spec)
    assert resumed.keys() == whole.keys()
    for key, tensor in whole.items():
        assert torch_equal(resumed[key], tensor), key


def torch_equal(a, b) -> bool:
    import torch

    return a.dtype == b.dtype and torch.equal(a, b)


def test_a_failing_run_is_reported_and_the_others_go_on(ray_cluster, tmp_path):
    import importlib.util

    if importlib.util.find_spec("bitsandbytes"):
        pytest.skip("bitsandbytes is installed here, so AdamW8bit does not fail")
    spec = study_spec(tmp_path, {"v001": {}, "v002": {"optimizer_type": "AdamW8bit"}})
    folder, summary = run(tmp_path, spec)
    assert [r["run"] for r in folder.read_checkpoints()] == ["v001"]
    assert len(summary.failed_runs) == 1 and summary.failed_runs[0].startswith("v002: ")
    assert "AdamW8bit needs the bitsandbytes package" in summary.failed_runs[0]
    assert summary.ok == 2


def test_full_dreambooth_runs_are_evaluated_as_models(ray_cluster, tmp_path):
    spec = study_spec(tmp_path, {"db1": {"mode": "dreambooth", "learning_rate": 1e-5}})
    folder, summary = run(tmp_path, spec)
    rows = folder.read_checkpoints()
    assert [r["label"] for r in rows] == ["db1 epoch 1"]
    assert (folder.root / rows[0]["path"] / "model_index.json").is_file()
    table = folder.read().to_pylist()
    assert summary.ok == 2 and {dict(r["axes"])["model"] for r in table} == {"db1 epoch 1"}
    assert all(r["model_sha256"] == rows[0]["sha256"] for r in table)


def test_mixed_modes_need_explicit_evaluation_axes(tmp_path):
    from farm.errors import SpecError

    spec = study_spec(tmp_path, {"a": {}, "b": {"mode": "dreambooth"}})
    with pytest.raises(SpecError, match="variants mix lora and dreambooth"):
        parse_spec(spec, "s.yaml")


ROOT = Path(__file__).resolve().parents[1]


def placeholder_images(folder: Path, count: int, caption=None) -> None:
    """`count` 1024² images (hard links to one PNG: planning reads only their headers)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    first = folder / "0000.png"
    Image.new("RGB", (1024, 1024), (120, 110, 100)).save(first)
    for i in range(count):
        if i:
            os.link(first, folder / f"{i:04d}.png")
        if caption:
            (folder / f"{i:04d}.txt").write_text(caption.format(i=i))


def copy_study(study_dir: Path, tmp_path: Path) -> Path:
    """The study's spec files in a temp folder, where the test builds the user's data layout."""
    import shutil

    copy = tmp_path / study_dir.name
    shutil.copytree(study_dir, copy, ignore=shutil.ignore_patterns("tiny*"))
    return copy


def test_subject_lora_study_plans_the_write_ups_numbers(tmp_path, capsys):
    from farm.cli import main

    study = copy_study(ROOT / "jobs" / "subject-lora-study", tmp_path)
    placeholder_images(study / "data" / "img" / "9_w0ut3r man", 47, "w0ut3r, photo of a man, pose {i}")
    placeholder_images(study / "data" / "reg-photos" / "1_man", 500, "photo of a man, street {i}")
    assert main(["plan", str(study / "study.yaml"), "--out", str(tmp_path / "out")]) == 0  # no model here
    out = capsys.readouterr().out
    assert "14 training run(s)" in out and "not found: planned without it" in out
    v002 = next(line for line in out.splitlines() if line.strip().startswith("v002:"))
    assert "train images × repeats: 423" in v002
    assert "steps per epoch: 212; epochs: 10; max_train_steps: 2115" in v002
    assert "kohya_ss GUI estimate: 423 / 4 / 1 * 10 * 2 = 2115" in v002 and v002.endswith("checkpoints: 10")
    v001 = next(line for line in out.splitlines() if line.strip().startswith("v001:"))
    assert "steps per epoch: 106; epochs: 10; max_train_steps: 1060" in v001
    assert "evaluate sweep strength: 1400 cells" in out and "evaluate sweep prompts: 1680 cells" in out
    assert "evaluate: 3080 grid cells in all" in out
    assert "reg set detailed: 517 images to render" in out and "reg set simple: 500 images" in out


def test_anime_dreambooth_study_plans_the_write_ups_numbers(tmp_path, capsys):
    from farm.cli import main

    study = copy_study(ROOT / "jobs" / "anime-dreambooth-study", tmp_path)
    placeholder_images(study / "data" / "img", 15)
    placeholder_images(study / "data" / "reg", 2300)
    assert main(["plan", str(study / "study.yaml"), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    reg = next(line for line in out.splitlines() if line.strip().startswith("reg:"))
    assert "steps per epoch: 4500; epochs: 1; max_train_steps: 4500" in reg and reg.endswith("checkpoints: 5")
    noreg = next(line for line in out.splitlines() if line.strip().startswith("noreg:"))
    assert "steps per epoch: 15; epochs: 150; max_train_steps: 2250" in noreg and noreg.endswith("checkpoints: 5")
    # 10 checkpoints × 2 prompts (zipped with their seeds and CFG) × (no style + 3 styles)
    assert "evaluate: 80 cells" in out


@pytest.mark.slow
def test_subject_lora_study_runs_at_tiny_scale(farm_cache, tmp_path):
    import subprocess
    import sys

    # typed as people type it: a relative --out, from a folder that is neither the repo nor the spec's
    out = tmp_path / "study"
    # the demo's study with one sampling step per evaluation image (588 of them): same tables, half the time
    (tmp_path / "one-step.yaml").write_text("evaluate: {defaults: {steps: 1}}\n")
    command = [sys.executable, "-m", "farm.cli", "run", str(ROOT / "jobs/subject-lora-study/study.yaml"),
               "--scale", "tiny", "--override", "one-step.yaml", "--out", "study", "--gpus", "2", "--quiet",
               "--local"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    again = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    # resumed, it finds its checkpoints under the run folder (they were once looked up beside the
    # spec) and has nothing left to train or render
    assert again.returncode == 0, again.stderr[-3000:]
    assert "evaluation: 0 rendered, 0 failed" in again.stdout, again.stdout[-2000:]
    folder = RunFolder(out)
    assert len(folder.read_checkpoints()) == 28
    table = folder.read()
    assert table.num_rows == 280 + 336 - 28 and set(table["status"].to_pylist()) == {"ok"}
    reg_captions = [p.read_text() for p in (out / "reg" / "detailed" / "kohya" / "1_man").glob("*.txt")]
    assert reg_captions and all("w0ut3r" not in c for c in reg_captions)
    grid = subprocess.run([sys.executable, "-m", "farm.cli", "grid", str(out), "--rows", "lora", "--cols", "prompt"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert grid.returncode == 0, grid.stderr
    pages = sorted((out / "grids").glob("lora-x-prompt-*.png"))
    assert len(pages) == 1  # only the prompts table has both axes
    # judged as the demo judges it: the subject the study recorded, a tiny CLIP
    scored = subprocess.run([sys.executable, "-m", "farm.cli", "score", "study", "--clip", "tiny:clip"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert scored.returncode == 0, scored.stderr
    # the procedural subject has no face: said, not failed; CLIP still scores every image
    assert "no face found in any of the 4 subject photos" in scored.stdout and "588 images scored" in scored.stdout
    reported = subprocess.run([sys.executable, "-m", "farm.cli", "report", "study"], cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)
    assert reported.returncode == 0, reported.stderr
    assert "ranked by CLIP-I" in reported.stdout and "best: v0" in reported.stdout
    report = json.loads((out / "report" / "report.json").read_text())
    assert len(report["checkpoints"]) == 28 and {c["rank"] for c in report["checkpoints"]} == set(range(1, 29))
    assert all(c["loss_plot"] for c in report["checkpoints"])  # each run's loss curve beside its scores


@pytest.mark.slow
def test_anime_dreambooth_study_runs_at_tiny_scale(farm_cache, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "anime"
    command = [sys.executable, "-m", "farm.cli", "run", "jobs/anime-dreambooth-study/study.yaml", "--scale", "tiny",
               "--out", str(out), "--gpus", "2", "--quiet", "--no-dashboard", "--local"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    folder = RunFolder(out)
    labels = [r["label"] for r in folder.read_checkpoints()]
    assert labels == ["noreg epoch 2", "noreg epoch 4", "reg step 6", "reg step 12", "reg epoch 1"]
    table = folder.read().to_pylist()
    assert len(table) == 5 * 2 * 4  # checkpoints × prompts (zipped with seed and cfg) × styles
    styled = next(r for r in table if dict(r["axes"])["style"] == "watercolor")
    assert styled["prompt"].startswith("watercolor painting of ") and styled["sampler"] == "DPM++ 2M SDE Karras"
    assert {(r["seed"], r["cfg"]) for r in table} == {(1382869474, 9.0), (2811753849, 7.0)}
    pages = build_pages(folder, "model", "style", ["prompt"])
    # rows in the spec's variant order (reg, noreg), each run's checkpoints in the order written
    assert pages[0].row_labels == ["reg step 6", "reg step 12", "reg epoch 1", "noreg epoch 2", "noreg epoch 4"]
