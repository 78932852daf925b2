"""One training step: the DreamBooth loss of a batch, and the optimizer step over an accumulation window.

A batch's noise and timesteps come from a generator seeded by (seed, step), never from a global
one, so a resumed run draws exactly what an uninterrupted run drew at the same step.
"""

from __future__ import annotations

from farm.sweep.spec import TrainOptions
from farm.train.dataset import Dataset, ImageItem
from farm.train.inputs import BatchInputs
from farm.train.model import TrainingModel

MAX_GRAD_NORM = 1.0  # sd-scripts' default --max_grad_norm (also written as ss_max_grad_norm)


class DenoisingLoss:
    """The DreamBooth loss of one batch: MSE of the UNet's prediction against the noise (or the
    velocity, for v-prediction models), min-SNR weighted when asked, reg images weighted by
    `prior_loss_weight`. Call it as `loss(batch, step)`."""

    def __init__(self, model: TrainingModel, inputs: BatchInputs, dataset: Dataset, options: TrainOptions):
        self.model, self.inputs, self.dataset, self.options = model, inputs, dataset, options

    def __call__(self, batch: list[ImageItem], step: int):
        import torch
        import torch.nn.functional as F

        model, scheduler = self.model, self.model.noise_scheduler
        bucket = self.dataset.buckets.bucket_for(batch[0].width, batch[0].height)
        latents = torch.cat([self.inputs.latent(item.path, bucket) for item in batch])
        noise, timesteps = self._noise_and_timesteps(latents, step)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        prediction = self._predict(noisy, timesteps, batch, bucket)
        target = noise
        if scheduler.config.prediction_type == "v_prediction":
            target = scheduler.get_velocity(latents, noise, timesteps)
        per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if self.options.min_snr_gamma:
            from diffusers.training_utils import compute_snr

            snr = compute_snr(scheduler, timesteps)
            per_sample = per_sample * torch.clamp(snr, max=self.options.min_snr_gamma) / snr
        weights = torch.tensor([self.options.prior_loss_weight if item.subset.is_reg else 1.0 for item in batch],
                               device=model.device)
        return (per_sample * weights).mean()

    def _noise_and_timesteps(self, latents, step: int):
        """Noise (plus `noise_offset` per channel) and timesteps, drawn in this order from (seed, step)."""
        import torch

        device, offset_scale = self.model.device, self.options.noise_offset
        generator = torch.Generator(device="cpu").manual_seed(self.options.seed * 1_000_003 + step)
        noise = torch.randn(latents.shape, generator=generator).to(device)
        if offset_scale:
            offset = torch.randn(latents.shape[0], latents.shape[1], 1, 1, generator=generator).to(device)
            noise = noise + offset_scale * offset
        steps = self.model.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (latents.shape[0],), generator=generator).to(device)
        return noise, timesteps

    def _predict(self, noisy, timesteps, batch: list[ImageItem], bucket: tuple[int, int]):
        """The UNet's prediction under autocast to the mixed precision, conditioned on the captions
        and SDXL's size ids (original size = target size = the bucket, no crop)."""
        import torch

        model = self.model
        embeds, pooled = self.inputs.embeddings([item.caption for item in batch])
        height, width = bucket[1], bucket[0]
        time_ids = torch.tensor([[height, width, 0, 0, height, width]] * len(batch), dtype=embeds.dtype,
                                device=model.device)
        autocast = torch.autocast(device_type=model.device.split(":")[0], dtype=model.dtype,
                                  enabled=model.dtype is not None)
        with autocast:
            return model.pipe.unet(noisy, timesteps, embeds,
                                   added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample


class OptimizerStep:
    """One optimizer step over `gradient_accumulation_steps` batches: gradients clipped to
    MAX_GRAD_NORM, the learning-rate schedule advanced. fp16 scales the loss (its gradients
    underflow without); bf16 has fp32's range and needs none."""

    def __init__(self, model: TrainingModel, loss: DenoisingLoss):
        import torch

        self.model, self.loss = model, loss
        self.params = [p for group in model.optimizer.param_groups for p in group["params"]]
        self.scaler = torch.amp.GradScaler("cuda", enabled=model.dtype is torch.float16)

    def __call__(self, window: list[list[ImageItem]], step: int) -> float:
        """Train on `window` (the batches of step `step`); returns the step's loss."""
        import torch

        optimizer, scaler = self.model.optimizer, self.scaler
        loss_value = 0.0
        for micro in window:
            loss = self.loss(micro, step) / len(window)
            scaler.scale(loss).backward()
            loss_value += float(loss.detach())
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(self.params, MAX_GRAD_NORM)
        scaler.step(optimizer)
        scaler.update()
        self.model.lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return loss_value
