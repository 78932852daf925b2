"""Who may use which worker: a private pool for one run, or the cluster's shared warm pool.

Both are a `WorkerPool`, the one contract the dispatch driver uses.

The shared pool is one detached `PoolKeeper` actor (named `sdfarm-pool`) that keeps one
long-lived, named worker per GPU of every live node (growing when nodes join, forgetting workers
of nodes that left) and lends them to job drivers. Every job's driver asks for as many workers as
it has work for; free workers go to the waiting job with the highest priority (ties: the earlier
job), preferring workers that job used last, whose pipeline and LoRAs are already loaded.

A lease lasts `LEASE_S`; the driver renews it while no other job of equal or higher priority
waits, so a running job keeps its workers (and its pipelining) until a more urgent job arrives,
then gives them up within one lease once their queued chunks finish: priority acts at chunk
boundaries and nothing in flight is abandoned. A training run pins its worker until it ends.
Pausing a job stops its renewals and grants; a driver that stops reporting for `STALE_S` (killed)
loses its workers. Progress reports double as heartbeats and feed `farm jobs`.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Hashable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import ray
from ray.actor import ActorHandle
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from farm.cluster.actors import Source, artifact_source, restarts_used_up, start_pool_worker, start_workers
from farm.cluster.connect import NAMESPACE
from farm.cluster.jobqueue import print_progress
from farm.errors import ClusterError
from farm.models.artifacts import shared_roots
from farm.render.pipeline import PipelineOptions
from farm.sweep.plan import Task

POOL_NAME = "sdfarm-pool"
LEASE_S = 5.0
STALE_S = 30.0
REFRESH_S = 2.0
REST_S = 10.0
PRINT_S = 10.0
FETCH_ASK_S = 3.0  # how often a driver asks its workers whether one is copying a model


@dataclass
class _Job:
    """A job's driver as the keeper sees it: its place in the queue, what it waits for, its leases."""

    key: str  # a submitted job's submission id, else "job name@run folder"
    priority: int
    seq: int
    want: int = 0
    paused: bool = False
    granted: list = field(default_factory=list)
    blocked: set = field(default_factory=set)
    progress: dict = field(default_factory=dict)
    seen: float = field(default_factory=time.monotonic)
    event: asyncio.Event = field(default_factory=asyncio.Event)


