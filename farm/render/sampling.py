"""k-diffusion's samplers and ComfyUI's schedulers for an epsilon-prediction model. Torch only
(scipy for LMS's coefficients and the beta schedule, torchsde for the SDE samplers' noise).

A farm image is meant to be the image ComfyUI's KSampler (or A1111, per the task's `noise`
convention) gives for the same settings, so everything here follows those tools down to the
order of floating-point operations: the 1000 training sigmas, the schedule built from them, the
model wrapper (input scaling, timestep), the seed → noise conventions and the sampler loops.
`tests/test_sampling.py` proves each sampler equal to the `k-diffusion` package's.

Where the tools differ, `comfy=True` follows ComfyUI and `comfy=False` the k-diffusion package
that A1111 runs. The differences are: ComfyUI ends LMS with the denoised image instead of a last
multistep step (a visible difference), and it writes a few SDE updates and last steps in an
algebraically equal but differently rounded form (~1e-7).

Conventions (`noise=`):

- "comfyui": ComfyUI's KSampler. Initial noise from a CPU generator seeded with the seed, times
  sqrt(1 + σ0²) when σ0 is the model's largest sigma (else σ0); timesteps rounded to the nearest
  training index; ancestral noise from a second CPU generator seeded with seed + 1 (what ComfyUI
  draws on a CPU; on a GPU it would use the GPU's generator, which is not reproducible across GPU
  models); SDE noise from a Brownian tree on the CPU seeded with the seed.
- "a1111-cpu" / "a1111-gpu": A1111 with its default settings. One generator per image (seed + i),
  on the CPU or on the sampling device (A1111's "RNG" setting); the initial noise is its first
  draw times σ0 (SGM noise multiplier off), ancestral noise its following draws; timesteps
  interpolated between training indices (quantization off); SDE noise from a Brownian tree per
  image on the sampling device seeded with the image's seed.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from farm.errors import ModelError, SamplerError

NOISE = ("comfyui", "a1111-cpu", "a1111-gpu")

# SDXL's training noise schedule: what a checkpoint without a scheduler config was trained with.
_SDXL_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                  "beta_schedule": "scaled_linear"}

EpsFn = Callable[[Tensor, Tensor], Tensor]
NoiseSampler = Callable[[Tensor, Tensor], Tensor]


# --- the model's training sigmas -------------------------------------------------------------


def _betas(config: dict) -> Tensor:
    """The training betas in float64. diffusers' "scaled_linear" is ComfyUI's "linear" (evenly
    spaced square roots, squared); diffusers' "linear" is ComfyUI's "sqrt_linear"."""
    if config.get("trained_betas") is not None:
        return torch.tensor(config["trained_betas"], dtype=torch.float64)
    n, start, end = int(config["num_train_timesteps"]), float(config["beta_start"]), float(config["beta_end"])
    kind = config["beta_schedule"]
    if kind == "scaled_linear":
        return torch.linspace(start ** 0.5, end ** 0.5, n, dtype=torch.float64) ** 2
    if kind == "linear":
        return torch.linspace(start, end, n, dtype=torch.float64)
    raise ModelError(f"beta_schedule {kind!r} is not supported (scaled_linear or linear)")


def model_sigmas(scheduler_config: dict) -> Tensor:
    """The checkpoint's 1000 training sigmas, ascending, float32, as ComfyUI computes them: betas,
    alphas_cumprod and sigmas in float64, rounded to float32 at the end.

    The float64 alphas_cumprod ride along as the attribute `alphas_cumprod`: ComfyUI takes its
    log-sigma table from the float64 sigmas and A1111 its whole table from float32
    alphas_cumprod, and neither can be recovered exactly from float32 sigmas."""
    config = {**_SDXL_SCHEDULE, **{k: v for k, v in dict(scheduler_config).items() if v is not None}}
    if config.get("prediction_type", "epsilon") != "epsilon":
        raise ModelError(f"prediction_type {config['prediction_type']!r} is not supported (epsilon only)")
    if config.get("rescale_betas_zero_snr"):
        raise ModelError("rescale_betas_zero_snr models are not supported")
    alphas_cumprod = torch.cumprod(1.0 - _betas(config), dim=0)
    sigmas = (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).float()
    sigmas.alphas_cumprod = alphas_cumprod
    return sigmas


def _sdxl_sigmas() -> Tensor:
    return model_sigmas({})


def _alphas_cumprod(sigmas: Tensor) -> Tensor:
    """The float64 alphas_cumprod behind a sigma table (exact when it came from model_sigmas)."""
    exact = getattr(sigmas, "alphas_cumprod", None)
    if exact is not None:
        return exact
    wide = sigmas.detach().cpu().double()
    return 1.0 / (1.0 + wide * wide)


@dataclass(frozen=True)
class _Table:
    """A tool's view of the training sigmas: float32 sigmas and log-sigmas, ascending."""

    sigmas: Tensor
    log_sigmas: Tensor

    def to(self, device) -> "_Table":
        return _Table(self.sigmas.to(device), self.log_sigmas.to(device))

    def timestep(self, sigma: Tensor, quantize: bool) -> Tensor:
        """The model timestep of a noise level: ComfyUI's nearest training index (argmin of the
        log distance), or k-diffusion's linear interpolation in log-sigma between neighbours."""
        log_sigma = sigma.log()
        dists = log_sigma.to(self.log_sigmas.device) - self.log_sigmas[:, None]
        if quantize:
            return dists.abs().argmin(dim=0).view(sigma.shape).to(sigma.device)
        last = self.log_sigmas.shape[0] - 2
        low = (dists.ge(0).sum(dim=0) - 1).clamp(min=0, max=last)
        low_log, high_log = self.log_sigmas[low], self.log_sigmas[low + 1]
        w = ((low_log - log_sigma) / (low_log - high_log)).clamp(0, 1)
        return ((1 - w) * low + w * (low + 1)).view(sigma.shape)

    def sigma(self, timestep: Tensor) -> Tensor:
        """The noise level at a (fractional) timestep: log-sigma interpolated between the two
        neighbouring training indices."""
        t = timestep.float().clamp(min=0, max=len(self.sigmas) - 1)
        w = t.frac()
        mixed = (1 - w) * self.log_sigmas[t.floor().long()] + w * self.log_sigmas[t.ceil().long()]
        return mixed.exp()


