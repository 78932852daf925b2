import dataclasses
import re
import subprocess
import sys

import pytest

from farm.errors import SamplerError
from farm.sweep.samplers import SCHEDULES, Sampler, fold, known_samplers, resolve_sampler


@pytest.mark.parametrize("name, key, schedule, a1111_name, a1111_schedule", [
    ("euler", "euler", "normal", "Euler", "Automatic"),
    ("Euler a", "euler_ancestral", "normal", "Euler a", "Automatic"),
    ("euler_ancestral_karras", "euler_ancestral", "karras", "Euler a", "Karras"),
    ("k_euler_a", "euler_ancestral", "normal", "Euler a", "Automatic"),
    ("heun_simple", "heun", "simple", "Heun", "Simple"),
    ("DPM2", "dpm_2", "normal", "DPM2", "Automatic"),
    ("DPM2 a", "dpm_2_ancestral", "normal", "DPM2 a", "Automatic"),
    ("DPM2 a Karras", "dpm_2_ancestral", "karras", "DPM2 a", "Karras"),
    ("LMS Karras", "lms", "karras", "LMS", "Karras"),
    ("DPM++ 2S a", "dpmpp_2s_ancestral", "normal", "DPM++ 2S a", "Normal"),
    ("dpmpp_2s_ancestral", "dpmpp_2s_ancestral", "normal", "DPM++ 2S a", "Normal"),
    ("DPM++ SDE Karras", "dpmpp_sde", "karras", "DPM++ SDE", "Karras"),
    ("dpmpp_sde_gpu_exponential", "dpmpp_sde_gpu", "exponential", "DPM++ SDE", "Exponential"),
    ("DPM++ 2M", "dpmpp_2m", "normal", "DPM++ 2M", "Normal"),
    ("dpmpp_2m_karras", "dpmpp_2m", "karras", "DPM++ 2M", "Karras"),
    ("k_dpmpp_2m_ka", "dpmpp_2m", "karras", "DPM++ 2M", "Karras"),
    ("DPM++ 2M SDE Karras", "dpmpp_2m_sde", "karras", "DPM++ 2M SDE", "Karras"),
    ("dpmpp_2m_sde_heun_karras", "dpmpp_2m_sde_heun", "karras", "DPM++ 2M SDE Heun", "Karras"),
    ("DPM++ 3M SDE", "dpmpp_3m_sde", "normal", "DPM++ 3M SDE", "Normal"),
    ("euler sgm_uniform", "euler", "sgm_uniform", "Euler", "SGM Uniform"),
    ("Euler SGM Uniform", "euler", "sgm_uniform", "Euler", "SGM Uniform"),
    ("Euler DDIM", "euler", "ddim_uniform", "Euler", "DDIM"),
    ("Euler a Uniform", "euler_ancestral", "normal", "Euler a", "Automatic"),
    ("euler_normal", "euler", "normal", "Euler", "Automatic"),
    ("DPM++ 2M Automatic", "dpmpp_2m", "karras", "DPM++ 2M", "Karras"),
    ("DPM++ 2M SDE Automatic", "dpmpp_2m_sde", "exponential", "DPM++ 2M SDE", "Exponential"),
    ("euler_beta", "euler", "beta", "Euler", None),  # A1111's "Beta" is another schedule
    ("ddim", "ddim", "normal", None, None),  # ComfyUI's ddim is Euler; A1111's DDIM is not
    ("ddim_ddim_uniform", "ddim", "ddim_uniform", None, None),
    ("lcm", "lcm", "normal", None, None),  # A1111's LCM has its own denoiser
    ("lcm_sgm_uniform", "lcm", "sgm_uniform", None, None),
])
def test_user_names_resolve_to_comfyui_keys_and_a1111_labels(name, key, schedule, a1111_name, a1111_schedule):
    sampler = resolve_sampler(name)
    assert (sampler.name, sampler.key, sampler.schedule) == (name, key, schedule)
    assert (sampler.a1111_name, sampler.a1111_schedule) == (a1111_name, a1111_schedule)


def test_describe_is_comfyui_sampler_and_scheduler():
    assert resolve_sampler("DPM++ 2M SDE Karras").describe() == "dpmpp_2m_sde karras"
    assert resolve_sampler("Euler a").describe() == "euler_ancestral normal"


