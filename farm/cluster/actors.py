"""Thin Ray actors: one worker per GPU that renders and trains, and a file server per planning node.

State (the pipeline, the adapter cache, a trainer) lives on the actor, never in module globals.
Each worker takes `num_gpus=1`, so Ray pins it to one GPU (CUDA_VISIBLE_DEVICES) and never puts
two on one card; on a CPU-only cluster whose nodes declare logical GPUs the same placement holds
and the worker runs on the CPU with one torch thread (two 1-thread workers beat one 2-thread
process). A worker holds either a render pipeline or a training run, never both at once, so a
6 GB card fits either.

Files without a shared disk: the driver offers each LoRA it planned to the `ArtifactServer` on its
own node; a worker on another node fetches the bytes from there once (in blocks, through Ray's
object store) into its node cache and checks them against the plan's sha256.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from farm.cluster.connect import NAMESPACE
from farm.cluster.metrics import record_render, record_train_step
from farm.errors import LoraError, ModelError
from farm.models.artifacts import fetched_copy, fetched_model, is_shared, model_listing
from farm.models.cache import farm_cache
from farm.render.pipeline import PipelineOptions
from farm.render.renderer import Renderer, RenderResult
from farm.sweep.plan import LoraUse, Task

if TYPE_CHECKING:  # the trainer and the scorer are imported only by a worker that uses them
    from farm.score.scorer import ScoreSetup
    from farm.train.trainer import Checkpoint, TrainRun

# Ray restarts a killed worker (OOM killer, kill -9, a driver crash) this many times; the
# dispatcher requeues what it had in flight, and fails a task only when it keeps killing workers
RESTARTS = 20
_GROUPS = {"info": 1}  # `holds`/`missing` run beside the one render/train call at a time


@dataclass(frozen=True)
class Source:
    """Where a job's files live: the node that planned it and the server that hands them out."""

    node_id: str
    server: str  # named ArtifactServer actor on that node
    options: PipelineOptions | None = None  # the job's pipeline options (a shared worker takes them on)