def _table(sigmas: Tensor, comfy: bool) -> _Table:
    """ComfyUI keeps float32(sigmas) and float32(log(sigmas)) of the float64 table; A1111 computes
    sigmas and their logs in float32 from float32 alphas_cumprod."""
    alphas_cumprod = _alphas_cumprod(sigmas)
    if comfy:
        wide = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        return _Table(wide.float(), wide.log().float())
    narrow = alphas_cumprod.float()
    table = ((1 - narrow) / narrow) ** 0.5
    return _Table(table, table.log())


# --- schedules ----------------------------------------------------------------------------------


def _floats(values: Sequence[float]) -> Tensor:
    return torch.tensor([float(v) for v in values], dtype=torch.float32)


def _normal(steps: int, table: _Table, quantize: bool, sgm: bool = False) -> Tensor:
    """ComfyUI's "normal" (sgm=False) and "sgm_uniform": training timesteps evenly spaced from
    the largest sigma's to the smallest's, each turned back into a sigma one at a time (as the
    tools do; a vectorised exp can round differently), then 0. sgm_uniform spaces steps + 1
    points and drops the last."""
    start, end = table.timestep(table.sigmas[-1], quantize), table.timestep(table.sigmas[0], quantize)
    append_zero = True
    if sgm:
        timesteps = torch.linspace(start, end, steps + 1)[:-1]
    else:
        if math.isclose(float(table.sigma(end)), 0, abs_tol=0.00001):  # a zero-terminal-SNR table
            steps, append_zero = steps + 1, False
        timesteps = torch.linspace(start, end, steps)
    values = [float(table.sigma(t)) for t in timesteps]
    return _floats(values + [0.0] if append_zero else values)


def _uniform(steps: int, table: _Table) -> Tensor:
    """A1111's "Automatic" schedule for samplers without a default (k-diffusion's get_sigmas):
    the normal schedule's timesteps, turned into sigmas in one vectorised call."""
    timesteps = torch.linspace(len(table.sigmas) - 1, 0, steps, device=table.sigmas.device)
    sigmas = table.sigma(timesteps)
    return torch.cat([sigmas, sigmas.new_zeros([1])]).cpu()


def _karras(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """Karras et al. (2022): sigmas evenly spaced in sigma^(1/rho), then 0."""
    ramp = torch.linspace(0, 1, steps)
    low, high = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (high + ramp * (low - high)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros([1])])


def _exponential(steps: int, sigma_min: float, sigma_max: float) -> Tensor:
    """Sigmas evenly spaced in log sigma, then 0."""
    sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), steps).exp()
    return torch.cat([sigmas, sigmas.new_zeros([1])])


def _simple(steps: int, table: _Table) -> Tensor:
    """ComfyUI's "simple": every (1000 / steps)-th training sigma from the top, then 0."""
    stride = len(table.sigmas) / steps
    return _floats([float(table.sigmas[-(1 + int(i * stride))]) for i in range(steps)] + [0.0])


