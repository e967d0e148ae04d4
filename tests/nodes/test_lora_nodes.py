"""LoraLoader / LoraLoaderModelOnly: reversible patches on new handles, stacking, strengths, messages."""
import copy
import logging

import pytest
import torch
from safetensors.torch import save_file

from diffusion.tiny_models import tiny_lora_tensors, write_tiny_lora
from engine import RunSettings
from nodes.lora import LoraLoader, LoraLoaderModelOnly, lora_names

ATTN_KEY = "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
KOHYA_ATTN = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
TEXT_KEY = "transformer.encoder.layers.0.self_attn.q_proj.weight"
KOHYA_TEXT = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"


@pytest.fixture(scope="module")
def lora_settings(tmp_path_factory):
    """A models tree of this module's own with tiny LoRAs for the tiny SD1/SD2 models (seed 1)."""
    settings = RunSettings(models_dir=tmp_path_factory.mktemp("lora_tree"), device="cpu")
    loras = settings.models_dir / "loras"
    loras.mkdir()
    for style in ("kohya", "peft", "loha", "lokr"):
        write_tiny_lora(loras / f"tiny-{style}.safetensors", "sd1", style, seed=1)
    write_tiny_lora(loras / "tiny-sd2.safetensors", "sd2", "kohya", seed=1)
    return settings


def _kohya_delta(name, weight, strength):
    tensors, _ = tiny_lora_tensors("sd1", "kohya", seed=1)
    up, down = tensors[f"{name}.lora_up.weight"], tensors[f"{name}.lora_down.weight"]
    return strength * (up @ down).reshape(weight.shape) * float(tensors[f"{name}.alpha"]) / down.shape[0]


def test_lora_options_list_the_loras_folder(lora_settings):
    names = lora_names(lora_settings)
    assert [f"tiny-{s}.safetensors" for s in ("kohya", "loha", "lokr", "peft", "sd2")] == \
        [name for name in names if name.startswith("tiny-")]


def test_lora_loader_records_patches_on_new_handles_only(lora_settings, sd1_handles, make_context):
    model, clip, _ = sd1_handles
    patched_model, patched_clip = LoraLoader(model, clip, "tiny-kohya.safetensors", 1.0, 1.0,
                                             context=make_context(lora_settings))
    assert len(patched_model.patches) == 192 and len(patched_clip.patches) == 18
    assert model.patches == {} and clip.patches == {}
    assert patched_model.unet is model.unet  # the weights are shared, not copied


def test_patched_model_runs_with_the_merged_weight_and_restores_it(lora_settings, sd1_handles, make_context):
    model, clip, _ = sd1_handles
    base = model.unet.state_dict()[ATTN_KEY].clone()
    patched, _ = LoraLoader(model, clip, "tiny-kohya.safetensors", 0.6, 1.0, context=make_context(lora_settings))
    with patched.sampling_model():
        during = model.unet.state_dict()[ATTN_KEY].clone()
    torch.testing.assert_close(during, base + _kohya_delta(KOHYA_ATTN, base, 0.6))
    assert torch.equal(model.unet.state_dict()[ATTN_KEY], base)


