"""Memory: the plan per card size, the loader applying it, clean state between tasks, low
precision, and a single-file checkpoint rendered and trained from. CPU, tiny model, no Ray."""

import weakref

import numpy as np
import pytest
import torch

from farm.render import memory
from farm.render.memory import GiB, SDXL_BASE, ComponentSizes, MemoryOptions, plan_render
from farm.render.pipeline import PipelineOptions
from farm.render.renderer import Renderer
from farm.sweep.spec import TrainOptions
from test_render import pixels, tasks_for

CUDA_CONTEXT = 0.4 * GiB  # what the CUDA context takes of a card before any weight is loaded


def card(gib: float) -> int:
    return int(gib * GiB - CUDA_CONTEXT)


# --- the plan, on SDXL's real sizes ---------------------------------------------------------

def test_sdxl_component_sizes_in_fp16_bytes():
    """UNet 2.567 B, text encoders 123 M + 695 M, VAE 83.7 M parameters: 6.5 GiB in fp16."""
    fp16 = {name: getattr(SDXL_BASE, name) * 2 / GiB for name in ("unet", "text_encoder", "text_encoder_2", "vae")}
    assert round(fp16["unet"], 2) == 4.78 and round(fp16["text_encoder_2"], 2) == 1.29
    assert round(SDXL_BASE.total * 2 / GiB, 2) == 6.46


@pytest.mark.parametrize("gib, offload, tiling", [
    (4, "sequential", True),  # not even the UNet alone fits
    (6, "model", False),      # one model at a time: the UNet (4.8 GiB) + its work
    (8, "model", False),      # resident + VAE tiling needs 7.6 GiB: just over an 8 GB card's free
    (12, "none", False),      # all resident, the fp32 VAE decoding untiled
    (24, "none", False),
])
def test_render_plan_for_each_card(gib, offload, tiling):
    plan = plan_render(card(gib), SDXL_BASE, MemoryOptions())
    assert (plan.offload, plan.vae_tiling, plan.fits) == (offload, tiling, True)
    assert plan.need_bytes <= card(gib)


def test_plan_needs_and_the_options_are_floors():
    needs = {(o, t): memory.render_need(SDXL_BASE, MemoryOptions(), o, t) / GiB
             for o, t in [("none", False), ("none", True), ("model", False), ("sequential", True)]}
    assert needs[("none", False)] > needs[("none", True)] > needs[("model", False)] > needs[("sequential", True)]
    assert 9.5 < needs[("none", False)] < 10.5 and 5 < needs[("model", False)] < 6
    # the user's --cpu-offload / --vae-tiling are the least the plan uses
    assert plan_render(card(24), SDXL_BASE, MemoryOptions(offload="model")).offload == "model"
    assert plan_render(card(24), SDXL_BASE, MemoryOptions(vae_tiling=True)).vae_tiling
    # a 2048² image on 12 GB: the VAE decode alone would need 12 GiB untiled; tiled it stays resident
    big = plan_render(card(12), SDXL_BASE, MemoryOptions(width=2048, height=2048))
    assert (big.offload, big.vae_tiling) == ("none", True)
    # nothing fits: the smallest, marked as not fitting
    tiny_card = plan_render(GiB // 2, SDXL_BASE, MemoryOptions())
    assert (tiny_card.offload, tiny_card.fits) == ("sequential", False)
    # a CPU: the options as given, no offload
    assert plan_render(None, SDXL_BASE, MemoryOptions()).offload == "none"


def test_sdxl_lora_size_counted_on_the_real_unet(farm_cache):
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from farm.models.sdxl import sdxl_base_config

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(sdxl_base_config() / "unet"))
    assert memory.lora_parameters(unet, 1) == memory.SDXL_LORA_PARAMS_PER_DIM
    assert memory.lora_parameters(unet, 128) == 340_459_520  # 0.65 GB as an fp16 file


