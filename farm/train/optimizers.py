"""kohya's `optimizer_type` and `optimizer_args` as a torch optimizer, and the name sd-scripts records.

The spec already refuses an unknown `optimizer_type`; `optimizer_args` are checked here, where
they are parsed (kohya's `key=value` strings, values read as JSON where they are JSON).
"""

from __future__ import annotations

import json

from farm.errors import SpecError, TrainError
from farm.sweep.spec import TrainOptions


def optimizer_kwargs(options: TrainOptions) -> dict:
    """The optimizer's keyword arguments. Adafactor is set to follow `learning_rate` and the
    lr_scheduler (transformers' defaults would compute their own relative step size instead)."""
    args = dict(_parse_optimizer_args(options.optimizer_args))
    if options.optimizer_type.lower() == "adafactor":
        args.setdefault("scale_parameter", False)
        args.setdefault("relative_step", False)
        args.setdefault("warmup_init", False)
    return args


def build_optimizer(options: TrainOptions, groups: list[dict]):
    """The optimizer over `groups` (torch param groups, each with its own `lr`)."""
    import torch

    args = optimizer_kwargs(options)
    kind = options.optimizer_type.lower()
    if kind == "adamw":
        return torch.optim.AdamW(groups, **args)
    if kind == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise TrainError("optimizer_type AdamW8bit needs the bitsandbytes package (and CUDA)") from None
        return bnb.optim.AdamW8bit(groups, **args)
    if kind == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(groups, **args)
    if kind == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise TrainError("optimizer_type Prodigy needs the prodigyopt package") from None
        return Prodigy(groups, **args)
    raise SpecError(f"optimizer_type {options.optimizer_type!r}: use AdamW, AdamW8bit, Adafactor or Prodigy")


def optimizer_description(optimizer, options: TrainOptions) -> str:
    """sd-scripts' `ss_optimizer`: the class's full name, its arguments in parentheses when any."""
    kind = type(optimizer)
    args = ",".join(f"{k}={v}" for k, v in optimizer_kwargs(options).items())
    return f"{kind.__module__}.{kind.__name__}" + (f"({args})" if args else "")


def _parse_optimizer_args(items: list[str]) -> list[tuple[str, object]]:
    """kohya's `--optimizer_args scale_parameter=False weight_decay=0.01` strings."""
    parsed = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SpecError(f"optimizer_args: {item!r} is not key=value")
        try:
            parsed.append((key.strip(), json.loads(value.strip().replace("True", "true").replace("False", "false"))))
        except ValueError:
            parsed.append((key.strip(), value.strip()))
    return parsed
