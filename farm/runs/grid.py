"""Manifest → labelled grids (one PNG per page) and an index.html that shows them.

Reads only the run's manifest and the PNGs it names. Rows and columns are two axes; every other
axis that varies makes pages (one grid per combination), and settings that are the same across
a page go into its title, like A1111's X/Y/Z plot. A cell with no image (not rendered yet, or
failed) is drawn as a marked blank, never skipped, so grids line up across runs.
"""

from __future__ import annotations

import html
import itertools
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from farm.errors import ManifestError, UsageError
from farm.runs.manifest import RunFolder

_TITLE_FIELDS = [("model", "Model"), ("sampler", "Sampler"), ("steps", "Steps"), ("cfg", "CFG"),
                 ("seed", "Seed"), ("size", "Size"), ("negative_prompt", "Negative")]
BACKGROUND, INK, BLANK = (255, 255, 255), (20, 20, 20), (235, 235, 235)


@dataclass
class Cell:
    labels: dict[str, str]
    row: dict  # the manifest row whose image fills this cell


@dataclass
class Page:
    title: str
    row_labels: list[str]
    col_labels: list[str]
    cells: dict[tuple[str, str], dict]  # (row label, col label) → manifest row
    fixed: dict[str, str]


def _font(size: int):
    """Pillow's bundled scalable font: no system font path, same glyphs on every machine."""
    return ImageFont.load_default(size=size)


def wrap(text: str, font, width: int) -> list[str]:
    """Greedy word wrap to `width` pixels; a single over-long word is cut by characters."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}".strip()
            if font.getlength(candidate) <= width or not line:
                line = candidate
            else:
                lines.append(line)
                line = word
            while font.getlength(line) > width and len(line) > 1:
                cut = max(1, int(len(line) * width / font.getlength(line)) - 1)
                lines.append(line[:cut])
                line = line[cut:]
        lines.append(line)
    return lines


def _wrap_items(items: list[str], font, width: int, sep: str = "  ·  ") -> list[str]:
    """Lines of `a · b · c`, breaking only between items (a seed never splits from its name)."""
    lines, line = [], ""
    for item in items:
        candidate = f"{line}{sep}{item}" if line else item
        if line and font.getlength(candidate) > width:
            lines.append(line)
            line = item
        else:
            line = candidate
    return lines + ([line] if line else [])


def _cells(table) -> list[Cell]:
    rows = table.to_pylist()
    return [Cell(labels=dict(cell), row=row) for row in rows for cell in row["cells"]]


def _ordered_labels(cells: list[Cell], axis: str, planned: dict[str, list[str]]) -> list[str]:
    """The spec's order (from run.json, so unrendered rows still show), then any others seen."""
    first_seen: dict[str, int] = {}
    for cell in cells:
        label = cell.labels[axis]
        first_seen[label] = min(first_seen.get(label, cell.row["order"]), cell.row["order"])
    known = list(planned.get(axis, []))
    return known + sorted((l for l in first_seen if l not in known), key=first_seen.get)


def _fixed_settings(cells: list[Cell]) -> dict[str, str]:
    fixed = {}
    for key, title in _TITLE_FIELDS:
        if key == "size":
            values = {f"{c.row['width']}x{c.row['height']}" for c in cells}
        else:
            values = {str(c.row[key]) for c in cells}
        if len(values) == 1:
            value = values.pop()
            if value:
                fixed[title] = value
    return fixed


def build_pages(run: RunFolder, rows_axis: str, cols_axis: str, pages_axis: list[str] | None = None) -> list[Page]:
    table = run.read()
    if table.num_rows == 0:
        raise ManifestError(f"{run.root}: no manifest rows yet (run the job first)")
    cells = _cells(table)
    planned = run.load_run_info().get("axes", {})
    axes = list(dict.fromkeys(axis for cell in cells for axis in cell.labels))
    for option, axis in (("--rows", rows_axis), ("--cols", cols_axis), *(("--pages", p) for p in pages_axis or [])):
        if axis not in axes:
            raise UsageError(f"{option} {axis}: not an axis of this run (axes: {', '.join(axes) or 'none'})")
    if rows_axis == cols_axis:
        raise UsageError("--rows and --cols must be different axes")
    wanted = {rows_axis, cols_axis, *(pages_axis or [])}
    cells = [c for c in cells if wanted <= c.labels.keys()]  # tables (sweeps) without these axes
    if not cells:
        raise UsageError(f"no table of this run has both {rows_axis} and {cols_axis}")
    axes = list(dict.fromkeys(axis for cell in cells for axis in cell.labels))
    for cell in cells:  # an axis only some tables have: the others show as "-" on it
        for axis in axes:
            cell.labels.setdefault(axis, "-")
    varying = [a for a in axes if len({c.labels[a] for c in cells}) > 1]
    page_axes = list(pages_axis or []) + [a for a in varying if a not in (rows_axis, cols_axis, *(pages_axis or []))]
    all_planned = {axis: [l for table in planned.values() for l in table.get(axis, [])] for axis in axes}
    page_values = [_ordered_labels(cells, a, {a: list(dict.fromkeys(all_planned[a]))}) for a in page_axes]
    pages = []
    for combo in itertools.product(*page_values) if page_axes else [()]:
        selected = [c for c in cells if all(c.labels[a] == v for a, v in zip(page_axes, combo))]
        if not selected:  # nothing of this page rendered yet: skip rather than draw all blanks
            continue
        planned_here = planned.get(selected[0].labels["sweep"] if "sweep" in axes else "", {})
        fixed = _fixed_settings(selected)
        fixed.update({a: v for a, v in zip(page_axes, combo)})
        fixed.update({a: selected[0].labels[a] for a in axes if a not in varying})
        pages.append(Page(
            title=f"{table['job'][0].as_py()}: rows {rows_axis}, columns {cols_axis}",
            row_labels=_ordered_labels(selected, rows_axis, planned_here),
            col_labels=_ordered_labels(selected, cols_axis, planned_here),
            cells={(c.labels[rows_axis], c.labels[cols_axis]): c.row for c in selected},
            fixed=fixed,
        ))
    return pages


