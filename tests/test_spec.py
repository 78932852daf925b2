import io
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from farm.errors import SpecError
from farm.sweep.spec import load_spec, parse_spec

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
    ({**BASE, "axes": {"sampler": ["euler", "dpm_fast"]}},
     "axes.sampler[1]: sampler 'dpm_fast' is not supported: DPM fast ignores the schedule"),
    ({**BASE, "axes": {"sampler": ["eulr"]}}, "axes.sampler[0]: unknown sampler 'eulr'"),
    ({**BASE, "axes": {"seed": [1, -2]}}, "axes.seed[1]: must be -1"),
    ({**BASE, "axes": {"strength": [0.5]}}, "axes.strength sets a LoRA's strength"),
    ({**BASE, "axes": {"lora": ["a"], "strength": [0.5, 2.5]}}, "axes.strength[1]: must be between 0 and 2"),
    ({**BASE, "defaults": {"prompt": "a", "lora": {"file": "a", "strength": -0.5}}},
     "defaults.lora.strength: must be between 0 and 2"),
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


# --- hostile input: whatever a spec holds, `farm` answers in one line, never a traceback -----

_KEYS = st.sampled_from(["job", "model", "defaults", "axes", "zip", "sweeps", "styles", "prompt", "negative",
                         "seed", "steps", "cfg", "sampler", "width", "height", "size", "lora", "strength", "file",
                         "label", "positive", "train", "variants", "evaluate", "reg_sets", "epochs", "run",
                         "__class__", "../x"]) | st.text(max_size=6)
_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10**30, 10**30), st.floats(), st.text(max_size=12),
                     st.sampled_from(["tiny:sdxl", "tiny:lora/w0ut3r-000001", "euler_a", "../../etc/passwd",
                                      "/etc/shadow", "x.ckpt", "-1", "1e400", "none", "*"]))
_VALUES = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_KEYS, inner, max_size=4),
                       max_leaves=24)
_SPECS = st.fixed_dictionaries(
    {"job": st.sampled_from(["fuzz", "../up", "a/b", "", "ok.1"]),
     "model": st.sampled_from(["tiny:sdxl", "x.ckpt", "../m"])},
    optional={"defaults": st.dictionaries(_KEYS, _VALUES, max_size=6),
              "axes": st.dictionaries(_KEYS, _VALUES, max_size=4),
              "zip": _VALUES, "sweeps": _VALUES, "train": _VALUES, "variants": _VALUES, "styles": _SCALARS})


def _farm_plan(path: Path, out: Path) -> tuple[int, str]:
    from farm.cli import main

    stderr = io.StringIO()
    with redirect_stdout(io.StringIO()), redirect_stderr(stderr):
        code = main(["plan", str(path), "--out", str(out)])
    return code, stderr.getvalue()


@settings(max_examples=1000, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large])
@given(spec=_SPECS)
def test_generated_specs_never_end_in_a_traceback(spec, tmp_path_factory, farm_cache):
    import yaml

    folder = tmp_path_factory.mktemp("fuzz", numbered=True)
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, allow_unicode=True))
    code, stderr = _farm_plan(path, folder / "out")  # any exception but FarmError fails the test
    assert code in (0, 2)
    if code == 2:
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"farm: error: {path}"), stderr


HOSTILE_YAML = {
    "python-object": "job: x\nmodel: !!python/object/apply:os.system ['touch {canary}']\n",
    "python-new": "job: !!python/object/new:os.system ['touch {canary}']\nmodel: tiny:sdxl\n",
    "python-name": "job: x\nmodel: !!python/name:os.system\n",
    "python-module": "job: x\nmodel: !!python/module:os\n",
    "huge-float": "job: x\nmodel: tiny:sdxl\ndefaults: {{prompt: a, steps: 1e400}}\n",
    "huge-int": "job: x\nmodel: tiny:sdxl\ndefaults: {{prompt: a, seed: 99999999999999999999999999999999999}}\n",
    "huge-side": "job: x\nmodel: tiny:sdxl\ndefaults: {{prompt: a, width: 100000000}}\n",
    "deep-nesting": "job: x\nmodel: tiny:sdxl\ndefaults: " + "[" * 5000 + "]" * 5000 + "\n",
    "deep-mapping": "job: x\nmodel: tiny:sdxl\naxes: " + "{{a: " * 3000 + "1" + "}}" * 3000 + "\n",
    "billion-laughs": "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
                      "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
                      "e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]\n"
                      "job: x\nmodel: tiny:sdxl\naxes: {{prompt: *f}}\n",
    "binary": "job: !!binary aGVsbG8=\nmodel: tiny:sdxl\n",
    "set": "job: x\nmodel: tiny:sdxl\naxes: !!set {{a, b}}\n",
    "unhashable-key": "? [a, b]\n: 1\njob: x\n",
    "not-a-mapping": "- job\n- model\n",
    "scalar": "42\n",
    "empty": "",
    "unclosed": "job: x\nmodel: {{tiny\n",
    "tab-indent": "job: x\n\tmodel: tiny:sdxl\n",
    "nul": "job: x\0\nmodel: tiny:sdxl\n",
    "merge-key": "base: &b {{prompt: a}}\njob: x\nmodel: tiny:sdxl\ndefaults: {{<<: *b, steps: -5}}\n",
    "too-many-tasks": "job: x\nmodel: tiny:sdxl\ndefaults: {{prompt: a}}\naxes: {{seed: [{seeds}], cfg: [{cfgs}]}}\n",
    "job-name-traversal": "job: ../../../tmp/x\nmodel: tiny:sdxl\ndefaults: {{prompt: a}}\n",
}


@pytest.mark.parametrize("case", sorted(HOSTILE_YAML))
def test_hostile_yaml_is_one_line_and_runs_nothing(case, tmp_path, farm_cache, monkeypatch):
    monkeypatch.setenv("SDFARM_MAX_TASKS", "1000")
    canary = tmp_path / "canary"
    text = HOSTILE_YAML[case].format(canary=canary, seeds=", ".join(map(str, range(100))),
                                     cfgs=", ".join(map(str, range(1, 21))))
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    code, stderr = _farm_plan(path, tmp_path / "out")
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"farm: error: {path}"), stderr
    assert not canary.exists()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.png"))


def test_non_utf8_and_oversized_specs_are_refused_in_one_line(tmp_path, farm_cache):
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"job: x\nmodel: \xff\xfe\n")
    huge = tmp_path / "huge.yaml"
    huge.write_text("job: x\n# " + "x" * (5 << 20) + "\n")
    for path, message in ((binary, "not UTF-8"), (huge, "a job spec is at most")):
        code, stderr = _farm_plan(path, tmp_path / "out")
        assert code == 2 and message in stderr and stderr.count("\n") == 1, stderr


def test_limits_come_from_the_farm_not_the_spec(tmp_path, farm_cache, monkeypatch):
    from farm.sweep.spec import parse_spec

    spec = {"job": "x", "model": "tiny:sdxl", "defaults": {"prompt": "a", "steps": 300, "width": 2048, "height": 2048}}
    parse_spec(spec)
    monkeypatch.setenv("SDFARM_MAX_STEPS", "150")
    with pytest.raises(SpecError, match="defaults.steps: must be between 1 and 150"):
        parse_spec(spec)
    monkeypatch.setenv("SDFARM_MAX_SIDE", "1024")
    with pytest.raises(SpecError, match="SDFARM_MAX_SIDE"):
        parse_spec({**spec, "defaults": {"prompt": "a", "width": 2048}})
