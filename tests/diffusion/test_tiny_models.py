"""The tiny checkpoint writers: real layouts, seeded, fast, and loadable by diffusers and transformers."""
import json
import time

import pytest
import torch
from safetensors.torch import load_file

from diffusion.key_maps import unet_state_dict_to_diffusers, vae_state_dict_to_diffusers
from diffusion.tiny_models import (
    tiny_checkpoint_tensors,
    tiny_unet_config,
    tiny_unet_weights,
    tiny_vae_weights,
    write_tiny_checkpoint,
    write_tiny_diffusers_folder,
    write_tiny_vae,
)
from diffusion.tokenizer import ClipTokenizer
from diffusion.vae import TINY_VAE


def assert_same_tensors(ours: dict, theirs: dict) -> None:
    assert sorted(ours) == sorted(theirs)
    different = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert different == []


@pytest.mark.parametrize("family, text_prefix", [("sd1", "cond_stage_model.transformer.text_model."),
                                                 ("sd2", "cond_stage_model.model.")])
def test_single_file_has_every_part_under_its_ldm_prefix(family, text_prefix, tiny_sd1_checkpoint, tiny_sd2_checkpoint):
    keys = load_file({"sd1": tiny_sd1_checkpoint, "sd2": tiny_sd2_checkpoint}[family]).keys()
    counts = {prefix: sum(k.startswith(prefix) for k in keys)
              for prefix in ("model.diffusion_model.", "first_stage_model.", text_prefix)}
    assert counts["model.diffusion_model."] == len(tiny_unet_weights(family))
    assert counts["first_stage_model."] == len(tiny_vae_weights())
    assert counts[text_prefix] > 0


def test_sd2_text_encoder_is_written_in_open_clip_naming(tiny_sd2_checkpoint):
    tensors = load_file(tiny_sd2_checkpoint)
    assert tensors["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"].shape == (96, 32)
    assert tensors["cond_stage_model.model.text_projection"].shape == (32, 24)  # [C, P], open_clip's layout
    assert "cond_stage_model.model.positional_embedding" in tensors


def test_norm_weights_are_perturbed_away_from_one_and_zero():
    weights = tiny_unet_weights("sd1")
    norm_weight = weights["input_blocks.1.0.in_layers.0.weight"]
    norm_bias = weights["input_blocks.1.0.in_layers.0.bias"]
    assert 0.05 < (norm_weight - 1).std() < 0.15
    assert 0.05 < norm_bias.std() < 0.15


def test_same_seed_gives_same_weights_and_another_seed_differs():
    assert_same_tensors(tiny_checkpoint_tensors("sd1", seed=3), tiny_checkpoint_tensors("sd1", seed=3))
    key = "model.diffusion_model.input_blocks.0.0.weight"
    assert not torch.equal(tiny_checkpoint_tensors("sd1", seed=3)[key], tiny_checkpoint_tensors("sd1", seed=4)[key])


def test_v_prediction_writes_empty_v_pred_marker(tmp_path):
    tensors = load_file(write_tiny_checkpoint(tmp_path / "v.safetensors", "sd2", v_prediction=True))
    assert tensors["v_pred"].shape == (0,)


def test_inpaint_unet_takes_nine_input_channels(tmp_path):
    tensors = load_file(write_tiny_checkpoint(tmp_path / "inpaint.safetensors", "sd1", inpaint=True))
    assert tensors["model.diffusion_model.input_blocks.0.0.weight"].shape == (32, 9, 3, 3)


def test_dtype_applies_to_floating_tensors_only(tmp_path):
    tensors = load_file(write_tiny_checkpoint(tmp_path / "half.safetensors", "sd1", dtype=torch.float16))
    assert tensors["model.diffusion_model.out.2.weight"].dtype == torch.float16
    assert tensors["cond_stage_model.transformer.text_model.embeddings.position_ids"].dtype == torch.int64