class PoolKeeper:
    """The shared pool's bookkeeping (an async actor: waiting drivers cost nothing)."""

    def __init__(self, options: PipelineOptions):
        self.options = options
        self.workers: dict[str, object] = {}  # name → handle
        self.node_of: dict[str, str] = {}
        self.held: dict[str, tuple[str, float | None]] = {}  # name → (job key, expires; None: pinned)
        self.last_job: dict[str, str] = {}  # name → key of the job that held it last
        self.jobs: dict[str, _Job] = {}  # job key → its driver's standing
        self.seq = 0
        self.refreshed = 0.0
        self.resting: dict[str, float] = {}  # name → when it may be looked up again

    # --- the driver's side ------------------------------------------------------------------

    async def acquire(self, key: str, priority: int, want: int) -> dict:
        """Wait until this job may have up to `want` more workers.

        Answers {"granted": [(name, handle, node)], "eligible": n}: nothing granted when the
        job ended, or when none of the cluster's workers may serve it (n == 0: each failed
        BLOCK_AFTER of its tasks), so its driver fails what is left instead of waiting forever.
        `eligible` is None while the cluster has no worker at all."""
        job = self._job(key, priority)
        job.want = want
        while True:
            self._refresh()
            self._assign()
            # resting workers come back; with no worker at all, wait for nodes to join
            eligible = len(set(self.node_of) - job.blocked) if self.node_of else None
            if job.granted or eligible == 0 or self.jobs.get(key) is not job:
                granted, job.granted, job.want = job.granted, [], 0
                return {"granted": [(name, self.workers[name], self.node_of[name])
                                    for name in granted if name in self.workers], "eligible": eligible}
            job.event.clear()
            try:
                await asyncio.wait_for(job.event.wait(), REFRESH_S)
            except asyncio.TimeoutError:
                pass

    def renew(self, key: str, names: list[str]) -> list[str]:
        """Extend the leases no more urgent job waits for; the rest run out."""
        job = self.jobs.get(key)
        if job is None or job.paused:
            return []
        job.seen = time.monotonic()
        if any(other.want > 0 and not other.paused and other.key != key and other.priority >= job.priority
               for other in self.jobs.values()):
            return []
        renewed = [name for name in names if self.held.get(name, ("",))[0] == key]
        for name in renewed:
            if self.held[name][1] is not None:
                self.held[name] = (key, time.monotonic() + LEASE_S)
        return renewed

    def release(self, key: str, names: list[str]) -> None:
        for name in names:
            if self.held.get(name, ("",))[0] == key:
                del self.held[name]
                self.last_job[name] = key
        self._wake()

    def block(self, key: str, name: str) -> None:
        """Never lend `name` to this job again (it failed too many of the job's tasks)."""
        job = self.jobs.get(key)
        if job is not None:
            job.blocked.add(name)

    def pin(self, key: str, name: str, pinned: bool) -> None:
        """A training run keeps its worker however long it takes (`pinned=False` ends that)."""
        if self.held.get(name, ("",))[0] == key:
            self.held[name] = (key, None if pinned else time.monotonic() + LEASE_S)

    async def recycle(self, key: str, name: str):
        """Replace a worker this job holds by a fresh process of the same name (memory that grew
        anyway goes with the old one; `farm run --recycle-after N`). Returns the new handle, or
        None when the job no longer holds it. The lease stays the job's meanwhile."""
        if self.held.get(name, ("",))[0] != key or name not in self.workers:
            return None
        ray.kill(self.workers[name], no_restart=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the name is free once the old process is gone
            try:
                ray.get_actor(name, namespace=NAMESPACE)
            except ValueError:
                break
            await asyncio.sleep(0.2)
        index = int(name.rsplit("-", 1)[1])
        self.workers[name] = start_pool_worker(name, self.node_of[name], index, self.options)
        return self.workers[name]

    def lost(self, name: str) -> None:
        """A driver saw this worker die or become unreachable: lend it to nobody for `REST_S`,
        then look it up again (restarted by Ray, or started anew if it is dead), unless its node
        has left by then."""
        self.workers.pop(name, None)
        self.held.pop(name, None)
        self.resting[name] = time.monotonic() + REST_S

    def report(self, key: str, progress: dict) -> dict:
        """Progress in, the job's standing out (a paused job's driver says so in its log)."""
        job = self.jobs.get(key)
        if job is None:
            return {}
        job.seen = time.monotonic()
        job.progress = progress
        return {"paused": job.paused}

    def finish(self, key: str) -> None:
        """The job's driver is done: its workers and its place in the queue go."""
        job = self.jobs.pop(key, None)
        self.release(key, [name for name, (holder, _) in self.held.items() if holder == key])
        if job is not None:
            job.event.set()

    # --- the user's side --------------------------------------------------------------------

    def pause(self, key: str, paused: bool = True) -> bool:
        job = self.jobs.get(key)
        if job is None:
            return False
        job.paused = paused
        self._wake()
        return True

    async def status(self) -> dict:
        """Workers (with what each holds and has done) and jobs, for `farm pool` / `farm jobs`."""
        self._refresh(force=True)
        workers = {}
        for name, handle in self.workers.items():
            try:
                holds = await asyncio.wait_for(handle.holds.remote(), 10)
            except Exception as exc:  # a dead or still-starting worker still shows
                holds = {"error": type(exc).__name__}
            workers[name] = {**holds, "held_by": self.held.get(name, ("",))[0]}
        jobs = {key: {"priority": job.priority, "paused": job.paused,
                      "waiting_for": job.want, **job.progress} for key, job in self.jobs.items()}
        return {"workers": workers, "jobs": jobs}

    async def missing(self, paths: list[str]) -> dict[str, list[str]]:
        """{node: paths it lacks}, asking one worker per live node."""
        self._refresh(force=True)
        one_per_node = {}
        for name, node_id in self.node_of.items():
            if name in self.workers:  # not one resting after a driver saw it die
                one_per_node.setdefault(node_id, self.workers[name])
        answers = await asyncio.gather(*(w.missing.remote(paths) for w in one_per_node.values()),
                                       return_exceptions=True)
        return {node_id: ([] if isinstance(answer, Exception) else answer)
                for node_id, answer in zip(one_per_node, answers)}

    # --- inside -----------------------------------------------------------------------------

    def _job(self, key: str, priority: int) -> _Job:
        job = self.jobs.get(key)
        if job is None:
            self.seq += 1
            job = self.jobs[key] = _Job(key, priority, self.seq)
        job.priority, job.seen = priority, time.monotonic()
        return job

    def _wake(self) -> None:
        for job in self.jobs.values():
            job.event.set()

    def _refresh(self, force: bool = False) -> None:
        """One worker per GPU of every live node; drop jobs whose driver went quiet."""
        now = time.monotonic()
        if not force and now - self.refreshed < REFRESH_S:
            return
        self.refreshed = now
        nodes = [n for n in ray.nodes() if n["Alive"]]
        alive = {n["NodeID"] for n in nodes}
        for name in [n for n, node in self.node_of.items() if node not in alive]:
            self.workers.pop(name, None)
            self.node_of.pop(name)
            self.held.pop(name, None)
        for node in nodes:
            node_id = node["NodeID"]
            for index in range(int(node["Resources"].get("GPU", 0))):
                name = f"sdfarm-worker-{node_id[:8]}-{index}"
                if name not in self.workers and self.resting.get(name, 0) <= now:
                    self.workers[name] = start_pool_worker(name, node_id, index, self.options)
                    self.node_of[name] = node_id
        for key in [k for k, job in self.jobs.items() if now - job.seen > STALE_S]:
            self.finish(key)
        for name, (holder, expires) in list(self.held.items()):
            if expires is not None and now > expires + STALE_S:  # granted, never renewed nor released
                self.release(holder, [name])

    def _assign(self) -> None:
        now = time.monotonic()
        free = [name for name in self.workers if name not in self.held]
        waiting = sorted((j for j in self.jobs.values() if j.want > 0 and not j.paused),
                         key=lambda j: (-j.priority, j.seq))
        for job in waiting:
            while job.want > 0 and (eligible := [n for n in free if n not in job.blocked]):
                pick = next((n for n in eligible if self.last_job.get(n) == job.key), eligible[0])
                free.remove(pick)
                self.held[pick] = (job.key, now + LEASE_S)
                job.granted.append(pick)
                job.want -= 1
            if job.granted:
                job.event.set()


def head_node_id() -> str:
    """The head node outlives every job, so the keeper lives there."""
    return next(n["NodeID"] for n in ray.nodes() if n["Alive"] and "node:__internal_head__" in n["Resources"])


def pool_keeper(options: PipelineOptions = PipelineOptions()):
    """The cluster's keeper, started on first use on the head node (which lives as long as the
    cluster); its workers use the first caller's options."""
    return ray.remote(PoolKeeper).options(
        name=POOL_NAME, namespace=NAMESPACE, get_if_exists=True, lifetime="detached", num_cpus=0,
        max_concurrency=1000, scheduling_strategy=NodeAffinitySchedulingStrategy(head_node_id(), soft=False),
    ).remote(options)


class WorkerPool(Protocol):
    """Which workers one job's driver may use, and when: the contract `dispatch` drives.

    A worker is known by a key (an index in a private pool, an actor name in the shared one) that
    stays the same when Ray or the pool replaces the process behind it. The driver calls `sync`,
    then fills every `usable` worker, then waits on its results together with `waitables`.
    """

    @property
    def handles(self) -> dict[Any, ActorHandle]:
        """Worker key → actor handle, for every worker the job holds now (usable or not)."""
        ...

    @property
    def tick(self) -> float | None:
        """Longest wait for a result, in seconds, before the driver calls `sync` again; None:
        nothing changes in the pool meanwhile, so wait for a result however long it takes."""
        ...

    @property
    def recycles(self) -> bool:
        """Whether `recycle` may be called (only workers the pool may replace are recycled)."""
        ...

    def usable(self) -> list:
        """Keys of the workers the job may send work to now: not blocked, leased, not being replaced."""
        ...

    def want(self, count: int) -> None:
        """The job could keep `count` more workers busy (0 or less: none); a lending pool asks for them."""
        ...

    def waitables(self) -> list:
        """Object refs the pool awaits; the driver waits on them beside its results and passes
        each ready one to `on_ready`, so a grant or renewal is seen as soon as it arrives."""
        ...

    def on_ready(self, ref) -> None:
        """One of `waitables()` is ready: take its answer."""
        ...

    def sync(self, load: dict, progress: dict) -> None:
        """Once per turn of the driver's loop, with the chunks in flight per worker key and the job's
        progress: renew or give back leases (never a worker with chunks in flight), report progress."""
        ...

    def offer(self, chunk: list[Task]) -> None:
        """`chunk` is about to be sent: make its LoRA files reachable from every worker (see `source`)."""
        ...

    def source(self) -> Source | None:
        """Where workers fetch the files offered so far, with the job's pipeline options; None:
        workers read the planned paths and keep the options they were started with."""
        ...

    def can_train(self, key: Hashable) -> bool:
        """Whether a training run may go to this worker (its dataset and output folder are there)."""
        ...

    def pin(self, key: Hashable, pinned: bool) -> None:
        """Keep the worker for this job however long a training run on it takes (False: that run ended)."""
        ...

    def recycle(self, key: Hashable) -> None:
        """Replace the worker by a fresh process (memory that grew anyway goes with the old one)."""
        ...

    def lost(self, key: Hashable) -> None:
        """The worker died or its node left while it had work of this job."""
        ...

    def block(self, key: Hashable) -> None:
        """The job sends this worker no more tasks (it failed too many of them)."""
        ...

    def all_blocked(self) -> bool:
        """Every worker the job could ever be given is blocked: the driver fails what is left
        instead of waiting for a worker that will not come."""
        ...

    def close(self) -> None:
        """The job is done: stop the workers the pool started, or give them back."""
        ...


class PrivatePool:
    """A WorkerPool of one run's own workers (started for it, or handed in by the caller), all
    usable until blocked."""

    tick = None

    def __init__(self, workers: list, owned: bool, options: PipelineOptions | None = None, use_gpus: bool = False):
        self.handles = dict(enumerate(workers))
        self.owned = owned  # started here, so stopped (and recycled) here
        self.options, self.use_gpus = options, use_gpus  # how to start a replacement
        self.blocked: set = set()

    @classmethod
    def start(cls, count: int, options: PipelineOptions, use_gpus: bool) -> PrivatePool:
        return cls(start_workers(count, options, use_gpus), owned=True, options=options, use_gpus=use_gpus)

    @property
    def recycles(self) -> bool:
        """Only workers this pool started are replaced (`recycle`)."""
        return self.owned

    def recycle(self, key: int) -> None:
        ray.kill(self.handles[key])
        self.handles[key] = start_workers(1, self.options, self.use_gpus)[0]

    def usable(self) -> list[int]:
        return [key for key in self.handles if key not in self.blocked]

    def block(self, key: int) -> None:
        self.blocked.add(key)

    def all_blocked(self) -> bool:
        return self.blocked >= set(self.handles)

    def want(self, count: int) -> None: ...  # every worker it will ever have is here already

    def waitables(self) -> list:
        return []

    def on_ready(self, ref) -> None: ...

    def sync(self, load: dict, progress: dict) -> None: ...  # no leases; progress shows in the bar

    def offer(self, chunk: list[Task]) -> None: ...

    def source(self) -> Source | None:
        return None  # a private run renders where it was planned (or the nodes share folders)

    def can_train(self, key: int) -> bool:
        return True

    def pin(self, key: int, pinned: bool) -> None: ...

    def lost(self, key: int) -> None:
        """Ray restarts the actor behind the same handle, RESTARTS times; one with none left would
        fail every chunk sent to it at once, so it is replaced (a worker of this pool) or dropped."""
        if not restarts_used_up(self.handles[key]):
            return
        if self.owned:
            self.recycle(key)
        else:
            del self.handles[key]

    def close(self) -> None:
        for worker in self.handles.values() if self.owned else []:
            ray.kill(worker)


class SharedPool:
    """A WorkerPool of this driver's leases on the shared pool's workers."""

    tick = 1.0  # seconds between lease checks while waiting for results
    recycles = True  # the keeper replaces any worker it lent

    def __init__(self, key: str, priority: int, options: PipelineOptions):
        self.key, self.priority = key, priority
        self.options = options  # sent with every chunk: the shared workers take this job's options
        self.keeper = pool_keeper(options)
        self.handles: dict[str, object] = {}
        self.node_of: dict[str, str] = {}
        self.here = ray.get_runtime_context().get_node_id()
        self.deadline: dict[str, float] = {}
        self.pinned: set[str] = set()
        self.request = None
        self.renewal = None
        self.renewing: list[str] = []
        self.offered: set[str] = set()
        self.blocked: set[str] = set()
        self.eligible = 1  # workers of the cluster this job may still use, as the keeper last said
        self.recycling: dict = {}  # keeper's answer → worker being replaced by a fresh process
        self._source = None
        self.reported = 0.0
        self.standing: dict = {}
        self.standing_ref = None
        self.printed = time.monotonic()
        self.fetching: list[dict] = []  # base models this job's workers are copying to their node
        self.fetch_refs: list = []
        self.fetch_asked = 0.0

    def usable(self) -> list[str]:
        now = time.monotonic()
        return [name for name in self.handles if name not in self.blocked and name not in self.recycling.values()
                and (name in self.pinned or self.deadline[name] > now)]

    def block(self, name: str) -> None:
        """Its lease runs out, and the keeper never lends it to this job again."""
        self.blocked.add(name)
        self.keeper.block.remote(self.key, name)

    def all_blocked(self) -> bool:
        """Every worker of the cluster failed too many of this job's tasks (a node that joins
        later does not help this run; resume the job then)."""
        return self.eligible == 0

    def want(self, count: int) -> None:
        if count > 0 and self.request is None:
            self.request = self.keeper.acquire.remote(self.key, self.priority, count)

    def waitables(self) -> list:
        return [ref for ref in (self.request, self.renewal, *self.recycling) if ref is not None]

    def on_ready(self, ref) -> None:
        now = time.monotonic()
        if ref is self.request:
            self.request = None
            answer = ray.get(ref)
            self.eligible = answer["eligible"]
            for name, handle, node_id in answer["granted"]:
                self.handles[name] = handle
                self.node_of[name] = node_id
                self.deadline[name] = now + LEASE_S
        elif ref is self.renewal:
            self.renewal = None
            renewed = set(ray.get(ref))
            for name in self.renewing:  # refused: a more urgent job waits; queue nothing more there
                if name in self.deadline:
                    self.deadline[name] = now + LEASE_S if name in renewed else min(self.deadline[name], now)
        elif ref in self.recycling:
            name, handle = self.recycling.pop(ref), ray.get(ref)
            if handle is not None and name in self.handles:
                self.handles[name] = handle

    def sync(self, load: dict, progress: dict) -> None:
        """Renew leases about to run out, give back drained expired ones, report progress."""
        now = time.monotonic()
        soon = [n for n in self.handles if n not in self.pinned and self.deadline[n] - now < LEASE_S / 2]
        if soon and self.renewal is None:
            self.renewing = soon
            self.renewal = self.keeper.renew.remote(self.key, soon)
        done = [n for n in self.handles if n not in self.pinned and not load.get(n)
                and (self.deadline[n] <= now or n in self.blocked)]
        if done:
            self.keeper.release.remote(self.key, done)
            for name in done:
                del self.handles[name], self.deadline[name]
        if self.standing_ref is not None and ray.wait([self.standing_ref], timeout=0)[0]:
            standing, self.standing_ref = ray.get(self.standing_ref), None
            if standing != self.standing:  # paused or released: say so in the log at once
                self.printed = 0.0
            self.standing = standing
        progress.update(self.standing)
        self._watch_fetches(now)
        if self.fetching:
            progress["fetching"] = self.fetching
        if now - self.reported > 2.0 and self.standing_ref is None:
            self.standing_ref = self.keeper.report.remote(self.key, progress)
            self.reported = now
        if now - self.printed > PRINT_S:
            print_progress(progress)
            self.printed = now

    def _watch_fetches(self, now: float) -> None:
        """Every few seconds, ask this job's workers (beside their render call) whether one is
        copying a base model to its node, so `farm jobs` shows how far the copy got."""
        if self.fetch_refs and not ray.wait(self.fetch_refs, num_returns=len(self.fetch_refs), timeout=0)[1]:
            answers = []
            for ref in self.fetch_refs:
                try:
                    answers.append(ray.get(ref).get("fetching"))
                except Exception:  # a worker that died meanwhile: the next round asks its successor
                    pass
            fetching = [answer for answer in answers if answer]
            if bool(fetching) != bool(self.fetching):  # a copy started or ended: say so in the log at once
                self.printed = 0.0
            self.fetching, self.fetch_refs = fetching, []
        if not self.fetch_refs and now - self.fetch_asked > FETCH_ASK_S:
            self.fetch_refs = [handle.holds.remote() for handle in self.handles.values()]
            self.fetch_asked = now

    def source(self) -> Source | None:
        return self._source

    def recycle(self, name: str) -> None:
        """Have the keeper replace this worker by a fresh process; it takes no work meanwhile."""
        self.recycling[self.keeper.recycle.remote(self.key, name)] = name

    def offer(self, chunk: list[Task]) -> None:
        """Let workers on other nodes fetch this chunk's LoRAs and base models from this node."""
        files = {lora.sha256: lora.path for task in chunk for lora in task.loras if lora.sha256 not in self.offered}
        files.update({task.model_sha256: task.model_path for task in chunk if task.model_sha256 not in self.offered})
        if files or self._source is None:
            self._source = replace(artifact_source(files), options=self.options)
            self.offered.update(files)

    def can_train(self, name: str) -> bool:
        """Training reads its dataset and writes checkpoints where the job was planned (the
        head), unless the nodes share folders."""
        return self.node_of.get(name) == self.here or bool(shared_roots())

    def pin(self, name: str, pinned: bool) -> None:
        (self.pinned.add if pinned else self.pinned.discard)(name)
        self.deadline[name] = time.monotonic() + LEASE_S
        self.keeper.pin.remote(self.key, name, pinned)

    def lost(self, name: str) -> None:
        """Let it go; the keeper lends it again once Ray has restarted it (or started it anew)."""
        self.handles.pop(name, None)
        self.deadline.pop(name, None)
        self.pinned.discard(name)
        self.keeper.lost.remote(name)

    def check_models(self, paths: list[str]) -> None:
        """Fail before rendering when no node has a base model (the planning node sends it to the
        nodes without it; a model gone from every node, this one too, cannot be sent)."""
        lacking = ray.get(self.keeper.missing.remote(sorted(set(paths))))
        if not lacking:
            raise ClusterError("the cluster has no GPU nodes (start nodes with `ray start --num-gpus N`)")
        for path in sorted(set(paths)):
            without = [node[:8] for node, missing in lacking.items() if path in missing]
            if len(without) == len(lacking) and not Path(path).exists():
                raise ClusterError(f"{path}: model is on none of the cluster's nodes ({', '.join(without)}); "
                                   "put it at that path on the node that plans the job (it sends it to the others)")
            if without:
                print(f"farm: nodes {', '.join(without)} lack {path}: each fetches a checked copy from this node "
                      "once (resumed if cut short)", file=sys.stderr)

    def close(self) -> None:
        try:
            ray.get(self.keeper.finish.remote(self.key), timeout=30)
        except Exception as exc:  # the keeper takes the leases back when this job goes quiet anyway
            print(f"farm: warning: could not return workers to the pool: {type(exc).__name__}", file=sys.stderr)


def run_control(action: str, key: str) -> dict:
    """On the head, inside a control job: act on the pool's keeper."""
    ray.init(address="auto", namespace=NAMESPACE, logging_level="ERROR")
    try:
        keeper = ray.get_actor(POOL_NAME, namespace=NAMESPACE)
    except ValueError:
        return {"found": False, "workers": {}, "jobs": {}}
    if action in ("pause", "resume"):
        return {"found": ray.get(keeper.pause.remote(key, action == "pause"))}
    if action == "pool":
        return ray.get(keeper.status.remote())
    raise ClusterError(f"farm control: unknown action {action!r}")
