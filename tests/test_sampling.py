"""farm.render.sampling against the `k-diffusion` package (tests/kdiffusion_ref.py) and against ComfyUI's
and A1111's formulas written out independently here. Tiny fp32 CPU tensors throughout."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch

from farm.render import sampling as S
from farm.errors import ModelError, SamplerError
from farm.sweep.samplers import SCHEDULES, _KINDS, resolve_sampler
from tests.kdiffusion_ref import external as KE, sampling as K

SHAPE = (1, 4, 8, 8)
STEPS = 5
TOLERANCE = 1e-5
SDXL = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


# --- fixtures and independent references --------------------------------------------------------


def toy_eps():
    """A small fixed conv "UNet": deterministic, nonlinear, uses the timestep, and mostly predicts
    its input as noise (as a trained model does at high sigma), so latents stay O(1) and a
    rounding difference is not blown up by meaningless 50-sized values."""
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(4, 4, 3, 3, generator=g) * 0.3, torch.randn(4, generator=g) * 0.1

    def eps(x_in, t):
        h = torch.nn.functional.conv2d(x_in, weight, bias, padding=1)
        return 0.9 * x_in + 0.1 * torch.tanh(h) + 0.02 * torch.sin(t / 100.0).view(-1, 1, 1, 1)

    return eps


@pytest.fixture(scope="module")
def table():
    return S.model_sigmas(SDXL)


@pytest.fixture(scope="module")
def denoiser(table):
    return S.Denoiser(toy_eps(), table, quantize_timesteps=True)


class Replay:
    """A noise sampler handing out fixed draws in call order, whatever the sigmas: the same noise
    for two implementations even where they query at differently rounded sigmas."""

    def __init__(self, seed=7):
        self.g, self.calls = torch.Generator().manual_seed(seed), 0

    def __call__(self, sigma, sigma_next):
        self.calls += 1
        return torch.randn(SHAPE, generator=self.g)


def comfy_lcm(model, x, sigmas, noise_sampler):
    """ComfyUI's sample_lcm (not in the k-diffusion package): jump to denoised, re-noise."""
    for i in range(len(sigmas) - 1):
        x = model(x, sigmas[i] * torch.ones(1))
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * sigmas[i + 1]
    return x


def comfy_lms(model, x, sigmas):
    """ComfyUI's LMS: the package's steps, except that the step into 0 returns the denoised latent."""
    x = K.sample_lms(model, x, sigmas[:-1], disable=True)
    return model(x, sigmas[-2] * torch.ones(1))


PACKAGE = {
    "euler": K.sample_euler, "ddim": K.sample_euler, "euler_ancestral": K.sample_euler_ancestral,
    "heun": K.sample_heun, "dpm_2": K.sample_dpm_2, "dpm_2_ancestral": K.sample_dpm_2_ancestral,
    "lms": K.sample_lms, "dpmpp_2s_ancestral": K.sample_dpmpp_2s_ancestral, "dpmpp_sde": K.sample_dpmpp_sde,
    "dpmpp_sde_gpu": K.sample_dpmpp_sde, "dpmpp_2m": K.sample_dpmpp_2m, "dpmpp_2m_sde": K.sample_dpmpp_2m_sde,
    "dpmpp_2m_sde_gpu": K.sample_dpmpp_2m_sde,
    "dpmpp_2m_sde_heun": partial(K.sample_dpmpp_2m_sde, solver_type="heun"),
    "dpmpp_2m_sde_heun_gpu": partial(K.sample_dpmpp_2m_sde, solver_type="heun"),
    "dpmpp_3m_sde": K.sample_dpmpp_3m_sde, "dpmpp_3m_sde_gpu": K.sample_dpmpp_3m_sde,
}


def reference(key, model, x, sigmas, noise_sampler, comfy):
    """The package's sampler for a key (ComfyUI's own formula where the package has none or
    where ComfyUI deviates visibly)."""
    if key == "lcm":
        return comfy_lcm(model, x, sigmas, noise_sampler)
    if key == "lms" and comfy:
        return comfy_lms(model, x, sigmas)
    kwargs = {"noise_sampler": noise_sampler} if S.ALGORITHMS[key].noise else {}
    return PACKAGE[key](model, x, sigmas, disable=True, **kwargs)