def test_patched_clip_encodes_like_a_hand_merged_text_encoder(lora_settings, sd1_handles, make_context):
    model, clip, _ = sd1_handles
    _, patched = LoraLoader(model, clip, "tiny-kohya.safetensors", 1.0, 0.5, context=make_context(lora_settings))
    merged_encoder = copy.deepcopy(clip.text.encoder)
    tensors, _ = tiny_lora_tensors("sd1", "kohya", seed=1)
    weights = dict(merged_encoder.named_parameters())
    with torch.no_grad():
        for name in {key.split(".")[0] for key in tensors if key.startswith("lora_te_")}:
            path = "transformer." + name.removeprefix("lora_te_text_model_").replace("_", ".")
            path = path.replace("self.attn", "self_attn").replace("q.proj", "q_proj").replace("k.proj", "k_proj")
            path = path.replace("v.proj", "v_proj").replace("out.proj", "out_proj")
            weight = weights[path + ".weight"]
            weight += _kohya_delta(name, weight, 0.5)
    expected = clip.text.with_embeddings(None).__class__(merged_encoder, clip.text.tokenizer).encode("a red fox")[0]
    torch.testing.assert_close(patched.encode("a red fox")[0], expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(clip.encode("a red fox")[0], expected, atol=1e-3)


def test_two_lora_nodes_stack_in_order(lora_settings, sd1_handles, make_context):
    model, clip, _ = sd1_handles
    context = make_context(lora_settings)
    first, first_clip = LoraLoader(model, clip, "tiny-kohya.safetensors", 1.0, 1.0, context=context)
    second, _ = LoraLoader(first, first_clip, "tiny-loha.safetensors", -0.5, 1.0, context=context)
    chain = second.patches[ATTN_KEY]
    assert [(p.source, p.strength) for p in chain] == [("tiny-kohya.safetensors", 1.0),
                                                       ("tiny-loha.safetensors", -0.5)]
    base = model.unet.state_dict()[ATTN_KEY].clone()
    with second.sampling_model():
        during = model.unet.state_dict()[ATTN_KEY].clone()
    expected = base + chain[0].delta(base) - 0.5 * chain[1].delta(base)
    torch.testing.assert_close(during, expected)
    assert torch.equal(model.unet.state_dict()[ATTN_KEY], base)


def test_strength_zero_returns_the_inputs_unchanged(lora_settings, sd1_handles, make_context):
    model, clip, _ = sd1_handles
    out_model, out_clip = LoraLoader(model, clip, "tiny-kohya.safetensors", 0.0, 0.0,
                                     context=make_context(lora_settings))
    assert out_model is model and out_clip is clip
    only_model, same_clip = LoraLoader(model, clip, "tiny-kohya.safetensors", 1.0, 0.0,
                                       context=make_context(lora_settings))
    assert same_clip is clip and len(only_model.patches) == 192


@pytest.mark.parametrize("style", ["peft", "lokr"])
def test_every_style_patches_the_same_weights(style, lora_settings, sd1_handles, make_context):
    model, clip, _ = sd1_handles
    patched, patched_clip = LoraLoader(model, clip, f"tiny-{style}.safetensors", 1.0, 1.0,
                                       context=make_context(lora_settings))
    assert len(patched.patches) == 192 and len(patched_clip.patches) == 18


def test_model_only_loader_leaves_text_modules_out_of_the_count(lora_settings, sd1_handles, make_context, caplog):
    with caplog.at_level(logging.INFO):
        (patched,) = LoraLoaderModelOnly(sd1_handles[0], "tiny-kohya.safetensors", 1.0,
                                         context=make_context(lora_settings))
    assert len(patched.patches) == 192
    assert "192 UNet and 0 text encoder weights patched, 0 modules matched nothing" in caplog.text


def test_a_lora_matching_nothing_warns_and_patches_nothing(lora_settings, sd1_handles, make_context, caplog):
    save_file({"lora_unet_other_net_block.lora_down.weight": torch.zeros(2, 8),
               "lora_unet_other_net_block.lora_up.weight": torch.zeros(8, 2)},
              str(lora_settings.models_dir / "loras" / "other-model.safetensors"))
    with caplog.at_level(logging.WARNING):
        patched, patched_clip = LoraLoader(*sd1_handles[:2], "other-model.safetensors", 1.0, 1.0,
                                           context=make_context(lora_settings))
    assert patched.patches == {} and patched_clip.patches == {}
    assert "matched no weight of this model (1 modules in the file)" in caplog.text


def test_a_lora_of_other_widths_is_skipped_per_weight_with_the_count(lora_settings, sd1_handles, make_context,
                                                                     caplog):
    tensors, _ = tiny_lora_tensors("sd1", "kohya", seed=1, text=False)
    tensors[f"{KOHYA_ATTN}.lora_down.weight"] = torch.zeros(4, 48)  # the model's to_k takes 32 inputs
    save_file(tensors, str(lora_settings.models_dir / "loras" / "wider.safetensors"))
    with caplog.at_level(logging.WARNING):
        (patched,) = LoraLoaderModelOnly(sd1_handles[0], "wider.safetensors", 1.0,
                                         context=make_context(lora_settings))
    assert len(patched.patches) == 191 and ATTN_KEY not in patched.patches
    assert "191 UNet and 0 text encoder weights patched, 0 modules matched nothing, 1 of another shape" in caplog.text


def test_a_lora_not_in_the_folder_names_the_input(lora_settings, sd1_handles, make_context):
    with pytest.raises(ValueError, match=r"lora_name: 'gone.safetensors' is not in the loras folder"):
        LoraLoader(*sd1_handles[:2], "gone.safetensors", 1.0, 1.0, context=make_context(lora_settings))
