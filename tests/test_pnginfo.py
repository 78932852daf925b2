from farm.plan import LoraUse, Task
from farm.pnginfo import parameters_text, parse_parameters


def make_task(**changes):
    fields = dict(task_id="abc123", job="j", model="models/sd_xl_base_1.0.safetensors", model_path="/m",
                  model_sha256="f31347de70" + "0" * 54, prompt="picture of (ohwx man:1.1), anime style",
                  negative_prompt="shirtless,topless", seed=1382869474, steps=20, cfg=9.0,
                  sampler="DPM++ 2M SDE Karras", width=1024, height=1024,
                  loras=(LoraUse("me-000030", "/l.safetensors", "4610bf5599" + "1" * 54, 0.8),),
                  cells=((("lora", "e30"),),), order=0)
    fields.update(changes)
    return Task(**fields)


def test_round_trip_keeps_every_setting():
    task = make_task()
    params = parse_parameters(parameters_text(task, "DPMSolverMultistepScheduler(use_karras_sigmas=True)", "0.1"))
    assert params["Prompt"] == task.prompt
    assert params["Negative prompt"] == task.negative_prompt
    assert params["Steps"] == "20" and params["Sampler"] == "DPM++ 2M SDE Karras" and params["CFG scale"] == "9"
    assert params["Seed"] == "1382869474" and params["Size"] == "1024x1024"
    assert params["Model hash"] == "f31347de70" and params["Model"] == "sd_xl_base_1.0.safetensors"
    assert params["Lora"] == "me-000030:0.8"
    assert params["Scheduler"] == "DPMSolverMultistepScheduler(use_karras_sigmas=True)"


def test_reads_a1111s_own_text():
    text = ("picture of (ohwx man:1.1) with shirt in anime style\nNegative prompt: shirtless,topless,nsfw\n"
            "Steps: 20, Sampler: DPM++ 2M SDE Karras, CFG scale: 9, Seed: 1382869474, Size: 1024x1024, "
            'Model hash: f31347de70, Model: me_15_noREG-000030, X Values: "a.safetensors [f3],b [46]", '
            "Version: v1.7.0-133-gde03882d")
    params = parse_parameters(text)
    assert params["Negative prompt"] == "shirtless,topless,nsfw"
    assert params["X Values"] == "a.safetensors [f3],b [46]"
    assert params["Version"] == "v1.7.0-133-gde03882d"


def test_no_negative_and_multiline_prompt():
    task = make_task(negative_prompt="", prompt="line one\nline two", loras=())
    params = parse_parameters(parameters_text(task, "EulerDiscreteScheduler()", "0.1"))
    assert params["Prompt"] == "line one\nline two" and params["Negative prompt"] == ""
    assert "Lora" not in params
