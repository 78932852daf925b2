"""SDXL LoRA training (DreamBooth with prior preservation), kohya-compatible in and out. No Ray.

kohya's option names and meanings, peft for the adapters (scale = network_alpha / network_dim, as
sd-scripts), diffusers for the noise schedule and the learning-rate schedules; no LoRA math by
hand. The LoRA trains the modules sd-scripts' `networks.lora` trains and is saved under its SDXL
names (`farm.models.kohya`). Checkpoints are one `.safetensors` file each, named as kohya names them
(`<output_name>-000001.safetensors`, the last without a suffix), with kohya's `ss_*`, `sshs_*`
and `modelspec.*` metadata, so A1111, ComfyUI and diffusers load them unchanged.

Determinism is what makes resume exact: a batch's order comes from (seed, epoch) and its noise
from (seed, step), so a run restarted from its saved state computes the same steps as one that
never stopped.
"""

from __future__ import annotations

import csv
import json
import platform
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

from farm.train.dataset import Dataset, step_math
from farm.errors import FarmError
from farm.files import publish_folder, replacing, write_atomic
from farm.sweep.spec import TrainOptions

STATE_DIR = "state"
LOG_FILE = "log.csv"
# Bump when what a run trains or writes changes, so an old run folder is not resumed into a new one
TRAINER_VERSION = 2


@dataclass(frozen=True)
class Checkpoint:
    """A saved LoRA: the file, and when in training it was taken."""

    run: str
    path: str
    epoch: int
    step: int
    final: bool
    sha256: str
    label: str  # grid label, as in the seed's grids: "v002 epoch 7", or "v002 step 901" for step saves
    node: str = ""
    single_file: str = ""  # DreamBooth: the same checkpoint as one SDXL .safetensors (beside the folder)


def checkpoint_name(output_name: str, epoch: int | None = None, step: int | None = None) -> str:
    """kohya's names: `name-000003.safetensors` per epoch, `name-step00000901` per step, `name` last."""
    if step is not None:
        return f"{output_name}-step{step:08d}.safetensors"
    if epoch is not None:
        return f"{output_name}-{epoch:06d}.safetensors"
    return f"{output_name}.safetensors"


def _optimizer_kwargs(options: TrainOptions) -> dict:
    args = dict(_parse_optimizer_args(options.optimizer_args))
    if options.optimizer_type.lower() == "adafactor":
        args.setdefault("scale_parameter", False)
        args.setdefault("relative_step", False)
        args.setdefault("warmup_init", False)
    return args


def _optimizer(options: TrainOptions, groups: list[dict]):
    import torch

    args = _optimizer_kwargs(options)
    kind = options.optimizer_type.lower()
    if kind == "adamw":
        return torch.optim.AdamW(groups, **args)
    if kind == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise FarmError("optimizer_type AdamW8bit needs the bitsandbytes package (and CUDA)") from None
        return bnb.optim.AdamW8bit(groups, **args)
    if kind == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(groups, **args)
    if kind == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise FarmError("optimizer_type Prodigy needs the prodigyopt package") from None
        return Prodigy(groups, **args)
    raise FarmError(f"optimizer_type {options.optimizer_type!r}: use AdamW, AdamW8bit, Adafactor or Prodigy")


def _parse_optimizer_args(items: list[str]) -> list[tuple[str, object]]:
    """kohya's `--optimizer_args scale_parameter=False weight_decay=0.01` strings."""
    parsed = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise FarmError(f"optimizer_args: {item!r} is not key=value")
        try:
            parsed.append((key.strip(), json.loads(value.strip().replace("True", "true").replace("False", "false"))))
        except ValueError:
            parsed.append((key.strip(), value.strip()))
    return parsed


