"""sd-scripts' SDXL conventions (farm.models.kohya): names, module set, hashes, metadata, layouts. CPU, fp32."""

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file, save, save_file

from farm.models import kohya

# SDXL 1.0 base's UNet layout (the block structure of diffusers' config of it)
SDXL_UNET = {"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
             "layers_per_block": 2, "mid_block_type": "UNetMidBlock2DCrossAttn"}


@pytest.fixture(scope="module")
def pipe(tiny_model):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(tiny_model, local_files_only=True)


def test_sdxl_unet_paths_map_to_sgm_block_numbers():
    # SGM numbering: input_blocks.0 is conv_in, then per level two [resnet, transformer] layers
    # and the downsampler as its own entry (3, 6); middle_block 0/1/2; output_blocks three per
    # level, the upsampler third in the level's last block (2.2, 5.2)
    names = kohya.SgmUNetNames(SDXL_UNET)
    expected = {
        "conv_in": "input_blocks.0.0",
        "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0",
        "down_blocks.0.resnets.1.conv1": "input_blocks.2.0.in_layers.2",
        "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q":
            "input_blocks.4.1.transformer_blocks.0.attn1.to_q",
        "down_blocks.1.resnets.0.conv_shortcut": "input_blocks.4.0.skip_connection",
        "down_blocks.1.downsamplers.0.conv": "input_blocks.6.0.op",
        "down_blocks.2.attentions.1.proj_in": "input_blocks.8.1.proj_in",
        "mid_block.resnets.0.norm1": "middle_block.0.in_layers.0",
        "mid_block.attentions.0.transformer_blocks.9.ff.net.2": "middle_block.1.transformer_blocks.9.ff.net.2",
        "mid_block.resnets.1.time_emb_proj": "middle_block.2.emb_layers.1",
        "up_blocks.0.attentions.2.transformer_blocks.3.attn2.to_out.0":
            "output_blocks.2.1.transformer_blocks.3.attn2.to_out.0",
        "up_blocks.0.upsamplers.0.conv": "output_blocks.2.2.conv",
        "up_blocks.1.resnets.0.conv2": "output_blocks.3.0.out_layers.3",
        "up_blocks.1.upsamplers.0.conv": "output_blocks.5.2.conv",
        "up_blocks.2.resnets.2.conv_shortcut": "output_blocks.8.0.skip_connection",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
    }
    assert {path: names.module(path) for path in expected} == expected
    with pytest.raises(ValueError):
        names.module("down_blocks.3.resnets.0.conv1")


def test_sdxl_module_set_and_keys_agree_with_diffusers_single_file_reader():
    """SDXL-sized models on the meta device (no weights): sd-scripts' 722 LoRA modules, and every
    UNet / VAE key survives diffusers' own SGM → diffusers conversion."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    from farm.models.sdxl import sdxl_base_config

    config = sdxl_base_config()
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config / "vae"))
    assert len(kohya.lora_targets(unet, kohya.UNET_TARGET_BLOCKS).linear) == 722
    with_conv = kohya.lora_targets(unet, kohya.UNET_TARGET_BLOCKS, kohya.UNET_CONV_BLOCKS)
    # + 17 resnets' emb_layers.1 and 11 skip_connections (1×1); 3×3: 17 × 2 resnet convs, 2 op, 2 conv
    assert (len(with_conv.linear), len(with_conv.conv)) == (722 + 28, 38)
    state = unet.state_dict()
    names = kohya.SgmUNetNames(unet.config)
    back = convert_ldm_unet_checkpoint({kohya.UNET_PREFIX + names.key(k): v for k, v in state.items()}, unet.config)
    assert back.keys() == state.keys() and all(back[k] is state[k] for k in state)
    vae_state = vae.state_dict()
    ldm = {kohya.VAE_PREFIX + k: v for k, v in kohya.ldm_vae_state(vae_state, 4).items()}
    assert convert_ldm_vae_checkpoint(ldm, vae.config).keys() == vae_state.keys()


def test_tiny_unet_names_come_from_its_config(pipe):
    # tiny: levels (32, 64), 2 layers each, transformer depth (1, 2): level 0 has no transformers,
    # input_blocks.3 is its downsampler, level 1 (4, 5) has two transformer layers per block
    names = kohya.SgmUNetNames(pipe.unet.config)
    assert names.module("down_blocks.1.attentions.1.transformer_blocks.1.attn2.to_k") == \
        "input_blocks.5.1.transformer_blocks.1.attn2.to_k"
    assert names.module("down_blocks.0.downsamplers.0.conv") == "input_blocks.3.0.op"
    assert names.module("up_blocks.0.upsamplers.0.conv") == "output_blocks.2.2.conv"
    assert names.module("up_blocks.1.resnets.2.conv1") == "output_blocks.5.0.in_layers.2"
    targets = kohya.lora_targets(pipe.unet, kohya.UNET_TARGET_BLOCKS)
    assert targets.conv == []
    # 6 transformer models (2 down, 1 mid, 3 up) × (proj_in, proj_out) + 12 blocks × 10 linears
    assert len(targets.linear) == 6 * 2 + 12 * 10
    kinds = {path.split("transformer_blocks.")[-1].split(".", 1)[-1] if "transformer_blocks" in path
             else path.rsplit(".", 1)[-1] for path in targets.linear}
    assert kinds == {"attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                     "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"}
    text = kohya.lora_targets(pipe.text_encoder, kohya.TEXT_TARGET_BLOCKS)
    assert {p.split(".", 3)[-1] for p in text.linear} == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                          "self_attn.out_proj", "mlp.fc1", "mlp.fc2"}
    assert kohya.lora_name(kohya.LORA_PREFIX_TE1, kohya.clip_path(pipe.text_encoder, "encoder.layers.0.mlp.fc1")) \
        == "lora_te1_text_model_encoder_layers_0_mlp_fc1"


def _unet_output(unet):
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=generator)
    hidden = torch.randn(1, 5, 64, generator=generator)
    added = {"text_embeds": torch.randn(1, 32, generator=generator),
             "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    with torch.no_grad():
        return unet(sample, torch.tensor([500]), hidden, added_cond_kwargs=added).sample


def _peft_unet(tiny_model, targets, dim, alpha, conv_dim=None):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet", local_files_only=True)
    unet.add_adapter(kohya.lora_config(targets(unet), dim, alpha, conv_dim, 1.0))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.3)
    return unet


def test_both_key_styles_load_through_the_farms_adapter_cache(tiny_model, tmp_path):
    """Files others made with diffusers-style kohya keys (`lora_unet_down_blocks_…`, alpha = rank)
    and the SGM-named files the farm writes now both load, each changing the UNet as its adapter did."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_kohya
    from peft.utils import get_peft_model_state_dict

    from farm.models.artifacts import sha256_file
    from farm.render.lora import AdapterCache
    from farm.sweep.plan import LoraUse

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model, local_files_only=True)
    base = _unet_output(pipe.unet)
    old = _peft_unet(tiny_model, lambda u: kohya.LoraTargets(["to_q", "to_k", "to_v", "to_out.0"]), 4, 4)
    old_file = tmp_path / "old.safetensors"
    old_state = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in get_peft_model_state_dict(old).items()})
    save_file({k: v.contiguous() for k, v in old_state.items()}, old_file)
    assert any(k.startswith("lora_unet_down_blocks_1_attentions_0_") for k in old_state)

    new = _peft_unet(tiny_model, lambda u: kohya.lora_targets(u, kohya.UNET_TARGET_BLOCKS, kohya.UNET_CONV_BLOCKS),
                     8, 1, conv_dim=4)
    new_file = tmp_path / "new.safetensors"
    names = kohya.SgmUNetNames(new.config)
    save_file(kohya.lora_state_dict([(kohya.LORA_PREFIX_UNET, new, names.module)]), new_file)
    new_state = load_file(new_file)
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in new_state
    assert new_state["lora_unet_output_blocks_2_2_conv.lora_down.weight"].shape[2:] == (3, 3)

    cache = AdapterCache(pipe)
    try:
        for peft_unet, path in ((old, old_file), (new, new_file)):
            cache.activate([LoraUse(name=path.stem, path=str(path), sha256=sha256_file(path), strength=1.0)])
            loaded = _unet_output(pipe.unet)
            assert (_unet_output(peft_unet) - loaded).abs().max() <= 1e-5
            assert (loaded - base).abs().max() > 1e-2
    finally:
        cache.activate([])
    assert (_unet_output(pipe.unet) - base).abs().max() == 0


