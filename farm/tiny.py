"""Tiny random-weight SDXL models and LoRAs, built offline, for tests and the demo.

The tiny model uses the real diffusers/transformers classes (a UNet with `text_time` added
embeddings, two CLIP text encoders, a VAE with SDXL's scale factor 8) and CLIP's real BPE
vocabulary, so it is loaded by exactly the code path a user's SDXL folder takes. Weights are
seeded, so the same version of this module always builds the same bytes.

Specs name them as `tiny:sdxl` (model) and `tiny:lora/NAME` (a LoRA, seeded from NAME); the farm
builds them on first use into a cache folder and reuses them after.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import FarmError, ModelError

TINY_MODEL = "tiny:sdxl"
TINY_LORA_PREFIX = "tiny:lora/"
TINY_SUBJECT = "tiny:subject"  # a procedural kohya dataset: img/4_w0ut3r man, reg/1_man
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
_VAE = dict(
    block_out_channels=(8, 16, 32, 32), in_channels=3, out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=64,
    scaling_factor=0.13025,
)
_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    steps_offset=1, timestep_spacing="leading", prediction_type="epsilon",
)
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def cache_dir() -> Path:
    """Where tiny models are cached: $SDFARM_CACHE, else ~/.cache/sdfarm."""
    root = os.environ.get("SDFARM_CACHE") or Path.home() / ".cache" / "sdfarm"
    return Path(root) / f"tiny-v{TINY_VERSION}"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable-unicode table (the first 256 vocabulary entries)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    # Order matters: the vocabulary lists the printable bytes first, then the remapped rest.
    table = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + i) for i, b in enumerate(others)})
    return table


def clip_bpe_path() -> Path:
    """CLIP's BPE merges as shipped inside the open-clip-torch wheel (found without importing it)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FarmError(
            "the tiny model needs CLIP's vocabulary from the open-clip-torch package: "
            "pip install --no-deps open-clip-torch"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise FarmError(f"{path}: CLIP vocabulary file missing from open-clip-torch")
    return path


def write_clip_vocab(folder: Path) -> tuple[Path, Path]:
    """Rebuild CLIP's vocab.json and merges.txt (49,408 entries) from the BPE merges file."""
    lines = gzip.open(clip_bpe_path()).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    symbols = list(_bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols]
    vocab_list += ["".join(m.split()) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    vocab_path.write_text(json.dumps({tok: i for i, tok in enumerate(vocab_list)}))
    merges_path.write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return vocab_path, merges_path


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
        tokenizer_2=tokenizer_2, unet=unet, scheduler=EulerDiscreteScheduler(**_SCHEDULER),
    )


def _publish(build, target: Path) -> Path:
    """Build into a temp sibling and rename into place, so a crash never leaves half a model."""
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        built = build(tmp)
        _make_readable(tmp)
        try:
            os.replace(built, target)
        except OSError:
            if not target.exists():  # lost a race to another process: theirs is as good
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _make_readable(root: Path) -> None:
    """diffusers writes .safetensors as 0600; Ray workers run as other users on real clusters."""
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)


def save_tiny_model(folder: Path, seed: int = 0) -> Path:
    """Build the tiny SDXL and save it as a diffusers folder (safetensors only) at `folder`."""

    def build(tmp: Path) -> Path:
        from .pipeline import quiet_libraries

        quiet_libraries()
        out = tmp / "model"
        build_tiny_pipeline(seed).save_pretrained(out, safe_serialization=True)
        return out

    return _publish(build, Path(folder))


def tiny_lora_state_dict(name: str, rank: int = 4):
    """A random peft LoRA on the tiny UNet's attention, seeded from `name`, in diffusers keys."""
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict

    seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**_UNET)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS,
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

    return _publish(build, path)


def resolve_tiny(reference: str) -> Path:
    """Turn `tiny:sdxl` / `tiny:lora/NAME` into a built, cached path; build it on first use."""
    if reference == TINY_MODEL:
        return save_tiny_model(cache_dir() / "sdxl")
    if reference == TINY_SUBJECT:
        return _publish(lambda tmp: write_tiny_dataset(tmp / "subject", images=4, repeats=2, reg_images=4),
                        cache_dir() / "subject")
    if reference.startswith(TINY_LORA_PREFIX):
        name = reference[len(TINY_LORA_PREFIX):]
        if not name or not name.replace("-", "").replace("_", "").isalnum():
            raise ModelError(f"{reference}: tiny LoRA names are letters, digits, '-' and '_'")
        return save_tiny_lora(cache_dir() / "loras" / f"{name}.safetensors", name)
    raise ModelError(f"{reference}: unknown tiny reference (use {TINY_MODEL} or {TINY_LORA_PREFIX}NAME)")


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


SDXL_CONFIG = "sdxl-base-config"  # cache folder name of the SDXL base component configs


def sdxl_base_config() -> Path:
    """A diffusers folder of SDXL 1.0 base's component *configs* (no weights), built offline.

    `from_single_file` needs these to know what a single-file checkpoint holds; without network
    it would otherwise look for them in the Hugging Face cache. Values are SDXL base 1.0's; the
    tokenizers are CLIP's real vocabulary (the second pads with "!")."""

    def build(tmp: Path) -> Path:
        from transformers import CLIPTextConfig, CLIPTokenizer

        out = tmp / "config"
        text = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                    pad_token_id=1)
        CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                       hidden_act="quick_gelu", projection_dim=768, architectures=["CLIPTextModel"],
                       **text).save_pretrained(out / "text_encoder")
        CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                       hidden_act="gelu", projection_dim=1280, architectures=["CLIPTextModelWithProjection"],
                       **text).save_pretrained(out / "text_encoder_2")
        with tempfile.TemporaryDirectory() as vocab_dir:
            vocab, merges = write_clip_vocab(Path(vocab_dir))
            CLIPTokenizer(str(vocab), str(merges), model_max_length=77).save_pretrained(out / "tokenizer")
            CLIPTokenizer(str(vocab), str(merges), model_max_length=77, pad_token="!").save_pretrained(
                out / "tokenizer_2")
        configs = {
            "model_index.json": {
                "_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True,
                "scheduler": ["diffusers", "EulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
                "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
                "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]},
            "unet/config.json": {
                "_class_name": "UNet2DConditionModel", "act_fn": "silu", "addition_embed_type": "text_time",
                "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
                "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
                "cross_attention_dim": 2048, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D",
                                                                  "CrossAttnDownBlock2D"],
                "in_channels": 4, "layers_per_block": 2, "mid_block_type": "UNetMidBlock2DCrossAttn",
                "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4,
                "projection_class_embeddings_input_dim": 2816, "sample_size": 128,
                "transformer_layers_per_block": [1, 2, 10],
                "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                "use_linear_projection": True},
            "vae/config.json": {
                "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
                "down_block_types": ["DownEncoderBlock2D"] * 4, "force_upcast": True, "in_channels": 3,
                "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3,
                "sample_size": 1024, "scaling_factor": 0.13025, "up_block_types": ["UpDecoderBlock2D"] * 4},
            "scheduler/scheduler_config.json": {
                "_class_name": "EulerDiscreteScheduler", **_SCHEDULER, "interpolation_type": "linear",
                "use_karras_sigmas": False},
        }
        for name, config in configs.items():
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_text(json.dumps(config, indent=2))
        return out

    return _publish(build, cache_dir().parent / SDXL_CONFIG)
