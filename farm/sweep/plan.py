"""Spec → tasks: the axes' product as small frozen records with deterministic ids.

A task's id is a hash of everything that determines its pixels (model and LoRA *content* hashes,
prompt, negative, seed, sampler, steps, cfg, size, strengths), so resume and de-duplication fall
out: two grid cells that would render the same image are one task carrying both cells, and a
task whose id already has an `ok` row in the manifest is not rendered again.
"""

from __future__ import annotations

import csv
import gc
import hashlib
import io
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

from farm.errors import FarmError, SpecError, first_line
from farm.models.artifacts import HashCache, inside_roots, read_regular, resolve_lora, resolve_model
from farm.sweep.prompt_syntax import parse as parse_prompt
from farm.sweep.samplers import resolve_sampler
from farm.sweep.spec import (MAX_SPEC_BYTES, MAX_STRENGTH, MIN_STRENGTH, LoraChoice, ModelChoice, PromptPair,
                             RenderJob, Size, farm_limit)

# Bump when the renderer changes in a way that changes pixels for the same settings.
RENDER_VERSION = 2  # 2: k-diffusion samplers, prompt weighting, device-independent noise
_LORA_TAG = re.compile(r"<lora:([^>]+?)(?::(-?[0-9.]+))?>")


@dataclass(frozen=True, slots=True)
class LoraUse:
    """One LoRA applied to an image: its display name, file, content hash and strength."""

    name: str
    path: str
    sha256: str
    strength: float
    addnet_hash: str = ""  # A1111's `Lora hashes` value (sha256 after the safetensors header)


CellLabels = tuple[tuple[str, str], ...]  # ((axis, label), ...): where one grid cell sits in the grid


class Task(NamedTuple):
    """One image to render. Everything a render actor needs travels in this record.

    A named tuple: immutable and hashable like a frozen dataclass, and four times faster to make,
    which is a second per million tasks when a big sweep is planned."""

    task_id: str
    job: str
    model: str
    model_path: str
    model_sha256: str
    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    cfg: float
    sampler: str
    width: int
    height: int
    noise: str  # whose seed convention draws the noise: comfyui | a1111-cpu | a1111-gpu
    prompt_syntax: str  # how emphasis in the prompt is read: a1111 | comfyui | plain
    loras: tuple[LoraUse, ...]
    cells: tuple[CellLabels, ...]  # every grid cell this image fills (cells with the same image fold into one task)
    order: int

    @property
    def group(self) -> tuple:
        """Tasks in one group render on a pipeline without loading anything new."""
        return (self.model_sha256, tuple(sorted(lora.sha256 for lora in self.loras)) if self.loras else ())

    @property
    def title(self) -> str:
        """A readable name for the dashboard and logs: `lora=e7 prompt=photo of a man`."""
        return " ".join(f"{axis}={label[:24]}" for axis, label in self.cells[0]) or self.task_id[:12]


@dataclass
class Plan:
    """The tasks of a job in render order, plus what was decided while expanding it."""

    job: RenderJob
    tasks: list[Task]
    seeds: dict[str, int] = field(default_factory=dict)  # resolved `-1` seeds by spec location
    folded: int = 0  # grid cells that share an image with another cell
    # grid order of each axis, per sweep ("" when the job has one table): {"": {"lora": [...]}}
    axis_labels: dict[str, dict[str, list[str]]] = field(default_factory=dict)

    @property
    def groups(self) -> list[tuple]:
        """The tasks' model/LoRA groups, in render order."""
        return list(dict.fromkeys(task.group for task in self.tasks))


def task_id_of(*, cfg: float, height: int, loras: list, model_sha256: str, negative_prompt: str, noise: str,
               prompt: str, prompt_syntax: str, sampler: str, seed: int, steps: int, width: int) -> str:
    """sha256 of everything that determines an image's pixels, 24 hex digits. The payload is the
    repr of the values in this (alphabetical) order: canonical like JSON for str/int/float/list,
    and several times faster, which matters at a million tasks."""
    payload = repr((RENDER_VERSION, cfg, height, loras, model_sha256, negative_prompt, noise, prompt, prompt_syntax,
                    sampler, seed, steps, width))
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def resolve_seeds(job: RenderJob, recorded: dict[str, int] | None = None) -> tuple[RenderJob, dict[str, int]]:
    """Replace each `-1` seed with a random one, reusing `recorded` ones so a resumed run matches."""
    recorded = dict(recorded or {})
    used: dict[str, int] = {}

    def pick(location: str, value: int) -> int:
        if value != -1:
            return value
        used[location] = recorded.get(location, random.SystemRandom().randint(0, 2**32 - 1))
        return used[location]

    defaults = job.defaults.model_copy(update={"seed": pick("defaults.seed", job.defaults.seed)})
    axes = job.axes
    if axes.seed:
        seeds = [pick(f"axes.seed[{i}]", s) for i, s in enumerate(axes.seed)]
        axes = axes.model_copy(update={"seed": seeds})
    return job.model_copy(update={"defaults": defaults, "axes": axes}), used


