"""Job specs: YAML → typed, validated models. Nothing here touches models, files or Ray.

A render job is `model` + `defaults` + `axes`; the product of the axes (with `zip` groups
advancing together) is the set of images. Every error names the file and the field, e.g.
`jobs/x.yaml: axes.lora[2].strength: must be between 0 and 2`, on one line.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Optional

import yaml
from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr,
                      ValidationError, model_validator)

from .errors import SamplerError, SpecError
from .samplers import resolve_sampler

MAX_SEED = 2**64 - 1
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _between(lo: float, hi: float):
    def check(value):
        if not lo <= value <= hi:
            raise ValueError(f"must be between {lo} and {hi}")
        return value

    return AfterValidator(check)


def _multiple_of_8(value: int) -> int:
    if value % 8:
        raise ValueError(f"must be a multiple of 8 (SDXL's VAE scale factor), got {value}")
    return value


def _known_sampler(name: str) -> str:
    try:
        resolve_sampler(name)
    except SamplerError as exc:
        raise ValueError(str(exc)) from None
    return name


def _seed(value: int) -> int:
    if value != -1 and not 0 <= value <= MAX_SEED:
        raise ValueError("must be -1 (random, fixed once at plan time) or between 0 and 2**64-1")
    return value


Steps = Annotated[int, _between(1, 500)]
Cfg = Annotated[float, _between(0, 50)]
Strength = Annotated[float, _between(0, 2)]
Side = Annotated[int, _between(64, 8192), AfterValidator(_multiple_of_8)]
Seed = Annotated[int, AfterValidator(_seed)]
SamplerName = Annotated[str, AfterValidator(_known_sampler)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _prompt_item(value: Any) -> Any:
    return {"positive": value} if isinstance(value, str) else value


class PromptPair(Strict):
    """One prompt cell: positive and negative text, as in the seed's ComfyUI `xAxis` entries."""

    positive: str
    negative: Optional[str] = None  # None: the job's default negative
    label: Optional[str] = None  # grid label; default: the positive text


def _lora_item(value: Any) -> Any:
    if value is None or (isinstance(value, str) and value.strip().lower() == "none"):
        return {"file": None}
    return {"file": value} if isinstance(value, str) else value


class LoraChoice(Strict):
    """One LoRA cell: a `.safetensors` file (or `none` for the base model) and its strength."""

    file: Optional[str] = None
    strength: Strength = 1.0
    label: Optional[str] = None  # grid label; default: the file name without extension


def _size_item(value: Any) -> Any:
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", value)
        if not match:
            raise ValueError(f"{value!r} is not WIDTHxHEIGHT, e.g. 1024x1024")
        return {"width": int(match[1]), "height": int(match[2])}
    return value


class Size(Strict):
    width: Side
    height: Side


class Defaults(Strict):
    """Settings for every image unless an axis sets them."""

    prompt: str = ""
    negative: str = ""
    steps: Steps = 20
    cfg: Cfg = 7.0
    sampler: SamplerName = "euler"
    width: Side = 1024
    height: Side = 1024
    seed: Seed = -1
    lora: Annotated[Optional[LoraChoice], BeforeValidator(_lora_item)] = None


