"""The report's two charts, drawn with Pillow (no plotting library to install on every node):
a score over epochs, one line per variant, and a likeness-vs-leakage scatter, one dot per
checkpoint."""

from __future__ import annotations

import math
from pathlib import Path

from farm.files import replacing

WIDTH, HEIGHT, PAD, LEGEND = 760, 420, 56, 150
# distinguishable on white, in a fixed order so a variant keeps its colour across charts
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


class _Frame:
    """Axes mapping data to pixels, with ticks at round values."""

    def __init__(self, xs: list[float], ys: list[float]):
        self.x0, self.x1 = _span(xs)
        self.y0, self.y1 = _span(ys)

    def point(self, x: float, y: float) -> tuple[float, float]:
        left, right, top, bottom = PAD, WIDTH - LEGEND - PAD // 2, PAD // 2 + 14, HEIGHT - PAD
        return (left + (right - left) * (x - self.x0) / (self.x1 - self.x0),
                bottom - (bottom - top) * (y - self.y0) / (self.y1 - self.y0))

    def draw(self, draw, font, title: str, x_label: str, y_label: str) -> None:
        (left, bottom), (right, top) = self.point(self.x0, self.y0), self.point(self.x1, self.y1)
        draw.rectangle([left, top, right, bottom], outline=(150, 150, 150))
        for value in _ticks(self.x0, self.x1):
            x, _ = self.point(value, self.y0)
            draw.line([x, bottom, x, bottom + 4], fill=(120, 120, 120))
            draw.text((x, bottom + 6), _fmt(value), font=font, fill="black", anchor="mt")
        for value in _ticks(self.y0, self.y1):
            _, y = self.point(self.x0, value)
            draw.line([left - 4, y, left, y], fill=(120, 120, 120))
            draw.text((left - 6, y), _fmt(value), font=font, fill="black", anchor="rm")
        draw.text((PAD, 6), title, font=font, fill="black")
        draw.text(((left + right) / 2, HEIGHT - 16), x_label, font=font, fill="black", anchor="mm")
        draw.text((6, top - 14), y_label, font=font, fill="black")


def line_chart(series: dict[str, list[tuple[float, float]]], out: Path, title: str, x_label: str,
               y_label: str) -> Path | None:
    """One line (with dots) per named series; None when there is nothing to draw."""
    points = [p for values in series.values() for p in values]
    if not points:
        return None
    image, draw, font = _canvas()
    frame = _Frame([x for x, _ in points], [y for _, y in points])
    frame.draw(draw, font, title, x_label, y_label)
    for index, (name, values) in enumerate(series.items()):
        colour = PALETTE[index % len(PALETTE)]
        pixels = [frame.point(x, y) for x, y in sorted(values)]
        if len(pixels) > 1:
            draw.line(pixels, fill=colour, width=2)
        for x, y in pixels:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        _legend(draw, font, index, name, colour)
    return _save(image, out)


def scatter(points: list[tuple[str, str, float, float]], out: Path, title: str, x_label: str, y_label: str,
            guides: dict[str, tuple[str, float]] | None = None) -> Path | None:
    """Dots `(series, label, x, y)`, coloured by series and labelled; `guides` draws dashed
    reference lines: name → ("x" | "y", value)."""
    if not points:
        return None
    image, draw, font = _canvas()
    guides = guides or {}
    xs = [p[2] for p in points] + [v for axis, v in guides.values() if axis == "x"]
    ys = [p[3] for p in points] + [v for axis, v in guides.values() if axis == "y"]
    frame = _Frame(xs, ys)
    frame.draw(draw, font, title, x_label, y_label)
    for name, (axis, value) in guides.items():
        start = frame.point(value, frame.y0) if axis == "x" else frame.point(frame.x0, value)
        end = frame.point(value, frame.y1) if axis == "x" else frame.point(frame.x1, value)
        _dashed(draw, start, end)
        draw.text((end[0] + 2, end[1] + 2) if axis == "x" else (end[0] - 4, end[1] - 2), name, font=font,
                  fill=(90, 90, 90), anchor="la" if axis == "x" else "rb")
    series = list(dict.fromkeys(p[0] for p in points))
    for name, label, x, y in points:
        colour = PALETTE[series.index(name) % len(PALETTE)]
        px, py = frame.point(x, y)
        draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill=colour)
        draw.text((px + 5, py - 5), label, font=font, fill=(60, 60, 60))
    for index, name in enumerate(series):
        _legend(draw, font, index, name, PALETTE[index % len(PALETTE)])
    return _save(image, out)


def _canvas():
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    return image, ImageDraw.Draw(image), ImageFont.load_default(size=12)


def _legend(draw, font, index: int, name: str, colour) -> None:
    x, y = WIDTH - LEGEND + 8, PAD // 2 + 14 + 16 * index
    if y > HEIGHT - PAD:
        return  # more series than room: the chart still reads, the table lists them all
    draw.rectangle([x, y + 2, x + 10, y + 12], fill=colour)
    draw.text((x + 16, y), name[:22], font=font, fill="black")


def _dashed(draw, start, end, dash: float = 6) -> None:
    length = math.dist(start, end)
    steps = max(1, int(length // dash))
    for i in range(0, steps, 2):
        a, b = i / steps, min(1.0, (i + 1) / steps)
        draw.line([start[0] + (end[0] - start[0]) * a, start[1] + (end[1] - start[1]) * a,
                   start[0] + (end[0] - start[0]) * b, start[1] + (end[1] - start[1]) * b], fill=(120, 120, 120))


def _save(image, out: Path) -> Path:
    with replacing(Path(out)) as tmp:
        image.save(tmp, format="PNG")
    return Path(out)


def _span(values: list[float]) -> tuple[float, float]:
    low, high = min(values), max(values)
    if high - low < 1e-9:
        low, high = low - 0.5, high + 0.5
    margin = (high - low) * 0.06
    return low - margin, high + margin


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    raw = (high - low) / count
    step = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 5, 10):
        if raw <= step * factor:
            step *= factor
            break
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step) + 1)]


def _fmt(value: float) -> str:
    return f"{value:.0f}" if abs(value - round(value)) < 1e-9 and abs(value) >= 1 else f"{value:.3g}"
