"""Face identity scores: does a rendered image show the subject the LoRA was trained on?

dlib's face recognition network maps a face to a 128-d descriptor in which the Euclidean distance
between two faces of the same person is small (dlib's own convention: < 0.6 means the same person
for this model). The subject's identity is the set of descriptors of their training photos.

    likeness  the distance of the largest face in an image rendered *with* the subject token to the
              subject (lower = more alike); what a LoRA is trained for
    leakage   the same distance on images rendered from prompts naming only the class word ("photo of
              a man"): a low value there means the LoRA turned every man into the subject

An image with no face found is a recorded value (`faces == 0`, no distance), not an error: it is
itself a finding (a LoRA that broke faces, a prompt that framed none).

The weights come from the `face_recognition_models` wheel (located on disk, never downloaded); its
package helpers are not imported since they need pkg_resources.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, NamedTuple

import numpy as np

from farm.errors import ScoreError

if TYPE_CHECKING:
    from PIL import Image

DETECTOR_UPSAMPLE_BELOW = 400  # px on the shorter side; see FaceModel._detect
SAME_PERSON_DISTANCE = 0.6  # dlib's threshold for its resnet model (99.38% on LFW)
# HOG detections scoring below this are often texture (a suit's folds, hair): on skimage's astronaut
# saved as JPEG one scores 0.14 and is larger than her face (1.4). Real faces score ~0.1-1.5, so weak
# ones are still used when nothing in the image scores higher.
CONFIDENT_FACE_SCORE = 0.5


class FaceReading(NamedTuple):
    """What one image holds: how many faces, and the descriptor and box of the largest one."""

    faces: int
    descriptor: np.ndarray | None  # float32, shape (128,)
    box: tuple[int, int, int, int] | None  # (left, top, right, bottom) in image pixels


def _models_folder() -> Path:
    """The `models/` folder of the face_recognition_models wheel, found without importing it."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ScoreError("face scoring needs the face recognition weights: pip install face-recognition-models")
    return Path(next(iter(spec.submodule_search_locations))) / "models"


def _import_dlib() -> Any:
    try:
        import dlib
    except ImportError as exc:
        raise ScoreError("face scoring needs dlib: pip install dlib-bin") from exc
    return dlib


def _model_file(folder: Path, name: str) -> str:
    path = folder / name
    if not path.is_file():
        raise ScoreError(f"{path}: missing from face_recognition_models; pip install --force-reinstall "
                         "face-recognition-models")
    return str(path)


def _as_rgb_array(image: Image.Image) -> np.ndarray:
    """dlib wants a contiguous H×W×3 uint8 array; PIL images may be RGBA, L, P or 16-bit."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8))


def _box(rect: Any) -> tuple[int, int, int, int]:
    return (rect.left(), rect.top(), rect.right(), rect.bottom())


def _area(rect: Any) -> int:
    return max(rect.width(), 0) * max(rect.height(), 0)


def _largest_face(found: list[tuple[Any, float]]) -> Any:
    """The largest face by area among confident detections (all of them if none is), ties broken
    by confidence: a large weak false positive must not stand in for the subject's face."""
    confident = [face for face in found if face[1] >= CONFIDENT_FACE_SCORE] or found
    return max(confident, key=lambda face: (_area(face[0]), face[1]))[0]


class FaceModel:
    """dlib's HOG face detector, 5-point landmark model and resnet descriptor, loaded once.

    Loading takes about a second (the resnet file is 22 MB); a scoring worker keeps one instance."""

    def __init__(self) -> None:
        dlib = _import_dlib()
        folder = _models_folder()
        self._detector = dlib.get_frontal_face_detector()
        self._landmarks = dlib.shape_predictor(_model_file(folder, "shape_predictor_5_face_landmarks.dat"))
        self._encoder = dlib.face_recognition_model_v1(
            _model_file(folder, "dlib_face_recognition_resnet_model_v1.dat"))

    def _detect(self, pixels: np.ndarray) -> list[tuple[Any, float]]:
        """Every face found, with the detector's confidence (see `_largest_face`)."""
        # dlib's HOG detector only finds faces of about 80 px and up; upsampling a small image once
        # (2×) brings faces of ~40 px into range, at 4× the cost, so only small images pay for it.
        upsample = 1 if min(pixels.shape[:2]) < DETECTOR_UPSAMPLE_BELOW else 0
        rects, scores, _ = self._detector.run(pixels, upsample, 0.0)
        return list(zip(rects, scores))

    def read(self, image: Image.Image) -> FaceReading:
        """The largest face's descriptor (the subject is the main face in a portrait; background
        faces are smaller), or `FaceReading(0, None, None)` when the image has no face. `faces`
        counts every detection; the largest is taken among confident ones when there are any."""
        pixels = _as_rgb_array(image)
        found = self._detect(pixels)
        if not found:
            return FaceReading(0, None, None)
        largest = _largest_face(found)
        shape = self._landmarks(pixels, largest)
        descriptor = np.asarray(self._encoder.compute_face_descriptor(pixels, shape, 1), dtype=np.float32)
        return FaceReading(len(found), descriptor, _box(largest))

    def read_many(self, images: Iterable[Image.Image]) -> list[FaceReading]:
        return [self.read(image) for image in images]


def _open_photo(path: Path) -> Image.Image:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
        raise ScoreError(f"{path}: cannot read this subject photo ({exc.__class__.__name__})") from exc


class FaceReference:
    """The subject's identity: the descriptors of the training photos in which a face was found.

    Distances follow dlib's convention for its resnet model: below 0.6 the two faces are the same
    person. Both the distance to the centroid (stable, averages out pose and lighting of single
    photos) and to the nearest photo (rewards matching any one look of the subject) are kept."""

    def __init__(self, descriptors: np.ndarray, photos: int) -> None:
        self.descriptors = np.asarray(descriptors, dtype=np.float32).reshape(-1, 128)
        self.centroid = self.descriptors.mean(axis=0).astype(np.float32)
        self.photos_with_face = len(self.descriptors)
        self.photos = photos

    @classmethod
    def from_photos(cls, model: FaceModel, paths: list[Path], where: str) -> FaceReference:
        """Reads every subject photo; photos without a face are skipped, but not all of them:
        `where` (the job or dataset field) names the source in the error."""
        readings = [model.read(_open_photo(Path(path))) for path in paths]
        found = [reading.descriptor for reading in readings if reading.descriptor is not None]
        if not found:
            raise ScoreError(f"{where}: no face found in any of the {len(paths)} subject photos")
        return cls(np.stack(found), photos=len(paths))

    def distances(self, descriptor: np.ndarray) -> tuple[float, float]:
        """(distance to the centroid, distance to the nearest photo) of one face's descriptor;
        lower is more alike, < 0.6 is the same person for dlib's model."""
        descriptor = np.asarray(descriptor, dtype=np.float32)
        to_centroid = float(np.linalg.norm(self.centroid - descriptor))
        to_nearest = float(np.linalg.norm(self.descriptors - descriptor, axis=1).min())
        return to_centroid, to_nearest

    def __repr__(self) -> str:
        return f"FaceReference({self.photos_with_face} of {self.photos} photos with a face)"
