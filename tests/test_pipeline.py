"""Loading SDXL: folders, single files (offline, with the built-in SDXL base configs), errors."""

import pytest

from farm.errors import ModelError
from farm.render.pipeline import PipelineOptions, load_pipeline


def test_sdxl_base_configs_describe_sdxl_exactly(farm_cache):
    """Built offline, the configs a single-file checkpoint is read with give SDXL 1.0 base's
    architecture: the published parameter counts of each component."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from farm.models.sdxl import sdxl_base_config

    folder = sdxl_base_config()
    with init_empty_weights():  # no memory for 3.5 B parameters
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        clip_l = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2"))
    counts = [sum(p.numel() for p in m.parameters()) for m in (unet, vae, clip_l, clip_g)]
    assert counts == [2_567_463_684, 83_653_863, 123_060_480, 694_659_840]
    assert CLIPTokenizer.from_pretrained(folder / "tokenizer_2").pad_token == "!"


def test_a_safetensors_file_that_is_not_a_checkpoint_is_one_clear_error(farm_cache):
    from farm.models.tiny import resolve_tiny

    lora = resolve_tiny("tiny:lora/not-a-model")
    with pytest.raises(ModelError) as info:
        load_pipeline(lora, PipelineOptions(device="cpu"))
    message = str(info.value)
    assert message.startswith(f"{lora}: cannot load as SDXL: ") and "\n" not in message


def test_folder_loads_on_the_requested_device_and_dtype(tiny_model):
    import torch

    pipe = load_pipeline(tiny_model, PipelineOptions(device="cpu", dtype="bf16"))
    assert pipe.unet.dtype == torch.bfloat16 and pipe.device.type == "cpu"
    with pytest.raises(ModelError, match="dtype 'fp8'"):
        load_pipeline(tiny_model, PipelineOptions(device="cpu", dtype="fp8"))


def test_vae_tiling_tiles_sdxl_at_1024(farm_cache):
    """diffusers' default tile is the VAE's sample size (1024 for SDXL), which tiles nothing at
    1024²: the farm's tiling uses 512 px tiles."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL

    from farm.render.pipeline import enable_vae_tiling
    from farm.models.sdxl import sdxl_base_config

    with init_empty_weights():
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(sdxl_base_config() / "vae"))
    enable_vae_tiling(vae)
    assert vae.use_tiling and (vae.tile_sample_min_size, vae.tile_latent_min_size) == (512, 64)
