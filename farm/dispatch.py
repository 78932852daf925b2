"""The queue: send a plan's tasks to render actors, collect results as they complete.

- Chunks: tasks are cut into small chunks of one group (same model and LoRA set), so an actor
  call never loads anything new mid-chunk and Ray's per-call overhead is shared by a few renders.
- Affinity: a free actor takes the next chunk of the group it rendered last; when that runs out
  it takes a group no other actor is on; only then does it steal the tail of another's group.
- Bounded in-flight work: each actor has at most `depth` chunks queued (one rendering, one
  waiting), so results stream back steadily and nothing piles up in the object store.
- Failures: a failed task is a `failed` row with its error and the job goes on. A chunk lost to
  a dying actor is requeued (Ray restarts the actor); a task lost three times is marked failed.
"""

from __future__ import annotations

import os
import sys
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import ray
from ray.exceptions import RayActorError

from .actors import start_render_actors
from .manifest import ManifestWriter, RunFolder
from .pipeline import PipelineOptions
from .plan import Plan, Task
from .render import RenderResult

MAX_ATTEMPTS = 3


@dataclass
class RunSummary:
    total: int
    skipped: int  # already `ok` in the manifest
    ok: int = 0
    failed: int = 0
    wall_s: float = 0.0
    lora_switches: int = 0
    errors: list[str] = field(default_factory=list)


def connect(address: str | None = None, gpus: int | None = None) -> bool:
    """Join the cluster at `address` (or a running local one); else start a local Ray.

    A local Ray on a machine without CUDA declares one logical GPU per CPU core, so render
    actors are placed one per core exactly as they would be one per GPU. Returns True when
    this process started Ray (and so should stop it).
    """
    if ray.is_initialized():
        return False
    env = {"runtime_env": {"env_vars": _forwarded_env()}}
    if address:
        ray.init(address=address, namespace="sdfarm", **env)
        return False
    try:
        ray.init(address="auto", namespace="sdfarm", **env)
        return False
    except ConnectionError:
        pass
    if gpus is None:
        import torch

        gpus = torch.cuda.device_count() or (os.cpu_count() or 1)
    ray.init(num_gpus=gpus, num_cpus=os.cpu_count(), namespace="sdfarm", include_dashboard=False,
             dashboard_host="127.0.0.1", **env)
    return True


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


def run_plan(plan: Plan, run: RunFolder, *, actors: int | None = None, chunk_size: int = 4,
             depth: int = 2, options: PipelineOptions = PipelineOptions(), quiet: bool = False) -> RunSummary:
    """Render every task of `plan` that has no `ok` row in `run`'s manifest, on the current Ray."""
    started = time.perf_counter()
    done = run.done_ids()
    pending = [t for t in plan.tasks if t.task_id not in done]
    summary = RunSummary(total=len(plan.tasks), skipped=len(plan.tasks) - len(pending))
    if not pending:
        return summary
    resources = ray.cluster_resources()
    use_gpus = resources.get("GPU", 0) >= 1
    slots = int(resources.get("GPU", 0) if use_gpus else resources.get("CPU", 1))
    count = max(1, min(actors or slots, slots, len(pending)))
    pool = start_render_actors(count, options, use_gpus)
    queue = AffinityQueue(make_chunks(pending, chunk_size))
    writer = ManifestWriter(run)
    attempts: dict[str, int] = {}
    inflight: dict = {}
    bar = _progress(len(pending), quiet)

    def record(result: RenderResult) -> None:
        writer.add(result)
        if result.status == "ok":
            summary.ok += 1
        else:
            summary.failed += 1
            if len(summary.errors) < 20:
                summary.errors.append(f"{result.task.title}: {result.error}")
        bar.update(1)
        bar.set_postfix(ok=summary.ok, failed=summary.failed, refresh=False)

    def submit(index: int) -> bool:
        chunk = queue.take(index)
        if chunk is None:
            return False
        name = chunk[0].title if len(chunk) == 1 else f"{chunk[0].title} (+{len(chunk) - 1})"
        ref = pool[index].render_batch.options(name=name[:80]).remote(chunk)
        inflight[ref] = (index, chunk)
        return True

    try:
        for index in range(count):
            for _ in range(depth):
                submit(index)
        while inflight:
            ready, _ = ray.wait(list(inflight), num_returns=1)
            for ref in ready:
                index, chunk = inflight.pop(ref)
                try:
                    results = ray.get(ref)
                except RayActorError as exc:
                    _requeue_lost(chunk, queue, attempts, record, exc)
                    results = []
                for result in results:
                    record(result)
                submit(index)
    finally:
        writer.flush()
        bar.close()
        for actor in pool:
            ray.kill(actor)
    summary.lora_switches = queue.switches
    summary.wall_s = time.perf_counter() - started
    return summary


def _requeue_lost(chunk: list[Task], queue: AffinityQueue, attempts: dict, record, exc) -> None:
    """A chunk whose actor died: retry its tasks (Ray restarts the actor), up to MAX_ATTEMPTS."""
    retry = []
    for task in chunk:
        attempts[task.task_id] = attempts.get(task.task_id, 0) + 1
        if attempts[task.task_id] >= MAX_ATTEMPTS:
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            record(RenderResult(task=task, status="failed",
                                error=f"worker died {MAX_ATTEMPTS} times: {first_line[:300]}"))
        else:
            retry.append(task)
    if retry:
        queue.put_back(retry)
