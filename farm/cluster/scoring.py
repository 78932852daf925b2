"""Scoring a run on the cluster's workers: batches of rendered images go to the GPU workers,
which keep their face and CLIP models loaded between batches (as they keep a pipeline), and
their scores come back to the driver, which writes them beside the manifest.

The driver reads the PNGs (the run folder is on its node) and sends their bytes; the subject
photos go into Ray's object store once. A batch whose worker dies is sent again (Ray restarts
the worker); one that fails twice fails the scoring with its error, keeping what was written.
"""

from __future__ import annotations

from collections import deque

import ray

from farm.cluster.actors import start_workers
from farm.cluster.dispatch import pool_size
from farm.errors import ScoreError
from farm.render.pipeline import PipelineOptions
from farm.runs.manifest import RunFolder
from farm.score.scorer import ScoreSetup, ScoreSummary, Subject, read_png, rows_to_score
from farm.score.table import ScoreTable

BATCH = 16
IN_FLIGHT = 2  # batches per worker: one scoring, one on its way
ATTEMPTS = 2


def score_on_cluster(run: RunFolder, subject: Subject, clip_model: str | None = None, device: str | None = None,
                     again: bool = False, workers: int | None = None, batch: int = BATCH,
                     on_batch=None) -> ScoreSummary:
    """Score every `ok` image not yet scored against this reference on the cluster's workers."""
    setup = ScoreSetup.of(subject, clip_model)
    rows, todo = rows_to_score(run, setup.reference, again)
    if not todo:
        return ScoreSummary(0, len(rows), [])
    count, use_gpus = pool_size(workers, (len(todo) + batch - 1) // batch)
    pool = start_workers(count, PipelineOptions(device=device), use_gpus)
    try:
        batches = [todo[i:i + batch] for i in range(0, len(todo), batch)]
        warnings = _drive(pool, ray.put(setup), batches, ScoreTable(run), run, on_batch)
    finally:
        for worker in pool:
            ray.kill(worker)
    return ScoreSummary(len(todo), len(rows) - len(todo), warnings)


def _drive(pool: list, setup_ref, batches: list[list[dict]], table: ScoreTable, run: RunFolder,
           on_batch) -> list[str]:
    queue = deque((batch, 0) for batch in batches)
    total = sum(len(batch) for batch in batches)
    in_flight: dict = {}  # object ref → (worker, batch, attempt)
    done, warnings = 0, []
    while queue or in_flight:
        for worker in pool:
            while queue and sum(1 for w, _, _ in in_flight.values() if w is worker) < IN_FLIGHT:
                batch, attempt = queue.popleft()
                pngs = [read_png(run.root / row["image_path"]) for row in batch]
                in_flight[worker.score_batch.remote(batch, pngs, setup_ref)] = (worker, batch, attempt)
        ready, _ = ray.wait(list(in_flight), num_returns=1)
        worker, batch, attempt = in_flight.pop(ready[0])
        try:
            scored, warnings = ray.get(ready[0])
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc, ScoreError):  # the same on every worker (an unreadable photo): say it once
                raise ScoreError(_cause(exc)) from None
            raise
        except ray.exceptions.RayError as exc:  # the worker died (Ray restarts it): send the batch again
            if attempt + 1 >= ATTEMPTS:
                raise ScoreError(f"scoring {batch[0]['image_path']} failed twice: {_cause(exc)}") from None
            queue.append((batch, attempt + 1))
            continue
        table.write_part(scored)
        done += len(batch)
        if on_batch:
            on_batch(done, total)
    return warnings


def _cause(exc: Exception) -> str:
    cause = getattr(exc, "cause", None)
    return str(cause or exc).strip().splitlines()[-1][:300]