class GpuWorker:
    """`render_batch` takes tasks that share a model and LoRA set; `train` streams checkpoints."""

    def __init__(self, index: int, options: PipelineOptions):
        import torch

        gpu_ids = ray.get_gpu_ids()
        self.slot = f"gpu{int(gpu_ids[0])}" if gpu_ids else f"cpu{index}"
        self.node = platform.node()
        self.node_id = ray.get_runtime_context().get_node_id()
        if not torch.cuda.is_available():
            torch.set_num_threads(options.threads or 1)
            options = replace(options, threads=options.threads or 1)
        self.options = options
        # the Ray node id tells apart nodes that share a host name (and shows which node did what)
        self.name = f"worker:{self.slot}@{self.node}/{self.node_id[:8]}"
        self.renderer = self._new_renderer()
        self.counters = {"pipeline_loads": 0, "lora_loads": 0, "fetched": 0, "rendered": 0, "failed": 0, "trained": 0,
                         "scored": 0, "models_fetched": 0, "model_bytes_fetched": 0}
        self.fetching: dict | None = None  # a base model on its way to this node: name, done, total
        self.scorer = None  # farm.score.scorer.Scorer, built by the first score_batch

    def __repr__(self) -> str:  # the name the Ray dashboard shows for this actor
        return self.name

    def _new_renderer(self) -> Renderer:
        renderer = Renderer(self.options, worker=self.name)
        renderer.locate = self._locate
        renderer.locate_model = self._locate_model
        self._source: Source | None = None
        return renderer

    def _retire_renderer(self) -> None:
        """Count what the renderer loaded, then let go of its pipeline (collected, CUDA cache
        emptied) so that what comes next has the whole card."""
        self.renderer.close()
        self.counters["pipeline_loads"] += self.renderer.pipeline_loads
        self.counters["lora_loads"] += self.renderer.retired_lora_loads

    def _drop_pipeline(self) -> None:
        """Release the render pipeline before a training run or a scorer takes the card; the
        fresh renderer loads one again on the next render."""
        self._retire_renderer()
        self.renderer = self._new_renderer()

    def _take_options(self, options: PipelineOptions) -> None:
        """A shared worker serves jobs with their own --dtype, --cpu-offload, ...: a job whose
        options differ gets a fresh renderer (the old pipeline released first)."""
        if not torch_cuda_available():
            options = replace(options, threads=options.threads or self.options.threads or 1)
        if options != self.options:
            self._retire_renderer()
            self.options = options
            self.renderer = self._new_renderer()

    def render_batch(self, tasks: list[Task], source: Source | None = None) -> list[RenderResult]:
        self._drop_scorer()
        if source is not None and source.options is not None:
            self._take_options(source.options)
        self._source = source
        results = self.renderer.render_many(tasks)
        self.counters["rendered"] += sum(r.status == "ok" for r in results)
        self.counters["failed"] += sum(r.status != "ok" for r in results)
        for result in results:
            record_render(result, self.node)
        return results

    def _locate(self, lora: LoraUse) -> Path:
        """The planned path on the planning node (or a shared root); else a fetched copy."""
        source = self._source
        if source is None or source.node_id == self.node_id or is_shared(lora.path):
            return Path(lora.path)
        server = ray.get_actor(source.server, namespace=NAMESPACE)
        size = ray.get(server.size.remote(lora.sha256))
        if size is None:
            raise LoraError(f"{lora.path}: the planning node no longer offers this file")
        path, fetched = fetched_copy(lora.sha256, Path(lora.path).suffix, size,
                                     lambda offset, length: ray.get(server.read.remote(lora.sha256, offset, length)))
        self.counters["fetched"] += fetched
        return path

    def _locate_model(self, task: Task) -> str:
        """The planned model path on the planning node (or a shared root); else this node's copy,
        fetched once (resuming a cut-short copy) and checked against the plan's hash."""
        source = self._source
        if source is None or source.node_id == self.node_id or is_shared(task.model_path):
            return task.model_path
        server = ray.get_actor(source.server, namespace=NAMESPACE)
        sha = task.model_sha256
        listing = ray.get(server.listing.remote(sha))
        if listing is None:
            raise ModelError(f"{task.model_path}: the planning node no longer offers this model")
        name = Path(task.model_path).name
        said = 0

        def progress(done: int, total: int) -> None:  # for `farm pool`, and every 5 % in the log
            nonlocal said
            self.fetching = {"model": name, "sha256": sha, "done": done, "total": total}
            if done == total or done - said >= total / 20:
                print(f"[{self.name}] fetching model {name} ({sha[:12]}): {done / 2**30:.2f} of "
                      f"{total / 2**30:.2f} GiB", flush=True)
                said = done

        try:
            path, fetched = fetched_model(
                sha, listing, lambda member, offset, length: ray.get(server.read_member.remote(sha, member, offset,
                                                                                              length)), progress)
        finally:
            self.fetching = None
        self.counters["models_fetched"] += bool(fetched)
        self.counters["model_bytes_fetched"] += fetched
        return str(path)

    def train(self, run: TrainRun) -> Iterator[Checkpoint]:
        """Train one run, yielding each Checkpoint as it is saved."""
        from farm.render.memory import release
        from farm.train.trainer import train_run

        self._drop_scorer()
        self._drop_pipeline()
        on_step = lambda step, loss, seconds: record_train_step(run.run, self.node, loss, seconds)  # noqa: E731
        try:
            for checkpoint in train_run(run, self.options.device, on_step=on_step, pipeline=self.options):
                yield replace(checkpoint, node=f"{self.node}/{self.node_id[:8]}")
        finally:
            release()
        self.counters["trained"] += 1

    def _drop_scorer(self) -> None:
        """A worker holds a pipeline, a training run or a scorer: one at a time."""
        if self.scorer is not None:
            from farm.render.memory import release

            self.scorer = None
            release()

    def score_batch(self, rows: list[dict], pngs: list[bytes], setup: ScoreSetup) -> tuple[list[dict], list[str]]:
        """Score rendered images (their bytes, sent by the driver) with a Scorer kept for the
        next batch, like the pipeline; the render pipeline is let go first (the card holds one).
        Returns the score rows and the scorer's warnings."""
        if self.scorer is None or self.scorer.reference != setup.reference:
            self._drop_pipeline()
            self.scorer = None  # the old one's models go before the new one's load
            self.scorer = setup.build(farm_cache() / "subjects", self.options.device, self.name)
        scored = self.scorer.score_pngs(rows, pngs)
        self.counters["scored"] += len(scored)
        return scored, self.scorer.warnings

    @ray.method(concurrency_group="info")  # answers while a render or training runs
    def missing(self, paths: list[str]) -> list[str]:
        """Which of `paths` this node lacks (a base model it lacks is fetched from the planning node)."""
        return [path for path in paths if not Path(path).exists()]

    @ray.method(concurrency_group="info")
    def holds(self) -> dict:
        held = self.renderer.holds()
        counters = dict(self.counters)
        counters["pipeline_loads"] += held.pop("pipeline_loads")
        counters["lora_loads"] += held.pop("lora_loads")
        return {"name": self.name, "node": self.node, "node_id": self.node_id, "pid": os.getpid(), **held, **counters,
                "fetching": self.fetching}


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


