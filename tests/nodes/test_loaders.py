"""Loader nodes: COMBO options, the handles a checkpoint becomes, the demo checkpoint, refused names."""
import json
import os
import shutil
from dataclasses import asdict

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from diffusion.checkpoints import load_checkpoint
from diffusion.tiny_models import (
    HEAD_OVERRIDES_METADATA,
    tiny_overrides,
    write_tiny_checkpoint,
    write_tiny_diffusers_folder,
    write_tiny_legacy_checkpoint,
    write_tiny_text_encoder,
    write_tiny_unet,
    write_tiny_vae,
)
from engine import Executor, Registry, RunSettings
from nodes import loaders as loader_nodes
from nodes import lora as lora_nodes
from nodes.loaders import (
    DEMO_CHECKPOINT,
    CheckpointLoader,
    CheckpointLoaderSimple,
    CLIPLoader,
    CLIPSetLastLayer,
    DiffusersLoader,
    UNETLoader,
    VAELoader,
    checkpoint_names,
)


def test_checkpoint_options_list_the_folder_then_the_demo_last(node_settings, tiny_names):
    assert checkpoint_names(node_settings) == [tiny_names.sd1, tiny_names.sd2_v, DEMO_CHECKPOINT]


def test_checkpoint_loader_outputs_model_clip_vae_in_order():
    assert [o.type for o in CheckpointLoaderSimple.outputs] == ["MODEL", "CLIP", "VAE"]
    assert list(CheckpointLoaderSimple.inputs) == ["ckpt_name"]


def test_sd1_handles_carry_the_checkpoints_weights(sd1_handles, node_settings, tiny_names):
    model, clip, vae = sd1_handles
    reference = load_checkpoint(node_settings.models_dir / "checkpoints" / tiny_names.sd1,
                                overrides=tiny_overrides("sd1"))
    assert model.family == "sd1"
    assert model.model_sampling.config.prediction == "eps"
    assert torch.equal(model.unet.out[2].weight, reference.unet.out[2].weight)
    assert torch.equal(vae.vae.decoder.conv_out.weight, reference.vae.decoder.conv_out.weight)
    assert model.latent_format.scale_factor == pytest.approx(0.18215)


def test_tiny_files_load_without_overrides_through_their_metadata(sd2_handles):
    model, clip, _vae = sd2_handles
    assert model.family == "sd2"
    assert model.model_sampling.config.prediction == "v_prediction"
    assert clip.text.config.num_heads == 4


def test_model_handle_has_preview_factors_for_four_channels(sd1_handles):
    assert sd1_handles[0].preview_factors.shape == (5, 3)


def test_demo_checkpoint_loads_with_no_files_and_is_deterministic(fresh_settings, make_context):
    first = CheckpointLoaderSimple(DEMO_CHECKPOINT, context=make_context(fresh_settings))[0]
    (fresh_settings.temp_dir / "sdgraph-demo" / DEMO_CHECKPOINT).unlink()
    again = CheckpointLoaderSimple(DEMO_CHECKPOINT, context=make_context(fresh_settings))[0]
    assert first.family == "sd1"
    assert torch.equal(first.unet.input_blocks[0][0].weight, again.unet.input_blocks[0][0].weight)


def test_a_checkpoint_not_in_the_folder_is_an_error_naming_the_input(node_settings, make_context):
    with pytest.raises(ValueError, match=r"ckpt_name: 'missing.safetensors' is not in the checkpoints folder"):
        CheckpointLoaderSimple("missing.safetensors", context=make_context(node_settings))


def test_a_name_leaving_the_folder_is_refused(node_settings, make_context):
    with pytest.raises(ValueError, match=r"ckpt_name: .*must not contain '\.\.'"):
        CheckpointLoaderSimple("../node_tree0/models/checkpoints/tiny-sd1.safetensors",
                               context=make_context(node_settings))


# --- more loaders -------------------------------------------------------------------------------------------


