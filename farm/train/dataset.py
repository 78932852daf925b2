"""Training data in kohya's layout, and sd-scripts' step math.

Users bring what kohya_ss made them build:

    img/9_w0ut3r man/IMG_001.jpg + IMG_001.txt    <repeats>_<instance token> <class>
    reg/1_man/0001.png [+ 0001.txt]                <repeats>_<class>

or a kohya dataset TOML (`[[datasets]]` / `[[datasets.subsets]]`). A missing caption falls back to
the folder's `<token> <class>`. The epoch is built as sd-scripts builds it: every image repeated
`num_repeats` times into its aspect-ratio bucket; regularization images are repeated (or cut) until
they match the instance count, which is why "regularization doubles the steps"; each bucket is cut
into batches. So `steps per epoch = Σ ceil(len(bucket) / batch_size)`, exactly sd-scripts' number,
counted per bucket by arithmetic (an epoch is never expanded image by image to be measured).

Datasets come from users and over the network, so they are read under the farm's path policy
(artifacts.allowed_roots: a symlinked folder, image or caption is followed only into an allowed
folder) and checked before any training starts: every image is decoded once (header, pixel limit,
truncation), captions are UTF-8 and read as sd-scripts reads them (first line), repeats and epoch
sizes are bounded. Each problem is a one-line DatasetError naming the file. The limits are the
farm's (environment of the head, like spec.py's `farm_limit`): SDFARM_MAX_REPEATS,
SDFARM_MAX_EPOCH_IMAGES, SDFARM_MAX_IMAGE_PIXELS, SDFARM_MAX_CAPTION_BYTES.
"""

from __future__ import annotations

import math
import os
import random
import re
import tomllib
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from farm.errors import DatasetError, first_line
from farm.sweep.spec import MAX_SPEC_BYTES, farm_limit

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
_PIL_FORMATS = ("PNG", "JPEG", "WEBP", "BMP")  # what those suffixes hold; no other decoder ever runs
_FOLDER = re.compile(r"^(\d+)_(.+)$")
_LINE_END = re.compile(r"\r\n|\r|\n")  # Python's universal newlines: what sd-scripts' readlines splits on


def max_repeats() -> int:
    return farm_limit("REPEATS", 10_000)


def max_epoch_images() -> int:
    """Images × repeats in one epoch (instances plus the reg images matched to them)."""
    return farm_limit("EPOCH_IMAGES", 1_000_000)


def max_image_pixels() -> int:
    return farm_limit("IMAGE_PIXELS", 8192 * 8192)


def max_caption_bytes() -> int:
    return farm_limit("CAPTION_BYTES", 64 << 10)


