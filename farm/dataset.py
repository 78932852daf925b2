"""Training data in kohya's layout, and sd-scripts' step math.

Users bring what kohya_ss made them build:

    img/9_w0ut3r man/IMG_001.jpg + IMG_001.txt    <repeats>_<instance token> <class>
    reg/1_man/0001.png [+ 0001.txt]                <repeats>_<class>

or a kohya dataset TOML (`[[datasets]]` / `[[datasets.subsets]]`). A missing caption falls back to
the folder's `<token> <class>`. The epoch is built as sd-scripts builds it: every image repeated
`num_repeats` times into its aspect-ratio bucket; regularization images are repeated (or cut) until
they match the instance count, which is why "regularization doubles the steps"; each bucket is cut
into batches. So `steps per epoch = Σ ceil(len(bucket) / batch_size)`, exactly sd-scripts' number.
"""

from __future__ import annotations

import math
import random
import re
import tomllib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .errors import SpecError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
_FOLDER = re.compile(r"^(\d+)_(.+)$")


@dataclass(frozen=True)
class Subset:
    """One image folder: how often each image repeats per epoch and what it is."""

    image_dir: str
    num_repeats: int
    class_tokens: str  # "w0ut3r man" for instances, "man" for regularization
    is_reg: bool = False
    caption_extension: str = ".txt"
    keep_tokens: int = 0


@dataclass(frozen=True)
class ImageItem:
    path: str
    caption: str
    width: int
    height: int
    subset: Subset


