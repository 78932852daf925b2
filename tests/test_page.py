"""The results page (`RUN/results/`): its data.js from a hand-built run folder, and the page itself in
Debian's Chromium driven by Playwright, from file://, on a run of 3,000 grid cells.

The run folder is built by hand (manifest parts, PNGs with A1111 parameters, a scores part, run.json,
report.json), so the page's answers are known: lora (10) × strength (5) × prompt (6) × seed (10),
strengths planned in descending order (the opposite of the tasks' order, so planned order is
tested, not first seen), one cell not rendered, two failed, and one image filling two cells.
"""

from __future__ import annotations

import colorsys
import hashlib
import io
import itertools
import json
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
from PIL import Image, PngImagePlugin

from farm.errors import ManifestError
from farm.runs.manifest import SCHEMA, RunFolder, image_relpath
from farm.score.page import write_page
from farm.score.table import ScoreTable

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--allow-file-access-from-files"]
SIZE = (48, 72)  # not square: cells must keep the aspect ratio
PROMPTS = ["photo of ohwx man, portrait", "ohwx man hiking in the alps", "photo of a man", "ohwx man as a knight",
           "a man reading in a cafe", "ohwx man, studio lighting, 85mm"]
BIG = {"lora": [f"ep{i:02d}" for i in range(1, 11)], "strength": ["1.0", "0.8", "0.6", "0.4", "0.2"],
       "prompt": PROMPTS, "seed": [str(1000 + 7919 * i) for i in range(10)]}
SMALL = {"lora": ["ep01", "ep02", "ep03"], "strength": ["1.0", "0.5", "0.2"], "prompt": PROMPTS[:2],
         "seed": ["7", "11"]}


def special_cells(axes: dict[str, list[str]]) -> dict[str, list[tuple[str, ...]]]:
    """Positions with a known oddity, on the default page (first prompt, first seed) but one."""
    lora, strength, prompt, seed = (axes[a] for a in ("lora", "strength", "prompt", "seed"))
    first = (prompt[0], seed[0])
    return {"missing": [(lora[1], strength[0], *first)],
            "failed": [(lora[2], strength[1], *first), (lora[-1], strength[-1], prompt[-1], seed[-1])],
            "shared": [(lora[0], strength[2], *first), (lora[1], strength[2], *first)]}  # one image, two cells


def task_id(labels: tuple[str, ...]) -> str:
    return hashlib.sha256("|".join(labels).encode()).hexdigest()


def parameters(labels: tuple[str, ...], tid: str) -> str:
    lora, strength, prompt, seed = labels
    return (f"{prompt} <lora:{lora}:{strength}>\nNegative prompt: blurry, lowres\n"
            f"Steps: 20, Sampler: Euler, CFG scale: 5, Seed: {seed}, Size: {SIZE[0]}x{SIZE[1]}, Task: {tid}")


def png(labels: tuple[str, ...], index: tuple[int, ...], axes: dict, tid: str) -> bytes:
    """A small PNG whose colour shows its cell (hue: LoRA, lightness: strength, an inset: prompt
    and seed), carrying A1111 parameters like a render."""
    hue = index[0] / len(axes["lora"])
    r, g, b = colorsys.hls_to_rgb(hue, 0.3 + 0.45 * index[1] / len(axes["strength"]), 0.65)
    image = Image.new("RGB", SIZE, (int(r * 255), int(g * 255), int(b * 255)))
    inset = colorsys.hls_to_rgb((hue + 0.5 + index[2] / 12) % 1, 0.5 + index[3] / 40, 0.5)
    image.paste(tuple(int(c * 255) for c in inset), (12, 18, 36, 54))
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters(labels, tid))
    buffer = io.BytesIO()
    image.save(buffer, "PNG", pnginfo=info, compress_level=1)
    return buffer.getvalue()