def check_repeats(repeats, where: str) -> int:
    """A subset's `num_repeats`: a whole number from 1 to the farm's SDFARM_MAX_REPEATS. sd-scripts
    silently skips a subset below 1; here it is refused, as a typo would otherwise drop the folder."""
    limit = max_repeats()
    if isinstance(repeats, bool) or not isinstance(repeats, int) or not 1 <= repeats <= limit:
        raise DatasetError(f"{where}: repeats must be a whole number from 1 to {limit:,} "
                        f"(this farm's SDFARM_MAX_REPEATS), not {str(repeats)[:40]}")
    return repeats


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

    def reg_repeats(self) -> list[int]:
        """How often each reg image (in `regs` order) appears in one epoch. sd-scripts' loop: a first
        pass adds each image `num_repeats` times, later passes one at a time, until the reg count
        reaches the instance count. Worked out by arithmetic, so any count costs nothing."""
        regs = self.regs
        target, counts, total = self.num_train_images, [0] * len(regs), 0
        if not regs or target <= 0:
            return counts
        for index, item in enumerate(regs):
            counts[index] = item.subset.num_repeats
            total += counts[index]
            if total >= target:
                return counts
        rounds, extra = divmod(target - total, len(regs))
        return [count + rounds + (index < extra) for index, count in enumerate(counts)]

    def epoch_size(self) -> int:
        return self.num_train_images + sum(self.reg_repeats())

    def epoch_entries(self) -> list[ImageItem]:
        """Every image as often as it appears in one epoch (before bucketing)."""
        entries = [item for item in self.instances for _ in range(item.subset.num_repeats)]
        return entries + [item for item, count in zip(self.regs, self.reg_repeats()) for _ in range(count)]

    def bucket_of(self, item: ImageItem) -> tuple[int, int]:
        """The item's bucket, refused (naming the image) when it has no usable bucket or training
        would have to blow it up past the farm's pixel limit to cover one."""
        try:
            width, height = self.buckets.bucket_for(item.width, item.height)
        except ZeroDivisionError:
            width = height = 0
        if width < 8 or height < 8:
            raise DatasetError(f"{item.path}: {item.width}x{item.height} has no bucket at these settings "
                            "(too small or too narrow)")
        scale = max(width / item.width, height / item.height)
        cover = max(width, round(item.width * scale)) * max(height, round(item.height * scale))
        if cover > max_image_pixels():
            raise DatasetError(f"{item.path}: {item.width}x{item.height} is too narrow: covering its {width}x{height} "
                            f"bucket takes {cover:,} pixels, over this farm's SDFARM_MAX_IMAGE_PIXELS")
        return (width, height)

    def bucket_counts(self) -> dict[tuple[int, int], int]:
        """Images per bucket in one epoch, repeats included (counted, never expanded)."""
        counts: Counter = Counter()
        seen: dict[tuple[int, int], tuple[int, int]] = {}
        appearances = [(i, i.subset.num_repeats) for i in self.instances] + list(zip(self.regs, self.reg_repeats()))
        for item, count in appearances:
            if count:
                size = (item.width, item.height)
                if size not in seen:
                    seen[size] = self.bucket_of(item)
                counts[seen[size]] += count
        return dict(sorted(counts.items()))

    def bucketed(self) -> dict[tuple[int, int], list[ImageItem]]:
        """One epoch's entries (repeats expanded) by bucket, buckets in sorted order."""
        buckets: dict[tuple[int, int], list[ImageItem]] = {}
        for item in self.epoch_entries():
            buckets.setdefault(self.buckets.bucket_for(item.width, item.height), []).append(item)
        return dict(sorted(buckets.items()))

    def batches_per_epoch(self) -> int:
        return sum(math.ceil(count / self.batch_size) for count in self.bucket_counts().values())

    def check(self) -> None:
        """What would make training impossible or unbounded, refused before it starts."""
        where = Path(self.subsets[0].image_dir).parent if self.subsets else "dataset"
        if not self.instances:
            raise DatasetError(f"{where}: no instance (non-reg) images to train on")
        size, limit = self.epoch_size(), max_epoch_images()
        if size > limit:
            raise DatasetError(f"{where}: one epoch is {size:,} images × repeats, over this farm's "
                            f"{limit:,} (SDFARM_MAX_EPOCH_IMAGES)")

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
        """kohya's `ss_tag_frequency`: per folder, how often each comma-separated tag appears. Only
        captions `load_items` read (first lines of caption files inside the dataset) count."""
        result: dict[str, Counter] = {}
        for item in self.items:
            folder = Path(item.subset.image_dir).name
            tags = [t.strip().lower() for t in item.caption.split(",") if t.strip()]  # lower-cased, as kohya
            result.setdefault(folder, Counter()).update(tags)
        return {folder: dict(counter) for folder, counter in result.items()}


def _inside(path: Path, base: Optional[Path]) -> Path:
    """`path` resolved, refused unless it lies in the folders jobs may read (see artifacts)."""
    from farm.models.artifacts import inside_roots

    return inside_roots(path, base if base is not None else path.parent, DatasetError)


def read_caption(image: Path, subset: Subset, base: Optional[Path] = None) -> str:
    """The sidecar caption (`IMG.txt`), or the folder's `<token> <class>` when there is none.

    Read as sd-scripts reads it: UTF-8 (anything else fails, in sd-scripts too), first line only,
    stripped. The file may be a symlink only into the allowed folders, and is at most
    SDFARM_MAX_CAPTION_BYTES. An empty first line falls back to the folder's tokens."""
    from farm.models.artifacts import read_regular

    extension = subset.caption_extension
    if "/" in extension or os.sep in extension or "\0" in extension:
        raise DatasetError(f"{subset.image_dir}: caption extension {extension!r} is not a file suffix")
    sidecar = image.parent / (image.stem + extension)  # sd-scripts: splitext(image)[0] + extension
    if not os.path.lexists(sidecar):
        return subset.class_tokens
    path = _inside(sidecar, base)
    if not path.is_file():  # a dangling link or a folder inside the roots: no caption, as in sd-scripts
        return subset.class_tokens
    limit = max_caption_bytes()
    data = read_regular(path, limit, DatasetError)
    if len(data) > limit:
        raise DatasetError(f"{sidecar}: caption file over {limit:,} bytes (this farm's SDFARM_MAX_CAPTION_BYTES; "
                        "sd-scripts reads only its first line)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{sidecar}: caption is not UTF-8 text (byte {exc.start}); "
                           "sd-scripts refuses it too") from None
    return _LINE_END.split(text, maxsplit=1)[0].strip() or subset.class_tokens


