"""How an SDXL pipeline fits one GPU: a memory plan made before loading, and clean-up between tasks.

`plan_render` is a pure function of (free VRAM, the model's component sizes, the options): it
picks the first of resident → resident + VAE tiling → model CPU offload (+ tiling) → sequential
offload whose estimated peak fits, never less than the options ask for. The loader applies it,
and falls back step by step when the load itself runs out of memory, as the renderer does at
render time.

Weights are counted exactly (parameters × bytes of the dtype, from the files' headers); what a
forward pass needs on top (activations) is an estimate from the architecture, stated below. So
the figures are computed, not measured: `farm.bench --gpu` measures on a real card.
"""

from __future__ import annotations

import gc
import json
import struct
from dataclasses import dataclass
from pathlib import Path

GiB = 1024 ** 3

# --- working memory on top of the weights (estimates from SDXL's architecture) ------------------
# UNet forward, fp16, SDPA attention: the skip connections and the largest transformer-block
# tensors, ~16 KiB per latent pixel per batch item (0.5 GiB at 1024², CFG batch of 2)
UNET_WORK_PER_LATENT_PIXEL = 16 * 1024
# VAE decode: its last up block runs 256 channels at full resolution; ~3 such tensors live at once
VAE_DECODE_CHANNELS, VAE_DECODE_TENSORS = 256, 3
VAE_TILE = 512  # pixels per side of a decode tile when tiling is on (SDXL's default, 1024, tiles nothing at 1024²)
TEXT_WORK = GiB // 10  # two CLIP encoders on 77-token chunks
SEQUENTIAL_RESIDENT = 3 * GiB // 10  # sequential offload keeps one layer's weights at a time
RESERVE = GiB // 4  # allocator slack and cuBLAS workspace
# training: activations kept for the backward pass, per latent pixel per image
TRAIN_WORK_PER_LATENT_PIXEL = {True: 64 * 1024, False: 512 * 1024}  # gradient checkpointing on / off
OFFLOAD_ORDER = ("none", "model", "sequential")


@dataclass(frozen=True)
class ComponentSizes:
    """Parameters per component (counts, not bytes)."""

    unet: int
    text_encoder: int
    text_encoder_2: int
    vae: int

    @property
    def total(self) -> int:
        return self.unet + self.text_encoder + self.text_encoder_2 + self.vae


# SDXL 1.0 base, counted from its configs (tests/test_pipeline.py checks these counts)
SDXL_BASE = ComponentSizes(unet=2_567_463_684, text_encoder=123_060_480, text_encoder_2=694_659_840, vae=83_653_863)
# LoRA parameters per unit of network_dim on SDXL's UNet (sd-scripts' networks.lora modules,
# no conv_dim): Σ (in + out) over the 722 Linears (tests/test_memory.py counts them)
SDXL_LORA_PARAMS_PER_DIM = 2_659_840


@dataclass(frozen=True)
class MemoryOptions:
    """What a plan depends on besides free memory and sizes."""

    dtype_bytes: int = 2  # 2: fp16/bf16; 4: fp32
    vae_upcast: bool = True  # SDXL's VAE decodes in fp32 (force_upcast) when the model is fp16
    width: int = 1024
    height: int = 1024
    batch: int = 2  # the UNet sees positive and negative as one batch
    offload: str = "none"  # the least offload to use (the user's --cpu-offload)
    vae_tiling: bool = False  # tiling whatever the plan says (the user's --vae-tiling)


@dataclass(frozen=True)
class MemoryPlan:
    offload: str  # none | model | sequential
    vae_tiling: bool
    need_bytes: int  # estimated peak for this choice
    free_bytes: int | None  # None: not a CUDA device (nothing to plan)
    fits: bool

    @property
    def mode(self) -> str:
        mode = {"none": "resident", "model": "model CPU offload", "sequential": "sequential CPU offload"}[self.offload]
        return mode + (" + VAE tiling" if self.vae_tiling else "")

    def describe(self) -> str:
        mode = self.mode
        if self.free_bytes is None:
            return f"memory plan: {mode} (not a CUDA device)"
        verdict = "" if self.fits else "; does not fit by the estimate, trying anyway"
        return (f"memory plan: {mode} (needs ~{self.need_bytes / GiB:.1f} GiB of "
                f"{self.free_bytes / GiB:.1f} GiB free{verdict})")


def vae_decode_work(width: int, height: int, tiling: bool, dtype_bytes: int) -> int:
    if tiling:
        width, height = min(width, VAE_TILE), min(height, VAE_TILE)
    return VAE_DECODE_TENSORS * VAE_DECODE_CHANNELS * width * height * dtype_bytes


