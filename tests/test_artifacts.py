"""Paths from specs: resolved, kept inside the folders jobs may read, and never turned into
output names (those come from task ids), whatever a spec writes in names, labels and paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from farm.errors import FarmError
from farm.sweep.plan import plan_job
from farm.sweep.spec import parse_spec

PAYLOADS = [
    "../x", "../../etc/passwd", "/etc/passwd", "..", "../", "./../x", "a/../../x", "~/../../etc/passwd",
    "~root/.ssh/id_rsa", "%2e%2e/x", "..%2fx", "..\\..\\x", "....//x", "..;/x", "/proc/self/environ",
    "/dev/zero", "//etc/passwd", "x\x00.safetensors", "$HOME/x", "${HOME}/x", "`id`", "$(id)",
    "x; rm -rf /", "\n../x", "..\u2215x", "..\uff0fx", "con", "a" * 300, "/", "./",
    "x/../../../../../../etc/shadow", "/tmp/../etc/hosts", "link-out",
]


@pytest.fixture
def jobs_folder(tmp_path, monkeypatch, lora_dir):
    """A spec folder that is the only place jobs may read (plus the cache), with a symlink out."""
    folder = tmp_path / "jobs"
    folder.mkdir()
    (folder / "good.safetensors").write_bytes((lora_dir / "subject-000001.safetensors").read_bytes())
    os.symlink(tmp_path / "outside", folder / "link-out")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "x.safetensors").write_bytes(b"secret")
    monkeypatch.setenv("SDFARM_ROOTS", str(folder))
    return folder


def inside(path: str, roots: list[Path]) -> bool:
    resolved = Path(path).resolve()
    return any(resolved.is_relative_to(root) for root in roots)


@pytest.mark.parametrize("payload", PAYLOADS)
def test_a_path_payload_is_refused_or_stays_inside(payload, jobs_folder, farm_cache):
    from farm.models.artifacts import allowed_roots

    roots = allowed_roots(jobs_folder)
    for where in ("lora", "model", "styles"):
        spec = {"job": "x", "model": "tiny:sdxl", "defaults": {"prompt": "a"}, "axes": {"lora": ["good"]}}
        if where == "lora":
            spec["axes"] = {"lora": [{"file": payload}]}
        elif where == "model":
            spec["model"] = payload
        else:
            spec["styles"] = payload
            spec["axes"] = {"style": ["none"]}
        try:
            plan = plan_job(parse_spec(spec), jobs_folder)
        except FarmError as exc:
            assert "\n" not in str(exc).strip() or payload.startswith("\n")
            continue
        for task in plan.tasks:  # it planned: every file it will read is inside the allowed folders
            assert inside(task.model_path, roots) and all(inside(l.path, roots) for l in task.loras), where


def test_names_and_labels_never_become_paths(jobs_folder, tmp_path, ray_cluster, farm_cache):
    """Every payload as a prompt label and in a prompt: images and grids stay in the run folder."""
    from farm.cluster.dispatch import run_plan
    from farm.runs.grid import make_grids
    from farm.runs.manifest import RunFolder

    prompts = [{"positive": f"photo {p}", "label": p.replace("\x00", "") or "empty"} for p in PAYLOADS]
    spec = {"job": "labels", "model": "tiny:sdxl", "defaults": {"steps": 2, "width": 64, "height": 64},
            "axes": {"prompt": prompts, "lora": ["none", "good"]}}
    plan = plan_job(parse_spec(spec), jobs_folder)
    before = {p for p in tmp_path.rglob("*")}
    out = tmp_path / "out"
    run = RunFolder(out)
    run.save_run_info({"job": "labels", "spec": "x", "seeds": {}, "axes": plan.axis_labels})
    summary = run_plan(plan, run, quiet=True)
    assert summary.ok == len(plan.tasks)
    make_grids(out, "prompt", "lora")
    written = {p for p in tmp_path.rglob("*")} - before
    assert written and all(p.is_relative_to(out) for p in written), sorted(map(str, written - {out}))[:5]
    assert not any(p.is_symlink() for p in out.rglob("*"))
    names = {p.name for p in (out / "images").rglob("*.png")}
    assert names == {f"{t.task_id}.png" for t in plan.tasks}


def test_run_folders_the_farm_made_are_readable_wherever_they_are(jobs_folder, tmp_path):
    """Reg sets and checkpoints live in the run folder (`--out`), which may lie outside the
    allowed folders; a folder that merely looks like one (no manifest parts) is still refused."""
    from farm.models.artifacts import inside_roots

    made = tmp_path / "out"
    (made / "manifest").mkdir(parents=True)
    (made / "manifest" / "part-20261122T000000-abcd.parquet").write_bytes(b"")
    (made / "reg" / "detailed" / "kohya").mkdir(parents=True)
    assert inside_roots(made / "reg" / "detailed" / "kohya", jobs_folder) == (made / "reg" / "detailed" / "kohya")
    fake = tmp_path / "fake"
    (fake / "manifest").mkdir(parents=True)
    with pytest.raises(FarmError, match="outside the folders"):
        inside_roots(fake / "x", jobs_folder)
