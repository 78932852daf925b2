import shutil

import pytest

from farm.errors import SpecError
from farm.sweep.plan import AXIS_HANDLERS, plan_job
from farm.sweep.spec import Axes, parse_spec


def plan_of(data, folder, seeds=None):
    return plan_job(parse_spec(data, "job.yaml"), folder, "job.yaml", seeds)


def study(lora_dir, **extra):
    return {"job": "t", "model": "tiny:sdxl",
            "defaults": {"prompt": "photo of a w0ut3r man", "seed": 156680208700286, "width": 64, "height": 64},
            "axes": {"lora": ["none", "subject-000001", "subject-000002"], "prompt": ["a", "b"]}, **extra}


def test_product_and_ids_are_stable(lora_dir, tiny_model):
    first = plan_of(study(lora_dir), lora_dir)
    again = plan_of(study(lora_dir), lora_dir)
    assert len(first.tasks) == 6
    assert [t.task_id for t in first.tasks] == [t.task_id for t in again.tasks]
    assert len({t.task_id for t in first.tasks}) == 6


def test_id_changes_with_every_output_field(lora_dir, tiny_model):
    base = {t.task_id for t in plan_of(study(lora_dir), lora_dir).tasks}
    for key, value in [("seed", 1), ("steps", 3), ("cfg", 5.5), ("sampler", "ddim"), ("negative", "blurry"),
                       ("width", 72)]:
        data = study(lora_dir)
        data["defaults"] = {**data["defaults"], key: value}
        changed = {t.task_id for t in plan_of(data, lora_dir).tasks}
        assert not changed & base, key


def test_id_follows_lora_content_not_name(lora_dir, tiny_model, tmp_path):
    for name in ("subject-000001", "subject-000002"):
        shutil.copy(lora_dir / f"{name}.safetensors", tmp_path / f"{name}.safetensors")
    shutil.copy(lora_dir / "subject-000001.safetensors", tmp_path / "renamed.safetensors")
    original = plan_of(study(lora_dir), lora_dir)
    copied = plan_of(study(lora_dir), tmp_path)
    assert [t.task_id for t in original.tasks] == [t.task_id for t in copied.tasks]
    data = study(lora_dir)
    data["axes"]["lora"] = ["renamed"]
    renamed = {t.task_id for t in plan_of(data, tmp_path).tasks}
    assert renamed == {t.task_id for t in original.tasks if t.loras and t.loras[0].name == "subject-000001"}
    (tmp_path / "subject-000002.safetensors").write_bytes(
        (lora_dir / "subject-000003.safetensors").read_bytes())  # re-trained under the same name
    retrained = plan_of(study(lora_dir), tmp_path)
    assert {t.task_id for t in retrained.tasks} != {t.task_id for t in original.tasks}


def test_tasks_are_grouped_by_lora_in_spec_order(lora_dir, tiny_model):
    data = study(lora_dir)
    data["axes"] = {"prompt": ["a", "b", "c"], "lora": ["subject-000001", "none", "subject-000002"]}
    plan = plan_of(data, lora_dir)
    groups = [t.group for t in plan.tasks]
    assert len(plan.groups) == 3
    assert all(groups[i] == groups[i + 1] for i in (0, 1, 3, 4, 6, 7))  # three runs of three
    assert [t.loras[0].name if t.loras else "none" for t in plan.tasks[::3]] == [
        "subject-000001", "none", "subject-000002"]
    # within a group, grid order; the grid's axes keep the spec's label order
    assert [t.prompt for t in plan.tasks[:3]] == ["a", "b", "c"]
    assert all(plan.tasks[i].order < plan.tasks[i + 1].order for i in (0, 1, 3, 4, 6, 7))
    assert plan.axis_labels == {"": {"prompt": ["a", "b", "c"], "lora": ["subject-000001", "none", "subject-000002"]}}


def test_zip_advances_axes_together(lora_dir, tiny_model):
    data = study(lora_dir, zip=[["prompt", "seed"]])
    data["axes"] = {"prompt": ["a", "b", "c"], "seed": [1, 2, 3]}
    plan = plan_of(data, lora_dir)
    assert sorted((t.prompt, t.seed) for t in plan.tasks) == [("a", 1), ("b", 2), ("c", 3)]