def render_need(sizes: ComponentSizes, options: MemoryOptions, offload: str, tiling: bool) -> int:
    """Estimated peak bytes on the GPU for one render with this offload mode and tiling."""
    b = options.dtype_bytes
    vae_bytes = 4 if options.vae_upcast else b
    unet, te1, te2, vae = sizes.unet * b, sizes.text_encoder * b, sizes.text_encoder_2 * b, sizes.vae * vae_bytes
    unet_work = options.batch * (options.width // 8) * (options.height // 8) * UNET_WORK_PER_LATENT_PIXEL
    vae_work = vae_decode_work(options.width, options.height, tiling, vae_bytes)
    if offload == "none":
        need = unet + te1 + te2 + vae + max(unet_work, vae_work, TEXT_WORK)
    elif offload == "model":  # one model on the GPU at a time
        need = max(max(te1, te2) + TEXT_WORK, unet + unet_work, vae + vae_work)
    else:
        need = SEQUENTIAL_RESIDENT + max(unet_work, vae_work, TEXT_WORK)
    return need + RESERVE


def candidates(options: MemoryOptions) -> list[tuple[str, bool]]:
    """(offload, tiling) from the fastest to the smallest, none below what the options ask."""
    floor = OFFLOAD_ORDER.index(options.offload)
    steps = [("none", False), ("none", True), ("model", False), ("model", True), ("sequential", True)]
    return [(o, t) for o, t in steps if OFFLOAD_ORDER.index(o) >= floor and (t or not options.vae_tiling)]


def plan_render(free_bytes: int | None, sizes: ComponentSizes, options: MemoryOptions = MemoryOptions()) -> MemoryPlan:
    """The fastest setting whose estimated peak fits `free_bytes` (None: not a CUDA device,
    where nothing is offloaded). When nothing fits, the smallest, marked `fits=False`."""
    if free_bytes is None:  # offloading to the CPU means nothing on the CPU
        tiling = options.vae_tiling
        return MemoryPlan("none", tiling, render_need(sizes, options, "none", tiling), None, True)
    steps = candidates(options)
    for offload, tiling in steps:
        need = render_need(sizes, options, offload, tiling)
        if need <= free_bytes:
            return MemoryPlan(offload, tiling, need, free_bytes, True)
    return MemoryPlan(offload, tiling, need, free_bytes, False)


def next_step(plan: MemoryPlan, sizes: ComponentSizes, options: MemoryOptions = MemoryOptions()) -> MemoryPlan | None:
    """The load-time fallback after `plan` ran out of memory while moving the model to the GPU:
    the next setting with more offload (tiling does not help a load), or None."""
    for offload, tiling in candidates(options):
        if OFFLOAD_ORDER.index(offload) > OFFLOAD_ORDER.index(plan.offload):
            tiling = tiling or plan.vae_tiling
            need = render_need(sizes, options, offload, tiling)
            fits = plan.free_bytes is None or need <= plan.free_bytes
            return MemoryPlan(offload, tiling, need, plan.free_bytes, fits)
    return None


def train_need(sizes: ComponentSizes, mode: str, trainable: int, weight_bytes: int, optimizer: str,
               resolution: int = 1024, batch: int = 1, gradient_checkpointing: bool = True) -> int:
    """Estimated peak bytes for training once latents and captions are cached (VAE and text
    encoders off the GPU). LoRA: frozen UNet in `weight_bytes`, `trainable` LoRA parameters in
    fp32. DreamBooth: the whole UNet trains in fp32 (`trainable` is ignored)."""
    states = {"adamw": 8, "adamw8bit": 2, "adafactor": 0, "prodigy": 16}[optimizer.lower()]
    if mode == "dreambooth":
        trainable, frozen = sizes.unet, 0
    else:
        frozen = sizes.unet * weight_bytes
    params = trainable * (4 + 4 + states)  # weight, gradient, optimizer state
    if optimizer.lower() == "adafactor":  # factored second moments: rows + columns, negligible
        params += trainable * 4 // 100
    work = batch * (resolution // 8) ** 2 * TRAIN_WORK_PER_LATENT_PIXEL[gradient_checkpointing]
    return frozen + params + work + RESERVE


# --- sizes from the files, before loading ----------------------------------------------------

_SINGLE_FILE_PREFIXES = {"unet": "model.diffusion_model.", "text_encoder": "conditioner.embedders.0.",
                         "text_encoder_2": "conditioner.embedders.1.", "vae": "first_stage_model."}


def _header(path: Path) -> dict:
    with open(path, "rb") as handle:
        length = struct.unpack("<Q", handle.read(8))[0]
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return header


def _count(header: dict, prefix: str = "") -> int:
    total = 0
    for key, info in header.items():
        if key.startswith(prefix) and info.get("dtype", "").startswith(("F", "BF")):
            count = 1
            for dim in info["shape"]:
                count *= dim
            total += count
    return total


def model_sizes(path: str | Path) -> ComponentSizes:
    """Parameter counts per component, read from safetensors headers (nothing is loaded)."""
    path = Path(path)
    if path.is_file():
        header = _header(path)
        return ComponentSizes(**{name: _count(header, prefix) for name, prefix in _SINGLE_FILE_PREFIXES.items()})
    counts = {}
    for name in ("unet", "text_encoder", "text_encoder_2", "vae"):
        files = sorted((path / name).glob("*.safetensors"))
        plain = [f for f in files if f.name.count(".") == 1 or "-of-" in f.name and ".fp16" not in f.name]
        counts[name] = sum(_count(_header(f)) for f in (plain or files))
    return ComponentSizes(**counts)


def lora_parameters(unet, dim: int, conv_dim: int | None = None) -> int:
    """Trainable parameters of a kohya LoRA of rank `dim` on `unet` (a meta-device one will do)."""
    from farm.models import kohya

    targets = kohya.lora_targets(unet, kohya.UNET_TARGET_BLOCKS, kohya.UNET_CONV_BLOCKS if conv_dim else ())
    modules = dict(unet.named_modules())

    def fan(module) -> int:  # in + out of a Linear or a convolution
        if hasattr(module, "in_features"):
            return module.in_features + module.out_features
        return module.in_channels * module.kernel_size[0] * module.kernel_size[1] + module.out_channels

    return (sum(dim * fan(modules[name]) for name in targets.linear)
            + sum((conv_dim or 0) * fan(modules[name]) for name in targets.conv))


def free_vram(device: str) -> int | None:
    """Free bytes on a CUDA device, None for anything else."""
    import torch

    if not device.startswith("cuda") or not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return free


def release() -> None:
    """Collect dropped pipelines (diffusers modules hold reference cycles) and hand their CUDA
    memory back to the driver."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def bf16_supported(device: str) -> bool:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return True