class CellSettings(NamedTuple):
    """What one grid cell renders with, as the defaults and its axis values set it; `Expander.task`
    applies the prompt edits and resolves the files. Immutable: an outer axis value's settings are
    made once and shared by every cell inside it, so no cell may change them. A named tuple, as
    `Task` is: one is made per grid cell, and `_replace` is several times faster than a frozen
    dataclass' `dataclasses.replace`, which would add seconds per million cells."""

    prompt: str
    negative: str
    seed: int
    steps: int
    cfg: float
    sampler: str
    width: int
    height: int
    noise: str  # whose seed convention draws the noise
    prompt_syntax: str  # how emphasis in the prompt is read
    model: str  # the model as the spec names it
    model_where: str  # where the spec names it, for errors: "model", "axes.model[1]"
    lora: LoraChoice | None  # the LoRA value; its file is None for the base model
    lora_where: str  # where the spec names it: "defaults.lora", "axes.lora[2]"
    strength: float | None  # the strength axis' value, which wins over the LoRA's own; None: no such axis
    style: tuple[str, str] | None  # the style's (prompt, negative) from the styles CSV; None: no style
    replacements: tuple[tuple[str, str, str], ...] = ()  # (axis, search, value) of each `replace` axis


# An axis' handler: the settings with one value of the axis set (by `CellSettings._replace`), and the
# value's grid label. Adding an axis to the spec's `Axes` is adding its handler to AXIS_HANDLERS.
AxisHandler = Callable[["Expander", CellSettings, int, Any], tuple[CellSettings, str]]


def _set_prompt(expander: Expander, settings: CellSettings, index: int, value: PromptPair) -> tuple[CellSettings, str]:
    negative = settings.negative if value.negative is None else value.negative
    return settings._replace(prompt=value.positive, negative=negative), value.label or value.positive


def _set_lora(expander: Expander, settings: CellSettings, index: int, value: LoraChoice) -> tuple[CellSettings, str]:
    label = value.label or (file_label(value.file) if value.file else "none")
    return settings._replace(lora=value, lora_where=f"axes.lora[{index}]"), label


def _set_strength(expander: Expander, settings: CellSettings, index: int, value: float) -> tuple[CellSettings, str]:
    return settings._replace(strength=value), f"{value:g}"


def _set_size(expander: Expander, settings: CellSettings, index: int, value: Size) -> tuple[CellSettings, str]:
    return settings._replace(width=value.width, height=value.height), f"{value.width}x{value.height}"


def _set_model(expander: Expander, settings: CellSettings, index: int, value: ModelChoice) -> tuple[CellSettings, str]:
    label = value.label or (value.file if value.file.startswith("tiny:") else file_label(value.file))
    return settings._replace(model=value.file, model_where=f"axes.model[{index}]"), label


def _set_style(expander: Expander, settings: CellSettings, index: int, value: str) -> tuple[CellSettings, str]:
    return settings._replace(style=None if value == "none" else expander.styles.table()[value]), value


def _setting(name: str) -> AxisHandler:
    """The handler of an axis that sets the one setting of its name (seed, sampler, steps, cfg)."""

    def set_value(expander: Expander, settings: CellSettings, index: int, value) -> tuple[CellSettings, str]:
        return settings._replace(**{name: value}), f"{value:g}" if isinstance(value, float) else str(value)

    return set_value


def _replacement(axis: str) -> AxisHandler:
    """The handler of a `replace` axis: its first value is searched for, each value replaces it."""

    def set_replacement(expander: Expander, settings: CellSettings, index: int, value: str) -> tuple[CellSettings, str]:
        search = expander.job.axes.replace[axis][0]
        return settings._replace(replacements=settings.replacements + ((axis, search, value),)), value

    return set_replacement