def _folder(settings, kind):
    folder = settings.models_dir / kind
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _same_weights(first, second):
    a, b = first.state_dict(), second.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_loader_takes_v_prediction_from_the_config_yaml(node_settings, fresh_settings, make_context,
                                                                   tiny_names):
    shutil.copy(node_settings.models_dir / "checkpoints" / tiny_names.sd1, _folder(fresh_settings, "checkpoints"))
    configs = _folder(fresh_settings, "configs")
    (configs / "v2-inference-v.yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    (configs / "v1-inference.yaml").write_text("model:\n  params:\n    linear_start: 0.00085\n")
    context = make_context(fresh_settings)
    v_model = CheckpointLoader("v2-inference-v.yaml", tiny_names.sd1, context=context)[0]
    eps_model = CheckpointLoader("v1-inference.yaml", tiny_names.sd1, context=context)[0]
    assert v_model.model_sampling.config.prediction == "v_prediction"
    assert eps_model.model_sampling.config.prediction == "eps"


def test_diffusers_folders_are_offered_and_load_the_same_weights(fresh_settings, make_context, sd1_handles):
    write_tiny_diffusers_folder(_folder(fresh_settings, "diffusers") / "tiny-sd1", "sd1")
    write_tiny_diffusers_folder(_folder(fresh_settings, "checkpoints") / "tiny-sd1-folder", "sd1")
    assert checkpoint_names(fresh_settings) == ["tiny-sd1", "tiny-sd1-folder", DEMO_CHECKPOINT]
    context = make_context(fresh_settings)
    model, clip, vae = DiffusersLoader("tiny-sd1", context=context)
    assert _same_weights(model.unet, sd1_handles[0].unet)
    assert _same_weights(vae.vae, sd1_handles[2].vae)
    again = CheckpointLoaderSimple("tiny-sd1-folder", context=context)[0]
    assert _same_weights(again.unet, sd1_handles[0].unet)


def test_vae_loader_loads_the_checkpoints_vae(fresh_settings, make_context, sd1_handles):
    write_tiny_vae(_folder(fresh_settings, "vae") / "tiny-vae.safetensors", "diffusers")
    (vae,) = VAELoader("tiny-vae.safetensors", context=make_context(fresh_settings))
    assert _same_weights(vae.vae, sd1_handles[2].vae)


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_clip_loader_encodes_as_the_checkpoints_text_encoder(family, fresh_settings, make_context, sd1_handles,
                                                             sd2_handles):
    write_tiny_text_encoder(_folder(fresh_settings, "text_encoders") / f"tiny-{family}.safetensors", family)
    (clip,) = CLIPLoader(f"tiny-{family}.safetensors", "stable_diffusion", context=make_context(fresh_settings))
    reference = (sd1_handles if family == "sd1" else sd2_handles)[1]
    assert clip.text.config == reference.text.config
    torch.testing.assert_close(clip.encode("a red fox")[0], reference.encode("a red fox")[0], rtol=0, atol=0)


@pytest.mark.parametrize("family, prefixed", [("sd1", False), ("sd2", True)])
def test_unet_loader_loads_a_standalone_unet(family, prefixed, fresh_settings, make_context, sd1_handles,
                                             sd2_handles):
    write_tiny_unet(_folder(fresh_settings, "diffusion_models") / "tiny.safetensors", family, prefixed=prefixed)
    (model,) = UNETLoader("tiny.safetensors", "default", context=make_context(fresh_settings))
    reference = (sd1_handles if family == "sd1" else sd2_handles)[0]
    assert model.family == family
    assert _same_weights(model.unet, reference.unet)
    assert model.latent_format == reference.latent_format


def test_unet_loader_refuses_fp8_before_running():
    assert "fp8_e4m3fn is not supported" in UNETLoader.validate({"unet_name": "x", "weight_dtype": "fp8_e4m3fn"})
    assert UNETLoader.validate({"unet_name": "x", "weight_dtype": "default"}) is None


def test_clip_set_last_layer_encodes_from_the_earlier_layer(sd1_handles):
    clip = sd1_handles[1]
    (skipped,) = CLIPSetLastLayer(clip, -2)
    expected = clip.text.encoder.encode_token_chunks(clip.text.tokenize("a red fox"), layer=-2)[0]
    torch.testing.assert_close(skipped.encode("a red fox")[0], expected)
    assert not torch.equal(skipped.encode("a red fox")[0], clip.encode("a red fox")[0])


def test_clip_set_last_layer_beyond_the_tower_falls_back_to_the_last_layer_as_comfyui(sd1_handles):
    clip = sd1_handles[1]
    (deep,) = CLIPSetLastLayer(clip, -5)  # the tiny tower has 3 layers
    torch.testing.assert_close(deep.encode("a red fox")[0], clip.encode("a red fox")[0], rtol=0, atol=0)


def test_legacy_ckpt_checkpoint_loads_like_the_safetensors_one(fresh_settings, make_context, sd1_handles):
    write_tiny_legacy_checkpoint(_folder(fresh_settings, "checkpoints") / "tiny.ckpt", "sd1")
    model, clip, _vae = CheckpointLoaderSimple("tiny.ckpt", context=make_context(fresh_settings))
    assert _same_weights(model.unet, sd1_handles[0].unet)
    assert clip.text.config.num_heads == 4


def test_a_real_file_named_like_the_demo_wins(fresh_settings, make_context):
    write_tiny_checkpoint(_folder(fresh_settings, "checkpoints") / DEMO_CHECKPOINT, "sd2")
    assert checkpoint_names(fresh_settings) == [DEMO_CHECKPOINT]
    assert CheckpointLoaderSimple(DEMO_CHECKPOINT, context=make_context(fresh_settings))[0].family == "sd2"


def test_checkpoints_under_an_extra_model_root_are_found(node_settings, fresh_settings, make_context, tiny_names):
    settings = RunSettings(models_dir=fresh_settings.models_dir, extra_models_dirs=(node_settings.models_dir,),
                           temp_dir=fresh_settings.temp_dir, device="cpu")
    assert tiny_names.sd2_v in checkpoint_names(settings)
    assert CheckpointLoaderSimple(tiny_names.sd2_v, context=make_context(settings))[0].family == "sd2"


def test_a_vae_not_in_the_folder_names_the_input(fresh_settings, make_context):
    with pytest.raises(ValueError, match=r"vae_name: 'nope.safetensors' is not in the vae folder"):
        VAELoader("nope.safetensors", context=make_context(fresh_settings))


def test_a_damaged_checkpoint_is_an_error_naming_the_input_and_file(fresh_settings, make_context):
    (_folder(fresh_settings, "checkpoints") / "broken.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match=r"ckpt_name: .*broken\.safetensors"):
        CheckpointLoaderSimple("broken.safetensors", context=make_context(fresh_settings))


# --- caching through the engine -----------------------------------------------------------------------------


def _registry():
    registry = Registry()
    registry.load_module(loader_nodes)
    registry.load_module(lora_nodes)
    return registry


def test_the_engine_caches_a_loader_until_its_file_changes(fresh_settings):
    checkpoint = write_tiny_checkpoint(_folder(fresh_settings, "checkpoints") / "m.safetensors", "sd1")
    executor = Executor(_registry(), settings=fresh_settings)
    prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "m.safetensors"}},
              "2": {"class_type": "CLIPSetLastLayer", "inputs": {"clip": ["1", 1], "stop_at_clip_layer": -1}}}
    first = executor.execute(prompt, targets=["2"])
    prompt["2"]["inputs"]["stop_at_clip_layer"] = -2
    second = executor.execute(prompt, targets=["2"])
    stat = checkpoint.stat()
    os.utime(checkpoint, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the file was replaced
    third = executor.execute(prompt, targets=["2"])
    assert first.executed == ("1", "2")
    assert second.executed == ("2",) and second.cached == ("1",)
    assert "1" in third.executed


def test_the_demo_checkpoint_stays_cached_when_its_temp_file_is_rewritten(fresh_settings):
    executor = Executor(_registry(), settings=fresh_settings)
    prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": DEMO_CHECKPOINT}},
              "2": {"class_type": "CLIPSetLastLayer", "inputs": {"clip": ["1", 1], "stop_at_clip_layer": -1}}}
    assert executor.execute(prompt, targets=["2"]).executed == ("1", "2")
    (fresh_settings.temp_dir / "sdgraph-demo" / DEMO_CHECKPOINT).unlink()
    assert executor.execute(prompt, targets=["2"]).executed == ()