def manifest_row(labels: tuple[str, ...], order: int, status: str, cells: list[tuple[str, ...]], data: bytes) -> dict:
    """A row with every SCHEMA field, as ManifestWriter would write it."""
    tid = task_id(labels)
    now = datetime.now(timezone.utc)
    row = {name: None for name in SCHEMA.names}
    names = ("lora", "strength", "prompt", "seed")
    row.update(task_id=tid, job="page-study", status=status, error="injected: CUDA out of memory" if status != "ok"
               else None, prompt=labels[2], negative_prompt="blurry, lowres", seed=int(labels[3]), steps=20, cfg=5.0,
               sampler="euler", scheduler="euler normal", width=SIZE[0], height=SIZE[1], model="sdxl-base",
               model_sha256="0" * 64, lora=labels[0], lora_sha256=hashlib.sha256(labels[0].encode()).hexdigest(),
               lora_strength=float(labels[1]), loras=[], axes=list(zip(names, labels)),
               cells=[list(zip(names, cell)) for cell in cells], order=order,
               image_path=image_relpath(tid) if status == "ok" else "",
               image_sha256=hashlib.sha256(data).hexdigest() if status == "ok" else "", node="n1", worker="w1",
               device="cpu", render_s=1.0, lora_switch_s=0.0, started_at=now, finished_at=now, farm_version="test",
               noise="comfyui", prompt_syntax="a1111")
    return row


def score_row(row: dict, index: tuple[int, ...]) -> dict:
    return {"task_id": row["task_id"], "image_sha256": row["image_sha256"], "reference": "ref", "subject_prompt": True,
            "faces": 1, "face_distance": round(0.25 + 0.04 * index[0] + 0.01 * index[1], 4),
            "face_distance_nearest": 0.2, "clip_t": 0.3 - 0.01 * index[0], "clip_i": 0.8, "clip_model": "tiny",
            "worker": "w1", "scored_at": datetime.now(timezone.utc)}


def is_scored(index: tuple[int, ...]) -> bool:
    """Scores for even LoRAs only: the heat map must leave odd ones untinted."""
    return index[0] % 2 == 0


def build_run(root: Path, axes: dict[str, list[str]], planned: bool = True, report: bool = False) -> RunFolder:
    """Every grid position gets its own task, but the specials (see `special_cells`). Tasks are
    ordered by ascending strength, against the planned (descending) order."""
    run = RunFolder(root)
    special = special_cells(axes)
    shared = special["shared"]
    names = list(axes)
    positions = list(itertools.product(*(range(len(axes[a])) for a in names)))
    positions.sort(key=lambda p: (p[0], -p[1], p[2], p[3]))  # strengths ascending: the reverse of the plan
    rows, scores = [], []
    for order, index in enumerate(positions):
        labels = tuple(axes[a][i] for a, i in zip(names, index))
        if labels in special["missing"] or labels == shared[1]:
            continue
        status = "failed" if labels in special["failed"] else "ok"
        tid = task_id(labels)
        data = png(labels, index, axes, tid) if status == "ok" else b""
        if data:
            (run.root / image_relpath(tid)).parent.mkdir(parents=True, exist_ok=True)
            (run.root / image_relpath(tid)).write_bytes(data)
        rows.append(manifest_row(labels, order, status, shared if labels == shared[0] else [labels], data))
        if status == "ok" and is_scored(index):
            scores.append(score_row(rows[-1], index))
    for start in range(0, len(rows), 1000):
        run.write_part(rows[start:start + 1000])
    ScoreTable(run).write_part(scores)
    info = {"job": "page-study"}
    if planned:
        info["axes"] = {"": axes}
    run.save_run_info(info)
    if report:
        write_report_json(run)
    return run


def write_report_json(run: RunFolder) -> None:
    """A report.json as farm report writes it, with one plot."""
    folder = run.root / "report"
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (380, 210), (240, 244, 255)).save(folder / "clip_t-by-epoch.png")

    def spread(mean):
        return {"mean": mean, "std": 0.01, "n": 30}

    def checkpoint(label, rank, likeness):
        return {"variant": "v1", "label": label, "epoch": int(label[2:]), "step": 10, "images": 300,
                "likeness": spread(likeness), "face_rate": 0.9, "leakage": spread(0.7), "clip_t": spread(0.31),
                "clip_i": spread(0.8), "loss_plot": "", "eligible": True, "rank": rank, "notes": []}

    checkpoints = [checkpoint("ep01", 2, 0.45), checkpoint("ep02", 1, 0.38), checkpoint("ep03", None, 0.5)]
    checkpoints[2].update(eligible=False, notes=["leaks: class-only faces at 0.410 < 0.550"])
    report = {"run": str(run.root), "images": 3000, "unscored": 1500, "strength": 1.0, "margin": 0.05,
              "rule": "ranked by likeness", "baseline": None, "checkpoints": checkpoints, "best": checkpoints[1],
              "likeness_by_strength": [], "plots": {"clip_t": "clip_t-by-epoch.png", "gone": "missing.png"}}
    (folder / "report.json").write_text(json.dumps(report))


