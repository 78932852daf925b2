"""The dispatch driver: send a plan's render tasks (and training runs) to a job's workers, collect
results as they complete. Which workers a job may use, and when, is its `pool.WorkerPool`.

- Chunks: tasks are cut into small chunks of one group (same model and LoRA set), so an actor
  call never loads anything new mid-chunk and Ray's per-call overhead is shared by a few renders.
- Affinity: a free actor takes the next chunk of the group it rendered last; when that runs out
  it takes a group no other actor is on; only then does it steal the tail of another's group.
- Bounded in-flight work: each actor has at most `depth` chunks queued (one rendering, one
  waiting), so results stream back steadily and nothing piles up in the object store.
- Failures: a failed task is a `failed` row with its error and the job goes on. A task that
  failed for a reason another worker may not have (`retryable`) goes to another worker, until it
  failed on MAX_ATTEMPTS different workers (or 2 × MAX_ATTEMPTS times); a worker that fails
  BLOCK_AFTER of a job's tasks gets no more of them. A chunk lost to a dying actor is requeued
  (Ray restarts the actor); a task lost on MAX_ATTEMPTS different workers, or MAX_LOSSES times
  in all, is marked failed. With a task timeout, a worker stuck on a chunk is killed the same way.
  A worker whose process died gets nothing until it answers again: a call sent while Ray
  restarts it fails after ~2 s, and would count as one more loss or death.
- Training: a worker with no render chunk in flight takes the next training run; its checkpoints
  stream back (a Ray streaming generator) and are re-planned into render tasks at once, which
  any free worker takes. A run whose worker dies resumes from its saved state on the next free
  one; the MAX_ATTEMPTS-th death fails the run.
"""

from __future__ import annotations

import sys
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import ray
from ray.exceptions import ActorUnavailableError, ActorUnschedulableError, RayActorError, RayTaskError

from farm.cluster.metrics import farm_metrics
from farm.cluster.pool import PrivatePool, WorkerPool
from farm.errors import first_line
from farm.render.pipeline import PipelineOptions
from farm.render.renderer import RenderResult
from farm.runs.manifest import ManifestWriter, RunFolder
from farm.sweep.plan import Plan, Task

if TYPE_CHECKING:  # the trainer is imported only by a worker that trains
    from farm.train.trainer import Checkpoint, TrainRun

MAX_ATTEMPTS = 3  # different workers a task may fail or be lost on; worker deaths that fail a training run
MAX_LOSSES = 20  # a task lost this many times in all kills every worker it touches: it fails
PACE_WINDOW_S = 60.0  # the ETA follows the pace of the renders that ended this recently
PACE_MIN_SPAN_S = 5.0  # ... once they spread over this many seconds
COLD_FACTOR = 3  # a worker process's first chunk may take this many timeouts (it loads its pipeline)
BLOCK_AFTER = 3  # a worker that fails this many of a job's tasks gets no more of them (Flamenco's rule)
# a worker that died, or can no longer exist (its node left): its work goes to another
WORKER_GONE = (RayActorError, ActorUnschedulableError)


@dataclass
class RunSummary:
    """What a job's run came to (`farm run` prints it)."""

    total: int
    skipped: int  # already `ok` in the manifest
    ok: int = 0
    failed: int = 0
    wall_s: float = 0.0
    lora_switches: int = 0
    errors: list[str] = field(default_factory=list)
    failed_runs: list[str] = field(default_factory=list)  # training runs that stopped with an error


def make_chunks(tasks: list[Task], size: int) -> OrderedDict[tuple, deque[list[Task]]]:
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

    def __init__(self, chunks: OrderedDict[tuple, deque[list[Task]]]):
        self.chunks = chunks
        self.on: dict[int, tuple] = {}  # actor index → group it last took
        self.switches = 0

    def __bool__(self) -> bool:
        return any(self.chunks.values())

    def chunk_count(self) -> int:
        return sum(len(chunks) for chunks in self.chunks.values())

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


