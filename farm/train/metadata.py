"""kohya's training metadata: the `ss_*` keys sd-scripts' train_network.py writes into every
LoRA file, and the `modelspec.*` keys, so tools that read kohya metadata show a farm checkpoint
as they show one sd-scripts wrote.
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path

from farm.sweep.spec import TrainOptions
from farm.train.dataset import Dataset, StepMath
from farm.train.model import TrainingModel
from farm.train.optimizers import optimizer_description
from farm.train.step import MAX_GRAD_NORM


class KohyaMetadata:
    """A run's metadata, the same for each of its checkpoints but for the position (epoch, step)
    and the finish time. All values are strings, as safetensors headers hold them."""

    def __init__(self, run: str, model_name: str, model: TrainingModel, dataset: Dataset, options: TrainOptions,
                 math: StepMath):
        self.run, self.model_name, self.model = run, model_name, model
        self.dataset, self.options, self.math = dataset, options, math
        self._model_hashes: dict[str, str] | None = None

    @property
    def resolution(self) -> tuple[int, int]:
        return tuple(self.dataset.buckets.resolution)

    def for_checkpoint(self, epoch: int, step: int, started_at: datetime) -> dict[str, str]:
        """kohya's `ss_*` training metadata and the `modelspec.*` keys. `sshs_*` hashes are added
        when the file is written (they hash the file itself)."""
        from farm.models import kohya
        from farm.models.tiny import is_tiny

        o, d = self.options, self.dataset

        def count(subset) -> int:
            return sum(1 for i in d.items if i.subset == subset)

        dirs = {Path(s.image_dir).name: {"n_repeats": s.num_repeats, "img_count": count(s)}
                for s in d.subsets if not s.is_reg}
        reg_dirs = {Path(s.image_dir).name: {"n_repeats": s.num_repeats, "img_count": count(s)}
                    for s in d.subsets if s.is_reg}
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
            "ss_optimizer": optimizer_description(self.model.optimizer, o),
            "ss_max_grad_norm": MAX_GRAD_NORM,
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
            "ss_resolution": self.resolution,
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
        meta.update(kohya.modelspec(lora=not self.model.full, title=o.output_name, resolution=self.resolution,
                                    prediction_type=self.model.prediction_type))
        return meta

    def _model_file_hashes(self) -> dict[str, str]:
        """sd-scripts' `ss_sd_model_hash` / `ss_new_sd_model_hash` of a single-file base model,
        hashed once a run (a base model is gigabytes)."""
        if self._model_hashes is None:
            self._model_hashes = {}
            model_path = self.model.model_path
            if model_path.is_file():
                from farm.models import kohya
                from farm.models.artifacts import HashCache

                cache = HashCache()
                self._model_hashes = {"ss_sd_model_hash": kohya.legacy_model_hash(model_path),
                                      "ss_new_sd_model_hash": cache.file(model_path)}
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