def _ddim_uniform(steps: int, table: _Table) -> Tensor:
    """ComfyUI's "ddim_uniform": training sigmas 1, 1 + k, 1 + 2k, ... (k = 1000 // steps), from
    the top, then 0. It can give more than `steps` steps when 1000 is not a multiple of steps."""
    chosen = []
    if math.isclose(float(table.sigmas[1]), 0, abs_tol=0.00001):  # a zero-terminal-SNR table
        steps += 1
    else:
        chosen = [0.0]
    stride = max(len(table.sigmas) // steps, 1)
    for index in range(1, len(table.sigmas), stride):
        chosen.append(float(table.sigmas[index]))
    return _floats(chosen[::-1])


def _beta(steps: int, table: _Table, alpha: float = 0.6, beta: float = 0.6) -> Tensor:
    """ComfyUI's "beta" (arXiv:2407.12173): training indices at the Beta(0.6, 0.6) quantiles of
    1, 1 - 1/steps, ..., rounded, repeats dropped, as sigmas, then 0."""
    import numpy
    import scipy.stats

    last = len(table.sigmas) - 1
    quantiles = 1 - numpy.linspace(0, 1, steps, endpoint=False)
    indices = numpy.rint(scipy.stats.beta.ppf(quantiles, alpha, beta) * last)
    chosen, previous = [], -1
    for index in indices:
        if index != previous:
            chosen.append(float(table.sigmas[int(index)]))
        previous = index
    return _floats(chosen + [0.0])


def _schedule(name: str, steps: int, table: _Table, quantize: bool, uniform: bool = False) -> Tensor:
    """`steps` sigmas plus a final 0 on the CPU (ddim_uniform and beta may give other counts)."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, not {steps}")
    sigma_min, sigma_max = float(table.sigmas[0]), float(table.sigmas[-1])
    if name == "normal":
        return _uniform(steps, table) if uniform else _normal(steps, table, quantize)
    if name == "sgm_uniform":
        return _normal(steps, table, quantize, sgm=True)
    if name == "karras":
        return _karras(steps, sigma_min, sigma_max)
    if name == "exponential":
        return _exponential(steps, sigma_min, sigma_max)
    if name == "simple":
        return _simple(steps, table)
    if name == "ddim_uniform":
        return _ddim_uniform(steps, table)
    if name == "beta":
        return _beta(steps, table)
    raise SamplerError(f"unknown schedule {name!r}")


def _discard_penultimate(build: Callable[[int], Tensor], steps: int) -> Tensor:
    """One step more, then the next-to-last sigma dropped: what both tools do for DPM2, whose
    second-order step would otherwise spend its last model call near sigma_min for nothing."""
    sigmas = build(steps + 1)
    return torch.cat([sigmas[:-2], sigmas[-1:]])


def schedule_sigmas(schedule: str, steps: int, sigmas: Tensor, discard_penultimate: bool = False, *,
                    noise: str = "comfyui") -> Tensor:
    """The sampling schedule (float32, CPU): `steps` noise levels from the model's training
    `sigmas` (model_sigmas()), then 0, by ComfyUI's scheduler of that name (or A1111's namesake
    for an a1111 `noise` convention, which computes from its float32 table)."""
    comfy = _is_comfy(noise)
    table = _table(sigmas, comfy)

    def build(n: int) -> Tensor:
        return _schedule(schedule, n, table, quantize=comfy)

    return _discard_penultimate(build, steps) if discard_penultimate else build(steps)


# --- the model wrapper --------------------------------------------------------------------------


class Denoiser:
    """An epsilon-prediction model as k-diffusion samplers see it: `denoiser(x, sigma)` → the
    denoised latent. `eps_fn(x_in, t)` gets the latent scaled to unit variance, x / sqrt(σ² + 1),
    and the model timestep (float32, one per batch item) and returns the predicted noise.

    `quantize_timesteps`: ComfyUI rounds the timestep to the nearest training index; A1111
    (k-diffusion's CompVisDenoiser with A1111's default "quantization off") interpolates.
    `noise` picks the tool's sigma table and arithmetic: ComfyUI divides by sqrt(σ² + 1),
    k-diffusion multiplies by its reciprocal (different last bits)."""

    def __init__(self, eps_fn: EpsFn, sigmas: Tensor, quantize_timesteps: bool, *, noise: str = "comfyui"):
        self.eps_fn = eps_fn
        self.comfy = _is_comfy(noise)
        self.table = _table(sigmas, self.comfy)
        self.quantize = quantize_timesteps

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        sigma = sigma.reshape(-1).to(x.device)
        if self.table.sigmas.device != x.device:
            self.table = self.table.to(x.device)
        timestep = self.table.timestep(sigma, self.quantize).float()
        shaped = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        if self.comfy:
            eps = self.eps_fn(x / (shaped ** 2 + 1.0) ** 0.5, timestep)
            return x - eps * shaped
        eps = self.eps_fn(x * (1 / (shaped ** 2 + 1.0) ** 0.5), timestep)
        return x + eps * -shaped


# --- noise --------------------------------------------------------------------------------------


def _seed64(seed: int) -> int:
    """A derived seed (seed + 1, seed + i) kept within the 64 bits a torch generator takes; at
    2**64 − 1 ComfyUI itself would fail, the farm wraps around to 0."""
    return int(seed) & 0xFFFF_FFFF_FFFF_FFFF


def _is_comfy(noise: str) -> bool:
    if noise not in NOISE:
        raise ValueError(f"noise convention {noise!r} is not one of {', '.join(NOISE)}")
    return noise == "comfyui"


class _Draws:
    """A convention's random numbers for one run: the initial noise, then the ancestral noise.

    ComfyUI draws the initial noise for the whole batch from a CPU generator seeded with the
    seed and the ancestral noise from another seeded with seed + 1. A1111 keeps one generator per
    image (seeds seed, seed + 1, ...) and takes the ancestral noise from the same generator,
    after the initial draw."""

    def __init__(self, seed: int, shape: Sequence[int], noise: str, device):
        self.shape, self.device = tuple(int(n) for n in shape), torch.device(device)
        self.comfy = _is_comfy(noise)
        if self.comfy:
            self.generators = [torch.Generator("cpu").manual_seed(_seed64(seed))]
            self.ancestral = torch.Generator("cpu").manual_seed(_seed64(seed + 1))
        else:
            where = torch.device("cpu") if noise == "a1111-cpu" else self.device
            self.generators = [torch.Generator(where).manual_seed(_seed64(seed + i)) for i in range(self.shape[0])]

    def _per_image(self) -> Tensor:
        draws = [torch.randn(self.shape[1:], generator=g, device=g.device, dtype=torch.float32)
                 for g in self.generators]
        return torch.stack(draws).to(self.device)

    def first(self) -> Tensor:
        if self.comfy:
            return torch.randn(self.shape, generator=self.generators[0], dtype=torch.float32).to(self.device)
        return self._per_image()

    def next(self, sigma: Tensor = None, sigma_next: Tensor = None) -> Tensor:
        """The next ancestral noise (a noise sampler: the sigmas do not matter)."""
        if self.comfy:
            return torch.randn(self.shape, generator=self.ancestral, dtype=torch.float32).to(self.device)
        return self._per_image()


def _max_denoise(sigma0: float, sigma_max: float) -> bool:
    """ComfyUI's test for "starts from pure noise": σ0 is (within 1e-5) the model's largest sigma."""
    return math.isclose(sigma_max, sigma0, rel_tol=1e-05) or sigma0 > sigma_max


def _scale_initial(noise_draw: Tensor, sigma0: Tensor, sigma_max: float, comfy: bool) -> Tensor:
    """The starting latent. ComfyUI gives pure noise the variance of x_T itself, 1 + σ0² (it
    samples in the unit-variance-input parameterisation); k-diffusion and A1111 use σ0."""
    if not comfy:
        return noise_draw * sigma0
    if _max_denoise(float(sigma0), sigma_max):
        scaled = noise_draw * torch.sqrt(1.0 + sigma0 ** 2.0)
    else:
        scaled = noise_draw * sigma0
    return scaled + torch.zeros_like(scaled)  # ComfyUI adds the empty latent image (all zeros)


def initial_noise(seed: int, shape: Sequence[int], noise: str = "comfyui", device="cpu", *,
                  sigma0: Optional[Tensor] = None, sigma_max: Optional[float] = None) -> Tensor:
    """A seed's initial noise under a convention (float32, on `device`). Unscaled without
    `sigma0`; with it (and `sigma_max`, the model's largest sigma, for ComfyUI), the starting
    latent: ComfyUI multiplies by sqrt(1 + σ0²) when σ0 is sigma_max, else by σ0; A1111 by σ0."""
    draw = _Draws(seed, shape, noise, device).first()
    if sigma0 is None:
        return draw
    sigma0 = torch.as_tensor(sigma0, dtype=torch.float32).to(draw.device)
    return _scale_initial(draw, sigma0, float(sigma_max if sigma_max is not None else sigma0), _is_comfy(noise))


class BrownianNoise:
    """Noise for the SDE samplers: increments of one Brownian motion over sigma, fixed by the
    seed, so the noise between two sigmas does not depend on how the steps cut the interval.
    Returns (W(σ_next) − W(σ)) / sqrt(|σ_next − σ|).

    `seeds`: one int, one tree for the whole batch (ComfyUI); a list, one tree per image
    (A1111). `on_cpu`: build and query the tree on the CPU (ComfyUI's default, so the noise does
    not depend on the GPU); otherwise on x's device (A1111, ComfyUI's *_gpu samplers)."""

    def __init__(self, x: Tensor, sigma_min: Tensor, sigma_max: Tensor, seeds, on_cpu: bool):
        import torchsde

        self.on_cpu, self.per_image = on_cpu, isinstance(seeds, (list, tuple))
        start, end = torch.as_tensor(sigma_min), torch.as_tensor(sigma_max)
        w0 = torch.zeros_like(x[0] if self.per_image else x)
        if on_cpu:
            start, w0, end = start.detach().cpu(), w0.detach().cpu(), end.detach().cpu()
        entropies = list(seeds) if self.per_image else [seeds]
        self.trees = [torchsde.BrownianTree(start, w0, end, entropy=int(e)) for e in entropies]

    def _increment(self, t0: Tensor, t1: Tensor) -> Tensor:
        low, high, sign = (t0, t1, 1) if t0 < t1 else (t1, t0, -1)
        device, dtype = low.device, low.dtype
        if self.on_cpu:
            low, high = low.detach().cpu().float(), high.detach().cpu().float()
        with warnings.catch_warnings():  # float32 sigmas a hair outside the tree's float span
            warnings.filterwarnings("ignore", message="Should have t", category=UserWarning)
            w = torch.stack([tree(low, high) for tree in self.trees])
        if self.on_cpu:
            w = w.to(device=device, dtype=dtype)
        w = w * sign
        return w if self.per_image else w[0]

    def __call__(self, sigma: Tensor, sigma_next: Tensor) -> Tensor:
        t0, t1 = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
        return self._increment(t0, t1) / (t1 - t0).abs().sqrt()


# --- sampler building blocks --------------------------------------------------------------------


def _to_d(x: Tensor, sigma: Tensor, denoised: Tensor) -> Tensor:
    """The probability-flow ODE's derivative dx/dσ at σ: (x − denoised) / σ."""
    return (x - denoised) / sigma


