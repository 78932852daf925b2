"""Hostile training data next to a spec: `farm plan` refuses each problem with one line naming the
file (exit 2), never a traceback; reads nothing outside the folders jobs may read (a canary file
outside must never be opened, nor its text printed); and plans in bounded memory and time.

The datasets are generated (hypothesis): kohya folders with odd names and repeat counts; good,
truncated, fake and decompression-bomb images; captions that are fine, multi-line, not UTF-8, huge,
or symlinks in and out of the roots; symlinked images and sub-folders; styles CSVs and A1111
`<lora:NAME:WEIGHT>` tags that A1111 cannot read either.
"""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import zlib
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image, PngImagePlugin

from farm.train.dataset import Buckets, Dataset, load_items, scan_subsets, step_math
from farm.errors import DatasetError

CANARY = "CANARY-3f9d27-outside-the-roots"
MAX_PLAN_RSS_MB = 512  # `farm plan` of a training spec imports torch (~270 MB); an expanded epoch is GBs
CAPTION_LIMIT = 2048  # SDFARM_MAX_CAPTION_BYTES in the fuzz: "huge" captions stay cheap to write

# Every file the farm opens while `farm plan` runs (the audit hook sees builtins.open and os.open).
_OPENED: list[str] = []
_RECORDING = [False]


def _audit(event: str, args: tuple) -> None:
    if _RECORDING[0] and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)


# --- files --------------------------------------------------------------------------------------

def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width × height and holds almost nothing: a decompression bomb's shape."""
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + _png_chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + _png_chunk(b"IEND", b""))


def encoded(fmt: str, size=(48, 40), color=(90, 120, 150), **options) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, fmt, **options)
    return buffer.getvalue()


def training_can_read(path: Path) -> bool:
    """What a training worker does with an image (`farm.train.inputs.load_image`), as the oracle."""
    try:
        with Image.open(path) as image:
            image.convert("RGB")
        return True
    except Exception:
        return False


@dataclass
class World:
    """One example's folders: `spec` (the only root besides the farm's cache) and `outside`."""

    root: Path
    outside: Path
    bad: list[Path] = field(default_factory=list)  # what the one-line error may name

    @property
    def spec_dir(self) -> Path:
        return self.root / "jobs"


def make_world(tmp_path_factory) -> World:
    base = tmp_path_factory.mktemp("hostile", numbered=True)
    world = World(base, base / "outside")
    world.spec_dir.mkdir()
    outside = world.outside
    (outside / "3_o x").mkdir(parents=True)
    (outside / "canary.txt").write_text(f"{CANARY}, secret tag\n")
    (outside / "canary.csv").write_text(f"name,prompt,negative_prompt\n{CANARY},{CANARY},\n")
    info = PngImagePlugin.PngInfo()
    info.add_text("secret", CANARY)
    Image.new("RGB", (48, 40)).save(outside / "secret.png", pnginfo=info)
    Image.new("RGB", (48, 40)).save(outside / "3_o x" / "000.png")
    (outside / "3_o x" / "000.txt").write_text(CANARY)
    (outside / "secret.safetensors").write_bytes(CANARY.encode())
    pool = world.spec_dir / "pool"  # inside the roots: symlinks to here are fine
    pool.mkdir()
    Image.new("RGB", (48, 40), (10, 20, 30)).save(pool / "good.png")
    (pool / "good.txt").write_text("pooled, caption\n")
    return world


def plan(world: World, spec: dict, monkeypatch) -> tuple[int, str, str]:
    """`farm plan` in-process with SDFARM_ROOTS narrowed to the spec's folder; (exit, stdout, stderr)."""
    from farm.cli import main

    path = world.spec_dir / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, allow_unicode=True))
    monkeypatch.setenv("SDFARM_ROOTS", str(world.spec_dir))
    monkeypatch.setenv("SDFARM_MAX_CAPTION_BYTES", str(CAPTION_LIMIT))
    stdout, stderr = io.StringIO(), io.StringIO()
    _OPENED.clear()
    _RECORDING[0] = True
    try:
        with redirect_stdout(stdout), redirect_stderr(stderr):
            code = main(["plan", str(path), "--out", str(world.root / "out")])
    finally:
        _RECORDING[0] = False
    return code, stdout.getvalue(), stderr.getvalue()


