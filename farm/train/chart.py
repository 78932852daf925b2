"""The loss chart a finished run leaves beside its checkpoints (`loss.png`)."""

from __future__ import annotations

import csv
from pathlib import Path

from farm.files import replacing


def plot_loss(log_path: Path, out_path: Path, title: str) -> Path | None:
    """A small loss-over-steps line chart of a run's `log.csv` (Pillow only), with a moving
    average over a twentieth of the run; None when there are fewer than two steps to draw."""
    from PIL import Image, ImageDraw, ImageFont

    with open(log_path) as handle:
        rows = list(csv.DictReader(handle))
    if len(rows) < 2:
        return None
    losses = [float(r["loss"]) for r in rows]
    smooth = _moving_average(losses, max(1, len(losses) // 20))
    width, height, pad = 640, 320, 40
    low, high = min(losses), max(losses)
    span = (high - low) or 1.0
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=14)

    def point(i: int, value: float) -> tuple[float, float]:
        return (pad + (width - 2 * pad) * i / (len(losses) - 1),
                height - pad - (height - 2 * pad) * (value - low) / span)

    draw.rectangle([pad, pad, width - pad, height - pad], outline=(180, 180, 180))
    draw.line([point(i, v) for i, v in enumerate(losses)], fill=(170, 190, 230), width=1)
    draw.line([point(i, v) for i, v in enumerate(smooth)], fill=(30, 70, 160), width=2)
    draw.text((pad, 10), title, font=font, fill="black")
    draw.text((pad, height - pad + 8), f"step 1 … {len(losses)}   loss {low:.3f} … {high:.3f}", font=font,
              fill="black")
    with replacing(out_path) as tmp:
        image.save(tmp, format="PNG")
    return out_path


def _moving_average(values: list[float], window: int) -> list[float]:
    """The mean of each value and the `window - 1` before it (fewer at the start)."""
    averages = []
    for i in range(len(values)):
        recent = values[max(0, i - window + 1):i + 1]
        averages.append(sum(recent) / len(recent))
    return averages