def _blank(size: int, text: str) -> Image.Image:
    image = Image.new("RGB", (size, size), BLANK)
    draw = ImageDraw.Draw(image)
    draw.line([(0, 0), (size, size)], fill=(200, 80, 80), width=2)
    draw.line([(0, size), (size, 0)], fill=(200, 80, 80), width=2)
    font = _font(max(10, size // 8))
    draw.text((size / 2, size / 2), text, font=font, fill=(160, 30, 30), anchor="mm")
    return image


def _cell_image(run: RunFolder, row: dict | None, size: int) -> Image.Image:
    if row is None:
        return _blank(size, "missing")
    if row["status"] != "ok":
        return _blank(size, "failed")
    try:
        with Image.open(run.root / row["image_path"]) as image:
            image = image.convert("RGB")
    except OSError:
        return _blank(size, "unreadable")
    resample = Image.Resampling.NEAREST if image.width < size else Image.Resampling.LANCZOS
    return image.resize((size, size * image.height // image.width), resample)


def draw_page(run: RunFolder, page: Page, cell_px: int) -> Image.Image:
    """Paste a page's images under wrapped column labels, beside row labels, below a title."""
    label_font, title_font = _font(max(12, cell_px // 10)), _font(max(14, cell_px // 8))
    line_h = int(label_font.size * 1.25)
    col_lines = [wrap(label, label_font, cell_px - 8) for label in page.col_labels]
    row_w = cell_px
    row_lines = [wrap(label, label_font, row_w - 8) for label in page.row_labels]
    header_h = max(len(lines) for lines in col_lines) * line_h + 12
    width = row_w + cell_px * len(page.col_labels)
    title_lines = [page.title] + _wrap_items([f"{k}: {v}" for k, v in page.fixed.items()], label_font, width - 16)
    title_h = int(title_font.size * 1.4) + line_h * (len(title_lines) - 1) + 8
    cell_h = cell_px  # images are square-ish; taller ones are cropped by the paste box
    height = title_h + header_h + cell_h * len(page.row_labels)
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    draw.text((8, 6), title_lines[0], font=title_font, fill=INK)
    for i, line in enumerate(title_lines[1:]):
        draw.text((8, 6 + int(title_font.size * 1.4) + i * line_h), line, font=label_font, fill=(90, 90, 90))
    for c, lines in enumerate(col_lines):
        x = row_w + c * cell_px + cell_px / 2
        top = title_h + (header_h - len(lines) * line_h) / 2
        for j, line in enumerate(lines):
            draw.text((x, top + j * line_h), line, font=label_font, fill=INK, anchor="ma")
    for r, lines in enumerate(row_lines):
        y = title_h + header_h + r * cell_h + (cell_h - len(lines) * line_h) / 2
        for j, line in enumerate(lines):
            draw.text((row_w / 2, y + j * line_h), line, font=label_font, fill=INK, anchor="ma")
        for c, col in enumerate(page.col_labels):
            image = _cell_image(run, page.cells.get((page.row_labels[r], col)), cell_px)
            canvas.paste(image.crop((0, 0, cell_px, cell_h)), (row_w + c * cell_px, title_h + header_h + r * cell_h))
    return canvas


def _default_cell_px(pages: list[Page]) -> int:
    widths = [row["width"] for page in pages for row in page.cells.values()]
    return max(128, min(512, max(widths)))


def make_grids(run_dir: str | Path, rows: str, cols: str, pages: list[str] | None = None,
               cell_px: int | None = None) -> list[Path]:
    """Write `grids/<rows>-x-<cols>-NN.png` for every page and `grids/index.html`; return the PNGs."""
    run = RunFolder(run_dir)
    built = build_pages(run, rows, cols, pages)
    size = cell_px or _default_cell_px(built)
    out_dir = run.root / "grids"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for number, page in enumerate(built, start=1):
        path = out_dir / f"{rows}-x-{cols}-{number:02d}.png"
        draw_page(run, page, size).save(path)
        written.append(path)
    _write_index(out_dir, built, written)
    return written


def _write_index(out_dir: Path, pages: list[Page], paths: list[Path]) -> None:
    sections = []
    for page, path in zip(pages, paths):
        fixed = " · ".join(f"{html.escape(k)}: {html.escape(v)}" for k, v in page.fixed.items())
        sections.append(
            f'<section><h2>{html.escape(page.title)}</h2><p>{fixed}</p>'
            f'<a href="{html.escape(path.name)}"><img src="{html.escape(path.name)}" '
            f'alt="{html.escape(page.title)}"></a></section>'
        )
    existing = sorted(p.name for p in out_dir.glob("*.png"))
    others = "".join(f'<li><a href="{html.escape(n)}">{html.escape(n)}</a></li>' for n in existing)
    (out_dir / "index.html").write_text(
        "<!doctype html><meta charset=utf-8><title>sdfarm grids</title>"
        "<style>body{font-family:sans-serif;margin:1em}img{max-width:100%;border:1px solid #ccc}"
        "section{margin-bottom:2em}</style>"
        + "".join(sections) + f"<h3>All grids in this folder</h3><ul>{others}</ul>"
    )
