"""The queue: send a plan's tasks (and training runs) to the workers, collect results as they
complete.

- Chunks: tasks are cut into small chunks of one group (same model and LoRA set), so an actor
  call never loads anything new mid-chunk and Ray's per-call overhead is shared by a few renders.
- Affinity: a free actor takes the next chunk of the group it rendered last; when that runs out
  it takes a group no other actor is on; only then does it steal the tail of another's group.
- Bounded in-flight work: each actor has at most `depth` chunks queued (one rendering, one
  waiting), so results stream back steadily and nothing piles up in the object store.
- Failures: a failed task is a `failed` row with its error and the job goes on. A chunk lost to
  a dying actor is requeued (Ray restarts the actor); a task lost three times is marked failed.
- Training: a worker with no render chunk in flight takes the next training run; its checkpoints
  stream back (a Ray streaming generator) and are re-planned into render tasks at once, which
  any free worker takes. A run whose worker dies resumes from its saved state on the next free one.
"""

from __future__ import annotations

import os
import sys
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import ray
from ray.exceptions import ActorUnschedulableError, RayActorError, RayTaskError

from farm.cluster.metrics import farm_metrics
from farm.errors import FarmError, first_line
from farm.runs.manifest import ManifestWriter, RunFolder
from farm.render.pipeline import PipelineOptions
from farm.cluster.pool import PrivatePool
from farm.sweep.plan import Plan, Task
from farm.render.renderer import RenderResult

MAX_ATTEMPTS = 3
MAX_LOSSES = 20
COLD_FACTOR = 3  # a worker's first chunk may take this many timeouts (it loads its pipeline)
BLOCK_AFTER = 3  # a worker that fails this many of a job's tasks gets no more of them (Flamenco's rule)
# a worker that died, or can no longer exist (its node left): its work goes to another
WORKER_GONE = (RayActorError, ActorUnschedulableError)


@dataclass
class RunSummary:
    total: int
    skipped: int  # already `ok` in the manifest
    ok: int = 0
    failed: int = 0
    wall_s: float = 0.0
    lora_switches: int = 0
    errors: list[str] = field(default_factory=list)
    failed_runs: list[str] = field(default_factory=list)  # training runs that stopped with an error


def connect(address: str | None = None, gpus: int | None = None, dashboard: bool = True,
            allow_open: bool = False, local: bool = False) -> bool:
    """Join the cluster at `address` (or a running local one); else, or when `local`, start a
    local Ray of this process's own.

    A local Ray on a machine without CUDA declares one logical GPU per CPU core, so render
    actors are placed one per core exactly as they would be one per GPU. Returns True when
    this process started Ray (and so should stop it).
    """
    if ray.is_initialized():
        return False
    # Joining a cluster keeps its nodes' environment and, inside a submitted job, the job's
    # runtime env (a runtime_env here would replace it, and Ray would delete the job's working dir).
    try:  # "auto" finds a Ray running on this machine (its address file, or its processes)
        if local:
            raise ConnectionError("a Ray of this run's own was asked for")
        context = ray.init(address=address or "auto", namespace="sdfarm")
    except ConnectionError:
        if address:
            raise
    else:
        try:
            check_exposure(context.dashboard_url or "", _auth_mode(), allow_open)
        except FarmError:
            ray.shutdown()
            raise
        return False
    env = {"runtime_env": {"env_vars": _forwarded_env()}}
    if gpus is None:
        import torch

        gpus = torch.cuda.device_count() or (os.cpu_count() or 1)
    context = ray.init(num_gpus=gpus, num_cpus=os.cpu_count(), namespace="sdfarm", include_dashboard=dashboard,
                       dashboard_host="127.0.0.1", **env)  # loopback only: the dashboard can submit jobs
    if dashboard and context.dashboard_url:
        print(f"Ray dashboard: http://{context.dashboard_url}", file=sys.stderr)
    return True


def _auth_mode() -> str:
    from ray._raylet import AuthenticationMode, get_authentication_mode

    return "token" if get_authentication_mode() == AuthenticationMode.TOKEN else "off"


LOOPBACK = ("127.", "localhost", "[::1]", "::1")