AXIS_HANDLERS: dict[str, AxisHandler] = {
    "prompt": _set_prompt, "lora": _set_lora, "strength": _set_strength, "seed": _setting("seed"),
    "sampler": _setting("sampler"), "steps": _setting("steps"), "cfg": _setting("cfg"), "size": _set_size,
    "model": _set_model, "style": _set_style,
}


class AxisPick(NamedTuple):
    """One axis' value, as one factor value sets it."""

    handler: AxisHandler
    index: int  # the value's position in the spec's list, for errors
    value: Any


class FactorValue(NamedTuple):
    """One value of a factor of the product (a zip group's values advance together, so a value
    sets one or more axes), worked out once rather than once per grid cell."""

    labels: CellLabels  # the value's part of a cell's labels
    picks: tuple[AxisPick, ...]


def spec_error(source: str, where: str, message: str) -> SpecError:
    """One line naming the spec and the field: `jobs/x.yaml: axes.lora[1].file: ...`."""
    return SpecError(f"{source}: {where}: {message}")


class StyleAxis:
    """The `style` axis' names, and the job's styles CSV (A1111/Fooocus) they name. The file is read
    once, and only when a style other than `none` is looked up."""

    def __init__(self, job: RenderJob, spec_dir: Path, source: str):
        self.job, self.spec_dir, self.source = job, spec_dir, source
        self._table: dict[str, tuple[str, str]] | None = None
        if job.styles:  # every path a spec names lies in the allowed folders, used or not
            self._path()

    def _path(self) -> Path:
        try:
            return inside_roots(self.spec_dir / self.job.styles, self.spec_dir)
        except FarmError as exc:
            raise spec_error(self.source, "styles", str(exc)) from None

    def table(self) -> dict[str, tuple[str, str]]:
        """name → (prompt, negative_prompt)."""
        if self._table is None:
            self._table = self._read()
        return self._table

    def names(self) -> list[str]:
        """The axis' values with `*` as every style in the file, each one checked to exist."""
        names = []
        for index, name in enumerate(self.job.axes.style):
            if name == "*":
                names += list(self.table())
            elif name != "none" and name not in self.table():
                raise spec_error(self.source, f"axes.style[{index}]", f"no style {name!r} in {self.job.styles}")
            else:
                names.append(name)
        return names

    def _read(self) -> dict[str, tuple[str, str]]:
        """The CSV, refused in one line unless it is UTF-8 text of at most MAX_SPEC_BYTES with a name column."""

        def fail(message: str) -> SpecError:
            return spec_error(self.source, "styles", message)

        path = self._path()
        try:
            data = read_regular(path, MAX_SPEC_BYTES, SpecError)
        except FarmError as exc:
            raise fail(str(exc)) from None
        if len(data) > MAX_SPEC_BYTES:
            raise fail(f"{path}: a styles CSV is at most {MAX_SPEC_BYTES >> 20} MB")
        try:
            rows = list(csv.DictReader(io.StringIO(data.decode("utf-8"), newline="")))
        except UnicodeDecodeError as exc:
            raise fail(f"{path}: not UTF-8 text (byte {exc.start})") from None
        except csv.Error as exc:  # e.g. a field over the csv module's 128 KB limit
            raise fail(f"{path}: not a readable CSV ({first_line(exc)})") from None
        if rows and "name" not in rows[0]:
            raise fail(f"{path}: a styles CSV has the columns name,prompt,negative_prompt")
        return {r["name"]: (r.get("prompt") or "", r.get("negative_prompt") or "") for r in rows}


