"""Load an SDXL pipeline from a diffusers folder or a single `.safetensors` checkpoint.

Only safetensors weights are ever loaded (pickled .ckpt/.bin can run code). Memory options are
the ones that let SDXL fit a 6 GB laptop GPU (the seeds' RTX 2060s): fp16 weights, VAE tiling and
slicing, model or sequential CPU offload. SDXL's VAE overflows in fp16 (black or NaN images);
the pipeline upcasts it to fp32 for decoding when its config says `force_upcast`, which we keep on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from farm.errors import ModelError, first_line
from farm.models.sdxl import quiet_libraries


@dataclass(frozen=True)
class PipelineOptions:
    """How to load and run a pipeline on one device. Defaults suit the device found."""

    device: str | None = None  # None: cuda if there is one, else cpu
    dtype: str = "auto"  # auto: fp16 on cuda, fp32 on cpu; or fp32 / fp16 / bf16
    vae_tiling: bool = False  # decode in tiles whatever the plan says: large images on small GPUs
    cpu_offload: str = "none"  # the least offload: none | model | sequential; the memory plan may go
    # further when the model would not fit the free VRAM (see farm.render.memory)
    threads: int | None = None  # torch CPU threads; one per actor beats sharing cores
    single_file_config: str | None = None  # diffusers folder with the configs of a single-file
    # checkpoint's components; default: SDXL 1.0 base's, built offline (farm.models.sdxl.sdxl_base_config)


def pick_device(requested: str | None = None) -> str:
    import torch

    if requested:
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def torch_dtype(options: PipelineOptions, device: str):
    import torch

    from farm.render.memory import bf16_supported

    names = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if options.dtype == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    if options.dtype not in names:
        raise ModelError(f"dtype {options.dtype!r}: use auto, fp32, fp16 or bf16")
    if options.dtype == "bf16" and not bf16_supported(device):
        raise ModelError(f"dtype bf16: {device} has no bfloat16 support (a GPU before Ampere, e.g. an RTX 20xx); "
                         "use fp16 or auto")
    return names[options.dtype]


def memory_options(options: PipelineOptions, dtype, width: int = 1024, height: int = 1024):
    """What the memory plan needs from the options (`farm.render.memory.MemoryOptions`)."""
    import torch

    from farm.render.memory import MemoryOptions

    return MemoryOptions(dtype_bytes=4 if dtype == torch.float32 else 2, vae_upcast=dtype == torch.float16,
                         width=width, height=height, offload=options.cpu_offload, vae_tiling=options.vae_tiling)


def load_pipeline(path: str | Path, options: PipelineOptions = PipelineOptions()):
    """An SDXL text-to-image pipeline on the chosen device, with progress bars off."""
    return load_planned(path, options)[0]


def load_planned(path: str | Path, options: PipelineOptions = PipelineOptions()):
    """(pipeline, MemoryPlan, notes): the pipeline placed on its device as the memory plan says
    (resident, VAE tiling, model or sequential CPU offload: the fastest that fits the free VRAM,
    never less than the options ask), falling back one step at a time when moving it to the
    GPU runs out of memory anyway. `notes` says what the load needed."""
    import torch

    from farm.render import memory

    quiet_libraries()
    path = Path(path)
    device = pick_device(options.device)
    if options.threads and device == "cpu":
        torch.set_num_threads(options.threads)
    if options.cpu_offload not in memory.OFFLOAD_ORDER:
        raise ModelError(f"cpu_offload {options.cpu_offload!r}: use none, model or sequential")
    dtype = torch_dtype(options, device)
    free = memory.free_vram(device)
    sizes = memory.model_sizes(path) if free is not None else memory.ComponentSizes(0, 0, 0, 0)
    wanted = memory_options(options, dtype)
    plan = memory.plan_render(free, sizes, wanted)
    pipe = _read(path, options, dtype)
    pipe.set_progress_bar_config(disable=True)
    notes = [plan.describe()]
    while True:
        try:
            place(pipe, plan, device)
            return pipe, plan, notes
        except torch.cuda.OutOfMemoryError:
            smaller = memory.next_step(plan, sizes, wanted)
            pipe.remove_all_hooks()
            pipe.to("cpu")
            memory.release()
            if smaller is None:
                del pipe
                memory.release()
                raise ModelError(f"{path}: out of GPU memory while loading, even with sequential CPU offload") from None
            plan = smaller
            notes.append(f"out of memory while loading: {plan.mode} instead")


def place(pipe, plan, device: str) -> None:
    """Apply a memory plan: VAE tiling, then the pipeline on the device or behind offload hooks."""
    if plan.vae_tiling:
        enable_vae_tiling(pipe.vae)
    if plan.offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif plan.offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        pipe.to(device)


def enable_vae_tiling(vae) -> None:
    """Tiled VAE decode in tiles of at most `memory.VAE_TILE` pixels: diffusers' default tile is
    the VAE's sample size, 1024 for SDXL, which tiles nothing at 1024²."""
    from farm.render.memory import VAE_TILE

    vae.enable_tiling()
    if vae.tile_sample_min_size > VAE_TILE:
        scale = 2 ** (len(vae.config.block_out_channels) - 1)
        vae.tile_sample_min_size = VAE_TILE
        vae.tile_latent_min_size = VAE_TILE // scale


def _read(path: Path, options: PipelineOptions, dtype):
    """The pipeline's weights from a folder or a single file, on the CPU."""
    from diffusers import StableDiffusionXLPipeline

    try:
        if path.is_dir():
            return StableDiffusionXLPipeline.from_pretrained(
                path, dtype=dtype, use_safetensors=True, local_files_only=True)
        from farm.models.sdxl import sdxl_base_config

        # the component configs come from a local folder: offline there is no hub to ask
        config = options.single_file_config or str(sdxl_base_config())
        extra = _second_text_encoder(path, config, dtype)
        return StableDiffusionXLPipeline.from_single_file(
            str(path), dtype=dtype, local_files_only=True, config=config, **extra)
    except Exception as exc:  # diffusers/transformers raise many types for a file that is not SDXL
        raise ModelError(f"{path}: cannot load as SDXL: {first_line(exc)}") from None


def _second_text_encoder(path: Path, config: str, dtype) -> dict:
    """diffusers tells SDXL's two text encoders apart by width (768 and 1280). When a model's
    are equally wide (the tiny model), it would read the first one's weights into the second:
    then the second is read from its own keys only (`conditioner.embedders.1.`)."""
    import json

    from safetensors import safe_open

    first = "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight"
    second = "conditioner.embedders.1.model."
    config_file = Path(config) / "text_encoder_2" / "config.json"
    if not config_file.is_file():
        return {}
    width = json.loads(config_file.read_text()).get("hidden_size")
    with safe_open(str(path), "pt") as handle:
        keys = list(handle.keys())
        if first not in keys or handle.get_slice(first).get_shape()[-1] != width:
            return {}
        state = {k: handle.get_tensor(k) for k in keys if k.startswith(second)}
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModelWithProjection

    model = create_diffusers_clip_model_from_ldm(CLIPTextModelWithProjection, state, config=config,
                                                 subfolder="text_encoder_2", torch_dtype=dtype, local_files_only=True)
    return {"text_encoder_2": model}


def describe_device(device: str) -> str:
    """`cuda:0 NVIDIA GeForce RTX 2060` or `cpu`, for the manifest."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index or 0
        return f"{device} {torch.cuda.get_device_name(index)}"
    return device
