"""A run folder's saved training state, and the marker that ties the folder to one run's settings.

`state/state.pt` holds what a resumed run needs (trained weights, optimizer, schedule, position);
it is written at every epoch's end and when a run is stopped on purpose. `run.json` holds the
run's fingerprint: a folder trained with other settings is refused rather than resumed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from farm.errors import TrainError
from farm.files import replacing, write_atomic
from farm.models.artifacts import HashCache
from farm.sweep.spec import TrainOptions
from farm.train.dataset import Dataset
from farm.train.model import TrainingModel

STATE_DIR = "state"
STATE_FILE = "state.pt"
RUN_MARKER = "run.json"
# Bump when what a run trains or writes changes, so an old run folder is not resumed into a new one
TRAINER_VERSION = 2


@dataclass(frozen=True)
class Position:
    """Where training stands: the epoch to run, steps done, batches of that epoch already trained."""

    epoch: int
    step: int
    batch_in_epoch: int
    started_at: datetime

    @classmethod
    def start(cls) -> Position:
        return cls(epoch=1, step=0, batch_in_epoch=0, started_at=datetime.now(timezone.utc))


def fingerprint(model_path: Path, options: TrainOptions, dataset: Dataset) -> str:
    """What determines a run's weights: the model's and the images' content (not their names: new
    weights or pixels under the same names must not resume an old run), options and captions.
    Hashes come from the farm's hash cache, so a resumed run does not read the model again."""
    hashes = HashCache()
    items = [(hashes.file(Path(i.path)), i.caption, i.subset.num_repeats, i.subset.is_reg) for i in dataset.items]
    payload = json.dumps([TRAINER_VERSION, hashes.model(model_path), options.model_dump(mode="json"), items],
                         sort_keys=True)
    hashes.save()
    return hashlib.sha256(payload.encode()).hexdigest()


class RunState:
    """The saved state of the run `run` in `out_dir`, for `model`."""

    def __init__(self, run: str, out_dir: Path, model: TrainingModel):
        self.run, self.out_dir, self.model = run, out_dir, model
        self.path = out_dir / STATE_DIR / STATE_FILE

    def claim(self, mine: str) -> None:
        """Mark the folder as this run's (fingerprint `mine`), or refuse it when it holds a run
        made with other settings: its state and checkpoints must not be resumed or kept."""
        marker = self.out_dir / RUN_MARKER
        if marker.is_file():
            if json.loads(marker.read_text()).get("fingerprint") != mine:
                raise TrainError(f"{self.out_dir}: holds run {self.run!r} trained with other options, images or "
                                 "model; use another --out (or delete that folder)")
            return
        write_atomic(marker, json.dumps({"run": self.run, "fingerprint": mine}, indent=2).encode())

    def save(self, position: Position) -> None:
        """Everything a resumed run needs, fsynced: trained weights, optimizer, schedule, position."""
        import torch

        weights = self.model.trained_weights()
        state = {
            "unet": weights.pop("unet"),
            "optimizer": self.model.optimizer.state_dict(),
            "lr_scheduler": self.model.lr_scheduler.state_dict(),
            "epoch": position.epoch, "step": position.step, "batch_in_epoch": position.batch_in_epoch,
            "started_at": position.started_at.isoformat(),
            **weights,  # the text encoders' adapters, when they train
        }
        with replacing(self.path, durable=True) as tmp:
            torch.save(state, tmp)

    def load(self) -> Position | None:
        """Restore the saved state into the model and return its position; None for a fresh run."""
        import torch

        if not self.path.is_file():
            return None
        state = torch.load(self.path, map_location=self.model.device, weights_only=True)  # tensors only: no code
        self.model.restore(state)
        return Position(epoch=state["epoch"], step=state["step"], batch_in_epoch=state["batch_in_epoch"],
                        started_at=datetime.fromisoformat(state["started_at"]))
