"""LoRA / LoHa / LoKr files as weight deltas: names matched against diffusers' own conversion, outputs equal
to hand-merged diffusers / transformers models, base weights untouched, patches stacking additively."""
import logging
import math

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers
from transformers import CLIPTextModel

from diffusion.checkpoints import load_checkpoint
from diffusion.lora import load_lora, lora_patches, text_lora_names, unet_lora_names
from diffusion.safetensors_io import CheckpointError
from diffusion.tiny_models import tiny_lora_tensors, tiny_overrides, write_tiny_lora
from nodes.values import WeightPatch, patched_module

STRENGTH = 0.8


@pytest.fixture(scope="module")
def sd1(tiny_sd1_checkpoint):
    return load_checkpoint(tiny_sd1_checkpoint, overrides=tiny_overrides("sd1"))


@pytest.fixture(scope="module")
def names(sd1):
    return unet_lora_names(sd1.unet_config), text_lora_names(sd1.text_encoder.state_dict())


def _patches(deltas, strength=STRENGTH):
    return {key: (WeightPatch(delta, strength),) for key, delta in deltas.items()}


def _match(tensors, names, metadata=None):
    return lora_patches(tensors, unet_names=names[0], text_names=names[1], metadata=metadata)


def _merge_by_hand(module, converted, alphas, prefix, strength=STRENGTH):
    """W += s · up @ down · alpha / r on a diffusers/transformers module, from diffusers' converted names."""
    parameters = dict(module.named_parameters())
    with torch.no_grad():
        for key, down in converted.items():
            if not key.startswith(prefix) or ".down." not in key:
                continue
            up = converted[key.replace(".down.", ".up.")]
            path = key.removeprefix(prefix).rsplit(".lora", 1)[0].rsplit("_lora", 1)[0]
            # diffusers names the alpha after the whole down key or after the module, by layer kind.
            alpha = alphas.get(f"{key}.alpha", alphas.get(key.split(".lora.")[0] + ".alpha"))
            path = path.replace(".processor.", ".").replace("to_out", "to_out.0")
            if prefix.startswith("text_encoder"):
                path = path.replace("to_q", "q_proj").replace("to_k", "k_proj").replace("to_v", "v_proj")
                path = path.replace("to_out.0", "out_proj")
            weight = parameters.get(path + ".weight", parameters.get(path.removeprefix("text_model.") + ".weight"))
            delta = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape) * alpha / down.shape[0]
            weight += strength * delta


def _unet_inputs(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 4, 8, 8, generator=generator), torch.tensor([500.0]),
            torch.randn(1, 77, 32, generator=generator))


def test_kohya_unet_lora_equals_diffusers_unet_merged_by_its_own_names(sd1, names, tiny_sd1_folder):
    tensors, _ = tiny_lora_tensors("sd1", "kohya", conv=True)
    converted, alphas = _convert_non_diffusers_lora_to_diffusers(dict(tensors))
    reference = UNet2DConditionModel.from_pretrained(tiny_sd1_folder / "unet").eval()
    _merge_by_hand(reference, converted, alphas, "unet.")
    x, t, context = _unet_inputs()
    patches = _match(tensors, names)
    with torch.no_grad(), patched_module(sd1.unet, _patches(patches.unet)):
        ours = sd1.unet(x, t, context)
        expected = reference(x, t, encoder_hidden_states=context).sample
    with torch.no_grad():
        base = sd1.unet(x, t, context)
    assert (ours - expected).abs().max() / expected.abs().max() < 1e-5
    assert (ours - base).abs().max() > 1e-2  # the LoRA did change the output


