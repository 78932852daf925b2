"""Tiny random-weight SDXL models and LoRAs, built offline, for tests and the demo.

The tiny model uses the real diffusers/transformers classes (a UNet with `text_time` added
embeddings, two CLIP text encoders, a VAE with SDXL's scale factor 8) and CLIP's real BPE
vocabulary, so it is loaded by exactly the code path a user's SDXL folder takes. Weights are
seeded, so the same version of this module always builds the same bytes.

Specs name them as `tiny:sdxl` (model) and `tiny:lora/NAME` (a LoRA, seeded from NAME), and
`farm score --clip tiny:clip` a tiny CLIP; the farm builds them on first use into a cache folder and
reuses them after.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

from farm.errors import ModelError
from farm.files import publish_folder
from farm.models.cache import farm_cache
from farm.models.kohya import ATTENTION_LORA_TARGETS
from farm.models.sdxl import SCHEDULER, quiet_libraries, write_clip_vocab

TINY_MODEL = "tiny:sdxl"
TINY_LORA_PREFIX = "tiny:lora/"
TINY_SUBJECT = "tiny:subject"  # a procedural kohya dataset: img/4_w0ut3r man, reg/1_man
TINY_CLIP = "tiny:clip"  # a random-weight transformers CLIPModel folder, for the CLIP-T / CLIP-I scores
# Bump when the builders below change, so caches rebuild instead of serving stale weights.
TINY_VERSION = "1"

_TEXT_ENCODER = dict(
    vocab_size=49408, hidden_size=32, intermediate_size=37, num_attention_heads=4,
    num_hidden_layers=2, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
    pad_token_id=1, projection_dim=32, hidden_act="gelu",
)
_UNET = dict(
    block_out_channels=(32, 64), layers_per_block=2, sample_size=16,
    in_channels=4, out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4), use_linear_projection=True,
    transformer_layers_per_block=(1, 2), cross_attention_dim=64,
    addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + 32, norm_num_groups=32,
)
# CLIP's real vocabulary (so prompts tokenize as with a real CLIP), everything else tiny.
_CLIP_TEXT = dict(
    vocab_size=49408, hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
    max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
)
_CLIP_VISION = dict(
    hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, image_size=32, patch_size=8,
)
_VAE = dict(
    block_out_channels=(8, 16, 32, 32), in_channels=3, out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=64,
    scaling_factor=0.13025,
)


def cache_dir() -> Path:
    """Where tiny models are cached: `tiny-vN/` in the farm's cache."""
    return farm_cache() / f"tiny-v{TINY_VERSION}"


def build_tiny_pipeline(seed: int = 0):
    """A random-weight StableDiffusionXLPipeline in memory, deterministic for a given seed."""
    import torch
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        vocab, merges = write_clip_vocab(Path(tmp))
        tokenizer = CLIPTokenizer(str(vocab), str(merges), model_max_length=77)
        tokenizer_2 = CLIPTokenizer(str(vocab), str(merges), model_max_length=77, pad_token="!")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**_UNET)
    vae = AutoencoderKL(**_VAE)
    text_config = CLIPTextConfig(**_TEXT_ENCODER)
    text_encoder = CLIPTextModel(text_config)
    text_encoder_2 = CLIPTextModelWithProjection(text_config)
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=EulerDiscreteScheduler(**SCHEDULER),
    )


def save_tiny_model(folder: Path, seed: int = 0) -> Path:
    """Build the tiny SDXL and save it as a diffusers folder (safetensors only) at `folder`."""

    def build(tmp: Path) -> Path:
        quiet_libraries()
        out = tmp / "model"
        build_tiny_pipeline(seed).save_pretrained(out, safe_serialization=True)
        return out

    return publish_folder(build, Path(folder))


def save_tiny_clip(folder: Path, seed: int = 0) -> Path:
    """A random-weight CLIPModel with its tokenizer and image processor, saved at `folder` as a
    transformers folder (safetensors only), so the scores load it exactly as they load a real CLIP."""

    def build(tmp: Path) -> Path:
        quiet_libraries()  # first: transformers warns on import when CLIPImageProcessor falls back to PIL
        import torch
        from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer
        from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

        out = tmp / "clip"
        vocab, merges = write_clip_vocab(tmp / "vocab")
        CLIPTokenizer(str(vocab), str(merges), model_max_length=77).save_pretrained(out)
        CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                           image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD).save_pretrained(out)
        torch.manual_seed(seed)
        config = CLIPConfig(text_config=_CLIP_TEXT, vision_config=_CLIP_VISION, projection_dim=16)
        CLIPModel(config).save_pretrained(out, safe_serialization=True)
        return out

    return publish_folder(build, Path(folder))