def test_addnet_hashes_are_sd_scripts_definitions():
    tensors = {"b.weight": torch.arange(300_000, dtype=torch.float32).reshape(600, 500), "a.alpha": torch.tensor(1.0)}
    meta = {"ss_network_dim": "8", "modelspec.title": "x"}
    model_hash, legacy_hash = kohya.addnet_hashes(tensors, meta)
    # independently: the file as it would be written with only the ss_* keys
    data = save(tensors, {"ss_network_dim": "8"})
    start = 8 + int.from_bytes(data[:8], "little")
    assert model_hash == hashlib.sha256(data[start:]).hexdigest()
    assert legacy_hash == hashlib.sha256(data[1 << 20:(1 << 20) + (1 << 16)]).hexdigest()[:8]
    # the model hash ignores metadata: it is the hash of the written file's tensor bytes too
    full = save(tensors, meta)
    assert model_hash == hashlib.sha256(full[8 + int.from_bytes(full[:8], "little"):]).hexdigest()


def test_modelspec_keys():
    lora = kohya.modelspec(lora=True, title="subj", resolution=(1024, 1024), timestamp=0)
    assert lora["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert lora["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert (lora["modelspec.title"], lora["modelspec.resolution"]) == ("subj", "1024x1024")
    assert lora["modelspec.prediction_type"] == "epsilon" and lora["modelspec.sai_model_spec"] == "1.0.1"
    assert "modelspec.date" in lora
    checkpoint = kohya.modelspec(lora=False, title="m", resolution=(64, 64), prediction_type="v_prediction")
    assert checkpoint["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    assert checkpoint["modelspec.prediction_type"] == "v"
    json.dumps(checkpoint)  # all strings


def test_open_clip_layout(pipe):
    state = kohya.open_clip_state(pipe.text_encoder_2.state_dict(), logit_scale=torch.tensor(4.6052))
    hf = pipe.text_encoder_2.state_dict()
    q, k, v = (hf[f"text_model.encoder.layers.1.self_attn.{p}_proj.weight"] for p in "qkv")
    assert torch.equal(state["transformer.resblocks.1.attn.in_proj_weight"], torch.cat([q, k, v]))
    assert torch.equal(state["text_projection"], hf["text_projection.weight"].t())
    assert torch.equal(state["positional_embedding"], hf["text_model.embeddings.position_embedding.weight"])
    assert {"ln_final.weight", "token_embedding.weight", "transformer.resblocks.0.mlp.c_fc.weight",
            "transformer.resblocks.0.ln_1.bias", "transformer.resblocks.0.attn.out_proj.weight",
            "logit_scale"} <= state.keys()