def test_a1111_lora_tags_and_prompt_search_replace(lora_dir, tiny_model):
    data = study(lora_dir)
    data["defaults"]["prompt"] = "photo of a w0ut3r man <lora:subject-000001:0.1>"
    data["axes"] = {"replace": {"weight": [":0.1", ":0.5", ":1.0"],
                                "epoch": ["subject-000001", "subject-000002"]}}
    plan = plan_of(data, lora_dir)
    assert len(plan.tasks) == 6
    assert {t.prompt for t in plan.tasks} == {"photo of a w0ut3r man"}
    used = sorted((t.loras[0].name, t.loras[0].strength) for t in plan.tasks)
    assert used == [("subject-000001", 0.1), ("subject-000001", 0.5), ("subject-000001", 1.0),
                    ("subject-000002", 0.1), ("subject-000002", 0.5), ("subject-000002", 1.0)]
    cells = {dict(t.cells[0])["epoch"] for t in plan.tasks}
    assert cells == {"subject-000001", "subject-000002"}


def test_search_text_missing_from_prompt_is_an_error(lora_dir, tiny_model):
    data = study(lora_dir)
    data["axes"] = {"replace": {"medium": ["watercolor", "oil"]}}
    with pytest.raises(SpecError, match=r"job.yaml: axes.replace.medium: 'watercolor' is not in the prompt"):
        plan_of(data, lora_dir)


def test_cells_with_the_same_image_fold_into_one_task(lora_dir, tiny_model):
    data = study(lora_dir)
    data["axes"] = {"lora": ["none", "subject-000001"], "strength": [0.5, 1.0]}
    plan = plan_of(data, lora_dir)
    assert len(plan.tasks) == 3 and plan.folded == 1
    base = next(t for t in plan.tasks if not t.loras)
    assert sorted(dict(c)["strength"] for c in base.cells) == ["0.5", "1"]


def test_random_seed_is_fixed_once_and_reused(lora_dir, tiny_model):
    data = study(lora_dir)
    data["defaults"]["seed"] = -1
    first = plan_of(data, lora_dir)
    assert list(first.seeds) == ["defaults.seed"] and all(t.seed == first.seeds["defaults.seed"] for t in first.tasks)
    again = plan_of(data, lora_dir, seeds=first.seeds)
    assert [t.task_id for t in again.tasks] == [t.task_id for t in first.tasks]


def test_missing_and_unsafe_files_name_the_field(lora_dir, tiny_model, tmp_path):
    data = study(lora_dir)
    data["axes"] = {"lora": ["none", "nope"]}
    with pytest.raises(SpecError, match=r"job.yaml: axes.lora\[1\].file: .*nope.safetensors: LoRA file not found"):
        plan_of(data, lora_dir)
    (tmp_path / "evil.ckpt").write_bytes(b"\x80\x04pickle")
    data["axes"] = {"lora": ["evil.ckpt"]}
    with pytest.raises(SpecError, match=r"evil.ckpt: .ckpt files are Python pickles"):
        plan_of(data, tmp_path)
    data = study(lora_dir, model="no/such/model")
    data["axes"] = {}
    with pytest.raises(SpecError, match=r"job.yaml: model: .*model not found"):
        plan_of(data, lora_dir)


def test_styles_axis_from_an_a1111_csv(lora_dir, tiny_model, tmp_path):
    (tmp_path / "styles.csv").write_text(
        'name,prompt,negative_prompt\n'
        '"sai-anime","anime artwork {prompt} . anime style, key visual","photo, deformed"\n'
        'plain-suffix,"highly detailed",\n')
    data = study(lora_dir, styles="styles.csv")
    data["defaults"]["negative"] = "blurry"
    data["axes"] = {"style": ["none", "*"]}
    plan = plan_of(data, tmp_path)
    by_style = {dict(t.cells[0])["style"]: t for t in plan.tasks}
    assert list(by_style) == ["none", "sai-anime", "plain-suffix"]
    assert by_style["none"].prompt == "photo of a w0ut3r man"
    assert by_style["sai-anime"].prompt == "anime artwork photo of a w0ut3r man . anime style, key visual"
    assert by_style["sai-anime"].negative_prompt == "blurry, photo, deformed"
    assert by_style["plain-suffix"].prompt == "photo of a w0ut3r man, highly detailed"
    data["axes"] = {"style": ["nope"]}
    with pytest.raises(SpecError, match=r"axes.style\[0\]: no style 'nope' in styles.csv"):
        plan_of(data, tmp_path)


