"""A1111's PNG-info `parameters` text: written into every PNG, readable back.

The format A1111 (and tools that read it: PNG-info tabs, civitai, batch extractors) uses:

    <prompt>
    Negative prompt: <negative>
    Steps: 20, Sampler: DPM++ 2M SDE Karras, CFG scale: 9, Seed: 1382869474, Size: 1024x1024, ...

Values holding a comma, colon or quote are written as JSON strings, as A1111 does.
"""

from __future__ import annotations

import json
import re

from .plan import Task

_PARAM = re.compile(r'\s*([\w ]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def _quote(value: str) -> str:
    return json.dumps(value) if any(c in value for c in ',:"\n') else value


def parameters_text(task: Task, scheduler: str, farm_version: str) -> str:
    """The `parameters` chunk for one rendered task."""
    fields = {
        "Steps": str(task.steps),
        "Sampler": task.sampler,
        "CFG scale": f"{task.cfg:g}",
        "Seed": str(task.seed),
        "Size": f"{task.width}x{task.height}",
        "Model hash": task.model_sha256[:10],
        "Model": task.model.split("/")[-1],
    }
    if task.loras:
        fields["Lora"] = ", ".join(f"{lora.name}:{lora.strength:g}" for lora in task.loras)
        fields["Lora hashes"] = ", ".join(f"{lora.name}: {lora.sha256[:12]}" for lora in task.loras)
    fields["Scheduler"] = scheduler
    fields["Task"] = task.task_id
    fields["Version"] = f"sdfarm {farm_version}"
    settings = ", ".join(f"{key}: {_quote(value)}" for key, value in fields.items())
    lines = [task.prompt]
    if task.negative_prompt:
        lines.append(f"Negative prompt: {task.negative_prompt}")
    lines.append(settings)
    return "\n".join(lines)


def parse_parameters(text: str) -> dict[str, str]:
    """Read a `parameters` text back into {"Prompt", "Negative prompt", "Steps", ...}."""
    lines = text.strip().split("\n")
    settings_line = lines.pop() if lines and _PARAM.match(lines[-1]) and "Steps:" in lines[-1] else ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    result = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in _PARAM.findall(settings_line):
        value = value.strip()
        result[key.strip()] = json.loads(value) if value.startswith('"') else value
    return result