class Expander:
    """Turns a one-table job into tasks; resolves and hashes each model/LoRA file once."""

    def __init__(self, job: RenderJob, spec_dir: Path, source: str, hashes: HashCache):
        self.job, self.spec_dir, self.source, self.hashes = job, spec_dir, source, hashes
        self.lora_dir = (spec_dir / job.lora_dir) if job.lora_dir else spec_dir
        self.styles = StyleAxis(job, spec_dir, source)
        self._models: dict[str, tuple[str, str]] = {}
        self._loras: dict[tuple[Path, str], tuple[str, str, str]] = {}
        self._renderable: set[tuple] = set()

    def fail(self, where: str, message: str) -> SpecError:
        """The error to raise for the spec's value at `where`."""
        return spec_error(self.source, where, message)

    def model(self, reference: str, where: str) -> tuple[str, str]:
        """(path, sha256) of a model the spec names."""
        if reference not in self._models:
            try:
                path = resolve_model(reference, self.spec_dir)
            except FarmError as exc:
                raise self.fail(where, str(exc)) from None
            self._models[reference] = (str(path), self.hashes.model(path))
        return self._models[reference]

    def lora(self, reference: str, strength: float, base: Path, where: str) -> LoraUse:
        key = (base, reference)
        if key not in self._loras:
            try:
                path = resolve_lora(reference, base)
            except FarmError as exc:
                raise self.fail(where, str(exc)) from None
            self._loras[key] = (str(path), self.hashes.file(path), self.hashes.addnet(path))
        path, sha, addnet = self._loras[key]
        return LoraUse(name=file_label(reference), path=path, sha256=sha, strength=float(strength), addnet_hash=addnet)

    def handler(self, axis: str) -> AxisHandler:
        """A built-in axis' handler, or else a `replace` axis' (the spec allows no other names)."""
        return AXIS_HANDLERS.get(axis) or _replacement(axis)

    def base_settings(self) -> CellSettings:
        """The settings of a cell no axis changes: the job's model and defaults."""
        d = self.job.defaults
        return CellSettings(prompt=d.prompt, negative=d.negative, seed=d.seed, steps=d.steps, cfg=d.cfg,
                            sampler=d.sampler, width=d.width, height=d.height, noise=d.noise,
                            prompt_syntax=d.prompt_syntax, model=self.job.model, model_where="model", lora=d.lora,
                            lora_where="defaults.lora", strength=None, style=None)

    def axis_steps(self) -> list[tuple[list[str], list]]:
        """The product's factors: each zip group is one factor whose values advance together."""
        axes = self.job.axes
        zipped = {name: group for group in self.job.zip for name in group}
        factors, done = [], set()
        for name in axes.names():
            if name in done:
                continue
            group = zipped.get(name, [name])
            done.update(group)
            columns = [list(enumerate(self.styles.names() if n == "style" else axes.values(n))) for n in group]
            factors.append((group, list(zip(*columns))))
        return factors

    def factor_values(self) -> list[list[FactorValue]]:
        """Each factor's values with their labels; a label does not depend on the other axes, so it
        is worked out on the default settings."""
        base = self.base_settings()
        factors = []
        for group, values in self.axis_steps():
            handlers = [self.handler(name) for name in group]
            done = []
            for picks in values:
                chosen = tuple(AxisPick(handler, index, value) for handler, (index, value) in zip(handlers, picks))
                labels = tuple((name, pick.handler(self, base, pick.index, pick.value)[1])
                               for name, pick in zip(group, chosen))
                done.append(FactorValue(labels, chosen))
            factors.append(done)
        return factors

    def with_value(self, settings: CellSettings, value: FactorValue) -> CellSettings:
        """`settings` with a factor value's axes set."""
        for pick in value.picks:
            settings = pick.handler(self, settings, pick.index, pick.value)[0]
        return settings

    def cell_settings(self, factors: list[list[FactorValue]]) -> Iterator[tuple[CellSettings, CellLabels]]:
        """(settings, labels) of every combination of the factors' values, the last factor varying
        fastest. An outer value's settings are made once for all the cells inside it."""

        innermost = len(factors) - 1

        def expand(settings: CellSettings, labels: CellLabels, depth: int):
            if depth == innermost:  # one cell per value: no generator per cell
                for value in factors[depth]:
                    yield self.with_value(settings, value), labels + value.labels
                return
            for value in factors[depth]:
                yield from expand(self.with_value(settings, value), labels + value.labels, depth + 1)

        if not factors:
            return iter([(self.base_settings(), ())])
        return expand(self.base_settings(), (), 0)

    def task(self, settings: CellSettings, labels: CellLabels, order: int) -> Task:
        """The image one grid cell renders: prompt edits applied, files resolved and hashed, the id."""
        prompt, negative = settings.prompt, settings.negative
        for axis, search, value in settings.replacements:
            if search not in prompt and search not in negative:
                raise self.fail(f"axes.replace.{axis}", f"{search!r} is not in the prompt or negative prompt")
            prompt, negative = prompt.replace(search, value), negative.replace(search, value)
        if settings.style:
            prompt = apply_style(settings.style[0], prompt)
            negative = apply_style(settings.style[1], negative)
        prompt, loras = self.prompt_loras(prompt)
        self.check_renderable(settings, prompt, negative)
        choice = settings.lora
        if choice is not None and choice.file:
            strength = choice.strength if settings.strength is None else settings.strength
            loras.insert(0, self.lora(choice.file, strength, self.spec_dir, settings.lora_where + ".file"))
        if len(loras) > 1 and len({lora.sha256 for lora in loras}) != len(loras):
            raise self.fail("axes", f"the same LoRA file is applied twice to one image ({prompt[:40]!r})")
        model_path, model_sha = self.model(settings.model, settings.model_where)
        cfg = float(settings.cfg)
        task_id = task_id_of(
            model_sha256=model_sha, prompt=prompt, negative_prompt=negative, seed=settings.seed,
            steps=settings.steps, cfg=cfg, sampler=settings.sampler, width=settings.width, height=settings.height,
            noise=settings.noise, prompt_syntax=settings.prompt_syntax,
            loras=sorted([lora.sha256, lora.strength] for lora in loras) if loras else [],
        )
        return Task(task_id, self.job.job, settings.model, model_path, model_sha, prompt, negative,  # positional:
                    settings.seed, settings.steps, cfg, settings.sampler, settings.width,  # a million calls
                    settings.height, settings.noise, settings.prompt_syntax, tuple(loras), (labels,), order)

    def check_renderable(self, settings: CellSettings, prompt: str, negative: str) -> None:
        """What would fail every render of a task fails its plan instead: a sampler that has no
        A1111 twin under an A1111 seed convention, a prompt its emphasis syntax cannot read
        (`(man:1.2.3)`). Each combination is checked once."""
        key = (settings.sampler, settings.noise, settings.prompt_syntax, prompt, negative)
        if key in self._renderable:
            return
        try:
            resolve_sampler(settings.sampler).check_noise(settings.noise)
        except FarmError as exc:
            raise self.fail("noise", str(exc)) from None
        for where, text in (("prompt", prompt), ("negative", negative)):
            try:
                parse_prompt(text, settings.prompt_syntax)
            except FarmError as exc:
                raise self.fail(where, str(exc)) from None
        self._renderable.add(key)

    def prompt_loras(self, prompt: str) -> tuple[str, list[LoraUse]]:
        """Take A1111 `<lora:NAME:WEIGHT>` tags out of a prompt, as A1111 does before encoding: only
        the tags go (a comma before one stays, as it does in A1111, since CLIP sees it); runs of
        whitespace, which the tokenizer ignores anyway, become one space. The spec cannot check a
        tag's strength: tags also come from `replace` values and styles, so it is checked here."""
        if "<lora:" not in prompt:
            return prompt, []
        loras = []
        for match in _LORA_TAG.finditer(prompt):
            try:
                weight = float(match[2]) if match[2] else 1.0
            except ValueError:  # `1.2.3`, `.`: A1111 cannot read it either
                raise self.fail("prompt", f"{match[0]}: strength {match[2]!r} is not a number") from None
            if not MIN_STRENGTH <= weight <= MAX_STRENGTH:
                raise self.fail("prompt", f"{match[0]}: strength must be between {MIN_STRENGTH} and {MAX_STRENGTH}")
            loras.append(self.lora(match[1], weight, self.lora_dir, f"prompt {match[0]}"))
        cleaned = re.sub(r"\s{2,}", " ", _LORA_TAG.sub("", prompt)).strip()
        return cleaned, loras


