"""Face identity on real photographs from scikit-image: the astronaut (Eileen Collins) and LFW faces.

dlib's model runs on the CPU in ~0.1 s per image, so these tests need neither Ray nor a GPU."""

from __future__ import annotations

import importlib.util
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from farm.errors import ScoreError

pytest.importorskip("dlib")  # dlib-bin, face-recognition-models and scikit-image: the scoring extras
skimage_data = pytest.importorskip("skimage.data")

from farm.score.faces import SAME_PERSON_DISTANCE, FaceModel, FaceReading, FaceReference  # noqa: E402


@pytest.fixture(scope="module")
def model() -> FaceModel:
    return FaceModel()


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    return Image.fromarray(skimage_data.astronaut())


def _save(image: Image.Image, path: Path) -> Path:
    image.save(path)
    return path


def _shifted(image: Image.Image, by: int) -> Image.Image:
    """The same photo moved `by` px right and down, the uncovered border filled with its edge."""
    pixels = np.asarray(image)
    height, width = pixels.shape[:2]
    return Image.fromarray(np.pad(pixels, ((by, 0), (by, 0), (0, 0)), mode="edge")[:height, :width])


def _lfw_faces(model: FaceModel, count: int) -> list[FaceReading]:
    """The first `count` LFW faces dlib finds once upscaled (25 px is far below its ~80 px minimum)."""
    found = []
    for gray in skimage_data.lfw_subset()[:100]:
        image = Image.fromarray(np.round(gray * 255).astype(np.uint8)).resize((200, 200), Image.BICUBIC)
        reading = model.read(image.convert("RGB"))
        if reading.faces:
            found.append(reading)
        if len(found) == count:
            return found
    pytest.fail(f"dlib found only {len(found)} of {count} LFW faces")


def test_the_same_face_moved_or_mirrored_is_closer_than_other_people(model, astronaut, tmp_path):
    subject = FaceReference.from_photos(model, [_save(astronaut, tmp_path / "astronaut.png")], where="job.subject")
    assert (subject.photos, subject.photos_with_face) == (1, 1)
    assert subject.descriptors.shape == (1, 128) and subject.descriptors.dtype == np.float32

    moved = model.read(_shifted(astronaut, 20))
    mirrored = model.read(astronaut.transpose(Image.FLIP_LEFT_RIGHT))
    same = [subject.distances(reading.descriptor)[0] for reading in (moved, mirrored)]
    assert max(same) < SAME_PERSON_DISTANCE, same

    others = [subject.distances(reading.descriptor)[0] for reading in _lfw_faces(model, 5)]
    assert min(others) > max(same), (same, others)
    assert statistics.median(others) > SAME_PERSON_DISTANCE, others


def test_a_reading_holds_the_largest_face_descriptor_and_box(model, astronaut):
    reading = model.read(astronaut)
    assert reading.faces == 1
    assert reading.descriptor.shape == (128,) and reading.descriptor.dtype == np.float32
    left, top, right, bottom = reading.box
    assert 60 < right - left < 120 and 60 < bottom - top < 120  # Eileen Collins' face is ~90 px
    assert model.read(astronaut.convert("RGBA")).box == reading.box  # any PIL mode is read as RGB


@pytest.mark.parametrize("image", [
    pytest.param(lambda: Image.fromarray(skimage_data.coffee()), id="coffee"),
    pytest.param(lambda: Image.new("RGB", (300, 200), (128, 128, 128)), id="gray"),
])
def test_no_face_is_a_recorded_value(model, image):
    assert model.read(image()) == FaceReading(0, None, None)


def test_the_largest_face_wins(model, astronaut):
    """A 0.75× copy on the left and the full photo on the right: the returned box is the full one's."""
    full = model.read(astronaut)
    full_width = full.box[2] - full.box[0]
    small = astronaut.resize((384, 384), Image.BICUBIC)
    alone = model.read(_canvas_with(small, at=(64, 64)))
    assert alone.faces >= 1 and alone.box[2] - alone.box[0] < full_width - 5  # dlib finds the small face too

    canvas = _canvas_with(small, at=(64, 64))
    canvas.paste(astronaut, (512, 0))
    reading = model.read(canvas)
    assert reading.faces >= 2
    assert reading.box[0] >= 512 and abs((reading.box[2] - reading.box[0]) - full_width) <= 3, reading.box


def _canvas_with(image: Image.Image, at: tuple[int, int]) -> Image.Image:
    canvas = Image.new("RGB", (1024, 512), (128, 128, 128))
    canvas.paste(image, at)
    return canvas


def test_the_reference_keeps_photos_with_a_face(model, astronaut, tmp_path):
    """A faceless photo is skipped; distances go to the centroid and to the nearest photo."""
    mirrored = astronaut.transpose(Image.FLIP_LEFT_RIGHT)
    # as a JPEG the mirrored photo also holds a weak detection larger than her face: it must not win
    paths = [_save(astronaut, tmp_path / "a.png"), _save(mirrored, tmp_path / "b.jpg"),
             _save(Image.fromarray(skimage_data.coffee()), tmp_path / "coffee.png")]
    subject = FaceReference.from_photos(model, paths, where="job.subject")
    assert (subject.photos, subject.photos_with_face) == (3, 2)
    assert subject.descriptors.shape == (2, 128) and subject.centroid.shape == (128,)
    assert subject.centroid.dtype == np.float32

    to_centroid, to_nearest = subject.distances(model.read(astronaut).descriptor)
    assert to_nearest < 1e-4  # the photo itself is in the reference
    assert 0 < to_centroid < SAME_PERSON_DISTANCE / 2


def test_no_face_in_any_subject_photo_is_an_error_naming_where(model, tmp_path):
    paths = [_save(Image.fromarray(skimage_data.coffee()), tmp_path / "coffee.png"),
             _save(Image.new("RGB", (64, 64), (200, 200, 200)), tmp_path / "gray.png")]
    with pytest.raises(ScoreError, match=r"^jobs/x.yaml: subject: no face found in any of the 2 subject photos$"):
        FaceReference.from_photos(model, paths, where="jobs/x.yaml: subject")


def test_an_unreadable_subject_photo_is_an_error_naming_the_file(model, astronaut, tmp_path):
    broken = tmp_path / "notes.png"
    broken.write_text("not an image")
    with pytest.raises(ScoreError, match="notes.png"):
        FaceReference.from_photos(model, [_save(astronaut, tmp_path / "a.png"), broken], where="job.subject")


def test_missing_packages_name_what_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "face_recognition_models" else real_find_spec(name, *args))
    with pytest.raises(ScoreError, match="pip install face-recognition-models"):
        FaceModel()

    monkeypatch.setitem(sys.modules, "dlib", None)  # makes `import dlib` raise ImportError
    with pytest.raises(ScoreError, match="pip install dlib-bin"):
        FaceModel()
