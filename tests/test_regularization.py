import pytest

from farm.cluster.dispatch import run_plan
from farm.train.regularization import generate_reg_sets, reg_prompts, strip_token
from farm.sweep.spec import RegSet, parse_spec
from farm.models.tiny import write_tiny_dataset


@pytest.mark.parametrize("caption, expected", [
    ("w0ut3r, photo of a man, half body shot, from front", "photo of a man, half body shot, from front"),
    ("photo of a w0ut3r man, 1 /4 headshot", "photo of a man, 1 /4 headshot"),
    ("w0ut3r man looking into the camera", "man looking into the camera"),
    ("photo of a man, w0ut3r", "photo of a man"),
    ("photo of a w0ut3rish man", "photo of a w0ut3rish man"),  # only the whole token
])
def test_strip_token(caption, expected):
    assert strip_token(caption, "w0ut3r") == expected


def test_prompts_come_from_captions_without_the_token(tmp_path):
    write_tiny_dataset(tmp_path, images=3, repeats=9)
    prompts, class_word = reg_prompts(RegSet(from_captions="img"), tmp_path)
    assert class_word == "man"
    assert prompts == ["photo of a man, from front", "photo of a man, from side", "photo of a man, looking away"]


def test_a_folder_naming_no_class_word_is_a_one_line_error(tmp_path):
    from farm.errors import DatasetError

    write_tiny_dataset(tmp_path, images=1, repeats=1)
    (tmp_path / "img" / "1_w0ut3r man").rename(tmp_path / "img" / "1_ ")
    with pytest.raises(DatasetError, match="names no class word; set class_word"):
        reg_prompts(RegSet(from_captions="img"), tmp_path)


def test_generated_sets_in_kohya_layout_and_reused(ray_cluster, tmp_path):
    write_tiny_dataset(tmp_path, images=2, repeats=3)
    job = parse_spec({"job": "r", "model": "tiny:sdxl",
                      "train": {"train_data_dir": "img", "reg_data_dir": "generated:detailed"},
                      "reg_sets": {"detailed": {"from_captions": "img", "count": 2, "steps": 2, "width": 64,
                                                "height": 64, "seed": 100}}})
    summaries = []

    def render(plan, folder):
        summaries.append(run_plan(plan, folder, quiet=True, actors=1))  # 4 images: one worker starts faster than two
        return summaries[-1]

    folders = generate_reg_sets(job, tmp_path, tmp_path / "out", render)
    class_dir = folders["detailed"] / "1_man"
    images = sorted(class_dir.glob("*.png"))
    assert len(images) == 4 and summaries[0].ok == 4
    captions = sorted(p.read_text() for p in class_dir.glob("*.txt"))
    assert captions == ["photo of a man, from front"] * 2 + ["photo of a man, from side"] * 2
    assert all("w0ut3r" not in c for c in captions)
    again = generate_reg_sets(job, tmp_path, tmp_path / "out", render)
    assert summaries[1].ok == 0 and summaries[1].skipped == 4  # cached by task id: nothing re-rendered
    assert sorted(p.read_bytes() for p in (again["detailed"] / "1_man").glob("*.png")) == \
        sorted(p.read_bytes() for p in images)
