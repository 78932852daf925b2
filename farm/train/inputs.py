"""What the UNet sees of a batch: VAE latents of its images and embeddings of its captions.

Both are computed once where nothing trains them (`cache_latents`; frozen text encoders), and
the VAE and text encoders then leave the GPU to make room for training.
"""

from __future__ import annotations

from farm.sweep.spec import TrainOptions
from farm.train.dataset import Dataset
from farm.train.model import TrainingModel


class BatchInputs:
    """Latents by (image, bucket) and caption embeddings, cached as the options allow."""

    def __init__(self, model: TrainingModel, dataset: Dataset, options: TrainOptions):
        self.model, self.dataset, self.options = model, dataset, options
        self.latents: dict[tuple[str, tuple[int, int]], object] = {}
        self.prompts: dict[str, tuple] = {}

    def precompute_and_park(self) -> None:
        """With `cache_latents`, encode every image's latent now and move the VAE off the GPU;
        with frozen text encoders, encode every caption now and move them off too."""
        from farm.render.memory import release

        pipe, cached, train_text = self.model.pipe, self.options.cache_latents, self.model.train_text
        if cached:
            for item in self.dataset.items:
                self.latent(item.path, self.dataset.buckets.bucket_for(item.width, item.height))
        if not train_text:
            captions = sorted({item.caption for item in self.dataset.items})
            for start in range(0, len(captions), 16):
                self.embeddings(captions[start:start + 16])
        if self.model.device == "cpu":
            return
        parked = ([pipe.vae] if cached else []) + ([] if train_text else [pipe.text_encoder, pipe.text_encoder_2])
        for module in parked:
            module.to("cpu")
        if parked:
            release()

    def latent(self, path: str, bucket: tuple[int, int]):
        """VAE latents of an image at its bucket size (kept with `cache_latents`)."""
        import torch

        key = (path, bucket)
        if key in self.latents:
            return self.latents[key]
        vae = self.model.pipe.vae
        pixels = load_image(path, bucket).to(vae.device, vae.dtype)
        with torch.no_grad():
            latent = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
        latent = latent.to(self.model.device, torch.float32)
        if self.options.cache_latents:
            self.latents[key] = latent
        return latent

    def embeddings(self, captions: list[str]):
        """(prompt_embeds, pooled) for captions; cached when the text encoders are frozen."""
        import torch

        pipe, device = self.model.pipe, self.model.device
        where = pipe.text_encoder.device  # the CPU once parked (`precompute_and_park`)
        if self.model.train_text:
            embeds, _, pooled, _ = pipe.encode_prompt(captions, device=where, do_classifier_free_guidance=False)
            return embeds, pooled
        missing = [c for c in dict.fromkeys(captions) if c not in self.prompts]
        if missing:
            with torch.no_grad():
                embeds, _, pooled, _ = pipe.encode_prompt(missing, device=where, do_classifier_free_guidance=False)
            embeds, pooled = embeds.to(device), pooled.to(device)
            for i, caption in enumerate(missing):
                self.prompts[caption] = (embeds[i], pooled[i])
        return (torch.stack([self.prompts[c][0] for c in captions]),
                torch.stack([self.prompts[c][1] for c in captions]))


def load_image(path: str, bucket: tuple[int, int]):
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
