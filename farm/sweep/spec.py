"""Job specs: YAML → typed, validated models. Nothing here touches models, files or Ray.

A render job is `model` + `defaults` + `axes`; the product of the axes (with `zip` groups
advancing together) is the set of images. Every error names the file and the field, e.g.
`jobs/x.yaml: axes.lora[2].strength: must be between 0 and 2`, on one line.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr,
                      ValidationError, model_validator)

from farm.errors import SamplerError, SpecError
from farm.sweep.samplers import resolve_sampler

MAX_SEED = 2**64 - 1
MAX_SPEC_BYTES = 4 << 20
MAX_SPEC_NODES = 200_000
MAX_SPEC_DEPTH = 40
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# A LoRA's strength, wherever it is written: here for axes and defaults, and in the plan for
# `<lora:NAME:WEIGHT>` prompt tags (they also come from `replace` values and styles the spec never sees).
MIN_STRENGTH, MAX_STRENGTH = 0, 2


def _between(lo: float, hi: float):
    def check(value):
        if not lo <= value <= hi:
            raise ValueError(f"must be between {lo} and {hi}")
        return value

    return AfterValidator(check)


def farm_limit(name: str, default: int) -> int:
    """A limit the farm's owner sets (environment of the head), never the spec's author:
    SDFARM_MAX_SIDE, SDFARM_MAX_STEPS, SDFARM_MAX_TASKS, ..."""
    value = os.environ.get(f"SDFARM_MAX_{name}")
    return int(value) if value and value.isdigit() else default


def _up_to(lo: int, name: str, default: int):
    def check(value):
        hi = farm_limit(name, default)
        if not lo <= value <= hi:
            raise ValueError(f"must be between {lo} and {hi} (this farm's SDFARM_MAX_{name})")
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


Steps = Annotated[int, _up_to(1, "STEPS", 500)]
Cfg = Annotated[float, _between(0, 50)]
Strength = Annotated[float, _between(MIN_STRENGTH, MAX_STRENGTH)]
Side = Annotated[int, _up_to(64, "SIDE", 8192), AfterValidator(_multiple_of_8)]
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
    """One LoRA cell: a `.safetensors` file (or `none` for the base model) and its strength.

    In a training job's `evaluate` sweep, `run: v002` instead stands for that run's checkpoints
    (`epochs: all`, or a list of epoch numbers); each becomes a value labelled `v002 e7`."""

    file: Optional[str] = None
    strength: Strength = 1.0
    label: Optional[str] = None  # grid label; default: the file name without extension
    run: Optional[str] = None
    epochs: Union[Literal["all"], list[Annotated[int, _between(1, 100000)]]] = "all"

    @model_validator(mode="after")
    def _file_or_run(self):
        if self.file and self.run:
            raise ValueError("give file or run, not both")
        return self


def _model_item(value: Any) -> Any:
    return {"file": value} if isinstance(value, str) else value


class ModelChoice(Strict):
    """One model cell: a diffusers folder or `.safetensors` checkpoint. In a training job's
    `evaluate` sweep, `run: v001` stands for a full-DreamBooth run's checkpoints."""

    file: Optional[str] = None
    label: Optional[str] = None  # grid label; default: the file or folder name
    run: Optional[str] = None
    epochs: Union[Literal["all"], list[Annotated[int, _between(1, 100000)]]] = "all"

    @model_validator(mode="after")
    def _file_or_run(self):
        if bool(self.file) == bool(self.run):
            raise ValueError("give file or run")
        return self


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
    # whose convention turns a seed into noise; comfyui's is drawn on the CPU, so an image depends
    # on seed and settings, not on the GPU model (a1111-gpu draws on the GPU, as A1111's default)
    noise: Literal["comfyui", "a1111-cpu", "a1111-gpu"] = "comfyui"
    # how `(word:1.2)`, `[word]`, `\(` and BREAK are read: as A1111 reads them, as ComfyUI does
    # (another weighting formula, no BREAK), or literally
    prompt_syntax: Literal["a1111", "comfyui", "plain"] = "a1111"


