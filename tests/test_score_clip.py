"""CLIP-T / CLIP-I on a tiny random CLIP: the numbers are transformers' own cosines, batching does
not move them, the subject token leaves the prompt cleanly, and an unusable folder is one line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from farm.errors import ScoreError
from farm.score.clip import ClipScorer, without_token

TOLERANCE = 1e-5
PROMPTS = ["photo of a man", "a man smiling, outdoors, from side", "portrait", "a man in a red scarf, indoors",
           "close-up photo of a face"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Keep the tiny model on one CPU thread: these tests share the machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory) -> Path:
    from farm.models.tiny import save_tiny_clip

    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


@pytest.fixture(scope="module")
def scorer(clip_path) -> ClipScorer:
    return ClipScorer(clip_path)


def picture(index: int, size: int = 48):
    """A distinct, deterministic picture: a coloured background with a square in its own place."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size + 8 * index, size), (40 * index % 256, 120, 200 - 30 * index))
    ImageDraw.Draw(image).rectangle([4 * index, 6, 4 * index + 16, 22], fill=(230, 30 + 40 * index, 30))
    return image


def images(count: int = 5) -> list:
    return [picture(index) for index in range(count)]


def test_embeddings_are_unit_length(scorer):
    image_vectors = scorer.image_embeddings(images())
    text_vectors = scorer.text_embeddings(PROMPTS)
    assert image_vectors.shape == (5, scorer.dim) and text_vectors.shape == (5, scorer.dim)
    for vectors in (image_vectors, text_vectors):
        assert (vectors.norm(dim=1) - 1).abs().max() <= TOLERANCE


def test_the_same_image_is_cosine_one_and_different_images_less(scorer):
    same = scorer.image_embeddings([picture(1), picture(1)])
    assert float(same[0] @ same[1]) == pytest.approx(1.0, abs=TOLERANCE)
    different = scorer.image_embeddings([picture(0), picture(3)])
    assert float(different[0] @ different[1]) < 1 - 1e-4


def test_clip_t_is_transformers_own_cosine(scorer, clip_path):
    """CLIPModel's forward gives logits_per_image = logit_scale.exp() * cosine: undo the scale."""
    import torch
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(clip_path, local_files_only=True).eval()
    tokens = AutoTokenizer.from_pretrained(clip_path, local_files_only=True)(PROMPTS, padding=True,
                                                                            return_tensors="pt")
    pixels = AutoImageProcessor.from_pretrained(clip_path, local_files_only=True)(images=images(),
                                                                                  return_tensors="pt")
    with torch.no_grad():
        output = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                       pixel_values=pixels["pixel_values"])
    expected = (output.logits_per_image / model.logit_scale.exp()).diagonal().tolist()
    assert scorer.clip_t(images(), PROMPTS) == pytest.approx(expected, abs=TOLERANCE)


def test_batch_size_does_not_change_results(scorer, clip_path):
    one_by_one = ClipScorer(clip_path, batch_size=1)
    assert one_by_one.clip_t(images(), PROMPTS) == pytest.approx(scorer.clip_t(images(), PROMPTS), abs=TOLERANCE)
    reference = scorer.image_embeddings(images(2))
    assert one_by_one.clip_i(images(), reference) == pytest.approx(scorer.clip_i(images(), reference),
                                                                   abs=TOLERANCE)
    assert (one_by_one.text_embeddings(PROMPTS) - scorer.text_embeddings(PROMPTS)).abs().max() <= TOLERANCE


def test_clip_i_is_the_mean_cosine_to_the_reference_photos(scorer):
    photos = [picture(index, size=64) for index in (1, 2, 4)]
    reference = scorer.image_embeddings(photos)
    rendered = images(4)
    by_hand = []
    for image in rendered:
        vector = scorer.image_embeddings([image])[0]
        cosines = [float(vector.dot(photo)) / float(vector.norm() * photo.norm()) for photo in reference]
        by_hand.append(sum(cosines) / len(cosines))
    assert scorer.clip_i(rendered, reference) == pytest.approx(by_hand, abs=TOLERANCE)


def test_a_rendered_image_that_is_a_training_photo_scores_highest(scorer):
    reference = scorer.image_embeddings([picture(2)])
    scores = scorer.clip_i([picture(0), picture(2), picture(4)], reference)
    assert scores[1] == pytest.approx(1.0, abs=TOLERANCE) and scores[1] == max(scores)