def check_exposure(dashboard_url: str, auth_mode: str, allow_open: bool) -> None:
    """Refuse a cluster whose dashboard (and so its Jobs API: code execution for whoever reaches
    it) listens beyond this machine with token authentication off, unless the user insists."""
    host = dashboard_url.removeprefix("http://").rsplit(":", 1)[0]
    if not host or host.startswith(LOOPBACK) or auth_mode == "token" or allow_open:
        return
    raise FarmError(f"the cluster's dashboard listens on {host} with token authentication off: anyone who "
                    "reaches it can run code on every node; restart Ray with --dashboard-host=127.0.0.1 or "
                    "RAY_AUTH_MODE=token (see cluster.yaml), or pass --allow-open-cluster")


def _forwarded_env() -> dict[str, str]:
    names = ("SDFARM_CACHE", "HF_HUB_OFFLINE", "HF_HOME")
    return {name: os.environ[name] for name in names if name in os.environ}


def make_chunks(tasks: list[Task], size: int) -> "OrderedDict[tuple, deque[list[Task]]]":
    """Group tasks (keeping plan order) and cut each group into chunks of at most `size`."""
    groups: OrderedDict[tuple, list[Task]] = OrderedDict()
    for task in tasks:
        groups.setdefault(task.group, []).append(task)
    return OrderedDict(
        (group, deque(members[i:i + size] for i in range(0, len(members), size)))
        for group, members in groups.items()
    )


class AffinityQueue:
    """Chunks by group, handed out so that actors rarely switch LoRAs and never sit idle."""

    def __init__(self, chunks: "OrderedDict[tuple, deque[list[Task]]]"):
        self.chunks = chunks
        self.on: dict[int, tuple] = {}  # actor index → group it last took
        self.switches = 0

    def __bool__(self) -> bool:
        return any(self.chunks.values())

    def take(self, actor: int) -> list[Task] | None:
        group, steal = self._choose(actor)
        if group is None:
            return None
        if self.on.get(actor) != group:
            self.switches += actor in self.on
            self.on[actor] = group
        queue = self.chunks[group]
        chunk = queue.pop() if steal else queue.popleft()  # a thief works from the far end
        if not queue:
            del self.chunks[group]
        return chunk

    def _choose(self, actor: int) -> tuple[tuple | None, bool]:
        """(group, stolen): own group first, then a group nobody is on, then the longest one."""
        mine = self.on.get(actor)
        if mine in self.chunks:
            return mine, False
        taken = {g for other, g in self.on.items() if other != actor}
        for group in self.chunks:
            if group not in taken:
                return group, False
        if not self.chunks:
            return None, False
        return max(self.chunks, key=lambda g: len(self.chunks[g])), True

    def put_back(self, chunk: list[Task]) -> None:
        self.chunks.setdefault(chunk[0].group, deque()).appendleft(chunk)


def _progress(total: int, quiet: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="img", disable=quiet, file=sys.stderr, dynamic_ncols=True,
                smoothing=0.1, desc="render")


