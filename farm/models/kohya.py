"""sd-scripts' SDXL file conventions: LoRA module set and key names, AddNet hashes, ModelSpec
metadata, and the single-file (SGM) checkpoint layout. No training in here; no Ray.

sd-scripts trains SDXL on its own copy of Stability AI's (SGM) UNet, so its LoRA names and its
checkpoints use SGM block numbering (`input_blocks.4.1…`, `middle_block.1…`, `output_blocks.…`)
where diffusers says `down_blocks.1.attentions.0…`. The farm trains diffusers models; this module
turns diffusers module paths into SGM ones, derived from the UNet config so the tiny test model
maps as SDXL does. peft does the LoRA math (scale = alpha / rank, as sd-scripts), safetensors
the serialization; what is here is naming.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Callable, Mapping

LORA_PREFIX_UNET = "lora_unet"
LORA_PREFIX_TE1 = "lora_te1"
LORA_PREFIX_TE2 = "lora_te2"
# Blocks whose Linear / Conv2d children get a LoRA (sd-scripts' networks.lora, matched by class name)
UNET_TARGET_BLOCKS = ("Transformer2DModel",)
UNET_CONV_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")  # only with network_args conv_dim
TEXT_TARGET_BLOCKS = ("CLIPAttention", "CLIPMLP")
# Not sd-scripts' set: only the attention projections (diffusers' examples' LoRA), the small
# adapter the tiny test LoRAs and the benchmarks use, addressed by module-name suffix
ATTENTION_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
NETWORK_MODULE = "networks.lora"
BASE_MODEL_VERSION = "sdxl_base_v1-0"

MODELSPEC_VERSION = "1.0.1"
ARCH_SDXL = "stable-diffusion-xl-v1-base"
IMPL_SGM = "https://github.com/Stability-AI/generative-models"

# SGM single-file prefixes (what A1111 / ComfyUI / diffusers' from_single_file read)
UNET_PREFIX = "model.diffusion_model."
TE1_PREFIX = "conditioner.embedders.0.transformer."
TE2_PREFIX = "conditioner.embedders.1.model."
VAE_PREFIX = "first_stage_model."
LOGIT_SCALE_KEY = TE2_PREFIX + "logit_scale"


# --- which modules train -------------------------------------------------------------------


@dataclass(frozen=True)
class LoraTargets:
    """Module paths (in the diffusers / transformers model) that get a LoRA."""

    linear: list[str] = field(default_factory=list)  # Linear and 1×1 Conv2d: network_dim / network_alpha
    conv: list[str] = field(default_factory=list)  # 3×3 Conv2d: conv_dim / conv_alpha


def lora_targets(model, blocks: tuple[str, ...], conv_blocks: tuple[str, ...] = ()) -> LoraTargets:
    """Every Linear and Conv2d inside a module whose class is one of `blocks` (or `conv_blocks`),
    split by kind, in model order."""
    import torch

    linear, conv = {}, {}
    wanted = set(blocks) | set(conv_blocks)
    for name, module in model.named_modules():
        if type(module).__name__ not in wanted:
            continue
        for child_name, child in module.named_modules():
            if not child_name or type(child) not in (torch.nn.Linear, torch.nn.Conv2d):
                continue
            path = f"{name}.{child_name}" if name else child_name
            if isinstance(child, torch.nn.Conv2d) and tuple(child.kernel_size) != (1, 1):
                conv[path] = None
            else:
                linear[path] = None
    return LoraTargets(list(linear), list(conv))


def effective_alpha(alpha: float | None, dim: int) -> float:
    """sd-scripts: alpha 0 (or unset) means alpha = dim, i.e. no scaling."""
    return float(dim) if not alpha else float(alpha)


def lora_config(targets: LoraTargets, dim: int, alpha: float, conv_dim: int | None = None,
                conv_alpha: float | None = None):
    """A peft LoraConfig for `targets`: 3×3 convs only with `conv_dim`, at their own rank and alpha.
    Initialization as sd-scripts: A kaiming-uniform, B zero (peft's default)."""
    from peft import LoraConfig

    modules = list(targets.linear)
    ranks, alphas = {}, {}
    if conv_dim:
        modules += targets.conv
        ranks = {re.escape(path): conv_dim for path in targets.conv}
        alphas = {re.escape(path): effective_alpha(conv_alpha, conv_dim) for path in targets.conv}
    return LoraConfig(r=dim, lora_alpha=effective_alpha(alpha, dim), target_modules=modules,
                      rank_pattern=ranks, alpha_pattern=alphas, init_lora_weights=True)


# --- diffusers UNet → SGM names ------------------------------------------------------------

_UNET_TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
           "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}


class SgmUNetNames:
    """Diffusers UNet2DConditionModel module paths → the SGM UNet's, from the UNet config.

    SGM numbers the encoder's layers in one list: `input_blocks.0` is conv_in, then each level's
    layers (`.0` resnet, `.1` transformer) and its downsampler (`.0.op`) as one more entry; the
    middle is `middle_block.0/1/2` (resnet, transformer, resnet); the decoder's layers are
    `output_blocks.N` (`.0` resnet, `.1` transformer, the level's upsampler after them)."""

    def __init__(self, config: Mapping):
        down, up = list(config["down_block_types"]), list(config["up_block_types"])
        per_level = config["layers_per_block"]
        layers = [per_level] * len(down) if isinstance(per_level, int) else list(per_level)
        self.inputs: dict[tuple[int, int], int] = {}
        self.downsamplers: dict[int, int] = {}
        index = 1
        for level in range(len(down)):
            for layer in range(layers[level]):
                self.inputs[(level, layer)] = index
                index += 1
            if level < len(down) - 1:
                self.downsamplers[level] = index
                index += 1
        self.outputs: dict[tuple[int, int], int] = {}
        self.upsamplers: dict[int, str] = {}
        index = 0
        for level, count in enumerate(reversed(layers)):
            for layer in range(count + 1):
                self.outputs[(level, layer)] = index
                index += 1
            if level < len(up) - 1:  # the upsampler follows the level's last resnet (and transformer)
                self.upsamplers[level] = f"{index - 1}.{2 if 'CrossAttn' in up[level] else 1}"
        self.mid_has_attention = "CrossAttn" in (config.get("mid_block_type") or "UNetMidBlock2DCrossAttn")

    def module(self, path: str) -> str:
        """`down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q` →
        `input_blocks.4.1.transformer_blocks.0.attn1.to_q` (for SDXL and the tiny model alike)."""
        for diffusers, sgm in _UNET_TOP.items():
            if path == diffusers or path.startswith(diffusers + "."):
                return sgm + path[len(diffusers):]
        parts = path.split(".")
        try:
            if parts[0] == "down_blocks":
                level, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
                if kind == "downsamplers":
                    return _join(f"input_blocks.{self.downsamplers[level]}.0", ["op" if r == "conv" else r
                                                                              for r in rest])
                block = self.inputs[(level, index)]
                return self._inner(f"input_blocks.{block}", kind, rest)
            if parts[0] == "mid_block":
                kind, index, rest = parts[1], int(parts[2]), parts[3:]
                if kind == "attentions":
                    return _join("middle_block.1", rest)
                return _resnet(f"middle_block.{index * (2 if self.mid_has_attention else 1)}", rest)
            if parts[0] == "up_blocks":
                level, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
                if kind == "upsamplers":
                    return _join(f"output_blocks.{self.upsamplers[level]}", rest)
                return self._inner(f"output_blocks.{self.outputs[(level, index)]}", kind, rest)
        except (KeyError, IndexError, ValueError):
            pass
        raise ValueError(f"{path}: not a module of an SDXL-shaped UNet")

    @staticmethod
    def _inner(block: str, kind: str, rest: list[str]) -> str:
        if kind == "resnets":
            return _resnet(block + ".0", rest)
        if kind == "attentions":
            return _join(block + ".1", rest)
        raise KeyError(kind)

    def key(self, key: str) -> str:
        """A state-dict key (`….weight`) in SGM naming."""
        path, _, param = key.rpartition(".")
        return f"{self.module(path)}.{param}"


def _join(base: str, rest: list[str]) -> str:
    return ".".join([base, *rest])


def _resnet(base: str, rest: list[str]) -> str:
    if rest and rest[0] in _RESNET:
        rest = [_RESNET[rest[0]], *rest[1:]]
    return _join(base, rest)


def clip_path(model, path: str) -> str:
    """A CLIP text model path as `text_model.…` (newer transformers flatten CLIPTextModel, whose
    modules then lack the `text_model.` that names and checkpoints carry)."""
    return path if hasattr(model, "text_model") else f"text_model.{path}"


def lora_name(prefix: str, path: str) -> str:
    """`lora_unet` + `input_blocks.4.1.proj_in` → `lora_unet_input_blocks_4_1_proj_in`."""
    return f"{prefix}_{path.replace('.', '_')}"


# --- LoRA files ----------------------------------------------------------------------------


def lora_state_dict(models: list[tuple[str, object, Callable[[str], str]]], dtype=None) -> dict:
    """The peft adapters of `models` ((prefix, model, path → file path) triples) as sd-scripts
    writes them: `<name>.lora_down.weight`, `<name>.lora_up.weight` and `<name>.alpha`, a scalar
    tensor holding the module's alpha (its scale is alpha / rank). All cast to `dtype`."""
    import torch
    from peft.tuners.lora import LoraLayer
    from peft.utils import get_peft_model_state_dict

    state = {}
    for prefix, model, to_path in models:
        tensors = get_peft_model_state_dict(model)
        for path, module in model.named_modules():
            if not isinstance(module, LoraLayer) or not module.lora_A:
                continue
            (adapter,) = module.lora_A.keys()
            name = lora_name(prefix, to_path(path))
            state[f"{name}.lora_down.weight"] = tensors[f"{path}.lora_A.weight"]
            state[f"{name}.lora_up.weight"] = tensors[f"{path}.lora_B.weight"]
            state[f"{name}.alpha"] = torch.tensor(float(module.lora_alpha[adapter]))
    return {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in state.items()}


def addnet_hashes(tensors: dict, metadata: Mapping[str, str]) -> tuple[str, str]:
    """(`sshs_model_hash`, `sshs_legacy_hash`) as sd-scripts precalculates them: the file is
    serialized with only its `ss_*` metadata; the model hash is the sha256 of everything after the
    safetensors header, the legacy hash the first 8 hex digits of the sha256 of the 64 KiB at
    offset 1 MiB."""
    from safetensors.torch import save

    data = save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + header:]).hexdigest()
    legacy_hash = hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    return model_hash, legacy_hash