def _progress_bar(total: int, quiet: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="img", disable=quiet, file=sys.stderr, dynamic_ncols=True,
                smoothing=0.1, desc="render")


class _Feed:
    """Render tasks in and results out for one run folder: what is done, what is queued, and how
    often each task failed or was lost."""

    def __init__(self, run: RunFolder, quiet: bool, chunk_size: int):
        self.chunk_size = chunk_size
        run.remove_temp_files()  # left by a crashed earlier run of this job
        self.done = run.done_ids()
        self.seen = set(self.done)  # done or queued: never queued twice
        self.planned: set[str] = set()
        self.queue = AffinityQueue(OrderedDict())
        self.writer = ManifestWriter(run)
        self.lost_on: dict[str, list] = {}  # task id → workers it was lost on, in order
        self.failed_on: dict[str, list] = {}  # task id → workers it failed on (retryable failures)
        self.summary = RunSummary(total=0, skipped=0)
        self.bar = _progress_bar(0, quiet)
        # when the latest renders ended: the ETA's pace (not the pace since the start, which counts
        # workers starting and loading their pipelines, and a load that has passed)
        self.ended: deque[float] = deque()
        self.job_name = run.load_run_info().get("job", run.root.name)

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
        failed on MAX_ATTEMPTS different workers, or 2 × MAX_ATTEMPTS times (then its last error is final)."""
        workers = self.failed_on.setdefault(result.task.task_id, [])
        workers.append(worker)
        if len(set(workers)) >= MAX_ATTEMPTS or len(workers) >= 2 * MAX_ATTEMPTS:
            result.error = f"failed on {len(set(workers))} workers; last: {result.error}"
            return False
        self.queue.put_back([result.task])
        return True

    def requeue_lost(self, chunk: list[Task], worker, exc: Exception) -> None:
        """A chunk whose worker died or left: its tasks go back in the queue for any live worker.

        A task lost on MAX_ATTEMPTS different workers (or lost MAX_LOSSES times in all: a task that
        kills every worker it touches) is failed with the last error instead."""
        retry = []
        for task in chunk:
            losses = self.lost_on.setdefault(task.task_id, [])
            losses.append(worker)
            if len(set(losses)) >= MAX_ATTEMPTS or len(losses) >= MAX_LOSSES:
                self.record(RenderResult(task=task, status="failed",
                                         error=f"lost with its worker {len(losses)} times: {first_line(exc)}"))
            else:
                retry.append(task)
        if retry:
            self.queue.put_back(retry)

    def fail_queued(self, error: str) -> None:
        while self.queue:
            for task in self.queue.take(None) or []:
                self.record(RenderResult(task=task, status="failed", error=error))

    def progress(self) -> dict:
        """Numbers for `farm jobs` and the queue-depth metric: done counts skipped (resumed) ones."""
        s = self.summary
        done, left = s.ok + s.skipped, s.total - s.ok - s.skipped - s.failed
        ended = self.ended
        span = ended[-1] - ended[0] if len(ended) > 1 else 0.0
        rate = (len(ended) - 1) / span if span >= PACE_MIN_SPAN_S else 0.0  # a first chunk's burst is no pace
        farm_metrics().queue_depth.set(left, {"job": self.job_name})
        return {"total": s.total, "done": done, "failed": s.failed, "left": left,
                "eta_s": round(left / rate) if rate else None, "updated": time.time()}

    def record(self, result: RenderResult) -> None:
        self.writer.add(result)
        if result.status == "ok":
            self.summary.ok += 1
            now = time.perf_counter()
            self.ended.append(now)
            while now - self.ended[0] > PACE_WINDOW_S:
                self.ended.popleft()
        else:
            self.summary.failed += 1
            if len(self.summary.errors) < 20:
                self.summary.errors.append(f"{result.task.title}: {result.error}")
        self.bar.update(1)
        self.bar.set_postfix(ok=self.summary.ok, failed=self.summary.failed, refresh=False)

    def close(self) -> None:
        self.writer.flush()
        self.bar.close()


def pool_size(actors: int | None, work: int) -> tuple[int, bool]:
    resources = ray.cluster_resources()
    use_gpus = resources.get("GPU", 0) >= 1
    slots = int(resources.get("GPU", 0) if use_gpus else resources.get("CPU", 1))
    return max(1, min(actors or slots, slots, max(work, 1))), use_gpus


def _call_name(chunk: list[Task]) -> str:
    """What the Ray dashboard shows for a render call: its first task, and how many more."""
    name = chunk[0].title if len(chunk) == 1 else f"{chunk[0].title} (+{len(chunk) - 1})"
    return name[:80]


class _Driver:
    """Keeps every usable worker of one job busy until no work is left: training runs first (a
    worker takes one when it has no render chunk in flight), render chunks by affinity otherwise.
    Checkpoints stream back while a run trains, and `on_checkpoint` may queue renders for them at once.

    `recycle_after`: replace a worker by a fresh process once it was sent that many tasks and
    finished them (like Ray's max_calls: memory that grows anyway is given back).
    `task_timeout_s`: a worker whose current chunk takes longer than this per task is killed
    (Ray restarts it) and the chunk goes to the queue again, counted as a failure of that worker.
    Workers are known by their pool's keys.
    """

    def __init__(self, pool: WorkerPool, feed: _Feed, train_runs: deque[TrainRun], depth: int,
                 on_checkpoint: Callable[[Checkpoint], None] | None = None, recycle_after: int = 0,
                 task_timeout_s: float = 0):
        self.pool, self.feed, self.depth = pool, feed, depth
        self.waiting_runs = train_runs  # not started yet, or to resume on another worker
        self.on_checkpoint = on_checkpoint
        self.recycle_after, self.task_timeout_s = recycle_after, task_timeout_s
        self.renders: dict = {}  # ref → (worker, chunk)
        self.trainings: dict = {}  # streaming generator → (worker, TrainRun)
        self.training_on: set = set()  # workers running a training run: they take nothing else
        self.worker_deaths: dict[str, int] = {}  # run name → workers that died under it
        self.load: dict = {}  # worker → chunks in flight
        self.sent: dict = {}  # worker → tasks sent to its current process (for recycle_after)
        self.warm: set = set()  # workers whose current process answered a chunk (else: starting, loading)
        self.busy_since: dict = {}  # worker → when its oldest chunk in flight started (roughly)
        self.failures: dict = {}  # worker → tasks of this job it failed (for BLOCK_AFTER)
        self.returning: dict = {}  # readiness call → worker whose process died, until Ray restarted it

    def run(self) -> None:
        while True:
            self.pool.sync(self.load, self.feed.progress())
            for key in self.pool.usable():
                self._fill(key)
            queued = self.feed.queue.chunk_count()
            if not (self.renders or self.trainings or queued or self.waiting_runs):
                return
            # workers that would have work: a run each, and `depth` queued chunks each
            self.pool.want(len(self.waiting_runs) + -(-queued // self.depth) - len(self.pool.usable()))
            ready = self._wait_for_any()
            if self.task_timeout_s:
                self._stop_overdue()
            for ref in ready:
                self._take(ref)
            self._fail_rest_if_no_worker_left()

    def _wait_for_any(self) -> list:
        """What is ready first: a chunk's results, a checkpoint, or an answer the pool awaits. At
        most the pool's tick (1 s with a task timeout, so that overdue workers are seen)."""
        tick = self.pool.tick if not self.task_timeout_s else min(self.pool.tick or 1.0, 1.0)
        waiting = [*self.renders, *self.trainings, *self.returning, *self.pool.waitables()]
        ready, _ = ray.wait(waiting, num_returns=1, timeout=tick)
        return ready

    def _take(self, ref) -> None:
        if ref in self.trainings:
            self._next_checkpoint(ref)
        elif ref in self.renders:
            self._finish_chunk(ref)
        elif ref in self.returning:
            self._answered(ref)
        else:
            self.pool.on_ready(ref)

    # --- sending work ---------------------------------------------------------------------------

    def _fill(self, key) -> None:
        """Give a usable worker work: the next training run when it has no chunk in flight, else
        render chunks up to `depth`."""
        if key in self.training_on or key in self.returning.values():
            return
        if self._due_for_recycling(key) and not self._recycle(key):
            return
        if self.waiting_runs and not self.load.get(key) and self.pool.can_train(key):
            self._start_training(key)
        else:
            self._send_chunks(key)

    def _due_for_recycling(self, key) -> bool:
        return bool(self.recycle_after) and self.pool.recycles and self.sent.get(key, 0) >= self.recycle_after

    def _recycle(self, key) -> bool:
        """Replace a worker that is due, once it finished what it has and there is more to do;
        True when the fresh worker may take work now."""
        if self.load.get(key) or not (self.feed.queue or self.waiting_runs):
            return False
        self.pool.recycle(key)
        self.sent[key] = 0
        self.warm.discard(key)
        return key in self.pool.usable()  # a shared pool's worker comes back when the keeper has replaced it

    def _start_training(self, key) -> None:
        worker = self.pool.handles[key]
        train_run = self.waiting_runs.popleft()
        self.pool.pin(key, True)
        generator = worker.train.options(num_returns="streaming", name=f"train {train_run.run}").remote(train_run)
        self.trainings[generator] = (key, train_run)
        self.training_on.add(key)

    def _send_chunks(self, key) -> None:
        worker = self.pool.handles[key]
        while self.load.get(key, 0) < self.depth and not self._due_for_recycling(key):
            chunk = self.feed.queue.take(key)
            if chunk is None:
                return
            self.pool.offer(chunk)
            ref = worker.render_batch.options(name=_call_name(chunk)).remote(chunk, self.pool.source())
            self.renders[ref] = (key, chunk)
            self.sent[key] = self.sent.get(key, 0) + len(chunk)
            if not self.load.get(key):
                self.busy_since[key] = time.monotonic()
            self.load[key] = self.load.get(key, 0) + 1

    # --- training runs --------------------------------------------------------------------------

    def _next_checkpoint(self, generator) -> None:
        """A training run's stream has news: a checkpoint, its end, or its failure."""
        key, train_run = self.trainings[generator]
        try:
            checkpoint = ray.get(next(generator))
        except StopIteration:
            self._end_training(generator, key)
        except WORKER_GONE as exc:  # the worker died mid-run: resume from its saved state
            self._end_training(generator, key)
            self._worker_down(key)
            self._resume_elsewhere(train_run, exc)
        except RayTaskError as exc:  # the run itself failed (bad data, bad options): others go on
            self._end_training(generator, key)
            self.feed.summary.failed_runs.append(f"{train_run.run}: {first_line(exc.cause or exc)}")
        else:
            if self.on_checkpoint:
                self.on_checkpoint(checkpoint)

    def _resume_elsewhere(self, train_run: TrainRun, exc: Exception) -> None:
        """Queue a run whose worker died again, first in line; its MAX_ATTEMPTS-th death fails it."""
        deaths = self.worker_deaths[train_run.run] = self.worker_deaths.get(train_run.run, 0) + 1
        if deaths < MAX_ATTEMPTS:
            self.waiting_runs.appendleft(train_run)
        else:
            self.feed.summary.failed_runs.append(
                f"{train_run.run}: worker died {MAX_ATTEMPTS} times: {first_line(exc)}")

    def _end_training(self, generator, key) -> None:
        del self.trainings[generator]
        self.training_on.discard(key)
        self.pool.pin(key, False)

    # --- render results -------------------------------------------------------------------------

    def _finish_chunk(self, ref) -> None:
        """A chunk came back: record its results; a retryable failure goes to another worker."""
        key, chunk = self.renders.pop(ref)
        self.load[key] -= 1
        self.busy_since[key] = time.monotonic()
        for result in self._results(ref, key, chunk):
            if result.status == "failed" and result.retryable and self.feed.retry_elsewhere(result, key):
                if self._count_failure(key):
                    self.feed.bar.write(f"worker {key} failed {BLOCK_AFTER} tasks of this job: no more tasks for it")
            else:
                self.feed.record(result)

    def _results(self, ref, key, chunk: list[Task]) -> list[RenderResult]:
        try:
            results = ray.get(ref)
        except WORKER_GONE as exc:
            self._worker_lost(key, chunk, exc)
            return []
        except RayTaskError as exc:  # the worker itself broke on this chunk: fail its tasks, go on
            self.warm.add(key)
            return [RenderResult(task=t, status="failed", error=first_line(exc.cause or exc)) for t in chunk]
        self.warm.add(key)  # its process has answered: it has started and loaded
        return results

    # --- failing workers ------------------------------------------------------------------------

    def _worker_lost(self, key, chunk: list[Task], exc: Exception) -> None:
        """The worker died or its node left with `chunk` in flight: the chunk goes back in the
        queue, and the worker gets nothing more (a restarted one comes back through the pool, cold)."""
        self.feed.requeue_lost(chunk, key, exc)
        self._worker_down(key)

    def _worker_down(self, key) -> None:
        """The worker's process died: the pool decides whether it stays; if it does, it gets no
        work until it answers a readiness call (Ray has restarted it, or the pool replaced it)."""
        self.warm.discard(key)  # a restarted process starts cold
        if key in self.pool.handles:
            self.pool.lost(key)
        self._ask_ready(key)

    def _ask_ready(self, key) -> None:
        """Send a worker the pool still holds a readiness call; it gets work once that answers."""
        if key in self.pool.handles:
            self.returning[self.pool.handles[key].__ray_ready__.remote()] = key

    def _answered(self, ref) -> None:
        """A worker that died answered its readiness call: back at work, asked again while Ray
        still restarts it, or given up on as dead (the pool decides, as after any death)."""
        key = self.returning.pop(ref)
        try:
            ray.get(ref)
        except ActorUnavailableError:  # still restarting: this call waited ~2 s, so ask again
            self._ask_ready(key)
        except WORKER_GONE:  # dead, or its node left: a pool that keeps it sends its next chunk to find out
            if key in self.pool.handles:
                self.pool.lost(key)

    def _count_failure(self, key) -> bool:
        """Count a task the worker failed; at BLOCK_AFTER the job sends it no more. True when it
        was blocked just now."""
        self.failures[key] = self.failures.get(key, 0) + 1
        if self.failures[key] != BLOCK_AFTER:
            return False
        self.pool.block(key)
        return True

    def _stop_overdue(self) -> None:
        """Kill workers stuck on a chunk (a hung driver call, a deadlocked GPU): Ray restarts them,
        and the chunk's tasks come back through the lost-worker path, to any live worker. A worker
        process that has not answered a chunk yet (new, recycled, or restarted after a death or a
        timeout) gets COLD_FACTOR times longer: it starts and loads its pipeline first."""
        now = time.monotonic()
        oldest: dict = {}  # worker → its oldest chunk in flight (renders keep the order they were sent in)
        for key, chunk in self.renders.values():
            oldest.setdefault(key, chunk)
        for key, chunk in oldest.items():
            allowed = self.task_timeout_s * len(chunk) * (1 if key in self.warm else COLD_FACTOR)
            if key in self.pool.handles and now - self.busy_since.get(key, now) > allowed:
                self.feed.bar.write(f"worker {key}: no answer in {allowed:.0f} s; restarting it")
                ray.kill(self.pool.handles[key], no_restart=False)
                self.warm.discard(key)  # Ray restarts it: a fresh process, cold again
                self.busy_since[key] = now  # once per timeout
                self._count_failure(key)

    def _fail_rest_if_no_worker_left(self) -> None:
        """Every worker the job could get is blocked: fail what is queued instead of waiting."""
        if not self.pool.usable() and self.pool.all_blocked() and (self.feed.queue or self.renders):
            why = (f"every worker failed {BLOCK_AFTER} tasks of this job" if self.pool.handles
                   else "every worker died more often than Ray restarts it")
            self.feed.fail_queued(f"no eligible worker left: {why}")


def _open_pool(pool: WorkerPool | list | None, actors: int | None, work: int,
               options: PipelineOptions) -> tuple[WorkerPool, bool]:
    """(pool, close it after the run): a pool object as given, a list of workers as a private pool
    that stays up, or by default a private pool started for this run."""
    if pool is None:
        count, use_gpus = pool_size(actors, work)
        return PrivatePool.start(count, options, use_gpus), True
    if isinstance(pool, list):
        return PrivatePool(pool, owned=False), True
    return pool, False


def _finished(feed: _Feed, started: float) -> RunSummary:
    feed.summary.lora_switches = feed.queue.switches
    feed.summary.wall_s = time.perf_counter() - started
    return feed.summary


def run_plan(plan: Plan, run: RunFolder, *, actors: int | None = None, chunk_size: int = 4,
             depth: int = 2, options: PipelineOptions = PipelineOptions(), quiet: bool = False,
             pool: WorkerPool | list | None = None, recycle_after: int = 0, task_timeout_s: float = 0) -> RunSummary:
    """Render every task of `plan` that has no `ok` row in `run`'s manifest, on the current Ray.

    `pool`: a WorkerPool (the cluster's `pool.SharedPool`), a list of workers that are already up
    (and stay up), or None for workers of this run alone."""
    started = time.perf_counter()
    feed = _Feed(run, quiet, chunk_size)
    feed.add(plan.tasks)
    if not feed.queue:
        feed.close()
        return feed.summary
    pool, opened = _open_pool(pool, actors, len(plan.tasks), options)
    try:
        _Driver(pool, feed, deque(), depth, recycle_after=recycle_after, task_timeout_s=task_timeout_s).run()
    finally:
        feed.close()
        if opened:
            pool.close()
    return _finished(feed, started)


def run_study(trains: list[TrainRun], replan: Callable[[dict], list[Task]], run: RunFolder, *,
              actors: int | None = None, chunk_size: int = 4, depth: int = 2,
              options: PipelineOptions = PipelineOptions(), quiet: bool = False,
              pool: WorkerPool | list | None = None, recycle_after: int = 0, task_timeout_s: float = 0) -> RunSummary:
    """Train `trains` and render their evaluation as each checkpoint appears.

    `replan(checkpoints)` returns the evaluation tasks for the checkpoints known so far ({run name:
    [(epoch, label, path)]}); it is called at the start (checkpoints from an earlier, interrupted
    run) and after every new one.
    """
    started = time.perf_counter()
    feed = _Feed(run, quiet, chunk_size)
    known: dict[str, list] = {}
    recorded = run.read_checkpoints()  # from an earlier, interrupted run of this job
    for row in recorded:
        known.setdefault(row["run"], []).append((row["epoch"], row["label"], str(run.root / row["path"])))
    finished = {row["run"] for row in recorded if row["final"]}
    feed.add(replan(known))

    def on_checkpoint(checkpoint: Checkpoint) -> None:
        run.add_checkpoint(checkpoint)
        if not quiet:
            feed.bar.write(f"checkpoint {checkpoint.label}: {checkpoint.path} (step {checkpoint.step})")
        known.setdefault(checkpoint.run, []).append((checkpoint.epoch, checkpoint.label, checkpoint.path))
        feed.add(replan(known))

    pending = deque(train_run for train_run in trains if train_run.run not in finished)
    pool, opened = _open_pool(pool, actors, len(pending) + 1, options)
    try:
        _Driver(pool, feed, pending, depth, on_checkpoint, recycle_after, task_timeout_s).run()
    finally:
        feed.close()
        if opened:
            pool.close()
    return _finished(feed, started)
