import os
from pathlib import Path

import pytest
from PIL import Image

from farm.train.dataset import Buckets, Dataset, load_dataset_toml, load_items, scan_subsets, step_math
from farm.errors import DatasetError


def make_folder(folder: Path, count: int, size=(64, 64), captions: dict | None = None) -> Path:
    """`count` images (hard links to one PNG: only the header matters for step math)."""
    folder.mkdir(parents=True, exist_ok=True)
    first = folder / "000.png"
    Image.new("RGB", size, (90, 120, 150)).save(first)
    for i in range(1, count):
        os.link(first, folder / f"{i:03d}.png")
    for name, text in (captions or {}).items():
        (folder / name).write_text(text)
    return folder


def dataset(root: Path, batch: int, buckets=Buckets()) -> Dataset:
    subsets = scan_subsets(root / "img", False)
    if (root / "reg").exists():
        subsets += scan_subsets(root / "reg", True)
    return Dataset(subsets, load_items(subsets), buckets, batch)


def test_kohya_folder_names_and_caption_fallback(tmp_path):
    make_folder(tmp_path / "img" / "9_w0ut3r man", 3, captions={"000.txt": "w0ut3r, photo of a man, smiling"})
    make_folder(tmp_path / "reg" / "1_man", 2)
    data = dataset(tmp_path, 1)
    instance, reg = data.subsets
    assert (instance.num_repeats, instance.class_tokens, instance.is_reg) == (9, "w0ut3r man", False)
    assert (reg.num_repeats, reg.class_tokens, reg.is_reg) == (1, "man", True)
    captions = sorted(item.caption for item in data.instances)
    assert captions == ["w0ut3r man", "w0ut3r man", "w0ut3r, photo of a man, smiling"]
    assert {item.caption for item in data.regs} == {"man"}
    assert data.tag_frequency()["9_w0ut3r man"]["w0ut3r"] == 1


def test_bad_folder_name_is_a_clear_error(tmp_path):
    make_folder(tmp_path / "img" / "w0ut3r man", 1)
    with pytest.raises(DatasetError, match=r"w0ut3r man: kohya folders are named '<repeats>_<token> <class>'"):
        scan_subsets(tmp_path / "img", False)
    with pytest.raises(DatasetError, match="image folder not found"):
        scan_subsets(tmp_path / "nope", False)


def test_seed_v002_step_math(tmp_path):
    """47 images × 9 repeats, generated reg images in 1_man, batch 4, --max_train_steps 2115."""
    make_folder(tmp_path / "img" / "9_w0ut3r man", 47)
    make_folder(tmp_path / "reg" / "1_man", 500)
    buckets = Buckets(resolution=(1024, 1024), enable_bucket=True, bucket_reso_steps=64, bucket_no_upscale=True)
    math = step_math(dataset(tmp_path, 4, buckets), max_train_steps=2115)
    assert (math.num_train_images, math.num_reg_images) == (423, 500)
    assert math.batches_per_epoch == 212  # (423 instance + 423 reg) / 4, rounded up
    assert (math.max_train_steps, math.epochs) == (2115, 10)
    assert math.gui_estimate == "423 / 4 / 1 * 10 * 2 = 2115"
    by_epochs = step_math(dataset(tmp_path, 4, buckets), max_train_epochs=10)
    assert by_epochs.max_train_steps == 2120  # epochs win over steps, as in sd-scripts


def test_second_seed_150_repeats_step_math(tmp_path):
    """15 images, 150 repeats, real reg photos, batch 1, one epoch; and without reg, 150 epochs."""
    make_folder(tmp_path / "img" / "150_ohwx man", 15)
    make_folder(tmp_path / "reg" / "1_man", 2300)
    with_reg = step_math(dataset(tmp_path, 1), max_train_epochs=1)
    assert with_reg.steps_per_epoch == 15 * 150 * 2 == 4500
    plain = tmp_path / "plain"
    make_folder(plain / "img" / "1_ohwx man", 15)
    no_reg = step_math(dataset(plain, 1), max_train_epochs=150)
    assert (no_reg.steps_per_epoch, no_reg.max_train_steps) == (15, 2250)


