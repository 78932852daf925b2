import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from farm.errors import ManifestError
from farm.runs.manifest import ManifestWriter, RunFolder
from farm.render.renderer import RenderResult
from test_pnginfo import make_task

NOW = datetime(2026, 11, 21, tzinfo=timezone.utc)
README = Path(__file__).resolve().parents[1] / "README.md"


def _top_level_split(text: str) -> list[str]:
    """`a, list<struct<x, y>>, timestamp(us, UTC)` → its three types (commas inside <> or () stay)."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += char in "<(" and 1 or char in ">)" and -1 or 0
        if char == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += char
    return [*parts, current.strip()]


def readme_manifest_columns() -> dict[str, str]:
    """Column → type as README.md's "Run folder and manifest schema" table documents them."""
    text = README.read_text()
    section = text.split("## Run folder and manifest schema", 1)[1].split("\n## ", 1)[0]
    columns = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`"):
            continue
        names = re.findall(r"`([^`]+)`", cells[0])
        types = _top_level_split(cells[1])
        if len(types) == 1:
            types *= len(names)
        assert len(types) == len(names), line
        columns.update(zip(names, types))
    return columns


def documented_name(kind: pa.DataType) -> str:
    """An Arrow type written the way the README writes types."""
    if pa.types.is_timestamp(kind):
        return f"timestamp({kind.unit}, {kind.tz})"
    if pa.types.is_map(kind):
        return f"map<{documented_name(kind.key_type)}, {documented_name(kind.item_type)}>"
    if pa.types.is_list(kind):
        return f"list<{documented_name(kind.value_type)}>"
    if pa.types.is_struct(kind):
        return "struct<" + ", ".join(kind.field(i).name for i in range(kind.num_fields)) + ">"
    return {"double": "float64", "bool": "bool"}.get(str(kind), str(kind))


def result(task_id, status="ok", minutes=0, png=b"\x89PNG fake"):
    return RenderResult(task=make_task(task_id=task_id), status=status, png=png if status == "ok" else b"",
                        image_sha256="e" * 64 if status == "ok" else "", error="" if status == "ok" else "boom",
                        started_at=NOW, finished_at=NOW + timedelta(minutes=minutes))


def test_rows_have_the_documented_schema(tmp_path):
    run = RunFolder(tmp_path)
    writer = ManifestWriter(run)
    writer.add(result("aa11"))
    writer.add(result("bb22", status="failed"))
    writer.flush()
    table = run.read()
    documented = readme_manifest_columns()
    assert len(documented) == 35 and documented["seed"] == "uint64"  # the parser read the whole table
    on_disk = pq.read_table(tmp_path / "manifest").schema  # as any Parquet reader sees the parts
    for schema in (table.schema, on_disk):
        assert set(schema.names) == set(documented), (set(schema.names) ^ set(documented))
        actual = {name: documented_name(schema.field(name).type) for name in schema.names}
        assert actual == documented
    # `loras` documents its struct's field names; their types are those of `lora`, `lora_sha256`, `lora_strength`
    struct = table.schema.field("loras").type.value_type
    assert [documented_name(struct.field(i).type) for i in range(3)] == [
        documented[c] for c in ("lora", "lora_sha256", "lora_strength")]
    rows = {r["task_id"]: r for r in table.to_pylist()}
    assert rows["aa11"]["image_path"] == "images/aa/aa11.png"
    assert (tmp_path / "images/aa/aa11.png").read_bytes() == b"\x89PNG fake"
    assert rows["bb22"]["status"] == "failed" and rows["bb22"]["error"] == "boom" and rows["bb22"]["image_path"] == ""
    assert rows["aa11"]["lora"] == "me-000030" and rows["aa11"]["lora_strength"] == 0.8
    assert dict(rows["aa11"]["axes"]) == {"lora": "e30"}
    assert rows["aa11"]["seed"] == 1382869474


def test_parts_are_written_whole_and_temp_files_do_not_remain(tmp_path):
    run = RunFolder(tmp_path)
    writer = ManifestWriter(run, every_rows=2)
    for i in range(5):
        writer.add(result(f"t{i:03d}"))
    writer.flush()
    parts = run.parts()
    assert len(parts) == 3 and [pq.read_metadata(p).num_rows for p in parts] == [2, 2, 1]
    leftovers = [p for p in tmp_path.rglob("*") if p.name.startswith(".")]
    assert leftovers == []


def test_duplicate_rows_fold_to_one_per_task(tmp_path):
    run = RunFolder(tmp_path)
    run.write_part([_row(result("x1", status="failed", minutes=1))])
    run.write_part([_row(result("x1", minutes=0)), _row(result("x2", status="failed", minutes=0))])
    run.write_part([_row(result("x2", status="failed", minutes=5))])
    table = run.read()
    assert sorted(table["task_id"].to_pylist()) == ["x1", "x2"]
    by_id = {r["task_id"]: r for r in table.to_pylist()}
    assert by_id["x1"]["status"] == "ok"  # ok beats a later failure
    assert by_id["x2"]["finished_at"] == NOW + timedelta(minutes=5)
    assert run.done_ids() == {"x1"}


def test_unreadable_part_names_the_file(tmp_path):
    run = RunFolder(tmp_path)
    run.write_part([_row(result("x1"))])
    bad = run.manifest_dir / "part-zzz.parquet"
    bad.write_bytes(b"not parquet")
    with pytest.raises(ManifestError, match="part-zzz.parquet: unreadable manifest part"):
        run.read()


def _row(r):
    from farm.runs.manifest import result_row

    return result_row(r, "images/x.png" if r.status == "ok" else "")


WRITER = """
import pickle, sys
from farm.runs.manifest import ManifestWriter, RunFolder
results = pickle.load(open(sys.argv[1], "rb"))
run = RunFolder(sys.argv[2])
run.remove_temp_files()
done = run.done_ids()
writer = ManifestWriter(run, every_rows=2)
for result in results:
    if result.task.task_id not in done:
        writer.add(result)
writer.flush()
"""


@pytest.fixture(scope="module")
def rendered(renderer, lora_dir, tmp_path_factory):
    """Six real render results, pickled for a writer process to commit."""
    import pickle

    from farm.sweep.plan import plan_job
    from farm.sweep.spec import parse_spec

    tasks = plan_job(parse_spec({"job": "w", "model": "tiny:sdxl", "defaults": {
        "prompt": "a", "steps": 2, "width": 64, "height": 64}, "axes": {"seed": list(range(6))}}), lora_dir).tasks
    results = [renderer.render(task) for task in tasks]
    assert all(r.status == "ok" for r in results)
    path = tmp_path_factory.mktemp("rendered") / "results.pkl"
    path.write_bytes(pickle.dumps(results))
    return path, results


@pytest.mark.parametrize("point", ["image-temp", "image-renamed", "manifest-temp", "manifest-renamed"])
def test_a_crash_at_each_point_of_the_write_path_loses_and_doubles_nothing(point, rendered, tmp_path):
    import hashlib
    import os
    import subprocess
    import sys

    pickled, results = rendered
    out = tmp_path / "run"
    env = {**os.environ, "SDFARM_CRASH_AT": point}
    crashed = subprocess.run([sys.executable, "-c", WRITER, str(pickled), str(out)], env=env, capture_output=True)
    assert crashed.returncode == 137, crashed.stderr.decode()[-2000:]

    def check_rows() -> list[dict]:
        rows = pq.read_table(out / "manifest").to_pylist() if (out / "manifest").is_dir() else []
        for row in rows:  # no partial row: each names an image that is there, whole
            data = (out / row["image_path"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == row["image_sha256"]
        return rows

    assert len(check_rows()) < len(results)
    env.pop("SDFARM_CRASH_AT")
    resumed = subprocess.run([sys.executable, "-c", WRITER, str(pickled), str(out)], env=env, capture_output=True)
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
    rows = check_rows()
    assert sorted(r["task_id"] for r in rows) == sorted(r.task.task_id for r in results)  # 0 duplicates
    assert not list(out.rglob(".*.tmp"))