class Axes(Strict):
    """Named value lists; the job renders their product. They nest in the order the spec lists them,
    outermost first (axes built in code nest in the order of the fields here)."""

    prompt: Optional[list[Annotated[PromptPair, BeforeValidator(_prompt_item)]]] = None
    lora: Optional[list[Annotated[LoraChoice, BeforeValidator(_lora_item)]]] = None
    strength: Optional[list[Strength]] = None
    seed: Optional[list[Seed]] = None
    sampler: Optional[list[SamplerName]] = None
    steps: Optional[list[Steps]] = None
    cfg: Optional[list[Cfg]] = None
    size: Optional[list[Annotated[Size, BeforeValidator(_size_item)]]] = None
    model: Optional[list[Annotated[ModelChoice, BeforeValidator(_model_item)]]] = None
    # names from the job's `styles` CSV (A1111/Fooocus: name,prompt,negative_prompt; "{prompt}"
    # marks where the prompt goes); "none" for no style, "*" for every style in the file
    style: Optional[list[str]] = None
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
        """The values of a built-in axis or of a `replace` axis."""
        if self.replace and name in self.replace:
            return self.replace[name]
        return getattr(self, name)


class Sweep(Strict):
    """One table of a job: its own axes (and zip groups), and defaults that differ from the job's."""

    defaults: dict[str, Any] = Field(default_factory=dict)  # any Defaults key, over the job's defaults
    axes: Axes = Field(default_factory=Axes)
    zip: list[list[str]] = Field(default_factory=list)


class RenderJob(Strict):
    """A render sweep: model + defaults + axes (+ zip groups), or several named `sweeps` (tables)
    sharing the job's defaults, e.g. the seeds' strength table and prompt table over one set of
    checkpoints. Images two tables share are rendered once and fill a cell in both."""

    job: Annotated[str, AfterValidator(lambda v: _check_name(v))]
    model: str
    lora_dir: Optional[str] = None  # where `<lora:NAME:W>` tags look; default: the spec's folder
    styles: Optional[str] = None  # an A1111/Fooocus styles CSV for the `style` axis
    defaults: Defaults = Field(default_factory=Defaults)
    axes: Axes = Field(default_factory=Axes)
    zip: list[list[str]] = Field(default_factory=list)
    sweeps: dict[str, Sweep] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check_axes(self):
        if self.sweeps:
            if self.axes.names() or self.zip:
                raise ValueError("give axes (one table) or sweeps (several), not both")
            for name in self.sweeps:
                _check_name(name)
                try:
                    self.sweep_jobs()
                except ValidationError as exc:
                    raise ValueError(f"sweeps.{name}.{_format_error(exc.errors()[0])}") from None
            return self
        check_table(self.axes, self.zip, self.defaults)
        if self.axes.style and not self.styles:
            raise ValueError("axes.style needs `styles:` (the styles CSV file)")
        return self

    def sweep_jobs(self) -> list[tuple[Optional[str], "RenderJob"]]:
        """(sweep name, a one-table job) for each table; (None, self) when there are no sweeps."""
        if not self.sweeps:
            return [(None, self)]
        tables = []
        for name, sweep in self.sweeps.items():
            defaults = Defaults.model_validate({**self.defaults.model_dump(exclude_unset=True), **sweep.defaults})
            tables.append((name, RenderJob(job=self.job, model=self.model, lora_dir=self.lora_dir,
                                           styles=self.styles, defaults=defaults, axes=sweep.axes, zip=sweep.zip)))
        return tables


def check_table(axes: Axes, zip_groups: list[list[str]], defaults: Defaults) -> None:
    """What one table needs across its fields: zip groups of existing axes with equal lengths, a
    LoRA for the strength axis to act on, and a prompt."""
    names = axes.names()
    seen: set[str] = set()
    for group in zip_groups:
        for name in group:
            if name not in names:
                raise ValueError(f"zip: {name!r} is not an axis (axes: {', '.join(names)})")
            if name in seen:
                raise ValueError(f"zip: {name!r} is in more than one group")
            seen.add(name)
        lengths = {len(axes.values(n)) for n in group}
        if len(lengths) > 1:
            raise ValueError(f"zip: axes {', '.join(group)} must have the same number of values")
    if axes.strength and not (axes.lora or defaults.lora):
        raise ValueError("axes.strength sets a LoRA's strength: add axes.lora or defaults.lora")
    if not (axes.prompt or defaults.prompt):
        raise ValueError("no prompt: set defaults.prompt or axes.prompt")


def _resolution(value: Any) -> Any:
    """kohya writes resolution as `1024`, `"1024,1024"` or `[1024, 1024]`."""
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, str):
        width, _, height = value.partition(",")
        try:
            return (int(width), int(height or width))
        except ValueError:
            raise ValueError(f"{value!r} is not WIDTH,HEIGHT") from None
    return value