def tiny_lora_state_dict(name: str, rank: int = 4):
    """A random peft LoRA on the tiny UNet's attention, seeded from `name`, in diffusers keys."""
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict

    seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**_UNET)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(ATTENTION_LORA_TARGETS),
                                init_lora_weights="gaussian"))
    with torch.no_grad():
        for param_name, param in unet.named_parameters():
            if "lora_B" in param_name:  # gaussian init leaves B at zero: make the LoRA do something
                param.normal_(0.0, 0.5)
    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))


def save_tiny_lora(path: Path, name: str, rank: int = 4) -> Path:
    """Write a tiny random LoRA as one .safetensors file in the diffusers layout."""
    path = Path(path)

    def build(tmp: Path) -> Path:
        from diffusers import StableDiffusionXLPipeline

        StableDiffusionXLPipeline.save_lora_weights(
            tmp, unet_lora_layers=tiny_lora_state_dict(name, rank), weight_name="lora.safetensors"
        )
        return tmp / "lora.safetensors"

    return publish_folder(build, path)


def resolve_tiny(reference: str) -> Path:
    """Turn `tiny:sdxl` / `tiny:lora/NAME` / `tiny:clip` into a built, cached path; build it on first use."""
    if reference == TINY_MODEL:
        return save_tiny_model(cache_dir() / "sdxl")
    if reference == TINY_CLIP:
        return save_tiny_clip(cache_dir() / "clip")
    if reference == TINY_SUBJECT:
        return publish_folder(lambda tmp: write_tiny_dataset(tmp / "subject", images=4, repeats=2, reg_images=4),
                        cache_dir() / "subject")
    if reference.startswith(TINY_LORA_PREFIX):
        name = reference[len(TINY_LORA_PREFIX):]
        if not name or not name.replace("-", "").replace("_", "").isalnum():
            raise ModelError(f"{reference}: tiny LoRA names are letters, digits, '-' and '_'")
        return save_tiny_lora(cache_dir() / "loras" / f"{name}.safetensors", name)
    raise ModelError(f"{reference}: unknown tiny reference (use {TINY_MODEL}, {TINY_LORA_PREFIX}NAME or {TINY_CLIP})")


def is_tiny(reference: str) -> bool:
    return reference.startswith("tiny:")


_POSES = ["from front", "from side", "looking away", "smiling", "arms crossed", "outdoors", "indoors"]


def write_tiny_dataset(root: Path, images: int = 4, repeats: int = 2, token: str = "w0ut3r",
                       class_word: str = "man", reg_images: int = 0, size: int = 64,
                       captions: bool = True) -> Path:
    """Procedural subject images in kohya's layout, for tests and the demo.

    `root/img/<repeats>_<token> <class>/NNN.png` (+ `.txt` captions like the seed's
    `w0ut3r, photo of a man, from side`) and, with `reg_images`, `root/reg/1_<class>/`. The
    "subject" is the same figure (a face-like disc with a red scarf) in varying positions, so a
    LoRA has something consistent to learn; regularization images are other figures.
    """
    import random as _random

    from PIL import Image, ImageDraw

    root = Path(root)
    instance_dir = root / "img" / f"{repeats}_{token} {class_word}"
    instance_dir.mkdir(parents=True, exist_ok=True)
    rng = _random.Random(f"{token}:{images}:{size}")
    for index in range(images):
        image = Image.new("RGB", (size, size), tuple(rng.randint(150, 230) for _ in range(3)))
        draw = ImageDraw.Draw(image)
        cx, cy, r = rng.randint(size // 3, 2 * size // 3), rng.randint(size // 3, size // 2), size // 5
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(224, 172, 105))
        draw.rectangle([cx - r, cy + r, cx + r, cy + 2 * r], fill=(200, 30, 30))
        draw.ellipse([cx - r // 2, cy - r // 3, cx - r // 4, cy], fill=(30, 30, 30))
        draw.ellipse([cx + r // 4, cy - r // 3, cx + r // 2, cy], fill=(30, 30, 30))
        path = instance_dir / f"{index:03d}.png"
        image.save(path)
        if captions:
            pose = _POSES[index % len(_POSES)]
            path.with_suffix(".txt").write_text(f"{token}, photo of a {class_word}, {pose}")
    if reg_images:
        reg_dir = root / "reg" / f"1_{class_word}"
        reg_dir.mkdir(parents=True, exist_ok=True)
        for index in range(reg_images):
            image = Image.new("RGB", (size, size), tuple(rng.randint(60, 200) for _ in range(3)))
            draw = ImageDraw.Draw(image)
            x, y = rng.randint(8, size - 24), rng.randint(8, size - 24)
            draw.rectangle([x, y, x + 16, y + 16], fill=tuple(rng.randint(0, 255) for _ in range(3)))
            image.save(reg_dir / f"{index:03d}.png")
            if captions:
                (reg_dir / f"{index:03d}.txt").write_text(f"photo of a {class_word}, {_POSES[index % len(_POSES)]}")
    return root
