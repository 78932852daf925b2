"""The farm as a cluster service, on a real 2-node Ray cluster on this box (head + a second
raylet, one logical GPU each, token auth on, dashboard on 127.0.0.1): jobs go in through the Ray
Jobs API with `farm submit`, share one warm pool, and their images land on the head."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import signal
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import pytest

from farm.cluster.dispatch import BLOCK_AFTER
from farm.runs.manifest import RunFolder

from local_cluster import assert_exactly_once, local_cluster, processes_running, scrape_metrics, worker_nodes

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def service(farm_cache, tiny_model):
    with local_cluster(farm_cache, "sdfarm-svc-") as cluster:
        cluster.start_head(gpus=1, cpus=2)
        # the second node sees one folder of the head's as shared (SDFARM_SHARED_ROOTS); only
        # test_a_lora_under_a_shared_root_... puts files there, every other LoRA is fetched
        shared = cluster.root / "shared"
        shared.mkdir()
        cluster.add_node(gpus=1, cpus=1, env={"SDFARM_SHARED_ROOTS": str(shared)})
        yield cluster


def write_job(folder, name: str, loras: list, seeds: int, first_seed: int = 1, steps: int = 2,
              model: str = "tiny:sdxl", prompt: str = "photo of a w0ut3r man", **more):
    spec = {"job": name, "model": model,
            "defaults": {"prompt": prompt, "steps": steps, "width": 64, "height": 64, "cfg": 5},
            "axes": {"lora": [{"file": str(path)} for path in loras] or ["none"],
                     "seed": list(range(first_seed, first_seed + seeds))}, **more}
    path = folder / f"{name}.yaml"
    path.write_text(json.dumps(spec))  # JSON is YAML
    return path


def submit(service, spec, *extra) -> str:
    done = service.farm("submit", str(spec), *extra)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def status(service, job_id) -> str:
    from ray.job_submission import JobSubmissionClient

    return str(JobSubmissionClient(service.dashboard, headers=auth(service)).get_job_status(job_id))


def auth(service) -> dict:
    return {"Authorization": f"Bearer {service.token}"}


def wait_done(service, job_id, timeout=240) -> str:
    return service.wait_for(lambda: (s := status(service, job_id)) in ("SUCCEEDED", "FAILED", "STOPPED") and s,
                            timeout=timeout, what=f"{job_id} to end")


def pool(service) -> dict:
    done = service.farm("pool", "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def images(service, name) -> list:
    folder = service.root / "runs" / name / "images"
    return sorted(folder.rglob("*.png")) if folder.exists() else []


def rows(service, name) -> list[dict]:
    return RunFolder(service.root / "runs" / name).read().to_pylist()


def once(service, name, tasks, failed_first: bool = False) -> list[dict]:
    """The job's raw manifest parts hold exactly one `ok` row for each of its `tasks` (a count)."""
    return assert_exactly_once(service.root / "runs" / name, tasks, failed_first)


@pytest.fixture(scope="module")
def warm_a(service, lora_dir, tmp_path_factory) -> dict:
    """The module's first job (24 images over 2 LoRAs): it starts the shared pool. Tests that
    need a warm pool or a finished job's metrics ask for it, so that each also runs alone."""
    loras = sorted(lora_dir.glob("*.safetensors"))[:2]
    job = submit(service, write_job(tmp_path_factory.mktemp("warm"), "warm-a", loras, 12))
    assert wait_done(service, job) == "SUCCEEDED", service.farm("logs", job).stdout[-3000:]
    return {"job": job, "loras": loras, "workers": pool(service)["workers"]}