_OPTIMIZERS = {"adamw": "AdamW", "adamw8bit": "AdamW8bit", "adafactor": "Adafactor", "prodigy": "Prodigy"}


def _optimizer_name(value: str) -> str:
    if value.lower() not in _OPTIMIZERS:
        raise ValueError(f"{value!r}: use one of {', '.join(_OPTIMIZERS.values())}")
    return _OPTIMIZERS[value.lower()]


Positive = Annotated[int, _between(1, 10_000_000)]


class TrainOptions(Strict):
    """One training run's options, with kohya sd-scripts' names and meanings."""

    mode: Literal["lora", "dreambooth"] = "lora"  # dreambooth: train the whole UNet (sdxl_train.py)
    train_data_dir: Optional[str] = None  # kohya layout: sub-folders `<repeats>_<token> <class>`
    reg_data_dir: Optional[str] = None  # sub-folders `<repeats>_<class>`
    dataset_config: Optional[str] = None  # a kohya dataset TOML instead of the two folders
    caption_extension: str = ".txt"
    # not kohya: the reg folder's caption extension when it differs (".none" = ignore its captions)
    reg_caption_extension: Optional[str] = None
    keep_tokens: int = 0
    output_name: Annotated[str, AfterValidator(lambda v: _check_name(v))] = "lora"
    network_dim: Annotated[int, _between(1, 1024)] = 4
    network_alpha: Annotated[float, _between(0, 1024)] = 1.0
    network_train_unet_only: bool = True
    # kohya's --network_args, "key=value" strings: conv_dim / conv_alpha also train the UNet's 3×3
    # convolutions (ResnetBlock2D, Downsample2D, Upsample2D) at that rank and alpha
    network_args: list[str] = Field(default_factory=list)
    learning_rate: Annotated[float, _between(0, 1)] = 1e-4
    unet_lr: Optional[Annotated[float, _between(0, 1)]] = None
    text_encoder_lr: Optional[Annotated[float, _between(0, 1)]] = None
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                          "polynomial"] = "constant"
    lr_warmup_steps: Annotated[int, _between(0, 10_000_000)] = 0
    lr_scheduler_num_cycles: Positive = 1
    lr_scheduler_power: float = 1.0
    optimizer_type: Annotated[str, AfterValidator(_optimizer_name)] = "AdamW"
    optimizer_args: list[str] = Field(default_factory=list)
    train_batch_size: Annotated[int, _up_to(1, "BATCH", 64)] = 1
    gradient_accumulation_steps: Annotated[int, _between(1, 1024)] = 1
    max_train_epochs: Optional[Positive] = None
    max_train_steps: Optional[Positive] = None
    save_every_n_epochs: Optional[Positive] = None
    save_every_n_steps: Optional[Positive] = None
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    save_precision: Literal["float", "fp16", "bf16"] = "float"
    gradient_checkpointing: bool = False
    cache_latents: bool = True
    cache_latents_to_disk: bool = False  # accepted for kohya configs; latents are cached in memory
    resolution: Annotated[tuple[Side, Side], BeforeValidator(_resolution)] = (1024, 1024)
    enable_bucket: bool = False
    min_bucket_reso: Annotated[int, _between(64, 8192)] = 256
    max_bucket_reso: Annotated[int, _between(64, 8192)] = 1024
    bucket_reso_steps: Annotated[int, _between(8, 1024)] = 64
    bucket_no_upscale: bool = False
    prior_loss_weight: Annotated[float, _between(0, 100)] = 1.0
    noise_offset: Annotated[float, _between(0, 1)] = 0.0
    min_snr_gamma: Optional[Annotated[float, _between(0, 100)]] = None
    seed: Annotated[int, _between(0, MAX_SEED)] = 42

    @model_validator(mode="after")
    def _data(self):
        if not (self.train_data_dir or self.dataset_config):
            raise ValueError("give train_data_dir (kohya folders) or dataset_config (kohya TOML)")
        if self.dataset_config and (self.train_data_dir or self.reg_data_dir):
            raise ValueError("dataset_config replaces train_data_dir and reg_data_dir: give one or the other")
        return self

    @model_validator(mode="after")
    def _network_args(self):
        self.network_kwargs()
        if self.network_args and self.mode != "lora":
            raise ValueError("network_args are LoRA options (mode: lora)")
        return self

    def network_kwargs(self) -> dict[str, str]:
        """`network_args` as kohya keeps them (values are strings), checked: conv_dim is a rank
        1-1024, conv_alpha a number >= 0 (0: alpha = rank) that needs conv_dim."""
        kwargs = {}
        for item in self.network_args:
            key, sep, value = item.partition("=")
            key, value = key.strip(), value.strip()
            if not sep or not key or not value:
                raise ValueError(f"network_args: {item!r} is not key=value")
            if key not in ("conv_dim", "conv_alpha"):
                raise ValueError(f"network_args: {key!r} is not supported (conv_dim, conv_alpha)")
            try:
                number = int(value) if key == "conv_dim" else float(value)
            except ValueError:
                raise ValueError(f"network_args: {key} must be a number, not {value!r}") from None
            if (key == "conv_dim" and not 1 <= number <= 1024) or (key == "conv_alpha" and not 0 <= number <= 1024):
                raise ValueError(f"network_args: {key}={value} is out of range")
            kwargs[key] = value
        if "conv_alpha" in kwargs and "conv_dim" not in kwargs:
            raise ValueError("network_args: conv_alpha needs conv_dim")
        return kwargs


