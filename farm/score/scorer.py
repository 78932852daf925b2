"""Scoring a batch of manifest rows: faces always, CLIP when a model is configured.

A `Scorer` loads its models once (dlib's, a CLIP model, the subject photos' embeddings) and is
kept by whoever scores many batches: `farm score` in its process, a worker on the cluster.
"""

from __future__ import annotations

import hashlib
import platform
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

from farm.errors import ScoreError
from farm.files import write_atomic
from farm.models.artifacts import sha256_file
from farm.sweep.prompt_syntax import parse

_LORA_TAG = re.compile(r"<(?:lora|lyco|hypernet):[^>]*>", re.IGNORECASE)


@dataclass(frozen=True)
class Subject:
    """Whom the LoRA was trained on: the training photos (instances, not regularization), the
    instance token and the class word of kohya's `<repeats>_<token> <class>` folder."""

    photos: tuple[str, ...]
    token: str
    class_word: str
    where: str = "subject photos"  # for error messages: the folder or field they came from

    def as_dict(self) -> dict:
        return {"photos": list(self.photos), "token": self.token, "class_word": self.class_word, "where": self.where}

    @classmethod
    def from_dict(cls, data: dict) -> "Subject":
        return cls(tuple(data["photos"]), data["token"], data["class_word"], data.get("where", "subject photos"))

    def names_subject(self, prompt: str) -> bool:
        """The prompt names the instance token (a whole word): a likeness prompt; else class-only."""
        from farm.score.clip import without_token

        return bool(self.token) and without_token(prompt, self.token) != prompt


def resolve_clip(reference: str | None) -> str | None:
    """A CLIP model folder on this node: `tiny:clip` is built here; a path must exist here."""
    if not reference:
        return None
    if reference.startswith("tiny:"):
        from farm.models.tiny import resolve_tiny

        return str(resolve_tiny(reference))
    if not Path(reference).exists():
        raise ScoreError(f"{reference}: no such CLIP model folder (on {platform.node()})")
    return reference


def clip_model_id(clip_model: str | None) -> str:
    """A CLIP model folder's identity: its weights' content hash (the path when there are none)."""
    if not clip_model:
        return ""
    folder = Path(clip_model)
    weights = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    return sha256_file(weights[0]) if weights else str(folder)


def reference_key(subject: Subject, clip_model: str | None) -> str:
    """What a score was measured against: the photos' content (not their names or order: a
    worker holds copies), the token and the CLIP model. Scores made against another reference
    are made again, never mixed."""
    digest = hashlib.sha256()
    for photo_hash in sorted(sha256_file(Path(photo)) for photo in subject.photos):
        digest.update(photo_hash.encode())
    digest.update(f"\0{subject.token}\0{subject.class_word}\0{clip_model_id(clip_model)}".encode())
    return digest.hexdigest()[:16]


def prompt_text(prompt: str, syntax: str | None) -> str:
    """The prompt as words CLIP reads: `<lora:…>` tags, emphasis weights and BREAK removed."""
    runs = parse(_LORA_TAG.sub("", prompt), syntax or "a1111")
    text = " ".join(t for t, weight in runs if weight >= 0)  # BREAK is a marker run with weight -1
    return re.sub(r"\s+", " ", text).strip()


