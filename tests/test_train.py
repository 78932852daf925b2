"""Training on the tiny model, on CPU, without Ray."""

import csv
import json
import math

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from farm.dataset import dataset_for
from farm.plan import plan_job
from farm.spec import TrainOptions, parse_spec
from farm.tiny import write_tiny_dataset
from farm.train import Trainer, checkpoint_name


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("data"), images=4, repeats=2, reg_images=3)


def trainer(data_root, tiny_model, out, **options):
    values = dict(train_data_dir="img", reg_data_dir="reg", resolution=64, train_batch_size=2, network_dim=4,
                  network_alpha=4, learning_rate=1e-3, output_name="subj", max_train_epochs=2, save_every_n_epochs=1)
    values.update(options)
    opts = TrainOptions(**values)
    return Trainer("v1", str(tiny_model), "tiny", dataset_for(opts, data_root), opts, out)


def losses(folder):
    with open(folder / "log.csv") as handle:
        return [float(row["loss"]) for row in csv.DictReader(handle)]


def test_names_metadata_and_finite_loss(data_root, tiny_model, tmp_path):
    checkpoints = list(trainer(data_root, tiny_model, tmp_path, max_train_epochs=3).train())
    names = [c.path.split("/")[-1] for c in checkpoints]
    assert names == ["subj-000001.safetensors", "subj-000002.safetensors", "subj.safetensors"]
    assert [(c.epoch, c.step, c.final) for c in checkpoints] == [(1, 8, False), (2, 16, False), (3, 24, True)]
    recorded = losses(tmp_path)
    assert len(recorded) == 24 and all(math.isfinite(x) for x in recorded)
    with safe_open(checkpoints[0].path, "pt") as handle:
        keys, meta = list(handle.keys()), handle.metadata()
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    assert any(k.endswith(".lora_down.weight") for k in keys) and any(k.endswith(".alpha") for k in keys)
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "4.0"
    assert (meta["ss_epoch"], meta["ss_steps"]) == ("1", "8")
    assert (meta["ss_num_train_images"], meta["ss_num_reg_images"]) == ("8", "3")
    assert json.loads(meta["ss_dataset_dirs"]) == {"2_w0ut3r man": {"n_repeats": 2, "img_count": 4}}
    assert json.loads(meta["ss_tag_frequency"])["2_w0ut3r man"]["w0ut3r"] == 4
    for key in ("ss_learning_rate", "ss_unet_lr", "ss_text_encoder_lr", "ss_optimizer", "ss_lr_scheduler",
                "ss_sd_model_name", "ss_base_model_version", "ss_training_started_at", "ss_seed"):
        assert key in meta
    assert (tmp_path / "loss.png").is_file()


def test_every_checkpoint_loads_in_diffusers_and_changes_the_image(data_root, tiny_model, tmp_path, renderer):
    checkpoints = list(trainer(data_root, tiny_model, tmp_path, learning_rate=1e-2).train())
    spec = {"job": "e", "model": "tiny:sdxl", "defaults": {"prompt": "w0ut3r, photo of a man", "steps": 3,
            "width": 64, "height": 64, "seed": 5},
            "axes": {"lora": ["none"] + [c.path for c in checkpoints]}}
    results = [renderer.render(t) for t in plan_job(parse_spec(spec), tmp_path).tasks]
    assert all(r.status == "ok" for r in results), [r.error for r in results]
    assert len({r.image_sha256 for r in results}) == len(results)


def test_fixed_batch_overfits(data_root, tiny_model, tmp_path):
    """The same batch, noise and timesteps every step: the LoRA must fit it (loss down >= 20 %)."""
    run = trainer(data_root, tiny_model, tmp_path, learning_rate=1e-2)
    batch = run.dataset.epoch_batches(0, 1)[0]
    history = []
    for _ in range(60):
        loss = run.loss(batch, step=10_000)
        loss.backward()
        run.optimizer.step()
        run.optimizer.zero_grad()
        history.append(float(loss.detach()))
    assert history[-1] <= 0.8 * history[0], (history[0], history[-1])


def test_kill_and_resume_matches_an_uninterrupted_run(data_root, tiny_model, tmp_path):
    whole = list(trainer(data_root, tiny_model, tmp_path / "whole").train())[-1]
    interrupted = trainer(data_root, tiny_model, tmp_path / "cut")
    assert list(interrupted.train(stop_after_steps=5)) == []  # "dies" after step 5, state saved
    del interrupted
    resumed = list(trainer(data_root, tiny_model, tmp_path / "cut").train())
    assert [c.path.split("/")[-1] for c in resumed] == ["subj-000001.safetensors", "subj.safetensors"]
    a, b = load_file(whole.path), load_file(resumed[-1].path)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)
    assert len(losses(tmp_path / "cut")) == 16


def test_text_encoder_lora_and_step_checkpoints(data_root, tiny_model, tmp_path):
    run = trainer(data_root, tiny_model, tmp_path, network_train_unet_only=False, text_encoder_lr=1e-4,
                  max_train_epochs=None, max_train_steps=6, save_every_n_epochs=None, save_every_n_steps=4,
                  optimizer_type="Adafactor", lr_scheduler="cosine_with_restarts", lr_scheduler_num_cycles=2)
    checkpoints = list(run.train())
    assert [c.path.split("/")[-1] for c in checkpoints] == [checkpoint_name("subj", step=4), "subj.safetensors"]
    keys = load_file(checkpoints[-1].path).keys()
    assert any(k.startswith("lora_te1_") for k in keys) and any(k.startswith("lora_te2_") for k in keys)


def test_changed_options_do_not_reuse_an_old_run_folder(data_root, tiny_model, tmp_path):
    from farm.errors import FarmError

    list(trainer(data_root, tiny_model, tmp_path, max_train_epochs=1).train())
    with pytest.raises(FarmError, match="trained with other options"):
        list(trainer(data_root, tiny_model, tmp_path, max_train_epochs=1, network_dim=8).train())


def test_full_dreambooth_writes_model_folders_that_render(data_root, tiny_model, tmp_path, renderer):
    run = trainer(data_root, tiny_model, tmp_path, mode="dreambooth", learning_rate=1e-4, max_train_epochs=2)
    checkpoints = list(run.train())
    assert [c.path.split("/")[-1] for c in checkpoints] == ["subj-000001", "subj"]
    folder = tmp_path / "subj"
    assert (folder / "model_index.json").is_file() and list((folder / "unet").glob("*.safetensors"))
    meta = json.loads((folder / "sdfarm_training.json").read_text())
    assert meta["ss_epoch"] == "2" and meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    spec = {"job": "e", "model": "tiny:sdxl", "defaults": {"prompt": "w0ut3r man", "steps": 3, "width": 64,
            "height": 64, "seed": 5}, "axes": {"model": ["tiny:sdxl", str(folder)]}}
    results = [renderer.render(t) for t in plan_job(parse_spec(spec), tmp_path).tasks]
    assert all(r.status == "ok" for r in results), [r.error for r in results]
    assert results[0].image_sha256 != results[1].image_sha256