def apply_style(style: str, text: str) -> str:
    """A1111's rule: a style with `{prompt}` wraps the text, one without is appended to it."""
    if "{prompt}" in style:
        return style.replace("{prompt}", text)
    return ", ".join(part for part in (text, style) if part)


def file_label(reference: str) -> str:
    """A model's or LoRA's display name: `tiny:lora/e1` → `e1`; `loras/x_1.0-000001.safetensors`
    and the A1111 tag form `x_1.0-000001` → `x_1.0-000001` (a dot in a name is not a suffix)."""
    name = reference.rstrip("/").split("/")[-1]
    return name[: -len(".safetensors")] if name.lower().endswith(".safetensors") else name


def with_checkpoints(job: RenderJob, checkpoints: dict[str, list[tuple[int, str, str]]]) -> RenderJob:
    """Replace `lora: {run: v002}` values by that run's checkpoint files known so far.

    `checkpoints` maps a run to its (epoch, label, path) triples in the order they were written,
    e.g. (7, "v002 epoch 7", "./x-000007").
    Checkpoints not written yet simply have no tasks; planning again after each new file adds
    exactly the new tasks (their ids are new, the others' are unchanged)."""
    update = {}
    for axis in ("lora", "model"):
        choices = getattr(job.axes, axis)
        if not choices or not any(choice.run for choice in choices):
            continue
        values = []
        for choice in choices:
            if not choice.run:
                values.append(choice)
                continue
            for epoch, label, path in checkpoints.get(choice.run, []):  # in the order they were written
                if choice.epochs == "all" or epoch in choice.epochs:
                    values.append(choice.model_copy(update={"file": path, "label": label, "run": None}))
        update[axis] = values
    if not update:
        return job
    axes = job.axes.model_copy(update=update)
    axes._order = job.axes._order
    return job.model_copy(update={"axes": axes})