def legacy_model_hash(path) -> str:
    """sd-scripts' `ss_sd_model_hash` of a checkpoint file: sha256 of its 64 KiB at 1 MiB, 8 digits."""
    with open(path, "rb") as handle:
        handle.seek(0x100000)
        return hashlib.sha256(handle.read(0x10000)).hexdigest()[:8]


def modelspec(lora: bool, title: str, resolution: tuple[int, int], prediction_type: str = "epsilon",
              timestamp: float | None = None) -> dict[str, str]:
    """The `modelspec.*` keys sd-scripts writes for an SDXL LoRA (`lora`) or SDXL checkpoint."""
    import time

    from farm import __version__

    stamp = int(time.time() if timestamp is None else timestamp)
    return {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": ARCH_SDXL + ("/lora" if lora else ""),
        "modelspec.implementation": IMPL_SGM,
        "modelspec.title": title,
        "modelspec.resolution": f"{resolution[0]}x{resolution[1]}",
        "modelspec.date": datetime.fromtimestamp(stamp).isoformat(),
        "modelspec.prediction_type": "v" if prediction_type == "v_prediction" else "epsilon",
        "modelspec.implementation_version": f"sdfarm/{__version__}",
    }


# --- single-file SDXL checkpoints ----------------------------------------------------------

