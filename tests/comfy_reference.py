"""An independent reference of ComfyUI's KSampler on SDXL, for comparing whole farm images with
the image ComfyUI's algorithm gives. It does not import farm.render.sampling or farm.sweep.samplers: it is
rebuilt here from ComfyUI's math, with the k-diffusion package's sampler functions doing the
stepping. Meant for the CPU (where ComfyUI's noise conventions are device-free).

What it reproduces:

- ComfyUI's SDXL noise schedule: betas evenly spaced in sqrt between 0.00085 and 0.012 (1000),
  sigmas computed in float64 and kept as float32 sigmas and float32 log-sigmas;
- its schedulers (normal, karras, exponential, sgm_uniform, simple, ddim_uniform, beta) and its
  discarding of the penultimate sigma for dpm_2 / dpm_2_ancestral;
- its initial noise: a CPU generator seeded with the seed, times sqrt(1 + σ0²) when σ0 is the
  model's largest sigma, else σ0;
- its EPS model wrapper: input x / sqrt(σ² + 1), timestep = nearest training index, denoised
  = x − eps·σ per prompt, then CFG on the denoised: uncond + (cond − uncond)·cfg;
- its noise samplers: ancestral noise from a generator seeded with seed (+1 on the CPU), SDE
  noise from a Brownian tree seeded with the seed;
- where ComfyUI's sampler differs from the package (LMS ends with the denoised latent; lcm is
  not in the package), ComfyUI's version;
- the VAE decode of latent / scaling_factor, (x + 1) / 2 clamped, 255·x truncated to uint8.
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import torch
from PIL import Image

from tests.kdiffusion_ref import sampling as K

_ANCESTRAL = {"euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral", "lcm"}
_BROWNIAN = {"dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun",
             "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu"}
_DISCARD_PENULTIMATE = {"dpm_2", "dpm_2_ancestral"}


class ComfySDXLSampling:
    """ComfyUI's ModelSamplingDiscrete for SDXL, with its timestep(σ) and σ(t)."""

    def __init__(self):
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        wide = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        self.sigmas, self.log_sigmas = wide.float(), wide.log().float()

    @property
    def sigma_min(self):
        return self.sigmas[0]

    @property
    def sigma_max(self):
        return self.sigmas[-1]

    def timestep(self, sigma):
        distance = (sigma.log().to(self.log_sigmas.device) - self.log_sigmas[:, None]).abs()
        return distance.argmin(dim=0).view(sigma.shape).to(sigma.device)

    def sigma(self, timestep):
        t = timestep.float().to(self.log_sigmas.device).clamp(0, len(self.sigmas) - 1)
        lo, hi, frac = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - frac) * self.log_sigmas[lo] + frac * self.log_sigmas[hi]).exp().to(timestep.device)


def _normal(ms, steps, sgm=False):
    first, last = ms.timestep(ms.sigma_max), ms.timestep(ms.sigma_min)
    ts = torch.linspace(first, last, steps + 1)[:-1] if sgm else torch.linspace(first, last, steps)
    return torch.FloatTensor([float(ms.sigma(t)) for t in ts] + [0.0])


def _simple(ms, steps):
    every = len(ms.sigmas) / steps
    return torch.FloatTensor([float(ms.sigmas[-(1 + int(k * every))]) for k in range(steps)] + [0.0])