class _Feed:
    """Render tasks in and results out for one run folder: what is done, what is queued."""

    def __init__(self, run: RunFolder, quiet: bool, chunk_size: int):
        self.run, self.chunk_size = run, chunk_size
        run.remove_temp_files()  # left by a crashed earlier run of this job
        self.done = run.done_ids()
        self.seen = set(self.done)  # done or queued: never queued twice
        self.planned: set[str] = set()
        self.queue = AffinityQueue(OrderedDict())
        self.writer = ManifestWriter(run)
        self.lost_on: dict[str, list] = {}  # task id → workers it was lost on, in order
        self.failed_on: dict[str, list] = {}  # task id → workers it failed on (retryable failures)
        self.worker_failures: dict = {}
        self.summary = RunSummary(total=0, skipped=0)
        self.bar = _progress(0, quiet)
        self.started = time.perf_counter()
        self.job = run.load_run_info().get("job", run.root.name)

    def add(self, tasks: list[Task]) -> None:
        """Queue the tasks not seen before (re-planning after a new checkpoint adds only those)."""
        fresh = [t for t in tasks if t.task_id not in self.seen]
        self.planned.update(t.task_id for t in tasks)
        self.summary.total = len(self.planned)
        self.summary.skipped = len(self.planned & self.done)
        self.seen.update(t.task_id for t in fresh)
        for group, chunks in make_chunks(fresh, self.chunk_size).items():
            self.queue.chunks.setdefault(group, deque()).extend(chunks)
        self.bar.total = (self.bar.total or 0) + len(fresh)
        self.bar.refresh()

    def retry_elsewhere(self, result: RenderResult, worker) -> bool:
        """Requeue a task that failed for a reason another worker may not have; False once it
        failed on MAX_ATTEMPTS different workers (then its last error is final)."""
        workers = self.failed_on.setdefault(result.task.task_id, [])
        workers.append(worker)
        if len(set(workers)) >= MAX_ATTEMPTS or len(workers) >= 2 * MAX_ATTEMPTS:
            result.error = f"failed on {len(set(workers))} workers; last: {result.error}"
            return False
        self.queue.put_back([result.task])
        return True

    def worker_failed(self, worker) -> bool:
        """Count a worker's failure; True when it has just reached BLOCK_AFTER."""
        self.worker_failures[worker] = self.worker_failures.get(worker, 0) + 1
        return self.worker_failures[worker] == BLOCK_AFTER

    def fail_queued(self, error: str) -> None:
        while self.queue:
            for task in self.queue.take(None) or []:
                self.record(RenderResult(task=task, status="failed", error=error))

    def progress(self) -> dict:
        """Numbers for `farm jobs` and the queue-depth metric: done counts skipped (resumed) ones."""
        s = self.summary
        done, left = s.ok + s.skipped, s.total - s.ok - s.skipped - s.failed
        elapsed = time.perf_counter() - self.started
        rate = s.ok / elapsed if s.ok else 0.0
        farm_metrics().queue_depth.set(left, {"job": self.job})
        return {"total": s.total, "done": done, "failed": s.failed, "left": left,
                "eta_s": round(left / rate) if rate else None, "updated": time.time()}

    def record(self, result: RenderResult) -> None:
        self.writer.add(result)
        if result.status == "ok":
            self.summary.ok += 1
        else:
            self.summary.failed += 1
            if len(self.summary.errors) < 20:
                self.summary.errors.append(f"{result.task.title}: {result.error}")
        self.bar.update(1)
        self.bar.set_postfix(ok=self.summary.ok, failed=self.summary.failed, refresh=False)

    def close(self) -> None:
        self.writer.flush()
        self.bar.close()


def _pool_size(actors: int | None, work: int) -> tuple[int, bool]:
    resources = ray.cluster_resources()
    use_gpus = resources.get("GPU", 0) >= 1
    slots = int(resources.get("GPU", 0) if use_gpus else resources.get("CPU", 1))
    return max(1, min(actors or slots, slots, max(work, 1))), use_gpus