def assert_safe(world: World, code: int, out: str, err: str, expect_bad: bool) -> None:
    spec = world.spec_dir / "spec.yaml"
    assert CANARY not in out + err
    outside = world.outside.resolve()
    opened = [p for p in _OPENED if Path(p).resolve().is_relative_to(outside)]
    assert not opened, f"read outside the roots: {opened}"
    assert code in (0, 2), err
    assert "Traceback" not in err
    if code == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"farm: error: {spec}"), err
    assert (code == 2) == expect_bad, (err, world.bad)
    if code == 2 and world.bad:
        # as the CLI prints it: a name's line breaks (\n, \f, \x1c, ...) become spaces
        assert any(" ".join(str(path).splitlines()) in err for path in world.bad), (err, world.bad)


# --- generated datasets -------------------------------------------------------------------------

IMAGE_KINDS = ["png", "jpg", "webp", "bmp", "truncated-png", "truncated-jpg", "fake", "empty", "bomb",
               "over-limit", "text-as-png", "link-in", "link-out", "fifo", "folder"]
CAPTION_KINDS = ["none", "plain", "multi-line", "blank", "not-utf8", "huge", "link-in", "link-out", "dangling"]
BAD_FOLDERS = ["0_x y", "999999999_x y", "9" * 40 + "_x y", "x y", "-1_x y", "_x y"]
_TOKEN = st.text(st.characters(blacklist_characters="/\0\n\r", blacklist_categories=("Cs",)), min_size=1, max_size=8)


@dataclass
class Entry:
    image: str
    caption: str
    cut: float  # where a truncated image ends (fraction of its bytes)




def _mostly(fine: list, every: list):
    """Values of `every`, two times in three one of the `fine` ones: benign datasets get planned too."""
    return st.one_of(st.sampled_from(fine), st.sampled_from(fine), st.sampled_from(every))


_ENTRY = st.builds(Entry, _mostly(["png", "jpg", "webp", "bmp", "link-in"], IMAGE_KINDS),
                   _mostly(["none", "plain", "multi-line", "link-in"], CAPTION_KINDS), st.floats(0.05, 0.999))
_DATASET = st.fixed_dictionaries({
    "folder": st.one_of(st.builds(lambda n, t: f"{n}_{t}", st.integers(1, 12), _TOKEN),
                        st.builds(lambda n, t: f"{n}_{t}", st.integers(1, 12), _TOKEN), st.sampled_from(BAD_FOLDERS)),
    "entries": st.lists(_ENTRY, min_size=1, max_size=3),
    "sub_link": _mostly(["none", "in"], ["out"]),
    "reg": _mostly(["none", "ok"], ["link-out"]),
})


def write_image(world: World, path: Path, entry: Entry) -> bool:
    """Write one image of the kind; True when planning must accept it."""
    kind = entry.image
    if kind in ("png", "jpg", "webp", "bmp"):
        path.write_bytes(encoded({"jpg": "JPEG"}.get(kind, kind.upper())))
        return True
    if kind.startswith("truncated-"):
        data = encoded("PNG" if kind.endswith("png") else "JPEG", size=(64, 64), color=(200, 10, 10))
        path.write_bytes(data[:max(1, int(len(data) * entry.cut))])
        return training_can_read(path)
    if kind == "fake":
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 3)
        return False
    if kind == "empty":
        path.write_bytes(b"")
        return False
    if kind == "bomb":
        path.write_bytes(png_header_only(30000, 30000))
        return False
    if kind == "over-limit":  # under Pillow's own bomb limit, over the farm's
        path.write_bytes(png_header_only(9000, 9000))
        return False
    if kind == "text-as-png":
        path.write_text("just text\n")
        return False
    if kind == "link-in":
        path.symlink_to(world.spec_dir / "pool" / "good.png")
        return True
    if kind == "link-out":
        path.symlink_to(world.outside / "secret.png")
        return False
    if kind == "fifo":
        os.mkfifo(path)
        return False
    path.mkdir()  # "folder": a directory named like an image
    return False