def test_long_prompts_are_cut_at_clips_77_tokens(scorer):
    """A prompt of 200 words is its first 75 (77 with the start and end tokens)."""
    long, cut = scorer.text_embeddings(["man " * 200, "man " * 75])
    assert (long - cut).abs().max() <= TOLERANCE


def test_empty_inputs_and_mismatched_lengths(scorer):
    assert scorer.clip_t([], []) == [] and scorer.image_embeddings([]).shape == (0, scorer.dim)
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        scorer.clip_t(images(2), ["a man"])
    with pytest.raises(ScoreError, match="reference photo"):
        scorer.clip_i(images(1), scorer.image_embeddings([]))


@pytest.mark.parametrize("prompt, expected", [
    ("photo of a w0ut3r man", "photo of a man"),
    ("w0ut3r man looking", "man looking"),
    ("w0ut3r, man", "man"),
    ("W0UT3R, photo of a man, from side", "photo of a man, from side"),
    ("a man, w0ut3r, smiling", "a man, smiling"),
    ("photo of a man, w0ut3r", "photo of a man"),
    ("w0ut3r w0ut3r man", "man"),
    ("photo of  a   man", "photo of  a   man"),  # no token: untouched, spaces and all
    ("photo of w0ut3rs man", "photo of w0ut3rs man"),  # inside another word: kept
    ("photo of xw0ut3r man", "photo of xw0ut3r man"),
])
def test_without_token(prompt, expected):
    assert without_token(prompt, "w0ut3r") == expected


def test_without_an_empty_token_the_prompt_is_unchanged():
    assert without_token("photo of a  man", "") == "photo of a  man"
    assert without_token("photo of a  man", "  ") == "photo of a  man"


def test_tokens_with_regex_characters_are_literal():
    assert without_token("photo of <s1> man", "<s1>") == "photo of man"
    assert without_token("photo of s1 man", "s.") == "photo of s1 man"


def one_line_error(path: Path) -> str:
    with pytest.raises(ScoreError) as caught:
        ClipScorer(path)
    message = str(caught.value)
    assert str(path) in message and "\n" not in message
    return message


def test_a_missing_folder_is_one_line(tmp_path):
    assert "not found" in one_line_error(tmp_path / "nowhere")


def test_an_empty_folder_is_not_a_clip_model(tmp_path):
    assert "no config.json" in one_line_error(tmp_path)


@pytest.mark.parametrize("config", [{"foo": 1}, {"model_type": "bert"}, "not json {", [1, 2]])
def test_a_folder_with_another_config_is_not_a_clip_model(tmp_path, config):
    (tmp_path / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    one_line_error(tmp_path)


def test_a_clip_folder_without_safetensors_weights_is_refused(tmp_path, clip_path):
    """No pytorch_model.bin fallback: the farm never unpickles a file it was pointed to."""
    shutil.copytree(clip_path, tmp_path / "clip")
    (tmp_path / "clip" / "model.safetensors").unlink()
    (tmp_path / "clip" / "pytorch_model.bin").write_bytes(b"not loaded")
    assert "model.safetensors" in one_line_error(tmp_path / "clip")


def test_truncated_weights_are_one_line(tmp_path, clip_path):
    shutil.copytree(clip_path, tmp_path / "clip")
    weights = tmp_path / "clip" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    one_line_error(tmp_path / "clip")


def test_weights_of_only_the_text_tower_are_refused(tmp_path, clip_path):
    """transformers would fill the missing vision tower with random weights and score with them."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(clip_path, tmp_path / "clip")
    weights = tmp_path / "clip" / "model.safetensors"
    text_only = {key: value for key, value in load_file(weights).items() if key.startswith("text_")}
    save_file(text_only, weights, metadata={"format": "pt"})
    assert "weights missing" in one_line_error(tmp_path / "clip")


def test_a_clip_folder_without_a_tokenizer_is_refused(tmp_path, clip_path):
    """transformers 5 would quietly make a tokenizer that knows no word."""
    shutil.copytree(clip_path, tmp_path / "clip", ignore=shutil.ignore_patterns("tokenizer*", "vocab.json"))
    assert "tokenizer" in one_line_error(tmp_path / "clip")


def test_tiny_clip_is_a_cached_reference_built_the_same_every_time(farm_cache, clip_path):
    from farm.models.tiny import TINY_CLIP, resolve_tiny

    cached = resolve_tiny(TINY_CLIP)
    assert cached.is_dir() and not list(cached.glob("*.bin"))
    assert (cached / "model.safetensors").read_bytes() == (clip_path / "model.safetensors").read_bytes()


def test_importing_the_module_does_not_import_torch():
    code = "import sys, farm.score.clip; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent)