class Axes(Strict):
    """Named value lists; the job renders their product. Order here is the nesting order."""

    prompt: Optional[list[Annotated[PromptPair, BeforeValidator(_prompt_item)]]] = None
    lora: Optional[list[Annotated[LoraChoice, BeforeValidator(_lora_item)]]] = None
    strength: Optional[list[Strength]] = None
    seed: Optional[list[Seed]] = None
    sampler: Optional[list[SamplerName]] = None
    steps: Optional[list[Steps]] = None
    cfg: Optional[list[Cfg]] = None
    size: Optional[list[Annotated[Size, BeforeValidator(_size_item)]]] = None
    model: Optional[list[str]] = None
    # A1111's Prompt S/R: per named axis, the first value is searched for in the prompt and
    # negative, and each value (the first included) replaces it.
    replace: Optional[dict[str, list[str]]] = None
    _order: tuple[str, ...] = PrivateAttr(default=())

    @model_validator(mode="wrap")
    @classmethod
    def _keep_spec_order(cls, data, handler):
        """The product nests axes in the order the spec lists them (outermost first)."""
        axes = handler(data)
        if isinstance(data, dict):
            axes._order = tuple(data)
        return axes

    @model_validator(mode="after")
    def _non_empty(self):
        for name in self.names():
            if not self.values(name):
                raise ValueError(f"axis {name!r} has no values")
        for name, values in (self.replace or {}).items():
            if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]{0,39}", name):
                raise ValueError(f"replace.{name}: axis names are a letter, then letters, digits, '_' or '-'")
            if name in type(self).model_fields:
                raise ValueError(f"replace.{name}: {name!r} is a built-in axis; name this one differently")
            if not values or not values[0]:
                raise ValueError(f"replace.{name}: the first value (the text to search for) is empty")
        return self

    def names(self) -> list[str]:
        """Axis names in spec order: the built-in ones set, then each `replace` axis."""
        names = []
        for key in self._order or type(self).model_fields:
            if key == "replace":
                names += list(self.replace or {})
            elif getattr(self, key, None) is not None:
                names.append(key)
        return names

    def values(self, name: str) -> list:
        if self.replace and name in self.replace:
            return self.replace[name]
        return getattr(self, name)


class RenderJob(Strict):
    """A render sweep: model + defaults + axes (+ zip groups)."""

    job: Annotated[str, AfterValidator(lambda v: _check_name(v))]
    model: str
    lora_dir: Optional[str] = None  # where `<lora:NAME:W>` tags look; default: the spec's folder
    defaults: Defaults = Field(default_factory=Defaults)
    axes: Axes = Field(default_factory=Axes)
    zip: list[list[str]] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check_axes(self):
        names = self.axes.names()
        seen: set[str] = set()
        for group in self.zip:
            for name in group:
                if name not in names:
                    raise ValueError(f"zip: {name!r} is not an axis (axes: {', '.join(names)})")
                if name in seen:
                    raise ValueError(f"zip: {name!r} is in more than one group")
                seen.add(name)
            lengths = {len(self.axes.values(n)) for n in group}
            if len(lengths) > 1:
                raise ValueError(f"zip: axes {', '.join(group)} must have the same number of values")
        if self.axes.strength and not (self.axes.lora or self.defaults.lora):
            raise ValueError("axes.strength sets a LoRA's strength: add axes.lora or defaults.lora")
        if not (self.axes.prompt or self.defaults.prompt):
            raise ValueError("no prompt: set defaults.prompt or axes.prompt")
        return self


def _check_name(value: str) -> str:
    if not _NAME.match(value):
        raise ValueError("must be letters, digits, '.', '_' or '-' (it names folders and jobs)")
    return value


def _format_location(loc: tuple) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part.startswith("function-") or part in ("lax-or-strict", "json-or-python"):
            continue
        else:
            text += ("." if text else "") + str(part)
    return text


def _format_error(error: dict) -> str:
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown key"
    location = _format_location(error["loc"])
    return f"{location}: {message}" if location else message


def parse_spec(data: Any, source: str = "<spec>") -> RenderJob:
    """Validate already-parsed YAML; errors become one SpecError line naming source and field."""
    if not isinstance(data, dict):
        raise SpecError(f"{source}: a job spec is a mapping of keys (job, model, defaults, axes)")
    try:
        return RenderJob.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
        raise SpecError(f"{source}: {_format_error(errors[0])}{more}") from None


def load_spec(path: str | Path) -> RenderJob:
    """Read a YAML job spec with `yaml.safe_load` (never arbitrary objects) and validate it."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        raise SpecError(f"{path}: {where}not valid YAML: {getattr(exc, 'problem', exc)}") from None
    return parse_spec(data, str(path))