def start(sigmas, seed=3):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)) * sigmas[0]


# --- every sampler × every schedule equals the package ------------------------------------------


def test_the_algorithm_table_covers_exactly_the_accepted_samplers():
    assert set(S.ALGORITHMS) == set(_KINDS)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("key", sorted(S.ALGORITHMS))
@pytest.mark.parametrize("comfy", [False, True], ids=["k-diffusion", "comfyui"])
def test_each_sampler_and_schedule_equals_the_package(key, schedule, comfy, table, denoiser):
    algorithm = S.ALGORITHMS[key]
    discard = _KINDS[key].comfy_discard
    sigmas = S.schedule_sigmas(schedule, STEPS, table, discard_penultimate=discard)
    ours = algorithm.function(denoiser, start(sigmas), sigmas, Replay(), comfy=comfy, **dict(algorithm.options))
    theirs = reference(key, denoiser, start(sigmas), sigmas, Replay(), comfy)
    diff = (ours - theirs).abs().max().item()
    assert diff <= TOLERANCE, f"{key} {schedule}: max abs diff {diff:.3g}"
    if not comfy and key != "lcm":  # same floating-point operations in the same order
        assert diff == 0.0, f"{key} {schedule}: {diff:.3g}"


@pytest.mark.parametrize("key", ["dpmpp_sde", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde"])
def test_sde_samplers_with_brownian_noise_equal_the_package(key, table, denoiser):
    """Same Brownian tree seed on both sides: the package's own BrownianTreeNoiseSampler."""
    algorithm = S.ALGORITHMS[key]
    sigmas = S.schedule_sigmas("karras", STEPS, table)
    x = start(sigmas)
    mine = S.BrownianNoise(x, sigmas[sigmas > 0].min(), sigmas.max(), 1234, on_cpu=True)
    package = K.BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(), seed=1234)
    for comfy in (False, True):
        ours = algorithm.function(denoiser, x, sigmas, mine, comfy=comfy, **dict(algorithm.options))
        theirs = PACKAGE[key](denoiser, x, sigmas, disable=True, noise_sampler=package)
        assert (ours - theirs).abs().max().item() <= TOLERANCE


def test_brownian_noise_equals_the_packages_batched_tree(table):
    """ComfyUI's one tree for the batch and A1111's per-image list give the package's numbers."""
    x = torch.zeros(SHAPE)
    low, high = torch.tensor(0.03), torch.tensor(14.6)
    for seeds, package_seed in ((99, 99), ([99], [99])):
        ours = S.BrownianNoise(x, low, high, seeds, on_cpu=True)
        theirs = K.BrownianTreeNoiseSampler(x, low, high, seed=package_seed)
        for a, b in ((torch.tensor(14.6), torch.tensor(7.0)), (torch.tensor(7.0), torch.tensor(0.5))):
            assert torch.equal(ours(a, b), theirs(a, b))


def test_lms_differs_visibly_between_comfyui_and_k_diffusion(table, denoiser):
    sigmas = S.schedule_sigmas("normal", 4, table)
    comfy = S.lms(denoiser, start(sigmas), sigmas, comfy=True)
    package = S.lms(denoiser, start(sigmas), sigmas, comfy=False)
    assert (comfy - package).abs().max().item() > 1e-4


# --- schedules -----------------------------------------------------------------------------------


def comfy_sigma_table(config):
    """ComfyUI's ModelSamplingDiscrete, written out: float64 betas → sigmas, kept as float32
    sigmas and float32 log-sigmas of the float64 values."""
    betas = torch.linspace(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
    return sigmas.float(), sigmas.log().float()


def comfy_normal(config, steps):
    """ComfyUI's normal_scheduler: timesteps linspace(999, 0, steps), log-sigma interpolation."""
    sigmas, log_sigmas = comfy_sigma_table(config)
    out = []
    for t in torch.linspace(999, 0, steps):
        low, high, w = int(t.floor()), int(t.ceil()), t.frac()
        out.append(float(((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()))
    return torch.tensor(out + [0.0])


def test_model_sigmas_are_comfyuis_table():
    sigmas = S.model_sigmas(SDXL)
    expected, _ = comfy_sigma_table(SDXL)
    assert sigmas.dtype == torch.float32 and sigmas.shape == (1000,)
    assert torch.equal(sigmas, expected)
    assert sigmas[0].item() == pytest.approx(0.0291675, abs=1e-6) and sigmas[-1].item() == pytest.approx(14.614642)


def test_model_sigmas_linear_betas_and_refusals():
    linear = S.model_sigmas({**SDXL, "beta_schedule": "linear"})
    betas = torch.linspace(0.00085, 0.012, 1000, dtype=torch.float64)
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    assert torch.equal(linear, (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).float())
    with pytest.raises(ModelError, match="v_prediction"):
        S.model_sigmas({**SDXL, "prediction_type": "v_prediction"})
    with pytest.raises(ModelError, match="squaredcos"):
        S.model_sigmas({**SDXL, "beta_schedule": "squaredcos_cap_v2"})


@pytest.mark.parametrize("steps", [1, 4, 20, 37])
def test_normal_schedule_is_comfyuis_formula_starting_at_t999(table, steps):
    ours = S.schedule_sigmas("normal", steps, table)
    assert torch.equal(ours, comfy_normal(SDXL, steps))
    # exp(float32 log σ_max) is σ_max up to one float32 step: ComfyUI starts there too
    assert ours[0].item() == pytest.approx(table[-1].item(), rel=2e-7) and ours[-1].item() == 0.0
    assert len(ours) == steps + 1


def test_a1111_normal_schedule_is_k_diffusions_discrete_schedule(table):
    """A1111 computes its table in float32 from float32 alphas_cumprod (CompVisDenoiser): 1 − ᾱ
    cancels in float32, so its smallest sigmas differ from ComfyUI's by ~1e-5 (relative)."""
    alphas_cumprod = table.alphas_cumprod.float()
    schedule = KE.DiscreteSchedule(((1 - alphas_cumprod) / alphas_cumprod) ** 0.5, quantize=False)
    ours = S.schedule_sigmas("normal", 12, table, noise="a1111-cpu")
    assert torch.allclose(ours, schedule.get_sigmas(12), rtol=1e-6, atol=0)
    comfy = S.schedule_sigmas("normal", 12, table)
    assert torch.allclose(ours, comfy, rtol=1e-4, atol=0) and ours[-2] != comfy[-2]


@pytest.mark.parametrize("steps", [1, 3, 10, 30])
def test_karras_and_exponential_equal_the_package(table, steps):
    low, high = float(table[0]), float(table[-1])
    assert torch.equal(S.schedule_sigmas("karras", steps, table), K.get_sigmas_karras(steps, low, high))
    assert torch.equal(S.schedule_sigmas("exponential", steps, table), K.get_sigmas_exponential(steps, low, high))


def test_simple_ddim_uniform_sgm_uniform_and_beta_follow_comfyui(table):
    sigmas, _ = comfy_sigma_table(SDXL)
    simple = S.schedule_sigmas("simple", 4, table)
    assert simple.tolist() == [sigmas[-1].item(), sigmas[-251].item(), sigmas[-501].item(), sigmas[-751].item(), 0.0]
    ddim = S.schedule_sigmas("ddim_uniform", 4, table)
    assert ddim.tolist() == [sigmas[751].item(), sigmas[501].item(), sigmas[251].item(), sigmas[1].item(), 0.0]
    assert len(S.schedule_sigmas("ddim_uniform", 7, table)) == 9  # 1000 // 7 = 142: eight indices
    sgm = S.schedule_sigmas("sgm_uniform", 4, table)
    normal5 = comfy_normal(SDXL, 5)
    assert torch.equal(sgm[:-1], normal5[:4]) and sgm[-1] == 0
    beta = S.schedule_sigmas("beta", 6, table)
    import scipy.stats
    idx = np.rint(scipy.stats.beta.ppf(1 - np.linspace(0, 1, 6, endpoint=False), 0.6, 0.6) * 999)
    assert beta.tolist() == [sigmas[int(i)].item() for i in idx] + [0.0]
    assert beta[0].item() == sigmas[-1].item()


def test_discard_penultimate_sigma_runs_one_more_step_and_drops_the_next_to_last(table):
    plain = S.schedule_sigmas("karras", 5, table)
    discarded = S.schedule_sigmas("karras", 5, table, discard_penultimate=True)
    six = S.schedule_sigmas("karras", 6, table)
    assert len(discarded) == len(plain) and torch.equal(discarded, torch.cat([six[:-2], six[-1:]]))


# --- the model wrapper and the noise -------------------------------------------------------------


def test_denoiser_scales_input_and_rounds_timesteps_as_comfyui(table):
    seen = {}

    def eps(x_in, t):
        seen["x_in"], seen["t"] = x_in, t
        return torch.ones_like(x_in)

    x = torch.full(SHAPE, 2.0)
    sigma = torch.tensor([3.3])
    denoised = S.Denoiser(eps, table, quantize_timesteps=True)(x, sigma)
    _, log_sigmas = comfy_sigma_table(SDXL)
    index = (sigma.log() - log_sigmas[:, None]).abs().argmin(dim=0)
    assert seen["t"].dtype == torch.float32 and seen["t"].tolist() == [float(index)]
    assert torch.equal(seen["x_in"], x / (sigma.view(-1, 1, 1, 1) ** 2 + 1.0) ** 0.5)
    assert torch.equal(denoised, x - torch.ones_like(x) * sigma.view(-1, 1, 1, 1))


def test_denoiser_interpolates_timesteps_as_k_diffusion_for_a1111(table):
    seen = {}

    def eps(x_in, t):
        seen["x_in"], seen["t"] = x_in, t
        return torch.zeros_like(x_in)

    alphas_cumprod = table.alphas_cumprod.float()
    schedule = KE.DiscreteSchedule(((1 - alphas_cumprod) / alphas_cumprod) ** 0.5, quantize=False)
    sigma = torch.tensor([3.3])
    S.Denoiser(eps, table, quantize_timesteps=False, noise="a1111-cpu")(torch.ones(SHAPE), sigma)
    assert torch.equal(seen["t"], schedule.sigma_to_t(sigma))
    assert seen["t"].item() != round(seen["t"].item())


def test_default_initial_noise_is_comfyuis_cpu_draw_scaled_by_sqrt_1_plus_sigma0_squared(table):
    sigmas = S.schedule_sigmas("normal", 8, table)
    plain = S.initial_noise(42, SHAPE)
    draw = torch.randn(SHAPE, generator=torch.Generator("cpu").manual_seed(42))
    assert torch.equal(plain, draw)
    scaled = S.initial_noise(42, SHAPE, sigma0=sigmas[0], sigma_max=float(table[-1]))
    assert torch.equal(scaled, draw * torch.sqrt(1.0 + sigmas[0] ** 2.0))
    lower = S.initial_noise(42, SHAPE, sigma0=torch.tensor(3.0), sigma_max=float(table[-1]))
    assert torch.equal(lower, draw * torch.tensor(3.0))


def test_a1111_noise_is_one_generator_per_image_continuing_for_ancestral_noise():
    draws = S._Draws(42, (2, 4, 8, 8), "a1111-cpu", "cpu")
    g0, g1 = torch.Generator().manual_seed(42), torch.Generator().manual_seed(43)

    def both() -> torch.Tensor:
        return torch.stack([torch.randn(4, 8, 8, generator=g0), torch.randn(4, 8, 8, generator=g1)])

    assert torch.equal(draws.first(), both())
    assert torch.equal(draws.next(), both())
    assert torch.equal(S.initial_noise(5, SHAPE, "a1111-gpu", "cpu"), S.initial_noise(5, SHAPE, "a1111-cpu", "cpu"))


def test_comfyui_ancestral_noise_comes_from_a_cpu_generator_seeded_with_seed_plus_one():
    draws = S._Draws(42, SHAPE, "comfyui", "cpu")
    draws.first()
    g = torch.Generator().manual_seed(43)
    assert torch.equal(draws.next(), torch.randn(SHAPE, generator=g))
    assert torch.equal(draws.next(), torch.randn(SHAPE, generator=g))


# --- whole runs ----------------------------------------------------------------------------------


def comfy_denoiser(eps_fn):
    """ComfyUI's EPS model wrapper, written out: x / sqrt(σ² + 1), nearest training index."""
    _, log_sigmas = comfy_sigma_table(SDXL)

    def model(x, sigma):
        t = (sigma.log() - log_sigmas[:, None]).abs().argmin(dim=0).float()
        s = sigma.view(-1, 1, 1, 1)
        return x - eps_fn(x / (s ** 2 + 1.0) ** 0.5, t) * s

    return model


@pytest.mark.parametrize("name", ["euler_ancestral", "dpmpp_2m_sde_karras", "dpm_2_ancestral_karras", "lms"])
def test_sample_is_comfyuis_ksampler(name, table):
    """sample() against ComfyUI's pipeline assembled from the package: CPU noise scaled by
    sqrt(1 + σ0²), quantized timesteps, ancestral noise from seed + 1, Brownian tree from seed."""
    sampler, seed, eps = resolve_sampler(name), 1001, toy_eps()
    ours = S.sample(sampler, eps, SHAPE, seed, 6, model_sigmas=table)
    steps = 7 if sampler.discard_penultimate_sigma else 6
    sigmas = S.schedule_sigmas(sampler.schedule, steps, table)
    if sampler.discard_penultimate_sigma:
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    x = torch.randn(SHAPE, generator=torch.Generator("cpu").manual_seed(seed)) * torch.sqrt(1.0 + sigmas[0] ** 2.0)
    model = comfy_denoiser(eps)
    generator = torch.Generator("cpu").manual_seed(seed + 1)
    if sampler.key == "lms":
        theirs = comfy_lms(model, x, sigmas)
    elif sampler.key == "dpmpp_2m_sde":
        noise = K.BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(), seed=seed)
        theirs = K.sample_dpmpp_2m_sde(model, x, sigmas, disable=True, noise_sampler=noise)
    else:
        theirs = PACKAGE[sampler.key](model, x, sigmas, disable=True,
                                      noise_sampler=lambda a, b: torch.randn(SHAPE, generator=generator))
    assert (ours - theirs).abs().max().item() <= TOLERANCE


class FakeCompVis(torch.nn.Module):
    """What A1111 hands k-diffusion's CompVisDenoiser: float32 alphas_cumprod and apply_model."""

    def __init__(self, alphas_cumprod, eps_fn):
        super().__init__()
        self.alphas_cumprod, self.eps_fn = alphas_cumprod, eps_fn

    def apply_model(self, x, t, **kwargs):
        return self.eps_fn(x, t)


@pytest.mark.parametrize("name", ["Euler a", "DPM++ 2M SDE Karras", "DPM2 a", "DPM++ 3M SDE Exponential", "LMS"])
def test_sample_is_a1111s_pipeline(name, table):
    """sample(noise='a1111-cpu') against A1111's: k-diffusion's CompVisDenoiser on float32
    alphas_cumprod (interpolated timesteps), x = noise·σ0, ancestral noise = the same CPU
    generator's next draws, Brownian tree seeded with [seed], the package's samplers."""
    sampler, seed, eps = resolve_sampler(name), 77, toy_eps()
    ours = S.sample(sampler, eps, SHAPE, seed, 6, noise="a1111-cpu", model_sigmas=table)
    model = KE.CompVisDenoiser(FakeCompVis(table.alphas_cumprod.float(), eps), quantize=False)
    steps = 7 if sampler.a1111_discard_penultimate_sigma else 6
    if sampler.a1111_schedule == "Automatic":
        sigmas = model.get_sigmas(steps)
    else:
        low, high = model.sigmas[0].item(), model.sigmas[-1].item()
        build = {"Karras": K.get_sigmas_karras, "Exponential": K.get_sigmas_exponential}[sampler.a1111_schedule]
        sigmas = build(steps, low, high)
    if sampler.a1111_discard_penultimate_sigma:
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    generator = torch.Generator("cpu").manual_seed(seed)
    x = torch.randn(SHAPE[1:], generator=generator)[None] * sigmas[0]
    kwargs = {}
    if S.ALGORITHMS[sampler.key].noise == "ancestral":
        kwargs["noise_sampler"] = lambda a, b: torch.randn(SHAPE[1:], generator=generator)[None]
    elif S.ALGORITHMS[sampler.key].noise == "brownian":
        kwargs["noise_sampler"] = K.BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(), seed=[seed])
    theirs = PACKAGE[sampler.key](model, x, sigmas, disable=True, **kwargs)
    assert torch.equal(ours, theirs), (ours - theirs).abs().max().item()


@pytest.mark.parametrize("name", ["dpmpp_2s_ancestral", "dpmpp_sde_karras", "euler", "lcm"])
def test_same_seed_same_latent_and_another_seed_another(name, table):
    eps, sampler = toy_eps(), resolve_sampler(name)
    first = S.sample(sampler, eps, SHAPE, 5, 4, model_sigmas=table)
    again = S.sample(sampler, eps, SHAPE, 5, 4, model_sigmas=table)
    other = S.sample(sampler, eps, SHAPE, 6, 4, model_sigmas=table)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert first.dtype == torch.float32 and first.shape == SHAPE


def test_a1111_conventions_refuse_samplers_and_schedules_a1111_runs_differently(table):
    eps = toy_eps()
    with pytest.raises(SamplerError, match="no A1111 equivalent"):
        S.sample(resolve_sampler("lcm"), eps, SHAPE, 1, 2, noise="a1111-cpu", model_sigmas=table)
    with pytest.raises(SamplerError, match="beta"):
        S.sample(resolve_sampler("euler_beta"), eps, SHAPE, 1, 2, noise="a1111-gpu", model_sigmas=table)
    with pytest.raises(ValueError, match="noise convention"):
        S.sample(resolve_sampler("euler"), eps, SHAPE, 1, 2, noise="diffusers", model_sigmas=table)


# --- the independent ComfyUI reference on the tiny model ------------------------------------------


def test_comfy_reference_renders_a_deterministic_non_constant_image(tiny_model):
    from diffusers import StableDiffusionXLPipeline

    from tests.comfy_reference import comfy_reference_image

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model, local_files_only=True)
    with torch.no_grad():
        cond, uncond, pooled, uncond_pooled = pipe.encode_prompt("a photo", negative_prompt="blurry", device="cpu")
    time_ids = torch.tensor([[64, 64, 0, 0, 64, 64]], dtype=torch.float32)
    args = (pipe.unet, pipe.vae, cond, pooled, uncond, uncond_pooled, time_ids, 12345, 3, 5.0)
    first = np.asarray(comfy_reference_image(*args, "dpmpp_2m_sde", "karras", 64, 64))
    again = np.asarray(comfy_reference_image(*args, "dpmpp_2m_sde", "karras", 64, 64))
    assert first.shape == (64, 64, 3) and first.dtype == np.uint8
    assert np.array_equal(first, again) and first.std() > 0
    lms = np.asarray(comfy_reference_image(*args, "lms", "normal", 64, 64))
    assert not np.array_equal(first, lms)


def test_the_largest_seed_still_samples(table):
    """seed + 1 (ComfyUI's ancestral generator) wraps within 64 bits instead of failing."""
    latent = S.sample(resolve_sampler("euler_ancestral"), toy_eps(), SHAPE, 2 ** 64 - 1, 2, model_sigmas=table)
    assert torch.isfinite(latent).all()