class Trainer:
    """One training run: model + dataset + options → checkpoints in `out_dir`.

    `mode: lora` trains peft adapters and writes kohya LoRA files; `mode: dreambooth` trains the
    whole UNet (kohya's sdxl_train.py) and writes each checkpoint as a diffusers model folder and
    as one single-file SDXL `.safetensors` (the layout sdxl_train.py saves)."""

    def __init__(self, run: str, model_path: str, model_name: str, dataset: Dataset, options: TrainOptions,
                 out_dir: Path, device: str | None = None, pipeline=None):
        import torch

        from farm.render.memory import bf16_supported
        from farm.models.sdxl import quiet_libraries
        from farm.render.pipeline import PipelineOptions, pick_device

        quiet_libraries()
        self.run, self.dataset, self.options, self.out_dir = run, dataset, options, Path(out_dir)
        self.on_step: Callable[[int, float, float], None] | None = None
        self.model_name = model_name
        self.device = pick_device(device)
        self.math = step_math(dataset, options.gradient_accumulation_steps, options.max_train_epochs,
                              options.max_train_steps)
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(options.mixed_precision)
        if self.dtype is torch.float16 and self.device == "cpu":
            raise FarmError("mixed_precision fp16 needs a CUDA GPU; use no or bf16")
        if self.dtype is torch.bfloat16 and not bf16_supported(self.device):
            raise FarmError(f"mixed_precision bf16: {self.device} has no bfloat16 support (a GPU before Ampere, "
                            "e.g. an RTX 20xx); use fp16")
        self.pipeline_options = pipeline or PipelineOptions()  # single_file_config for a single-file model
        self._load(model_path)

    def _load(self, model_path: str) -> None:
        import torch
        from diffusers import DDPMScheduler

        from farm.models import kohya

        self.model_path = Path(model_path)
        self.full = self.options.mode == "dreambooth"
        self.pipe = pipe = self._load_weights(model_path)
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        for module in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
            module.requires_grad_(False)
        if self.full:
            self._load_full()
            return
        # sd-scripts' networks.lora: every Linear of the UNet's transformer blocks (attn1/attn2
        # q/k/v/out, ff, proj_in/out); with conv_dim also the resnets' and samplers' convs; and
        # for the text encoders every Linear of CLIPAttention and CLIPMLP
        torch.manual_seed(self.options.seed)  # LoRA init draws from torch's global generator
        o, net = self.options, self.options.network_kwargs()
        conv_dim = int(net["conv_dim"]) if "conv_dim" in net else None
        conv_alpha = float(net.get("conv_alpha", 1.0))
        unet_targets = kohya.lora_targets(pipe.unet, kohya.UNET_TARGET_BLOCKS,
                                          kohya.UNET_CONV_BLOCKS if conv_dim else ())
        pipe.unet.add_adapter(kohya.lora_config(unet_targets, o.network_dim, o.network_alpha, conv_dim, conv_alpha))
        self.train_text = not self.options.network_train_unet_only
        if self.train_text:
            from peft import inject_adapter_in_model  # peft directly: transformers' add_adapter wants a newer peft

            for encoder in (pipe.text_encoder, pipe.text_encoder_2):
                targets = kohya.lora_targets(encoder, kohya.TEXT_TARGET_BLOCKS)
                inject_adapter_in_model(kohya.lora_config(targets, o.network_dim, o.network_alpha), encoder)
        if self.options.gradient_checkpointing:
            pipe.unet.enable_gradient_checkpointing()
        lr = self.options.learning_rate
        groups = [{"params": self._lora_params(pipe.unet), "lr": self.options.unet_lr or lr}]
        if self.train_text:
            text_params = self._lora_params(pipe.text_encoder) + self._lora_params(pipe.text_encoder_2)
            groups.append({"params": text_params, "lr": self.options.text_encoder_lr or lr})
        self._finish_setup(groups)

    def _load_weights(self, model_path: str):
        """The pipeline with frozen weights in the mixed precision (the trainable ones stay fp32:
        DreamBooth's UNet, the LoRA weights), read on the CPU, then the UNet, VAE and text
        encoders on the device. The VAE and text encoders leave it again once latents and
        captions are cached (`_cache_and_park`). SDXL's VAE overflows in fp16: it stays fp32 then."""
        from dataclasses import replace

        import torch

        from farm.render.pipeline import load_pipeline

        low = self.dtype or torch.float32
        names = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
        read_as = torch.float32 if self.full else low  # a trained UNet starts from the file's own values
        pipe = load_pipeline(model_path, replace(self.pipeline_options, device="cpu", dtype=names[read_as],
                                                 cpu_offload="none", vae_tiling=False))
        vae_dtype = torch.float32 if low is torch.float16 and pipe.vae.config.force_upcast else low
        pipe.text_encoder.to(self.device, low)
        pipe.text_encoder_2.to(self.device, low)
        pipe.vae.to(self.device, vae_dtype)
        pipe.unet.to(self.device)
        return pipe

    def _cache_and_park(self) -> None:
        """With `cache_latents`, encode every image's latent now and move the VAE off the GPU;
        with frozen text encoders, encode every caption now and move them off too."""
        from farm.render.memory import release

        cached = self.options.cache_latents
        if cached:
            for item in self.dataset.items:
                self._latent(item.path, self.dataset.buckets.bucket_for(item.width, item.height))
        if not self.train_text:
            captions = sorted({item.caption for item in self.dataset.items})
            for start in range(0, len(captions), 16):
                self._encode(captions[start:start + 16])
        if self.device == "cpu":
            return
        parked = ([self.pipe.vae] if cached else []) + ([] if self.train_text else
                                                        [self.pipe.text_encoder, self.pipe.text_encoder_2])
        for module in parked:
            module.to("cpu")
        if parked:
            release()

    def _load_full(self) -> None:
        """Full DreamBooth: every UNet weight trains; text encoders and VAE stay frozen."""
        self.train_text = False
        self.pipe.unet.requires_grad_(True)
        if self.options.gradient_checkpointing:
            self.pipe.unet.enable_gradient_checkpointing()
        self._finish_setup([{"params": list(self.pipe.unet.parameters()),
                             "lr": self.options.unet_lr or self.options.learning_rate}])

    def _finish_setup(self, groups: list[dict]) -> None:
        from diffusers.optimization import get_scheduler

        self.optimizer = _optimizer(self.options, groups)
        self.lr_scheduler = get_scheduler(
            self.options.lr_scheduler, self.optimizer, num_warmup_steps=self.options.lr_warmup_steps,
            num_training_steps=self.math.max_train_steps, num_cycles=self.options.lr_scheduler_num_cycles,
            power=self.options.lr_scheduler_power)
        self.latents: dict[tuple[str, tuple[int, int]], object] = {}
        self.prompts: dict[str, tuple] = {}

    @staticmethod
    def _lora_params(module) -> list:
        params = [p for n, p in module.named_parameters() if "lora_" in n]
        for p in params:
            p.requires_grad_(True)
            p.data = p.data.float()  # LoRA weights train in fp32 whatever the base precision
        return params

    # --- data -------------------------------------------------------------------------------

    def _latent(self, path: str, bucket: tuple[int, int]):
        """VAE latents of an image at its bucket size, encoded once (`cache_latents`)."""
        import torch

        key = (path, bucket)
        if key in self.latents:
            return self.latents[key]
        vae = self.pipe.vae
        pixels = _load_image(path, bucket).to(vae.device, vae.dtype)
        with torch.no_grad():
            latent = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
        latent = latent.to(self.device, torch.float32)
        if self.options.cache_latents:
            self.latents[key] = latent
        return latent

    def _encode(self, captions: list[str]):
        """(prompt_embeds, pooled) for captions; cached when the text encoders are frozen."""
        import torch

        where = self.pipe.text_encoder.device  # the CPU once parked (`_cache_and_park`)
        if self.train_text:
            embeds, _, pooled, _ = self.pipe.encode_prompt(captions, device=where,
                                                           do_classifier_free_guidance=False)
            return embeds, pooled
        missing = [c for c in dict.fromkeys(captions) if c not in self.prompts]
        if missing:
            with torch.no_grad():
                embeds, _, pooled, _ = self.pipe.encode_prompt(missing, device=where,
                                                               do_classifier_free_guidance=False)
            embeds, pooled = embeds.to(self.device), pooled.to(self.device)
            for i, caption in enumerate(missing):
                self.prompts[caption] = (embeds[i], pooled[i])
        return (torch.stack([self.prompts[c][0] for c in captions]),
                torch.stack([self.prompts[c][1] for c in captions]))

    # --- one step ---------------------------------------------------------------------------

    def loss(self, batch, step: int):
        """DreamBooth loss for one batch: MSE on the noise, reg images weighted by prior_loss_weight."""
        import torch
        import torch.nn.functional as F

        bucket = self.dataset.buckets.bucket_for(batch[0].width, batch[0].height)
        latents = torch.cat([self._latent(item.path, bucket) for item in batch])
        generator = torch.Generator(device="cpu").manual_seed(self.options.seed * 1_000_003 + step)
        noise = torch.randn(latents.shape, generator=generator).to(self.device)
        if self.options.noise_offset:
            offset = torch.randn(latents.shape[0], latents.shape[1], 1, 1, generator=generator).to(self.device)
            noise = noise + self.options.noise_offset * offset
        steps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (latents.shape[0],), generator=generator).to(self.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        embeds, pooled = self._encode([item.caption for item in batch])
        height, width = bucket[1], bucket[0]
        time_ids = torch.tensor([[height, width, 0, 0, height, width]] * len(batch), dtype=embeds.dtype,
                                device=self.device)
        autocast = torch.autocast(device_type=self.device.split(":")[0], dtype=self.dtype, enabled=self.dtype is not None)
        with autocast:
            prediction = self.pipe.unet(noisy, timesteps, embeds,
                                        added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        target = noise
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if self.options.min_snr_gamma:
            from diffusers.training_utils import compute_snr

            snr = compute_snr(self.noise_scheduler, timesteps)
            per_sample = per_sample * torch.clamp(snr, max=self.options.min_snr_gamma) / snr
        weights = torch.tensor([self.options.prior_loss_weight if item.subset.is_reg else 1.0 for item in batch],
                               device=self.device)
        return (per_sample * weights).mean()

    # --- saving -----------------------------------------------------------------------------

    @property
    def save_dtype(self):
        """kohya's `save_precision`: float (fp32), fp16 or bf16."""
        import torch

        return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.options.save_precision, torch.float32)

    def lora_state(self) -> dict:
        """The adapters under sd-scripts' SDXL names (`lora_unet_input_blocks_4_1_…`,
        `lora_te1_text_model_encoder_layers_0_…`): `.lora_down.weight`, `.lora_up.weight` and
        `.alpha` (network_alpha), in `save_precision`."""
        from farm.models import kohya

        names = kohya.SgmUNetNames(self.pipe.unet.config)
        models = [(kohya.LORA_PREFIX_UNET, self.pipe.unet, names.module)]
        if self.train_text:
            for prefix, encoder in ((kohya.LORA_PREFIX_TE1, self.pipe.text_encoder),
                                    (kohya.LORA_PREFIX_TE2, self.pipe.text_encoder_2)):
                models.append((prefix, encoder, lambda path, model=encoder: kohya.clip_path(model, path)))
        return kohya.lora_state_dict(models, self.save_dtype)

    def _model_file_hashes(self) -> dict[str, str]:
        """sd-scripts' `ss_sd_model_hash` / `ss_new_sd_model_hash` of a single-file base model."""
        if not hasattr(self, "_model_hashes"):
            self._model_hashes = {}
            if self.model_path.is_file():
                from farm.models import kohya
                from farm.models.artifacts import HashCache

                cache = HashCache()
                self._model_hashes = {"ss_sd_model_hash": kohya.legacy_model_hash(self.model_path),
                                      "ss_new_sd_model_hash": cache.file(self.model_path)}
                cache.save()
        return self._model_hashes

    def _bucket_info(self) -> dict:
        """sd-scripts' `bucket_info`: images (with repeats) per bucket; with bucketing, the mean
        aspect-ratio error of the images' buckets."""
        d = self.dataset
        info: dict = {"buckets": {i: {"resolution": list(reso), "count": len(items)}
                                  for i, (reso, items) in enumerate(d.bucketed().items())}}
        if d.buckets.enable_bucket and d.items:
            errors = []
            for item in d.items:
                width, height = d.buckets.bucket_for(item.width, item.height)
                errors.append(abs(width / height - item.width / item.height))
            info["mean_img_ar_error"] = sum(errors) / len(errors)
        return info

    def metadata(self, epoch: int, step: int, started_at: datetime) -> dict[str, str]:
        """kohya's `ss_*` training metadata and the `modelspec.*` keys (all values are strings in
        safetensors headers). `sshs_*` hashes are added when the file is written."""
        from farm.models import kohya
        from farm.models.tiny import is_tiny

        o, d = self.options, self.dataset

        def count(subset) -> int:
            return sum(1 for i in d.items if i.subset == subset)

        dirs = {Path(s.image_dir).name: {"n_repeats": s.num_repeats, "img_count": count(s)}
                for s in d.subsets if not s.is_reg}
        reg_dirs = {Path(s.image_dir).name: {"n_repeats": s.num_repeats, "img_count": count(s)}
                    for s in d.subsets if s.is_reg}
        optimizer = type(self.optimizer)
        optimizer_args = ",".join(f"{k}={v}" for k, v in _optimizer_kwargs(o).items())
        optimizer_name = f"{optimizer.__module__}.{optimizer.__name__}" + (f"({optimizer_args})" if optimizer_args else "")
        bucket_info = self._bucket_info()
        # every key sd-scripts' train_network.py writes; options the farm does not have carry
        # sd-scripts' defaults (what its file would say for the same run)
        values = {
            "ss_session_id": self.run,
            "ss_training_started_at": started_at.timestamp(),
            "ss_output_name": o.output_name,
            "ss_learning_rate": o.learning_rate,
            "ss_text_encoder_lr": o.text_encoder_lr,
            "ss_unet_lr": o.unet_lr,
            "ss_num_train_images": d.num_train_images,
            "ss_num_validation_images": 0,
            "ss_num_reg_images": d.num_reg_images,
            "ss_num_batches_per_epoch": self.math.batches_per_epoch,
            "ss_num_epochs": self.math.epochs,
            "ss_gradient_checkpointing": o.gradient_checkpointing,
            "ss_gradient_accumulation_steps": o.gradient_accumulation_steps,
            "ss_max_train_steps": self.math.max_train_steps,
            "ss_lr_warmup_steps": o.lr_warmup_steps,
            "ss_lr_scheduler": o.lr_scheduler,
            "ss_network_module": kohya.NETWORK_MODULE,
            "ss_network_dim": o.network_dim,
            "ss_network_alpha": o.network_alpha,
            "ss_network_dropout": None,
            "ss_mixed_precision": o.mixed_precision,
            "ss_full_fp16": False,
            "ss_v2": False,
            "ss_base_model_version": kohya.BASE_MODEL_VERSION,
            "ss_clip_skip": None,
            "ss_max_token_length": None,
            "ss_cache_latents": o.cache_latents,
            "ss_seed": o.seed,
            "ss_lowram": False,
            "ss_noise_offset": o.noise_offset or None,
            "ss_multires_noise_iterations": None,
            "ss_multires_noise_discount": 0.3,
            "ss_adaptive_noise_scale": None,
            "ss_zero_terminal_snr": False,
            "ss_training_comment": None,
            "ss_sd_scripts_commit_hash": "(unknown)",
            "ss_optimizer": optimizer_name,
            "ss_max_grad_norm": 1.0,
            "ss_caption_dropout_rate": 0.0,
            "ss_caption_dropout_every_n_epochs": 0,
            "ss_caption_tag_dropout_rate": 0.0,
            "ss_face_crop_aug_range": None,
            "ss_prior_loss_weight": o.prior_loss_weight,
            "ss_min_snr_gamma": o.min_snr_gamma,
            "ss_scale_weight_norms": None,
            "ss_ip_noise_gamma": None,
            "ss_debiased_estimation": False,
            "ss_noise_offset_random_strength": False,
            "ss_ip_noise_gamma_random_strength": False,
            "ss_loss_type": "l2",
            "ss_huber_schedule": "snr",
            "ss_huber_scale": 1.0,
            "ss_huber_c": 0.1,
            "ss_fp8_base": False,
            "ss_fp8_base_unet": False,
            "ss_validation_seed": None,
            "ss_validation_split": 0.0,
            "ss_max_validation_steps": None,
            "ss_validate_every_n_epochs": None,
            "ss_validate_every_n_steps": None,
            "ss_resize_interpolation": None,
            # the train_data_dir / reg_data_dir form
            "ss_batch_size_per_device": d.batch_size,
            "ss_total_batch_size": d.batch_size * o.gradient_accumulation_steps,
            "ss_resolution": tuple(d.buckets.resolution),
            "ss_color_aug": False,
            "ss_flip_aug": False,
            "ss_random_crop": False,
            "ss_shuffle_caption": False,
            "ss_enable_bucket": d.buckets.enable_bucket,
            "ss_bucket_no_upscale": d.buckets.bucket_no_upscale,
            "ss_min_bucket_reso": d.buckets.min_bucket_reso,
            "ss_max_bucket_reso": d.buckets.max_bucket_reso,
            "ss_keep_tokens": o.keep_tokens,
            "ss_dataset_dirs": json.dumps(dirs),
            "ss_reg_dataset_dirs": json.dumps(reg_dirs),
            "ss_tag_frequency": json.dumps(d.tag_frequency()),
            "ss_bucket_info": json.dumps(bucket_info),
            "ss_sd_model_name": self.model_name if is_tiny(self.model_name) else Path(self.model_name).name,
            # not sd-scripts': the farm's own record
            "ss_network_train_unet_only": o.network_train_unet_only,
            "ss_save_precision": o.save_precision,
        }
        if o.dataset_config:  # a dataset TOML: sd-scripts also describes each subset in ss_datasets
            values["ss_datasets"] = json.dumps([self._dataset_description(bucket_info)])
        if o.network_args:
            values["ss_network_args"] = json.dumps(o.network_kwargs())
        values.update(self._model_file_hashes())
        values.update({"ss_training_finished_at": time.time(), "ss_steps": step, "ss_epoch": epoch})
        meta = {key: str(value) for key, value in values.items()}
        meta.update(kohya.modelspec(lora=not self.full, title=o.output_name, resolution=tuple(d.buckets.resolution),
                                    prediction_type=self.noise_scheduler.config.prediction_type))
        return meta

    def _dataset_description(self, bucket_info: dict) -> dict:
        """One entry of sd-scripts' `ss_datasets` (the dataset-config form)."""
        d = self.dataset
        subsets = [{"img_count": sum(1 for i in d.items if i.subset == s), "num_repeats": s.num_repeats,
                    "color_aug": False, "flip_aug": False, "random_crop": False, "shuffle_caption": False,
                    "keep_tokens": s.keep_tokens, "keep_tokens_separator": "", "secondary_separator": None,
                    "enable_wildcard": False, "caption_prefix": None, "caption_suffix": None,
                    "resize_interpolation": None, "image_dir": Path(s.image_dir).name,
                    "class_tokens": s.class_tokens, "is_reg": s.is_reg} for s in d.subsets]
        return {"is_dreambooth": True, "batch_size_per_device": d.batch_size,
                "num_train_images": d.num_train_images, "num_reg_images": d.num_reg_images,
                "resolution": list(d.buckets.resolution), "enable_bucket": d.buckets.enable_bucket,
                "min_bucket_reso": d.buckets.min_bucket_reso, "max_bucket_reso": d.buckets.max_bucket_reso,
                "tag_frequency": d.tag_frequency(), "bucket_info": bucket_info, "resize_interpolation": None,
                "subsets": subsets}

    def save_checkpoint(self, name: str, epoch: int, step: int, started_at: datetime, final: bool,
                        by_step: bool = False) -> Checkpoint:
        label = f"{self.run} step {step}" if by_step else f"{self.run} epoch {epoch}"
        if self.full:
            path, sha, single = self._save_model_folder(name.removesuffix(".safetensors"), epoch, step, started_at)
            return Checkpoint(self.run, str(path), epoch, step, final, sha, label, platform.node(), str(single))
        from safetensors.torch import save

        from farm.models import kohya
        from farm.models.artifacts import sha256_file

        path = self.out_dir / name
        if not path.is_file():  # a resumed run recomputes the same weights: keep the file renders used
            state = self.lora_state()
            meta = self.metadata(epoch, step, started_at)
            meta["sshs_model_hash"], meta["sshs_legacy_hash"] = kohya.addnet_hashes(state, meta)
            write_atomic(path, save(state, meta))
        return Checkpoint(self.run, str(path), epoch, step, final, sha256_file(path), label, platform.node())

    def _logit_scale(self):
        """OpenCLIP's logit_scale from a single-file base model (diffusers drops it), else None."""
        from safetensors import safe_open

        from farm.models.kohya import LOGIT_SCALE_KEY

        if not self.model_path.is_file():
            return None
        with safe_open(str(self.model_path), "pt") as handle:
            return handle.get_tensor(LOGIT_SCALE_KEY) if LOGIT_SCALE_KEY in handle.keys() else None

    def _save_single_file(self, path: Path) -> None:
        """The checkpoint as one SDXL `.safetensors` in the SGM layout, with sd-scripts' modelspec
        metadata, in `save_precision`; written beside and renamed into place."""
        from safetensors.torch import save_file

        from farm.models import kohya

        if path.is_file():
            return
        state = kohya.sdxl_checkpoint_state(self.pipe, self.save_dtype, self._logit_scale())
        meta = kohya.modelspec(lora=False, title=self.options.output_name,
                               resolution=tuple(self.dataset.buckets.resolution),
                               prediction_type=self.noise_scheduler.config.prediction_type)
        with replacing(path) as tmp:
            save_file(state, tmp, metadata=meta)

    def _save_model_folder(self, name: str, epoch: int, step: int, started_at: datetime) -> tuple[Path, str, Path]:
        """A full-DreamBooth checkpoint: a diffusers SDXL folder (safetensors), published by rename,
        and the same weights as one SDXL `.safetensors` beside it (`<name>.safetensors`)."""
        from farm.models.artifacts import HashCache

        single = self.out_dir / f"{name}.safetensors"
        self._save_single_file(single)
        path = self.out_dir / name

        def build(tmp: Path) -> Path:
            self.pipe.save_pretrained(tmp / name, safe_serialization=True)
            _cast_saved_weights(tmp / name, self.save_dtype)
            (tmp / name / "sdfarm_training.json").write_text(
                json.dumps(self.metadata(epoch, step, started_at), indent=1))
            return tmp / name

        publish_folder(build, path)
        return path, HashCache().model(path), single

    def save_state(self, epoch: int, step: int, batch_in_epoch: int, started_at: datetime) -> None:
        """Everything a resumed run needs: adapters, optimizer, schedule, position."""
        import torch
        from peft.utils import get_peft_model_state_dict

        unet = self.pipe.unet.state_dict() if self.full else get_peft_model_state_dict(self.pipe.unet)
        state = {
            "unet": unet,
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "epoch": epoch, "step": step, "batch_in_epoch": batch_in_epoch,
            "started_at": started_at.isoformat(),
        }
        if self.train_text:
            state["text_encoder"] = get_peft_model_state_dict(self.pipe.text_encoder)
            state["text_encoder_2"] = get_peft_model_state_dict(self.pipe.text_encoder_2)
        with replacing(self.out_dir / STATE_DIR / "state.pt", durable=True) as tmp:
            torch.save(state, tmp)

    def load_state(self) -> dict | None:
        import torch
        from peft.utils import set_peft_model_state_dict

        path = self.out_dir / STATE_DIR / "state.pt"
        if not path.is_file():
            return None
        state = torch.load(path, map_location=self.device, weights_only=True)  # tensors only: no code
        if self.full:
            self.pipe.unet.load_state_dict(state["unet"])
        else:
            set_peft_model_state_dict(self.pipe.unet, state["unet"])
        if self.train_text:
            set_peft_model_state_dict(self.pipe.text_encoder, state["text_encoder"])
            set_peft_model_state_dict(self.pipe.text_encoder_2, state["text_encoder_2"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        return state

    def fingerprint(self) -> str:
        """What determines this run's weights: model, options, images and captions."""
        import hashlib

        items = [(i.path, i.caption, i.subset.num_repeats, i.subset.is_reg) for i in self.dataset.items]
        payload = json.dumps([TRAINER_VERSION, self.model_name, self.options.model_dump(mode="json"), items],
                             sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()

    def _claim_out_dir(self) -> None:
        """Refuse to resume (or keep checkpoints of) a run that was made with other settings."""
        marker = self.out_dir / "run.json"
        mine = self.fingerprint()
        if marker.is_file():
            if json.loads(marker.read_text()).get("fingerprint") != mine:
                raise FarmError(f"{self.out_dir}: holds run {self.run!r} trained with other options, images or "
                                "model; use another --out (or delete that folder)")
            return
        marker.write_text(json.dumps({"run": self.run, "fingerprint": mine}, indent=2))

    # --- the loop ---------------------------------------------------------------------------

    def train(self, stop_after_steps: int | None = None, progress: bool = False) -> Iterator[Checkpoint]:
        """Run (or resume) to max_train_steps, yielding each checkpoint as it is written.

        `stop_after_steps` ends the run early after saving state (tests use it to stand in for a
        crash at a known point)."""
        import torch
        from tqdm import tqdm

        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._claim_out_dir()
        o, total = self.options, self.math.max_train_steps
        resumed = self.load_state()
        self._cache_and_park()
        step = resumed["step"] if resumed else 0
        start_epoch = resumed["epoch"] if resumed else 1
        skip = resumed["batch_in_epoch"] if resumed else 0
        started_at = datetime.fromisoformat(resumed["started_at"]) if resumed else datetime.now(timezone.utc)
        log = _StepLog(self.out_dir / LOG_FILE, append=resumed is not None)
        bar = tqdm(total=total, initial=step, disable=not progress, desc=self.run, unit="step")
        report_every = max(1, total // 10)  # ~10 progress lines a run in the worker's log (Ray dashboard)
        began_run = time.perf_counter()
        first_step = step
        accumulation = o.gradient_accumulation_steps
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        # fp16 gradients underflow without loss scaling (bf16 has fp32's range and needs none)
        scaler = torch.amp.GradScaler("cuda", enabled=self.dtype is torch.float16)
        for epoch in range(start_epoch, self.math.epochs + 1):
            batches = self.dataset.epoch_batches(o.seed, epoch)
            for index in range(skip, len(batches), accumulation):
                began = time.perf_counter()
                window = batches[index:index + accumulation]
                loss_value = 0.0
                for micro in window:
                    loss = self.loss(micro, step) / len(window)
                    scaler.scale(loss).backward()
                    loss_value += float(loss.detach())
                scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                scaler.step(self.optimizer)
                scaler.update()
                self.lr_scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                step += 1
                log.write(step, epoch, loss_value, self.lr_scheduler.get_last_lr()[0], time.perf_counter() - began)
                if self.on_step:
                    self.on_step(step, loss_value, time.perf_counter() - began)
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4f}", epoch=epoch, refresh=False)
                if not progress and (step % report_every == 0 or step == total):
                    rate = (time.perf_counter() - began_run) / (step - first_step)
                    print(f"[train {self.run}] step {step}/{total} epoch {epoch}/{self.math.epochs} "
                          f"loss {loss_value:.4f} lr {self.lr_scheduler.get_last_lr()[0]:.3g} "
                          f"{rate:.2f} s/step, ETA {rate * (total - step):.0f} s", flush=True)
                if o.save_every_n_steps and step % o.save_every_n_steps == 0 and step < total:
                    yield self.save_checkpoint(checkpoint_name(o.output_name, step=step), epoch, step, started_at,
                                               False, by_step=True)
                if step >= total:
                    break
                if stop_after_steps and step >= stop_after_steps:
                    self.save_state(epoch, step, index + accumulation, started_at)
                    log.close()
                    bar.close()
                    return
            skip = 0
            if step >= total:
                break
            if o.save_every_n_epochs and epoch % o.save_every_n_epochs == 0 and epoch < self.math.epochs:
                yield self.save_checkpoint(checkpoint_name(o.output_name, epoch=epoch), epoch, step, started_at, False)
            self.save_state(epoch + 1, step, 0, started_at)
        yield self.save_checkpoint(checkpoint_name(o.output_name), self.math.epochs, step, started_at, True)
        log.close()
        bar.close()
        plot_loss(self.out_dir / LOG_FILE, self.out_dir / "loss.png", title=f"{self.run}: loss")


def _cast_saved_weights(folder: Path, dtype) -> None:
    """kohya's `save_precision` for a saved diffusers folder: every floating tensor of its
    safetensors files in `dtype` (metadata kept), one tensor at a time."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    for path in sorted(folder.rglob("*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            meta = handle.metadata()
            state = {}
            for key in handle.keys():
                tensor = handle.get_tensor(key)
                state[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
        save_file(state, path, metadata=meta)


class _StepLog:
    """Per-step CSV: step, epoch, loss, lr, step_s (readable by any spreadsheet or pandas)."""

    def __init__(self, path: Path, append: bool):
        fresh = not (append and path.is_file())
        self.handle = open(path, "w" if fresh else "a", newline="")
        self.writer = csv.writer(self.handle)
        if fresh:
            self.writer.writerow(["step", "epoch", "loss", "lr", "step_s"])

    def write(self, step: int, epoch: int, loss: float, lr: float, step_s: float) -> None:
        self.writer.writerow([step, epoch, f"{loss:.6f}", f"{lr:.6g}", f"{step_s:.4f}"])
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


def _load_image(path: str, bucket: tuple[int, int]):
    """An image resized to cover the bucket and center-cropped, as a [-1, 1] tensor."""
    import numpy as np
    import torch
    from PIL import Image

    width, height = bucket
    with Image.open(path) as image:
        image = image.convert("RGB")
        scale = max(width / image.width, height / image.height)
        size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS)
        left, top = (size[0] - width) // 2, (size[1] - height) // 2
        image = image.crop((left, top, left + width, top + height))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0)


def plot_loss(log_path: Path, out_path: Path, title: str) -> Path | None:
    """A small loss-over-steps line chart (Pillow only), with a moving average."""
    from PIL import Image, ImageDraw, ImageFont

    with open(log_path) as handle:
        rows = list(csv.DictReader(handle))
    if len(rows) < 2:
        return None
    losses = [float(r["loss"]) for r in rows]
    window = max(1, len(losses) // 20)
    smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
              for i in range(len(losses))]
    width, height, pad = 640, 320, 40
    low, high = min(losses), max(losses)
    span = (high - low) or 1.0
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=14)

    def point(i: int, value: float) -> tuple[float, float]:
        return (pad + (width - 2 * pad) * i / (len(losses) - 1), height - pad - (height - 2 * pad) * (value - low) / span)

    draw.rectangle([pad, pad, width - pad, height - pad], outline=(180, 180, 180))
    draw.line([point(i, v) for i, v in enumerate(losses)], fill=(170, 190, 230), width=1)
    draw.line([point(i, v) for i, v in enumerate(smooth)], fill=(30, 70, 160), width=2)
    draw.text((pad, 10), title, font=font, fill="black")
    draw.text((pad, height - pad + 8), f"step 1 … {len(losses)}   loss {low:.3f} … {high:.3f}", font=font, fill="black")
    image.save(out_path)
    return out_path


@dataclass(frozen=True)
class TrainRun:
    """One variant of a training job, as a record a worker on any node can run from."""

    run: str
    model_path: str
    model_name: str
    options: TrainOptions
    data_base: str  # the folder the options' dataset paths are relative to (the spec's)
    out_dir: str


def train_run(job: TrainRun, device: str | None = None, progress: bool = False,
              on_step: Callable[[int, float, float], None] | None = None, pipeline=None) -> Iterator[Checkpoint]:
    """Train (or resume) one run, yielding its checkpoints as they are written; the model is
    released (collected, CUDA cache emptied) when the run ends or fails.

    `on_step(step, loss, seconds)` sees every optimizer step (the worker turns it into metrics);
    `pipeline` (PipelineOptions) carries the worker's `single_file_config`."""
    from farm.train.dataset import dataset_for
    from farm.render.memory import release

    dataset = dataset_for(job.options, Path(job.data_base))
    trainer = Trainer(job.run, job.model_path, job.model_name, dataset, job.options, Path(job.out_dir), device,
                      pipeline)
    trainer.on_step = on_step
    try:
        yield from trainer.train(progress=progress)
    finally:
        del trainer
        release()


def planned_checkpoints(options: TrainOptions, max_train_steps: int, steps_per_epoch: int, epochs: int) -> int:
    """How many files a run will write: every n epochs / n steps before the end, then the last."""
    count = 1
    if options.save_every_n_epochs:
        count += sum(1 for e in range(1, epochs) if e % options.save_every_n_epochs == 0
                     and e * steps_per_epoch < max_train_steps)
    if options.save_every_n_steps:
        count += (max_train_steps - 1) // options.save_every_n_steps
    return count
