"""The run folder: PNGs, the Parquet manifest, and what a resumed run must reuse.

    OUT/
      images/ab/abcdef….png     named by task id, never by user text; written temp + rename
      manifest/part-*.parquet   one row per finished task; each part written temp + rename
      run.json                  job name, spec path, resolved `-1` seeds

Parts are only ever added, so a crash loses at most the rows not yet flushed (their images are
rendered again). Reading folds duplicates (a task retried after a crash) to one row per task,
preferring `ok`, then the latest.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from farm import __version__
from farm.errors import ManifestError
from farm.files import TEMP_GLOB, write_atomic
from farm.render.renderer import RenderResult

_STR_MAP = pa.map_(pa.string(), pa.string())
_LORA = pa.struct([("name", pa.string()), ("sha256", pa.string()), ("strength", pa.float64())])
_TIME = pa.timestamp("us", tz="UTC")

SCHEMA = pa.schema([
    ("task_id", pa.string()),
    ("job", pa.string()),
    ("status", pa.string()),  # ok | failed
    ("error", pa.string()),
    ("prompt", pa.string()),
    ("negative_prompt", pa.string()),
    ("seed", pa.uint64()),
    ("steps", pa.int32()),
    ("cfg", pa.float64()),
    ("sampler", pa.string()),  # as the user wrote it
    ("scheduler", pa.string()),  # what ran: k-diffusion sampler and ComfyUI schedule, `dpmpp_2m karras`
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("model", pa.string()),
    ("model_sha256", pa.string()),
    ("lora", pa.string()),  # the first LoRA's name ("" for none); all of them are in `loras`
    ("lora_sha256", pa.string()),
    ("lora_strength", pa.float64()),
    ("loras", pa.list_(_LORA)),
    ("axes", _STR_MAP),  # axis → label of the task's first grid cell
    ("cells", pa.list_(_STR_MAP)),  # every grid cell this image fills
    ("order", pa.int64()),  # position in the spec's expansion
    ("image_path", pa.string()),  # relative to the run folder
    ("image_sha256", pa.string()),
    ("node", pa.string()),
    ("worker", pa.string()),
    ("device", pa.string()),
    ("render_s", pa.float64()),
    ("lora_switch_s", pa.float64()),
    ("started_at", _TIME),
    ("finished_at", _TIME),
    ("farm_version", pa.string()),
    ("noise", pa.string()),  # the seed convention: comfyui | a1111-cpu | a1111-gpu (null: before v2)
    ("prompt_syntax", pa.string()),  # a1111 | comfyui | plain (null: before v2)
    ("dtype", pa.string()),  # the UNet's dtype that rendered it: float16 | bfloat16 | float32 (null: before v3)
])


# The training manifest (OUT/train/manifest/): one row per checkpoint file a run wrote.
TRAIN_SCHEMA = pa.schema([
    ("run", pa.string()),
    ("label", pa.string()),  # grid label of the checkpoint: "v002 epoch 7"
    ("path", pa.string()),  # relative to the run folder
    ("sha256", pa.string()),
    ("epoch", pa.int32()),
    ("step", pa.int64()),
    ("final", pa.bool_()),
    ("log_path", pa.string()),  # per-step CSV: step, epoch, loss, lr, step_s
    ("loss_plot", pa.string()),  # PNG, written with the final checkpoint
    ("node", pa.string()),
    ("finished_at", _TIME),
])


def image_relpath(task_id: str) -> str:
    return f"images/{task_id[:2]}/{task_id}.png"


def result_row(result: RenderResult, image_path: str) -> dict:
    task = result.task
    first = task.loras[0] if task.loras else None
    return {
        "task_id": task.task_id, "job": task.job, "status": result.status, "error": result.error,
        "prompt": task.prompt, "negative_prompt": task.negative_prompt, "seed": task.seed,
        "steps": task.steps, "cfg": task.cfg, "sampler": task.sampler, "scheduler": result.scheduler,
        "width": task.width, "height": task.height, "model": task.model,
        "model_sha256": task.model_sha256,
        "lora": first.name if first else "", "lora_sha256": first.sha256 if first else "",
        "lora_strength": first.strength if first else 0.0,
        "loras": [{"name": l.name, "sha256": l.sha256, "strength": l.strength} for l in task.loras],
        "axes": list(task.cells[0]), "cells": [list(cell) for cell in task.cells],
        "order": task.order, "image_path": image_path, "image_sha256": result.image_sha256,
        "node": result.node, "worker": result.worker, "device": result.device,
        "render_s": result.render_s, "lora_switch_s": result.lora_switch_s,
        "started_at": result.started_at, "finished_at": result.finished_at,
        "farm_version": __version__, "noise": task.noise, "prompt_syntax": task.prompt_syntax,
        "dtype": result.dtype or None,
    }


class RunFolder:
    """One job's output folder: where images and manifest parts go, and how to read them back."""

    def __init__(self, root: str | Path):
        # absolute: checkpoint paths read back from the training manifest are used as LoRA and
        # model references, which a relative root would resolve against the spec's folder
        self.root = Path(root).absolute()
        self.manifest_dir = self.root / "manifest"
        self.run_file = self.root / "run.json"
        self.train_dir = self.root / "train"
        self.train_manifest_dir = self.train_dir / "manifest"

    def add_checkpoint(self, checkpoint) -> None:
        """Record a training checkpoint (a `train.Checkpoint`) in the training manifest."""
        folder = Path(os.path.relpath(checkpoint.path, self.root)).parent
        row = {"run": checkpoint.run, "label": checkpoint.label, "path": os.path.relpath(checkpoint.path, self.root),
               "sha256": checkpoint.sha256, "epoch": checkpoint.epoch, "step": checkpoint.step,
               "final": checkpoint.final, "log_path": str(folder / "log.csv"),
               "loss_plot": str(folder / "loss.png") if checkpoint.final else "",
               "node": checkpoint.node, "finished_at": datetime.now(timezone.utc)}
        self.train_manifest_dir.mkdir(parents=True, exist_ok=True)
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist([row], schema=TRAIN_SCHEMA), sink)
        name = f"part-{checkpoint.run}-{checkpoint.step:09d}-{uuid.uuid4().hex[:6]}.parquet"
        write_atomic(self.train_manifest_dir / name, sink.getvalue().to_pybytes())

    def read_checkpoints(self) -> list[dict]:
        """Checkpoint rows whose file still has the recorded content, oldest first."""
        if not self.train_manifest_dir.is_dir():
            return []
        rows = []
        for part in sorted(self.train_manifest_dir.glob("part-*.parquet")):
            try:
                rows += pq.read_table(part, schema=TRAIN_SCHEMA).to_pylist()
            except (pa.ArrowInvalid, OSError) as exc:
                raise ManifestError(f"{part}: unreadable training manifest part: {exc}") from None
        unique = {(r["run"], r["path"]): r for r in rows if (self.root / r["path"]).exists()}
        return sorted(unique.values(), key=lambda r: (r["run"], r["step"]))

    def save_image(self, result: RenderResult) -> str:
        """Write the task's PNG, unless that very file is already there: a resumed run renders
        again the tasks whose rows a killed driver never committed, and their PNGs (same task,
        same bytes) stay the files they were."""
        relative = image_relpath(result.task.task_id)
        path = self.root / relative
        if not (path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == result.image_sha256):
            write_atomic(path, result.png, durable=False, stage="image")
        return relative

    def write_part(self, rows: list[dict]) -> Path | None:
        if not rows:
            return None
        self.manifest_dir.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f")
        path = self.manifest_dir / f"part-{stamp}-{uuid.uuid4().hex[:8]}.parquet"
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), sink, compression="zstd")
        write_atomic(path, sink.getvalue().to_pybytes(), stage="manifest")
        return path

    def remove_temp_files(self) -> int:
        """Temp files of a writer that was killed mid-write (their content is written again)."""
        stale = [p for folder in (self.root / "images", self.manifest_dir) if folder.is_dir()
                 for p in folder.rglob(TEMP_GLOB)]
        for path in stale:
            path.unlink(missing_ok=True)
        return len(stale)

    def parts(self) -> list[Path]:
        if not self.manifest_dir.is_dir():
            return []
        return sorted(p for p in self.manifest_dir.glob("part-*.parquet"))

    def read(self) -> pa.Table:
        """All rows, one per task: `ok` wins over `failed`, then the latest finish wins."""
        return latest_per_task(read_parts(self.manifest_dir, SCHEMA, "manifest"))

    def done_ids(self) -> set[str]:
        table = self.read()
        ok = table.filter(pc.equal(table["status"], "ok"))
        return set(ok["task_id"].to_pylist())

    def load_run_info(self) -> dict:
        try:
            return json.loads(self.run_file.read_text())
        except FileNotFoundError:
            return {}
        except ValueError as exc:
            raise ManifestError(f"{self.run_file}: not valid JSON: {exc}") from None

    def save_run_info(self, info: dict) -> None:
        write_atomic(self.run_file, json.dumps(info, indent=2, sort_keys=True).encode())


