"""Grids from a real run folder (rendered without Ray by the session renderer)."""

import pytest
from PIL import Image

from farm.errors import FarmError
from farm.runs.grid import BLANK, Page, _blank, _font, build_pages, draw_page, make_grids, wrap
from farm.runs.manifest import ManifestWriter, RunFolder
from farm.sweep.plan import plan_job
from farm.sweep.spec import parse_spec

CELL = 96


@pytest.fixture(scope="module")
def run_dir(renderer, lora_dir, tmp_path_factory):
    """lora (3) × prompt (2) × seed (2), with one task left unrendered and one failed."""
    data = {"job": "g", "model": "tiny:sdxl",
            "defaults": {"prompt": "x", "steps": 2, "width": 64, "height": 64, "seed": 3},
            "axes": {"lora": ["none", {"file": "subject-000001", "label": "epoch 1"}, "subject-000002"],
                     "prompt": [{"positive": "photo of a man", "label": "photo man"},
                                "a very long prompt about a w0ut3r man on a cliff with fjords behind him"],
                     "seed": [3, 4]}}
    plan = plan_job(parse_spec(data), lora_dir)
    tasks = plan.tasks
    run = RunFolder(tmp_path_factory.mktemp("run"))
    run.save_run_info({"job": "g", "axes": plan.axis_labels})
    writer = ManifestWriter(run)
    for task in tasks[1:]:  # tasks[0] stays missing
        result = renderer.render(task)
        if task is tasks[-1]:
            result.status, result.error = "failed", "injected"
        writer.add(result)
    writer.flush()
    return run.root


def test_pages_rows_and_columns_follow_the_spec(run_dir):
    pages = build_pages(RunFolder(run_dir), "lora", "prompt")
    assert len(pages) == 2  # seed varies too, so it pages
    assert pages[0].row_labels == ["none", "epoch 1", "subject-000002"]
    assert pages[0].col_labels[0] == "photo man"
    assert pages[0].fixed["seed"] == "3" and pages[1].fixed["seed"] == "4"
    assert pages[0].fixed["Steps"] == "2" and pages[0].fixed["Size"] == "64x64"


def test_grid_png_dimensions_and_blank_cells(run_dir):
    paths = make_grids(run_dir, "lora", "prompt", ["seed"], cell_px=CELL)
    assert [p.name for p in paths] == ["lora-x-prompt-01.png", "lora-x-prompt-02.png"]
    first = Image.open(paths[0]).convert("RGB")
    assert first.width == CELL + 2 * CELL  # row-label column + two prompt columns
    header = first.height - 3 * CELL
    assert header > 0
    # seed 3, lora none, prompt 1 is the task never rendered; seed 4, the last lora, prompt 2 failed
    second = Image.open(paths[1]).convert("RGB")
    assert first.crop((CELL, header, 2 * CELL, header + CELL)).tobytes() == _blank(CELL, "missing").tobytes()
    assert second.crop((2 * CELL, header + 2 * CELL, 3 * CELL, header + 3 * CELL)).tobytes() == \
        _blank(CELL, "failed").tobytes()
    assert _blank(CELL, "failed").tobytes() != _blank(CELL, "missing").tobytes()
    # every rendered cell holds its own image, scaled to the cell
    rendered = first.crop((CELL, header + CELL, 2 * CELL, header + 2 * CELL))
    assert rendered.getpixel((5, 5)) != BLANK and len(set(rendered.getdata())) > 50
    index = (run_dir / "grids" / "index.html").read_text()
    assert "lora-x-prompt-01.png" in index and "lora-x-prompt-02.png" in index


def test_row_labels_are_drawn_in_their_rows(run_dir):
    path = make_grids(run_dir, "lora", "prompt", ["seed"], cell_px=CELL)[1]
    image = Image.open(path).convert("L")
    header = image.height - 3 * CELL
    for row in range(3):
        label_box = image.crop((0, header + row * CELL, CELL, header + (row + 1) * CELL))
        assert min(label_box.getdata()) < 128, f"no label ink in row {row}"


def test_swapped_axes_and_bad_axis(run_dir):
    pages = build_pages(RunFolder(run_dir), "prompt", "seed", ["lora"])
    assert len(pages) == 3 and pages[0].col_labels == ["3", "4"]
    with pytest.raises(FarmError, match="--rows steps: not an axis of this run .axes: lora, prompt, seed"):
        build_pages(RunFolder(run_dir), "steps", "prompt")
    with pytest.raises(FarmError, match="must be different"):
        build_pages(RunFolder(run_dir), "lora", "lora")


def test_rows_nobody_rendered_still_show_as_blanks(run_dir, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    info = RunFolder(copy).load_run_info()
    info["axes"][""]["lora"].append("epoch 9")  # planned, never rendered
    RunFolder(copy).save_run_info(info)
    page = build_pages(RunFolder(copy), "lora", "prompt", ["seed"])[0]
    assert page.row_labels[-1] == "epoch 9"
    assert all(("epoch 9", col) not in page.cells for col in page.col_labels)


def test_empty_run_folder_says_so(tmp_path):
    with pytest.raises(FarmError, match="no manifest rows yet"):
        make_grids(tmp_path, "lora", "prompt")


def _ink_bands(image: Image.Image) -> list[tuple[int, int]]:
    """The runs of image rows that hold dark ink: one per line of text."""
    gray = image.convert("L")
    inked = [min(gray.crop((0, y, gray.width, y + 1)).getdata()) < 128 for y in range(gray.height)]
    bands, start = [], None
    for y, ink in enumerate([*inked, False]):
        if ink and start is None:
            start = y
        elif not ink and start is not None:
            bands.append((start, y))
            start = None
    return bands


def test_a_long_column_label_wraps_inside_its_column(tmp_path):
    long = "line art drawing of a w0ut3r man, headshot, professional, sleek"
    page = Page(title="", row_labels=["r"], col_labels=["short", long], cells={}, fixed={})
    image = draw_page(RunFolder(tmp_path), page, CELL)
    header = image.height - CELL
    label_lines = len(wrap(long, _font(max(12, CELL // 10)), CELL - 8))
    assert label_lines >= 3
    assert len(_ink_bands(image.crop((CELL, 0, 2 * CELL, header)))) == 1
    assert len(_ink_bands(image.crop((2 * CELL, 0, 3 * CELL, header)))) == label_lines
    # no label spills over its column's edges
    for x in (CELL, 2 * CELL, 3 * CELL - 1):
        assert min(image.convert("L").crop((x, 0, x + 1, header)).getdata()) >= 128


def test_wrap_fits_width():
    font = _font(14)
    lines = wrap("line art drawing of a w0ut3r man, headshot, professional, sleek", font, 90)
    assert len(lines) > 2 and all(font.getlength(line) <= 90 for line in lines)
    assert " ".join(lines) == "line art drawing of a w0ut3r man, headshot, professional, sleek"
