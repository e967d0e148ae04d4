"""The LDM UNet against diffusers' UNet2DConditionModel on the same (perturbed, random) weights, fp32 CPU."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from diffusers.models.embeddings import get_timestep_embedding
from unet_vae_support import (
    PARITY_TOLERANCE,
    ablated_outputs,
    normalised_error,
    reference_unet,
    unet_from_reference,
    unet_inputs,
)

import diffusion.attention
from diffusion.unet import (
    SD1_UNET,
    SD2_UNET,
    SDXL_BASE_UNET,
    TINY_SD1_UNET,
    TINY_SD2_UNET,
    TINY_SDXL_REFINER_UNET,
    TINY_SDXL_UNET,
    CrossAttention,
    FeedForward,
    ResBlock,
    SpatialTransformer,
    UNetConfig,
    UNetModel,
    sdxl_adm_input,
    timestep_embedding,
)

TINY_UNETS = {
    "sd1": TINY_SD1_UNET,
    "sd2": TINY_SD2_UNET,
    "sdxl": TINY_SDXL_UNET,
    "sdxl_refiner": TINY_SDXL_REFINER_UNET,
}


@pytest.fixture(scope="module", params=list(TINY_UNETS), ids=list(TINY_UNETS))
def unet_pair(request):
    config = TINY_UNETS[request.param]
    reference = reference_unet(config)
    return config, reference, unet_from_reference(reference, config)


def _reference_forward(reference, inputs: dict) -> torch.Tensor:
    extra = {}
    if "pooled" in inputs:
        extra["added_cond_kwargs"] = {"text_embeds": inputs["pooled"], "time_ids": inputs["size_numbers"]}
    return reference(inputs["x"], inputs["timesteps"], encoder_hidden_states=inputs["context"], **extra).sample


def _our_forward(ours: UNetModel, inputs: dict) -> torch.Tensor:
    y = sdxl_adm_input(inputs["pooled"], inputs["size_numbers"]) if "pooled" in inputs else None
    return ours(inputs["x"], inputs["timesteps"], inputs["context"], y)


@torch.no_grad()
@pytest.mark.parametrize("size", [(16, 16), (12, 20)], ids=["16x16", "12x20-not-multiple-of-8"])
def test_output_matches_diffusers(unet_pair, size):
    config, reference, ours = unet_pair
    inputs = unet_inputs(config, size=size)
    expected = _reference_forward(reference, inputs)
    assert normalised_error(_our_forward(ours, inputs), expected) < PARITY_TOLERANCE


def _output_projections(model: UNetModel) -> dict[str, torch.nn.Module]:
    """The last layer of every block whose contribution is added to a residual stream or embedding."""
    projections = {"time_embed": model.time_embed[2]}
    if hasattr(model, "label_emb"):
        projections["label_emb"] = model.label_emb[0][2]
    for name, module in model.named_modules():
        if isinstance(module, ResBlock):
            projections[name] = module.out_layers[3]
        elif isinstance(module, SpatialTransformer):
            projections[name] = module.proj_out
        elif isinstance(module, CrossAttention):
            projections[name] = module.to_out[0]
        elif isinstance(module, FeedForward):
            projections[name] = module.net[2]
    return projections


@torch.no_grad()
@pytest.mark.parametrize("name", ["sd1", "sdxl"])
def test_no_block_is_numerically_invisible(name):
    # model-formats 10.2: a block whose removal stays under the parity tolerance could be wired wrongly
    # and still pass; every block must move the output by at least 100x the tolerance.
    config = TINY_UNETS[name]
    model = unet_from_reference(reference_unet(config), config)
    layers = _output_projections(model)
    changes = ablated_outputs(layers, partial(_our_forward, model), unet_inputs(config, batch=1, size=(8, 8)))
    weakest = min(changes, key=changes.get)
    assert changes[weakest] > 100 * PARITY_TOLERANCE, (weakest, changes[weakest])


@torch.no_grad()
def test_batch_item_does_not_depend_on_the_rest_of_the_batch():
    config = TINY_SDXL_UNET
    model = unet_from_reference(reference_unet(config), config)
    pair = unet_inputs(config, batch=2)
    single = {key: value[:1] for key, value in pair.items()}
    torch.testing.assert_close(_our_forward(model, pair)[:1], _our_forward(model, single), rtol=0, atol=1e-5)


@torch.no_grad()
def test_meta_construction_loads_with_assign_and_matches():
    config = TINY_SD2_UNET
    source = unet_from_reference(reference_unet(config), config)
    model = UNetModel(config, device="meta")
    assert list(model.buffers()) == []
    model.load_state_dict(source.state_dict(), strict=True, assign=True)
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    inputs = unet_inputs(config)
    assert torch.equal(_our_forward(model, inputs), _our_forward(source, inputs))


@pytest.mark.parametrize(
    ("config", "parameters"),
    [(SD1_UNET, 859_520_964), (SD2_UNET, 865_910_724), (SDXL_BASE_UNET, 2_567_463_684)],
    ids=["sd1", "sd2", "sdxl"],
)
def test_real_presets_have_the_published_parameter_counts(config, parameters):
    model = UNetModel(config, device="meta")
    assert sum(p.numel() for p in model.parameters()) == parameters


@torch.no_grad()
@pytest.mark.parametrize(
    ("dtype", "tolerance"),
    # fp16 keeps 11 mantissa bits, bf16 8 (model-formats 10.4: fp16 ~1e-2 relative); measured 2e-3 and 1.6e-2.
    [(torch.float16, 1e-2), (torch.bfloat16, 5e-2)],
    ids=["float16", "bfloat16"],
)
def test_half_precision_stays_close_to_float32(dtype, tolerance):
    config = TINY_SD1_UNET
    model = unet_from_reference(reference_unet(config), config)
    inputs = unet_inputs(config)
    expected = _our_forward(model, inputs)
    half = _our_forward(model.to(dtype), inputs)
    assert half.dtype == torch.float32  # the prediction comes back in the latent's dtype
    assert normalised_error(half, expected) < tolerance


@torch.no_grad()
@pytest.mark.parametrize(("upcast", "expected_dtype"), [(True, torch.float32), (False, torch.bfloat16)])
def test_upcast_attention_runs_attention_in_float32(monkeypatch, upcast, expected_dtype):
    seen = set()
    sdpa = diffusion.attention.F.scaled_dot_product_attention

    def recording_sdpa(q, k, v):
        seen.add(q.dtype)
        return sdpa(q, k, v)

    monkeypatch.setattr(diffusion.attention.F, "scaled_dot_product_attention", recording_sdpa)
    config = UNetConfig(**{**TINY_SD2_UNET.__dict__, "upcast_attention": upcast})
    model = UNetModel(config, dtype=torch.bfloat16).eval()
    output = _our_forward(model, unet_inputs(config, batch=1, size=(8, 8)))
    assert seen == {expected_dtype}
    assert torch.isfinite(output).all()


def test_timestep_embedding_matches_diffusers_cos_then_sin():
    timesteps = torch.tensor([0.0, 1.0, 999.0, 261.5])
    embedding = timestep_embedding(timesteps, 32)
    reference = get_timestep_embedding(timesteps, 32, flip_sin_to_cos=True, downscale_freq_shift=0)
    assert torch.equal(embedding, reference)
    assert torch.equal(embedding[0], torch.cat([torch.ones(16), torch.zeros(16)]))


@torch.no_grad()
def test_scalar_timestep_applies_to_the_whole_batch():
    config = TINY_SD1_UNET
    model = UNetModel(config).eval()
    inputs = unet_inputs(config, size=(8, 8))
    per_item = model(inputs["x"], torch.tensor([500.0, 500.0]), inputs["context"])
    assert torch.equal(model(inputs["x"], 500.0, inputs["context"]), per_item)


def test_label_emb_model_requires_y_of_the_right_shape():
    config = TINY_SDXL_UNET
    model = UNetModel(config)
    inputs = unet_inputs(config, batch=1, size=(8, 8))
    with pytest.raises(ValueError, match=r"needs y of shape \(1, 1568\).*got None"):
        model(inputs["x"], inputs["timesteps"], inputs["context"])
    with pytest.raises(ValueError, match=r"got \(1, 32\)"):
        model(inputs["x"], inputs["timesteps"], inputs["context"], inputs["pooled"])


def test_model_without_label_emb_rejects_y():
    model = UNetModel(TINY_SD1_UNET)
    inputs = unet_inputs(TINY_SD1_UNET, batch=1, size=(8, 8))
    with pytest.raises(ValueError, match="no label_emb"):
        model(inputs["x"], inputs["timesteps"], inputs["context"], torch.zeros(1, 8))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"num_heads": 8, "head_width": 64}, "exactly one of num_heads / head_width"),
        ({"num_heads": None, "head_width": None}, "exactly one of num_heads / head_width"),
        ({"transformer_depth": (1, 1, 1)}, "transformer_depth has 3 levels, channel_mult has 4"),
        ({"model_channels": 48}, "width 48 is not divisible by num_groups=32"),
    ],
)
def test_inconsistent_config_is_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        UNetConfig(**{**TINY_SD1_UNET.__dict__, **changes})


@torch.no_grad()
def test_middle_block_without_attention_is_two_resnets():
    config = UNetConfig(**{**TINY_SD1_UNET.__dict__, "transformer_depth_middle": 0})
    model = UNetModel(config).eval()
    assert [type(layer) for layer in model.middle_block] == [ResBlock, ResBlock]
    inputs = unet_inputs(config, batch=1, size=(8, 8))
    assert _our_forward(model, inputs).shape == (1, 4, 8, 8)
