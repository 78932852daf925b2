import pytest

from farm.errors import SamplerError
from farm.samplers import fold, known_samplers, resolve_sampler


@pytest.mark.parametrize("name, cls, options", [
    ("euler", "EulerDiscreteScheduler", {}),
    ("Euler a", "EulerAncestralDiscreteScheduler", {}),
    ("euler_ancestral", "EulerAncestralDiscreteScheduler", {}),
    ("dpmpp_2m", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    ("dpmpp_2m_karras", "DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    ("DPM++ 2M SDE Karras", "DPMSolverMultistepScheduler",
     {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}),
    ("dpmpp_2s_ancestral", "DPMSolverSinglestepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    ("DPM++ 2S a", "DPMSolverSinglestepScheduler", {}),
    ("ddim", "DDIMScheduler", {}),
    ("uni_pc", "UniPCMultistepScheduler", {}),
    ("UniPC", "UniPCMultistepScheduler", {}),
    ("lms", "LMSDiscreteScheduler", {}),
    ("LMS Karras", "LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    ("heun", "HeunDiscreteScheduler", {}),
    ("dpm2_a", "KDPM2AncestralDiscreteScheduler", {}),
    ("DPM2 a Karras", "KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": True}),
    ("euler sgm_uniform", "EulerDiscreteScheduler", {"timestep_spacing": "trailing"}),
])
def test_user_names_map_to_diffusers(name, cls, options):
    sampler = resolve_sampler(name)
    assert sampler.scheduler_class == cls
    assert options.items() <= dict(sampler.options).items()


def test_inexact_matches_say_so():
    assert resolve_sampler("dpmpp_2s_ancestral").exact is False
    assert resolve_sampler("euler_a").exact is True


def test_fold_spellings():
    assert fold("DPM++ 2M SDE Karras") == "dpmpp_2m_sde_karras"
    assert fold(" Euler a ") == "euler_a"


def test_unknown_and_unsupported_names():
    with pytest.raises(SamplerError, match="unknown sampler 'warp'"):
        resolve_sampler("warp")
    with pytest.raises(SamplerError, match="has no diffusers scheduler"):
        resolve_sampler("dpm_adaptive")


def test_every_known_name_builds_on_the_model_schedule_and_drops_solver_settings(tiny_model):
    from diffusers import DPMSolverMultistepScheduler

    base = dict(DPMSolverMultistepScheduler.load_config(tiny_model / "scheduler"))
    base.update(algorithm_type="sde-dpmsolver++", use_karras_sigmas=True)  # a checkpoint's own choice
    for name in known_samplers():
        scheduler = resolve_sampler(name).build(base)
        assert type(scheduler).__name__ == resolve_sampler(name).scheduler_class
        assert scheduler.config.beta_end == pytest.approx(0.012)
    euler = resolve_sampler("euler").build(base)
    assert not getattr(euler.config, "use_karras_sigmas", False)
