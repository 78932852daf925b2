"""Regularization images rendered by the farm, written out in kohya's layout.

A reg set becomes an ordinary render job (so it is de-duplicated, resumable and spread over
the GPUs like any other), rendered into `OUT/reg/<set>/`, then exported as
`OUT/reg/<set>/kohya/<repeats>_<class>/NNNN.png` (+ `.txt` captions) for training runs that name
it as `reg_data_dir: generated:<set>`. The images are cached by their task ids, i.e. by model,
prompt, seed, sampler and steps: every variant that uses the set reuses the same files.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from farm.errors import DatasetError
from farm.files import publish_folder
from farm.runs.manifest import RunFolder
from farm.sweep.spec import Axes, Defaults, PromptPair, RegSet, RenderJob
from farm.train.dataset import ImageItem, Subset, data_path, load_items, scan_subsets

GENERATED = "generated:"


def strip_token(caption: str, token: str) -> str:
    """`w0ut3r, photo of a man` → `photo of a man`; `photo of a w0ut3r man` → `photo of a man`."""
    text = re.sub(rf"(?<![\w-]){re.escape(token)}(?![\w-])\s*,?", "", caption)
    text = re.sub(r"\s+,", ",", re.sub(r"\s{2,}", " ", text))
    return text.strip().strip(",").strip()


def reg_prompts(reg: RegSet, base: Path) -> tuple[list[str], str]:
    """The prompts of a reg set and the class word its folder is named after."""
    if reg.prompt:
        return [reg.prompt], reg.class_word
    subsets = scan_subsets(data_path(reg.from_captions, base), False, base=base)
    words = subsets[0].class_tokens.split()
    token = reg.token or (words[0] if len(words) > 1 else "")
    class_word = reg.class_word or " ".join(words[1:] if len(words) > 1 else words)
    if not class_word:
        raise DatasetError(f"{reg.from_captions}: folder {subsets[0].class_tokens!r} names no class word; "
                           "set class_word")
    if not token:
        raise DatasetError(f"{reg.from_captions}: cannot tell the instance token from '{subsets[0].class_tokens}'; "
                           "set token")
    prompts = [strip_token(item.caption, token) for item in load_items(subsets, base)]
    return list(dict.fromkeys(p for p in prompts if p)), class_word


def reg_job(job_name: str, model: str, name: str, reg: RegSet, base: Path) -> tuple[RenderJob, str]:
    """The render job of reg set `name` (one image per prompt and seed) and its class word."""
    prompts, class_word = reg_prompts(reg, base)
    render = RenderJob(
        job=f"{job_name}-reg-{name}", model=model,
        defaults=Defaults(negative=reg.negative, steps=reg.steps, cfg=reg.cfg, sampler=reg.sampler,
                          width=reg.width, height=reg.height, seed=reg.seed, prompt=prompts[0]),
        axes=Axes(prompt=[PromptPair(positive=p) for p in prompts],
                  seed=[reg.seed + k for k in range(reg.count)]),
    )
    return render, class_word


def export_kohya(run: RunFolder, reg: RegSet, class_word: str) -> Path:
    """Copy the set's rendered images (in plan order) into `<run>/kohya/<repeats>_<class>/`,
    replacing an older export. The folder is built beside and renamed into place, so a killed
    export never leaves a half set that a training run would take for the whole one."""
    folder = run.root / "kohya" / f"{reg.repeats}_{class_word}"
    rows = sorted((r for r in run.read().to_pylist() if r["status"] == "ok"), key=lambda r: r["order"])

    def build(tmp: Path) -> Path:
        out = tmp / folder.name
        out.mkdir()
        for index, row in enumerate(rows):
            target = out / f"{index:04d}.png"
            shutil.copyfile(run.root / row["image_path"], target)
            if reg.captions:
                target.with_suffix(".txt").write_text(row["prompt"])
        return out

    if folder.exists():
        shutil.rmtree(folder)
    publish_folder(build, folder)
    return folder.parent


def planned_reg_items(name: str, reg: RegSet, base: Path):
    """Stand-ins for a set's images before they exist, so `farm plan` can do the step math."""
    prompts, class_word = reg_prompts(reg, base)
    subset = Subset(image_dir=f"{GENERATED}{name}/{reg.repeats}_{class_word}", num_repeats=reg.repeats,
                    class_tokens=class_word, is_reg=True)
    items = [ImageItem(f"{GENERATED}{name}/{i:04d}.png", prompt, reg.width, reg.height, subset)
             for i, prompt in enumerate(p for p in prompts for _ in range(reg.count))]
    return subset, items


def generate_reg_sets(job, base: Path, run_root: Path, render) -> dict[str, Path]:
    """Render every reg set a variant uses (resuming what exists); returns set → kohya folder.

    `render(plan, run_folder)` renders a plan (the dispatcher's `run_plan`, with the CLI's options)."""
    from farm.sweep.plan import plan_job

    used = {o.reg_data_dir[len(GENERATED):] for o in job.runs().values()
            if (o.reg_data_dir or "").startswith(GENERATED)}
    folders = {}
    for name in sorted(used):
        reg = job.reg_sets[name]
        render_job, class_word = reg_job(job.job, job.model, name, reg, base)
        run = RunFolder(run_root / "reg" / name)
        summary = render(plan_job(render_job, base, f"reg_sets.{name}"), run)
        if summary.failed:
            raise DatasetError(f"reg_sets.{name}: {summary.failed} images failed to render: {summary.errors[:1]}")
        folders[name] = export_kohya(run, reg, class_word)
    return folders
