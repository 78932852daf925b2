"""What a run reports while it trains: every step in `log.csv`, and either a tqdm bar (`progress`)
or about ten lines in the worker's log (what the Ray dashboard shows), plus the caller's `on_step`."""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Callable

LOG_FILE = "log.csv"

OnStep = Callable[[int, float, float], None]  # (step, loss, seconds): the worker's metrics


class StepLog:
    """Per-step CSV: step, epoch, loss, lr, step_s (readable by any spreadsheet or pandas). A
    resumed run appends to it, so the file holds every step once."""

    def __init__(self, path: Path, append: bool):
        fresh = not (append and path.is_file())
        self.handle = open(path, "w" if fresh else "a", newline="")
        self.writer = csv.writer(self.handle)
        if fresh:
            self.writer.writerow(["step", "epoch", "loss", "lr", "step_s"])

    def write(self, step: int, epoch: int, loss: float, lr: float, step_s: float) -> None:
        self.writer.writerow([step, epoch, f"{loss:.6f}", f"{lr:.6g}", f"{step_s:.4f}"])
        self.handle.flush()  # a killed run keeps every step it finished

    def close(self) -> None:
        self.handle.close()


class Progress:
    """Reports each optimizer step of run `run` (steps `first_step`+1 … `total` of `epochs` epochs)."""

    def __init__(self, run: str, out_dir: Path, total: int, epochs: int, first_step: int, resumed: bool,
                 bar: bool, on_step: OnStep | None):
        from tqdm import tqdm

        self.run, self.total, self.epochs, self.first_step = run, total, epochs, first_step
        self.log = StepLog(out_dir / LOG_FILE, append=resumed)
        self.bar = tqdm(total=total, initial=first_step, disable=not bar, desc=run, unit="step")
        self.lines = not bar
        self.on_step = on_step
        self.report_every = max(1, total // 10)
        self.began = time.perf_counter()

    def step(self, step: int, epoch: int, loss: float, lr: float, seconds: float) -> None:
        self.log.write(step, epoch, loss, lr, seconds)
        if self.on_step:
            self.on_step(step, loss, seconds)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4f}", epoch=epoch, refresh=False)
        if self.lines and (step % self.report_every == 0 or step == self.total):
            rate = (time.perf_counter() - self.began) / (step - self.first_step)
            print(f"[train {self.run}] step {step}/{self.total} epoch {epoch}/{self.epochs} "
                  f"loss {loss:.4f} lr {lr:.3g} {rate:.2f} s/step, ETA {rate * (self.total - step):.0f} s", flush=True)

    def close(self) -> None:
        self.log.close()
        self.bar.close()