def test_kohya_text_lora_equals_transformers_model_merged_by_diffusers_names(sd1, names, tiny_sd1_folder):
    tensors, _ = tiny_lora_tensors("sd1", "kohya")
    converted, alphas = _convert_non_diffusers_lora_to_diffusers(dict(tensors))
    reference = CLIPTextModel.from_pretrained(tiny_sd1_folder / "text_encoder").eval()
    _merge_by_hand(reference, converted, alphas, "text_encoder.")
    ids = torch.tensor([[49406, 320, 1929, 530, 49407] + [49407] * 72])
    patches = _match(tensors, names)
    assert len(patches.text) == 18
    with torch.no_grad(), patched_module(sd1.text_encoder, _patches(patches.text)):
        ours = sd1.text_encoder.transformer(ids).last_hidden_state
    expected = reference(ids).last_hidden_state
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_peft_file_holds_the_same_deltas_as_the_kohya_file(sd1, names):
    kohya = _match(tiny_lora_tensors("sd1", "kohya")[0], names)
    tensors, metadata = tiny_lora_tensors("sd1", "peft")
    peft = _match(tensors, names, metadata)
    assert peft.unet.keys() == kohya.unet.keys() and peft.text.keys() == kohya.text.keys()
    weights = sd1.unet.state_dict() | {f"te:{k}": v for k, v in sd1.text_encoder.state_dict().items()}
    for key in kohya.unet:
        torch.testing.assert_close(peft.unet[key](weights[key]), kohya.unet[key](weights[key]))


def test_peft_without_alpha_metadata_scales_by_one(sd1, names):
    tensors, _ = tiny_lora_tensors("sd1", "peft", rank=4)
    key = "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    file_key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    delta = _match(tensors, names).unet[key](sd1.unet.state_dict()[key])
    expected = tensors[f"{file_key}.lora_B.weight"] @ tensors[f"{file_key}.lora_A.weight"]
    torch.testing.assert_close(delta, expected)


def test_diffusers_attention_processor_names_reach_the_same_weights_as_kohya(names):
    tensors, _ = tiny_lora_tensors("sd1", "kohya", conv=True, text=False)
    converted, _alphas = _convert_non_diffusers_lora_to_diffusers(dict(tensors))
    assert any(".processor.to_out_lora." in key for key in converted)
    assert _match(converted, names).unet.keys() == _match(tensors, names).unet.keys()


@pytest.mark.parametrize("module, weight", [
    ("diffusion_model.input_blocks.1.1.proj_in", "input_blocks.1.1.proj_in.weight"),
    ("lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q",
     "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"),
    ("lycoris_down_blocks_0_attentions_0_proj_out", "input_blocks.1.1.proj_out.weight"),
    ("text_encoders.clip_l.transformer.text_model.encoder.layers.1.mlp.fc2",
     "transformer.encoder.layers.1.mlp.fc2.weight"),
    ("lora_te1_text_model_encoder_layers_2_self_attn_out_proj",
     "transformer.encoder.layers.2.self_attn.out_proj.weight"),
])
def test_every_known_spelling_reaches_its_weight(module, weight, names):
    tensors = {f"{module}.lora_down.weight": torch.zeros(2, 32), f"{module}.lora_up.weight": torch.zeros(32, 2)}
    result = _match(tensors, names)
    assert list(result.unet) + list(result.text) == [weight]


def test_conv_lora_delta_has_the_kernel_of_down(sd1, names):
    tensors, _ = tiny_lora_tensors("sd1", "kohya", conv=True, text=False)
    key = "input_blocks.1.0.in_layers.2.weight"
    name = "lora_unet_down_blocks_0_resnets_0_conv1"
    weight = sd1.unet.state_dict()[key]
    delta = _match(tensors, names).unet[key](weight)
    down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
    expected = torch.einsum("or,rihw->oihw", up[:, :, 0, 0], down) * 2 / 4  # alpha 2, rank 4
    assert delta.shape == weight.shape == (32, 32, 3, 3)
    torch.testing.assert_close(delta, expected)