@pytest.mark.parametrize("mode, dim, weights, optimizer, batch, fits", [
    ("lora", 128, 2, "AdamW", 1, [12, 24]),        # the seed's dim 128: 11.1 GiB
    ("lora", 128, 2, "Adafactor", 1, [12, 24]),    # 8.6 GiB
    ("lora", 128, 2, "AdamW", 4, [24]),            # batch 4: 14.1 GiB
    ("lora", 32, 2, "Adafactor", 1, [8, 12, 24]),  # 6.7 GiB
    ("dreambooth", 0, 4, "Adafactor", 1, [24]),    # the whole UNet in fp32 with its gradients: 20.4 GiB
    ("dreambooth", 0, 4, "AdamW", 1, []),          # + two fp32 moments: 39.5 GiB
])
def test_training_needs_per_card(mode, dim, weights, optimizer, batch, fits):
    need = memory.train_need(SDXL_BASE, mode, dim * memory.SDXL_LORA_PARAMS_PER_DIM, weights, optimizer, batch=batch)
    assert [gib for gib in (6, 8, 12, 24) if need <= card(gib)] == fits


def test_sizes_are_read_from_file_headers(tiny_model, single_file):
    from farm.render.pipeline import load_pipeline

    pipe = load_pipeline(tiny_model, PipelineOptions(device="cpu"))
    counts = ComponentSizes(*(sum(p.numel() for p in getattr(pipe, name).parameters())
                              for name in ("unet", "text_encoder", "text_encoder_2", "vae")))
    assert memory.model_sizes(tiny_model) == counts
    assert memory.model_sizes(single_file) == counts


def test_bf16_is_refused_where_the_gpu_has_none(monkeypatch, data_root, tiny_model, tmp_path):
    from farm.errors import FarmError, ModelError
    from farm.render.pipeline import torch_dtype
    from farm.train.trainer import Trainer
    from farm.train.dataset import dataset_for

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    with pytest.raises(ModelError, match="no bfloat16 support"):
        torch_dtype(PipelineOptions(dtype="bf16"), "cuda")
    assert torch_dtype(PipelineOptions(dtype="fp16"), "cuda") == torch.float16
    opts = TrainOptions(train_data_dir="img", resolution=64, output_name="s", max_train_epochs=1,
                        mixed_precision="bf16")
    with pytest.raises(FarmError, match="no bfloat16 support"):
        Trainer("v", str(tiny_model), "tiny", dataset_for(opts, data_root), opts, tmp_path, device="cuda")


# --- the loader applies the plan ------------------------------------------------------------

@pytest.fixture
def gpu_of(monkeypatch):
    """Pretend the CPU is a GPU with `gib` free and the model is SDXL-sized (the plan's inputs)."""
    def pretend(gib):
        monkeypatch.setattr(memory, "free_vram", lambda device: int(gib * GiB))
        monkeypatch.setattr(memory, "model_sizes", lambda path: SDXL_BASE)
    return pretend


def test_the_renderer_applies_the_plan_and_records_it(gpu_of, tiny_model, lora_dir):
    task = tasks_for(lora_dir, {"seed": [1]})[0]
    gpu_of(14)  # fp32 SDXL: resident + tiling needs 13.9 GiB
    renderer = Renderer(PipelineOptions(device="cpu", threads=1))
    result = renderer.render(task)
    assert result.status == "ok", result.error
    assert "memory plan: resident + VAE tiling" in result.notes
    assert (renderer.memory_plan.offload, renderer.memory_plan.vae_tiling) == ("none", True)
    assert renderer.pipe.vae.use_tiling and renderer.memory_steps == ["vae_tiling"]
    assert "memory plan" in renderer.holds()["memory_plan"]
    again = renderer.render(task)
    assert again.notes == "" and again.png == result.png  # planned once, at load


