"""The results page: `RUN/results/`, a static grid viewer over a run folder's images and scores.

    RUN/results/
      index.html, page.js, page.css   copied from `page_assets/` (no build step, no network)
      data.js                          generated: `window.SDFARM = {...}`

It replaces the fixed PNG grids: any axis can be rows, columns or pages in the browser, cells keep
their images' aspect ratio, a click shows the image with its PNG parameters and scores, and a
heat map tints cells by a score. The data is a script, not JSON, because a page opened from
file:// may not fetch files; image paths are relative (`../images/..`), so the run folder can be
published as it is.

data.js stays small at thousands of images: an image (one task) is stored once and cells point
at it by index; cells hold value indices per axis; repeated strings (prompts, samplers, the items
of the PNG parameters text) are stored once in a string table.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote

import pyarrow.compute as pc

from farm import __version__
from farm.errors import ManifestError
from farm.files import write_atomic
from farm.render.pnginfo import read_png_parameters
from farm.runs.manifest import RunFolder
from farm.score.table import scored_manifest

ASSETS = Path(__file__).with_name("page_assets")
ASSET_FILES = ("page.css", "page.js", "index.html")  # index.html last: it is what a reader opens
PAGE_FOLDER = "results"
NO_LABEL = "-"  # an axis a cell's table (sweep) does not have, as farm.runs.grid shows it
# score column → label, and which way is better: the heat map colours "better" green
SCORES = [("face_distance", "Face distance to subject", "lower"),
          ("face_distance_nearest", "Face distance (nearest photo)", "lower"),
          ("clip_t", "CLIP-T (image vs prompt)", "higher"),
          ("clip_i", "CLIP-I (image vs subject)", "higher")]
# image record fields, in the order data.js stores them (`imageFields` names them for page.js)
IMAGE_FIELDS = ["task", "status", "src", "w", "h", "prompt", "negative", "seed", "steps", "cfg", "sampler",
                "scheduler", "model", "lora", "strength", "params", "error", "faces", "subject", "scores"]
_STRING_FIELDS = {"prompt", "negative", "sampler", "scheduler", "model", "lora", "error"}
_COMMON = [("model", "Model"), ("sampler", "Sampler"), ("scheduler", "Schedule"), ("steps", "Steps"),
           ("cfg", "CFG"), ("size", "Size"), ("negative", "Negative")]
_COLUMNS = ["task_id", "job", "status", "error", "prompt", "negative_prompt", "seed", "steps", "cfg", "sampler",
            "scheduler", "width", "height", "model", "lora", "lora_strength", "axes", "cells", "order", "image_path",
            "finished_at"]


class _Strings:
    """A string table: each distinct string stored once in data.js, referred to by index."""

    def __init__(self) -> None:
        self.index: dict[str, int] = {}

    def __call__(self, text: str | None) -> int:
        return self.index.setdefault(text or "", len(self.index))

    def table(self) -> list[str]:
        return list(self.index)


def write_page(run: RunFolder) -> Path:
    """Write `RUN/results/` (the page's assets and its data.js); return its index.html.

    data.js is written first and index.html last, each atomically, so a reader never opens a page
    whose data is half written."""
    folder = run.root / PAGE_FOLDER
    write_atomic(folder / "data.js", data_script(page_data(run)))
    for name in ASSET_FILES:
        write_atomic(folder / name, (ASSETS / name).read_bytes())
    return folder / "index.html"


def data_script(data: dict) -> bytes:
    """`window.SDFARM = {...};`: JSON is valid JavaScript, and a script loads from file://."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), default=str)
    return f"window.SDFARM = {text};\n".encode()


def page_data(run: RunFolder) -> dict:
    """Everything the page shows, as one JSON-able dict (the content of data.js)."""
    rows = _rows(run)
    strings = _Strings()
    images = [_image(run, row, strings) for row in rows]
    labelled = _dedupe_cells([(index, labels) for index, row in enumerate(rows) for labels in _row_cells(row)], rows)
    planned = run.load_run_info().get("axes") or {}
    axes = _axes(labelled, planned)
    names = [name for name, _ in axes]
    value_index = [{value: i for i, value in enumerate(values)} for _, values in axes]
    cells = [[image, *(value_index[a][labels.get(name, NO_LABEL)] for a, name in enumerate(names))]
             for image, labels in labelled]
    at = IMAGE_FIELDS.index("scores")
    scored = [i for i in range(len(SCORES)) if any(image[at][i] is not None for image in images)]
    return {
        "version": 1, "farm": __version__, "job": _job_name(run, rows),
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "axes": [{"name": name, "values": values} for name, values in axes],
        "sweeps": _sweeps(labelled, planned, axes),
        "imageFields": IMAGE_FIELDS, "images": images, "cells": cells, "strings": strings.table(),
        "scores": [{"key": SCORES[i][0], "label": SCORES[i][1], "better": SCORES[i][2], "column": i} for i in scored],
        "common": _common(rows), "report": _report(run),
    }


def _rows(run: RunFolder) -> list[dict]:
    """The manifest's ok rows with their scores, then the failed rows (a failed cell is shown,
    never skipped); raises ManifestError when the run has no rows at all."""
    ok = scored_manifest(run)
    every = run.read()
    if every.num_rows == 0:
        raise ManifestError(f"{run.root}: no manifest rows yet (run the job first)")
    failed = every.filter(pc.not_equal(every["status"], "ok")).select(_COLUMNS).to_pylist()
    score_columns = [f"score_{key}" for key, _, _ in SCORES] + ["score_faces", "score_subject_prompt"]
    return ok.select(_COLUMNS + score_columns).to_pylist() + failed


def _image(run: RunFolder, row: dict, strings: _Strings) -> list:
    """One task's record, its fields in IMAGE_FIELDS order (strings as string-table indices)."""
    path = _image_file(run, row["image_path"])
    status = row["status"] if row["status"] != "ok" or (path and path.is_file()) else "missing"
    params = _parameters(path) if status == "ok" else ""
    record = {
        "task": row["task_id"], "status": status,
        "src": quote(Path(os.path.relpath(path, run.root / PAGE_FOLDER)).as_posix()) if status == "ok" else "",
        "w": row["width"], "h": row["height"], "prompt": row["prompt"], "negative": row["negative_prompt"],
        "seed": None if row["seed"] is None else str(row["seed"]),  # uint64: past a JS number's exact range
        "steps": row["steps"], "cfg": row["cfg"], "sampler": row["sampler"], "scheduler": row["scheduler"],
        "model": row["model"], "lora": row["lora"], "strength": row["lora_strength"],
        "params": _tokens(params, strings),
        "error": row["error"] or ("the image file is missing" if status == "missing" else ""),
        "faces": row.get("score_faces"), "subject": row.get("score_subject_prompt"),
        "scores": [_round(row.get(f"score_{key}")) for key, _, _ in SCORES],
    }
    return [strings(record[f]) if f in _STRING_FIELDS else record[f] for f in IMAGE_FIELDS]


def _tokens(params: str, strings: _Strings) -> list[list[int]]:
    """The parameters text as string-table indices, a list per line of its `, `-separated items:
    the settings line repeats but for seed and task id, and joining the items with `, ` again
    gives back the exact text whatever A1111's quoting did."""
    return [[strings(item) for item in line.split(", ")] for line in params.split("\n")] if params else []


def _image_file(run: RunFolder, relative: str | None) -> Path | None:
    """The row's PNG inside the run folder; None for a path that leaves it (a published page links
    only to the run's own files)."""
    if not relative or Path(relative).is_absolute() or ".." in Path(relative).parts:
        return None
    return run.root / relative


def _parameters(path: Path) -> str:
    """The PNG's A1111 parameters text; "" when the file has none or cannot be read."""
    try:
        return read_png_parameters(path)
    except (OSError, ValueError, SyntaxError):
        return ""


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _row_cells(row: dict) -> list[dict[str, str]]:
    """Every grid cell the row's image fills (rows without `cells` fill their `axes` cell)."""
    cells = [dict(cell) for cell in row["cells"] or []]
    return cells or [dict(row["axes"] or [])]


def _dedupe_cells(labelled: list[tuple[int, dict]], rows: list[dict]) -> list[tuple[int, dict]]:
    """One image per cell: when an edited job gave a cell a new task, the ok one wins, then the
    latest finished."""
    best: dict[tuple, tuple[int, dict]] = {}
    for image, labels in labelled:
        key = tuple(sorted(labels.items()))
        held = best.get(key)
        if held is None or _rank(rows[image]) > _rank(rows[held[0]]):
            best[key] = (image, labels)
    return sorted(best.values(), key=lambda item: rows[item[0]]["order"] or 0)


def _rank(row: dict) -> tuple:
    finished = row["finished_at"]
    return row["status"] == "ok", finished.timestamp() if finished else 0.0


def _axes(labelled: list[tuple[int, dict]], planned: dict) -> list[tuple[str, list[str]]]:
    """Axes in the spec's order (the order of a cell's labels; run.json sorts its keys), each with
    its labels in planned order, then labels seen but not planned, then "-" when a table lacks it."""
    names = list(dict.fromkeys([axis for _, labels in labelled for axis in labels] +
                               [axis for table in planned.values() for axis in table]))
    axes = []
    for name in names:
        values = [label for table in planned.values() for label in table.get(name, [])]
        values += [labels[name] for _, labels in labelled if name in labels]
        if any(name not in labels for _, labels in labelled):
            values.append(NO_LABEL)
        axes.append((name, list(dict.fromkeys(values))))
    return axes


def _sweeps(labelled: list[tuple[int, dict]], planned: dict, axes: list[tuple[str, list[str]]]) -> list[list]:
    """Per table (sweep) of the job, the value indices of each axis it spans: the page marks a grid
    position "not rendered" only when some table plans it (and leaves holes between tables blank)."""
    spans: dict[str, dict[str, dict[str, None]]] = defaultdict(lambda: defaultdict(dict))
    for sweep, table in planned.items():
        for axis, values in table.items():
            spans[sweep][axis].update(dict.fromkeys(values))
    for _, labels in labelled:
        for axis, value in labels.items():
            spans[labels.get("sweep", "")][axis][value] = None
    position = [{value: i for i, value in enumerate(values)} for _, values in axes]
    return [[sorted(position[a][v] for v in spans[sweep].get(name, {NO_LABEL: None}) if v in position[a])
             for a, (name, _) in enumerate(axes)] for sweep in spans]


def _job_name(run: RunFolder, rows: list[dict]) -> str:
    """run.json's job name, else the manifest's (an old run folder may lack run.json)."""
    return str(run.load_run_info().get("job") or rows[0]["job"] or run.root.name)


def _common(rows: list[dict]) -> list[list[str]]:
    """Settings every image shares (shown once under the title, as the old grid titles did)."""
    common = []
    for key, title in _COMMON:
        if key == "size":
            values = {f"{r['width']}x{r['height']}" for r in rows}
        else:
            values = {str(r[{"negative": "negative_prompt"}.get(key, key)] or "") for r in rows}
        if len(values) == 1 and (value := values.pop()):
            common.append([title, value])
    return common


def _report(run: RunFolder) -> dict | None:
    """report.json (farm report's), its plot paths made relative to the page; None without one.
    An unreadable report is shown as a note: the grid is still worth opening."""
    path = run.root / "report" / "report.json"
    if not path.is_file():
        return None
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return {"error": f"report/report.json: unreadable: {exc}"}  # relative: the page may be published
    if not isinstance(report, dict):
        return {"error": "report/report.json: not a report object"}
    plots = report.get("plots") if isinstance(report.get("plots"), dict) else {}
    report["plots"] = [{"name": name, "src": f"../report/{quote(file)}"} for name, file in plots.items()
                       if isinstance(file, str) and Path(file).name == file and (path.parent / file).is_file()]
    for checkpoint in report.get("checkpoints") or []:
        if isinstance(checkpoint, dict) and checkpoint.get("loss_plot"):
            checkpoint["loss_plot"] = f"../{quote(str(checkpoint['loss_plot']))}"
    report.pop("run", None)  # an absolute path of the machine that wrote it: not for a published page
    return report
