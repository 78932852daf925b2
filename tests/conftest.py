"""Session fixtures: the tiny model and LoRAs are built once, Ray is started once."""

from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# the tests' specs, LoRAs and datasets live in temp folders: let jobs read there (and the repo)
os.environ.setdefault("SDFARM_ROOTS",
                      os.pathsep.join([tempfile.gettempdir(), str(Path(__file__).resolve().parent.parent)]))


@pytest.fixture(scope="session")
def farm_cache(tmp_path_factory) -> Path:
    """A private cache for tiny models, unless the caller (scripts/test) set one."""
    if not os.environ.get("SDFARM_CACHE"):
        os.environ["SDFARM_CACHE"] = str(tmp_path_factory.mktemp("sdfarm-cache"))
    return Path(os.environ["SDFARM_CACHE"])


@pytest.fixture(scope="session")
def tiny_model(farm_cache) -> Path:
    from farm.models.tiny import resolve_tiny

    return resolve_tiny("tiny:sdxl")


@pytest.fixture(scope="session")
def lora_dir(farm_cache, tmp_path_factory) -> Path:
    """Three tiny LoRAs named like kohya's per-epoch files (`subject-000001.safetensors`, ...)."""
    from farm.models.tiny import save_tiny_lora

    folder = tmp_path_factory.mktemp("loras")
    for epoch in (1, 2, 3):
        save_tiny_lora(folder / f"subject-00000{epoch}.safetensors", f"subject-{epoch}")
    return folder


@pytest.fixture(scope="session")
def renderer(tiny_model):
    """One CPU renderer shared by the render tests (loading a pipeline is the slow part)."""
    from farm.render.pipeline import PipelineOptions
    from farm.render.renderer import Renderer

    return Renderer(PipelineOptions(device="cpu", threads=1), worker="test")


# Every worker of the session's Ray carries this in its environment, so a test that kills workers
# kills only this cluster's, never those of another Ray on the machine.
RAY_WORKER_MARK = f"SDFARM_TEST_RAY={uuid.uuid4().hex}"


@pytest.fixture(scope="session")
def ray_cluster(farm_cache):
    """A real local Ray with two logical GPUs, as `ray start --head --num-gpus=2` declares."""
    import ray

    name, value = RAY_WORKER_MARK.split("=")
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, namespace="sdfarm-tests",
             runtime_env={"env_vars": {"SDFARM_CACHE": str(farm_cache), "HF_HUB_OFFLINE": "1", name: value}})
    yield ray
    ray.shutdown()


def write_spec(folder: Path, text: str, name: str = "job.yaml") -> Path:
    path = folder / name
    path.write_text(text)
    return path