def test_model_offload_from_the_plan_and_after_a_failed_lora_load(gpu_of, monkeypatch, tiny_model, lora_dir,
                                                                   tmp_path):
    """Diffusers takes the offload hooks off while it loads a LoRA and puts them back only on
    success: after a LoRA that fails to load, the renderer puts them back itself."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file, save_file

    gpu_of(11)  # fp32 SDXL: model offload (10.3 GiB)
    real = StableDiffusionXLPipeline.enable_model_cpu_offload
    # diffusers re-applies offload after a successful LoRA load on "the accelerator": the CPU here
    monkeypatch.setattr(StableDiffusionXLPipeline, "enable_model_cpu_offload",
                        lambda self, gpu_id=None, device=None: real(self, gpu_id, device or "cpu"))
    state = load_file(lora_dir / "subject-000001.safetensors")
    key = next(k for k in state if k.endswith(("lora_down.weight", "lora.down.weight")))
    state[key] = torch.zeros(state[key].shape[0], state[key].shape[1] + 3)  # wrong shape: fails in peft
    save_file(state, tmp_path / "misfit.safetensors")
    (tmp_path / "good.safetensors").write_bytes((lora_dir / "subject-000002.safetensors").read_bytes())
    misfit, good, none = (tasks_for(tmp_path, {"lora": [name]})[0] for name in ("misfit", "good", "none"))
    renderer = Renderer(PipelineOptions(device="cpu", threads=1))
    reference = Renderer(PipelineOptions(device="cpu", threads=1))
    first = renderer.render(none)
    assert first.status == "ok", first.error
    assert "memory plan: model CPU offload" in first.notes and renderer.memory_steps == ["model_offload"]
    assert hasattr(renderer.pipe.unet, "_hf_hook")  # accelerate's offload hook (CPU as the device here)
    failed = renderer.render(misfit)
    assert failed.status == "failed" and "misfit.safetensors" in failed.error
    assert hasattr(renderer.pipe.unet, "_hf_hook") and hasattr(renderer.pipe.text_encoder, "_hf_hook")
    after = renderer.render(good)
    plain = renderer.render(none)
    gpu_of(64)
    # offload changes no weight, but once LoRA layers sit in the model (disabled here) a level here
    # and there differs from a pipeline that never had one (2 of 12,288 values at this seed, on the CPU)
    assert np.abs(pixels(plain) - pixels(reference.render(none))).max() <= 1
    # with a LoRA re-applied under offload hooks a level here and there differs (seen on the CPU)
    assert np.abs(pixels(after) - pixels(reference.render(good))).max() <= 1


def test_a_load_that_runs_out_of_memory_falls_back(gpu_of, monkeypatch, tiny_model, lora_dir):
    import farm.render.pipeline as pipeline

    gpu_of(64)
    tried = []
    real = pipeline.place

    def place(pipe, plan, device):
        tried.append(plan.offload)
        if plan.offload == "none":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")
        real(pipe, plan, device)

    monkeypatch.setattr(pipeline, "place", place)
    renderer = Renderer(PipelineOptions(device="cpu", threads=1))
    result = renderer.render(tasks_for(lora_dir, {"seed": [3]})[0])
    assert result.status == "ok", result.error
    assert tried == ["none", "model"] and renderer.memory_plan.offload == "model"
    assert "out of memory while loading: model CPU offload instead" in result.notes


# --- clean state between tasks --------------------------------------------------------------

def test_a_model_switch_collects_the_old_pipeline_before_loading(tiny_model, single_file, lora_dir, monkeypatch):
    import farm.render.renderer as render

    renderer = Renderer(PipelineOptions(device="cpu", threads=1, single_file_config=str(tiny_model)))
    folder_task = tasks_for(lora_dir, {"lora": ["subject-000001"]})[0]
    file_task = tasks_for(lora_dir, {"lora": ["subject-000001"]}, model=str(single_file))[0]
    assert renderer.render(folder_task).status == "ok"
    old = weakref.ref(renderer.pipe)
    seen = []
    real = render.load_planned

    def load(path, options):
        seen.append(old())  # what is still alive while the next model loads
        return real(path, options)

    monkeypatch.setattr(render, "load_planned", load)
    assert renderer.render(file_task).status == "ok"
    assert seen == [None] and old() is None


def test_a_worker_that_trains_after_rendering_holds_no_old_pipeline(data_root, tiny_model, tmp_path, lora_dir):
    """GpuWorker.train retires its renderer (no Ray needed for that part), then trains."""
    from farm.cluster.actors import GpuWorker
    from farm.train.dataset import dataset_for
    from farm.train.trainer import Trainer

    worker = object.__new__(GpuWorker)  # the actor's state without an actor
    worker.renderer = Renderer(PipelineOptions(device="cpu", threads=1))
    worker.counters = {"pipeline_loads": 0, "lora_loads": 0}
    assert worker.renderer.render(tasks_for(lora_dir, {"lora": ["subject-000002"]})[0]).status == "ok"
    old_pipe, old_unet = weakref.ref(worker.renderer.pipe), weakref.ref(worker.renderer.pipe.unet)
    worker._retire_renderer()
    assert old_pipe() is None and old_unet() is None
    assert worker.counters == {"pipeline_loads": 1, "lora_loads": 1}
    opts = TrainOptions(train_data_dir="img", resolution=64, train_batch_size=2, network_dim=4, network_alpha=4,
                        output_name="s", max_train_epochs=1)
    trainer = Trainer("v", str(tiny_model), "tiny", dataset_for(opts, data_root), opts, tmp_path, device="cpu")
    assert old_pipe() is None and len(list(trainer.train())) == 1


# --- low precision on the CPU ---------------------------------------------------------------

def test_bf16_render_and_train(data_root, tiny_model, tmp_path, lora_dir):
    from farm.train.dataset import dataset_for
    from farm.train.trainer import Trainer

    renderer = Renderer(PipelineOptions(device="cpu", dtype="bf16", threads=1))
    result = renderer.render(tasks_for(lora_dir, {"lora": ["subject-000001"]})[0])
    assert pixels(result).std() > 0 and renderer.pipe.unet.dtype == torch.bfloat16
    opts = TrainOptions(train_data_dir="img", resolution=64, train_batch_size=2, network_dim=4, network_alpha=4,
                        learning_rate=1e-3, output_name="lo", max_train_epochs=1, mixed_precision="bf16",
                        save_precision="bf16")
    trainer = Trainer("v", str(tiny_model), "tiny", dataset_for(opts, data_root), opts, tmp_path, device="cpu")
    frozen = [p for n, p in trainer.pipe.unet.named_parameters() if "lora_" not in n]
    trained = [p for n, p in trainer.pipe.unet.named_parameters() if "lora_" in n]
    assert {p.dtype for p in frozen} == {torch.bfloat16} and {p.dtype for p in trained} == {torch.float32}
    assert trainer.pipe.text_encoder.dtype == torch.bfloat16
    (checkpoint,) = trainer.train()
    loss = [float(line.split(",")[2]) for line in (tmp_path / "log.csv").read_text().splitlines()[1:]]
    assert all(np.isfinite(loss))
    task = tasks_for(tmp_path, {"lora": ["lo"]})[0]
    assert pixels(renderer.render(task)).std() > 0


def test_dreambooth_saves_its_folder_in_save_precision(data_root, tiny_model, tmp_path):
    from safetensors import safe_open

    from farm.train.dataset import dataset_for
    from farm.train.trainer import Trainer

    opts = TrainOptions(train_data_dir="img", resolution=64, train_batch_size=2, output_name="db", mode="dreambooth",
                        learning_rate=1e-5, max_train_epochs=1, mixed_precision="bf16", save_precision="fp16")
    trainer = Trainer("v", str(tiny_model), "tiny", dataset_for(opts, data_root), opts, tmp_path, device="cpu")
    assert trainer.pipe.unet.dtype == torch.float32 and trainer.pipe.text_encoder.dtype == torch.bfloat16
    (checkpoint,) = trainer.train()
    for path in [*(tmp_path / "db").rglob("*.safetensors"), tmp_path / "db.safetensors"]:
        with safe_open(str(path), "pt") as handle:
            assert {handle.get_slice(k).get_dtype() for k in handle.keys()} <= {"F16", "I64"}, path


# --- a single-file checkpoint (SGM layout) --------------------------------------------------

def test_single_file_loads_renders_and_trains_as_its_folder(tiny_model, single_file, data_root, lora_dir, tmp_path):
    from farm.train.dataset import dataset_for
    from farm.render.pipeline import load_pipeline
    from farm.train.trainer import Trainer

    options = PipelineOptions(device="cpu", threads=1, single_file_config=str(tiny_model))
    folder, file = load_pipeline(tiny_model, options), load_pipeline(single_file, options)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        want, got = getattr(folder, name).state_dict(), getattr(file, name).state_dict()
        assert want.keys() == got.keys(), name
        assert all(torch.equal(want[k], got[k]) for k in want), name
    del folder, file
    renderer = Renderer(options)
    # identical weights, yet a level here and there differs (float rounding of differently laid-out
    # tensors, seen on the CPU at some seeds, with and without a LoRA)
    for lora in ("none", "subject-000001"):
        from_folder = renderer.render(tasks_for(lora_dir, {"lora": [lora]})[0])
        from_file = renderer.render(tasks_for(lora_dir, {"lora": [lora]}, model=str(single_file))[0])
        assert np.abs(pixels(from_folder) - pixels(from_file)).max() <= 1
    opts = TrainOptions(train_data_dir="img", resolution=64, train_batch_size=2, network_dim=4, network_alpha=4,
                        learning_rate=1e-2, output_name="sf", max_train_epochs=1)
    trainer = Trainer("v", str(single_file), str(single_file), dataset_for(opts, data_root), opts, tmp_path,
                      device="cpu", pipeline=options)
    (checkpoint,) = trainer.train()
    from safetensors import safe_open

    with safe_open(checkpoint.path, "pt") as handle:
        assert handle.metadata()["ss_new_sd_model_hash"] and handle.metadata()["ss_sd_model_name"] == single_file.name
    tagged, plain = (tasks_for(tmp_path, {"lora": [name]}, model=str(single_file))[0] for name in ("sf", "none"))
    with_lora = renderer.render(tagged)
    assert with_lora.status == "ok", with_lora.error
    assert not np.array_equal(pixels(with_lora), pixels(renderer.render(plain)))


@pytest.fixture(scope="module")
def single_file(tiny_model, tmp_path_factory):
    """The tiny model as one SGM-layout `.safetensors` (sd-scripts' single-file SDXL layout)."""
    from safetensors.torch import save_file

    from farm.models import kohya
    from farm.render.pipeline import load_pipeline

    pipe = load_pipeline(tiny_model, PipelineOptions(device="cpu"))
    path = tmp_path_factory.mktemp("single") / "tiny-single.safetensors"
    save_file(kohya.sdxl_checkpoint_state(pipe), path,
              metadata=kohya.modelspec(lora=False, title="tiny", resolution=(64, 64)))
    return path


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from farm.models.tiny import write_tiny_dataset

    return write_tiny_dataset(tmp_path_factory.mktemp("data"), images=4, repeats=1, reg_images=0)


def test_a_shared_worker_takes_on_each_jobs_pipeline_options(lora_dir):
    """A pool worker started with the first job's options reloads for a job whose options differ
    (the job's options travel with each chunk), releasing the old pipeline first."""
    from farm.cluster.actors import GpuWorker, Source

    worker = object.__new__(GpuWorker)  # the actor's state without an actor
    worker.name, worker.options = "worker:test", PipelineOptions(device="cpu", threads=1)
    worker.counters = {"pipeline_loads": 0, "lora_loads": 0}
    worker.renderer = worker._new_renderer()
    task = tasks_for(lora_dir, {"seed": [5]})[0]
    assert worker.renderer.render(task).status == "ok"
    old = weakref.ref(worker.renderer.pipe)
    worker._take_options(PipelineOptions(device="cpu"))  # the same (threads as the worker has them)
    assert old() is not None and worker.counters["pipeline_loads"] == 0
    source = Source(node_id="n", server="s", options=PipelineOptions(device="cpu", dtype="bf16"))
    worker._take_options(source.options)
    assert old() is None and worker.counters["pipeline_loads"] == 1
    assert worker.renderer.render(task).status == "ok" and worker.renderer.pipe.unet.dtype == torch.bfloat16


def test_run_flags_are_floors_the_worker_applies(gpu_of, tiny_model, lora_dir):
    """`farm run --cpu-offload model --vae-tiling --device cpu --dtype fp32`: the options a worker gets
    from the command line, and "the least the plan uses": on a card where everything would fit
    resident, the renderer still offloads and tiles; without the flags it does neither."""
    from dataclasses import replace

    from farm.cli import _pipeline_options, build_parser

    task = tasks_for(lora_dir, {"seed": [4]})[0]
    gpu_of(64)  # SDXL-sized, 64 GiB free: resident and untiled unless told otherwise

    def renderer_for(*flags):
        options = _pipeline_options(build_parser().parse_args(["run", "job.yaml", *flags]))
        return Renderer(replace(options, threads=1))

    plain = renderer_for("--device", "cpu")
    assert plain.render(task).status == "ok"
    assert (plain.memory_plan.offload, plain.memory_plan.vae_tiling) == ("none", False)
    assert not plain.pipe.vae.use_tiling and not hasattr(plain.pipe.unet, "_hf_hook")
    floors = renderer_for("--cpu-offload", "model", "--vae-tiling", "--device", "cpu", "--dtype", "fp32")
    result = floors.render(task)
    assert result.status == "ok", result.error
    assert floors.device == "cpu" and floors.pipe.unet.dtype == torch.float32
    assert (floors.memory_plan.offload, floors.memory_plan.vae_tiling) == ("model", True)
    assert floors.pipe.vae.use_tiling and hasattr(floors.pipe.unet, "_hf_hook")
    assert "memory plan: model CPU offload" in result.notes
