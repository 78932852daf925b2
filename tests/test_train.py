"""Training on the tiny model, on CPU, without Ray."""

import csv
import hashlib
import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from farm.train.dataset import dataset_for
from farm.sweep.plan import plan_job
from farm.sweep.spec import TrainOptions, parse_spec
from farm.models.tiny import write_tiny_dataset
from farm.train.checkpoints import checkpoint_name
from farm.train.trainer import Trainer


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
    # sd-scripts' SDXL names (SGM block numbers), every Linear of the transformer blocks
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_unet_middle_block_1_transformer_blocks_1_ff_net_0_proj.lora_up.weight" in keys
    assert "lora_unet_output_blocks_2_1_proj_out.alpha" in keys
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "4.0"
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["ss_optimizer"] == "torch.optim.adamw.AdamW" and "ss_network_args" not in meta
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert (meta["modelspec.title"], meta["modelspec.resolution"]) == ("subj", "64x64")
    assert json.loads(meta["ss_bucket_info"]) == {"buckets": {"0": {"resolution": [64, 64], "count": 16}}}
    assert (meta["ss_epoch"], meta["ss_steps"]) == ("1", "8")
    assert (meta["ss_num_train_images"], meta["ss_num_reg_images"]) == ("8", "3")
    assert json.loads(meta["ss_dataset_dirs"]) == {"2_w0ut3r man": {"n_repeats": 2, "img_count": 4}}
    assert json.loads(meta["ss_tag_frequency"])["2_w0ut3r man"]["w0ut3r"] == 4
    for key in ("ss_learning_rate", "ss_unet_lr", "ss_text_encoder_lr", "ss_optimizer", "ss_lr_scheduler",
                "ss_sd_model_name", "ss_base_model_version", "ss_training_started_at", "ss_seed",
                "ss_training_finished_at", "ss_max_grad_norm", "ss_total_batch_size", "ss_keep_tokens",
                "ss_noise_offset", "ss_min_snr_gamma", "ss_clip_skip", "ss_v2", "modelspec.date",
                "modelspec.prediction_type", "modelspec.sai_model_spec"):
        assert key in meta
    assert (tmp_path / "loss.png").is_file()


def test_sshs_hashes_are_the_addnet_hashes(data_root, tiny_model, tmp_path):
    # dim 16: a file over 1 MiB, so the legacy hash's window holds tensor bytes
    path = list(trainer(data_root, tiny_model, tmp_path, max_train_epochs=1, network_dim=16).train())[-1].path
    with safe_open(path, "pt") as handle:
        meta = handle.metadata()
    data = open(path, "rb").read()
    tensors = load_file(path)
    # sshs_model_hash: sha256 of the tensor bytes after the header (the file's own, too)
    assert meta["sshs_model_hash"] == hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()
    # sshs_legacy_hash: of the file as saved with only the ss_* metadata, 64 KiB at 1 MiB, 8 digits
    ss_only = save(tensors, {k: v for k, v in meta.items() if k.startswith("ss_")})
    assert meta["sshs_legacy_hash"] == hashlib.sha256(ss_only[0x100000:0x110000]).hexdigest()[:8]
    assert len(ss_only) > 0x110000  # the legacy window is inside the file


def test_saved_lora_loads_in_diffusers_as_trained(data_root, tiny_model, tmp_path):
    """dim 8 / alpha 1: the file, loaded by diffusers into a fresh pipeline, changes the UNet exactly
    as the trained adapter did (a rank-as-alpha file would be 8× too strong)."""
    from datetime import datetime, timezone

    from diffusers import StableDiffusionXLPipeline

    run = trainer(data_root, tiny_model, tmp_path, network_dim=8, network_alpha=1, learning_rate=1e-2)
    batch = run.dataset.epoch_batches(0, 1)[0]
    for step in range(2):
        run.loss(batch, step).backward()
        run.optimizer.step()
        run.optimizer.zero_grad()
    with torch.no_grad():  # a few steps move B off zero only a little: make the adapter count
        for name, param in run.pipe.unet.named_parameters():
            if "lora_B" in name:
                assert param.abs().max() > 0
                param.add_(torch.randn_like(param) * 0.2)
    checkpoint = run.save_checkpoint("subj.safetensors", 1, 2, datetime.now(timezone.utc), final=True)
    state = load_file(checkpoint.path)
    alphas = {k: v for k, v in state.items() if k.endswith(".alpha")}
    assert alphas and all(v.ndim == 0 and float(v) == 1.0 for v in alphas.values())
    assert all(state[k.replace(".alpha", ".lora_down.weight")].shape[0] == 8 for k in alphas)

    generator = torch.Generator().manual_seed(3)
    inputs = (torch.randn(1, 4, 8, 8, generator=generator), torch.tensor([400]),
              torch.randn(1, 5, 64, generator=generator))
    added = {"text_embeds": torch.randn(1, 32, generator=generator),
             "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    fresh = StableDiffusionXLPipeline.from_pretrained(tiny_model, local_files_only=True)
    with torch.no_grad():
        base = fresh.unet(*inputs, added_cond_kwargs=added).sample
        trained = run.pipe.unet(*inputs, added_cond_kwargs=added).sample
        fresh.load_lora_weights(load_file(checkpoint.path))
        loaded = fresh.unet(*inputs, added_cond_kwargs=added).sample
    assert (trained - loaded).abs().max() <= 1e-5
    assert (trained - base).abs().max() > 1e-2


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
    with safe_open(checkpoints[-1].path, "pt") as handle:
        keys, meta = set(handle.keys()), handle.metadata()
    # CLIPAttention and CLIPMLP linears of both encoders, named as sd-scripts names them
    for prefix in ("lora_te1", "lora_te2"):
        names = {k.split(".")[0] for k in keys if k.startswith(prefix + "_")}
        assert {n.split("_layers_")[1].split("_", 1)[1] for n in names} == {
            "self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2"}
        assert f"{prefix}_text_model_encoder_layers_1_self_attn_out_proj.lora_up.weight" in keys
    assert meta["ss_optimizer"] == ("transformers.optimization.Adafactor"
                                    "(scale_parameter=False,relative_step=False,warmup_init=False)")
    assert (meta["ss_text_encoder_lr"], meta["ss_unet_lr"]) == ("0.0001", "None")  # as given, as sd-scripts


def test_conv_network_args_train_the_3x3_convs(data_root, tiny_model, tmp_path):
    run = trainer(data_root, tiny_model, tmp_path, max_train_epochs=None, max_train_steps=1, save_every_n_epochs=None,
                  network_args=["conv_dim=2", "conv_alpha=0.5"])
    path = list(run.train())[-1].path
    with safe_open(path, "pt") as handle:
        state = {k: handle.get_tensor(k) for k in handle.keys()}
        meta = handle.metadata()
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "0.5"}
    conv = state["lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight"]
    assert conv.shape[:1] + conv.shape[2:] == (2, 3, 3)
    assert float(state["lora_unet_input_blocks_1_0_in_layers_2.alpha"]) == 0.5
    for name in ("input_blocks_3_0_op", "output_blocks_2_2_conv", "middle_block_2_out_layers_3"):
        assert state[f"lora_unet_{name}.lora_down.weight"].shape[0] == 2
    # Linears and 1×1 convs inside the resnets take network_dim / network_alpha
    assert state["lora_unet_input_blocks_1_0_emb_layers_1.lora_down.weight"].shape[0] == 4
    assert state["lora_unet_output_blocks_0_0_skip_connection.lora_down.weight"].shape[:2] == (4, 128)
    assert float(state["lora_unet_output_blocks_0_0_skip_connection.alpha"]) == 4.0