def test_writing_both_forms_takes_well_under_a_few_seconds(tmp_path):
    start = time.perf_counter()
    write_tiny_checkpoint(tmp_path / "x.safetensors", "sd2")
    write_tiny_diffusers_folder(tmp_path / "folder", "sd2")
    assert time.perf_counter() - start < 3.0


def test_standalone_vae_holds_the_checkpoint_vae_weights(tiny_sd1_checkpoint, tiny_vae_file):
    checkpoint = load_file(tiny_sd1_checkpoint)
    vae = {k: v for k, v in load_file(tiny_vae_file).items() if not k.startswith("loss.")}
    assert_same_tensors(vae, {k.removeprefix("first_stage_model."): v for k, v in checkpoint.items()
                              if k.startswith("first_stage_model.")})


def test_diffusers_named_vae_file_uses_linear_attention_weights(tmp_path):
    tensors = load_file(write_tiny_vae(tmp_path / "vae.safetensors", "diffusers"))
    assert tensors["decoder.mid_block.attentions.0.to_q.weight"].shape == (32, 32)
    assert "decoder.up_blocks.0.resnets.0.norm1.weight" in tensors


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_diffusers_loads_the_folder_with_our_weights(family, tiny_sd1_folder, tiny_sd2_folder):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    folder = {"sd1": tiny_sd1_folder, "sd2": tiny_sd2_folder}[family]
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True)
    vae = AutoencoderKL.from_pretrained(folder / "vae", local_files_only=True)
    expected_unet = unet_state_dict_to_diffusers(tiny_unet_weights(family), tiny_unet_config(family))
    assert_same_tensors(expected_unet, unet.state_dict())
    assert_same_tensors(vae_state_dict_to_diffusers(tiny_vae_weights(), TINY_VAE), vae.state_dict())


def test_transformers_loads_the_text_encoder_and_tokenizer(tiny_sd2_folder):
    from transformers import CLIPTextModel, CLIPTokenizer

    model = CLIPTextModel.from_pretrained(tiny_sd2_folder / "text_encoder", local_files_only=True)
    written = load_file(tiny_sd2_folder / "text_encoder" / "model.safetensors")
    loaded = {k.removeprefix("text_model."): v for k, v in model.state_dict().items()}
    assert_same_tensors({k.removeprefix("text_model."): v for k, v in written.items()}, loaded)
    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd2_folder / "tokenizer", local_files_only=True)
    prompt = "a photo of an astronaut riding a horse"
    assert tokenizer(prompt).input_ids == [ClipTokenizer.bos_id, *ClipTokenizer.default().encode(prompt),
                                           ClipTokenizer.eos_id]
    assert tokenizer.pad_token_id == 0  # SD2 pads with "!"


def test_scheduler_config_loads_in_diffusers(tiny_sd2_folder, tmp_path):
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_pretrained(tiny_sd2_folder / "scheduler", local_files_only=True)
    assert scheduler.config.prediction_type == "epsilon"
    assert scheduler.config.beta_schedule == "scaled_linear"
    v_folder = write_tiny_diffusers_folder(tmp_path / "v", "sd2", v_prediction=True)
    v_config = json.loads((v_folder / "scheduler" / "scheduler_config.json").read_text())
    assert v_config["prediction_type"] == "v_prediction"


def test_sharded_fp16_variant_folder_loads_in_diffusers(tmp_path):
    from diffusers import UNet2DConditionModel

    folder = write_tiny_diffusers_folder(tmp_path / "sharded", "sd1", variant="fp16", sharded=True)
    names = sorted(p.name for p in (folder / "unet").iterdir())
    assert names == ["config.json", "diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
                     "diffusion_pytorch_model.fp16-00002-of-00002.safetensors",
                     "diffusion_pytorch_model.safetensors.index.fp16.json"]
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", variant="fp16", torch_dtype=torch.float16,
                                                local_files_only=True)
    expected = unet_state_dict_to_diffusers(tiny_unet_weights("sd1"), tiny_unet_config("sd1"))
    assert_same_tensors({k: v.half() for k, v in expected.items()}, unet.state_dict())