def _ancestral_step(sigma_from: Tensor, sigma_to: Tensor, eta: float = 1.0):
    """(σ_down, σ_up): step deterministically down to σ_down, then add σ_up of fresh noise, so the
    variance lands at σ_to² (σ_down² + σ_up² = σ_to²); eta = 1 is the DDPM-like amount."""
    if not eta:
        return sigma_to, 0.0
    wanted = eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5
    sigma_up = wanted if wanted < sigma_to else sigma_to
    return (sigma_to ** 2 - sigma_up ** 2) ** 0.5, sigma_up


def _lambda(sigma: Tensor) -> Tensor:
    """Half log-SNR of an epsilon model's noise level, −log σ (DPM-Solver's time variable)."""
    return sigma.log().neg()


def _sigma_of(lam: Tensor) -> Tensor:
    return lam.neg().exp()


def _ones(x: Tensor) -> Tensor:
    """Per-batch-item multiplier: the denoiser takes one sigma per batch item."""
    return x.new_ones([x.shape[0]])


# --- samplers -----------------------------------------------------------------------------------
# Each takes (denoiser, x, sigmas, noise_sampler) and returns the final x. eta = 1 and
# s_noise = 1 (both tools' defaults) throughout; churn (s_churn) is 0 in both tools.


@torch.no_grad()
def euler(model, x: Tensor, sigmas: Tensor, noise_sampler=None, *, comfy: bool = True) -> Tensor:
    """First-order steps along the probability-flow ODE (Karras et al. 2022, Algorithm 2, no churn)."""
    s_in = _ones(x)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        x = x + _to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
    return x


