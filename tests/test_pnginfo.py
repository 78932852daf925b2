import hashlib
import json

from farm.sweep.plan import LoraUse, Task
from farm.render.pnginfo import parameters_text, parse_parameters, read_png_parameters
from farm.sweep.samplers import resolve_sampler


def make_task(**changes):
    fields = dict(task_id="abc123", job="j", model="models/sd_xl_base_1.0.safetensors", model_path="/m",
                  model_sha256="f31347de70" + "0" * 54, prompt="picture of (ohwx man:1.1), anime style",
                  negative_prompt="shirtless,topless", seed=1382869474, steps=20, cfg=9.0,
                  sampler="DPM++ 2M SDE Karras", width=1024, height=1024, noise="comfyui", prompt_syntax="a1111",
                  loras=(LoraUse("me-000030", "/l.safetensors", "4610bf5599" + "1" * 54, 0.8,
                                 "ab12cd34ef56" + "7" * 52),),
                  cells=((("lora", "e30"),),), order=0)
    fields.update(changes)
    return Task(**fields)


def test_round_trip_keeps_every_setting_as_a1111_names_it():
    task = make_task()
    params = parse_parameters(parameters_text(task, resolve_sampler(task.sampler), "0.1"))
    # A1111 keeps <lora:> tags in the prompt and finds the LoRA by the hash under `Lora hashes`
    assert params["Prompt"] == "picture of (ohwx man:1.1), anime style <lora:me-000030:0.8>"
    assert params["Negative prompt"] == task.negative_prompt
    assert params["Steps"] == "20" and params["CFG scale"] == "9"
    assert params["Sampler"] == "DPM++ 2M SDE" and params["Schedule type"] == "Karras"
    assert params["Seed"] == "1382869474" and params["Size"] == "1024x1024"
    assert params["Model hash"] == "f31347de70" and params["Model"] == "sd_xl_base_1.0"  # no extension
    assert params["Lora hashes"] == "me-000030: ab12cd34ef56"
    assert params["RNG"] == "CPU" and params["Noise"] == "comfyui" and params["Prompt syntax"] == "a1111"


def test_a1111_gpu_noise_writes_no_rng_key_as_a1111_does_for_its_default():
    params = parse_parameters(parameters_text(make_task(noise="a1111-gpu"), resolve_sampler("euler_a"), "0.1"))
    assert "RNG" not in params and params["Sampler"] == "Euler a"


def test_reads_a1111s_own_text():
    text = ("picture of (ohwx man:1.1) with shirt in anime style\nNegative prompt: shirtless,topless,nsfw\n"
            "Steps: 20, Sampler: DPM++ 2M SDE Karras, CFG scale: 9, Seed: 1382869474, Size: 1024x1024, "
            'Model hash: f31347de70, Model: me_15_noREG-000030, X Values: "a.safetensors [f3],b [46]", '
            "Version: v1.7.0-133-gde03882d")
    params = parse_parameters(text)
    assert params["Prompt"] == "picture of (ohwx man:1.1) with shirt in anime style"
    assert params["Negative prompt"] == "shirtless,topless,nsfw"
    assert params["X Values"] == "a.safetensors [f3],b [46]"
    assert params["Version"] == "v1.7.0-133-gde03882d"


def test_a_last_line_with_fewer_than_three_settings_is_prompt_as_in_a1111():
    params = parse_parameters("a cat\nSteps: 20, Seed: 1")
    assert params["Prompt"] == "a cat\nSteps: 20, Seed: 1" and "Steps" not in params


def test_no_negative_and_multiline_prompt():
    task = make_task(negative_prompt="", prompt="line one\nline two", loras=())
    params = parse_parameters(parameters_text(task, resolve_sampler("euler"), "0.1"))
    assert params["Prompt"] == "line one\nline two" and params["Negative prompt"] == ""
    assert "Lora hashes" not in params


def test_a_farm_png_gives_back_its_settings_and_the_loras_addnet_hash(renderer, tiny_model, lora_dir, tmp_path):
    """Render through the farm, read the PNG's parameters with A1111's parser semantics: every
    setting comes back, and `Lora hashes` is the AddNet hash of the LoRA file (sha256 of the bytes
    after the safetensors header), computed here from the file itself."""
    from farm.cli import main
    from farm.sweep.plan import plan_job
    from farm.sweep.spec import load_spec
    from tests.conftest import write_spec

    spec = write_spec(tmp_path, f"""
job: info
model: {tiny_model}
lora_dir: {lora_dir}
defaults: {{prompt: "photo of (a w0ut3r man:1.2) <lora:subject-000002:0.7>", negative: "blurry, text", steps: 3,
           cfg: 5, sampler: dpmpp_2m_karras, width: 64, height: 64, seed: 77, noise: a1111-cpu}}
""")
    task = plan_job(load_spec(str(spec)), spec.parent).tasks[0]
    result = renderer.render(task)
    assert result.status == "ok", result.error
    (tmp_path / "x.png").write_bytes(result.png)
    params = parse_parameters(read_png_parameters(tmp_path / "x.png"))
    data = (lora_dir / "subject-000002.safetensors").read_bytes()
    header = int.from_bytes(data[:8], "little")
    addnet = hashlib.sha256(data[8 + header:]).hexdigest()
    json.loads(data[8:8 + header])  # the header really is JSON: the offset is right
    assert params["Prompt"] == "photo of (a w0ut3r man:1.2) <lora:subject-000002:0.7>"
    assert params["Negative prompt"] == "blurry, text"
    assert (params["Steps"], params["Sampler"], params["Schedule type"]) == ("3", "DPM++ 2M", "Karras")
    assert (params["CFG scale"], params["Seed"], params["Size"]) == ("5", "77", "64x64")
    assert params["Model hash"] == task.model_sha256[:10] and params["RNG"] == "CPU"
    assert params["Lora hashes"] == f"subject-000002: {addnet[:12]}"
    assert main(["info", str(tmp_path / "x.png")]) == 0