def read_data(run: RunFolder) -> dict:
    text = (run.root / "results" / "data.js").read_text()
    assert text.startswith("window.SDFARM = ") and text.endswith(";\n")
    return json.loads(text[len("window.SDFARM = "):-2])


# ---- data.js, no browser ---------------------------------------------------------------------------


def test_data_js_holds_cells_images_and_planned_order(tmp_path):
    run = build_run(tmp_path / "run", SMALL, report=True)
    index = write_page(run)
    assert index == run.root / "results" / "index.html"
    for name in ("index.html", "page.js", "page.css", "data.js"):
        assert (run.root / "results" / name).stat().st_size > 100
    data = read_data(run)
    total = 3 * 3 * 2 * 2
    assert data["job"] == "page-study"
    assert [a["name"] for a in data["axes"]] == ["lora", "strength", "prompt", "seed"]
    assert [a["values"] for a in data["axes"]] == [SMALL[a] for a in SMALL]  # planned, not first seen
    assert len(data["cells"]) == total - 1  # one not rendered
    assert len(data["images"]) == total - 2  # ... and one image fills two cells
    fields = data["imageFields"]
    images = [dict(zip(fields, image)) for image in data["images"]]
    assert len({i["task"] for i in images}) == len(images)
    shared = task_id(special_cells(SMALL)["shared"][0])
    assert sum(1 for c in data["cells"] if images[c[0]]["task"] == shared) == 2
    failed = [i for i in images if i["status"] == "failed"]
    assert len(failed) == 2 and all(not i["src"] and data["strings"][i["error"]].startswith("injected") for i in failed)
    ok = next(i for i in images if i["status"] == "ok")
    assert ok["src"] == f"../{image_relpath(ok['task'])}" and (ok["w"], ok["h"]) == SIZE
    params = "\n".join(", ".join(data["strings"][s] for s in line) for line in ok["params"])
    assert params == parameters(next(labels for labels in itertools.product(*SMALL.values())
                                     if task_id(labels) == ok["task"]), ok["task"])
    assert f"Task: {ok['task']}" in params and f"Seed: {ok['seed']}" in params
    assert [s["key"] for s in data["scores"]] == ["face_distance", "face_distance_nearest", "clip_t", "clip_i"]
    scored = [i for i in images if i["scores"][0] is not None]
    assert scored == [i for i in images if i["status"] == "ok" and data["strings"][i["lora"]] in ("ep01", "ep03")]
    assert data["report"]["plots"] == [{"name": "clip_t", "src": "../report/clip_t-by-epoch.png"}]
    assert "run" not in data["report"]  # no absolute path of the writer's machine on a published page


def test_data_js_falls_back_to_first_seen_order_without_run_json_axes(tmp_path):
    run = build_run(tmp_path / "run", SMALL, planned=False)
    write_page(run)
    values = {a["name"]: a["values"] for a in read_data(run)["axes"]}
    assert values["strength"] == ["0.2", "0.5", "1.0"]  # the tasks' order: ascending
    assert values["lora"] == SMALL["lora"]


def test_data_js_stays_compact(tmp_path):
    """Strings repeated across images (prompts, settings, the items of the parameters text) are stored once."""
    run = build_run(tmp_path / "run", SMALL)
    write_page(run)
    data = read_data(run)
    assert len(data["strings"]) == len(set(data["strings"]))
    assert {"Steps: 20", "Sampler: Euler", "photo of ohwx man"} <= set(data["strings"])
    text = (run.root / "results" / "data.js").read_text()
    assert text.count("Negative prompt: blurry") == 1  # 34 images' parameters, one string
    assert len(text.encode()) < 450 * len(data["images"])  # task id, image path, parameters, scores: ~400 bytes