@torch.no_grad()
def euler_ancestral(model, x: Tensor, sigmas: Tensor, noise_sampler: NoiseSampler, *, comfy: bool = True) -> Tensor:
    """Euler down to σ_down, then σ_up of fresh noise per step. ComfyUI returns the denoised
    latent when a step ends at 0; k-diffusion takes the (equal up to rounding) Euler step."""
    s_in = _ones(x)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        sigma_down, sigma_up = _ancestral_step(sigmas[i], sigmas[i + 1])
        if comfy and sigma_down == 0:
            x = denoised
            continue
        x = x + _to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * 1.0 * sigma_up
    return x


@torch.no_grad()
def heun(model, x: Tensor, sigmas: Tensor, noise_sampler=None, *, comfy: bool = True) -> Tensor:
    """Second-order: an Euler trial step, then the average of both slopes (Euler into 0)."""
    s_in = _ones(x)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        d = _to_d(x, sigmas[i], denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
            continue
        x_trial = x + d * dt
        d_trial = _to_d(x_trial, sigmas[i + 1], model(x_trial, sigmas[i + 1] * s_in))
        x = x + (d + d_trial) / 2 * dt
    return x


def _log_midpoint(a: Tensor, b: Tensor) -> Tensor:
    """The geometric mean of two sigmas, through their logs."""
    return a.log().lerp(b.log(), 0.5).exp()


def _dpm2_step(model, x: Tensor, sigma: Tensor, sigma_to: Tensor, d: Tensor, s_in: Tensor) -> Tensor:
    """DPM-Solver-2: the slope at the log-midpoint moves x from sigma to sigma_to."""
    sigma_mid = _log_midpoint(sigma, sigma_to)
    x_mid = x + d * (sigma_mid - sigma)
    d_mid = _to_d(x_mid, sigma_mid, model(x_mid, sigma_mid * s_in))
    return x + d_mid * (sigma_to - sigma)


@torch.no_grad()
def dpm_2(model, x: Tensor, sigmas: Tensor, noise_sampler=None, *, comfy: bool = True) -> Tensor:
    """DPM-Solver-2 steps (Euler into 0)."""
    s_in = _ones(x)
    for i in range(len(sigmas) - 1):
        d = _to_d(x, sigmas[i], model(x, sigmas[i] * s_in))
        if sigmas[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigmas[i])
        else:
            x = _dpm2_step(model, x, sigmas[i], sigmas[i + 1], d, s_in)
    return x


@torch.no_grad()
def dpm_2_ancestral(model, x: Tensor, sigmas: Tensor, noise_sampler: NoiseSampler, *, comfy: bool = True) -> Tensor:
    """DPM-Solver-2 down to σ_down, then σ_up of fresh noise."""
    s_in = _ones(x)
    for i in range(len(sigmas) - 1):
        d = _to_d(x, sigmas[i], model(x, sigmas[i] * s_in))
        sigma_down, sigma_up = _ancestral_step(sigmas[i], sigmas[i + 1])
        if sigma_down == 0:
            x = x + d * (sigma_down - sigmas[i])
            continue
        x = _dpm2_step(model, x, sigmas[i], sigma_down, d, s_in)
        x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * 1.0 * sigma_up
    return x


def _lms_coefficient(order: int, t, i: int, j: int) -> float:
    """∫ from t[i] to t[i+1] of the Lagrange basis polynomial of node t[i−j] over the last
    `order` nodes: the weight of the j-th latest derivative in a linear multistep step."""
    from scipy import integrate

    def basis(tau):
        product = 1.0
        for k in range(order):
            if k != j:
                product *= (tau - t[i - k]) / (t[i - j] - t[i - k])
        return product

    return integrate.quad(basis, t[i], t[i + 1], epsrel=1e-4)[0]


@torch.no_grad()
def lms(model, x: Tensor, sigmas: Tensor, noise_sampler=None, *, comfy: bool = True, order: int = 4) -> Tensor:
    """Linear multistep over the last `order` derivatives. ComfyUI returns the denoised latent for
    a step into 0; k-diffusion takes the multistep step there too (a visibly different image)."""
    s_in = _ones(x)
    nodes = sigmas.detach().cpu().numpy()
    history: list[Tensor] = []
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        history = (history + [_to_d(x, sigmas[i], denoised)])[-order:]
        if comfy and sigmas[i + 1] == 0:
            x = denoised
            continue
        current = min(i + 1, order)
        weights = [_lms_coefficient(current, nodes, i, j) for j in range(current)]
        x = x + sum(w * d for w, d in zip(weights, reversed(history)))
    return x


@torch.no_grad()
def dpmpp_2s_ancestral(model, x: Tensor, sigmas: Tensor, noise_sampler: NoiseSampler, *, comfy: bool = True) -> Tensor:
    """DPM-Solver++(2S) down to σ_down (a midpoint model call in log-SNR), then σ_up of noise."""
    s_in = _ones(x)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        sigma_down, sigma_up = _ancestral_step(sigmas[i], sigmas[i + 1])
        if sigma_down == 0:
            x = x + _to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            t, t_next = _lambda(sigmas[i]), _lambda(sigma_down)
            h = t_next - t
            s = t + 0.5 * h
            x_mid = (_sigma_of(s) / _sigma_of(t)) * x - (-h * 0.5).expm1() * denoised
            denoised_mid = model(x_mid, _sigma_of(s) * s_in)
            x = (_sigma_of(t_next) / _sigma_of(t)) * x - (-h).expm1() * denoised_mid
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * 1.0 * sigma_up
    return x


def _sde_kd_step(model, x, denoised, sigma, sigma_next, noise_sampler, s_in):
    """One DPM-Solver++ SDE step (r = 1/2, eta = 1) as k-diffusion writes it."""
    t, t_next = _lambda(sigma), _lambda(sigma_next)
    h = t_next - t
    s = t + h * 0.5
    sd, su = _ancestral_step(_sigma_of(t), _sigma_of(s))
    s_ = _lambda(sd)
    x_mid = (_sigma_of(s_) / _sigma_of(t)) * x - (t - s_).expm1() * denoised
    x_mid = x_mid + noise_sampler(_sigma_of(t), _sigma_of(s)) * 1.0 * su
    denoised_mid = model(x_mid, _sigma_of(s) * s_in)
    sd, su = _ancestral_step(_sigma_of(t), _sigma_of(t_next))
    t_next_ = _lambda(sd)
    blended = (1 - 1.0) * denoised + 1.0 * denoised_mid
    x = (_sigma_of(t_next_) / _sigma_of(t)) * x - (t - t_next_).expm1() * blended
    return x + noise_sampler(_sigma_of(t), _sigma_of(t_next)) * 1.0 * su


def _sde_comfy_step(model, x, denoised, sigma, sigma_next, noise_sampler, s_in):
    """The same step as ComfyUI writes it, with the signal scales α = σ·e^λ (1 up to rounding for
    an epsilon model) kept explicit and the noise queried at the step's own sigmas."""
    lam_s, lam_t = _lambda(sigma), _lambda(sigma_next)
    h = lam_t - lam_s
    lam_mid = lam_s + 0.5 * h
    sigma_mid = _sigma_of(lam_mid)
    alpha_s, alpha_mid, alpha_t = sigma * lam_s.exp(), sigma_mid * lam_mid.exp(), sigma_next * lam_t.exp()
    sd, su = _ancestral_step(lam_s.neg().exp(), lam_mid.neg().exp())
    h_ = _lambda(sd) - lam_s
    x_mid = (alpha_mid / alpha_s) * (-h_).exp() * x - alpha_mid * (-h_).expm1() * denoised
    x_mid = x_mid + alpha_mid * noise_sampler(sigma, sigma_mid) * 1.0 * su
    denoised_mid = model(x_mid, sigma_mid * s_in)
    sd, su = _ancestral_step(lam_s.neg().exp(), lam_t.neg().exp())
    h_ = _lambda(sd) - lam_s
    blended = (1 - 1.0) * denoised + 1.0 * denoised_mid
    x = (alpha_t / alpha_s) * (-h_).exp() * x - alpha_t * (-h_).expm1() * blended
    return x + alpha_t * noise_sampler(sigma, sigma_next) * 1.0 * su


@torch.no_grad()
def dpmpp_sde(model, x: Tensor, sigmas: Tensor, noise_sampler: NoiseSampler, *, comfy: bool = True) -> Tensor:
    """DPM-Solver++ (stochastic, second order): two model calls per step, Brownian noise. Into 0,
    ComfyUI returns the denoised latent, k-diffusion takes an (equal up to rounding) Euler step."""
    s_in = _ones(x)
    step = _sde_comfy_step if comfy else _sde_kd_step
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        if sigmas[i + 1] == 0:
            x = denoised if comfy else x + _to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
        else:
            x = step(model, x, denoised, sigmas[i], sigmas[i + 1], noise_sampler, s_in)
    return x


@torch.no_grad()
def dpmpp_2m(model, x: Tensor, sigmas: Tensor, noise_sampler=None, *, comfy: bool = True) -> Tensor:
    """DPM-Solver++(2M): second order from the previous step's denoised latent, one call per step."""
    s_in = _ones(x)
    previous = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        t, t_next = _lambda(sigmas[i]), _lambda(sigmas[i + 1])
        h = t_next - t
        target = denoised
        if previous is not None and sigmas[i + 1] != 0:
            r = (t - _lambda(sigmas[i - 1])) / h
            target = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * previous
        x = (_sigma_of(t_next) / _sigma_of(t)) * x - (-h).expm1() * target
        previous = denoised
    return x


def _sde_noise(noise_sampler, sigma, sigma_next, h) -> Tensor:
    """The noise term of the multistep SDE solvers: σ_next · sqrt(1 − e^(−2h)) of unit noise."""
    return noise_sampler(sigma, sigma_next) * sigma_next * (-2 * h * 1.0).expm1().neg().sqrt() * 1.0


@torch.no_grad()
def dpmpp_2m_sde(model, x: Tensor, sigmas: Tensor, noise_sampler: NoiseSampler, *, comfy: bool = True,
                 solver_type: str = "midpoint") -> Tensor:
    """DPM-Solver++(2M) SDE (eta = 1), with the midpoint or Heun correction; the step into 0
    returns the denoised latent."""
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type {solver_type!r} is not midpoint or heun")
    s_in = _ones(x)
    previous, h, h_last = None, None, None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = _lambda(sigmas[i + 1]) - _lambda(sigmas[i])
            # k-diffusion's −h − eta·h and ComfyUI's h·(eta + 1) are the same float for eta = 1
            h_eta = h * (1.0 + 1)
            alpha_t = sigmas[i + 1] * _lambda(sigmas[i + 1]).exp() if comfy else None
            decay = sigmas[i + 1] / sigmas[i] * (-h * 1.0).exp()
            gain = (-h_eta).expm1().neg()
            x = decay * x + (alpha_t * gain if comfy else gain) * denoised
            if previous is not None:
                x = x + _2m_correction(h_eta, gain, alpha_t, h_last / h, solver_type) * (denoised - previous)
            x = x + _sde_noise(noise_sampler, sigmas[i], sigmas[i + 1], h)
        previous, h_last = denoised, h
    return x


def _2m_correction(h_eta: Tensor, gain: Tensor, alpha_t: Optional[Tensor], r: Tensor, solver_type: str) -> Tensor:
    """The weight of (denoised − previous) in the second-order SDE update."""
    if solver_type == "heun":
        phi = gain / (-h_eta) + 1
        return (alpha_t * phi if alpha_t is not None else phi) * (1 / r)
    half = 0.5 * alpha_t if alpha_t is not None else 0.5
    return half * gain * (1 / r)


@torch.no_grad()
def dpmpp_3m_sde(model, x: Tensor, sigmas: Tensor, noise_sampler: NoiseSampler, *, comfy: bool = True) -> Tensor:
    """DPM-Solver++(3M) SDE (eta = 1): third order from the two previous denoised latents (second
    order on the second step); the step into 0 returns the denoised latent."""
    s_in = _ones(x)
    denoised_1 = denoised_2 = None
    h, h_1, h_2 = None, None, None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = _lambda(sigmas[i + 1]) - _lambda(sigmas[i])
            h_eta = h * (1.0 + 1)
            alpha_t = sigmas[i + 1] * _lambda(sigmas[i + 1]).exp() if comfy else None
            if comfy:
                x = sigmas[i + 1] / sigmas[i] * (-h * 1.0).exp() * x + alpha_t * (-h_eta).expm1().neg() * denoised
            else:
                x = torch.exp(-h_eta) * x + (-h_eta).expm1().neg() * denoised
            x = _3m_correction(x, h_eta, alpha_t, denoised, denoised_1, denoised_2, h, h_1, h_2)
            x = x + _sde_noise(noise_sampler, sigmas[i], sigmas[i + 1], h)
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x


def _3m_correction(x, h_eta, alpha_t, denoised, denoised_1, denoised_2, h, h_1, h_2) -> Tensor:
    """Add the multistep terms: second order from one previous step, third from two."""
    phi_2 = h_eta.neg().expm1() / h_eta + 1
    if h_2 is not None:
        r0, r1 = h_1 / h, h_2 / h
        d1_0 = (denoised - denoised_1) / r0
        d1_1 = (denoised_1 - denoised_2) / r1
        d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
        d2 = (d1_0 - d1_1) / (r0 + r1)
        phi_3 = phi_2 / h_eta - 0.5
        if alpha_t is None:
            return x + phi_2 * d1 - phi_3 * d2
        return x + (alpha_t * phi_2) * d1 - (alpha_t * phi_3) * d2
    if h_1 is not None:
        d = (denoised - denoised_1) / (h_1 / h)
        return x + (phi_2 * d if alpha_t is None else (alpha_t * phi_2) * d)
    return x


@torch.no_grad()
def lcm(model, x: Tensor, sigmas: Tensor, noise_sampler: NoiseSampler, *, comfy: bool = True) -> Tensor:
    """Latent-consistency sampling (ComfyUI's): jump to the denoised latent, re-noise to the next
    sigma with fresh noise."""
    s_in = _ones(x)
    for i in range(len(sigmas) - 1):
        x = model(x, sigmas[i] * s_in)
        if sigmas[i + 1] > 0:
            x = noise_sampler(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] + x
    return x


# --- the entry point ----------------------------------------------------------------------------


class Algorithm(NamedTuple):
    function: Callable
    noise: Optional[str]  # None | "ancestral" | "brownian"
    options: tuple = ()
    brownian_on_device: bool = False  # ComfyUI's *_gpu variants


# ComfyUI sampler key → what runs. ComfyUI's "ddim" is Euler (its DDIM only differs in inpainting).
ALGORITHMS: dict[str, Algorithm] = {
    "euler": Algorithm(euler, None),
    "ddim": Algorithm(euler, None),
    "euler_ancestral": Algorithm(euler_ancestral, "ancestral"),
    "heun": Algorithm(heun, None),
    "dpm_2": Algorithm(dpm_2, None),
    "dpm_2_ancestral": Algorithm(dpm_2_ancestral, "ancestral"),
    "lms": Algorithm(lms, None),
    "dpmpp_2s_ancestral": Algorithm(dpmpp_2s_ancestral, "ancestral"),
    "dpmpp_sde": Algorithm(dpmpp_sde, "brownian"),
    "dpmpp_sde_gpu": Algorithm(dpmpp_sde, "brownian", (), True),
    "dpmpp_2m": Algorithm(dpmpp_2m, None),
    "dpmpp_2m_sde": Algorithm(dpmpp_2m_sde, "brownian"),
    "dpmpp_2m_sde_gpu": Algorithm(dpmpp_2m_sde, "brownian", (), True),
    "dpmpp_2m_sde_heun": Algorithm(dpmpp_2m_sde, "brownian", (("solver_type", "heun"),)),
    "dpmpp_2m_sde_heun_gpu": Algorithm(dpmpp_2m_sde, "brownian", (("solver_type", "heun"),), True),
    "dpmpp_3m_sde": Algorithm(dpmpp_3m_sde, "brownian"),
    "dpmpp_3m_sde_gpu": Algorithm(dpmpp_3m_sde, "brownian", (), True),
    "lcm": Algorithm(lcm, "ancestral"),
}


def _run_schedule(sampler, steps: int, table: _Table, comfy: bool) -> Tensor:
    """The sampling sigmas as the convention's tool computes them for this sampler."""
    discard = sampler.discard_penultimate_sigma if comfy else sampler.a1111_discard_penultimate_sigma
    uniform = not comfy and sampler.a1111_schedule == "Automatic"

    def build(n: int) -> Tensor:
        return _schedule(sampler.schedule, n, table, quantize=comfy, uniform=uniform)

    return _discard_penultimate(build, steps) if discard else build(steps)


def _noise_sampler(algorithm: Algorithm, x: Tensor, sigmas: Tensor, seed: int, draws: _Draws, comfy: bool):
    if algorithm.noise == "ancestral":
        return draws.next
    if algorithm.noise == "brownian":
        positive = sigmas[sigmas > 0]
        seeds = _seed64(seed) if comfy else [_seed64(seed + i) for i in range(x.shape[0])]
        return BrownianNoise(x, positive.min(), sigmas.max(), seeds, on_cpu=comfy and not algorithm.brownian_on_device)
    return None


def sample(sampler, eps_fn: EpsFn, shape: Sequence[int], seed: int, steps: int, noise: str = "comfyui",
           device="cpu", model_sigmas: Optional[Tensor] = None) -> Tensor:
    """Sample one latent (float32, on `device`, before VAE scaling) the way the `noise`
    convention's tool does for this sampler, schedule, seed and step count.

    `sampler` is a farm.sweep.samplers.Sampler; `eps_fn(x_in, t)` the (guided) noise prediction;
    `model_sigmas` the checkpoint's training sigmas (model_sigmas(), SDXL's by default)."""
    comfy = _is_comfy(noise)
    sampler.check_noise(noise)
    algorithm = ALGORITHMS[sampler.key]
    training = model_sigmas if model_sigmas is not None else _sdxl_sigmas()
    table = _table(training, comfy)
    sigmas = _run_schedule(sampler, steps, table, comfy).to(device)
    denoiser = Denoiser(eps_fn, training, quantize_timesteps=comfy, noise=noise)
    draws = _Draws(seed, shape, noise, device)
    x = _scale_initial(draws.first(), sigmas[0], float(table.sigmas[-1]), comfy)
    noise_sampler = _noise_sampler(algorithm, x, sigmas, seed, draws, comfy)
    return algorithm.function(denoiser, x, sigmas, noise_sampler, comfy=comfy, **dict(algorithm.options))
