"""The adapter cache: LoRAs loaded once into a pipeline, switched and weighted in milliseconds.

Loading a LoRA from disk costs ~150 ms on the tiny model and seconds on SDXL; `set_adapters`
between adapters already in the pipeline costs ~5 ms. So each pipeline keeps up to
`max_adapters` LoRAs loaded as named diffusers adapters (least recently used evicted) and a
strength change is only a new weight. Adapter names derive from the file's content hash, so two
paths to the same bytes are one adapter, and the bytes are checked against the plan's hash.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Sequence

from farm.errors import LoraError, first_line
from farm.sweep.plan import LoraUse


def adapter_name(lora: LoraUse) -> str:
    return "lora_" + lora.sha256[:16]


def read_lora(lora: LoraUse, path: Path | None = None) -> dict:
    """The LoRA's tensors, after checking the file (`path`, else the planned one) still has the
    bytes the plan hashed."""
    from safetensors.torch import load as load_safetensors

    path = path or Path(lora.path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise LoraError(f"{path}: cannot read: {exc.strerror}") from None
    if hashlib.sha256(data).hexdigest() != lora.sha256:
        raise LoraError(f"{path}: file changed since the job was planned (sha256 differs); plan again")
    try:
        tensors = load_safetensors(data)
    except Exception as exc:  # safetensors raises its own error types for each kind of damage
        raise LoraError(f"{path}: not a readable .safetensors file: {first_line(exc)}") from None
    if not tensors:
        raise LoraError(f"{path}: holds no tensors (not a LoRA)")
    for key, tensor in tensors.items():
        if not tensor.is_floating_point() and not key.endswith(".alpha"):  # kohya's alpha may be an int
            raise LoraError(f"{path}: tensor {key[:80]} is {str(tensor.dtype).removeprefix('torch.')}; "
                            "LoRA weights are floating point (not a LoRA?)")
    return tensors


class AdapterCache:
    """Which LoRAs a pipeline holds, and which are active at which strength."""

    def __init__(self, pipe, max_adapters: int = 8, locate: Callable[[LoraUse], Path] | None = None,
                 restore: Callable[[], None] | None = None):
        self.pipe = pipe
        # after a failed load: put the pipeline back as it was (diffusers takes CPU-offload hooks
        # off while it loads a LoRA and puts them back only when the load succeeds)
        self.restore = restore
        self.locate = locate or (lambda lora: Path(lora.path))  # a worker on another node fetches
        self.max_adapters = max_adapters
        self.loaded: OrderedDict[str, LoraUse] = OrderedDict()
        self.active: tuple[tuple[str, float], ...] = ()
        self.enabled = True  # diffusers' LoRA layers start enabled
        self.loads = 0  # disk loads, for the benchmark and tests

    def activate(self, loras: Sequence[LoraUse]) -> float:
        """Make exactly `loras` active at their strengths; returns the seconds it took (0.0: no change)."""
        wanted = tuple((adapter_name(lora), lora.strength) for lora in loras)
        if wanted == self.active:
            return 0.0
        started = time.perf_counter()
        if not loras:
            self.pipe.disable_lora()
            self.enabled = False
        else:
            for lora in loras:
                self._ensure_loaded(lora)
            if not self.enabled:  # enable_lora walks every layer: only when it was disabled
                self.pipe.enable_lora()
                self.enabled = True
            self.pipe.set_adapters([n for n, _ in wanted], adapter_weights=[w for _, w in wanted])
        self.active = wanted
        return time.perf_counter() - started

    def _ensure_loaded(self, lora: LoraUse) -> None:
        name = adapter_name(lora)
        if name in self.loaded:
            self.loaded.move_to_end(name)
            return
        self._evict_for_one_more()
        state = read_lora(lora, self.locate(lora))
        try:
            self.pipe.load_lora_weights(state, adapter_name=name)
        except Exception as exc:  # diffusers/peft: wrong base model, bad keys or shapes
            self._forget_partial(name)
            if self.restore is not None:
                self.restore()
            raise LoraError(f"{lora.path}: cannot apply to this model (a LoRA for another base model, "
                            f"or damaged): {first_line(exc)}") from None
        self.loaded[name] = lora
        self.loads += 1

    def _evict_for_one_more(self) -> None:
        while len(self.loaded) >= self.max_adapters:
            oldest, _ = self.loaded.popitem(last=False)
            self.pipe.delete_adapters(oldest)
            self.active = ()

    def _forget_partial(self, name: str) -> None:
        """A failed load can leave a half-registered adapter; drop it so the next task is clean."""
        try:
            self.pipe.delete_adapters(name)
        except Exception:
            pass
        self.active = ()