def test_jobs_share_one_warm_pool_across_nodes_and_land_on_the_head(service, warm_a, tmp_path):
    loras, after_first = warm_a["loras"], warm_a["workers"]
    assert len(after_first) == 2
    assert len({w["node_id"] for w in after_first.values()}) == 2, "one worker per GPU, on both nodes"
    assert all(w["rendered"] > 0 for w in after_first.values()), "both nodes rendered"

    # every image is on the head, in the job's run folder, with the bytes its row names; the rows
    # say both nodes rendered
    table = once(service, "warm-a", 24)
    assert worker_nodes(table) == {service.node_id("head"), service.node_id("node1")}
    for row in table:
        data = (service.root / "runs" / "warm-a" / row["image_path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == row["image_sha256"]

    # the LoRAs exist only on the head: the other node's worker fetched them by hash
    node = service.nodes[1]
    copies = sorted(node["cache"].glob("*.safetensors"))
    wanted = {hashlib.sha256(p.read_bytes()).hexdigest() for p in loras}
    assert copies, "the second node rendered a LoRA without a copy of its own"
    for copy in copies:  # named by the sha256 of the bytes they hold, which are the head's
        assert copy.name.split(".")[0] == hashlib.sha256(copy.read_bytes()).hexdigest()
        assert copy.name.split(".")[0] in wanted
    assert sum(w["fetched"] for w in after_first.values()) == len(copies)

    second = submit(service, write_job(tmp_path, "warm-b", loras, 6, first_seed=100))
    assert wait_done(service, second) == "SUCCEEDED"
    after_second = pool(service)["workers"]
    for name, worker in after_second.items():
        assert worker["pipeline_loads"] == 1, f"{name} loaded its pipeline again"
        assert worker["fetched"] == after_first[name]["fetched"], "cached copies are reused"
    assert sum(w["rendered"] for w in after_second.values()) == 24 + 12
    once(service, "warm-b", 12)

    listing = service.farm("jobs")
    assert listing.returncode == 0
    line = next(l for l in listing.stdout.splitlines() if l.startswith(second))
    assert "SUCCEEDED" in line and "12/12 done" in line


def test_recycle_after_replaces_pool_workers_by_fresh_processes(service, warm_a, tmp_path):
    before = pool(service)["workers"]
    assert len(before) == 2
    job = submit(service, write_job(tmp_path, "recycled", warm_a["loras"], 8), "--recycle-after", "4", "--chunk", "2")
    assert wait_done(service, job) == "SUCCEEDED", service.farm("logs", job).stdout[-3000:]
    once(service, "recycled", 16)
    after = pool(service)["workers"]
    assert set(after) == set(before), "the pool keeps its workers' names"
    assert all(after[name]["pid"] != before[name]["pid"] for name in after), "each worker was replaced"
    assert all(w["rendered"] <= 4 for w in after.values()), "a worker process rendered more than 4"
    assert all(w["pipeline_loads"] <= 1 for w in after.values())


def test_higher_priority_job_takes_the_pool_first(service, lora_dir, tmp_path):
    loras = sorted(lora_dir.glob("*.safetensors"))[:2]
    # 2 × 400 images: far more than renders before it is cancelled, however fast the machine
    low = submit(service, write_job(tmp_path, "prio-low", loras, 400, steps=8), "--priority", "0",
                 "--dtype", "fp32", "--vae-tiling", "--cpu-offload", "none")
    from ray.job_submission import JobSubmissionClient

    entrypoint = JobSubmissionClient(service.dashboard, headers=auth(service)).get_job_info(low).entrypoint
    assert "--dtype fp32" in entrypoint and "--vae-tiling" in entrypoint and "--cpu-offload none" in entrypoint
    service.wait_for(lambda: len(images(service, "prio-low")) >= 8, what="the low job to render")
    high = submit(service, write_job(tmp_path, "prio-high", loras, 24, first_seed=500, steps=8), "--priority", "5")
    assert wait_done(service, high) == "SUCCEEDED"
    # the low job gets the pool back: it renders on; then it is cancelled (the rest would prove nothing)
    after_high = len(images(service, "prio-low"))
    service.wait_for(lambda: len(images(service, "prio-low")) >= after_high + 4, what="the low job to render again")
    assert service.farm("cancel", low).returncode == 0
    assert wait_done(service, low, timeout=60) == "STOPPED"
    high_rows = once(service, "prio-high", 48)
    low_rows = once(service, "prio-low", None)
    assert {r["task_id"] for r in low_rows} <= {p.stem for p in images(service, "prio-low")}
    assert 0 < len(low_rows) < 800, "the low job finished before it was cancelled: make it longer"
    begin = min(r["started_at"] for r in high_rows)
    end = max(r["started_at"] for r in high_rows)
    low_during = [r for r in low_rows if begin < r["started_at"] < end]
    # FIFO sharing would render about as many low as high images meanwhile; with priority only
    # the chunks the low job had queued, and at most one lease renewal's worth, overlap
    assert len(low_during) < len(high_rows) / 2, f"{len(low_during)} low-priority renders ran during the high job"


def test_pause_resume_cancel_and_resubmit(service, lora_dir, tmp_path):
    loras = sorted(lora_dir.glob("*.safetensors"))[:2]
    total = 400  # 200 seeds x 2 LoRAs: still running when cancelled (300 once finished first under load)
    # (8 steps: the pause control job takes ~13 s to reach the keeper under load; at 4 steps the
    # job could finish first)
    job = submit(service, write_job(tmp_path, "ctl", loras, total // 2, steps=8))
    service.wait_for(lambda: len(images(service, "ctl")) >= 4, what="the job to render")
    paused = service.farm("pause", job)
    assert paused.returncode == 0, paused.stderr

    def given_back(state: dict) -> bool:  # the keeper has it paused, and its leases are all back
        return state["jobs"].get(job, {}).get("paused") and all(w["held_by"] != job for w in state["workers"].values())

    # its leases (5 s) run out and its queued chunks finish: then it holds no worker, and every
    # image it rendered is written (a worker goes back only once its results are in)
    service.wait_for(lambda: given_back(pool(service)), timeout=60, every=1, what="the paused job's workers to go back")
    held = len(images(service, "ctl"))
    # the pool is free: another job takes it, and renders all of its images, while the paused one waits
    other = submit(service, write_job(tmp_path, "ctl-other", loras[:1], 6, first_seed=900))
    assert wait_done(service, other) == "SUCCEEDED", service.farm("logs", other).stdout[-3000:]
    once(service, "ctl-other", 6)
    assert len(images(service, "ctl")) == held, "a paused job went on rendering"
    assert given_back(pool(service)) and status(service, job) == "RUNNING"
    service.wait_for(lambda: "(paused)" in next(l for l in service.farm("jobs").stdout.splitlines()
                                                if l.startswith(job)), timeout=30, what="`farm jobs` to say paused")

    assert service.farm("resume", job).returncode == 0
    service.wait_for(lambda: len(images(service, "ctl")) > held, what="the resumed job to render")
    cancelled = service.farm("cancel", job)
    assert cancelled.returncode == 0, cancelled.stderr
    assert wait_done(service, job, timeout=60) == "STOPPED"

    before = {r["task_id"]: r["image_sha256"] for r in rows(service, "ctl")}
    assert 0 < len(before) < total
    run = service.root / "runs" / "ctl"
    assert not [p for p in run.rglob("*") if p.name.startswith(".")], "temp files left behind"
    for task_id, sha in before.items():  # every row that was committed has its image
        assert any(hashlib.sha256(p.read_bytes()).hexdigest() == sha for p in run.rglob(f"{task_id}*.png"))

    resumed = service.farm("resume", job)
    assert resumed.returncode == 0, resumed.stderr
    again = resumed.stdout.strip().splitlines()[-1]
    assert again != job
    # the resubmitted driver renders what is missing: once it has rendered a few, stop it too (its
    # finishing the whole job proves nothing the resume tests elsewhere do not, and costs minutes)
    service.wait_for(lambda: len(rows(service, "ctl")) >= len(before) + 8, what="the resubmitted job to render")
    assert service.farm("cancel", again).returncode == 0
    assert wait_done(service, again, timeout=60) == "STOPPED"
    after = once(service, "ctl", None)  # in the raw parts: no task rendered twice across the three drivers
    assert len(before) + 8 <= len(after) < total
    assert {r["task_id"]: r["image_sha256"] for r in after if r["task_id"] in before} == before


def test_the_pool_follows_nodes_leaving_and_joining_mid_job(service, lora_dir, tmp_path):
    loras = sorted(lora_dir.glob("*.safetensors"))[:2]
    service.add_node(gpus=1, cpus=1, name="extra")
    try:
        job = submit(service, write_job(tmp_path, "churn", loras, 100, steps=6))
        service.wait_for(lambda: len(images(service, "churn")) >= 20, what="the job to render")
        service.remove_node("extra")  # the laptop's lid closes mid-job
        service.add_node(gpus=1, cpus=1, name="late")
        assert wait_done(service, job, timeout=300) == "SUCCEEDED", service.farm("logs", job).stdout[-3000:]
        workers = service.wait_for(lambda: w if len(w := pool(service)["workers"]) == 3 else None, timeout=60,
                                   what="the pool to forget the node that left")
    finally:  # the module's later tests see its two nodes again
        for name in ("extra", "late"):
            service.remove_node(name)
    assert {w["node_id"][:8] for w in workers.values()} == {service.node_id(n) for n in ("head", "node1", "late")}
    assert all("error" not in w for w in workers.values()), workers

    table = once(service, "churn", 200)
    nodes = worker_nodes(table)
    assert service.node_id("late") in nodes, "the node that joined mid-job rendered nothing"
    assert service.node_id("head") in nodes
    assert nodes <= {service.node_id(n) for n in ("head", "node1", "extra", "late")}
    run = service.root / "runs" / "churn"
    for row in table:
        assert hashlib.sha256((run / row["image_path"]).read_bytes()).hexdigest() == row["image_sha256"]
    assert not [p for p in run.rglob("*") if p.name.startswith(".")], "temp files left behind"


def test_a_training_job_trains_on_the_head_while_the_other_node_evaluates(service):
    from farm.sweep.spec import load_spec

    spec = Path(__file__).resolve().parent.parent / "jobs" / "demo-study.yaml"
    study = load_spec(str(spec), [])
    job = submit(service, spec)
    assert wait_done(service, job, timeout=400) == "SUCCEEDED", service.farm("logs", job).stdout[-3000:]
    run = RunFolder(service.root / "runs" / study.job)
    checkpoints = run.read_checkpoints()
    assert len(checkpoints) == 4 and all((run.root / c["path"]).is_file() for c in checkpoints)
    head, other = service.node_id("head"), service.node_id("node1")
    assert {c["node"].rsplit("/", 1)[1] for c in checkpoints} == {head}, "a run trained off the head"
    table = once(service, study.job, 4 * 3)  # every checkpoint × 3 prompts
    nodes = worker_nodes(table)
    assert other in nodes and nodes <= {head, other}, nodes
    # the other node evaluated while the head trained: its first render began before the last checkpoint
    last_checkpoint = max(c["finished_at"] for c in checkpoints)
    assert min(r["started_at"] for r in table if r["worker"].endswith(other)) < last_checkpoint
    # a worker busy loading or recycling answers the keeper late: ask until every one has answered
    workers = service.wait_for(lambda: (w := pool(service)["workers"]) and all("node_id" in v for v in w.values())
                               and w, timeout=60, every=1, what="every pool worker to answer")
    trained = {w["node_id"][:8]: w["trained"] for w in workers.values()}
    assert trained == {head: 2, other: 0}, f"both runs train on the head's one GPU: {trained}"


def test_the_jobs_api_refuses_requests_without_the_token(service):
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{service.dashboard}/api/jobs/", timeout=10)
    assert refused.value.code in (401, 403)
    request = urllib.request.Request(f"{service.dashboard}/api/jobs/", headers=auth(service))
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert answer.status == 200


def test_metrics_reach_the_dashboards_metrics_endpoint(service, warm_a, tmp_path):
    """While a job runs, its images (from the pool's workers) and its queue depth (from its driver)
    are on the head's metrics port. The job is this test's own: a finished job's driver takes its
    series with it, and recycled workers theirs. The job is cancelled once seen: it is large enough to
    outlive the few seconds a gauge takes to reach the export on a fast machine."""
    job = submit(service, write_job(tmp_path, "metered", warm_a["loras"], 300, first_seed=4000))

    def scrape():
        text = scrape_metrics(service.metrics_port)
        lines = text.splitlines()
        rendered = [l for l in lines if l.startswith("ray_sdfarm_images_rendered") and 'job="metered"' in l
                    and 'status="ok"' in l and not l.rstrip().endswith(" 0.0")]
        depth = [l for l in lines if l.startswith("ray_sdfarm_queue_depth") and 'job="metered"' in l]
        return text if rendered and depth else ""

    try:
        text = service.wait_for(scrape, timeout=120, every=2, what="the job's metrics on the head's metrics port")
    finally:
        service.farm("cancel", job)
    assert any(l.startswith("ray_sdfarm_image_seconds_bucket") for l in text.splitlines())


def test_a_job_no_pool_worker_may_serve_fails_fast_and_resumes_on_a_good_node(farm_cache, tiny_model, lora_dir,
                                                                             tmp_path):
    """A cluster whose only GPU fails every render (a broken card): the job's tasks fail there
    3 times, the worker is blocklisted for the job, and with no eligible worker left the job
    ends with that message instead of waiting. A good node joins; the resumed job finishes there
    while the bad worker stays blocklisted. The head was started without the farm's venv on PATH
    (no `python` there has the farm): the jobs' entrypoints still find the head's farm install."""
    with local_cluster(farm_cache, "sdfarm-bad-") as cluster:
        cluster.start_head(gpus=1, cpus=2, env={"SDFARM_FAULT": "render", "PATH": "/usr/bin:/bin"})
        loras = sorted(lora_dir.glob("*.safetensors"))[:1]
        job = submit(cluster, write_job(tmp_path, "broken", loras, 8))
        assert wait_done(cluster, job, timeout=240) == "FAILED"
        logs = cluster.farm("logs", job).stdout
        assert "no eligible worker left" in logs, logs[-3000:]
        table = rows(cluster, "broken")
        assert {r["status"] for r in table} == {"failed"} and len(table) == 8
        assert all("no eligible worker left" in r["error"] for r in table), {r["error"] for r in table}
        assert not images(cluster, "broken")
        # it failed fast: the broken worker was tried on each task at most once (two chunks of 4 in
        # flight when it was blocklisted), never again
        (broken,) = pool(cluster)["workers"].values()
        assert BLOCK_AFTER <= broken["failed"] <= 8 and broken["rendered"] == 0, broken

        cluster.add_node(gpus=1, cpus=1, name="good")
        again = cluster.farm("resume", job).stdout.strip().splitlines()[-1]
        assert wait_done(cluster, again) == "SUCCEEDED", cluster.farm("logs", again).stdout[-3000:]
        ok = once(cluster, "broken", 8, failed_first=True)
        assert worker_nodes(ok) == {cluster.node_id("good")}
        workers = list(pool(cluster)["workers"].values())
        bad = [w for w in workers if w["failed"]]
        assert len(workers) == 2 and len(bad) == 1 and bad[0]["rendered"] == 0, workers
        assert sum(w["rendered"] for w in workers) == 8


# README, "How jobs share the pool": "A driver killed outright loses its workers after 30 s of silence"
SILENCE_S = 30


def test_a_driver_killed_outright_loses_its_workers_after_30_s_of_silence(service, warm_a, tmp_path):
    """kill -9 a job's driver while it holds the whole pool and another job waits: the keeper
    keeps the dead job's workers from the waiting one until the driver has been silent for 30 s
    (its leases are only 5 s), then lends them on. The heir is waiting at the keeper before the
    kill, so how long its driver takes to start does not count."""
    loras = warm_a["loras"]
    # far more images than the pool renders while the heir's driver starts on a loaded machine
    doomed = submit(service, write_job(tmp_path, "doomed", loras, 1000, steps=8), "--priority", "5", "--chunk", "1")
    service.wait_for(lambda: len(images(service, "doomed")) >= 2, what="the doomed job to render")
    heir = submit(service, write_job(tmp_path, "heir", loras[:1], 2, first_seed=3000))  # priority 0: it waits
    waiting = service.wait_for(lambda: s if heir in (s := pool(service))["jobs"] or images(service, "heir") else None,
                               timeout=120, what="the heir to ask the keeper for workers")
    assert not images(service, "heir"), "the waiting job rendered while the higher-priority job held the pool"
    assert waiting["jobs"][heir]["waiting_for"] > 0 and doomed in waiting["jobs"], waiting["jobs"]
    drivers = processes_running("farm.cli", "--job-key", doomed)
    assert drivers, "the doomed job's driver process was not found"
    for pid in drivers:
        os.kill(pid, signal.SIGKILL)
    killed = time.time()

    # while the dead driver is silent, the waiting job gets nothing: the keeper still lends both workers to it
    state = pool(service)
    assert [w["held_by"] for w in state["workers"].values()] == [doomed, doomed], state["workers"]

    assert wait_done(service, heir, timeout=SILENCE_S + 120) == "SUCCEEDED", service.farm("logs", heir).stdout[-3000:]
    first_render = min(r["started_at"] for r in once(service, "heir", 2))
    silent = (first_render - datetime.fromtimestamp(killed, timezone.utc)).total_seconds()
    # the driver last reported at most ~3 s before it died; the keeper looks every 2 s
    assert SILENCE_S - 5 <= silent <= SILENCE_S + 20, f"the waiting job got the workers {silent:.1f} s after the kill"
    assert wait_done(service, doomed, timeout=60) == "FAILED"


def test_a_job_whose_model_is_on_no_node_fails_with_one_line_and_renders_nothing(service, tmp_path):
    """The driver plans with the model (on the head), but no node has it when the job checks
    (as when the head renders nothing and only it has the file): the job ends with one line
    naming the model and the nodes, and renders nothing."""
    ghost = tmp_path / "models" / "ghost.safetensors"  # outside the spec's folder: not sent with the job
    ghost.parent.mkdir()
    ghost.write_bytes(b"planning only hashes a model")
    job = submit(service, write_job(tmp_path, "ghost", [], 4, model=str(ghost)))
    run = service.root / "runs" / "ghost"
    service.wait_for(lambda: (run / "run.json").is_file(), timeout=120, every=0.01, what="the job to be planned")
    ghost.unlink()  # gone from every node (they all share this box's disk) before the driver asks them
    assert wait_done(service, job, timeout=120) == "FAILED"
    logs = service.farm("logs", job).stdout
    errors = [line for line in logs.splitlines() if line.startswith("farm: error:")]
    assert len(errors) == 1 and "Traceback" not in logs, logs[-3000:]
    nodes = re.fullmatch(rf"farm: error: {re.escape(str(ghost))}: model is on none of the cluster's nodes "
                         r"\(([0-9a-f]{8}), ([0-9a-f]{8})\); put it at that path on the node that plans the job "
                         r"\(it sends it to the others\)",
                         errors[0])
    assert nodes, f"job lost the race with the test (it checked before the model was removed) or: {errors[0]}"
    assert set(nodes.groups()) == {service.node_id("head"), service.node_id("node1")}
    assert not images(service, "ghost") and not list(RunFolder(run).parts()), "the job rendered something"


def test_a_lora_under_a_shared_root_is_read_in_place_on_the_other_node(service, tmp_path):
    """The second node lists a folder in SDFARM_SHARED_ROOTS. Every image applies two LoRAs, one
    in that folder and one outside it: the second node renders with the shared one read where it
    is and a fetched, checked copy of the other."""
    from farm.models.tiny import save_tiny_lora

    node = next(n for n in service.nodes if n["name"] == "node1")
    shared_root = Path(node["env"]["SDFARM_SHARED_ROOTS"])
    shared = save_tiny_lora(shared_root / "in-shared.safetensors", "shared-root-in")
    outside = save_tiny_lora(tmp_path / "loras" / "outside.safetensors", "shared-root-out")
    shas = {name: hashlib.sha256(path.read_bytes()).hexdigest() for name, path in
            (("shared", shared), ("outside", outside))}
    cache = node["cache"]
    assert not [p for p in cache.glob("*") if any(sha in p.name for sha in shas.values())]

    spec = write_job(tmp_path, "shared-roots", [shared], 8, prompt="photo of a w0ut3r man <lora:outside:0.5>",
                     lora_dir=str(outside.parent))
    job = submit(service, spec, "--chunk", "2")  # 8 images, 2 chunks of 2 in flight per worker: both render
    assert wait_done(service, job) == "SUCCEEDED", service.farm("logs", job).stdout[-3000:]
    table = once(service, "shared-roots", 8)
    assert all({lora["sha256"] for lora in row["loras"]} == set(shas.values()) for row in table)
    other = service.node_id("node1")
    assert any(row["worker"].endswith(other) for row in table), "the second node rendered nothing"

    fetched = {p.name for p in cache.glob("*") if any(sha in p.name for sha in shas.values())}
    assert fetched == {f"{shas['outside']}.safetensors"}, f"copies on the second node: {fetched}"
    assert hashlib.sha256((cache / f"{shas['outside']}.safetensors").read_bytes()).hexdigest() == shas["outside"]


def job_line(service, job_id) -> str:
    listing = service.farm("jobs")
    assert listing.returncode == 0, listing.stderr
    return next((line for line in listing.stdout.splitlines() if line.startswith(job_id)), "")


def test_farm_jobs_shows_progress_and_an_eta_while_a_job_runs(service, warm_a, tmp_path):
    """`farm jobs` prints state, done/failed/total and an ETA from the driver's progress lines
    (one every 10 s) while the job runs; afterwards its counts are the manifest's."""
    # a job of the warm pool's settings sized to render for ~40 s here, from the warm first job's pace:
    # (at ~18 s a job once ended before a listing caught it running with an ETA)
    finished = sorted(r["finished_at"] for r in rows(service, "warm-a"))
    half = len(finished) // 2
    pace = (len(finished) - 1 - half) / max((finished[-1] - finished[half]).total_seconds(), 0.01)
    seeds = min(max(round(40 * pace / 2), 20), 1000)
    job = submit(service, write_job(tmp_path, "eta", warm_a["loras"], seeds, first_seed=2000))
    total = 2 * seeds

    pattern = re.compile(rf"{re.escape(job)}\s+RUNNING\s+priority\s+0\s+eta: (\d+)/(\d+) done, (\d+) failed, "
                         r"ETA (?:(\d+)h(\d+)m|(\d+)m(\d+)s)$")
    deadline = time.monotonic() + 180
    while (line := job_line(service, job)) and not (seen := pattern.match(line)):
        assert "RUNNING" in line or "PENDING" in line, f"the job ended before `farm jobs` showed an ETA: {line}"
        assert time.monotonic() < deadline, f"no ETA in `farm jobs`: {line!r}"
        time.sleep(0.5)
    assert line, "`farm jobs` does not list the job"
    seen_at = time.monotonic()
    done, listed_total, failed = (int(seen.group(i)) for i in (1, 2, 3))
    h, m1, m2, s = (int(g or 0) for g in seen.group(4, 5, 6, 7))
    eta = h * 3600 + m1 * 60 + m2 * 60 + s
    assert listed_total == total and 0 < done < total and failed == 0, line

    assert wait_done(service, job) == "SUCCEEDED", service.farm("logs", job).stdout[-3000:]
    left = time.monotonic() - seen_at
    # the ETA was computed up to 10 s before it was read; it is no wild guess either way
    assert 0 < eta <= 3 * (left + 10) + 10, f"ETA {eta} s; the job ended {left:.0f} s after it was shown"
    once(service, "eta", total)
    final = job_line(service, job)
    assert re.search(rf"\s+SUCCEEDED\s+priority\s+0\s+eta: {total}/{total} done, 0 failed$", final), final


def test_the_client_sends_rays_token_from_where_ray_keeps_it(service, warm_a, tmp_path):
    """A head started plainly keeps its token in ~/.ray/auth_token and requires it; the user has
    not exported RAY_AUTH_MODE. The farm's client finds the token there (or in RAY_AUTH_TOKEN_PATH),
    and without one says in one line what is missing."""
    import subprocess
    import sys

    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    plain = {k: v for k, v in service.env.items() if not k.startswith("RAY_AUTH_")}

    def farm(*args, **env):
        return subprocess.run([sys.executable, "-m", "farm.cli", *args], env={**plain, "HOME": str(home), **env},
                              capture_output=True, text=True, timeout=300)

    missing = farm("jobs")
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1, missing.stderr
    assert "wants Ray's auth token and none was found" in missing.stderr
    assert str(home / ".ray" / "auth_token") in missing.stderr and "ray get-auth-token" in missing.stderr

    (home / ".ray" / "auth_token").write_text(service.token + "\n")
    listed = farm("jobs")
    assert listed.returncode == 0, listed.stderr
    assert warm_a["job"] in listed.stdout
    assert f"dashboard: {service.dashboard} (" in listed.stdout and "ray get-auth-token" in listed.stdout
    submitted = farm("submit", str(write_job(tmp_path, "plain-head", warm_a["loras"][:1], 2)))
    assert submitted.returncode == 0, submitted.stderr
    assert wait_done(service, submitted.stdout.strip().splitlines()[-1]) == "SUCCEEDED"

    (home / ".ray" / "auth_token").write_text("0" * 32)
    wrong = farm("jobs")
    assert wrong.returncode == 2 and "refused the auth token from" in wrong.stderr, wrong.stderr
    elsewhere = tmp_path / "token"
    elsewhere.write_text(service.token)
    assert farm("jobs", RAY_AUTH_TOKEN_PATH=str(elsewhere)).returncode == 0


def test_two_jobs_with_different_dtypes_on_one_pool_each_get_theirs(service, warm_a, tmp_path):
    """A pool worker took on the first job's options; a later job asking for another --dtype is
    served with it (a fresh pipeline), and the manifest records what rendered each image."""
    loras = warm_a["loras"][:1]
    served = {}
    for name, dtype, expected in (("dtype-bf16", "bf16", "bfloat16"), ("dtype-fp32", "fp32", "float32")):
        job = submit(service, write_job(tmp_path, name, loras, 3, first_seed=700), "--dtype", dtype)
        assert wait_done(service, job) == "SUCCEEDED", service.farm("logs", job).stdout[-3000:]
        table = once(service, name, 3)
        assert {row["dtype"] for row in table} == {expected}, name
        shared = {worker["name"] for worker in pool(service)["workers"].values()}
        assert {row["worker"] for row in table} <= shared, "served by the shared pool's workers"
        served[name] = table
    pixels = {name: {r["seed"]: r["image_sha256"] for r in rows(service, name)} for name in served}
    assert pixels["dtype-bf16"] != pixels["dtype-fp32"]  # bf16 and fp32 renders of the same tasks differ


def test_a_model_only_the_planning_node_has_renders_on_the_other_node_from_a_checked_copy(service, warm_a,
                                                                                          tmp_path):
    """Two laptops share no disk: a base model the head planned with is sent to the other node
    (by content hash, in blocks, checked), which renders with its copy; it is fetched once."""
    from farm.models.artifacts import HashCache
    from farm.models.tiny import save_tiny_model

    model = save_tiny_model(tmp_path / "models" / "my-sdxl", seed=7)  # new weights: no node has a copy yet
    sha = HashCache().model(model)

    def bytes_fetched() -> int:
        return sum(w.get("model_bytes_fetched", 0) for w in pool(service)["workers"].values())

    before = bytes_fetched()
    job = submit(service, write_job(tmp_path, "ship-model", [], 24, model=str(model)))
    assert wait_done(service, job, timeout=300) == "SUCCEEDED", service.farm("logs", job).stdout[-3000:]
    table = once(service, "ship-model", 24)
    assert service.node_id("node1") in worker_nodes(table), "the other node rendered nothing"
    copy = service.root / "node1-cache" / "models" / sha
    assert copy.is_dir() and HashCache().model(copy) == sha
    # progress in the worker's log, which the dashboard's Logs and Actors views show
    logs = [p for p in service.tmp.rglob("worker-*.out") if "fetching model my-sdxl" in p.read_text(errors="replace")]
    assert logs, "no worker log says how far the model's copy got"
    assert bytes_fetched() - before == sum(p.stat().st_size for p in copy.rglob("*") if p.is_file())  # once


def test_a_model_transfer_killed_9_midway_resumes_where_it_stopped(service, warm_a, tmp_path):
    """The other node's worker is killed -9 while it copies a ~600 MB model from the head (which
    `farm jobs` shows meanwhile): Ray restarts it, and its next fetch goes on from the bytes already
    on disk (only the rest crosses the network), the copy checks out, and the job's images are
    each written once. (Copies run at ~45 MB/s between two nodes on this box.)"""
    from farm.models.artifacts import HashCache, model_listing
    from farm.models.tiny import save_tiny_model

    model = save_tiny_model(tmp_path / "models" / "big-sdxl", seed=11)
    padding = model / "padding" / "weights.safetensors"  # hashed and sent with the model, never loaded
    padding.parent.mkdir()
    with open(padding, "wb") as handle:
        for _ in range(38):
            handle.write(os.urandom(16 << 20))
    sha = HashCache().model(model)
    total = sum(size for _, size, _ in model_listing(model)["files"])
    models = service.root / "node1-cache" / "models"
    partial, copy = models / f"{sha}.partial" / "padding" / "weights.safetensors", models / sha
    node1_worker = f"sdfarm-worker-{service.node_id('node1')[:8]}-0"

    def fetching_process() -> int | None:
        for fd in Path("/proc").glob("[0-9]*/fd/*"):
            try:
                if os.readlink(fd) == str(partial):
                    return int(fd.parts[2])
            except OSError:
                pass
        return None

    job = submit(service, write_job(tmp_path, "kill-fetch", [], 24, model=str(model)), "--chunk", "1")
    # `farm jobs` says how far the copy got (the driver asks its workers every few seconds)
    copying = re.compile(r"copying model big-sdxl to a node: (\d+\.\d\d) of (\d+\.\d\d) GiB")
    seen = service.wait_for(lambda: copying.search(job_line(service, job) or ""), timeout=180, every=0.2,
                            what="`farm jobs` to show the model's copy")
    assert float(seen[1]) < float(seen[2]) == round(total / 2**30, 2), seen[0]
    pid = fetching_process()
    assert pid, "no process holds the partial copy open"
    os.kill(pid, signal.SIGKILL)
    service.wait_for(lambda: not Path(f"/proc/{pid}").exists(), what="the killed worker to go")
    assert not copy.exists(), "the copy was complete before the kill: make the padding larger"
    assert 0 < partial.stat().st_size < padding.stat().st_size
    kept = sum(p.stat().st_size for p in (models / f"{sha}.partial").rglob("*") if p.is_file())
    assert wait_done(service, job, timeout=300) == "SUCCEEDED", service.farm("logs", job).stdout[-3000:]
    once(service, "kill-fetch", 24)
    more = 0
    while not copy.exists():  # the head rendered the whole job: give the other node another turn
        assert more < 3, "the restarted worker never fetched the model again"
        more += 1
        again = submit(service, write_job(tmp_path, f"kill-fetch-{more}", [], 24, model=str(model)), "--chunk", "1")
        assert wait_done(service, again, timeout=300) == "SUCCEEDED", service.farm("logs", again).stdout[-3000:]
    assert HashCache().model(copy) == sha
    # the restarted process fetched only what the killed one had not written
    assert pool(service)["workers"][node1_worker]["model_bytes_fetched"] == total - kept


def test_farm_jobs_reads_only_the_end_of_a_long_log(service, monkeypatch):
    """`farm jobs` reads each job's latest progress from the last lines of its driver log, never the
    whole log: a job that logged ~6 MB shows its last progress after reading a few KB; one whose
    log ends in 1,000 lines without progress (a long traceback) is found in a longer tail."""
    import sys

    from ray.job_submission import JobSubmissionClient

    from farm.cluster import jobqueue

    def printing(total: int, filler: int, tail: int) -> str:
        script = (f"import json\nmark = {jobqueue.PROGRESS_MARK!r}\n"
                  "print(mark + json.dumps({'total': %d, 'done': 1, 'failed': 0}))\n"
                  "for i in range(%d): print('a line the driver logged between progress lines', i)\n"
                  "print(mark + json.dumps({'total': %d, 'done': %d, 'failed': 1}))\n"
                  "for i in range(%d): print('  File x, line', i)\n") % (total, filler, total, total - 1, tail)
        return f"{sys.executable} -c {shlex.quote(script)}"

    api = JobSubmissionClient(service.dashboard, headers={"Authorization": f"Bearer {service.token}"})
    long_log = api.submit_job(entrypoint=printing(9, 120_000, 5), metadata={"sdfarm": "1", "job": "long-log"})
    traceback = api.submit_job(entrypoint=printing(5, 10, 1000), metadata={"sdfarm": "1", "job": "traceback"})
    ended = ("SUCCEEDED", "FAILED")
    service.wait_for(lambda: all(api.get_job_status(job).value in ended for job in (long_log, traceback)),
                     what="the jobs to end")
    whole = len(api.get_job_logs(long_log).encode())
    assert whole > 5_000_000

    monkeypatch.setenv("RAY_AUTH_TOKEN", service.token)
    read = []
    tail = jobqueue.log_tail
    monkeypatch.setattr(jobqueue, "log_tail", lambda *args: read.append(tail(*args)) or read[-1])
    assert jobqueue.progress_of(service.dashboard, api.get_job_info(long_log))["done"] == 8
    assert sum(len(text.encode()) for text in read) < 20_000 < whole // 250
    assert jobqueue.progress_of(service.dashboard, api.get_job_info(traceback)) == {"total": 5, "done": 4, "failed": 1}
    listed = service.farm("jobs").stdout
    assert re.search(rf"{long_log}\s+SUCCEEDED\s+priority\s+0\s+long-log: 8/9 done, 1 failed$", listed, re.M), listed
    assert re.search(rf"{traceback}\s+SUCCEEDED\s+priority\s+0\s+traceback: 4/5 done, 1 failed$", listed, re.M), listed


@pytest.mark.slow
def test_the_dashboard_opens_with_the_token_the_farm_says_how_to_get_and_lists_the_workers(service, warm_a):
    """In a real headless Chromium: the dashboard asks for Ray's token (the farm's hint names
    `ray get-auth-token`); with it, the Actors view lists the pool's named workers."""
    from test_page import CHROMIUM, CHROMIUM_ARGS

    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e .[test])")
    assert "ray get-auth-token" in service.farm("jobs").stdout  # how the user learns to get the token
    names = sorted(pool(service)["workers"])
    assert names and all(name.startswith("sdfarm-worker-") for name in names)
    artifacts = Path(__file__).resolve().parents[1] / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(service.dashboard)
            field = page.get_by_placeholder("Enter your authentication token")
            field.wait_for(timeout=30_000)  # "Authentication Token Required"
            field.fill(service.token)
            page.get_by_role("button", name="Submit").click()
            field.wait_for(state="detached", timeout=30_000)
            page.goto(f"{service.dashboard}/#/actors")
            for name in names:
                page.get_by_text(name, exact=False).first.wait_for(timeout=60_000)
            page.screenshot(path=str(artifacts / "ray-dashboard-actors.png"), full_page=True)
        finally:
            browser.close()
    assert (artifacts / "ray-dashboard-actors.png").stat().st_size > 10_000
