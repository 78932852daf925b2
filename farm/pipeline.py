"""Load an SDXL pipeline from a diffusers folder or a single `.safetensors` checkpoint.

Only safetensors weights are ever loaded (pickled .ckpt/.bin can run code). Memory options are
the ones that let SDXL fit a 6 GB laptop GPU (the seeds' RTX 2060s): fp16 weights, VAE tiling and
slicing, model or sequential CPU offload. SDXL's VAE overflows in fp16 (black or NaN images);
the pipeline upcasts it to fp32 for decoding when its config says `force_upcast`, which we keep on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import ModelError


@dataclass(frozen=True)
class PipelineOptions:
    """How to load and run a pipeline on one device. Defaults suit the device found."""

    device: str | None = None  # None: cuda if there is one, else cpu
    dtype: str = "auto"  # auto: fp16 on cuda, fp32 on cpu; or fp32 / fp16 / bf16
    vae_tiling: bool = False  # decode in tiles: large images on small GPUs
    vae_slicing: bool = False
    cpu_offload: str = "none"  # none | model (≈6 GB cards) | sequential (slowest, least VRAM)
    threads: int | None = None  # torch CPU threads; one per actor beats sharing cores
    single_file_config: str | None = None  # diffusers folder with the configs of a single-file
    # checkpoint's components; default: SDXL 1.0 base's, built offline (farm.tiny.sdxl_base_config)


def pick_device(requested: str | None = None) -> str:
    import torch

    if requested:
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def torch_dtype(options: PipelineOptions, device: str):
    import torch

    names = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if options.dtype == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    if options.dtype not in names:
        raise ModelError(f"dtype {options.dtype!r}: use auto, fp32, fp16 or bf16")
    return names[options.dtype]


def load_pipeline(path: str | Path, options: PipelineOptions = PipelineOptions()):
    """An SDXL text-to-image pipeline on the chosen device, with progress bars off."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    quiet_libraries()
    path = Path(path)
    device = pick_device(options.device)
    if options.threads and device == "cpu":
        torch.set_num_threads(options.threads)
    dtype = torch_dtype(options, device)
    try:
        if path.is_dir():
            pipe = StableDiffusionXLPipeline.from_pretrained(
                path, dtype=dtype, use_safetensors=True, local_files_only=True)
        else:
            from .tiny import sdxl_base_config

            # the component configs come from a local folder: offline there is no hub to ask
            pipe = StableDiffusionXLPipeline.from_single_file(
                str(path), dtype=dtype, local_files_only=True,
                config=options.single_file_config or str(sdxl_base_config()))
    except Exception as exc:  # diffusers/transformers raise many types for a file that is not SDXL
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{path}: cannot load as SDXL: {first_line}") from None
    pipe.set_progress_bar_config(disable=True)
    if options.vae_tiling:
        pipe.vae.enable_tiling()
    if options.vae_slicing:
        pipe.vae.enable_slicing()
    if options.cpu_offload == "model":
        pipe.enable_model_cpu_offload()
    elif options.cpu_offload == "sequential":
        pipe.enable_sequential_cpu_offload()
    else:
        pipe.to(device)
    return pipe


def quiet_libraries() -> None:
    """Progress bars and per-load notices from diffusers/transformers/peft drown the farm's log."""
    import warnings

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*Already found a `peft_config`.*")
    warnings.filterwarnings("ignore", message=".*requires torchvision.*")


def describe_device(device: str) -> str:
    """`cuda:0 NVIDIA GeForce RTX 2060` or `cpu`, for the manifest."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index or 0
        return f"{device} {torch.cuda.get_device_name(index)}"
    return device