def test_network_args_are_checked():
    from pydantic import ValidationError

    base = dict(train_data_dir="img")
    assert TrainOptions(**base, network_args=["conv_dim=4"]).network_kwargs() == {"conv_dim": "4"}
    for bad in (["conv_dim"], ["algo=locon"], ["conv_dim=x"], ["conv_alpha=1"], ["conv_dim=0"]):
        with pytest.raises(ValidationError):
            TrainOptions(**base, network_args=bad)
    with pytest.raises(ValidationError):
        TrainOptions(**base, mode="dreambooth", network_args=["conv_dim=4"])


def test_changed_options_do_not_reuse_an_old_run_folder(data_root, tiny_model, tmp_path):
    from farm.errors import FarmError

    list(trainer(data_root, tiny_model, tmp_path, max_train_epochs=1).train())
    with pytest.raises(FarmError, match="trained with other options"):
        list(trainer(data_root, tiny_model, tmp_path, max_train_epochs=1, network_dim=8).train())


def test_full_dreambooth_writes_model_folders_that_render(data_root, tiny_model, tmp_path, renderer):
    run = trainer(data_root, tiny_model, tmp_path, mode="dreambooth", learning_rate=1e-4, max_train_epochs=2)
    checkpoints = list(run.train())
    assert [c.path.split("/")[-1] for c in checkpoints] == ["subj-000001", "subj"]
    assert [c.single_file.split("/")[-1] for c in checkpoints] == ["subj-000001.safetensors", "subj.safetensors"]
    folder = tmp_path / "subj"
    assert (folder / "model_index.json").is_file() and list((folder / "unet").glob("*.safetensors"))
    meta = json.loads((folder / "sdfarm_training.json").read_text())
    assert meta["ss_epoch"] == "2" and meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    _assert_single_file_round_trips(tmp_path / "subj.safetensors", run.pipe, tiny_model)
    spec = {"job": "e", "model": "tiny:sdxl", "defaults": {"prompt": "w0ut3r man", "steps": 3, "width": 64,
            "height": 64, "seed": 5}, "axes": {"model": ["tiny:sdxl", str(folder)]}}
    results = [renderer.render(t) for t in plan_job(parse_spec(spec), tmp_path).tasks]
    assert all(r.status == "ok" for r in results), [r.error for r in results]
    assert results[0].image_sha256 != results[1].image_sha256


def _assert_single_file_round_trips(path, trained, config):
    """diffusers' own single-file reader gets back every trained tensor, exactly (fp32)."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModelWithProjection

    from farm.models.kohya import TE2_PREFIX

    with safe_open(str(path), "pt") as handle:
        keys, meta = set(handle.keys()), handle.metadata()
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert {k.split(".")[0] for k in keys} == {"model", "conditioner", "first_stage_model"}
    assert "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight" in keys
    assert "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight" in keys
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in keys
    assert "first_stage_model.decoder.up.0.block.1.conv1.weight" in keys
    loaded = StableDiffusionXLPipeline.from_single_file(str(path), config=str(config), local_files_only=True)
    # the tiny model's two text encoders have the same width, which diffusers' pipeline-level reader
    # uses to tell them apart (SDXL's are 768 and 1280): read the second one with the converter it
    # uses for that component
    second = create_diffusers_clip_model_from_ldm(
        CLIPTextModelWithProjection, {k: v for k, v in load_file(path).items() if k.startswith(TE2_PREFIX)},
        config=str(config), subfolder="text_encoder_2", local_files_only=True)
    for name, model in (("unet", loaded.unet), ("vae", loaded.vae), ("text_encoder", loaded.text_encoder),
                        ("text_encoder_2", second)):
        want, got = getattr(trained, name).state_dict(), model.state_dict()
        assert want.keys() == got.keys(), name
        for key in want:
            assert torch.equal(want[key].cpu(), got[key]), f"{name}: {key}"