def _ddim_uniform(ms, steps):
    every = max(len(ms.sigmas) // steps, 1)
    picked = [float(ms.sigmas[k]) for k in range(1, len(ms.sigmas), every)]
    return torch.FloatTensor(picked[::-1] + [0.0])


def _beta(ms, steps, a=0.6, b=0.6):
    import scipy.stats

    ts = np.rint(scipy.stats.beta.ppf(1 - np.linspace(0, 1, steps, endpoint=False), a, b) * (len(ms.sigmas) - 1))
    picked, last = [], None
    for t in ts:
        if t != last:
            picked.append(float(ms.sigmas[int(t)]))
        last = t
    return torch.FloatTensor(picked + [0.0])


def comfy_sigmas(ms: ComfySDXLSampling, scheduler: str, steps: int, sampler_name: str) -> torch.Tensor:
    """KSampler.calculate_sigmas: the scheduler, with the penultimate sigma dropped for DPM2."""
    discard = sampler_name in _DISCARD_PENULTIMATE
    n = steps + 1 if discard else steps
    low, high = float(ms.sigma_min), float(ms.sigma_max)
    builders = {
        "normal": lambda: _normal(ms, n), "sgm_uniform": lambda: _normal(ms, n, sgm=True),
        "karras": lambda: K.get_sigmas_karras(n=n, sigma_min=low, sigma_max=high),
        "exponential": lambda: K.get_sigmas_exponential(n=n, sigma_min=low, sigma_max=high),
        "simple": lambda: _simple(ms, n), "ddim_uniform": lambda: _ddim_uniform(ms, n), "beta": lambda: _beta(ms, n),
    }
    sigmas = builders[scheduler]()
    return torch.cat([sigmas[:-2], sigmas[-1:]]) if discard else sigmas


def _cfg_denoiser(ms, unet, cond, uncond, time_ids, cfg):
    """ComfyUI's CFG around its EPS wrapper: both prompts' denoised latents, mixed on the denoised."""
    (cond_embeds, cond_pooled), (uncond_embeds, uncond_pooled) = cond, uncond

    def run(x_in, t, embeds, pooled):
        count = x_in.shape[0]
        added = {"text_embeds": pooled.to(unet.dtype), "time_ids": time_ids.repeat(count, 1).to(unet.dtype)}
        out = unet(x_in.to(unet.dtype), t.expand(count), encoder_hidden_states=embeds.to(unet.dtype),
                   added_cond_kwargs=added).sample
        return out.float()

    def model(x, sigma):
        s = sigma.view(-1, 1, 1, 1)
        x_in = x / (s ** 2 + 1.0) ** 0.5
        t = ms.timestep(sigma).float()
        if cond_embeds.shape == uncond_embeds.shape:
            eps_c, eps_u = run(torch.cat([x_in, x_in]), t, torch.cat([cond_embeds, uncond_embeds]),
                               torch.cat([cond_pooled, uncond_pooled])).chunk(2)
        else:
            eps_c, eps_u = run(x_in, t, cond_embeds, cond_pooled), run(x_in, t, uncond_embeds, uncond_pooled)
        denoised_c, denoised_u = x - eps_c * s, x - eps_u * s
        return denoised_u + (denoised_c - denoised_u) * cfg

    return model


def _ancestral_noise(x, seed):
    """ComfyUI's default_noise_sampler: a generator on x's device, seeded seed (+1 on the CPU)."""
    generator = torch.Generator(device=x.device).manual_seed(seed + 1 if x.device.type == "cpu" else seed)
    return lambda sigma, sigma_next: torch.randn(x.size(), dtype=x.dtype, device=x.device, generator=generator)


def _brownian_noise(x, sigmas, seed):
    """ComfyUI's Brownian tree on the CPU, seeded with the seed (the package's tree, fed CPU tensors)."""
    cpu_x, cpu_sigmas = x.cpu(), sigmas.cpu()
    tree = K.BrownianTreeNoiseSampler(cpu_x, cpu_sigmas[cpu_sigmas > 0].min(), cpu_sigmas.max(), seed=seed)
    return lambda sigma, sigma_next: tree(sigma.cpu(), sigma_next.cpu()).to(x.device, x.dtype)


def _lcm(model, x, sigmas, noise_sampler):
    """ComfyUI's sample_lcm: the denoised latent, re-noised to the next sigma."""
    for i in range(len(sigmas) - 1):
        x = model(x, sigmas[i] * x.new_ones([x.shape[0]]))
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * sigmas[i + 1]
    return x


def _run_sampler(name, model, x, sigmas, seed):
    if name in _ANCESTRAL:
        noise = _ancestral_noise(x, seed)
    elif name in _BROWNIAN:
        noise = _brownian_noise(x, sigmas, seed)
    else:
        noise = None
    if name == "lcm":
        return _lcm(model, x, sigmas, noise)
    if name == "lms":  # ComfyUI: the last step (into 0) returns the denoised latent
        x = K.sample_lms(model, x, sigmas[:-1], disable=True)
        return model(x, sigmas[-2] * x.new_ones([x.shape[0]]))
    base = {"ddim": "euler"}.get(name, name.removesuffix("_gpu"))
    if base == "dpmpp_2m_sde_heun":
        function = partial(K.sample_dpmpp_2m_sde, solver_type="heun")
    else:
        function = getattr(K, f"sample_{base}")
    kwargs = {"noise_sampler": noise} if noise is not None else {}
    return function(model, x, sigmas, disable=True, **kwargs)


def comfy_reference_image(unet, vae, cond_embeds, cond_pooled, uncond_embeds, uncond_pooled, add_time_ids,
                          seed, steps, cfg, sampler_name, scheduler, width, height) -> Image.Image:
    """The 8-bit image ComfyUI's KSampler (denoise 1, empty latent) makes from these modules and
    text embeddings with this ComfyUI sampler and scheduler name."""
    device = unet.device
    ms = ComfySDXLSampling()
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    shape = (1, unet.config.in_channels, height // factor, width // factor)
    with torch.no_grad():
        sigmas = comfy_sigmas(ms, scheduler, steps, sampler_name).to(device)
        noise = torch.randn(shape, dtype=torch.float32, generator=torch.Generator("cpu").manual_seed(seed)).to(device)
        sigma0, sigma_max = float(sigmas[0]), float(ms.sigma_max)
        if math.isclose(sigma_max, sigma0, rel_tol=1e-05) or sigma0 > sigma_max:
            x = noise * torch.sqrt(1.0 + sigmas[0] ** 2.0)
        else:
            x = noise * sigmas[0]
        x = x + torch.zeros(shape, device=device)
        model = _cfg_denoiser(ms, unet, (cond_embeds.to(device), cond_pooled.to(device)),
                              (uncond_embeds.to(device), uncond_pooled.to(device)), add_time_ids.to(device), cfg)
        latent = _run_sampler(sampler_name, model, x, sigmas, seed)
        pixels = vae.decode((latent / vae.config.scaling_factor).to(vae.dtype)).sample.float()
    pixels = torch.clamp((pixels + 1.0) / 2.0, min=0.0, max=1.0)
    array = np.clip(255.0 * pixels[0].permute(1, 2, 0).cpu().numpy(), 0, 255).astype(np.uint8)
    return Image.fromarray(array)
