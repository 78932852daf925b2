"""Paths from specs: resolved, kept inside the folders jobs may read, and never turned into
output names (those come from task ids), whatever a spec writes in names, labels and paths."""

from __future__ import annotations

import os
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from farm.errors import FarmError
from farm.sweep.plan import plan_job
from farm.sweep.spec import parse_spec
from test_hostile_data import _OPENED, _RECORDING  # the audit hook that sees every file opened

REPO = Path(__file__).resolve().parents[1]

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
    (tmp_path / "outside" / "x.csv").write_text("name,prompt,negative_prompt\nsecret,secret {prompt},\n")
    # the `link-out` payload as each kind of reference reads it: a LoRA name gets `.safetensors`
    os.symlink(tmp_path / "outside" / "x.safetensors", folder / "link-out.safetensors")
    monkeypatch.setenv("SDFARM_ROOTS", str(folder))
    return folder


def opened_outside(roots: list[Path]) -> list[str]:
    """Files the audit hook saw opened that resolve outside `roots` (Python's own files aside)."""
    python = [Path(p).resolve() for p in {sys.prefix, sys.base_prefix, sys.exec_prefix}]
    return [p for p in _OPENED if not any(Path(p).resolve().is_relative_to(r) for r in [*roots, *python])]


def plan_recording(spec: dict, folder: Path):
    """plan_job with the audit hook recording; (plan or None, error text or None)."""
    _OPENED.clear()
    _RECORDING[0] = True
    try:
        return plan_job(parse_spec(spec, "job.yaml"), folder, "job.yaml"), None
    except FarmError as exc:
        return None, str(exc)
    finally:
        _RECORDING[0] = False


def inside(path: str, roots: list[Path]) -> bool:
    resolved = Path(path).resolve()
    return any(resolved.is_relative_to(root) for root in roots)


FIELDS = {"lora": "axes.lora[0].file", "model": "model", "styles": "styles"}
# refusals that look at the name only, before any file system access
BY_NAME = ("not a LoRA file name", "not a usable path")


@pytest.mark.parametrize("payload", PAYLOADS)
def test_a_path_payload_is_refused_or_stays_inside(payload, jobs_folder, farm_cache):
    """Each payload as a LoRA file, a model and a styles file (looked up: style `*`): refused in
    one line naming the field and, when the path resolves outside the folders jobs may read
    (README: the spec's folder, the farm's cache, SDFARM_ROOTS), refused as such and not as a
    file that is missing or unreadable (which would mean it was looked at); never a file outside
    opened, whether planning fails or succeeds."""
    roots = [jobs_folder.resolve(), farm_cache.resolve()]
    plan_recording({"job": "w", "model": "tiny:sdxl", "defaults": {"prompt": "a"}, "axes": {"lora": ["good"]}},
                   jobs_folder)  # imports and caches warm: what is recorded below is the payload's doing
    assert _OPENED, "the audit hook recorded nothing: it would miss a read outside too"
    for where, suffix in (("lora", ".safetensors"), ("model", ""), ("styles", "")):
        spec = {"job": "x", "model": "tiny:sdxl", "defaults": {"prompt": "a"}, "axes": {"lora": ["good"]}}
        if where == "lora":
            spec["axes"] = {"lora": [{"file": payload}]}
        elif where == "model":
            spec["model"] = payload
        else:
            spec["styles"] = payload
            spec["axes"] = {"style": ["*"]}
        plan, error = plan_recording(spec, jobs_folder)
        assert not opened_outside(roots), (where, opened_outside(roots))
        if error is None:  # it planned: every file it will read is inside the allowed folders
            for task in plan.tasks:
                assert inside(task.model_path, roots) and all(inside(l.path, roots) for l in task.loras), where
            if where == "styles":
                assert _OPENED and all(inside(p, roots) for p in _OPENED), _OPENED
            continue
        assert error.startswith(f"job.yaml: {FIELDS[where]}: ") and "Traceback" not in error, (where, error)
        assert "\n" not in error.strip() or payload.startswith("\n"), error
        try:
            outside = not inside(str(jobs_folder / (payload + suffix)), roots)
        except (ValueError, OSError):  # not a path at all (NUL byte, too long): refused by name
            outside = False
        if outside:
            assert "resolves outside the folders jobs may read" in error or any(r in error for r in BY_NAME), (
                where, error)


def test_a_styles_path_outside_the_roots_is_refused_even_when_unused(jobs_folder, farm_cache):
    spec = {"job": "x", "model": "tiny:sdxl", "styles": "../outside/x.csv", "defaults": {"prompt": "a"},
            "axes": {"style": ["none"]}}
    plan, error = plan_recording(spec, jobs_folder)
    assert not opened_outside([jobs_folder.resolve(), farm_cache.resolve()])
    assert error is not None and error.startswith("job.yaml: styles: ") and "resolves outside" in error


def snapshot(folder: Path) -> dict:
    """Every entry under `folder` with what a write would change."""
    entries = {}
    for path in [folder, *folder.rglob("*")]:
        stat = path.lstat()
        entries[path] = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
    return entries


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
    # outside the test's temp folder: a canary folder beside it, the repo's jobs/ and top level,
    # and the home folder's and the root's top level (payloads name ~, $HOME, /, /etc, /tmp)
    canary = Path(tempfile.gettempdir()) / f"sdfarm-canary-{uuid.uuid4().hex[:8]}"
    (canary / "x").mkdir(parents=True)
    (canary / "x" / "x.png").write_bytes(b"canary")
    watched = {"canary": canary, "jobs": REPO / "jobs"}
    snapshots = {name: snapshot(folder) for name, folder in watched.items()}
    tops = {folder: set(os.listdir(folder)) for folder in (REPO, Path.home(), Path("/"))}
    etc = {p: os.lstat(p).st_mtime_ns for p in ("/etc/passwd", "/etc/hosts") if os.path.exists(p)}
    out = tmp_path / "out"
    run = RunFolder(out)
    run.save_run_info({"job": "labels", "spec": "x", "seeds": {}, "axes": plan.axis_labels})
    summary = run_plan(plan, run, quiet=True)
    assert summary.ok == len(plan.tasks)
    make_grids(out, "prompt", "lora")
    written = {p for p in tmp_path.rglob("*")} - before
    assert written and all(p.is_relative_to(out) for p in written), sorted(map(str, written - {out}))[:5]
    for name, folder in watched.items():
        assert snapshot(folder) == snapshots[name], f"something was written in {folder}"
    for folder, names in tops.items():  # new names there (others' files may come and go; ours never)
        assert not {n for n in set(os.listdir(folder)) - names if n in {"x", "etc", "con", "..", "out"}
                    or n.startswith(("photo", "$", "`", "x;", "aaaa"))}, folder
    assert {p: os.lstat(p).st_mtime_ns for p in etc} == etc
    import shutil

    shutil.rmtree(canary)
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