class ArtifactServer:
    """Hands out the bytes of files a driver planned with, by sha256, in blocks."""

    def __init__(self):
        self.files: dict[str, str] = {}
        self.listings: dict[str, dict] = {}

    def offer(self, files: dict[str, str]) -> None:
        """{sha256: path}: only offered files are ever read."""
        self.files.update(files)

    def size(self, sha256: str) -> int | None:
        path = self.files.get(sha256)
        return Path(path).stat().st_size if path and Path(path).is_file() else None

    def read(self, sha256: str, offset: int, length: int) -> bytes:
        with open(self.files[sha256], "rb") as handle:
            handle.seek(offset)
            return handle.read(length)

    def listing(self, sha256: str) -> dict | None:
        """An offered base model's files (see `fetched_model`); None when it is gone."""
        path = self.files.get(sha256)
        if not path or not Path(path).exists():
            return None
        if sha256 not in self.listings:
            self.listings[sha256] = model_listing(Path(path))
        return self.listings[sha256]

    def read_member(self, sha256: str, name: str, offset: int, length: int) -> bytes:
        """A block of one file of an offered model; only names its listing holds are read."""
        listing = self.listings[sha256]
        if name not in {member for member, _, _ in listing["files"]}:
            raise ModelError(f"{name}: not a file of the offered model {sha256[:12]}")
        path = Path(self.files[sha256])
        with open(path if listing["kind"] == "file" else path / name, "rb") as handle:
            handle.seek(offset)
            return handle.read(length)


def artifact_source(loras: dict[str, str]) -> Source:
    """Offer `loras` ({sha256: path}) from this node's file server (started once, detached)."""
    node_id = ray.get_runtime_context().get_node_id()
    name = f"sdfarm-files-{node_id[:12]}"
    server = ray.remote(ArtifactServer).options(
        name=name, namespace=NAMESPACE, get_if_exists=True, lifetime="detached", num_cpus=0, max_concurrency=4,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote()
    ray.get(server.offer.remote(loras))
    return Source(node_id=node_id, server=name)


def worker_class():
    """GpuWorker as a Ray actor class."""
    return ray.remote(concurrency_groups=_GROUPS)(GpuWorker)


def start_workers(count: int, options: PipelineOptions, use_gpus: bool) -> list:
    """`count` workers of this run alone, each on its own (logical) GPU, or one CPU each if none."""
    remote = worker_class()
    resources = {"num_gpus": 1, "num_cpus": 0} if use_gpus else {"num_cpus": 1}
    return [remote.options(max_restarts=RESTARTS, **resources).remote(i, options) for i in range(count)]


def restarts_used_up(worker) -> bool:
    """Ray will not bring this actor back: it died more often than its max_restarts allow (or was
    killed for good). Asked of the GCS's actor table; False when that cannot be read."""
    try:
        from ray._private.state import actors

        return actors(worker._actor_id.hex()).get("State") == "DEAD"
    except Exception:  # an actor table Ray changed: keep the worker, as before
        return False


def start_pool_worker(name: str, node_id: str, index: int, options: PipelineOptions):
    """A long-lived worker of the shared pool, pinned to one GPU of `node_id`."""
    return worker_class().options(
        name=name, namespace=NAMESPACE, get_if_exists=True, lifetime="detached", max_restarts=RESTARTS,
        num_gpus=1, num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
    ).remote(index, options)
