"""CLIP-T and CLIP-I: how well a rendered image follows its prompt, and how much it looks like the subject.

    CLIP-T  cosine between the image's and the prompt's CLIP embeddings, the prompt *without* the
            subject's instance token (`without_token`)
    CLIP-I  mean cosine between the image's embedding and those of the subject's training photos

Both as in the DreamBooth paper, with a CLIP model the user points to: a transformers `CLIPModel`
folder (config.json, safetensors weights, tokenizer and preprocessor files). Nothing is downloaded.
torch and transformers are imported inside the methods: importing this module stays cheap.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

from farm.errors import ScoreError, first_line

if TYPE_CHECKING:
    import torch
    from PIL.Image import Image


def without_token(prompt: str, token: str) -> str:
    """`prompt` with the subject's instance token removed (whole words, any case), for CLIP-T.

    CLIP never learned the token (a rare string like `w0ut3r` the LoRA gave a meaning to), so in
    CLIP's eyes it is noise: CLIP-T scores the prompt without it, as the DreamBooth papers do.
    The commas and spaces it leaves behind are tidied ("w0ut3r, photo of a man" → "photo of a man");
    a prompt without the token comes back unchanged.
    """
    token = token.strip()
    if not token:
        return prompt
    stripped, count = re.subn(rf"(?<!\w){re.escape(token)}(?!\w)", " ", prompt, flags=re.IGNORECASE)
    if not count:
        return prompt
    stripped = re.sub(r"\s+", " ", stripped)
    stripped = re.sub(r"\s*,(\s*,)+", ",", stripped)  # "a, , b": the token was a tag of its own
    stripped = re.sub(r"\s+,", ",", stripped)  # "photo of , smiling"
    return stripped.strip(" ,")


class ClipScorer:
    """A CLIP model loaded once, embedding images and texts in batches for CLIP-T and CLIP-I.

    Embeddings come back L2-normalised, float32 and on the CPU, so a dot product is the cosine and
    reference embeddings can be kept (and compared) whatever device the model runs on.
    """

    def __init__(self, path: str | Path, device: str = "cpu", batch_size: int = 16):
        import torch

        self.path = Path(path).expanduser()
        self.device = torch.device(device)
        self.batch_size = max(1, int(batch_size))
        # half precision only where it is fast and exact enough: on the GPU
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.model, self.tokenizer, self.processor = _load(self.path, self.device, self.dtype)
        self.max_length = int(self.model.config.text_config.max_position_embeddings)
        self.dim = int(self.model.config.projection_dim)

    def image_embeddings(self, images: list[Image]) -> torch.Tensor:
        """(n, d) unit vectors, one per image, in batches of `batch_size`."""
        return self._embed(images, self._image_batch)

    def text_embeddings(self, texts: list[str]) -> torch.Tensor:
        """(n, d) unit vectors, one per text; texts longer than CLIP's 77 tokens are cut there."""
        return self._embed(texts, self._text_batch)

    def clip_t(self, images: list[Image], prompts: list[str]) -> list[float]:
        """Cosine between each image and its own prompt (pass prompts through `without_token` first)."""
        if len(images) != len(prompts):
            raise ValueError(f"clip_t: {len(images)} images but {len(prompts)} prompts")
        cosines = (self.image_embeddings(images) * self.text_embeddings(prompts)).sum(dim=1)
        return [float(value) for value in cosines]

    def clip_i(self, images: list[Image], reference: torch.Tensor) -> list[float]:
        """Mean cosine between each image and the reference photos' embeddings (`image_embeddings`
        of the subject's training photos, computed once per subject and reused for every image)."""
        if reference.ndim != 2 or reference.shape[0] == 0:
            raise ScoreError(f"{self.path}: CLIP-I needs at least one reference photo embedding")
        if reference.shape[1] != self.dim:
            raise ValueError(f"clip_i: reference embeddings have {reference.shape[1]} dimensions, "
                             f"{self.path} makes {self.dim}")
        cosines = self.image_embeddings(images) @ reference.float().cpu().T
        return [float(value) for value in cosines.mean(dim=1)]

    def _embed(self, items: list, embed_batch) -> torch.Tensor:
        """Run `embed_batch` over `items` in batches, without autograd, and normalise the result."""
        import torch

        with torch.inference_mode():
            parts = [embed_batch(items[start:start + self.batch_size])
                     for start in range(0, len(items), self.batch_size)]
            if not parts:
                return torch.empty(0, self.dim)
            features = torch.cat(parts).float().cpu()
            return torch.nn.functional.normalize(features, dim=-1)

    def _image_batch(self, images: list[Image]) -> torch.Tensor:
        pixels = self.processor(images=[image.convert("RGB") for image in images], return_tensors="pt")
        pixel_values = pixels["pixel_values"].to(self.device, self.dtype)
        return _projected(self.model.get_image_features(pixel_values=pixel_values))

    def _text_batch(self, texts: list[str]) -> torch.Tensor:
        # padded to the full 77 tokens as CLIP was trained, so a text's embedding never depends on
        # which other texts share its batch
        tokens = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.max_length,
                                return_tensors="pt")
        return _projected(self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                                       attention_mask=tokens["attention_mask"].to(self.device)))


def _projected(output) -> torch.Tensor:
    """transformers < 5 returns the projected features as a tensor, 5 as the output's pooler_output."""
    return output if hasattr(output, "ndim") else output.pooler_output


def _load(path: Path, device, dtype):
    """The model (safetensors only: nothing in the folder is ever unpickled), its tokenizer and image
    processor; any reason the folder cannot be used becomes one ScoreError line naming it."""
    _check_folder(path)
    from farm.models.sdxl import quiet_libraries

    quiet_libraries()  # before importing transformers' image processors, which warn on import
    from safetensors import SafetensorError
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    try:
        model, info = CLIPModel.from_pretrained(path, local_files_only=True, use_safetensors=True,
                                                output_loading_info=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise ScoreError(f"{path}: cannot load the CLIP model: {first_line(exc, with_type=True)}") from None
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        raise ScoreError(f"{path}: not a complete CLIP model ({len(missing)} weights missing, e.g. {missing[0]})")
    if len(tokenizer) > model.config.text_config.vocab_size:
        raise ScoreError(f"{path}: its tokenizer has {len(tokenizer)} tokens, more than the model's "
                         f"{model.config.text_config.vocab_size}: they do not belong together")
    return model.to(device=device, dtype=dtype).eval(), tokenizer, processor


def _check_folder(path: Path) -> None:
    """Refuse what is plainly not a CLIP folder before transformers does, with a clearer line."""
    if not path.exists():
        raise ScoreError(f"{path}: CLIP model folder not found")
    config = path / "config.json"
    if not path.is_dir() or not config.is_file():
        raise ScoreError(f"{path}: not a transformers CLIP model folder (no config.json)")
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError) as exc:
        raise ScoreError(f"{config}: cannot read it: {first_line(exc, with_type=True)}") from None
    if model_type != "clip":
        said = f"model_type {model_type!r}" if model_type else "no model_type"
        raise ScoreError(f"{path}: not a CLIP model (its config.json has {said}, a CLIPModel's is 'clip')")
    # without these, transformers 5 quietly makes a tokenizer that knows no word
    if not (path / "tokenizer.json").is_file() and not (path / "vocab.json").is_file():
        raise ScoreError(f"{path}: the CLIP model has no tokenizer (tokenizer.json, or vocab.json and merges.txt)")