def plan_job(job: RenderJob, spec_dir: Path, source: str = "<spec>",
             recorded_seeds: dict[str, int] | None = None, hashes: HashCache | None = None,
             checkpoints: dict[str, list[tuple[int, str, str]]] | None = None) -> Plan:
    """Expand a job into de-duplicated tasks, ordered by model, then LoRA set, then spec order.

    A job with several `sweeps` expands each table; its cells carry a `sweep` axis, and an image
    two tables share is one task filling a cell in each."""
    hashes = hashes or HashCache()
    collecting = gc.isenabled()
    gc.disable()  # a million small records, no cycles: the cyclic GC would rescan them over and over
    try:
        return _plan(job, spec_dir, source, recorded_seeds, hashes, checkpoints)
    finally:
        if collecting:
            gc.enable()


def grid_labels(factors: list[list[FactorValue]]) -> dict[str, dict[str, None]]:
    """Each axis's labels in grid order (the order of its values), from `Expander.factor_values`."""
    labels: dict[str, dict[str, None]] = {}
    for values in factors:
        for value in values:
            for axis, label in value.labels:
                labels.setdefault(axis, {})[label] = None
    return labels


def _plan(job, spec_dir, source, recorded_seeds, hashes, checkpoints) -> Plan:
    by_id: dict[str, Task] = {}
    labels: dict[str, dict[str, dict[str, None]]] = {}
    seeds: dict[str, int] = {}
    cells = 0
    max_cells = farm_limit("TASKS", 2_000_000)
    for sweep, table in job.sweep_jobs():
        table = with_checkpoints(table, checkpoints or {})
        prefix = f"sweeps.{sweep}." if sweep else ""
        recorded = {k[len(prefix):]: v for k, v in (recorded_seeds or {}).items() if k.startswith(prefix)}
        table, used = resolve_seeds(table, recorded)
        seeds.update({prefix + k: v for k, v in used.items()})
        expander = Expander(table, Path(spec_dir), source, hashes)
        factors = expander.factor_values()
        first_cell = cells
        for settings, cell_labels in expander.cell_settings(factors):
            if sweep:
                cell_labels = (("sweep", sweep),) + cell_labels
            task = expander.task(settings, cell_labels, cells)
            cells += 1
            if cells > max_cells:
                raise SpecError(f"{source}: the job expands to more than {max_cells:,} grid cells; split it, "
                                "or raise this farm's SDFARM_MAX_TASKS")
            if task.task_id in by_id:
                first = by_id[task.task_id]
                by_id[task.task_id] = first._replace(cells=first.cells + task.cells)
            else:
                by_id[task.task_id] = task
        if cells > first_cell:
            labels[sweep or ""] = {**({"sweep": {sweep: None}} if sweep else {}), **grid_labels(factors)}
    hashes.save()
    tasks = list(by_id.values())
    groups = [t.group for t in tasks]  # computed once: a property, and a million of them add up
    model_rank = {sha: i for i, sha in enumerate(dict.fromkeys(g[0] for g in groups))}
    rank = {g: (model_rank[g[0]], i) for i, g in enumerate(dict.fromkeys(groups))}
    if len(rank) > 1:  # tasks are in cell order already; a stable sort keeps it within a group
        order = sorted(range(len(tasks)), key=lambda i: rank[groups[i]])
        tasks = [tasks[i] for i in order]
    return Plan(job=job, tasks=tasks, seeds=seeds, folded=cells - len(tasks),
                axis_labels={sweep: {axis: list(values) for axis, values in table.items()}
                             for sweep, table in labels.items()})