def test_discard_penultimate_sigma_as_each_tool_does():
    for name in ("dpm_2", "DPM2 a Karras"):
        sampler = resolve_sampler(name)
        assert sampler.discard_penultimate_sigma and sampler.a1111_discard_penultimate_sigma
    three_m = resolve_sampler("dpmpp_3m_sde")  # A1111 discards for DPM++ 3M SDE, ComfyUI does not
    assert not three_m.discard_penultimate_sigma and three_m.a1111_discard_penultimate_sigma
    assert not resolve_sampler("euler").discard_penultimate_sigma


def test_sampler_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        resolve_sampler("euler").key = "heun"
    assert isinstance(resolve_sampler("euler"), Sampler)


def test_fold_spellings():
    assert fold("DPM++ 2M SDE Karras") == "dpmpp_2m_sde_karras"
    assert fold(" Euler a ") == "euler_a"
    assert fold("Euler SGM Uniform") == "euler_sgm_uniform"


@pytest.mark.parametrize("name", ["uni_pc", "uni_pc_bh2", "UniPC", "deis", "plms", "PLMS", "dpm_fast",
                                  "DPM adaptive", "dpm_adaptive", "Restart", "uni_pc_karras", "ipndm"])
def test_samplers_we_cannot_run_exactly_are_refused(name):
    expected = re.escape(f"sampler '{name}' is not supported: ") + ".+; known: .*euler"
    with pytest.raises(SamplerError, match=expected) as info:
        resolve_sampler(name)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name, schedule", [("euler_kl_optimal", "kl_optimal"), ("DPM++ 2M Polyexponential",
                                                                                  "polyexponential"),
                                            ("dpmpp_2m_linear_quadratic", "linear_quadratic")])
def test_schedules_we_cannot_run_exactly_are_refused(name, schedule):
    with pytest.raises(SamplerError, match=re.escape(f"schedule '{schedule}' in sampler '{name}' is not supported; "
                                                     "supported: normal, karras")):
        resolve_sampler(name)


def test_unknown_names_and_automatic_without_a1111_counterpart():
    with pytest.raises(SamplerError, match=r"unknown sampler 'warp'; known: .*dpmpp_2m.*DPM\+\+ 2M"):
        resolve_sampler("warp")
    with pytest.raises(SamplerError, match="unknown sampler 'euler_cfg_pp'"):
        resolve_sampler("euler_cfg_pp")
    with pytest.raises(SamplerError, match="'Automatic' is A1111's default"):
        resolve_sampler("lcm automatic")


def test_every_known_name_and_schedule_resolves_and_a1111_names_round_trip():
    for name in known_samplers():
        for schedule in SCHEDULES:
            sampler = resolve_sampler(f"{name} {schedule}")
            assert sampler.schedule == schedule
            if sampler.a1111_name:
                again = resolve_sampler(f"{sampler.a1111_name} {sampler.a1111_schedule or ''}".strip())
                assert again.a1111_name == sampler.a1111_name
                if sampler.a1111_schedule not in (None, "Automatic"):
                    assert again.schedule == schedule


def test_sampler_names_are_checked_without_torch():
    """Specs validate sampler names; that must not import torch."""
    code = ("import sys, farm.sweep.samplers as s; s.resolve_sampler('DPM++ 2M Karras'); "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def _readme_sampler_rows() -> list[tuple[list[str], str]]:
    """(names users type, what runs) for each row of the README's Samplers table."""
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = text[text.index("| you type (ComfyUI / A1111) |"):].split("\n\n")[0].splitlines()[2:]
    rows = []
    for line in table:
        typed, runs = line.split("|")[1:3]
        rows.append((re.findall(r"`([^`]+)`", typed), runs))
    return rows


def test_the_readme_sampler_table_is_what_runs():
    rows = _readme_sampler_rows()
    assert len(rows) >= 14
    refused = [names for names, runs in rows if "refused" in runs]
    assert len(refused) == 1
    for names, runs in rows:
        for name in names:
            if name.endswith("…"):
                continue
            if "refused" in runs:
                spelled = name if name in ("kl_optimal", "polyexponential", "align_your_steps") else None
                with pytest.raises(SamplerError, match="is not supported"):
                    resolve_sampler(f"euler_{spelled}" if spelled else name)
                continue
            key = resolve_sampler(name).key
            if "as above" in runs:  # the GPU-noise variants of the SDE samplers
                assert key == fold(name) and key.endswith("_gpu")
            elif key in ("ddim", "lcm"):  # ComfyUI's own, no k-diffusion function of that name
                assert "ComfyUI's" in runs
            else:
                assert "sample_" + key.removesuffix("_heun") in runs, (name, key, runs)
