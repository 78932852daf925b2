"""Scores, the scores dataset and the report, on a run folder whose images are real photographs.

The run folder is what a study leaves (manifest parts, training manifest, PNGs); its images are
faces from scikit-image's photographs instead of renders, so likeness and leakage have a known
answer: a variant whose subject prompts show the subject and whose class prompts show other
people is the one to pick; a variant whose class prompts show the subject leaks.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from farm.runs.manifest import SCHEMA, RunFolder, image_relpath
from farm.score.table import ScoreTable, scored_manifest

pytest.importorskip("dlib")
ROOT = Path(__file__).resolve().parent.parent
SUBJECT_PROMPT, CLASS_PROMPT = "photo of a ohwx woman, (smiling:1.2) <lora:x:1>", "photo of a woman"


def astronaut(shift: int = 0, flip: bool = False):
    from PIL import Image
    from skimage import data

    image = Image.fromarray(data.astronaut())
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if shift:
        image = Image.fromarray(np.roll(np.asarray(image), shift, axis=(0, 1)))
    return image


def stranger(index: int):
    """A face of LFW (a real photograph, 25 px) scaled to 256 px (dlib finds none in faces 4 and 9)."""
    from PIL import Image
    from skimage import data

    face = (data.lfw_subset()[index] * 255).astype(np.uint8)
    return Image.fromarray(face).resize((256, 256), Image.Resampling.BICUBIC).convert("RGB")


def manifest_row(task_id: str, prompt: str, lora: str, lora_sha: str, strength: float, order: int, png: bytes):
    row = {name: None for name in SCHEMA.names}
    now = datetime.now(timezone.utc)
    row.update(task_id=task_id, job="faces", status="ok", prompt=prompt, negative_prompt="", seed=order, steps=1,
               cfg=5.0, sampler="euler", width=512, height=512, model="m", model_sha256="0" * 64, lora=lora,
               lora_sha256=lora_sha, lora_strength=strength, loras=[], axes=[("lora", lora or "none")],
               cells=[[("lora", lora or "none")]], order=order, image_path=image_relpath(task_id),
               image_sha256=hashlib.sha256(png).hexdigest(), started_at=now, finished_at=now, prompt_syntax="a1111")
    return row


@pytest.fixture(scope="module")
def faces_run(tmp_path_factory):
    """Three variants, one epoch each, plus no-LoRA baseline images:
    good  — subject prompts: the subject (flipped, shifted); class prompts: strangers
    leaky — subject prompts: the subject; class prompts: the subject too
    weak  — subject prompts: strangers; class prompts: strangers"""
    import io

    root = tmp_path_factory.mktemp("faces-run")
    photos = root / "data" / "img" / "4_ohwx woman"
    photos.mkdir(parents=True)
    for index, image in enumerate([astronaut(), astronaut(shift=12), astronaut(shift=-20)]):
        image.save(photos / f"{index:03d}.png")
    run = RunFolder(root / "run")
    plan = {"good": ([astronaut(flip=True), astronaut(shift=30, flip=True)], [stranger(1), stranger(2)]),
            "leaky": ([astronaut(shift=25), astronaut(flip=True)], [astronaut(shift=-15), astronaut(shift=40)]),
            "weak": ([stranger(3), stranger(0)], [stranger(5), stranger(6)]),
            "": ([], [stranger(7), stranger(8)])}
    rows, order = [], 0
    for variant, (subject_images, class_images) in plan.items():
        sha = hashlib.sha256(variant.encode()).hexdigest() if variant else ""
        if variant:
            lora = run.train_dir / variant / f"{variant}-000001.safetensors"
            lora.parent.mkdir(parents=True)
            lora.write_bytes(variant.encode())
            run.add_checkpoint(SimpleNamespace(run=variant, path=str(lora), epoch=1, step=10, final=True, sha256=sha,
                                               label=f"{variant} epoch 1", node="n"))
        for prompt, images in ((SUBJECT_PROMPT, subject_images), (CLASS_PROMPT, class_images)):
            for image in images:
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
                task_id = hashlib.sha256(f"{variant}{order}".encode()).hexdigest()
                (run.root / image_relpath(task_id)).parent.mkdir(parents=True, exist_ok=True)
                (run.root / image_relpath(task_id)).write_bytes(buffer.getvalue())
                rows.append(manifest_row(task_id, prompt, variant, sha, 1.0 if variant else 0.0, order,
                                         buffer.getvalue()))
                order += 1
    run.write_part(rows)
    return SimpleNamespace(run=run, photos=photos, rows=rows)


def farm(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "farm.cli", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def test_likeness_and_leakage_pick_the_variant_that_looks_like_the_subject_and_does_not_leak(faces_run):
    from farm.score.report import build_report
    from farm.score.scorer import Subject, score_run

    subject = Subject(tuple(sorted(str(p) for p in faces_run.photos.glob("*.png"))), "ohwx", "woman")
    assert score_run(faces_run.run, subject)[:2] == (14, 0)
    table = {r["task_id"]: r for r in scored_manifest(faces_run.run).to_pylist()}
    assert all(r["score_faces"] >= 1 for r in table.values()), "every image here shows a face"
    by_prompt = {(r["lora"], r["score_subject_prompt"]): [] for r in table.values()}
    for r in table.values():
        by_prompt[(r["lora"], r["score_subject_prompt"])].append(r["score_face_distance"])
    # the subject's own photo, moved or mirrored, is the same person; strangers are not
    assert max(by_prompt[("good", True)] + by_prompt[("leaky", False)]) < 0.6
    assert min(by_prompt[("weak", True)] + by_prompt[("good", False)] + by_prompt[("", False)]) > 0.6
    assert all(r["score_clip_t"] is None for r in table.values())  # no CLIP model: not measured

    report = build_report(faces_run.run)
    ranks = {c["variant"]: c for c in report["checkpoints"]}
    assert ranks["good"]["rank"] == 1 and report["best"]["variant"] == "good"
    assert not ranks["leaky"]["eligible"] and ranks["leaky"]["rank"] is None
    assert "leaks" in ranks["leaky"]["notes"][0]
    assert ranks["weak"]["rank"] == 2
    assert report["baseline"]["leakage"]["n"] == 2 and "no-LoRA baseline" in report["rule"]


def test_scoring_again_scores_only_what_is_new_or_changed(faces_run, tmp_path):
    import shutil

    from farm.score.scorer import Subject, score_run

    run = RunFolder(tmp_path / "copy")
    shutil.copytree(faces_run.run.root, run.root)
    shutil.rmtree(run.root / "scores", ignore_errors=True)
    subject = Subject(tuple(str(p) for p in sorted(faces_run.photos.glob("*.png"))[:2]), "ohwx", "woman")
    assert score_run(run, subject)[:2] == (14, 0)
    assert score_run(run, subject)[:2] == (0, 14)
    # an image rendered again (a new row with another hash) is scored again; its old score is not shown
    row = dict(faces_run.rows[0])
    png = (run.root / row["image_path"]).read_bytes() + b"\0"
    (run.root / row["image_path"]).write_bytes(png)
    row.update(image_sha256=hashlib.sha256(png).hexdigest(), finished_at=datetime.now(timezone.utc))
    run.write_part([row])
    stale = {r["task_id"]: r for r in scored_manifest(run).to_pylist()}[row["task_id"]]
    assert stale["score_faces"] is None
    assert score_run(run, subject)[:2] == (1, 13)
    # another reference (one photo more) scores everything again; parts only ever add rows
    parts = len(list((run.root / "scores").glob("part-*.parquet")))
    wider = Subject(tuple(str(p) for p in sorted(faces_run.photos.glob("*.png"))), "ohwx", "woman")
    assert score_run(run, wider)[:2] == (14, 0)
    assert len(list((run.root / "scores").glob("part-*.parquet"))) > parts
    assert set(ScoreTable(run).read()["reference"].to_pylist()) == {ScoreTable(run).read()["reference"][0].as_py()}


def test_farm_score_and_report_from_the_command_line(faces_run, tmp_path):
    import json
    import shutil

    run = tmp_path / "cli-run"
    shutil.copytree(faces_run.run.root, run)
    shutil.rmtree(run / "scores", ignore_errors=True)
    missing = farm("score", run)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "--photos" in missing.stderr
    scored = farm("score", run, "--photos", faces_run.photos.parent, "--clip", "tiny:clip")
    assert scored.returncode == 0, scored.stderr
    assert "14 images scored" in scored.stdout and "token 'ohwx', class 'woman'" in scored.stdout
    table = scored_manifest(RunFolder(run)).to_pylist()
    assert all(-1 <= r["score_clip_t"] <= 1 and -1 <= r["score_clip_i"] <= 1 for r in table)
    reported = farm("report", run)
    assert reported.returncode == 0, reported.stderr
    assert "best: good epoch 1 (variant good)" in reported.stdout
    report = json.loads((run / "report" / "report.json").read_text())
    for name in report["plots"].values():
        assert (run / "report" / name).stat().st_size > 1000
    assert set(report["plots"]) == {"likeness", "clip_t", "scatter"}
    markdown = (run / "report" / "report.md").read_text()
    assert "**Best:** good epoch 1" in markdown and "| 1 | good epoch 1 |" in markdown
    not_a_run = farm("report", tmp_path)
    assert not_a_run.returncode == 2 and "no manifest there" in not_a_run.stderr


def test_a_subject_without_faces_still_gets_clip_scores_and_says_likeness_is_not_measured(faces_run, tmp_path):
    from PIL import Image

    from farm.models.tiny import TINY_CLIP, resolve_tiny
    from farm.score.report import build_report
    from farm.score.scorer import Subject, score_run

    import shutil

    run = RunFolder(tmp_path / "copy")
    shutil.copytree(faces_run.run.root, run.root)
    blank = tmp_path / "img" / "2_sks thing"
    blank.mkdir(parents=True)
    for index in range(2):
        Image.new("RGB", (128, 128), (40 * index, 90, 160)).save(blank / f"{index}.png")
    subject = Subject(tuple(str(p) for p in sorted(blank.glob("*.png"))), "ohwx", "woman")
    scored, _, warnings = score_run(run, subject, str(resolve_tiny(TINY_CLIP)))
    assert scored == 14 and "no face found" in warnings[0] and "not measured" in warnings[0]
    table = scored_manifest(run).to_pylist()
    assert all(r["score_faces"] >= 1 and r["score_face_distance"] is None for r in table)  # counted, not compared
    assert all(r["score_clip_i"] is not None for r in table)
    report = build_report(run)
    assert report["checkpoints"][0]["likeness"]["n"] == 0
    assert "not measured" in report["rule"] and "CLIP-I" in report["rule"]
    assert report["best"] is not None


def test_scoring_on_the_cluster_workers_gives_the_in_process_scores(faces_run, ray_cluster, tmp_path):
    """Two GPU workers score the run in batches (the images' bytes sent to them, the subject
    photos put in the object store once): the same numbers as scoring in this process."""
    import shutil

    from farm.cluster.scoring import score_on_cluster
    from farm.models.tiny import TINY_CLIP
    from farm.score.scorer import Subject, score_run

    subject = Subject(tuple(str(p) for p in sorted(faces_run.photos.glob("*.png"))), "ohwx", "woman")
    runs = {}
    for name in ("here", "cluster"):
        runs[name] = RunFolder(tmp_path / name)
        shutil.copytree(faces_run.run.root, runs[name].root)
        shutil.rmtree(runs[name].root / "scores", ignore_errors=True)
    assert score_run(runs["here"], subject, TINY_CLIP)[:2] == (14, 0)
    assert score_on_cluster(runs["cluster"], subject, TINY_CLIP, batch=4)[:2] == (14, 0)
    assert score_on_cluster(runs["cluster"], subject, TINY_CLIP)[:2] == (0, 14)  # nothing left: no worker started
    here = {r["task_id"]: r for r in ScoreTable(runs["here"]).read().to_pylist()}
    there = ScoreTable(runs["cluster"]).read().to_pylist()
    assert {r["worker"].split("@")[0] for r in there} == {"worker:gpu0", "worker:gpu1"}  # both workers scored
    for row in there:
        mine = here[row["task_id"]]
        assert row["reference"] == mine["reference"] and row["faces"] == mine["faces"]
        for key in ("face_distance", "face_distance_nearest", "clip_t", "clip_i"):
            assert row[key] == pytest.approx(mine[key], abs=1e-5), key


def test_the_scores_columns_are_the_ones_the_readme_lists():
    import re

    from farm.score.table import SCORE_SCHEMA

    text = (ROOT / "README.md").read_text()
    paragraph = text[text.index("- **Where scores live**"):text.index("- **On the cluster**")]
    listed = re.findall(r"`(\w+)`", paragraph[paragraph.index("one row per"):paragraph.index("Scoring again")])
    assert listed == SCORE_SCHEMA.names