class Scorer:
    """Models loaded once; `score(rows, root)` scores a batch of `ok` manifest rows."""

    def __init__(self, subject: Subject, clip_model: str | None = None, device: str | None = None,
                 worker: str = "local"):
        from PIL import Image

        from farm.score.faces import FaceModel, FaceReference

        self.subject, self.worker = subject, worker
        if not subject.photos:
            raise ScoreError(f"{subject.where}: no subject photos to score against")
        self.clip_model = clip_model or ""  # as the user named it (`tiny:clip`, a folder)
        clip_model = resolve_clip(clip_model)
        self.reference = reference_key(subject, clip_model)
        self.faces = FaceModel()
        self.warnings: list[str] = []
        try:
            self.face_reference = FaceReference.from_photos(self.faces, [Path(p) for p in subject.photos],
                                                            subject.where)
        except ScoreError as exc:
            if "no face" not in str(exc):
                raise
            # faces in the renders are still counted, and CLIP still scores: only distances are missing
            self.face_reference = None
            self.warnings.append(f"{exc}: likeness and leakage are not measured")
        self.clip = self.clip_reference = None
        if clip_model:
            from farm.score.clip import ClipScorer

            self.clip = ClipScorer(clip_model, device or _default_device())
            photos = [Image.open(p).convert("RGB") for p in subject.photos]
            self.clip_reference = self.clip.image_embeddings(photos)

    def score(self, rows: list[dict], root: Path) -> list[dict]:
        """Score rows whose images are in the run folder at `root`."""
        return self.score_pngs(rows, [read_png(Path(root) / row["image_path"]) for row in rows])

    def score_pngs(self, rows: list[dict], pngs: list[bytes]) -> list[dict]:
        """Score rows given their images' bytes (a worker on another node has no run folder)."""
        import io

        from PIL import Image

        from farm.score.clip import without_token

        images = []
        for row, png in zip(rows, pngs):
            try:
                images.append(Image.open(io.BytesIO(png)).convert("RGB"))
            except OSError as exc:
                raise ScoreError(f"{row['image_path']}: cannot read the rendered image: {exc}") from None
        readings = self.faces.read_many(images)
        clip_t = clip_i = [None] * len(rows)
        if self.clip is not None:
            texts = [without_token(prompt_text(r["prompt"], r.get("prompt_syntax")), self.subject.token) for r in rows]
            clip_t = self.clip.clip_t(images, texts)
            clip_i = self.clip.clip_i(images, self.clip_reference)
        now = datetime.now(timezone.utc)
        scored = []
        for row, reading, t, i in zip(rows, readings, clip_t, clip_i):
            centroid = nearest = None
            if reading.faces and self.face_reference is not None:
                centroid, nearest = self.face_reference.distances(reading.descriptor)
            scored.append({
                "task_id": row["task_id"], "image_sha256": row["image_sha256"], "reference": self.reference,
                "subject_prompt": self.subject.names_subject(row["prompt"]), "faces": reading.faces,
                "face_distance": centroid, "face_distance_nearest": nearest, "clip_t": t, "clip_i": i,
                "clip_model": self.clip_model, "worker": self.worker, "scored_at": now})
        return scored


def read_png(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ScoreError(f"{path}: cannot read the rendered image: {exc.strerror}") from None


@dataclass(frozen=True)
class ScoreSetup:
    """What a worker on any node needs to build the same Scorer: the subject photos' bytes (put
    in Ray's object store once), the token, the class word and the CLIP model reference (a
    folder that must exist on every node, like a base model, or `tiny:clip`)."""

    photos: tuple[tuple[str, bytes], ...]  # (file name, bytes)
    token: str
    class_word: str
    where: str
    clip_model: str | None
    reference: str  # reference_key on the driver; the worker's Scorer must arrive at the same

    @classmethod
    def of(cls, subject: Subject, clip_model: str | None) -> "ScoreSetup":
        photos = tuple((Path(p).name, Path(p).read_bytes()) for p in subject.photos)
        return cls(photos, subject.token, subject.class_word, subject.where, clip_model,
                   reference_key(subject, resolve_clip(clip_model)))

    def build(self, folder: Path, device: str | None = None, worker: str = "local") -> Scorer:
        """The Scorer, its photos written under `folder` (a node-local cache) by content hash."""
        paths = []
        for name, data in self.photos:
            path = folder / hashlib.sha256(data).hexdigest()[:16] / name
            if not path.is_file():
                write_atomic(path, data)
            paths.append(str(path))
        scorer = Scorer(Subject(tuple(paths), self.token, self.class_word, self.where), self.clip_model, device, worker)
        if scorer.reference != self.reference:
            raise ScoreError(f"{self.clip_model}: this CLIP model differs on {worker}'s node from the driver's")
        return scorer


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class ScoreSummary(NamedTuple):
    scored: int  # images scored now
    kept: int  # images already scored against the same reference
    warnings: list[str]


def rows_to_score(run, reference: str, again: bool = False) -> tuple[list[dict], list[dict]]:
    """(every `ok` manifest row, those not yet scored against `reference` for their current image)."""
    import pyarrow.compute as pc

    from farm.score.table import ScoreTable

    done = {} if again else ScoreTable(run).scored(reference)
    manifest = run.read()
    rows = manifest.filter(pc.equal(manifest["status"], "ok")).to_pylist()
    return rows, [r for r in rows if done.get(r["task_id"]) != r["image_sha256"]]


def score_run(run, subject: Subject, clip_model: str | None = None, device: str | None = None,
              batch: int = 32, again: bool = False, on_batch=None) -> ScoreSummary:
    """Score every `ok` image of a run folder not yet scored against this reference, in process.
    Each batch is written as its own part, so an interrupted scoring keeps what it did."""
    from farm.score.table import ScoreTable

    table = ScoreTable(run)
    scorer = Scorer(subject, clip_model, device)
    rows, todo = rows_to_score(run, scorer.reference, again)
    for start in range(0, len(todo), batch):
        table.write_part(scorer.score(todo[start:start + batch], run.root))
        if on_batch:
            on_batch(min(start + batch, len(todo)), len(todo))
    return ScoreSummary(len(todo), len(rows) - len(todo), scorer.warnings)