def test_sweeps_share_images_and_label_their_cells(lora_dir, tiny_model):
    data = study(lora_dir)
    data["defaults"]["lora"] = "subject-000001"
    data.pop("axes")
    data["sweeps"] = {"strength": {"axes": {"strength": [0.5, 1.0]}},
                      "prompts": {"defaults": {"steps": 7}, "axes": {"prompt": ["photo of a w0ut3r man", "a cat"]}}}
    plan = plan_of(data, lora_dir)
    # strength 1.0 with the default prompt is in both tables only if steps match: here they differ
    assert len(plan.tasks) == 4 and plan.folded == 0
    data["sweeps"]["prompts"]["defaults"] = {}
    plan = plan_of(data, lora_dir)
    assert len(plan.tasks) == 3 and plan.folded == 1
    shared = next(t for t in plan.tasks if len(t.cells) == 2)
    assert {dict(c)["sweep"] for c in shared.cells} == {"strength", "prompts"}
    assert set(plan.axis_labels) == {"strength", "prompts"}


def test_dotted_kohya_names_keep_their_dots(lora_dir, tiny_model, tmp_path):
    """The seed's files are `wouter_xl_1.0_v002-000001.safetensors`: `.0_v002…` is not a suffix."""
    shutil.copy(lora_dir / "subject-000001.safetensors", tmp_path / "wouter_xl_1.0_v002-000001.safetensors")
    data = study(lora_dir)
    data["axes"] = {"lora": ["none", "wouter_xl_1.0_v002-000001"]}
    plan = plan_of(data, tmp_path)
    assert {dict(t.cells[0])["lora"] for t in plan.tasks} == {"none", "wouter_xl_1.0_v002-000001"}
    data["defaults"]["prompt"] = "photo of a w0ut3r man <lora:wouter_xl_1.0_v002-000001:0.5>"
    data["axes"] = {"seed": [1]}
    tagged = plan_of(data, tmp_path).tasks[0]
    assert [(l.name, l.strength) for l in tagged.loras] == [("wouter_xl_1.0_v002-000001", 0.5)]


def test_every_axis_of_the_spec_has_a_handler():
    """Adding an axis to the spec is adding its handler to the plan; `replace` names its own axes."""
    assert set(AXIS_HANDLERS) == set(Axes.model_fields) - {"replace"}


def test_a_prompt_value_sets_only_its_own_cells(lora_dir, tiny_model):
    """Settings of an outer axis value are shared by the cells inside it, and never leak to the next value."""
    data = study(lora_dir)
    data["defaults"]["negative"] = "blurry"
    data["axes"] = {"prompt": [{"positive": "a", "negative": "ugly"}, "b"], "seed": [1, 2], "cfg": [5, 6.5]}
    plan = plan_of(data, lora_dir)
    assert [(t.prompt, t.negative_prompt, t.seed, t.cfg) for t in plan.tasks] == [
        ("a", "ugly", 1, 5.0), ("a", "ugly", 1, 6.5), ("a", "ugly", 2, 5.0), ("a", "ugly", 2, 6.5),
        ("b", "blurry", 1, 5.0), ("b", "blurry", 1, 6.5), ("b", "blurry", 2, 5.0), ("b", "blurry", 2, 6.5)]
    assert [dict(t.cells[0]) for t in plan.tasks[:2]] == [{"prompt": "a", "seed": "1", "cfg": "5"},
                                                          {"prompt": "a", "seed": "1", "cfg": "6.5"}]


def test_lora_tag_strength_is_checked_where_the_spec_cannot_see_it(lora_dir, tiny_model):
    """The spec checks the strengths it holds (axes, defaults); a `<lora:...>` tag's is checked at plan
    time, since `replace` values and styles make tags the spec never sees."""
    data = study(lora_dir)
    data["defaults"]["prompt"] = "photo of a w0ut3r man <lora:subject-000001:2.5>"
    data["axes"] = {}
    with pytest.raises(SpecError, match=r"^job.yaml: prompt: <lora:subject-000001:2.5>: strength must be "
                                        r"between 0 and 2$"):
        plan_of(data, lora_dir)
    data["defaults"]["prompt"] = "photo of a w0ut3r man <lora:subject-000001:1>"
    data["axes"] = {"replace": {"weight": [":1", ":2", ":3"]}}
    with pytest.raises(SpecError, match=r"prompt: <lora:subject-000001:3>: strength must be between 0 and 2"):
        plan_of(data, lora_dir)
    data["axes"]["replace"]["weight"] = [":1", ":0", ":2"]
    assert sorted(t.loras[0].strength for t in plan_of(data, lora_dir).tasks) == [0.0, 1.0, 2.0]