def test_unet_loader_refuses_a_vae_file_naming_the_input(fresh_settings, make_context):
    write_tiny_vae(_folder(fresh_settings, "diffusion_models") / "vae.safetensors")
    with pytest.raises(ValueError, match=r"unet_name: .*vae\.safetensors: not a UNet file"):
        UNETLoader("vae.safetensors", "default", context=make_context(fresh_settings))


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_unet_loader_reads_a_diffusers_named_unet_file(family, fresh_settings, make_context, sd1_handles,
                                                       sd2_handles):
    folder = write_tiny_diffusers_folder(fresh_settings.temp_dir / "pipeline", family)
    target = _folder(fresh_settings, "diffusion_models") / "unet.safetensors"
    shutil.copy(folder / "unet" / "diffusion_pytorch_model.safetensors", target)
    # The tiny head layout is what a lone diffusers file cannot tell (its config.json stayed behind).
    with safe_open(str(target), "pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    save_file(tensors, str(target), metadata={HEAD_OVERRIDES_METADATA: json.dumps(asdict(tiny_overrides(family)))})
    (model,) = UNETLoader("unet.safetensors", "default", context=make_context(fresh_settings))
    reference = (sd1_handles if family == "sd1" else sd2_handles)[0]
    assert model.unet.config == reference.unet.config
    assert _same_weights(model.unet, reference.unet)


@pytest.mark.parametrize(("dropped", "missing"), [("first_stage_model.", 2), ("cond_stage_model.", 1)])
def test_a_checkpoint_without_a_vae_or_text_encoder_loads_the_rest_and_gives_none(
        dropped, missing, fresh_settings, make_context, sd1_handles):
    path = write_tiny_checkpoint(_folder(fresh_settings, "checkpoints") / "full.safetensors", "sd1")
    with safe_open(str(path), "pt") as opened:
        kept = {key: opened.get_tensor(key) for key in opened.keys() if not key.startswith(dropped)}
        metadata = opened.metadata()
    save_file(kept, str(path.with_name("partial.safetensors")), metadata=metadata)
    outputs = CheckpointLoaderSimple("partial.safetensors", context=make_context(fresh_settings))
    assert outputs[missing] is None
    assert _same_weights(outputs[0].unet, sd1_handles[0].unet)
    # The UNet's latent space is the family's even without the VAE that usually carries it.
    assert outputs[0].latent_format == sd1_handles[0].latent_format
    assert all(output is not None for index, output in enumerate(outputs) if index != missing)