def build_two_tables(root: Path) -> RunFolder:
    """A job with two sweeps (tables): lora × prompt at seed 7, and lora × seed at the first prompt.
    The images both tables hold (seed 7, first prompt) are one task filling a cell in each."""
    run = RunFolder(root)
    loras, prompts, seeds = ["ep01", "ep02"], PROMPTS[:2], ["7", "11"]
    planned = {"by-prompt": {"sweep": ["by-prompt"], "lora": loras, "prompt": prompts},
               "by-seed": {"sweep": ["by-seed"], "lora": loras, "seed": seeds}}
    rows = []
    for lora, prompt, seed in itertools.product(loras, prompts, seeds):
        cells = ([[("sweep", "by-prompt"), ("lora", lora), ("prompt", prompt)]] if seed == "7" else []) + \
                ([[("sweep", "by-seed"), ("lora", lora), ("seed", seed)]] if prompt == prompts[0] else [])
        if not cells:
            continue
        labels = (lora, "1.0", prompt, seed)
        data = png(labels, (loras.index(lora), 0, prompts.index(prompt), seeds.index(seed)), SMALL, task_id(labels))
        (run.root / image_relpath(task_id(labels))).parent.mkdir(parents=True, exist_ok=True)
        (run.root / image_relpath(task_id(labels))).write_bytes(data)
        row = manifest_row(labels, len(rows), "ok", [labels], data)
        row.update(axes=cells[0], cells=cells)
        rows.append(row)
    run.write_part(rows)
    run.save_run_info({"job": "two-tables", "axes": planned})
    return run


def test_data_js_of_two_tables_marks_what_each_table_spans(tmp_path):
    run = build_two_tables(tmp_path / "run")
    write_page(run)
    data = read_data(run)
    assert [(a["name"], a["values"]) for a in data["axes"]] == [
        ("sweep", ["by-prompt", "by-seed"]), ("lora", ["ep01", "ep02"]), ("prompt", PROMPTS[:2] + ["-"]),
        ("seed", ["7", "11", "-"])]
    assert len(data["images"]) == 6 and len(data["cells"]) == 8
    assert sorted(data["sweeps"]) == [[[0], [0, 1], [0, 1], [2]], [[1], [0, 1], [2], [0, 1]]]


def test_empty_run_is_a_manifest_error(tmp_path):
    with pytest.raises(ManifestError) as caught:
        write_page(RunFolder(tmp_path / "empty-run"))
    assert "empty-run" in str(caught.value) and "\n" not in str(caught.value)
    assert not (tmp_path / "empty-run" / "results").exists()


