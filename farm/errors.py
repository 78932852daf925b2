"""The farm's exception tree.

    FarmError                 a user-facing problem: the CLI prints its one-line message, exit 2
    ├── SpecError             a job spec is malformed ("jobs/x.yaml: axes.lora[2].strength: ...")
    ├── DatasetError          training images, captions, a kohya folder or dataset TOML cannot be used
    ├── ModelError            a model folder / checkpoint cannot be used
    ├── LoraError             a LoRA file cannot be used (only its tasks fail)
    ├── SamplerError          a sampler or schedule the farm cannot run exactly as A1111/ComfyUI do
    ├── PromptError           a prompt its emphasis syntax cannot read (A1111 fails on it too)
    ├── RenderError           a render failed (only its task fails; its row says why)
    ├── TrainError            a training run failed or cannot resume (its checkpoints so far are kept)
    ├── ManifestError         a run folder's manifest cannot be read or written
    ├── ScoreError            a run cannot be scored (no subject photo with a face, no CLIP model there)
    ├── ClusterError          no Ray cluster / Jobs API where the farm looked, or it refused the farm
    └── UsageError            a command's arguments do not fit the run (an axis it lacks, a job id it never had)

Anything that is not a FarmError is a bug in the farm and keeps its traceback.
"""


class FarmError(Exception):
    """A problem the user can fix; its message is one line and names the file or field."""


class SpecError(FarmError):
    pass


class DatasetError(FarmError):
    pass


class ModelError(FarmError):
    pass


class LoraError(FarmError):
    pass


class SamplerError(FarmError):
    pass


class PromptError(FarmError):
    pass


class RenderError(FarmError):
    pass


class TrainError(FarmError):
    pass


class ManifestError(FarmError):
    pass


class ScoreError(FarmError):
    pass


class ClusterError(FarmError):
    pass


class UsageError(FarmError):
    pass


def first_line(exc: BaseException, limit: int = 300, with_type: bool = False) -> str:
    """An exception as one line for a row, a log or the CLI (a worker's traceback stays in its log).
    `with_type` names the class first, for errors that are not the farm's own (`KeyError: 'x'`)."""
    text = f"{type(exc).__name__}: {exc}" if with_type else str(exc)
    return (text.strip().splitlines() or [type(exc).__name__])[0][:limit]
