"""The installed `k-diffusion` package as a reference implementation, without its heavy imports.

`k_diffusion/__init__.py` imports its training stack (wandb, torchvision, clean-fid, ...), which
the farm does not install. The samplers only need `k_diffusion.utils` (which imports
`torchvision.transforms.functional` at the top, but the samplers never call it), `torchsde`,
`torchdiffeq` and scipy. So: register a bare `k_diffusion` package whose `__path__` is the
installed folder (its `__init__` never runs), stub `torchvision.transforms.functional` only when
torchvision is not installed, and import the submodules. Nothing in site-packages is changed.

    from tests.kdiffusion_ref import sampling as K, external as K_external
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path


def _installed_folder() -> Path:
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("k-diffusion is not installed (scripts/setup installs it for the tests)")
    return Path(list(spec.submodule_search_locations)[0])


_STUBS = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")


def _stub_torchvision() -> bool:
    """A placeholder `torchvision.transforms.functional`: utils imports it, the samplers never use
    it. True when stubbed; the stub is removed again after the import, so that libraries probing
    for torchvision (diffusers, transformers) still find it missing."""
    if importlib.util.find_spec("torchvision") is not None:
        return False
    for name in _STUBS:
        if name not in sys.modules:
            module = types.ModuleType(name)
            module.__path__ = []  # a package, so the dotted import resolves
            sys.modules[name] = module
    sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
    sys.modules["torchvision.transforms"].functional = sys.modules["torchvision.transforms.functional"]
    return True


def _load():
    existing = sys.modules.get("k_diffusion")
    if existing is None or not hasattr(existing, "__path__"):
        package = types.ModuleType("k_diffusion")
        package.__path__ = [str(_installed_folder())]
        package.__package__ = "k_diffusion"
        sys.modules["k_diffusion"] = package
    stubbed = _stub_torchvision()
    try:
        sampling_module = importlib.import_module("k_diffusion.sampling")
        try:
            external_module = importlib.import_module("k_diffusion.external")
        except ImportError:  # only used to cross-check the discrete schedule
            external_module = None
    finally:
        if stubbed:
            for name in _STUBS:
                sys.modules.pop(name, None)
    return sampling_module, external_module


sampling, external = _load()