def write_caption(world: World, path: Path, kind: str) -> bool:
    if kind == "plain":
        path.write_text("w0ut3r, photo of a man")
    elif kind == "multi-line":
        path.write_text("w0ut3r, first line\nsecond line, never read\r\nthird")
    elif kind == "blank":
        path.write_text("")
    elif kind == "not-utf8":
        path.write_bytes(b"w0ut3r, caf\xe9 \xff\xfe")
        return False
    elif kind == "huge":
        path.write_text("tag, " * (CAPTION_LIMIT // 4))
        return False
    elif kind == "link-in":
        path.symlink_to(world.spec_dir / "pool" / "good.txt")
    elif kind == "link-out":
        path.symlink_to(world.outside / "canary.txt")
        return False
    elif kind == "dangling":
        path.symlink_to(world.spec_dir / "pool" / "missing.txt")
    return True


def build_dataset(world: World, data: dict) -> tuple[dict, bool]:
    """The example's kohya folders and training spec; whether planning must refuse it."""
    img = world.spec_dir / "data" / "img"
    img.mkdir(parents=True)
    folder = img / data["folder"]
    folder.mkdir()
    bad = False
    name = data["folder"]
    number = name.split("_", 1)[0]
    if name in BAD_FOLDERS or not (number.isdigit() and 1 <= int(number) <= 10_000):
        world.bad.append(folder)
        bad = True
    for index, entry in enumerate(data["entries"]):
        suffix = {"jpg": ".jpg", "truncated-jpg": ".jpeg", "webp": ".webp", "bmp": ".BMP"}.get(entry.image, ".png")
        image = folder / f"{index:03d}{suffix}"
        if not write_image(world, image, entry):
            world.bad.append(image)
            bad = True
        caption = folder / f"{index:03d}.txt"
        if entry.caption != "none" and not write_caption(world, caption, entry.caption):
            world.bad.append(caption)
            bad = True
    if data["sub_link"] != "none":
        link = img / "2_linked-zz9 x"
        if data["sub_link"] == "in":
            (world.spec_dir / "pool-folder").mkdir()
            Image.new("RGB", (48, 40)).save(world.spec_dir / "pool-folder" / "a.png")
            link.symlink_to(world.spec_dir / "pool-folder")
        else:
            link.symlink_to(world.outside / "3_o x")
            world.bad.append(link)
            bad = True
    train = {"train_data_dir": "data/img", "resolution": 64, "train_batch_size": 2, "max_train_epochs": 1}
    if data["reg"] != "none":
        reg = world.spec_dir / "data" / "reg" / "1_man"
        reg.mkdir(parents=True)
        Image.new("RGB", (48, 40)).save(reg / "r.png")
        if data["reg"] == "link-out":  # a reg folder is guarded the same way
            (reg / "r.txt").symlink_to(world.outside / "canary.txt")
            world.bad.append(reg / "r.txt")
            bad = True
        train["reg_data_dir"] = "data/reg"
    return {"job": "hostile", "model": "base.safetensors", "train": train}, bad


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=_DATASET)
def test_hostile_datasets_are_refused_in_one_line_and_nothing_outside_is_read(data, tmp_path_factory, monkeypatch):
    world = make_world(tmp_path_factory)
    spec, bad = build_dataset(world, data)
    code, out, err = plan(world, spec, monkeypatch)
    event(f"exit {code}")
    assert_safe(world, code, out, err, bad)
    if not bad:
        assert "train images × repeats:" in out


def test_dataset_toml_paths_follow_the_same_policy(tmp_path_factory, monkeypatch):
    world = make_world(tmp_path_factory)
    good = world.spec_dir / "data" / "me"
    good.mkdir(parents=True)
    Image.new("RGB", (48, 40)).save(good / "a.png")
    cases = {
        "outside": (f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{world.outside / "3_o x"}"\n', True),
        "traversal": ('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "../outside/3_o x"\n', True),
        "zero-repeats": ('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "data/me"\nnum_repeats = 0\n', True),
        "huge-repeats": ('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "data/me"\nnum_repeats = 999999999\n', True),
        "string-repeats": ('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "data/me"\nnum_repeats = "9"\n', True),
        "huge-int": ('[[datasets]]\nbatch_size = ' + "9" * 5000 + '\n', True),
        "deep": ("x = " + "[" * 3000 + "]" * 3000 + "\n", True),
        "bad-resolution": ('[[datasets]]\nresolution = "big"\n[[datasets.subsets]]\nimage_dir = "data/me"\n', True),
        "not-a-table": ("datasets = 5\n", True),
        "only-reg": ('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "data/me"\nis_reg = true\n', True),
        "good": ('[[datasets]]\nresolution = [64, 64]\n[[datasets.subsets]]\nimage_dir = "data/me"\nnum_repeats = 3\n',
                 False),
    }
    spec = {"job": "hostile", "model": "base.safetensors",
            "train": {"dataset_config": "dataset.toml", "max_train_epochs": 1}}
    for text, bad in cases.values():
        (world.spec_dir / "dataset.toml").write_text(text)
        world.bad = [world.spec_dir / "dataset.toml"]
        code, out, err = plan(world, spec, monkeypatch)
        assert_safe(world, code, out, err, bad)
    (world.spec_dir / "dataset.toml").unlink()
    (world.spec_dir / "dataset.toml").write_bytes(b"[general]\nx = '\xff'\n")
    code, out, err = plan(world, spec, monkeypatch)
    assert_safe(world, code, out, err, True)
    assert "not UTF-8" in err
    (world.spec_dir / "dataset.toml").unlink()
    (world.spec_dir / "dataset.toml").symlink_to(world.outside / "canary.txt")
    world.bad = [world.spec_dir / "dataset.toml"]
    code, out, err = plan(world, spec, monkeypatch)
    assert_safe(world, code, out, err, True)


# --- styles CSVs and <lora:> tags ---------------------------------------------------------------

_STYLES = st.sampled_from(["good", "bom", "big-field", "not-utf8", "nul", "unclosed-quote", "no-name-column",
                           "link-out", "link-in", "fifo", "folder", "missing", "empty"])
_LORA_NAMES = st.sampled_from(["good", "nope", "../outside/secret", "/etc/passwd", "link-out", "x.ckpt", "a\0b",
                               "", ":", "..", "/", "good.safetensors"])
_WEIGHTS = st.sampled_from(["", "1", "0.5", "1.2.3", ".", "-.", "..", "-0", "2.5", "1e5", "0..1", "-1"])


def _csv_reads(path: Path) -> bool:
    import csv

    try:
        with open(path, newline="", encoding="utf-8") as handle:
            list(csv.DictReader(handle))
        return True
    except csv.Error:
        return False


def write_styles(world: World, kind: str) -> bool:
    """styles.csv of the kind; True when planning must accept it."""
    path = world.spec_dir / "styles.csv"
    header = "name,prompt,negative_prompt\n"
    if kind == "good":
        path.write_text(header + 'anime,"anime {prompt}",photo\n')
    elif kind == "bom":
        path.write_text(header + "anime,anime,\n", encoding="utf-8-sig")  # its name column is "\ufeffname"
        return False
    elif kind == "big-field":
        path.write_text(header + 'anime,"' + "x" * (140 << 10) + '",\n')
        return False
    elif kind == "not-utf8":
        path.write_bytes(header.encode() + b"anime,caf\xe9,\n")
        return False
    elif kind == "nul":
        path.write_bytes(header.encode() + b"anime,a\0b,\n")
        return _csv_reads(path)
    elif kind == "unclosed-quote":
        path.write_text(header + 'anime,"never closed\n')
        return _csv_reads(path)
    elif kind == "no-name-column":
        path.write_text("title,prompt\nanime,x\n")
        return False
    elif kind == "link-out":
        path.symlink_to(world.outside / "canary.csv")
        return False
    elif kind == "link-in":
        (world.spec_dir / "pool" / "styles.csv").write_text(header + "anime,anime,\n")
        path.symlink_to(world.spec_dir / "pool" / "styles.csv")
    elif kind == "fifo":
        os.mkfifo(path)
        return False
    elif kind == "folder":
        path.mkdir()
        return False
    elif kind == "missing":
        return False
    elif kind == "empty":
        path.write_text("")
    return True


@settings(max_examples=200, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(styles=st.one_of(st.just("good"), _STYLES), name=st.one_of(st.just("good"), _LORA_NAMES),
       weight=st.one_of(st.sampled_from(["", "0.5"]), _WEIGHTS), style_all=st.booleans())
def test_hostile_styles_and_lora_tags_are_one_line(styles, name, weight, style_all, tmp_path_factory, monkeypatch,
                                                     lora_dir, tiny_model):
    world = make_world(tmp_path_factory)
    (world.spec_dir / "good.safetensors").write_bytes((lora_dir / "subject-000001.safetensors").read_bytes())
    (world.spec_dir / "link-out.safetensors").symlink_to(world.outside / "secret.safetensors")
    styles_ok = write_styles(world, styles)
    tag = f"<lora:{name}{':' + weight if weight else ''}>"
    spec = {"job": "hostile", "model": "tiny:sdxl", "styles": "styles.csv",
            "defaults": {"prompt": f"photo of a man {tag}", "steps": 2, "width": 64, "height": 64},
            "axes": {"style": ["*"] if style_all else ["none"]}}
    try:
        strength = float(weight) if weight else 1.0
    except ValueError:
        strength = -1.0
    tag_ok = name in ("good", "good.safetensors") and 0 <= strength <= 2
    if not name and not weight:
        tag_ok = True  # `<lora:>` names nothing: not a tag, for A1111 either
    if styles == "empty" and style_all:
        tag_ok = True  # no style at all: no task, nothing to parse
    # the file is read only when a style is looked up; where its path leads is checked always
    styles_ok = styles_ok or (not style_all and styles != "link-out")
    if not styles_ok:
        world.bad = [world.spec_dir / "styles.csv"]
    code, out, err = plan(world, spec, monkeypatch)
    event(f"exit {code}")
    assert_safe(world, code, out, err, not (styles_ok and tag_ok))


# --- the cases, one by one --------------------------------------------------------------

def test_the_reported_cases(tmp_path_factory, monkeypatch):
    """Each case of the issue: exit 2, one line naming the file, no traceback, nothing outside read."""
    cases = {
        "caption-passwd": lambda f: (f / "000.txt").symlink_to("/etc/passwd"),
        "image-out": lambda f: (f / "001.png").symlink_to(f.parents[3] / "outside" / "secret.png"),
        "bomb": lambda f: (f / "001.png").write_bytes(png_header_only(30000, 30000)),
        "not-utf8": lambda f: (f / "000.txt").write_bytes(b"\xff\xfe\xfa"),
        "truncated-jpeg": lambda f: (f / "001.jpg").write_bytes(encoded("JPEG", size=(64, 64))[:300]),
        "five-mb-caption": lambda f: (f / "000.txt").write_text("tag, " * (1 << 20)),
    }
    for case, spoil in cases.items():
        world = make_world(tmp_path_factory)
        folder = world.spec_dir / "data" / "img" / "3_x y"
        folder.mkdir(parents=True)
        Image.new("RGB", (48, 40)).save(folder / "000.png")
        spoil(folder)
        spec = {"job": "hostile", "model": "base.safetensors",
                "train": {"train_data_dir": "data/img", "resolution": 64, "max_train_epochs": 1}}
        monkeypatch.delenv("SDFARM_MAX_CAPTION_BYTES", raising=False)
        from farm.cli import main

        path = world.spec_dir / "spec.yaml"
        path.write_text(yaml.safe_dump(spec))
        monkeypatch.setenv("SDFARM_ROOTS", str(world.spec_dir))
        stderr = io.StringIO()
        _OPENED.clear()
        _RECORDING[0] = True
        try:
            with redirect_stdout(io.StringIO()), redirect_stderr(stderr):
                code = main(["plan", str(path), "--out", str(world.root / "out")])
        finally:
            _RECORDING[0] = False
        err = stderr.getvalue()
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, (case, err)
        # refused before reading: nothing outside the roots opened (the link targets included)
        outside = [p for p in _OPENED if not Path(p).resolve().is_relative_to(world.spec_dir.resolve())
                   and (Path(p).resolve().is_relative_to(world.outside.resolve()) or p.startswith("/etc"))]
        assert not outside, (case, outside)
        assert any(Path(p).resolve().is_relative_to(world.spec_dir.resolve()) for p in _OPENED), case  # hook on
        named = str(folder / ("000.txt" if case in ("caption-passwd", "not-utf8", "five-mb-caption") else
                              "001.jpg" if case == "truncated-jpeg" else "001.png"))
        assert named in err, (case, err)
        assert "root:" not in err, err  # no /etc/passwd line


def _plan_in_subprocess(spec_path: Path, env: dict) -> tuple[int, int, float, str, str]:
    """`farm plan` in a fresh interpreter: (exit code, peak RSS in MB, seconds, stdout, stderr)."""
    # VmHWM is this process's own peak (ru_maxrss would keep the forking pytest's across exec)
    code = ("import sys, time\n"
            "from farm.cli import main\n"
            "start = time.monotonic()\n"
            "code = main(['plan', sys.argv[1], '--out', sys.argv[2]])\n"
            "seconds = time.monotonic() - start\n"
            "peak = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0].split()[1]\n"
            "print('RESULT', code, int(peak) // 1024, seconds)\n")
    done = subprocess.run([sys.executable, "-c", code, str(spec_path), str(spec_path.parent / "out")],
                          capture_output=True, text=True, timeout=120, env={**os.environ, **env})
    result = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert result, done.stderr
    _, exit_code, rss_mb, seconds = result[-1].split()
    return int(exit_code), int(rss_mb), float(seconds), done.stdout, done.stderr


def test_absurd_repeats_are_refused_fast_and_planned_by_arithmetic(tmp_path):
    data = tmp_path / "jobs" / "data" / "img" / "999999999_x y"
    data.mkdir(parents=True)
    for index in range(2):
        Image.new("RGB", (48, 40)).save(data / f"{index}.png")
    spec = tmp_path / "jobs" / "spec.yaml"
    spec.write_text(yaml.safe_dump({"job": "repeats", "model": "base.safetensors", "train": {
        "train_data_dir": "data/img", "resolution": 64, "max_train_epochs": 1}}))
    env = {"SDFARM_ROOTS": str(tmp_path / "jobs")}
    code, rss_mb, seconds, _, stderr = _plan_in_subprocess(spec, env)
    assert code == 2 and "999999999_x y: repeats must be a whole number from 1 to 10,000" in stderr, stderr
    assert stderr.count("\n") == 1 and rss_mb < MAX_PLAN_RSS_MB and seconds < 20, (rss_mb, seconds, stderr)
    # a farm that allows such counts plans them by arithmetic: 2 × 999,999,999 entries, in a few MB
    allowed = {**env, "SDFARM_MAX_REPEATS": "1000000000", "SDFARM_MAX_EPOCH_IMAGES": "10000000000"}
    code, rss_mb, seconds, stdout, stderr = _plan_in_subprocess(spec, allowed)
    assert code == 0 and "train images × repeats: 1999999998" in stdout, stderr
    assert rss_mb < MAX_PLAN_RSS_MB and seconds < 20, (rss_mb, seconds)


# --- the dataset module directly ----------------------------------------------------------------

def test_captions_are_read_as_sd_scripts_reads_them(tmp_path):
    folder = tmp_path / "img" / "2_w0ut3r man"
    folder.mkdir(parents=True)
    for name in ("a", "b", "c", "d"):
        Image.new("RGB", (48, 40)).save(folder / f"{name}.png")
    (folder / "a.txt").write_text("W0ut3r, Photo\nsecond line, never read\n")
    (folder / "b.txt").write_bytes(b"w0ut3r, smiling\r\nnext")
    (folder / "c.txt").write_text("\nonly a second line")  # empty first line: the folder's tokens
    data = Dataset(scan_subsets(tmp_path / "img", False), load_items(scan_subsets(tmp_path / "img", False)))
    captions = {Path(item.path).stem: item.caption for item in data.items}
    assert captions == {"a": "W0ut3r, Photo", "b": "w0ut3r, smiling", "c": "w0ut3r man", "d": "w0ut3r man"}
    assert data.tag_frequency() == {"2_w0ut3r man": {"w0ut3r": 2, "photo": 1, "smiling": 1, "w0ut3r man": 2}}
    (folder / "d.txt").write_bytes(b"caf\xe9")
    with pytest.raises(DatasetError, match=r"d.txt: caption is not UTF-8 text \(byte 3\)"):
        load_items(scan_subsets(tmp_path / "img", False))


def test_step_math_is_arithmetic_and_matches_the_expanded_epoch(tmp_path):
    """Bucket counts by arithmetic equal the expanded epoch's, for repeats and reg matching."""
    import random

    rng = random.Random(5)
    for trial in range(30):
        root = tmp_path / f"t{trial}"
        for kind, count in (("img", rng.randint(1, 3)), ("reg", rng.randint(0, 3))):
            for sub in range(count):
                folder = root / kind / f"{rng.randint(1, 7)}_{kind}{sub} x"
                folder.mkdir(parents=True, exist_ok=True)
                for index in range(rng.randint(1, 4)):
                    Image.new("RGB", rng.choice([(64, 64), (96, 64), (64, 128)])).save(folder / f"{index}.png")
        subsets = scan_subsets(root / "img", False)
        if (root / "reg").exists():
            subsets += scan_subsets(root / "reg", True)
        data = Dataset(subsets, load_items(subsets), Buckets(resolution=(64, 64), enable_bucket=True,
                                                             min_bucket_reso=64, max_bucket_reso=128),
                       rng.randint(1, 3))
        expanded = {reso: len(items) for reso, items in data.bucketed().items()}
        assert data.bucket_counts() == expanded
        assert step_math(data, max_train_epochs=1).batches_per_epoch == sum(
            -(-n // data.batch_size) for n in expanded.values())