class RegSet(Strict):
    """Regularization images the farm renders before training, in kohya's layout (`1_man/`).

    Either from the instance captions with the instance token removed (`w0ut3r, photo of a man,
    smiling` → `photo of a man, smiling`: the first seed's best-performing choice), or from one
    class prompt (`photo of a man`)."""

    from_captions: Optional[str] = None  # the instance folder (kohya `img/`) whose captions become prompts
    token: Optional[str] = None  # removed from captions; default: the token in the folder name
    prompt: Optional[str] = None  # one class prompt instead
    count: Annotated[int, _between(1, 100000)] = 1  # images per caption (or of the prompt)
    class_word: Optional[str] = None  # folder `<repeats>_<class_word>`; default: the instance class
    repeats: Annotated[int, _between(1, 1000)] = 1
    captions: bool = True  # write the prompt as a .txt caption beside each image
    negative: str = ""
    steps: Steps = 20
    cfg: Cfg = 7.0
    sampler: SamplerName = "dpmpp_2s_ancestral"
    width: Side = 1024
    height: Side = 1024
    seed: Annotated[int, _between(0, MAX_SEED)] = 0  # image k of a prompt uses seed + k

    @model_validator(mode="after")
    def _one_source(self):
        if bool(self.from_captions) == bool(self.prompt):
            raise ValueError("give from_captions (an instance folder) or prompt, not both or neither")
        if self.prompt and not self.class_word:
            raise ValueError("class_word is needed with prompt (it names the folder, e.g. 1_man)")
        return self


class Evaluate(Strict):
    """The render sweep(s) over a training job's checkpoints (a render job without job/model)."""

    styles: Optional[str] = None
    defaults: Defaults = Field(default_factory=Defaults)
    axes: Axes = Field(default_factory=Axes)
    zip: list[list[str]] = Field(default_factory=list)
    sweeps: dict[str, Sweep] = Field(default_factory=dict)