def test_locon_tucker_mid_carries_the_kernel(sd1, names):
    generator = torch.Generator().manual_seed(3)
    name = "lora_unet_down_blocks_0_resnets_0_conv1"
    down = torch.randn(2, 32, 1, 1, generator=generator)
    mid = torch.randn(2, 2, 3, 3, generator=generator)
    up = torch.randn(32, 2, 1, 1, generator=generator)
    tensors = {f"{name}.lora_down.weight": down, f"{name}.lora_mid.weight": mid, f"{name}.lora_up.weight": up}
    key = "input_blocks.1.0.in_layers.2.weight"
    delta = _match(tensors, names).unet[key](sd1.unet.state_dict()[key])
    expected = torch.zeros(32, 32, 3, 3)
    for o in range(32):
        for i in range(32):
            expected[o, i] = sum(up[o, p, 0, 0] * mid[p, q] * down[q, i, 0, 0] for p in range(2) for q in range(2))
    torch.testing.assert_close(delta, expected, atol=1e-5, rtol=1e-5)


def test_loha_delta_is_the_hadamard_product_scaled_by_alpha_over_rank(sd1, names):
    tensors, _ = tiny_lora_tensors("sd1", "loha", rank=4, conv=True, text=False)
    for key, name in [("input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
                       "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"),
                      ("input_blocks.1.0.in_layers.2.weight", "lora_unet_down_blocks_0_resnets_0_conv1")]:
        weight = sd1.unet.state_dict()[key]
        t = {part: tensors[f"{name}.{part}"] for part in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}
        expected = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"]) * 2 / 4
        torch.testing.assert_close(_match(tensors, names).unet[key](weight), expected.reshape(weight.shape))


def test_lokr_delta_is_the_kronecker_product_scaled_by_alpha_over_rank(sd1, names):
    tensors, _ = tiny_lora_tensors("sd1", "lokr", rank=4, conv=True, text=False)
    key, name = "input_blocks.1.0.in_layers.2.weight", "lora_unet_down_blocks_0_resnets_0_conv1"
    weight = sd1.unet.state_dict()[key]
    w1 = tensors[f"{name}.lokr_w1"]
    w2 = (tensors[f"{name}.lokr_w2_a"] @ tensors[f"{name}.lokr_w2_b"]).reshape(8, 8, 3, 3)
    expected = torch.zeros(32, 32, 3, 3)
    for a in range(4):
        for b in range(4):
            expected[a * 8:(a + 1) * 8, b * 8:(b + 1) * 8] = w1[a, b] * w2
    rank = tensors[f"{name}.lokr_w2_b"].shape[0]
    torch.testing.assert_close(_match(tensors, names).unet[key](weight), expected * 2 / rank)


@pytest.mark.parametrize("name, down, up, scale", [
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", "lora_down.weight", "lora_up.weight",
     "dora_scale"),
    ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "lora_A.weight", "lora_B.weight",
     "lora_magnitude_vector"),
])
def test_dora_rows_take_the_magnitude_at_full_strength(name, down, up, scale, sd1, names):
    key = "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    generator = torch.Generator().manual_seed(5)
    magnitude = torch.rand(32, 1, generator=generator) + 0.5
    tensors = {f"{name}.{down}": torch.randn(2, 32, generator=generator) * 0.1,
               f"{name}.{up}": torch.randn(32, 2, generator=generator) * 0.1,
               f"{name}.{scale}": magnitude if scale == "dora_scale" else magnitude[:, 0]}
    weight = sd1.unet.state_dict()[key]
    adapted = weight + _match(tensors, names).unet[key](weight)
    torch.testing.assert_close(adapted.norm(dim=1, keepdim=True), magnitude)