def test_fewer_reg_images_repeat_to_match(tmp_path):
    make_folder(tmp_path / "img" / "3_x man", 5)
    make_folder(tmp_path / "reg" / "1_man", 4)
    data = dataset(tmp_path, 1)
    entries = data.epoch_entries()
    assert len(entries) == 30 and sum(1 for e in entries if e.subset.is_reg) == 15


def test_buckets_follow_sd_scripts():
    buckets = Buckets(resolution=(1024, 1024), enable_bucket=True)
    resos = buckets.resolutions()
    assert (1024, 1024) in resos and (768, 1024) in resos and all(w * h <= 1024 * 1024 for w, h in resos)
    assert buckets.bucket_for(1024, 1024) == (1024, 1024)
    assert buckets.bucket_for(600, 900) == (704, 1024)
    no_upscale = Buckets(resolution=(1024, 1024), enable_bucket=True, bucket_no_upscale=True)
    assert no_upscale.bucket_for(600, 900) == (576, 896)  # never upscaled, cut to the step
    width, height = no_upscale.bucket_for(3000, 2000)
    assert width * height <= 1024 * 1024 and width % 64 == 0 and height % 64 == 0
    assert Buckets(resolution=(512, 512)).bucket_for(300, 900) == (512, 512)  # bucketing off


def test_mixed_buckets_round_up_per_bucket(tmp_path):
    make_folder(tmp_path / "img" / "1_a man" , 3, size=(1024, 1024))
    make_folder(tmp_path / "img" / "1_b man", 3, size=(768, 1024))
    data = dataset(tmp_path, 2, Buckets(resolution=(1024, 1024), enable_bucket=True))
    assert data.batches_per_epoch() == 4  # ceil(3/2) + ceil(3/2), not ceil(6/2)


def test_epoch_order_is_deterministic(tmp_path):
    make_folder(tmp_path / "img" / "2_x man", 6)
    data = dataset(tmp_path, 2)
    first = [[i.path for i in b] for b in data.epoch_batches(seed=1, epoch=1)]
    assert first == [[i.path for i in b] for b in data.epoch_batches(seed=1, epoch=1)]
    assert first != [[i.path for i in b] for b in data.epoch_batches(seed=1, epoch=2)]


def test_dataset_toml(tmp_path):
    make_folder(tmp_path / "data" / "me", 4, captions={"000.caption": "ohwx man, smiling"})
    make_folder(tmp_path / "data" / "men", 6)
    (tmp_path / "dataset.toml").write_text(
        '[general]\nenable_bucket = true\nbucket_no_upscale = true\n'
        '[[datasets]]\nresolution = 1024\nbatch_size = 2\n'
        '[[datasets.subsets]]\nimage_dir = "data/me"\nnum_repeats = 10\nclass_tokens = "ohwx man"\n'
        '[[datasets.subsets]]\nimage_dir = "data/men"\nis_reg = true\nclass_tokens = "man"\n')
    subsets, settings = load_dataset_toml(tmp_path / "dataset.toml")
    assert [(s.num_repeats, s.class_tokens, s.is_reg) for s in subsets] == [(10, "ohwx man", False), (1, "man", True)]
    assert settings == {"enable_bucket": True, "bucket_no_upscale": True, "resolution": (1024, 1024), "batch_size": 2}
    items = load_items(subsets)
    assert "ohwx man, smiling" in {i.caption for i in items}  # kohya's TOML default extension: .caption
    (tmp_path / "bad.toml").write_text('[[datasets]]\nflip_aug = true\n')
    with pytest.raises(DatasetError, match=r"bad.toml: datasets.flip_aug: not supported"):
        load_dataset_toml(tmp_path / "bad.toml")
