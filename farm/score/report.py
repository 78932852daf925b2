"""The study report: per variant × checkpoint the mean and spread of each score, a ranking whose
rule is written next to it, and charts (score over epochs, likeness vs leakage).

The numbers answer the seed's three questions: likeness (subject prompts' faces, distance to the
subject: lower is more alike), leakage (class-only prompts' faces, same distance: lower means the
class word turned into the subject) and flexibility (CLIP-T, the image against its prompt).
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from farm.files import write_atomic
from farm.runs.manifest import RunFolder
from farm.score import plots
from farm.score.table import scored_manifest

SAME_PERSON = 0.6  # dlib's face model: two faces closer than this are the same person
BASELINE = "no LoRA"


@dataclass
class Spread:
    mean: float | None = None
    std: float | None = None
    n: int = 0

    @classmethod
    def of(cls, values: list[float]) -> "Spread":
        values = [v for v in values if v is not None]
        if not values:
            return cls()
        return cls(statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0, len(values))


@dataclass
class CheckpointScores:
    variant: str
    label: str
    epoch: int | None
    step: int | None
    images: int
    likeness: Spread  # face distance to the subject on subject prompts (lower: more alike)
    face_rate: float | None  # share of subject-prompt images with a face found
    leakage: Spread  # face distance to the subject on class-only prompts (lower: more leakage)
    clip_t: Spread  # image vs prompt without the token (higher: follows the prompt)
    clip_i: Spread  # image vs the subject photos (higher: closer)
    loss_plot: str = ""
    eligible: bool = True
    rank: int | None = None
    notes: list[str] = field(default_factory=list)


def _group_key(row: dict, checkpoints: dict) -> tuple[str, str, int | None, int | None]:
    """(variant, label, epoch, step) of the image's LoRA: a trained checkpoint, a LoRA file, or none."""
    if not row["lora"] or not row["lora_strength"]:
        return BASELINE, BASELINE, None, None
    checkpoint = checkpoints.get(row["lora_sha256"])
    if checkpoint:
        return checkpoint["run"], checkpoint["label"], checkpoint["epoch"], checkpoint["step"]
    return row["lora"], row["lora"], None, None


def _summarise(key, rows: list[dict], loss_plot: str) -> CheckpointScores:
    subject = [r for r in rows if r["score_subject_prompt"]]
    classes = [r for r in rows if r["score_subject_prompt"] is False]
    scored_subject = [r for r in subject if r["score_faces"] is not None]
    return CheckpointScores(
        variant=key[0], label=key[1], epoch=key[2], step=key[3], images=len(rows),
        likeness=Spread.of([r["score_face_distance"] for r in subject]),
        face_rate=sum(1 for r in scored_subject if r["score_faces"]) / len(scored_subject) if scored_subject else None,
        leakage=Spread.of([r["score_face_distance"] for r in classes]),
        clip_t=Spread.of([r["score_clip_t"] for r in rows]),
        clip_i=Spread.of([r["score_clip_i"] for r in subject]),
        loss_plot=loss_plot)


def _rank(checkpoints: list[CheckpointScores], baseline: CheckpointScores | None, margin: float) -> str:
    """Mark eligibility and rank in place; return the rule in words."""
    measured = [c for c in checkpoints if c.likeness.n]
    if measured:
        if baseline and baseline.leakage.n:
            floor = baseline.leakage.mean - margin
            against = f"the no-LoRA baseline ({baseline.leakage.mean:.3f}) − {margin}"
        else:
            floor, against = SAME_PERSON, f"{SAME_PERSON} (dlib's same-person distance; no no-LoRA images to compare)"
        for c in checkpoints:
            if c.leakage.n and c.leakage.mean < floor:
                c.eligible = False
                c.notes.append(f"leaks: class-only faces at {c.leakage.mean:.3f} < {floor:.3f}")
            elif not c.leakage.n:
                c.notes.append("leakage not measured (no face on class-only prompts)")
        order = sorted((c for c in measured if c.eligible),
                       key=lambda c: (c.likeness.mean, -(c.clip_t.mean or 0.0)))
        rule = (f"eligible: class-only prompts' faces stay at least {against} from the subject; ranked by "
                "likeness, the lowest mean face distance to the subject photos on prompts naming the token "
                "(ties: higher CLIP-T)")
    elif any(c.clip_i.n for c in checkpoints):
        order = sorted((c for c in checkpoints if c.clip_i.n), key=lambda c: (-c.clip_i.mean, -(c.clip_t.mean or 0.0)))
        rule = ("likeness and leakage are not measured (no face in the images, or none in the subject photos); "
                "ranked by CLIP-I, the mean cosine of subject-prompt images to the subject photos "
                "(ties: higher CLIP-T)")
    else:
        return "nothing to rank: no image has a face or a CLIP score (run `farm score` with subject photos / --clip)"
    for index, c in enumerate(order, 1):
        c.rank = index
    return rule