def list_images(folder: Path) -> list[Path]:
    """A folder's images by suffix, sorted (hidden files skipped, as sd-scripts' glob skips them);
    refused past SDFARM_MAX_EPOCH_IMAGES while listing, so a huge folder is never listed whole."""
    limit = max_epoch_images()
    images = []
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                name = entry.name
                if Path(name).suffix.lower() in IMAGE_SUFFIXES and not name.startswith("."):
                    images.append(folder / name)
                    if len(images) > limit:
                        raise DatasetError(f"{folder}: more than {limit:,} images "
                                           "(this farm's SDFARM_MAX_EPOCH_IMAGES)")
    except OSError as exc:
        raise DatasetError(f"{folder}: cannot list ({exc.strerror})") from None
    return sorted(images)


def _repeats_of(folder: Path, digits: str) -> int:
    if len(digits) > 12:  # never int() an absurd digit string
        return check_repeats(10 ** 12, str(folder))
    return check_repeats(int(digits), str(folder))


def scan_subsets(root: Path, is_reg: bool, caption_extension: str = ".txt", keep_tokens: int = 0,
                 base: Optional[Path] = None) -> list[Subset]:
    """kohya's folder convention: each sub-folder `<repeats>_<tokens>` is one subset. A symlinked
    sub-folder must point into the folders jobs may read (`base`: the spec's folder)."""
    if not root.is_dir():
        raise DatasetError(f"{root}: image folder not found")
    try:
        folders = sorted(p for p in root.iterdir() if p.is_dir())
    except OSError as exc:
        raise DatasetError(f"{root}: cannot list ({exc.strerror})") from None
    if len(folders) > max_epoch_images():
        raise DatasetError(f"{root}: more sub-folders than this farm's SDFARM_MAX_EPOCH_IMAGES")
    subsets = []
    for folder in folders:
        match = _FOLDER.match(folder.name)
        if not match:
            raise DatasetError(f"{folder}: kohya folders are named '<repeats>_<token> <class>', e.g. '9_w0ut3r man'")
        repeats = _repeats_of(folder, match[1])
        _inside(folder, base if base is not None else root)
        subsets.append(Subset(image_dir=str(folder), num_repeats=repeats, class_tokens=match[2].strip(),
                              is_reg=is_reg, caption_extension=caption_extension, keep_tokens=keep_tokens))
    if not subsets:
        raise DatasetError(f"{root}: no '<repeats>_<token> <class>' sub-folders")
    return subsets