def read_parts(folder: Path, schema: pa.Schema, what: str) -> pa.Table:
    """Every `part-*.parquet` in `folder`, read with `schema`, as one table (empty without parts).
    Parts are only ever added, each written whole: a part that cannot be read is an error."""
    tables = []
    for part in sorted(folder.glob("part-*.parquet")) if folder.is_dir() else []:
        try:
            tables.append(pq.read_table(part, schema=schema))
        except (pa.ArrowInvalid, OSError) as exc:
            raise ManifestError(f"{part}: unreadable {what} part: {exc}") from None
    return pa.concat_tables(tables) if tables else schema.empty_table()


def first_per_task(table: pa.Table) -> pa.Table:
    """The first row of each task id in a table sorted by task id (then by preference)."""
    if table.num_rows == 0:
        return table
    ids = table["task_id"].combine_chunks()
    return table.filter(pa.concat_arrays([pa.array([True]), pc.not_equal(ids[1:], ids[:-1])]))


def latest_per_task(table: pa.Table) -> pa.Table:
    """Fold rows to one per task_id: ok before failed, later finished_at before earlier."""
    if table.num_rows == 0:
        return table
    ranked = table.append_column("_ok", pc.cast(pc.equal(table["status"], "ok"), pa.int8()))
    ranked = ranked.sort_by([("task_id", "ascending"), ("_ok", "descending"), ("finished_at", "descending")])
    return first_per_task(ranked).drop_columns(["_ok"]).sort_by("order")


class ManifestWriter:
    """Buffers rows and writes a part every `every_rows` rows or `every_s` seconds."""

    def __init__(self, run: RunFolder, every_rows: int = 64, every_s: float = 5.0):
        self.run, self.every_rows, self.every_s = run, every_rows, every_s
        self.rows: list[dict] = []
        self.last_flush = time.monotonic()
        self.written = 0

    def add(self, result: RenderResult) -> None:
        image_path = self.run.save_image(result) if result.status == "ok" else ""
        self.rows.append(result_row(result, image_path))
        if len(self.rows) >= self.every_rows or time.monotonic() - self.last_flush >= self.every_s:
            self.flush()

    def flush(self) -> None:
        self.run.write_part(self.rows)
        self.written += len(self.rows)
        self.rows = []
        self.last_flush = time.monotonic()