def test_a_patched_run_leaves_the_base_weights_bit_identical(sd1, names):
    before = {k: v.clone() for k, v in sd1.unet.state_dict().items()}
    patches = _match(tiny_lora_tensors("sd1", "kohya", conv=True)[0], names)
    with torch.no_grad(), patched_module(sd1.unet, _patches(patches.unet)):
        sd1.unet(*_unet_inputs())
    after = sd1.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_two_loras_stack_additively(sd1, names):
    first = _match(tiny_lora_tensors("sd1", "kohya", seed=1)[0], names).unet
    second = _match(tiny_lora_tensors("sd1", "loha", seed=2)[0], names).unet
    key = "middle_block.1.transformer_blocks.0.attn2.to_v.weight"
    weight = sd1.unet.state_dict()[key].clone()
    chain = {key: (WeightPatch(first[key], 0.7), WeightPatch(second[key], -0.4))}
    with torch.no_grad(), patched_module(sd1.unet, chain):
        patched = sd1.unet.state_dict()[key].clone()
    torch.testing.assert_close(patched, weight + 0.7 * first[key](weight) - 0.4 * second[key](weight))


def test_a_lora_for_another_model_matches_nothing_and_warns_with_the_count(names, caplog):
    tensors = {"lora_unet_not_a_module.lora_down.weight": torch.zeros(2, 8),
               "lora_unet_not_a_module.lora_up.weight": torch.zeros(8, 2)}
    with caplog.at_level(logging.WARNING, logger="diffusion.lora"):
        result = lora_patches(tensors, unet_names=names[0], text_names=names[1], source="other.safetensors")
    assert result.matched == 0 and result.unmatched == ("lora_unet_not_a_module",)
    assert "other.safetensors matched no weight of this model (1 modules in the file)" in caplog.text


def test_keys_of_no_known_format_are_counted_in_the_message(names, caplog):
    tensors, _ = tiny_lora_tensors("sd1", "kohya", text=False)
    tensors["bundle_emb.style.string_to_param.*"] = torch.zeros(2, 32)
    with caplog.at_level(logging.WARNING, logger="diffusion.lora"):
        result = lora_patches(tensors, unet_names=names[0], text_names=names[1], source="bundle.safetensors")
    assert result.ignored == ("bundle_emb.style.string_to_param.*",)
    assert "192 UNet and 0 text encoder weights patched, 0 modules matched nothing, 1 keys of no known" in caplog.text


def test_without_a_text_encoder_its_modules_are_not_counted(names):
    result = lora_patches(tiny_lora_tensors("sd1", "kohya")[0], unet_names=names[0], text_names=None)
    assert len(result.unet) == 192 and result.text == {} and result.unmatched == ()


def test_pickled_lora_loads_through_the_restricted_unpickler(tmp_path, names):
    path = write_tiny_lora(tmp_path / "tiny.pt", "sd1", "kohya")
    loaded = load_lora(path, unet_names=names[0], text_names=names[1])
    assert loaded.matched == len(_match(tiny_lora_tensors("sd1", "kohya")[0], names).unet) + 18


def test_a_pickle_that_wants_code_is_refused(tmp_path, names):
    path = tmp_path / "evil.pt"
    torch.save({"x": torch.zeros(1), "f": math.floor}, path)
    with pytest.raises(CheckpointError, match="unsafe or unsupported checkpoint"):
        load_lora(path, unet_names=names[0], text_names=names[1])


@pytest.mark.parametrize("style", ["kohya", "peft", "loha", "lokr"])
def test_an_sd2_lora_reaches_every_target_of_the_open_clip_loaded_tower(style, tiny_sd2_checkpoint):
    sd2 = load_checkpoint(tiny_sd2_checkpoint, overrides=tiny_overrides("sd2"))
    tensors, metadata = tiny_lora_tensors("sd2", style, conv=True)
    result = lora_patches(tensors, unet_names=unet_lora_names(sd2.unet_config),
                          text_names=text_lora_names(sd2.text_encoder.state_dict()), metadata=metadata,
                          weight_shapes={k: tuple(v.shape) for k, v in sd2.unet.state_dict().items()})
    assert (len(result.unet), len(result.text), result.unmatched, result.mismatched) == (236, 18, (), ())