def check_image(path: Path) -> tuple[int, int]:
    """(width, height) of an image that training can read: a PNG, JPEG, WebP or BMP (by content),
    at most SDFARM_MAX_IMAGE_PIXELS, decoded once to the end (a truncated or corrupt file fails
    here, not in a training worker). JPEGs are decoded at 1/8 scale: the whole stream is still read."""
    from PIL import Image, UnidentifiedImageError

    from farm.models.artifacts import open_regular

    limit = max_image_pixels()
    stamp = _stamp(path, limit)
    if stamp in _CHECKED:
        return _CHECKED[stamp]
    over = f"over this farm's {limit:,}-pixel limit (SDFARM_MAX_IMAGE_PIXELS; a decompression bomb?)"
    try:
        with open_regular(path, DatasetError) as handle, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(handle, formats=_PIL_FORMATS) as image:
                width, height = image.size
                if width < 1 or height < 1:
                    raise DatasetError(f"{path}: {width}x{height} is not an image size")
                if width * height > limit:
                    raise DatasetError(f"{path}: {width}x{height} is {over}")
                if image.format == "JPEG":
                    image.draft(None, (max(1, width // 8), max(1, height // 8)))
                image.load()
    except DatasetError:
        raise
    except Image.DecompressionBombError:
        raise DatasetError(f"{path}: {over}") from None
    except UnidentifiedImageError:
        raise DatasetError(f"{path}: not a PNG, JPEG, WebP or BMP image") from None
    except Exception as exc:  # Pillow raises many types on hostile bytes; each means "unusable image"
        raise DatasetError(f"{path}: not a readable image ({type(exc).__name__}: {first_line(exc, 160)})") from None
    if stamp is not None:
        if len(_CHECKED) >= 1 << 20:
            _CHECKED.clear()
        _CHECKED[stamp] = (width, height)
    return width, height


# Images already checked by this process, by (path, inode, size, mtime, pixel limit): `farm plan`
# builds a variant's dataset per variant, and a file that changed is checked again.
_CHECKED: dict[tuple, tuple[int, int]] = {}


def _stamp(path: Path, limit: int) -> Optional[tuple]:
    try:
        info = os.stat(path, follow_symlinks=False)
    except OSError:
        return None
    return (str(path), info.st_ino, info.st_size, info.st_mtime_ns, limit)


def load_items(subsets: list[Subset], base: Optional[Path] = None) -> list[ImageItem]:
    """Every subset's images with their captions and sizes, each image checked (check_image) and
    kept to the folders jobs may read (`base`: the spec's folder; default: the subset's folder)."""
    items = []
    limit = max_epoch_images()
    for subset in subsets:
        folder = Path(subset.image_dir)
        if not folder.is_dir():
            raise DatasetError(f"{subset.image_dir}: image folder not found")
        folder_base = base if base is not None else folder
        _inside(folder, folder_base)
        images = list_images(folder)
        if not images:
            raise DatasetError(f"{subset.image_dir}: no images")
        if len(items) + len(images) > limit:
            raise DatasetError(f"{subset.image_dir}: the dataset has more than {limit:,} images "
                            "(this farm's SDFARM_MAX_EPOCH_IMAGES)")
        for image in images:
            width, height = check_image(_inside(image, folder_base))
            items.append(ImageItem(str(image), read_caption(image, subset, folder_base), width, height, subset))
    return items


_TOML_GENERAL = {"resolution", "batch_size", "enable_bucket", "min_bucket_reso", "max_bucket_reso",
                 "bucket_reso_steps", "bucket_no_upscale", "caption_extension", "keep_tokens"}
_TOML_SUBSET = {"image_dir", "num_repeats", "class_tokens", "is_reg", "caption_extension", "keep_tokens"}


def _whole(lo: int, hi: int):
    def check(value):
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise ValueError(f"must be a whole number from {lo} to {hi}")
        return value

    return check


def _of_type(kind: type, name: str):
    def check(value):
        if not isinstance(value, kind):
            raise ValueError(f"must be {name}")
        return value

    return check


def _toml_resolution(value) -> tuple[int, int]:
    side = _whole(64, farm_limit("SIDE", 8192))
    if isinstance(value, list) and len(value) == 2:
        sides = value
    elif isinstance(value, str) and re.fullmatch(r"\s*\d{1,6}\s*(,\s*\d{1,6}\s*)?", value):
        sides = [int(part) for part in value.split(",")] * (1 if "," in value else 2)
    else:
        sides = [value, value]
    for number in sides:
        side(number)
        if number % 8:
            raise ValueError(f"must be a multiple of 8 (SDXL's VAE scale factor), got {number}")
    return (sides[0], sides[1])


_TOML_CHECKS = {
    "resolution": _toml_resolution, "batch_size": lambda value: _whole(1, farm_limit("BATCH", 64))(value),
    "enable_bucket": _of_type(bool, "true or false"),
    "min_bucket_reso": _whole(64, 8192), "max_bucket_reso": _whole(64, 8192), "bucket_reso_steps": _whole(8, 1024),
    "bucket_no_upscale": _of_type(bool, "true or false"), "caption_extension": _of_type(str, "a string"),
    "keep_tokens": _whole(0, 1000), "image_dir": _of_type(str, "a string"), "class_tokens": _of_type(str, "a string"),
    "is_reg": _of_type(bool, "true or false"),
}


def _toml_value(path: Path, where: str, key: str, value):
    if key == "num_repeats":
        return check_repeats(value, f"{path}: {where}.num_repeats")
    try:
        return _TOML_CHECKS[key](value)
    except ValueError as exc:
        raise DatasetError(f"{path}: {where}.{key}: {exc}") from None


def load_dataset_toml(path: Path, base: Optional[Path] = None) -> tuple[list[Subset], dict]:
    """The parts of kohya's dataset TOML that map onto this farm; anything else is an error.
    `image_dir`s are relative to the TOML and must lie in the folders jobs may read (`base`: the
    spec's folder; default: the TOML's)."""
    from farm.models.artifacts import read_regular

    path = _inside(path, base)
    data = read_regular(path, MAX_SPEC_BYTES, DatasetError)
    if len(data) > MAX_SPEC_BYTES:
        raise DatasetError(f"{path}: a dataset TOML is at most {MAX_SPEC_BYTES >> 20} MB")
    try:
        config = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: cannot read dataset TOML: not UTF-8 (byte {exc.start})") from None
    except (ValueError, RecursionError) as exc:  # TOMLDecodeError is a ValueError; so is a 5,000-digit int
        raise DatasetError(f"{path}: cannot read dataset TOML: {first_line(exc, 200)}") from None
    unknown = set(config) - {"general", "datasets"}
    if unknown:
        raise DatasetError(f"{path}: {sorted(unknown)[0]}: not supported in dataset TOML")
    general = config.get("general", {})
    datasets = config.get("datasets", [])
    if not isinstance(general, dict):
        raise DatasetError(f"{path}: general: must be a table")
    if not isinstance(datasets, list) or len(datasets) != 1 or not isinstance(datasets[0], dict):
        raise DatasetError(f"{path}: datasets: exactly one [[datasets]] table is supported")
    dataset = dict(datasets[0])
    raw_subsets = dataset.pop("subsets", [])
    settings = {**general, **dataset}
    for key in settings:
        if key not in _TOML_GENERAL:
            raise DatasetError(f"{path}: datasets.{key}: not supported (supported: {', '.join(sorted(_TOML_GENERAL))})")
        settings[key] = _toml_value(path, "datasets", key, settings[key])
    if not isinstance(raw_subsets, list) or not all(isinstance(raw, dict) for raw in raw_subsets):
        raise DatasetError(f"{path}: datasets.subsets: must be [[datasets.subsets]] tables")
    if len(raw_subsets) > max_epoch_images():
        raise DatasetError(f"{path}: datasets.subsets: more than this farm's SDFARM_MAX_EPOCH_IMAGES")
    subsets = []
    for index, raw in enumerate(raw_subsets):
        where = f"datasets.subsets[{index}]"
        for key in raw:
            if key not in _TOML_SUBSET:
                raise DatasetError(f"{path}: {where}.{key}: not supported")
        if "image_dir" not in raw:
            raise DatasetError(f"{path}: {where}.image_dir: required")
        raw = {key: _toml_value(path, where, key, value) for key, value in raw.items()}
        try:
            image_dir = data_path(raw["image_dir"], path.parent, base)
        except DatasetError as exc:
            raise DatasetError(f"{path}: {where}.image_dir: {exc}") from None
        subsets.append(Subset(
            image_dir=str(image_dir), num_repeats=raw.get("num_repeats", 1),
            class_tokens=raw.get("class_tokens", ""), is_reg=raw.get("is_reg", False),
            caption_extension=raw.get("caption_extension", settings.get("caption_extension", ".caption")),
            keep_tokens=raw.get("keep_tokens", settings.get("keep_tokens", 0))))
    if not any(not subset.is_reg for subset in subsets):
        raise DatasetError(f"{path}: datasets.subsets: no instance (is_reg = false) subset to train on")
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
    """sd-scripts' numbers: epochs win over steps when both are given; 1600 steps by default.
    The dataset is checked first (Dataset.check): no instances or an epoch over the farm's limit
    is refused, so every number here is finite and small enough to train."""
    dataset.check()
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


def data_path(reference: str, base: Path, roots_base: Optional[Path] = None) -> Path:
    """A dataset folder or file: relative to `base` (the spec's folder), or inside the built-in
    `tiny:subject` dataset; resolved, and refused outside the folders jobs may read (computed for
    `roots_base`, default `base`), as models and LoRAs are."""
    from farm.models.artifacts import inside_roots
    from farm.models.tiny import TINY_SUBJECT, resolve_tiny

    roots_base = roots_base if roots_base is not None else base
    if reference.startswith(TINY_SUBJECT):
        return inside_roots(resolve_tiny(TINY_SUBJECT) / reference[len(TINY_SUBJECT):].lstrip("/"), roots_base,
                            DatasetError)
    return inside_roots(base / reference, roots_base, DatasetError)


def dataset_for(options, base: Path) -> Dataset:
    """The Dataset a run's TrainOptions describe (kohya folders or a kohya dataset TOML)."""
    settings: dict = {}
    if options.dataset_config:
        subsets, settings = load_dataset_toml(data_path(options.dataset_config, base), base)
    else:
        subsets = scan_subsets(data_path(options.train_data_dir, base), False, options.caption_extension,
                               options.keep_tokens, base)
        if options.reg_data_dir:
            subsets += scan_subsets(data_path(options.reg_data_dir, base), True,
                                    options.reg_caption_extension or options.caption_extension, options.keep_tokens,
                                    base)
    bucket_keys = ("enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "bucket_no_upscale")
    buckets = Buckets(resolution=tuple(settings.get("resolution", options.resolution)),
                      **{key: settings.get(key, getattr(options, key)) for key in bucket_keys})
    return Dataset(subsets, load_items(subsets, base), buckets, settings.get("batch_size", options.train_batch_size))
