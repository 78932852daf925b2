"""A run's checkpoint files, named and laid out as kohya's scripts write them.

LoRA: one `.safetensors` per checkpoint, adapters under sd-scripts' SDXL names, with kohya's
`ss_*`, `sshs_*` and `modelspec.*` metadata, so A1111, ComfyUI and diffusers load them unchanged.
DreamBooth: a diffusers model folder per checkpoint, and beside it the same weights as one SDXL
`.safetensors` (the layout sdxl_train.py saves). Every file is written beside its target and
renamed into place (`farm.files`): a killed run never leaves half a checkpoint.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from farm.files import publish_folder, replacing, write_atomic
from farm.sweep.spec import TrainOptions
from farm.train.metadata import KohyaMetadata
from farm.train.model import TrainingModel


@dataclass(frozen=True)
class Checkpoint:
    """A saved LoRA (or DreamBooth model): the file, and when in training it was taken."""

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


def planned_checkpoints(options: TrainOptions, max_train_steps: int, steps_per_epoch: int, epochs: int) -> int:
    """How many files a run will write: every n epochs / n steps before the end, then the last."""
    count = 1
    if options.save_every_n_epochs:
        count += sum(1 for e in range(1, epochs) if e % options.save_every_n_epochs == 0
                     and e * steps_per_epoch < max_train_steps)
    if options.save_every_n_steps:
        count += (max_train_steps - 1) // options.save_every_n_steps
    return count


def save_dtype(options: TrainOptions):
    """kohya's `save_precision`: float (fp32), fp16 or bf16."""
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(options.save_precision, torch.float32)


class CheckpointWriter:
    """Writes a run's checkpoints into `out_dir`. A file that already exists is kept: a resumed
    run recomputes the same weights, and renders may already have used that file."""

    def __init__(self, run: str, model: TrainingModel, options: TrainOptions, metadata: KohyaMetadata,
                 out_dir: Path):
        self.run, self.model, self.options, self.metadata, self.out_dir = run, model, options, metadata, out_dir
        self.dtype = save_dtype(options)

    def save(self, name: str, epoch: int, step: int, started_at: datetime, final: bool,
             by_step: bool = False) -> Checkpoint:
        """The checkpoint `name` (a kohya file name, see `checkpoint_name`) at this point of training."""
        label = f"{self.run} step {step}" if by_step else f"{self.run} epoch {epoch}"
        if self.model.full:
            path, sha, single = self._save_model_folder(name.removesuffix(".safetensors"), epoch, step, started_at)
            return Checkpoint(self.run, str(path), epoch, step, final, sha, label, platform.node(), str(single))
        from farm.models.artifacts import sha256_file

        path = self.out_dir / name
        if not path.is_file():
            self._save_lora(path, epoch, step, started_at)
        return Checkpoint(self.run, str(path), epoch, step, final, sha256_file(path), label, platform.node())

    def lora_state(self) -> dict:
        """The adapters under sd-scripts' SDXL names (`lora_unet_input_blocks_4_1_…`,
        `lora_te1_text_model_encoder_layers_0_…`): `.lora_down.weight`, `.lora_up.weight` and
        `.alpha` (network_alpha), in `save_precision`."""
        from farm.models import kohya

        pipe = self.model.pipe
        names = kohya.SgmUNetNames(pipe.unet.config)
        models = [(kohya.LORA_PREFIX_UNET, pipe.unet, names.module)]
        if self.model.train_text:
            for prefix, encoder in ((kohya.LORA_PREFIX_TE1, pipe.text_encoder),
                                    (kohya.LORA_PREFIX_TE2, pipe.text_encoder_2)):
                models.append((prefix, encoder, lambda path, model=encoder: kohya.clip_path(model, path)))
        return kohya.lora_state_dict(models, self.dtype)

    def _save_lora(self, path: Path, epoch: int, step: int, started_at: datetime) -> None:
        """A kohya LoRA file with its metadata and the AddNet hashes sd-scripts precalculates."""
        from safetensors.torch import save

        from farm.models import kohya

        state = self.lora_state()
        meta = self.metadata.for_checkpoint(epoch, step, started_at)
        meta["sshs_model_hash"], meta["sshs_legacy_hash"] = kohya.addnet_hashes(state, meta)
        write_atomic(path, save(state, meta))

    def _save_model_folder(self, name: str, epoch: int, step: int, started_at: datetime) -> tuple[Path, str, Path]:
        """A full-DreamBooth checkpoint: a diffusers SDXL folder (safetensors), published by rename,
        and the same weights as one SDXL `.safetensors` beside it (`<name>.safetensors`)."""
        from farm.models.artifacts import HashCache

        single = self.out_dir / f"{name}.safetensors"
        self._save_single_file(single)
        path = self.out_dir / name

        def build(tmp: Path) -> Path:
            self.model.pipe.save_pretrained(tmp / name, safe_serialization=True)
            cast_saved_weights(tmp / name, self.dtype)
            (tmp / name / "sdfarm_training.json").write_text(  # inside the folder publish_folder renames
                json.dumps(self.metadata.for_checkpoint(epoch, step, started_at), indent=1))
            return tmp / name

        publish_folder(build, path)
        return path, HashCache().model(path), single

    def _save_single_file(self, path: Path) -> None:
        """The checkpoint as one SDXL `.safetensors` in the SGM layout, with sd-scripts' modelspec
        metadata, in `save_precision`; written beside and renamed into place."""
        from safetensors.torch import save_file

        from farm.models import kohya

        if path.is_file():
            return
        state = kohya.sdxl_checkpoint_state(self.model.pipe, self.dtype, self._logit_scale())
        meta = kohya.modelspec(lora=False, title=self.options.output_name, resolution=self.metadata.resolution,
                               prediction_type=self.model.prediction_type)
        with replacing(path) as tmp:
            save_file(state, tmp, metadata=meta)

    def _logit_scale(self):
        """OpenCLIP's logit_scale from a single-file base model (diffusers drops it), else None."""
        from safetensors import safe_open

        from farm.models.kohya import LOGIT_SCALE_KEY

        model_path = self.model.model_path
        if not model_path.is_file():
            return None
        with safe_open(str(model_path), "pt") as handle:
            return handle.get_tensor(LOGIT_SCALE_KEY) if LOGIT_SCALE_KEY in handle.keys() else None


def cast_saved_weights(folder: Path, dtype) -> None:
    """kohya's `save_precision` for a saved diffusers folder: every floating tensor of its
    safetensors files in `dtype` (metadata kept), one file at a time. Rewritten in place: the
    folder is still the temp one `publish_folder` renames when it is complete."""
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
