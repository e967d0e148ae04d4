"""Loader nodes: COMBO options, the handles a checkpoint becomes, the demo checkpoint, refused names."""
import pytest
import torch

from diffusion.checkpoints import load_checkpoint
from diffusion.tiny_models import tiny_overrides
from nodes.loaders import DEMO_CHECKPOINT, CheckpointLoaderSimple, checkpoint_names


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
