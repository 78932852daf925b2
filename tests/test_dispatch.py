"""The queue on a real local Ray with two logical GPUs and the tiny model."""

import hashlib
import shutil
import time

import pytest

from farm.cluster.dispatch import AffinityQueue, make_chunks, run_plan
from farm.runs.manifest import RunFolder
from farm.render.pipeline import PipelineOptions
from farm.sweep.plan import Plan, plan_job
from farm.sweep.spec import parse_spec
from local_cluster import assert_exactly_once


def demo_plan(lora_dir, steps=2, **axes):
    data = {"job": "d", "model": "tiny:sdxl",
            "defaults": {"prompt": "photo of a w0ut3r man", "seed": 7, "steps": steps, "width": 64, "height": 64},
            "axes": axes or {"lora": ["none", "subject-000001", "subject-000002"], "prompt": ["a", "b", "c"]}}
    return plan_job(parse_spec(data), lora_dir)


def test_renders_everything_once_on_both_gpus(ray_cluster, lora_dir, tmp_path):
    plan = demo_plan(lora_dir)
    run = RunFolder(tmp_path)
    summary = run_plan(plan, run, chunk_size=1, quiet=True)
    assert (summary.ok, summary.failed, summary.skipped) == (9, 0, 0)
    table = assert_exactly_once(tmp_path, [t.task_id for t in plan.tasks])
    workers = {row["worker"] for row in table}
    assert {w.split("@")[0] for w in workers} == {"worker:gpu0", "worker:gpu1"}
    for row in table:
        data = (tmp_path / row["image_path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == row["image_sha256"]


def test_resume_renders_only_what_is_missing(ray_cluster, lora_dir, tmp_path):
    plan = demo_plan(lora_dir)
    run = RunFolder(tmp_path)
    first = Plan(job=plan.job, tasks=plan.tasks[:4])
    assert run_plan(first, run, quiet=True).ok == 4
    before = {p: p.read_bytes() for p in (tmp_path / "images").rglob("*.png")}
    stamps = {p: p.stat().st_mtime_ns for p in before}
    summary = run_plan(plan, run, quiet=True)
    assert (summary.ok, summary.skipped) == (5, 4)
    assert all(p.read_bytes() == data and p.stat().st_mtime_ns == stamps[p] for p, data in before.items())
    assert_exactly_once(tmp_path, [t.task_id for t in plan.tasks])
    again = run_plan(plan, run, quiet=True)
    assert (again.ok, again.skipped) == (0, 9)


def test_same_task_on_two_actors_gives_identical_bytes(ray_cluster, lora_dir):
    import ray

    from farm.cluster.actors import start_workers

    task = demo_plan(lora_dir).tasks[-1]
    actors = start_workers(2, PipelineOptions(), use_gpus=True)
    try:
        results = ray.get([actor.render_batch.remote([task]) for actor in actors])
        names = ray.get([actor.holds.remote() for actor in actors])
    finally:
        for actor in actors:
            ray.kill(actor)
    (a,), (b,) = results
    assert a.status == b.status == "ok"
    assert a.worker != b.worker and a.png == b.png
    assert {n["model_sha256"] for n in names} == {task.model_sha256}


def test_a_failing_task_is_a_row_and_the_job_goes_on(ray_cluster, lora_dir, tmp_path):
    broken = tmp_path / "loras" / "broken.safetensors"
    broken.parent.mkdir()
    broken.write_bytes((lora_dir / "subject-000002.safetensors").read_bytes())
    plan = demo_plan(broken.parent, lora=["none", "broken"], prompt=["a", "b"])
    broken.write_bytes(b"\x00" * 16)  # damaged after planning
    run = RunFolder(tmp_path / "out")
    summary = run_plan(plan, run, quiet=True)
    assert (summary.ok, summary.failed) == (2, 2)
    failed = [r for r in run.read().to_pylist() if r["status"] == "failed"]
    assert len(failed) == 2 and all("broken.safetensors" in r["error"] for r in failed)
    assert "broken.safetensors" in summary.errors[0]


def chunks_of(groups: dict[str, int]):
    class T:  # the queue only looks at .group
        def __init__(self, group):
            self.group = group

    tasks = [T(g) for g, n in groups.items() for _ in range(n)]
    return make_chunks(tasks, 1)


def test_affinity_keeps_each_actor_on_its_group_and_steals_at_the_end():
    queue = AffinityQueue(chunks_of({"A": 3, "B": 3}))
    taken = {0: [], 1: []}
    while queue:
        for actor in (0, 1):
            chunk = queue.take(actor)
            if chunk:
                taken[actor].append(chunk[0].group)
    assert taken == {0: ["A", "A", "A"], 1: ["B", "B", "B"]}
    assert queue.switches == 0


def test_free_actor_steals_from_the_longest_group():
    queue = AffinityQueue(chunks_of({"A": 1, "B": 4}))
    assert queue.take(0)[0].group == "A"
    assert queue.take(1)[0].group == "B"
    assert queue.take(0)[0].group == "B"  # A is done: steal
    assert queue.switches == 1
    assert sum(len(c) for c in queue.chunks.values()) == 2


def test_put_back_goes_first():
    queue = AffinityQueue(chunks_of({"A": 2}))
    chunk = queue.take(0)
    queue.put_back(chunk)
    assert queue.take(0) is chunk  # the owner gets a requeued chunk before anything else


KILLS = 4


def _run_beside(killer, plan, run, workers: list, stop):
    """run_plan on handed-in `workers` while `killer` runs in a thread; then `stop` is set, the
    thread joined and every worker stopped."""
    import threading

    import ray

    thread = threading.Thread(target=killer)
    thread.start()
    try:
        return run_plan(plan, run, chunk_size=2, quiet=True, pool=workers)
    finally:
        stop.set()
        thread.join()
        for worker in workers:
            ray.kill(worker)


@pytest.mark.slow
def test_exactly_once_while_workers_are_killed_9_again_and_again(ray_cluster, lora_dir, tmp_path):
    """200 renders on 2 workers, one of them kill -9'd four times at random moments (each time
    once its new process has rendered): Ray restarts it, its in-flight chunks are requeued, and
    the manifest ends with exactly one ok row each. (Each restart costs a cold start: on a loaded
    2-core box ten kills took three minutes and could outlast the job.)"""
    import os
    import random
    import signal
    import threading

    import ray
    from PIL import Image

    from farm.cluster.actors import start_workers

    plan = demo_plan(lora_dir, steps=6, lora=["none", "subject-000001"], seed=list(range(100)))
    assert len(plan.tasks) == 200
    run = RunFolder(tmp_path)
    workers = start_workers(2, PipelineOptions(), use_gpus=True)
    kills, stop = [], threading.Event()

    def killer():
        chance = random.Random(5)
        ray.get([w.holds.remote() for w in workers])  # both up
        while len(kills) < KILLS and not stop.is_set():
            time.sleep(chance.uniform(0.3, 1.2))
            try:
                holds = ray.get(chance.choice(workers).holds.remote(), timeout=30)
            except Exception:
                continue  # restarting: pick again
            if holds["rendered"]:  # at work (a fresh process has rendered nothing yet): kill it now
                os.kill(holds["pid"], signal.SIGKILL)
                kills.append(holds["pid"])

    summary = _run_beside(killer, plan, run, workers, stop)
    assert len(kills) == KILLS, f"the job ended after {len(kills)} kills: make it longer"
    assert (summary.ok, summary.failed) == (200, 0), summary.errors
    raw = assert_exactly_once(tmp_path, [t.task_id for t in plan.tasks])  # every part, before any folding
    for row in raw:
        data = (tmp_path / row["image_path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == row["image_sha256"]
        Image.open(tmp_path / row["image_path"]).verify()
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".")], "temp files left behind"


@pytest.mark.parametrize("url, auth, allow, refused", [
    ("127.0.0.1:8265", "off", False, False),
    ("localhost:8265", "off", False, False),
    ("192.168.1.10:8265", "token", False, False),
    ("192.168.1.10:8265", "off", False, True),
    ("0.0.0.0:8265", "off", False, True),
    ("0.0.0.0:8265", "off", True, False),
    ("", "off", False, False),  # no dashboard at all
])
def test_an_open_cluster_is_refused_unless_the_user_insists(url, auth, allow, refused):
    from farm.cluster.connect import check_exposure
    from farm.errors import FarmError

    if refused:
        with pytest.raises(FarmError, match="--allow-open-cluster"):
            check_exposure(url, auth, allow)
    else:
        check_exposure(url, auth, allow)


def test_a_head_the_farm_starts_listens_on_loopback_only(tmp_path):
    """The dashboard (and its Jobs API) of the local Ray `farm run` starts binds 127.0.0.1."""
    import json
    import os
    import subprocess
    import sys
    import tempfile

    ray_tmp = tempfile.mkdtemp(prefix="sdfarm-lo-")
    script = (
        "import json, psutil, ray\n"
        "from farm.cluster.connect import connect\n"
        "connect(gpus=1, local=True)\n"
        "url = ray._private.worker.global_worker.node.address_info['webui_url']\n"
        "port = int(url.rsplit(':', 1)[1])\n"
        "ips = sorted({c.laddr.ip for c in psutil.net_connections('inet')\n"
        "              if c.laddr.port == port and c.status == 'LISTEN'})\n"
        "print(json.dumps({'url': url, 'ips': ips}))\n"
        "ray.shutdown()\n")
    try:
        env = {**os.environ, "RAY_TMPDIR": ray_tmp}
        env.pop("RAY_ADDRESS", None)  # the tests' own Ray sets it; this must start a head of its own
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180, env=env)
    finally:
        from local_cluster import kill_marked

        kill_marked(f"RAY_TMPDIR={ray_tmp}".encode())
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-2000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer["url"].startswith("127.0.0.1:") and answer["ips"] == ["127.0.0.1"], answer


def _faulty_worker(fault: str = "render", restarts: int = 0):
    """A worker whose every render fails as a broken GPU's would (SDFARM_FAULT=render), or hangs."""
    import os

    from farm.cluster.actors import worker_class

    env = {name: os.environ[name] for name in ("SDFARM_CACHE", "SDFARM_ROOTS") if name in os.environ}
    return worker_class().options(num_gpus=1, num_cpus=0, max_restarts=restarts, runtime_env={
        "env_vars": {**env, "HF_HUB_OFFLINE": "1", "SDFARM_FAULT": fault}}).remote(9, PipelineOptions())


def test_a_failing_worker_is_blocklisted_and_the_job_completes_on_the_other(ray_cluster, lora_dir, tmp_path):
    import ray

    from farm.cluster.actors import start_workers

    plan = demo_plan(lora_dir, lora=["none", "subject-000001"], seed=list(range(12)))
    good, bad = start_workers(1, PipelineOptions(), use_gpus=True)[0], _faulty_worker()
    try:
        summary = run_plan(plan, RunFolder(tmp_path), chunk_size=1, quiet=True, pool=[good, bad])
        counts = ray.get([good.holds.remote(), bad.holds.remote()])
    finally:
        ray.kill(good)
        ray.kill(bad)
    assert (summary.ok, summary.failed) == (24, 0), summary.errors
    assert counts[0]["rendered"] == 24
    assert 3 <= counts[1]["failed"] <= 3 + 1, "blocklisted at 3 failures (one more may be in flight)"


def test_a_job_with_no_eligible_worker_left_fails_fast(ray_cluster, lora_dir, tmp_path):
    import ray

    plan = demo_plan(lora_dir, lora=["none"], seed=list(range(20)))
    bad = _faulty_worker()
    try:
        summary = run_plan(plan, RunFolder(tmp_path), chunk_size=1, quiet=True, pool=[bad])
        failed = ray.get(bad.holds.remote())["failed"]
    finally:
        ray.kill(bad)
    assert (summary.ok, summary.failed) == (0, 20)
    # fast: blocklisted after 3 renders (one more was in flight), the other 16 failed without a try
    assert failed <= 4
    assert any("no eligible worker left" in e for e in summary.errors)


def test_workers_are_recycled_after_n_tasks(ray_cluster, lora_dir, tmp_path):
    import ray

    from farm.cluster.pool import PrivatePool

    plan = demo_plan(lora_dir, lora=["none"], seed=list(range(16)))
    pool = PrivatePool.start(2, PipelineOptions(), use_gpus=True)
    first = {key: ray.get(worker.holds.remote())["pid"] for key, worker in pool.handles.items()}
    try:
        summary = run_plan(plan, RunFolder(tmp_path), chunk_size=2, quiet=True, pool=pool, recycle_after=4)
        last = {key: ray.get(worker.holds.remote()) for key, worker in pool.handles.items()}
    finally:
        pool.close()
    assert (summary.ok, summary.failed) == (16, 0)
    assert all(last[key]["pid"] != first[key] for key in first), "each worker was replaced"
    assert all(holds["rendered"] <= 4 for holds in last.values()), "no worker rendered more than 4 in a row"


def test_a_hung_worker_is_timed_out_and_its_tasks_render_elsewhere(ray_cluster, lora_dir, tmp_path):
    import ray

    from farm.cluster.actors import start_workers

    def holds(worker):  # once Ray has restarted it, if it was killed
        deadline = time.monotonic() + 60
        while True:
            try:
                return ray.get(worker.holds.remote(), timeout=30)
            except ray.exceptions.ActorUnavailableError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    plan = demo_plan(lora_dir, lora=["none"], seed=list(range(12)))
    good, hung = start_workers(1, PipelineOptions(), use_gpus=True)[0], _faulty_worker("hang", restarts=3)
    try:
        ray.get(good.render_batch.remote(plan.tasks[:1]))  # loaded: a render takes a fraction of the timeout
        before = [holds(good), holds(hung)]
        summary = run_plan(plan, RunFolder(tmp_path), chunk_size=1, quiet=True, pool=[good, hung],
                           task_timeout_s=3)
        after = [holds(good), holds(hung)]
    finally:
        ray.kill(good)
        ray.kill(hung)
    assert (summary.ok, summary.failed) == (12, 0), summary.errors
    assert after[0]["pid"] == before[0]["pid"] and after[0]["rendered"] == 1 + 12, "the good worker did it all"
    assert after[1]["pid"] != before[1]["pid"], "the hung worker was killed (and restarted by Ray)"


def test_a_new_or_restarted_worker_is_given_time_to_start(ray_cluster, lora_dir, tmp_path):
    """A worker process's first chunk takes longer: the process starts and loads its pipeline.
    With a task timeout, a new worker and one that Ray restarted after a kill -9 both get
    COLD_FACTOR timeouts for it, so neither is taken for hung and killed. A stub worker whose every
    process answers its first chunk only after `cold` s (more than one timeout) stands in for one."""
    import os
    import signal
    import threading

    import ray

    from farm.cluster.dispatch import COLD_FACTOR
    from farm.render.renderer import RenderResult

    # 14 s left for Ray to start the process: on a loaded 2-core box a restart took more than 6
    timeout, cold = 8.0, 10.0
    assert timeout < cold <= COLD_FACTOR * timeout - 14
    starts, answers = tmp_path / "starts", tmp_path / "answers"  # a line per process, a line per chunk

    @ray.remote(num_gpus=1, num_cpus=0, max_restarts=5)
    class SlowStarter:
        def __init__(self):
            with open(starts, "a") as log:
                log.write(f"{os.getpid()}\n")
            self.warm = False

        def render_batch(self, tasks, source=None):
            time.sleep(0.5 if self.warm else cold)  # then renders take 0.5 s
            self.warm = True
            with open(answers, "a") as log:
                log.write("chunk\n")
            return [RenderResult(task=t, status="ok", png=t.task_id.encode(), worker="stub",
                                 image_sha256=hashlib.sha256(t.task_id.encode()).hexdigest()) for t in tasks]

    def lines(path):
        return path.read_text().split() if path.exists() else []

    killed_after = []

    def kill_when_warm():  # kill -9 the worker once it has answered twice, mid-job
        while len(lines(answers)) < 2:
            time.sleep(0.1)
        os.kill(int(lines(starts)[-1]), signal.SIGKILL)
        killed_after.append(len(lines(answers)))

    plan = demo_plan(lora_dir, lora=["none"], seed=list(range(12)))
    worker = SlowStarter.remote()
    killer = threading.Thread(target=kill_when_warm, daemon=True)
    killer.start()
    try:
        summary = run_plan(plan, RunFolder(tmp_path / "out"), chunk_size=1, quiet=True, pool=[worker],
                           task_timeout_s=timeout)
    finally:
        ray.kill(worker)
    killer.join(timeout=1)
    assert killed_after and killed_after[0] < 12, "the job ended before the kill"
    assert (summary.ok, summary.failed) == (12, 0), summary.errors
    assert len(lines(starts)) == 2, "a starting worker was taken for hung and killed (only the test killed it)"


def test_a_worker_with_no_restarts_left_gets_no_more_chunks(ray_cluster, lora_dir, tmp_path):
    """A handed-in worker Ray may not restart (max_restarts=0) is killed -9 mid-job: it is dead for
    good, so the job stops sending it chunks (each would fail at once and count as a loss until
    its tasks failed) and the other worker renders everything."""
    import os
    import signal
    import threading

    import ray

    from farm.cluster.actors import worker_class

    plan = demo_plan(lora_dir, steps=4, lora=["none", "subject-000001"], seed=list(range(20)))
    run = RunFolder(tmp_path)
    workers = [worker_class().options(max_restarts=0, num_gpus=1, num_cpus=0).remote(i, PipelineOptions())
               for i in range(2)]
    killed = []

    def killer():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            holds = ray.get(workers[1].holds.remote())
            if holds["rendered"]:
                os.kill(holds["pid"], signal.SIGKILL)
                killed.append(holds["rendered"])
                return
            time.sleep(0.2)

    summary = _run_beside(killer, plan, run, workers, threading.Event())
    assert killed, "the second worker never rendered: nothing was tested"
    assert (summary.ok, summary.failed) == (40, 0), summary.errors[:3]
    assert_exactly_once(tmp_path, [t.task_id for t in plan.tasks])


def test_a_training_run_waits_for_its_killed_worker_to_restart(ray_cluster, tmp_path):
    """A worker is killed -9 mid training run and Ray takes `restart_s` to bring it back (a slow
    import or a busy box): the run waits for it and resumes, instead of counting every call sent
    while the actor restarts (each fails after ~2 s) as one more death until the run fails. A stub
    worker whose restarted process starts slowly stands in for one; the run ends on that worker."""
    import os
    import signal
    import threading

    import ray

    from farm.cluster.dispatch import MAX_ATTEMPTS, run_study
    from farm.sweep.spec import TrainOptions
    from farm.train.checkpoints import Checkpoint
    from farm.train.trainer import TrainRun

    restart_s = 4.0 * MAX_ATTEMPTS  # more than MAX_ATTEMPTS calls' worth of "the actor is restarting"
    starts, calls = tmp_path / "starts", tmp_path / "calls"  # a line per process, a line per train call

    def lines(path):
        return path.read_text().split() if path.exists() else []

    @ray.remote(num_gpus=1, num_cpus=0, max_restarts=5)
    class SlowRestarter:
        def __init__(self):
            restarted = bool(lines(starts))
            with open(starts, "a") as log:
                log.write(f"{os.getpid()}\n")
            if restarted:
                time.sleep(restart_s)

        def train(self, run):
            with open(calls, "a") as log:
                log.write(f"{os.getpid()}\n")
            for epoch in (1, 2, 3):
                path = tmp_path / f"{run.run}-{epoch}.safetensors"
                path.write_bytes(b"weights %d" % epoch)
                yield Checkpoint(run.run, str(path), epoch, epoch, epoch == 3,
                                 hashlib.sha256(path.read_bytes()).hexdigest(), f"{run.run} epoch {epoch}")
                time.sleep(60 if len(lines(starts)) == 1 else 0.1)  # the first process is killed here

    def kill_after_first_checkpoint():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (tmp_path / "v001-1.safetensors").exists():
            time.sleep(0.1)
        time.sleep(0.5)
        os.kill(int(lines(starts)[0]), signal.SIGKILL)

    options = TrainOptions(train_data_dir="img")
    run = TrainRun("v001", "tiny:sdxl", "tiny", options, str(tmp_path), str(tmp_path / "train"))
    worker = SlowRestarter.remote()
    killer = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    killer.start()
    try:
        summary = run_study([run], lambda known: [], RunFolder(tmp_path / "out"), quiet=True, pool=[worker])
    finally:
        ray.kill(worker)
    killer.join(timeout=1)
    assert summary.failed_runs == [], summary.failed_runs
    assert len(lines(starts)) == 2, "the worker was not killed and restarted once"
    assert lines(calls) == lines(starts), "the run was not resumed once on the restarted process"
    rows = RunFolder(tmp_path / "out").read_checkpoints()
    assert [r["epoch"] for r in rows if r["final"]] == [3]


def test_the_eta_follows_the_recent_pace_not_the_cold_start(lora_dir, tmp_path, monkeypatch):
    """`farm jobs`' ETA: 30 s of workers starting, a first chunk of 4, then one image a second. The
    time left is about that pace × images left (~70 s), not the average since the start (~3 minutes)."""
    import hashlib

    from farm.cluster import dispatch
    from farm.cluster.dispatch import _Feed
    from farm.render.renderer import RenderResult

    plan = demo_plan(lora_dir, steps=2, lora=["none"], seed=list(range(100)))
    clock = [1000.0]
    monkeypatch.setattr(dispatch.time, "perf_counter", lambda: clock[0])
    feed = _Feed(RunFolder(tmp_path), quiet=True, chunk_size=4)
    feed.add(plan.tasks)
    png = b"\x89PNG\r\n\x1a\n"
    def ended(task):
        feed.record(RenderResult(task=task, status="ok", png=png, image_sha256=hashlib.sha256(png).hexdigest()))

    clock[0] += 30  # cold start: nothing ends
    for task in plan.tasks[:4]:  # the first chunk's images end together: no pace yet, so no ETA
        ended(task)
    assert feed.progress()["eta_s"] is None
    clock[0] += 1
    for task in plan.tasks[4:22]:
        ended(task)
        clock[0] += 1
    progress = feed.progress()
    feed.close()
    assert (progress["done"], progress["total"]) == (22, 100)
    assert 60 <= progress["eta_s"] <= 85, progress  # the old pace since the start: 78 / (22 / 48) = 170 s