class TrainJob(Strict):
    """A training sweep: shared kohya options, named variants that override them, and an
    optional evaluation sweep rendered over every checkpoint as soon as it is written."""

    job: Annotated[str, AfterValidator(lambda v: _check_name(v))]
    model: str
    train: dict[str, Any]
    variants: dict[str, dict[str, Any]] = Field(default_factory=lambda: {"run": {}})
    evaluate: Optional[Evaluate] = None
    reg_sets: dict[str, RegSet] = Field(default_factory=dict)  # use as reg_data_dir: generated:NAME

    @model_validator(mode="after")
    def _check_variants(self):
        for name in list(self.variants) + list(self.reg_sets):
            _check_name(name)
        runs = self.runs()
        if self.evaluate and len({o.mode for o in runs.values()}) > 1 and any(
                a.lora is None and a.model is None
                for a in ([w.axes for w in self.evaluate.sweeps.values()] or [self.evaluate.axes])):
            raise ValueError("evaluate: variants mix lora and dreambooth modes: list evaluate.axes.lora "
                             "and evaluate.axes.model yourself")
        for name, options in runs.items():  # every variant must make valid options
            wanted = options.reg_data_dir or ""
            if wanted.startswith("generated:") and wanted[len("generated:"):] not in self.reg_sets:
                raise ValueError(f"variants.{name}.reg_data_dir: no reg_sets entry {wanted[len('generated:'):]!r}")
        return self

    def runs(self) -> dict[str, TrainOptions]:
        """Each variant's options: `train` with the variant's keys on top."""
        result = {}
        for name, overrides in self.variants.items():
            merged = {**self.train, **(overrides or {})}
            try:
                result[name] = TrainOptions.model_validate(merged)
            except ValidationError as exc:
                error = exc.errors()[0]
                where = "train" if _format_location(error["loc"]) not in (overrides or {}) else f"variants.{name}"
                which = f" (variant {name})" if "variants" in self.model_fields_set else ""
                raise ValueError(f"{where}.{_format_error(error)}{which}") from None
        return result

    def evaluation_job(self) -> Optional["RenderJob"]:
        """The evaluate sweep(s) as a render job; a table without a lora or model axis gets every
        run's checkpoints (on the lora axis, or the model axis for DreamBooth runs)."""
        if self.evaluate is None:
            return None
        modes = {options.mode for options in self.runs().values()}
        axis = "model" if modes == {"dreambooth"} else "lora"
        choice = ModelChoice if axis == "model" else LoraChoice

        def with_runs(axes: Axes) -> Axes:
            if axes.lora is not None or axes.model is not None:
                return axes
            filled = axes.model_copy(update={axis: [choice(run=name) for name in self.variants]})
            filled._order = (axis, *(axes._order or ()))
            return filled

        e = self.evaluate
        sweeps = {name: sweep.model_copy(update={"axes": with_runs(sweep.axes)}) for name, sweep in e.sweeps.items()}
        return RenderJob(job=self.job, model=self.model, styles=e.styles, defaults=e.defaults,
                         axes=with_runs(e.axes) if not e.sweeps else e.axes, zip=e.zip, sweeps=sweeps)


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
            part = str(part)  # a key the user wrote: quoted unless it is a plain name
            text += ("." if text else "") + (part if re.fullmatch(r"[\w.:-]+", part, re.ASCII) else repr(part))
    return text


def _format_error(error: dict) -> str:
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown key"
    location = _format_location(error["loc"])
    return f"{location}: {message}" if location else message


def parse_spec(data: Any, source: str = "<spec>") -> "RenderJob | TrainJob":
    """Validate already-parsed YAML; errors become one SpecError line naming source and field."""
    if not isinstance(data, dict):
        raise SpecError(f"{source}: a job spec is a mapping of keys (job, model, defaults, axes)")
    model = TrainJob if "train" in data else RenderJob
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
        raise SpecError(f"{source}: {_format_error(errors[0])}{more}") from None


def read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise SpecError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    if len(text) > MAX_SPEC_BYTES:
        raise SpecError(f"{path}: {len(text):,} bytes; a job spec is at most {MAX_SPEC_BYTES:,}")
    try:
        data = yaml.safe_load(text)  # plain data only: `!!python/...` tags are refused
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        raise SpecError(f"{path}: {where}not valid YAML: {getattr(exc, 'problem', None) or exc}") from None
    except RecursionError:
        raise SpecError(f"{path}: nested too deeply to be a job spec") from None
    _check_size(data, path)
    return data


def _check_size(data: Any, path: Path) -> None:
    """Refuse YAML whose aliases or nesting make it huge (a "billion laughs" spec would
    otherwise take validation down with it)."""
    budget, stack = MAX_SPEC_NODES, [(data, 0)]
    while stack:
        node, depth = stack.pop()
        budget -= 1
        if budget < 0 or depth > MAX_SPEC_DEPTH:
            raise SpecError(f"{path}: too large or nested too deeply to be a job spec "
                            f"(more than {MAX_SPEC_NODES:,} values or {MAX_SPEC_DEPTH} levels)")
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for pair in node.items() for v in pair)
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)


def merge(base: Any, override: Any) -> Any:
    """Deep merge of YAML data: mappings merge key by key, anything else is replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        return {**base, **{k: merge(base.get(k), v) for k, v in override.items()}}
    return override


def load_spec(path: str | Path, overrides: list[str | Path] = ()) -> "RenderJob | TrainJob":
    """Read a YAML job spec with `yaml.safe_load` (never arbitrary objects) and validate it.
    A spec with a `train` key is a training job; any other is a render job. Override files
    (e.g. a study's `tiny.yaml`) are deep-merged on top, in order."""
    path = Path(path)
    data = read_yaml(path)
    for override in overrides:
        extra = read_yaml(Path(override))
        if not isinstance(extra, dict):
            raise SpecError(f"{override}: an override file is a mapping of spec keys")
        data = merge(data, extra)
    where = str(path) + "".join(f" + {o}" for o in overrides)
    return parse_spec(data, where)
