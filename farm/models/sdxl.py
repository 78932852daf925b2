"""SDXL 1.0 base as files describe it: component configs, CLIP's vocabulary, the noise schedule.

A single-file checkpoint holds weights only; `from_single_file` needs the component configs, which
it would otherwise fetch from the Hugging Face hub. They are built here offline, with CLIP's real
BPE vocabulary (shipped inside the open-clip-torch wheel), and the tiny model shares them.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import tempfile
from pathlib import Path

from farm.errors import ModelError
from farm.files import publish_folder
from farm.models.cache import farm_cache

SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    steps_offset=1, timestep_spacing="leading", prediction_type="epsilon",
)

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
        raise ModelError(
            "the tiny model needs CLIP's vocabulary from the open-clip-torch package: "
            "pip install --no-deps open-clip-torch"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise ModelError(f"{path}: CLIP vocabulary file missing from open-clip-torch")
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
                "_class_name": "EulerDiscreteScheduler", **SCHEDULER, "interpolation_type": "linear",
                "use_karras_sigmas": False},
        }
        for name, config in configs.items():
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_text(json.dumps(config, indent=2))
        return out

    return publish_folder(build, farm_cache() / SDXL_CONFIG)


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
