"""Sampler names as users type them in A1111 and ComfyUI → one `Sampler` record. No torch here
(specs validate sampler names without loading it); `farm.render.sampling` runs the record.

ComfyUI names a sampler plus a scheduler ("dpmpp_2m_sde" + "karras", often written
"dpmpp_2m_sde_karras"); A1111 a display name plus a schedule type ("DPM++ 2M SDE" + "Karras", or
before 1.9 "DPM++ 2M SDE Karras"). Both fold to one ComfyUI sampler key and one ComfyUI scheduler
name. Only algorithms the farm runs exactly as k-diffusion / ComfyUI do are accepted; anything
else (UniPC, DEIS, PLMS, DPM fast/adaptive, other schedules) is refused with a one-line message
rather than silently replaced by something close.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple, Optional

from farm.errors import SamplerError

SCHEDULES = ("normal", "karras", "exponential", "sgm_uniform", "simple", "ddim_uniform", "beta")


@dataclass(frozen=True)
class Sampler:
    """A resolved sampler: what the user typed, what runs, and how each tool names it."""

    name: str  # as typed
    key: str  # ComfyUI sampler name: "dpmpp_2m_sde"
    schedule: str = "normal"  # ComfyUI scheduler name
    a1111_name: Optional[str] = None  # A1111 ≥ 1.9 sampler label; None: A1111 runs another algorithm
    a1111_schedule: Optional[str] = None  # A1111's "Schedule type" as its infotext writes it; None: none matches
    discard_penultimate_sigma: bool = False  # ComfyUI drops the next-to-last sigma (dpm_2, dpm_2_ancestral)
    a1111_discard_penultimate_sigma: bool = False  # A1111 also does it for DPM++ 3M SDE

    def describe(self) -> str:
        """What ran, for the manifest: the ComfyUI sampler and scheduler, `dpmpp_2m_sde karras`."""
        return f"{self.key} {self.schedule}"

    def check_noise(self, noise: str) -> None:
        """An A1111 seed convention (`noise: a1111-*`) means "as A1111 renders it": only for a
        sampler and schedule A1111 runs. Checked at plan time, so no task fails for it later."""
        if not noise.startswith("a1111"):
            return
        if self.a1111_name is None:
            raise SamplerError(f"sampler {self.name!r} ({self.key}) has no A1111 equivalent; use noise: comfyui")
        if self.a1111_schedule is None:
            raise SamplerError(f"schedule {self.schedule!r} of {self.name!r} has no A1111 equivalent; "
                               "use noise: comfyui")


class _Kind(NamedTuple):
    a1111_name: Optional[str]
    a1111_automatic: Optional[str]  # the schedule A1111's "Automatic" picks for this sampler
    comfy_discard: bool = False
    a1111_discard: bool = False


# ComfyUI sampler key → how A1111 names it. A1111's own DDIM and LCM are other algorithms than
# ComfyUI's (ComfyUI's ddim is Euler; A1111's LCM has its own denoiser), hence None.
_KINDS: dict[str, _Kind] = {
    "euler": _Kind("Euler", "normal"),
    "euler_ancestral": _Kind("Euler a", "normal"),
    "heun": _Kind("Heun", "normal"),
    "dpm_2": _Kind("DPM2", "normal", True, True),
    "dpm_2_ancestral": _Kind("DPM2 a", "normal", True, True),
    "lms": _Kind("LMS", "normal"),
    "dpmpp_2s_ancestral": _Kind("DPM++ 2S a", "karras"),
    "dpmpp_sde": _Kind("DPM++ SDE", "karras"),
    "dpmpp_sde_gpu": _Kind("DPM++ SDE", "karras"),
    "dpmpp_2m": _Kind("DPM++ 2M", "karras"),
    "dpmpp_2m_sde": _Kind("DPM++ 2M SDE", "exponential"),
    "dpmpp_2m_sde_gpu": _Kind("DPM++ 2M SDE", "exponential"),
    "dpmpp_2m_sde_heun": _Kind("DPM++ 2M SDE Heun", "exponential"),
    "dpmpp_2m_sde_heun_gpu": _Kind("DPM++ 2M SDE Heun", "exponential"),
    "dpmpp_3m_sde": _Kind("DPM++ 3M SDE", "exponential", False, True),
    "dpmpp_3m_sde_gpu": _Kind("DPM++ 3M SDE", "exponential", False, True),
    "lcm": _Kind(None, None),
    "ddim": _Kind(None, None),
}

# Other folded spellings of the keys: A1111 display names and its `k_...` aliases.
_ALIASES = {
    "k_euler": "euler",
    "euler_a": "euler_ancestral", "k_euler_a": "euler_ancestral", "k_euler_ancestral": "euler_ancestral",
    "k_heun": "heun",
    "dpm2": "dpm_2", "k_dpm_2": "dpm_2",
    "dpm2_a": "dpm_2_ancestral", "dpm_2_a": "dpm_2_ancestral", "k_dpm_2_a": "dpm_2_ancestral",
    "k_lms": "lms",
    "dpmpp_2s_a": "dpmpp_2s_ancestral", "k_dpmpp_2s_a": "dpmpp_2s_ancestral",
    "k_dpmpp_sde": "dpmpp_sde",
    "k_dpmpp_2m": "dpmpp_2m",
    "k_dpmpp_2m_sde": "dpmpp_2m_sde",
    "k_dpmpp_2m_sde_heun": "dpmpp_2m_sde_heun",
    "k_dpmpp_3m_sde": "dpmpp_3m_sde",
}

# Folded schedule suffixes → ComfyUI scheduler. A1111's "Uniform" is the same schedule as
# "Normal" (both space the 1000 training timesteps evenly from 999 to 0); its "DDIM" label is
# ComfyUI's ddim_uniform; "ka" is the suffix of A1111's old `k_..._ka` aliases.
_SCHEDULE_SPELLINGS = {
    "normal": "normal", "uniform": "normal",
    "karras": "karras", "ka": "karras",
    "exponential": "exponential",
    "sgm_uniform": "sgm_uniform", "sgmuniform": "sgm_uniform",
    "simple": "simple",
    "ddim_uniform": "ddim_uniform", "ddim": "ddim_uniform",
    "beta": "beta",
    "automatic": "automatic",
}

# A1111's "Schedule type" label for each ComfyUI scheduler whose A1111 namesake computes the same
# sigmas. A1111's "Beta" interpolates in sigma, ComfyUI's picks training timesteps: no match.
_A1111_SCHEDULE_LABELS = {
    "normal": "Normal", "karras": "Karras", "exponential": "Exponential", "sgm_uniform": "SGM Uniform",
    "simple": "Simple", "ddim_uniform": "DDIM", "beta": None,
}

# Names we know but do not run, and why (one line each, shown to the user).
_REFUSED = {
    "uni_pc": "UniPC is ComfyUI's own solver, not a k-diffusion sampler the farm reproduces exactly",
    "uni_pc_bh2": "UniPC is ComfyUI's own solver, not a k-diffusion sampler the farm reproduces exactly",
    "unipc": "UniPC is not a k-diffusion sampler the farm reproduces exactly",
    "deis": "DEIS is not implemented exactly by the farm",
    "ipndm": "iPNDM is not implemented exactly by the farm",
    "ipndm_v": "iPNDM-v is not implemented exactly by the farm",
    "plms": "PLMS is a CompVis timestep sampler, not a k-diffusion one",
    "pndm": "PLMS is a CompVis timestep sampler, not a k-diffusion one",
    "dpm_fast": "DPM fast ignores the schedule (fixed steps between sigma_min and sigma_max)",
    "dpm_adaptive": "DPM adaptive ignores the schedule and the step count",
    "restart": "A1111's Restart sampler is not implemented by the farm",
    "ddpm": "ddpm is not implemented by the farm",
    "heunpp2": "heunpp2 is not implemented by the farm",
}
_REFUSED_SCHEDULES = {"polyexponential", "kl_optimal", "align_your_steps", "linear_quadratic"}


def fold(name: str) -> str:
    """'DPM++ 2M SDE Karras' → 'dpmpp_2m_sde_karras'; 'Euler a' → 'euler_a'."""
    key = name.strip().lower().replace("++", "pp")
    return re.sub(r"[^a-z0-9]+", "_", key).strip("_")


def _base(folded: str) -> Optional[str]:
    """The ComfyUI key for a folded sampler name without schedule, or None."""
    key = _ALIASES.get(folded, folded)
    return key if key in _KINDS else None


def _split(folded: str) -> tuple[str, Optional[str]]:
    """(sampler part, schedule spelling or None): the longest schedule suffix that leaves a sampler."""
    for spelling in sorted({*_SCHEDULE_SPELLINGS, *_REFUSED_SCHEDULES}, key=len, reverse=True):
        head = folded[: -len(spelling) - 1]
        if folded.endswith("_" + spelling) and (_base(head) or head in _REFUSED):
            return head, spelling
    return folded, None


def _refuse_unknown(name: str, folded: str) -> SamplerError:
    reason = _REFUSED.get(folded) or next((why for key, why in _REFUSED.items() if folded.startswith(key + "_")), None)
    if reason:
        return SamplerError(f"sampler {name!r} is not supported: {reason}; known: {', '.join(known_samplers())}")
    return SamplerError(f"unknown sampler {name!r}; known: {', '.join(known_samplers())}")


def _a1111_schedule(kind: _Kind, schedule: str) -> Optional[str]:
    """What A1111 writes under "Schedule type" for this sampler and schedule: "Automatic" when its
    per-sampler default is this very schedule and that default is the plain one, else the label."""
    if kind.a1111_name is None:
        return None
    if schedule == "normal" and kind.a1111_automatic == "normal":
        return "Automatic"
    return _A1111_SCHEDULE_LABELS[schedule]


def resolve_sampler(name: str) -> Sampler:
    """The Sampler for a user's name, or a SamplerError naming the bad name and the choices."""
    head, spelling = _split(fold(name))
    key = _base(head)
    if key is None:
        raise _refuse_unknown(name, head)
    if spelling in _REFUSED_SCHEDULES:
        raise SamplerError(f"schedule {spelling!r} in sampler {name!r} is not supported; "
                           f"supported: {', '.join(SCHEDULES)}")
    kind = _KINDS[key]
    schedule = _SCHEDULE_SPELLINGS[spelling] if spelling else "normal"
    if schedule == "automatic":  # A1111's per-sampler default
        if kind.a1111_automatic is None:
            raise SamplerError(f"sampler {name!r}: 'Automatic' is A1111's default schedule and {key} has no "
                               f"A1111 counterpart; pick one of {', '.join(SCHEDULES)}")
        schedule = kind.a1111_automatic
    return Sampler(name=name, key=key, schedule=schedule, a1111_name=kind.a1111_name,
                   a1111_schedule=_a1111_schedule(kind, schedule), discard_penultimate_sigma=kind.comfy_discard,
                   a1111_discard_penultimate_sigma=kind.a1111_discard)


def known_samplers() -> list[str]:
    """The accepted sampler names without schedule: ComfyUI keys, then A1111 display names."""
    a1111 = sorted({kind.a1111_name for kind in _KINDS.values() if kind.a1111_name})
    return sorted(_KINDS) + a1111