_TE2_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
              "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def open_clip_state(state: Mapping, logit_scale=None) -> dict:
    """A transformers CLIPTextModelWithProjection state dict in OpenCLIP (SGM) naming: fused
    `attn.in_proj_*` (q, k, v stacked), `positional_embedding`, `ln_final`, and `text_projection`
    as OpenCLIP stores it (used as `x @ P`, the transpose of the Linear weight)."""
    import torch

    out = {}
    layer = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
    for key, value in state.items():
        if key.endswith("position_ids"):
            continue
        match = layer.match(key)
        if match:
            index, module, param = match.groups()
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                if module == "self_attn.q_proj":
                    parts = [state[f"text_model.encoder.layers.{index}.self_attn.{p}_proj.{param}"] for p in "qkv"]
                    out[f"transformer.resblocks.{index}.attn.in_proj_{param}"] = torch.cat(parts)
                continue
            out[f"transformer.resblocks.{index}.{_TE2_LAYER[module]}.{param}"] = value
        elif key == "text_model.embeddings.token_embedding.weight":
            out["token_embedding.weight"] = value
        elif key == "text_model.embeddings.position_embedding.weight":
            out["positional_embedding"] = value
        elif key.startswith("text_model.final_layer_norm."):
            out["ln_final." + key.rpartition(".")[2]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.t().contiguous()
        else:
            raise ValueError(f"{key}: unexpected in an SDXL second text encoder")
    if logit_scale is not None:
        out["logit_scale"] = logit_scale
    return out


def ldm_vae_state(state: Mapping, num_blocks: int) -> dict:
    """A diffusers AutoencoderKL state dict in the LDM (`first_stage_model`) naming; the mid
    attention's projections as 1×1 convolutions, as LDM stores them."""
    out = {}
    for key, value in state.items():
        new = key
        new = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", new)
        new = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", new)
        new = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.",
                     lambda m: f"decoder.up.{num_blocks - 1 - int(m.group(1))}.block.", new)
        new = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                     lambda m: f"decoder.up.{num_blocks - 1 - int(m.group(1))}.upsample.", new)
        new = re.sub(r"\.mid_block\.resnets\.(\d+)\.", lambda m: f".mid.block_{int(m.group(1)) + 1}.", new)
        new = new.replace(".conv_shortcut.", ".nin_shortcut.").replace(".conv_norm_out.", ".norm_out.")
        if ".mid_block.attentions.0." in new:
            new = new.replace(".mid_block.attentions.0.", ".mid.attn_1.")
            for diffusers, ldm in (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."),
                                   ("to_out.0.", "proj_out.")):
                new = new.replace(".attn_1." + diffusers, ".attn_1." + ldm)
            if new.endswith(".weight") and value.ndim == 2:
                value = value.reshape(*value.shape, 1, 1)
        out[new] = value
    return out


def sdxl_checkpoint_state(pipe, dtype=None, logit_scale=None) -> dict:
    """A diffusers SDXL pipeline's UNet, VAE and both text encoders as one SGM state dict (the
    layout of Stability AI's `sd_xl_base_1.0.safetensors`), cast to `dtype`. `logit_scale` is
    OpenCLIP's, written only when the source checkpoint had one (diffusers keeps none)."""
    names = SgmUNetNames(pipe.unet.config)
    state = {UNET_PREFIX + names.key(k): v for k, v in pipe.unet.state_dict().items()}
    te1 = pipe.text_encoder
    state.update({TE1_PREFIX + clip_path(te1, k): v for k, v in te1.state_dict().items()
                  if not k.endswith("position_ids")})
    state.update({TE2_PREFIX + k: v for k, v in open_clip_state(pipe.text_encoder_2.state_dict(), logit_scale).items()})
    vae_blocks = len(pipe.vae.config.down_block_types)
    state.update({VAE_PREFIX + k: v for k, v in ldm_vae_state(pipe.vae.state_dict(), vae_blocks).items()})
    return {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in state.items()}