def build_report(run: RunFolder, margin: float = 0.05) -> dict:
    """The report's data from the run folder's manifest, scores and training manifest."""
    table = scored_manifest(run).to_pylist()
    checkpoints = {c["sha256"]: c for c in run.read_checkpoints()}
    loss_plots = {c["run"]: c["loss_plot"] for c in checkpoints.values()
                  if c["loss_plot"] and (run.root / c["loss_plot"]).is_file()}
    lora_rows = [r for r in table if r["lora"] and r["lora_strength"]]
    strength = max((r["lora_strength"] for r in lora_rows), default=None)
    groups, by_strength = defaultdict(list), defaultdict(list)
    for row in table:
        key = _group_key(row, checkpoints)
        if key[0] == BASELINE or row["lora_strength"] == strength:
            groups[key].append(row)
        if key[0] != BASELINE and row["score_subject_prompt"]:
            by_strength[(key[1], row["lora_strength"])].append(row["score_face_distance"])
    summaries = [_summarise(key, rows, loss_plots.get(key[0], "")) for key, rows in groups.items()]
    baseline = next((s for s in summaries if s.variant == BASELINE), None)
    ranked = [s for s in summaries if s.variant != BASELINE]
    ranked.sort(key=lambda s: (s.variant, s.step if s.step is not None else -1, s.label))
    rule = _rank(ranked, baseline, margin)
    unscored = sum(1 for r in table if r["score_faces"] is None)
    return {
        "run": str(run.root), "images": len(table), "unscored": unscored, "strength": strength, "rule": rule,
        "margin": margin, "baseline": asdict(baseline) if baseline else None,
        "checkpoints": [asdict(s) for s in ranked],
        "best": next((asdict(s) for s in sorted(ranked, key=lambda s: s.rank or 1e9) if s.rank), None),
        "likeness_by_strength": [{"label": label, "strength": s, **asdict(Spread.of(values))}
                                 for (label, s), values in sorted(by_strength.items())],
    }


def write_report(run: RunFolder, margin: float = 0.05) -> Path:
    """`OUT/report/`: report.json, report.md and the charts; returns the Markdown file."""
    report = build_report(run, margin)
    folder = run.root / "report"
    report["plots"] = _draw(report, folder)
    write_atomic(folder / "report.json", json.dumps(report, indent=2, default=str).encode())
    write_atomic(folder / "report.md", _markdown(report).encode())
    return folder / "report.md"


def _draw(report: dict, folder: Path) -> dict[str, str]:
    epochs = [c for c in report["checkpoints"] if c["epoch"] is not None]
    likeness_measured = any(c["likeness"]["n"] for c in epochs)
    score, name = ("likeness", "face distance to subject (lower: more alike)") if likeness_measured else \
        ("clip_i", "CLIP-I (higher: closer to the subject photos)")
    drawn = {}
    for key, title, label in ((score, f"{name} by epoch", name), ("clip_t", "CLIP-T by epoch", "CLIP-T")):
        series = defaultdict(list)
        for c in epochs:
            if c[key]["mean"] is not None:
                series[c["variant"]].append((c["epoch"], c[key]["mean"]))
        path = plots.line_chart(dict(series), folder / f"{key}-by-epoch.png", title, "epoch", label)
        if path:
            drawn[key] = path.name
    points = [(c["variant"], f"e{c['epoch']}" if c["epoch"] is not None else c["label"],
               c["leakage"]["mean"], c["likeness"]["mean"])
              for c in report["checkpoints"] if c["likeness"]["n"] and c["leakage"]["n"]]
    base = report["baseline"]
    guides = {"baseline": ("x", base["leakage"]["mean"])} if base and base["leakage"]["n"] else {}
    guides["same person"] = ("y", SAME_PERSON)
    path = plots.scatter(points, folder / "likeness-vs-leakage.png",
                         "likeness vs leakage per checkpoint (lower left: looks like the subject and leaks)",
                         "class-only prompts: face distance to subject (higher: less leakage)",
                         "subject prompts: face distance", guides)
    if path:
        drawn["scatter"] = path.name
    return drawn


def _cell(spread: dict) -> str:
    return "–" if spread["mean"] is None else f"{spread['mean']:.3f} ± {spread['std']:.3f} ({spread['n']})"


def _markdown(report: dict) -> str:
    lines = [f"# Report: {report['run']}", "",
             f"{report['images']} images, {report['unscored']} not scored; checkpoints compared at strength "
             f"{report['strength']}.", "", f"**Rule:** {report['rule']}.", ""]
    best = report["best"]
    lines += [f"**Best:** {best['label']} (variant {best['variant']})." if best else "**Best:** none.", ""]
    lines += ["| rank | checkpoint | images | likeness ↓ | faces found | leakage ↑ | CLIP-T ↑ | CLIP-I ↑ | notes |",
              "|---|---|---|---|---|---|---|---|---|"]
    rows = ([report["baseline"]] if report["baseline"] else []) + report["checkpoints"]
    for c in rows:
        rate = "–" if c["face_rate"] is None else f"{c['face_rate']:.0%}"
        lines.append(f"| {c['rank'] or ''} | {c['label']} | {c['images']} | {_cell(c['likeness'])} | {rate} | "
                     f"{_cell(c['leakage'])} | {_cell(c['clip_t'])} | {_cell(c['clip_i'])} | {'; '.join(c['notes'])} |")
    lines += ["", "Cells: mean ± spread (images). Likeness and leakage are dlib face distances to the subject "
              f"photos' centroid (< {SAME_PERSON}: the same person).", ""]
    for key, file in report["plots"].items():
        lines += [f"![{key}]({file})", ""]
    losses = sorted({(c["variant"], c["loss_plot"]) for c in report["checkpoints"] if c["loss_plot"]})
    if losses:
        lines += ["Loss curves: " + ", ".join(f"[{variant}](../{path})" for variant, path in losses), ""]
    return "\n".join(lines)
