"""Sampler names as users type them in A1111 and ComfyUI → diffusers schedulers.

A1111 spells samplers as display names ("DPM++ 2M SDE Karras", "Euler a"), ComfyUI as a sampler
plus a scheduler ("dpmpp_2m_sde" + "karras", often written "dpmpp_2m_sde_karras"). Both are folded
to one key, then built with `from_config` on the model's own scheduler config so the noise
schedule (betas, offsets) stays the checkpoint's. Where diffusers has no exact equivalent the
closest one is used and `Sampler.exact` is False; the manifest records what actually ran.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .errors import SamplerError


@dataclass(frozen=True)
class Sampler:
    """A resolved sampler: the user's name, the diffusers class and the overrides it takes."""

    name: str
    scheduler_class: str
    options: tuple[tuple[str, object], ...] = field(default=())
    exact: bool = True

    def describe(self) -> str:
        """The scheduler as it ran, for the manifest: `DPMSolverMultistepScheduler(use_karras_sigmas=True)`."""
        args = ", ".join(f"{k}={v}" for k, v in self.options)
        return f"{self.scheduler_class}({args})"

    def build(self, base_config):
        """A fresh scheduler of this kind on the model's own noise schedule."""
        import diffusers

        cls = getattr(diffusers, self.scheduler_class)
        schedule = {k: v for k, v in dict(base_config).items() if k in _NOISE_SCHEDULE_KEYS}
        return cls.from_config(schedule, **dict(self.options))


# What a checkpoint's scheduler config says about its training noise schedule. Solver settings
# (algorithm_type, sigmas, ...) are left behind so a model shipped with a DPM++ config still
# gets a plain Euler when the user asks for Euler.
_NOISE_SCHEDULE_KEYS = {
    "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
    "prediction_type", "steps_offset", "timestep_spacing", "rescale_betas_zero_snr",
}


# key → (diffusers class, options, exact)
_BASE: dict[str, tuple[str, dict, bool]] = {
    "euler": ("EulerDiscreteScheduler", {}, True),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}, True),
    "heun": ("HeunDiscreteScheduler", {}, True),
    "dpm_2": ("KDPM2DiscreteScheduler", {}, True),
    "dpm_2_ancestral": ("KDPM2AncestralDiscreteScheduler", {}, True),
    "lms": ("LMSDiscreteScheduler", {}, True),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}, True),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}, True),
    "dpmpp_3m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}, True),
    # k-diffusion's DPM++ 2S ancestral has no diffusers twin; the second-order single-step SDE
    # solver is the closest (same solver family, stochastic, two model calls per step).
    "dpmpp_2s_ancestral": ("DPMSolverSinglestepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}, False),
    # DPM++ SDE (k-diffusion) needs torchsde in diffusers; the multistep SDE solver is the closest.
    "dpmpp_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}, False),
    "ddim": ("DDIMScheduler", {}, True),
    "plms": ("PNDMScheduler", {"skip_prk_steps": True}, True),
    "uni_pc": ("UniPCMultistepScheduler", {}, True),
    "uni_pc_bh2": ("UniPCMultistepScheduler", {"solver_type": "bh2"}, True),
    "deis": ("DEISMultistepScheduler", {}, True),
    "lcm": ("LCMScheduler", {}, True),
}

# Other spellings (after folding) of the keys above: A1111 display names and common shorthands.
_ALIASES = {
    "euler_a": "euler_ancestral",
    "k_euler": "euler",
    "k_euler_a": "euler_ancestral",
    "dpm2": "dpm_2",
    "dpm2_a": "dpm_2_ancestral",
    "dpm_2_a": "dpm_2_ancestral",
    "dpmpp_2s_a": "dpmpp_2s_ancestral",
    "unipc": "uni_pc",
    "pndm": "plms",
    "k_lms": "lms",
}

# ComfyUI scheduler / A1111 schedule-type suffixes → scheduler options.
_SCHEDULES = {
    "karras": {"use_karras_sigmas": True},
    "exponential": {"use_exponential_sigmas": True},
    "sgm_uniform": {"timestep_spacing": "trailing"},
    "normal": {},
}

# k-diffusion samplers that diffusers does not implement at all.
_UNSUPPORTED = {"dpm_fast", "dpm_adaptive"}


def fold(name: str) -> str:
    """'DPM++ 2M SDE Karras' → 'dpmpp_2m_sde_karras'; 'Euler a' → 'euler_a'."""
    key = name.strip().lower().replace("++", "pp")
    return re.sub(r"[^a-z0-9]+", "_", key).strip("_")


def resolve_sampler(name: str) -> Sampler:
    """The diffusers scheduler for a user's sampler name, or a SamplerError naming the choices."""
    key = fold(name)
    schedule: dict = {}
    for suffix, options in _SCHEDULES.items():
        if key.endswith("_" + suffix):
            key, schedule = key[: -len(suffix) - 1], options
            break
    key = _ALIASES.get(key, key)
    if key in _UNSUPPORTED:
        raise SamplerError(f"sampler {name!r} has no diffusers scheduler; pick another (see README)")
    if key not in _BASE:
        raise SamplerError(f"unknown sampler {name!r}; known: {', '.join(known_samplers())}")
    cls, options, exact = _BASE[key]
    merged = {**options, **schedule}
    return Sampler(name=name, scheduler_class=cls, options=tuple(sorted(merged.items())), exact=exact)


def known_samplers() -> list[str]:
    return sorted(_BASE) + sorted(_ALIASES)