def _drive(pool, feed: _Feed, trains: deque, depth: int, on_checkpoint=None, recycle_after: int = 0,
           task_timeout_s: float = 0) -> None:
    """Keep every usable worker busy until no work is left: training runs first (a worker takes
    one when it has no render chunk in flight), render chunks by affinity otherwise. Checkpoints
    stream back while a run trains, and `on_checkpoint` may queue renders for them at once.
    `pool` (pool.PrivatePool or pool.SharedPool) says which workers this job may use now.
    `recycle_after`: replace a worker by a fresh process once it was sent that many tasks and
    finished them (like Ray's max_calls: memory that grows anyway is given back).
    `task_timeout_s`: a worker whose current chunk takes longer than this per task is killed
    (Ray restarts it) and the chunk goes to the queue again, counted as a failure of that worker."""
    renders: dict = {}  # ref → (worker, chunk)
    training: dict = {}  # streaming generator → (worker, TrainRun)
    load: dict = {}  # worker → chunks in flight
    train_attempts: dict[str, int] = {}
    busy_training: set = set()

    rendered: dict = {}  # worker → tasks since it started
    sent: dict = {}  # worker → tasks sent to its current process (for recycle_after)
    busy_since: dict = {}  # worker → when its oldest chunk in flight started (roughly)

    def due_for_recycling(key) -> bool:
        return bool(recycle_after) and pool.recycles and sent.get(key, 0) >= recycle_after

    def fill(key) -> None:
        if key in busy_training:
            return
        if due_for_recycling(key):
            if load.get(key) or not (feed.queue or trains):
                return  # let it finish what it has, then replace it (if there is more to do)
            pool.recycle(key)
            sent[key] = rendered[key] = 0
            if key not in pool.usable():  # a shared pool's worker comes back when the keeper has replaced it
                return
        worker = pool.handles[key]
        if trains and not load.get(key) and pool.can_train(key):
            job = trains.popleft()
            pool.pin(key, True)
            generator = worker.train.options(num_returns="streaming", name=f"train {job.run}").remote(job)
            training[generator] = (key, job)
            busy_training.add(key)
            return
        while load.get(key, 0) < depth and not due_for_recycling(key):
            chunk = feed.queue.take(key)
            if chunk is None:
                return
            pool.offer(chunk)
            name = chunk[0].title if len(chunk) == 1 else f"{chunk[0].title} (+{len(chunk) - 1})"
            ref = worker.render_batch.options(name=name[:80]).remote(chunk, pool.source())
            renders[ref] = (key, chunk)
            sent[key] = sent.get(key, 0) + len(chunk)
            if not load.get(key):
                busy_since[key] = time.monotonic()
            load[key] = load.get(key, 0) + 1

    def end_training(ref, key) -> None:
        del training[ref]
        busy_training.discard(key)
        pool.pin(key, False)

    while True:
        pool.sync(load, feed.progress())
        for key in pool.usable():
            fill(key)
        queued = sum(len(chunks) for chunks in feed.queue.chunks.values())
        if not renders and not training and not queued and not trains:
            return
        pool.want(len(trains) + -(-queued // depth) - len(pool.usable()))
        tick = pool.tick if not task_timeout_s else min(pool.tick or 1.0, 1.0)
        ready, _ = ray.wait([*renders, *training, *pool.waitables()], num_returns=1, timeout=tick)
        if task_timeout_s:
            _stop_overdue(pool, renders, busy_since, task_timeout_s, feed, rendered)
        for ref in ready:
            if ref in training:
                key, job = training[ref]
                try:
                    checkpoint = ray.get(next(ref))
                except StopIteration:
                    end_training(ref, key)
                    continue
                except WORKER_GONE as exc:  # the worker died mid-run: resume from its saved state
                    end_training(ref, key)
                    train_attempts[job.run] = train_attempts.get(job.run, 0) + 1
                    if train_attempts[job.run] < MAX_ATTEMPTS:
                        trains.appendleft(job)
                    else:
                        feed.summary.failed_runs.append(f"{job.run}: worker died {MAX_ATTEMPTS} times: {first_line(exc)}")
                    continue
                except RayTaskError as exc:  # the run itself failed (bad data, bad options): others go on
                    end_training(ref, key)
                    feed.summary.failed_runs.append(f"{job.run}: {first_line(exc.cause or exc)}")
                    continue
                if on_checkpoint:
                    on_checkpoint(checkpoint)
                continue
            if ref not in renders:
                pool.on_ready(ref)
                continue
            key, chunk = renders.pop(ref)
            load[key] -= 1
            busy_since[key] = time.monotonic()
            rendered[key] = rendered.get(key, 0) + len(chunk)
            try:
                results = ray.get(ref)
            except WORKER_GONE as exc:
                _requeue_lost(chunk, key, feed.queue, feed.lost_on, feed.record, exc)
                results = []
                if key in pool.handles:  # stop sending it work; a restarted worker comes back through the pool
                    pool.lost(key)
            except RayTaskError as exc:  # the worker itself broke on this chunk: fail its tasks, go on
                results = [RenderResult(task=t, status="failed", error=first_line(exc.cause or exc)) for t in chunk]
            for result in results:
                if result.status == "failed" and result.retryable and feed.retry_elsewhere(result, key):
                    if feed.worker_failed(key) and pool.block(key):
                        feed.bar.write(f"worker {key} failed {BLOCK_AFTER} tasks of this job: no more tasks for it")
                    continue
                feed.record(result)
        if not pool.usable() and pool.all_blocked() and (feed.queue or renders):
            feed.fail_queued(f"no eligible worker left: every worker failed {BLOCK_AFTER} tasks of this job")


def _stop_overdue(pool, renders: dict, busy_since: dict, task_timeout_s: float, feed: _Feed,
                  rendered: dict) -> None:
    """Kill workers stuck on a chunk (a hung driver call, a deadlocked GPU): Ray restarts them,
    and the chunk's tasks come back through the lost-worker path, to any live worker. A worker
    that has not finished a chunk yet gets COLD_FACTOR times longer: it loads its pipeline first."""
    now = time.monotonic()
    oldest: dict = {}  # worker → its oldest chunk in flight (renders keep the order they were sent in)
    for key, chunk in renders.values():
        oldest.setdefault(key, chunk)
    for key, chunk in oldest.items():
        allowed = task_timeout_s * len(chunk) * (1 if rendered.get(key) else COLD_FACTOR)
        if now - busy_since.get(key, now) > allowed:
            feed.bar.write(f"worker {key}: no answer in {allowed:.0f} s; restarting it")
            ray.kill(pool.handles[key], no_restart=False)
            busy_since[key] = now  # once per timeout
            if feed.worker_failed(key):
                pool.block(key)


def _open_pool(pool, actors: int | None, work: int, options: PipelineOptions):
    """(pool, opened here): a pool object as given, a list of workers as a private pool that stays
    up, or by default a private pool started for this run."""
    if pool is None:
        count, use_gpus = _pool_size(actors, work)
        return PrivatePool.start(count, options, use_gpus), True
    if isinstance(pool, list):
        return PrivatePool(pool, owned=False), True
    return pool, False


def run_plan(plan: Plan, run: RunFolder, *, actors: int | None = None, chunk_size: int = 4,
             depth: int = 2, options: PipelineOptions = PipelineOptions(), quiet: bool = False,
             pool=None, recycle_after: int = 0, task_timeout_s: float = 0) -> RunSummary:
    """Render every task of `plan` that has no `ok` row in `run`'s manifest, on the current Ray.

    `pool`: a `pool.SharedPool`, a list of workers that are already up (and stay up), or None
    for workers of this run alone."""
    started = time.perf_counter()
    feed = _Feed(run, quiet, chunk_size)
    feed.add(plan.tasks)
    if not any(feed.queue.chunks.values()):
        feed.close()
        return feed.summary
    pool, opened = _open_pool(pool, actors, len(plan.tasks), options)
    try:
        _drive(pool, feed, deque(), depth, recycle_after=recycle_after, task_timeout_s=task_timeout_s)
    finally:
        feed.close()
        if opened:
            pool.close()
    feed.summary.lora_switches = feed.queue.switches
    feed.summary.wall_s = time.perf_counter() - started
    return feed.summary


def run_study(trains: list, replan, run: RunFolder, *, actors: int | None = None, chunk_size: int = 4,
              depth: int = 2, options: PipelineOptions = PipelineOptions(), quiet: bool = False,
              pool=None, recycle_after: int = 0, task_timeout_s: float = 0) -> RunSummary:
    """Train `trains` (TrainRuns) and render their evaluation as each checkpoint appears.

    `replan(checkpoints)` returns the evaluation tasks for the checkpoints known so far; it is
    called at the start (checkpoints from an earlier, interrupted run) and after every new one.
    """
    started = time.perf_counter()
    feed = _Feed(run, quiet, chunk_size)
    known = {}
    recorded = run.read_checkpoints()  # from an earlier, interrupted run of this job
    for row in recorded:
        known.setdefault(row["run"], []).append((row["epoch"], row["label"], str(run.root / row["path"])))
    finished = {row["run"] for row in recorded if row["final"]}
    feed.add(replan(known))

    def on_checkpoint(checkpoint) -> None:
        run.add_checkpoint(checkpoint)
        if not quiet:
            feed.bar.write(f"checkpoint {checkpoint.label}: {checkpoint.path} (step {checkpoint.step})")
        known.setdefault(checkpoint.run, []).append((checkpoint.epoch, checkpoint.label, checkpoint.path))
        feed.add(replan(known))

    pending = deque(job for job in trains if job.run not in finished)
    pool, opened = _open_pool(pool, actors, len(pending) + 1, options)
    try:
        _drive(pool, feed, pending, depth, on_checkpoint, recycle_after, task_timeout_s)
    finally:
        feed.close()
        if opened:
            pool.close()
    feed.summary.lora_switches = feed.queue.switches
    feed.summary.wall_s = time.perf_counter() - started
    return feed.summary


def _requeue_lost(chunk: list[Task], worker, queue: AffinityQueue, lost_on: dict, record, exc) -> None:
    """A chunk whose worker died or left: its tasks go back in the queue for any live worker.

    A task lost on MAX_ATTEMPTS different workers (or lost MAX_LOSSES times in all: a task that
    kills every worker it touches) is failed with the last error instead."""
    retry = []
    for task in chunk:
        losses = lost_on.setdefault(task.task_id, [])
        losses.append(worker)
        if len(set(losses)) >= MAX_ATTEMPTS or len(losses) >= MAX_LOSSES:
            record(RenderResult(task=task, status="failed",
                                error=f"lost with its worker {len(losses)} times: {first_line(exc)}"))
        else:
            retry.append(task)
    if retry:
        queue.put_back(retry)

