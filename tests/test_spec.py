import pytest

from farm.errors import SpecError
from farm.spec import load_spec, parse_spec

BASE = {"job": "t", "model": "tiny:sdxl", "defaults": {"prompt": "photo of a man"}}


def error_of(data) -> str:
    with pytest.raises(SpecError) as info:
        parse_spec(data, "jobs/x.yaml")
    return str(info.value)


def test_minimal_spec_takes_defaults():
    job = parse_spec(BASE)
    assert job.defaults.steps == 20 and job.defaults.seed == -1 and job.axes.names() == []


def test_error_names_file_and_list_path():
    data = {**BASE, "axes": {"lora": ["none", "a.safetensors", {"file": "b.safetensors", "strength": 3}]}}
    assert error_of(data) == "jobs/x.yaml: axes.lora[2].strength: must be between 0 and 2"


def test_unknown_keys_are_rejected_at_every_level():
    assert error_of({**BASE, "modle": "x"}) == "jobs/x.yaml: modle: unknown key"
    assert error_of({**BASE, "defaults": {"prompt": "a", "stpes": 3}}) == "jobs/x.yaml: defaults.stpes: unknown key"
    data = {**BASE, "axes": {"prompt": ["a", {"positive": "b", "negativ": "c"}]}}
    assert error_of(data) == "jobs/x.yaml: axes.prompt[1].negativ: unknown key"


@pytest.mark.parametrize("data, expected", [
    ({**BASE, "axes": {"size": ["1024x1024", "big"]}}, "axes.size[1]: 'big' is not WIDTHxHEIGHT"),
    ({**BASE, "defaults": {"prompt": "a", "width": 1020}}, "defaults.width: must be a multiple of 8"),
    ({**BASE, "axes": {"sampler": ["euler", "dpm_fast"]}}, "axes.sampler[1]: sampler 'dpm_fast' has no diffusers"),
    ({**BASE, "axes": {"sampler": ["eulr"]}}, "axes.sampler[0]: unknown sampler 'eulr'"),
    ({**BASE, "axes": {"seed": [1, -2]}}, "axes.seed[1]: must be -1"),
    ({**BASE, "axes": {"strength": [0.5]}}, "axes.strength sets a LoRA's strength"),
    ({**BASE, "axes": {"seed": [1, 2], "cfg": [5]}, "zip": [["seed", "cfg"]]}, "same number of values"),
    ({**BASE, "zip": [["seed"]]}, "zip: 'seed' is not an axis"),
    ({**BASE, "axes": {"replace": {"seed": ["a", "b"]}}}, "'seed' is a built-in axis"),
    ({**BASE, "axes": {"replace": {"../x": ["a"]}}}, "axis names are a letter"),
    ({**BASE, "job": "../../etc"}, "job: must be letters"),
    ({"job": "t", "model": "m"}, "no prompt"),
    ({**BASE, "axes": {"prompt": []}}, "axis 'prompt' has no values"),
])
def test_bad_values_give_one_line_naming_the_field(data, expected):
    message = error_of(data)
    assert expected in message and message.startswith("jobs/x.yaml: ") and "\n" not in message


def test_short_forms_expand():
    job = parse_spec({**BASE, "axes": {
        "prompt": ["plain", {"positive": "p", "negative": "n", "label": "L"}],
        "lora": ["none", None, "x.safetensors"], "size": ["832x1216"]}})
    assert job.axes.prompt[0].positive == "plain" and job.axes.prompt[0].negative is None
    assert [c.file for c in job.axes.lora] == [None, None, "x.safetensors"]
    assert (job.axes.size[0].width, job.axes.size[0].height) == (832, 1216)


def test_axis_order_follows_the_spec():
    job = parse_spec({**BASE, "axes": {"seed": [1], "replace": {"epoch": ["a"]}, "prompt": ["a"]}})
    assert job.axes.names() == ["seed", "epoch", "prompt"]


def test_load_spec_reports_yaml_and_file_problems(tmp_path):
    with pytest.raises(SpecError, match=r"missing.yaml: cannot read"):
        load_spec(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("job: x\naxes: [unclosed\n")
    with pytest.raises(SpecError, match=r"bad.yaml: line \d+: not valid YAML"):
        load_spec(bad)
    hostile = tmp_path / "hostile.yaml"
    hostile.write_text("job: !!python/object/apply:os.system ['true']\nmodel: m\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(hostile)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(SpecError, match="a job spec is a mapping"):
        load_spec(listing)