@dataclass(frozen=True)
class Buckets:
    """kohya's aspect-ratio bucketing options (`enable_bucket` and friends)."""

    resolution: tuple[int, int] = (1024, 1024)
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False

    def resolutions(self) -> list[tuple[int, int]]:
        """sd-scripts' predefined buckets: about resolution² pixels, sides multiples of the step."""
        step = self.bucket_reso_steps
        area = self.resolution[0] * self.resolution[1]
        resos = {(int(math.sqrt(area) // step) * step,) * 2}
        width = self.min_bucket_reso
        while width <= self.max_bucket_reso:
            height = min(self.max_bucket_reso, int((area // width) // step) * step)
            if height >= self.min_bucket_reso:
                resos.update({(width, height), (height, width)})
            width += step
        return sorted(resos)

    def bucket_for(self, width: int, height: int) -> tuple[int, int]:
        """The (width, height) bucket an image of this size trains in."""
        if not self.enable_bucket:
            return self.resolution
        aspect = width / height
        if self.bucket_no_upscale:
            return self._no_upscale_bucket(width, height, aspect)
        resos = self.resolutions()
        if (width, height) in resos:
            return (width, height)
        return min(resos, key=lambda r: abs(r[0] / r[1] - aspect))

    def _no_upscale_bucket(self, width: int, height: int, aspect: float) -> tuple[int, int]:
        step = self.bucket_reso_steps
        area = self.resolution[0] * self.resolution[1]

        def round_to_step(x: float) -> int:
            x = int(x + 0.5)
            return x - x % step

        if width * height > area:  # shrink to the area, keeping the aspect as well as steps allow
            by_width = round_to_step(math.sqrt(area * aspect))
            by_height = round_to_step(area / math.sqrt(area * aspect))
            aspect_w = by_width / max(step, round_to_step(by_width / aspect))
            aspect_h = max(step, round_to_step(by_height * aspect)) / by_height
            if abs(aspect_w - aspect) < abs(aspect_h - aspect):
                width, height = by_width, int(by_width / aspect + 0.5)
            else:
                width, height = int(by_height * aspect + 0.5), by_height
        return (width - width % step, height - height % step)


@dataclass
class Dataset:
    """Subsets and images, plus the batch settings that fix the epoch length."""

    subsets: list[Subset]
    items: list[ImageItem]
    buckets: Buckets = field(default_factory=Buckets)
    batch_size: int = 1

    @property
    def instances(self) -> list[ImageItem]:
        return [i for i in self.items if not i.subset.is_reg]

    @property
    def regs(self) -> list[ImageItem]:
        return [i for i in self.items if i.subset.is_reg]

    @property
    def num_train_images(self) -> int:
        """sd-scripts' `num_train_images`: instance images × repeats."""
        return sum(i.subset.num_repeats for i in self.instances)

    @property
    def num_reg_images(self) -> int:
        return sum(i.subset.num_repeats for i in self.regs)

    def epoch_entries(self) -> list[ImageItem]:
        """Every image as often as it appears in one epoch (before bucketing)."""
        entries = [item for item in self.instances for _ in range(item.subset.num_repeats)]
        regs = self.regs
        if not regs:
            return entries
        # As sd-scripts: first pass adds each reg image `num_repeats` times, later passes one at a
        # time, until the reg count reaches the instance count.
        target, count, first_pass = len(entries), 0, True
        repeats = {item.path: 0 for item in regs}
        while count < target:
            for item in regs:
                added = item.subset.num_repeats if first_pass else 1
                repeats[item.path] += added
                count += added
                if count >= target:
                    break
            first_pass = False
        return entries + [item for item in regs for _ in range(repeats[item.path])]

    def bucketed(self) -> dict[tuple[int, int], list[ImageItem]]:
        buckets: dict[tuple[int, int], list[ImageItem]] = {}
        for item in self.epoch_entries():
            buckets.setdefault(self.buckets.bucket_for(item.width, item.height), []).append(item)
        return dict(sorted(buckets.items()))

    def batches_per_epoch(self) -> int:
        return sum(math.ceil(len(items) / self.batch_size) for items in self.bucketed().values())

    def epoch_batches(self, seed: int, epoch: int) -> list[list[ImageItem]]:
        """One epoch's batches in a deterministic shuffled order: (seed, epoch) fixes it, so a
        resumed run sees exactly the batches an uninterrupted one would."""
        rng = random.Random(f"{seed}:{epoch}")
        batches = []
        for items in self.bucketed().values():
            items = list(items)
            rng.shuffle(items)
            batches += [items[i:i + self.batch_size] for i in range(0, len(items), self.batch_size)]
        rng.shuffle(batches)
        return batches

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        """kohya's `ss_tag_frequency`: per folder, how often each comma-separated tag appears."""
        result: dict[str, Counter] = {}
        for item in self.items:
            folder = Path(item.subset.image_dir).name
            tags = [t.strip() for t in item.caption.split(",") if t.strip()]
            result.setdefault(folder, Counter()).update(tags)
        return {folder: dict(counter) for folder, counter in result.items()}


def read_caption(image: Path, subset: Subset) -> str:
    """The sidecar caption (`IMG.txt`), or the folder's `<token> <class>` when there is none."""
    sidecar = image.with_suffix(subset.caption_extension)
    if sidecar.is_file():
        text = sidecar.read_text(encoding="utf-8").strip()
        if text:
            return text
    return subset.class_tokens


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def scan_subsets(root: Path, is_reg: bool, caption_extension: str = ".txt", keep_tokens: int = 0) -> list[Subset]:
    """kohya's folder convention: each sub-folder `<repeats>_<tokens>` is one subset."""
    if not root.is_dir():
        raise SpecError(f"{root}: image folder not found")
    subsets = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        match = _FOLDER.match(folder.name)
        if not match:
            raise SpecError(f"{folder}: kohya folders are named '<repeats>_<token> <class>', e.g. '9_w0ut3r man'")
        subsets.append(Subset(image_dir=str(folder), num_repeats=int(match[1]), class_tokens=match[2].strip(),
                              is_reg=is_reg, caption_extension=caption_extension, keep_tokens=keep_tokens))
    if not subsets:
        raise SpecError(f"{root}: no '<repeats>_<token> <class>' sub-folders")
    return subsets


def load_items(subsets: list[Subset]) -> list[ImageItem]:
    from PIL import Image

    items = []
    for subset in subsets:
        if not Path(subset.image_dir).is_dir():
            raise SpecError(f"{subset.image_dir}: image folder not found")
        images = list_images(Path(subset.image_dir))
        if not images:
            raise SpecError(f"{subset.image_dir}: no images")
        for image in images:
            try:
                with Image.open(image) as handle:
                    width, height = handle.size
            except OSError as exc:
                raise SpecError(f"{image}: not a readable image: {exc}") from None
            items.append(ImageItem(str(image), read_caption(image, subset), width, height, subset))
    return items


_TOML_GENERAL = {"resolution", "batch_size", "enable_bucket", "min_bucket_reso", "max_bucket_reso",
                 "bucket_reso_steps", "bucket_no_upscale", "caption_extension", "keep_tokens"}
_TOML_SUBSET = {"image_dir", "num_repeats", "class_tokens", "is_reg", "caption_extension", "keep_tokens"}


def _resolution(value) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return (int(value[0]), int(value[1]))
    width, _, height = str(value).partition(",")
    return (int(width), int(height or width))


def load_dataset_toml(path: Path) -> tuple[list[Subset], dict]:
    """The parts of kohya's dataset TOML that map onto this farm; anything else is an error."""
    try:
        config = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SpecError(f"{path}: cannot read dataset TOML: {exc}") from None
    unknown = set(config) - {"general", "datasets"}
    if unknown:
        raise SpecError(f"{path}: {sorted(unknown)[0]}: not supported in dataset TOML")
    general = dict(config.get("general", {}))
    datasets = config.get("datasets", [])
    if len(datasets) != 1:
        raise SpecError(f"{path}: datasets: exactly one [[datasets]] table is supported")
    dataset = dict(datasets[0])
    raw_subsets = dataset.pop("subsets", [])
    settings = {**general, **dataset}
    for key in settings:
        if key not in _TOML_GENERAL:
            raise SpecError(f"{path}: datasets.{key}: not supported (supported: {', '.join(sorted(_TOML_GENERAL))})")
    subsets = []
    for index, raw in enumerate(raw_subsets):
        for key in raw:
            if key not in _TOML_SUBSET:
                raise SpecError(f"{path}: datasets.subsets[{index}].{key}: not supported")
        if "image_dir" not in raw:
            raise SpecError(f"{path}: datasets.subsets[{index}].image_dir: required")
        image_dir = data_path(str(raw["image_dir"]), path.parent)
        subsets.append(Subset(
            image_dir=str(image_dir), num_repeats=int(raw.get("num_repeats", 1)),
            class_tokens=str(raw.get("class_tokens", "")), is_reg=bool(raw.get("is_reg", False)),
            caption_extension=raw.get("caption_extension", settings.get("caption_extension", ".caption")),
            keep_tokens=int(raw.get("keep_tokens", settings.get("keep_tokens", 0)))))
    if "resolution" in settings:
        settings["resolution"] = _resolution(settings["resolution"])
    return subsets, settings


@dataclass(frozen=True)
class StepMath:
    """What `farm plan` prints before a training run, in sd-scripts' terms."""

    num_train_images: int
    num_reg_images: int
    batches_per_epoch: int
    steps_per_epoch: int
    max_train_steps: int
    epochs: int
    gui_estimate: str  # kohya_ss GUI's formula, for users comparing with it

    def lines(self) -> list[str]:
        return [
            f"train images × repeats: {self.num_train_images}; reg images × repeats: {self.num_reg_images}",
            f"steps per epoch: {self.steps_per_epoch}; epochs: {self.epochs}; max_train_steps: {self.max_train_steps}",
            f"kohya_ss GUI estimate: {self.gui_estimate}",
        ]


def step_math(dataset: Dataset, gradient_accumulation_steps: int = 1, max_train_epochs: Optional[int] = None,
              max_train_steps: Optional[int] = None) -> StepMath:
    """sd-scripts' numbers: epochs win over steps when both are given; 1600 steps by default."""
    batches = dataset.batches_per_epoch()
    per_epoch = math.ceil(batches / gradient_accumulation_steps)
    if max_train_epochs is not None:
        max_train_steps = max_train_epochs * per_epoch
    elif max_train_steps is None:
        max_train_steps = 1600
    epochs = math.ceil(max_train_steps / per_epoch)
    reg_factor = 2 if dataset.regs else 1
    gui_steps = dataset.num_train_images / dataset.batch_size / gradient_accumulation_steps * epochs * reg_factor
    gui = (f"{dataset.num_train_images} / {dataset.batch_size} / {gradient_accumulation_steps} * {epochs} * "
           f"{reg_factor} = {math.ceil(gui_steps)}")
    return StepMath(dataset.num_train_images, dataset.num_reg_images, batches, per_epoch, max_train_steps,
                    epochs, gui)


def data_path(reference: str, base: Path) -> Path:
    """A dataset folder: relative to the spec, or inside the built-in `tiny:subject` dataset."""
    from .tiny import TINY_SUBJECT, resolve_tiny

    if reference.startswith(TINY_SUBJECT):
        return resolve_tiny(TINY_SUBJECT) / reference[len(TINY_SUBJECT):].lstrip("/")
    from .artifacts import inside_roots

    return inside_roots(base / reference, base, SpecError)


def dataset_for(options, base: Path) -> Dataset:
    """The Dataset a run's TrainOptions describe (kohya folders or a kohya dataset TOML)."""
    settings: dict = {}
    if options.dataset_config:
        subsets, settings = load_dataset_toml(data_path(options.dataset_config, base))
    else:
        subsets = scan_subsets(data_path(options.train_data_dir, base), False, options.caption_extension,
                               options.keep_tokens)
        if options.reg_data_dir:
            subsets += scan_subsets(data_path(options.reg_data_dir, base), True,
                                    options.reg_caption_extension or options.caption_extension, options.keep_tokens)
    bucket_keys = ("enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "bucket_no_upscale")
    buckets = Buckets(resolution=tuple(settings.get("resolution", options.resolution)),
                      **{key: settings.get(key, getattr(options, key)) for key in bucket_keys})
    return Dataset(subsets, load_items(subsets), buckets, settings.get("batch_size", options.train_batch_size))