# ---- the page in a browser -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_run(tmp_path_factory):
    """3,000 grid cells, written once for the browser tests; the page is written here too."""
    started = time.perf_counter()
    run = build_run(tmp_path_factory.mktemp("page") / "run", BIG, report=True)
    built = time.perf_counter()
    write_page(run)
    print(f"\nrun folder: {built - started:.2f} s; write_page: {time.perf_counter() - built:.2f} s; "
          f"data.js: {(run.root / 'results' / 'data.js').stat().st_size / 1e6:.2f} MB")
    return run


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium (Debian's: Playwright never downloads one) for the whole module."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e .[test])")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 900}, color_scheme="light")
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    tab.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    yield tab
    context.close()
    assert not errors, errors


def open_page(page, run: RunFolder, fragment: str = "") -> float:
    """Open the page from file://; seconds from navigation to the grid laid out."""
    started = time.perf_counter()
    page.goto((run.root / "results" / "index.html").as_uri() + fragment, wait_until="domcontentloaded")
    page.wait_for_selector("body[data-ready]")
    return time.perf_counter() - started


def cell_task(labels: tuple[str, ...]) -> str:
    return task_id(labels)


def row_labels(page) -> list[str]:
    return page.eval_on_selector_all(".rowhead", "nodes => nodes.map(n => n.dataset.value)")


def col_labels(page) -> list[str]:
    return page.eval_on_selector_all(".colhead", "nodes => nodes.map(n => n.dataset.value)")


@pytest.mark.slow
def test_page_loads_fast_with_the_default_layout(page, big_run):
    seconds = open_page(page, big_run)
    in_page_ms = float(page.evaluate("document.body.dataset.readyMs"))
    print(f"\ndefault page: {seconds:.3f} s from goto to grid ({in_page_ms:.0f} ms in the page)")
    # the page's own clock from navigation start to the grid laid out (Chromium starting a
    # renderer process for the test, which a user's open browser does not pay, is not counted)
    assert in_page_ms < 2000
    assert row_labels(page) == BIG["lora"] and col_labels(page) == BIG["strength"]  # planned order
    assert page.locator(".cell").count() == 10 * 5  # one page: the first prompt and seed
    assert page.locator(".cell[data-task]").count() == 10 * 5 - 1  # ... one of its cells is not rendered
    assert page.locator(".cell.missing").count() == 1
    assert page.locator(".cell img[loading=lazy]").count() == 10 * 5 - 2  # but the failed one
    selects = page.eval_on_selector_all(".page-select", "s => s.map(x => [x.dataset.axis, x.selectedOptions[0].text])")
    assert selects == [["prompt", PROMPTS[0]], ["seed", BIG["seed"][0]]]
    assert page.inner_text("#page-info") == "1 / 60"
    page.keyboard.press("]")
    assert page.inner_text("#page-info") == "2 / 60"
    assert page.eval_on_selector('.page-select[data-axis="seed"]', "s => s.selectedOptions[0].text") == BIG["seed"][1]


@pytest.mark.slow
def test_all_3000_cells_stacked_load_fast(page, big_run):
    seconds = open_page(page, big_run, "#p.prompt=*&p.seed=*")
    in_page_ms = float(page.evaluate("document.body.dataset.readyMs"))
    print(f"\nall 3,000 cells: {seconds:.3f} s from goto to grid ({in_page_ms:.0f} ms in the page)")
    assert in_page_ms < 2000
    assert page.locator(".cell").count() == 3000
    assert page.locator(".section").count() == 6 * 10
    started = time.perf_counter()
    page.click("#swap")
    assert row_labels(page)[:5] == BIG["strength"]
    print(f"swap at 3,000 cells: {time.perf_counter() - started:.3f} s")
    assert page.locator(".cell").count() == 3000


@pytest.mark.slow
def test_choosing_the_rows_axis_relays_the_grid(page, big_run):
    open_page(page, big_run)
    page.select_option("#rows", label="strength (5)")
    assert row_labels(page) == BIG["strength"]  # planned (descending), not the tasks' order
    assert col_labels(page) == BIG["lora"]  # the columns took the axis the rows gave up
    per_row = page.eval_on_selector_all(".cell", "cells => cells.map(c => c.dataset.r)")
    assert [per_row.count(str(r)) for r in range(5)] == [10] * 5
    page.select_option("#cols", label="seed (10)")
    assert col_labels(page) == BIG["seed"] and row_labels(page) == BIG["strength"]
    assert sorted(page.eval_on_selector_all(".page-select", "s => s.map(x => x.dataset.axis)")) == ["lora", "prompt"]
    assert "rows=strength" in page.evaluate("location.hash")


@pytest.mark.slow
def test_a_cell_opens_the_viewer_and_arrows_move(page, big_run):
    open_page(page, big_run)
    labels = (BIG["lora"][4], BIG["strength"][1], PROMPTS[0], BIG["seed"][0])
    page.click(f'.cell[data-task="{cell_task(labels)}"]')
    assert page.is_visible("#viewer")
    src = page.get_attribute("#viewer-img", "src")
    assert src.endswith(image_relpath(cell_task(labels)))
    assert page.evaluate("document.getElementById('viewer-img').naturalWidth") in (0, SIZE[0])
    page.wait_for_function("document.getElementById('viewer-img').naturalWidth > 0")
    params = page.inner_text("#viewer-params")
    assert f"Seed: {labels[3]}" in params and PROMPTS[0] in params and f"<lora:{labels[0]}:{labels[1]}>" in params
    assert page.inner_text("#viewer-task") == cell_task(labels)
    assert "0.420" in page.inner_text("#viewer-scores")  # face distance: 0.25 + 0.04 * 4 + 0.01 * 1
    page.keyboard.press("ArrowRight")
    right = (labels[0], BIG["strength"][2], *labels[2:])
    assert page.get_attribute("#viewer", "data-task") == cell_task(right)
    page.keyboard.press("ArrowDown")
    below = (BIG["lora"][5], *right[1:])
    assert page.get_attribute("#viewer", "data-task") == cell_task(below)
    assert page.get_attribute("#viewer-img", "src").endswith(image_relpath(cell_task(below)))
    page.keyboard.press("Escape")
    assert page.is_hidden("#viewer")


@pytest.mark.slow
def test_heat_map_tints_scored_cells_only(page, big_run):
    open_page(page, big_run)
    page.select_option("#heat", "face_distance")
    tinted = set(page.eval_on_selector_all(".cell.heat", "cells => cells.map(c => c.dataset.task)"))
    shown = set(page.eval_on_selector_all(".cell[data-task]", "cells => cells.map(c => c.dataset.task)"))
    special = special_cells(BIG)
    expected = {cell_task((lora, strength, PROMPTS[0], BIG["seed"][0]))
                for i, lora in enumerate(BIG["lora"]) if is_scored((i,)) for strength in BIG["strength"]}
    expected -= {cell_task(labels) for labels in special["failed"]}
    expected -= {cell_task(labels) for labels in special["missing"] + special["shared"][1:]}
    assert tinted == expected and tinted < shown
    scored = cell_task((BIG["lora"][2], BIG["strength"][0], PROMPTS[0], BIG["seed"][0]))
    assert page.inner_text(f'.cell[data-task="{scored}"] .badge') == "0.330"  # 0.25 + 0.04 * 2
    assert page.is_visible("#legend")
    page.select_option("#heat", "")
    assert page.locator(".cell.heat").count() == 0


@pytest.mark.slow
def test_failed_and_missing_cells_are_marked(page, big_run):
    open_page(page, big_run)
    failed = special_cells(BIG)["failed"][0]
    cell = page.locator(f'.cell[data-task="{cell_task(failed)}"]')
    assert cell.get_attribute("data-status") == "failed" and "failed" in cell.get_attribute("class")
    assert "FAILED" in cell.inner_text().upper() and "out of memory" in cell.inner_text()
    assert page.locator('.cell.missing[data-status="not-rendered"]').count() == 1
    cell.click()
    assert page.is_visible("#viewer-placeholder") and "out of memory" in page.inner_text("#viewer-placeholder")


@pytest.mark.slow
def test_filters_and_report(page, big_run):
    open_page(page, big_run)
    page.click("#filters-toggle")
    page.uncheck('#filters input[data-axis="lora"][data-value="ep03"]')
    assert "ep03" not in row_labels(page) and len(row_labels(page)) == 9
    page.click("#tab-report")
    assert page.is_visible("#report") and page.is_hidden("#grid")
    assert "ep02" in page.inner_text("#report-best")
    assert page.locator("#report-table tbody tr").count() == 3
    assert page.locator("#report-table tr.best").inner_text().startswith("1")
    page.wait_for_function("[...document.querySelectorAll('#report-plots img')].every(i => i.naturalWidth > 0)")
    assert page.locator("#report-plots img").count() == 1  # the plot whose file is gone is left out


@pytest.mark.slow
def test_two_tables_page_between_planned_combinations(page, tmp_path):
    """A page no table plans (sweep by-prompt at seed 11) is never shown: the page moves to a planned
    one, keeping the axis just chosen; holes between tables are blank, not "not rendered"."""
    run = build_two_tables(tmp_path / "run")
    write_page(run)
    open_page(page, run, "#rows=lora&cols=prompt")
    assert page.locator(".cell[data-task]").count() == 4 and col_labels(page) == PROMPTS[:2]
    assert page.locator(".cell.missing").count() == 0
    page.select_option('.page-select[data-axis="sweep"]', label="by-seed")
    assert page.eval_on_selector('.page-select[data-axis="sweep"]', "s => s.selectedOptions[0].text") == "by-seed"
    assert col_labels(page) == ["-"] and page.locator(".cell[data-task]").count() == 2
    page.select_option('.page-select[data-axis="seed"]', label="11")
    assert page.locator(".cell[data-task]").count() == 2 and page.locator(".cell.missing").count() == 0
    page.select_option("#cols", label="seed (3)")
    assert col_labels(page) == ["7", "11"] and page.locator(".cell[data-task]").count() == 4


@pytest.mark.slow
def test_screenshot(page, big_run):
    """test-artifacts/results-page.png: the default page with the heat map on, images loaded."""
    open_page(page, big_run)
    page.select_option("#heat", "face_distance")
    page.wait_for_function("[...document.querySelectorAll('.cell img')].slice(0, 20).every(i => i.naturalWidth)")
    ARTIFACTS.mkdir(exist_ok=True)
    target = ARTIFACTS / "results-page.png"
    page.screenshot(path=str(target))
    with Image.open(target) as shot:
        assert shot.size == (1400, 900)
        assert len(shot.convert("RGB").getcolors(1 << 20) or []) > 200  # images, labels, tints: not a blank page
    assert target.stat().st_size > 30_000
