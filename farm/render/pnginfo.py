"""A1111's PNG-info `parameters` text: written into every PNG as A1111 ≥ 1.9 writes it, readable back.

The format A1111 (and what reads it: its PNG-info tab and "send to txt2img", civitai, batch
extractors) uses:

    <prompt, with its <lora:name:weight> tags>
    Negative prompt: <negative>
    Steps: 20, Sampler: DPM++ 2M SDE, Schedule type: Karras, CFG scale: 9, Seed: 1382869474, ...

Sampler and schedule are A1111's display names, `Model` is the checkpoint's name without its
extension and `Model hash` the first 10 hex digits of its sha256, `Lora hashes` the first 12 of
each LoRA's AddNet hash (what A1111 looks a LoRA up by). The farm adds `Noise`, `Prompt syntax`
and `Task`, which A1111 keeps as unknown keys. A value holding a comma, colon or newline is
written as a JSON string, as A1111 does.
"""

from __future__ import annotations

import json
import re

from farm.sweep.plan import Task, file_label
from farm.sweep.samplers import Sampler

# one `Key: value` of the settings line, as A1111's infotext parser reads it
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
# A1111 only treats a last line with at least this many settings as the settings line
_MIN_SETTINGS = 3
# what A1111 writes under `RNG` (it omits the key for its default, GPU)
_RNG = {"comfyui": "CPU", "a1111-cpu": "CPU", "a1111-gpu": None}


def _quote(value: str) -> str:
    if not any(c in value for c in ",:\n"):
        return value
    return json.dumps(value, ensure_ascii=False)


def _tag_name(name: str) -> str:
    """A LoRA name as A1111 writes it in `Lora hashes` (it drops the separators it splits on)."""
    return name.replace(":", "").replace(",", "")


def infotext_prompt(task: Task) -> str:
    """The prompt as A1111 takes it: the text the model saw plus a `<lora:name:weight>` tag per
    LoRA (A1111 removes the tags before encoding, so appending them changes nothing it encodes)."""
    tags = " ".join(f"<lora:{lora.name}:{lora.strength:g}>" for lora in task.loras)
    return " ".join(part for part in (task.prompt, tags) if part)


def parameters_text(task: Task, sampler: Sampler, farm_version: str) -> str:
    """The `parameters` chunk for one rendered task."""
    fields: dict[str, str | None] = {
        "Steps": str(task.steps),
        "Sampler": sampler.a1111_name,
        "Schedule type": sampler.a1111_schedule,
        "CFG scale": f"{task.cfg:g}",
        "Seed": str(task.seed),
        "Size": f"{task.width}x{task.height}",
        "Model hash": task.model_sha256[:10],
        "Model": file_label(task.model),
        "RNG": _RNG.get(task.noise),
        "Lora hashes": ", ".join(f"{_tag_name(lora.name)}: {lora.addnet_hash[:12]}" for lora in task.loras
                                 if lora.addnet_hash) or None,
        "Noise": task.noise,
        "Prompt syntax": task.prompt_syntax,
        "Task": task.task_id,
        "Version": f"sdfarm {farm_version}",
    }
    settings = ", ".join(f"{key}: {_quote(value)}" for key, value in fields.items() if value is not None)
    lines = [infotext_prompt(task)]
    if task.negative_prompt:
        lines.append(f"Negative prompt: {task.negative_prompt}")
    lines.append(settings)
    return "\n".join(lines)


def parse_parameters(text: str) -> dict[str, str]:
    """Read a `parameters` text back as A1111's infotext parser does: {"Prompt", "Negative
    prompt", "Steps", ...}; the last line is the settings line only when it holds at least three
    `Key: value` pairs, quoted values are unquoted."""
    lines = text.strip().split("\n")
    settings_line = lines.pop() if lines and len(_PARAM.findall(lines[-1])) >= _MIN_SETTINGS else ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    result = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in _PARAM.findall(settings_line):
        value = value.strip()
        if value.startswith('"') and value.endswith('"'):
            try:
                value = json.loads(value)
            except ValueError:
                pass
        result[key.strip()] = value
    return result


def read_png_parameters(path) -> str:
    """The `parameters` text of a PNG ("" when it has none)."""
    from PIL import Image

    with Image.open(path) as image:
        return str(image.info.get("parameters", ""))
