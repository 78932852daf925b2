"""The scores dataset: `OUT/scores/part-*.parquet`, one row per scored image, joined with the
manifest by task id.

Scores live beside the manifest, never in it: scoring can run again (another CLIP model, more
subject photos) or long after the render, and the manifest stays what the renders wrote. A row
records which image it scored (`image_sha256`) and against which reference (`reference`), so a
re-rendered image or a changed photo set is scored again instead of trusted.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from farm.files import write_atomic
from farm.runs.manifest import RunFolder, first_per_task, read_parts

SCORE_SCHEMA = pa.schema([
    ("task_id", pa.string()),
    ("image_sha256", pa.string()),  # the image that was scored
    ("reference", pa.string()),  # hash of the subject photos, token and CLIP model scored against
    ("subject_prompt", pa.bool_()),  # the prompt names the subject's token (else: class-only → leakage)
    ("faces", pa.int32()),  # faces found in the image (0: none; the distances are then null)
    ("face_distance", pa.float64()),  # dlib identity distance to the subject photos' centroid
    ("face_distance_nearest", pa.float64()),  # ... to the nearest subject photo
    ("clip_t", pa.float64()),  # cosine(image, prompt without the token); null without a CLIP model
    ("clip_i", pa.float64()),  # mean cosine(image, each subject photo)
    ("clip_model", pa.string()),
    ("worker", pa.string()),
    ("scored_at", pa.timestamp("us", tz="UTC")),
])

SCORE_COLUMNS = [f.name for f in SCORE_SCHEMA if f.name not in ("task_id", "image_sha256", "worker")]


class ScoreTable:
    """A run folder's scores: parts are only added; reading keeps each task's latest row."""

    def __init__(self, run: RunFolder):
        self.run = run
        self.folder = run.root / "scores"

    def write_part(self, rows: list[dict]) -> Path | None:
        if not rows:
            return None
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f")
        path = self.folder / f"part-{stamp}-{uuid.uuid4().hex[:8]}.parquet"
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(rows, schema=SCORE_SCHEMA), sink, compression="zstd")
        write_atomic(path, sink.getvalue().to_pybytes())
        return path

    def read(self) -> pa.Table:
        """One row per task: the latest scored."""
        table = read_parts(self.folder, SCORE_SCHEMA, "scores")
        return first_per_task(table.sort_by([("task_id", "ascending"), ("scored_at", "descending")]))

    def scored(self, reference: str) -> dict[str, str]:
        """task id → image hash of what is already scored against `reference`."""
        table = self.read()
        table = table.filter(pc.equal(table["reference"], reference))
        return dict(zip(table["task_id"].to_pylist(), table["image_sha256"].to_pylist()))


def scored_manifest(run: RunFolder) -> pa.Table:
    """The manifest's `ok` rows with their scores (null where an image has none yet), in plan order.
    A score whose image hash is not the manifest's (the image was rendered again) is dropped."""
    manifest = run.read()
    manifest = manifest.filter(pc.equal(manifest["status"], "ok"))
    scores = ScoreTable(run).read()
    # a left join by hand: Arrow's join cannot carry the manifest's list columns
    at = pc.index_in(manifest["task_id"], value_set=scores["task_id"])
    same_image = pc.fill_null(pc.equal(scores["image_sha256"].take(at), manifest["image_sha256"]), False)
    at = pc.if_else(same_image, at, pa.scalar(None, at.type))  # a re-rendered image's old score is not its score
    for name in SCORE_SCHEMA.names[1:]:
        manifest = manifest.append_column(f"score_{name}", scores[name].take(at))
    return manifest.sort_by("order")
