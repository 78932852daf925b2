"""The model a run trains: the SDXL pipeline with its trained part, optimizer and learning-rate schedule.

`mode: lora` adds peft adapters where sd-scripts' `networks.lora` puts them (`farm.models.kohya`,
scale = network_alpha / network_dim); `mode: dreambooth` trains every UNet weight (kohya's
sdxl_train.py). Frozen weights run in the mixed precision, trained ones stay fp32.
"""

from __future__ import annotations

from pathlib import Path

from farm.errors import TrainError
from farm.sweep.spec import TrainOptions
from farm.train.optimizers import build_optimizer


def mixed_precision_dtype(options: TrainOptions, device: str):
    """kohya's `mixed_precision` as a torch dtype (None: fp32), refused where `device` cannot run it."""
    import torch

    from farm.render.memory import bf16_supported

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(options.mixed_precision)
    if dtype is torch.float16 and device == "cpu":
        raise TrainError("mixed_precision fp16 needs a CUDA GPU; use no or bf16")
    if dtype is torch.bfloat16 and not bf16_supported(device):
        raise TrainError(f"mixed_precision bf16: {device} has no bfloat16 support (a GPU before Ampere, "
                         "e.g. an RTX 20xx); use fp16")
    return dtype


class TrainingModel:
    """The pipeline with its trained modules, their optimizer and learning-rate schedule.

    Built in a fixed order (weights, adapters under `seed`, optimizer), so the same options
    always start from the same weights: resume and bit-identical checkpoints rely on it."""

    def __init__(self, model_path: str, options: TrainOptions, device: str, dtype, pipeline_options,
                 max_train_steps: int):
        from diffusers import DDPMScheduler
        from diffusers.optimization import get_scheduler

        self.model_path = Path(model_path)
        self.options, self.device, self.dtype = options, device, dtype
        self.full = options.mode == "dreambooth"
        self.train_text = not self.full and not options.network_train_unet_only
        self.pipe = self._load_weights(model_path, pipeline_options)
        self.noise_scheduler = DDPMScheduler.from_config(self.pipe.scheduler.config)
        for module in (self.pipe.unet, self.pipe.vae, self.pipe.text_encoder, self.pipe.text_encoder_2):
            module.requires_grad_(False)
        groups = self._unfreeze_unet() if self.full else self._add_lora()
        self.optimizer = build_optimizer(options, groups)
        self.lr_scheduler = get_scheduler(
            options.lr_scheduler, self.optimizer, num_warmup_steps=options.lr_warmup_steps,
            num_training_steps=max_train_steps, num_cycles=options.lr_scheduler_num_cycles,
            power=options.lr_scheduler_power)

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    def _load_weights(self, model_path: str, pipeline_options):
        """The pipeline with frozen weights in the mixed precision (the trainable ones stay fp32:
        DreamBooth's UNet, the LoRA weights), read on the CPU, then the UNet, VAE and text
        encoders on the device. The VAE and text encoders leave it again once latents and
        captions are cached (`BatchInputs.precompute_and_park`). SDXL's VAE overflows in fp16: it
        stays fp32 then."""
        from dataclasses import replace

        import torch

        from farm.render.pipeline import load_pipeline

        low = self.dtype or torch.float32
        names = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
        read_as = torch.float32 if self.full else low  # a trained UNet starts from the file's own values
        pipe = load_pipeline(model_path, replace(pipeline_options, device="cpu", dtype=names[read_as],
                                                 cpu_offload="none", vae_tiling=False))
        vae_dtype = torch.float32 if low is torch.float16 and pipe.vae.config.force_upcast else low
        pipe.text_encoder.to(self.device, low)
        pipe.text_encoder_2.to(self.device, low)
        pipe.vae.to(self.device, vae_dtype)
        pipe.unet.to(self.device)
        return pipe

    def _unfreeze_unet(self) -> list[dict]:
        """Full DreamBooth: every UNet weight trains; text encoders and VAE stay frozen."""
        unet = self.pipe.unet
        unet.requires_grad_(True)
        if self.options.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        return [{"params": list(unet.parameters()), "lr": self.options.unet_lr or self.options.learning_rate}]

    def _add_lora(self) -> list[dict]:
        """sd-scripts' networks.lora: every Linear of the UNet's transformer blocks (attn1/attn2
        q/k/v/out, ff, proj_in/out); with conv_dim also the resnets' and samplers' convs; and,
        unless `network_train_unet_only`, every Linear of both text encoders' CLIPAttention and
        CLIPMLP. One param group for the UNet (`unet_lr`), one for the text encoders."""
        import torch

        from farm.models import kohya

        o, net, pipe = self.options, self.options.network_kwargs(), self.pipe
        torch.manual_seed(o.seed)  # LoRA init draws from torch's global generator
        conv_dim = int(net["conv_dim"]) if "conv_dim" in net else None
        conv_alpha = float(net.get("conv_alpha", 1.0))
        unet_targets = kohya.lora_targets(pipe.unet, kohya.UNET_TARGET_BLOCKS,
                                          kohya.UNET_CONV_BLOCKS if conv_dim else ())
        pipe.unet.add_adapter(kohya.lora_config(unet_targets, o.network_dim, o.network_alpha, conv_dim, conv_alpha))
        if self.train_text:
            from peft import inject_adapter_in_model  # peft directly: transformers' add_adapter wants a newer peft

            for encoder in (pipe.text_encoder, pipe.text_encoder_2):
                targets = kohya.lora_targets(encoder, kohya.TEXT_TARGET_BLOCKS)
                inject_adapter_in_model(kohya.lora_config(targets, o.network_dim, o.network_alpha), encoder)
        if o.gradient_checkpointing:
            pipe.unet.enable_gradient_checkpointing()
        groups = [{"params": _lora_params(pipe.unet), "lr": o.unet_lr or o.learning_rate}]
        if self.train_text:
            text_params = _lora_params(pipe.text_encoder) + _lora_params(pipe.text_encoder_2)
            groups.append({"params": text_params, "lr": o.text_encoder_lr or o.learning_rate})
        return groups

    def trained_weights(self) -> dict:
        """What training changed, for the run's saved state: the whole UNet (DreamBooth) or the
        UNet's adapters, and the text encoders' adapters when they train."""
        from peft.utils import get_peft_model_state_dict

        pipe = self.pipe
        weights = {"unet": pipe.unet.state_dict() if self.full else get_peft_model_state_dict(pipe.unet)}
        if self.train_text:
            weights["text_encoder"] = get_peft_model_state_dict(pipe.text_encoder)
            weights["text_encoder_2"] = get_peft_model_state_dict(pipe.text_encoder_2)
        return weights

    def restore(self, state: dict) -> None:
        """Put back what `trained_weights` saved, and the optimizer's and schedule's own state."""
        from peft.utils import set_peft_model_state_dict

        pipe = self.pipe
        if self.full:
            pipe.unet.load_state_dict(state["unet"])
        else:
            set_peft_model_state_dict(pipe.unet, state["unet"])
        if self.train_text:
            set_peft_model_state_dict(pipe.text_encoder, state["text_encoder"])
            set_peft_model_state_dict(pipe.text_encoder_2, state["text_encoder_2"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])


def _lora_params(module) -> list:
    """A module's LoRA weights, made trainable and fp32 (they train in fp32 whatever the base precision)."""
    params = [p for n, p in module.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
        p.data = p.data.float()
    return params
