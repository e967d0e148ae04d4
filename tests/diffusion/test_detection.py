"""Family, layout and prediction type read from key structure, never from absolute widths (model-formats 3)."""
import dataclasses
import json
import math
import shutil
import struct

import pytest
import torch
from safetensors.torch import save_file

from diffusion.checkpoints import load_checkpoint
from diffusion.detection import (
    UNET_PREFIX,
    VAE_PREFIX,
    HeadOverrides,
    detect_family,
    detect_prediction,
    strip_prefix,
    unet_config_from_shapes,
    vae_config_from_shapes,
)
from diffusion.diffusers_folders import folder_family
from diffusion.safetensors_io import CheckpointError, SafetensorsFiles, read_header
from diffusion.text_encoders import (
    SD1_CLIP_L,
    SD2_OPENCLIP_H,
    ClipTextEncoder,
    text_encoder_config_from_state_dict,
    transformers_to_open_clip,
)
from diffusion.tiny_models import (
    TINY_SD1_TEXT,
    TINY_SD2_TEXT,
    tiny_overrides,
    tiny_unet_config,
    write_tiny_checkpoint,
    write_tiny_vae,
)
from diffusion.unet import SD1_UNET, SD2_UNET, TINY_SD1_UNET, TINY_SD2_UNET, UNetModel
from diffusion.vae import SD_VAE, TINY_VAE, AutoencoderKL


def shapes_of(path):
    return read_header(path).shapes()


def fake_file(path, shapes: dict, metadata=None):
    """A small safetensors file whose keys mimic a layout; values are zeros of the given shapes."""
    save_file({name: torch.zeros(shape) for name, shape in shapes.items()}, str(path), metadata=metadata)
    return path


SDXL_BASE_KEYS = {
    "model.diffusion_model.input_blocks.0.0.weight": (32, 4, 3, 3),
    "model.diffusion_model.label_emb.0.0.weight": (128, 32 + 6 * 256),
    "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (32,),
    "conditioner.embedders.1.model.ln_final.weight": (32,),
}
SD3_KEYS = {
    "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": (384, 128),
    "model.diffusion_model.x_embedder.proj.weight": (128, 16, 2, 2),
    "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": (32,),
}


def test_tiny_sd1_single_file_is_sd1(tiny_sd1_checkpoint):
    found = detect_family(shapes_of(tiny_sd1_checkpoint))
    assert (found.family, found.in_channels, found.variant) == ("sd1", 4, "base")


def test_tiny_sd2_single_file_is_sd2(tiny_sd2_checkpoint):
    assert detect_family(shapes_of(tiny_sd2_checkpoint)).family == "sd2"


def test_nine_input_channels_is_the_inpainting_variant(tmp_path):
    found = detect_family(shapes_of(write_tiny_checkpoint(tmp_path / "inpaint.safetensors", "sd2", inpaint=True)))
    assert (found.family, found.in_channels, found.variant) == ("sd2", 9, "inpaint")


def test_unet_without_text_encoder_tells_sd2_by_linear_projections(tiny_sd1_checkpoint, tiny_sd2_checkpoint):
    for path, family in ((tiny_sd1_checkpoint, "sd1"), (tiny_sd2_checkpoint, "sd2")):
        unet_only = {k: v for k, v in shapes_of(path).items() if k.startswith(UNET_PREFIX)}
        assert detect_family(unet_only).family == family


def test_sd1_unet_layout_is_derived_from_shapes_with_the_family_head_rule(tiny_sd1_checkpoint):
    config = unet_config_from_shapes(strip_prefix(shapes_of(tiny_sd1_checkpoint), UNET_PREFIX), "sd1")
    assert config == TINY_SD1_UNET  # 8 heads everywhere, as in the family rule


def test_sd2_unet_layout_needs_the_explicit_head_width(tiny_sd2_checkpoint):
    unet_shapes = strip_prefix(shapes_of(tiny_sd2_checkpoint), UNET_PREFIX)
    assert unet_config_from_shapes(unet_shapes, "sd2").head_width == 64  # family rule
    expected = dataclasses.replace(TINY_SD2_UNET, upcast_attention=True)  # SD2's float32 attention rule
    assert unet_config_from_shapes(unet_shapes, "sd2", tiny_overrides("sd2")) == expected


def test_unet_layout_reads_levels_depths_and_context_from_structure(tiny_sd1_checkpoint):
    config = unet_config_from_shapes(strip_prefix(shapes_of(tiny_sd1_checkpoint), UNET_PREFIX), "sd1")
    assert (config.channel_mult, config.num_res_blocks, config.transformer_depth) == ((1, 2, 4, 4), 2, (1, 1, 1, 0))
    assert (config.transformer_depth_middle, config.context_dim, config.use_linear_proj) == (1, 32, False)


def test_head_override_accepts_one_of_count_or_width():
    with pytest.raises(ValueError, match="not both"):
        HeadOverrides(unet_num_heads=2, unet_head_width=16)


def test_vae_layout_from_checkpoint_and_from_both_standalone_namings(tiny_sd1_checkpoint, tmp_path):
    assert vae_config_from_shapes(strip_prefix(shapes_of(tiny_sd1_checkpoint), VAE_PREFIX)) == TINY_VAE
    for naming in ("ldm", "diffusers"):
        path = write_tiny_vae(tmp_path / f"{naming}.safetensors", naming)
        assert vae_config_from_shapes(shapes_of(path)) == TINY_VAE


def test_standalone_vae_file_is_recognised_and_refused_as_a_checkpoint(tiny_vae_file):
    assert detect_family(shapes_of(tiny_vae_file)).family == "vae"
    with pytest.raises(CheckpointError, match="standalone VAE file, not a full checkpoint"):
        load_checkpoint(tiny_vae_file)


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_text_encoder_config_is_read_from_the_file(family, tiny_sd1_checkpoint, tiny_sd2_checkpoint):
    path = {"sd1": tiny_sd1_checkpoint, "sd2": tiny_sd2_checkpoint}[family]
    loaded = load_checkpoint(path, overrides=tiny_overrides(family))
    assert loaded.text_config == {"sd1": TINY_SD1_TEXT, "sd2": TINY_SD2_TEXT}[family]


def test_missing_unet_head_override_is_a_clear_error_for_tiny_sd2(tiny_sd2_checkpoint):
    with pytest.raises(CheckpointError, match=r"tiny_sd2\.safetensors: UNet: transformer width 32 does not split "
                                              r"into heads .*HeadOverrides"):
        load_checkpoint(tiny_sd2_checkpoint)


def test_missing_text_head_override_is_a_clear_error_for_tiny_sd2(tiny_sd2_checkpoint):
    with pytest.raises(CheckpointError, match=r"tiny_sd2\.safetensors: text encoder under cond_stage_model\.model\.\*: "
                                              r"text encoder width 32 is not a multiple of 64.*HeadOverrides"):
        load_checkpoint(tiny_sd2_checkpoint, overrides=HeadOverrides(unet_head_width=16))


def test_sdxl_base_is_named_and_refused(tmp_path):
    path = fake_file(tmp_path / "xl.safetensors", SDXL_BASE_KEYS)
    assert detect_family(shapes_of(path)).family == "sdxl_base"
    with pytest.raises(CheckpointError, match="detected SDXL base; not supported yet"):
        load_checkpoint(path)


def test_sdxl_refiner_has_only_the_big_open_clip_encoder():
    refiner = {k: v for k, v in SDXL_BASE_KEYS.items() if not k.startswith("conditioner.embedders.1.")}
    refiner["conditioner.embedders.0.model.ln_final.weight"] = (32,)
    del refiner["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"]
    assert detect_family(refiner).family == "sdxl_refiner"


def test_sd2_unclip_with_label_emb_and_open_clip_text_is_not_called_sdxl(tmp_path):
    # SD2.1 unCLIP feeds an image embedding through label_emb but keeps SD2's cond_stage_model text encoder.
    keys = {
        "model.diffusion_model.input_blocks.0.0.weight": (32, 4, 3, 3),
        "model.diffusion_model.label_emb.0.0.weight": (128, 64),
        "cond_stage_model.model.ln_final.weight": (32,),
    }
    path = fake_file(tmp_path / "unclip.safetensors", keys)
    assert detect_family(keys).family == "sd2_unclip"
    with pytest.raises(CheckpointError, match="detected SD2 unCLIP; not supported yet"):
        load_checkpoint(path)


def test_sd3_is_named_and_refused(tmp_path):
    path = fake_file(tmp_path / "sd3.safetensors", SD3_KEYS)
    assert (detect_family(SD3_KEYS).family, detect_family(SD3_KEYS).in_channels) == ("sd3", 16)
    with pytest.raises(CheckpointError, match=r"detected SD3 / SD3.5; not supported yet"):
        load_checkpoint(path)


def test_unknown_layout_lists_prefixes_found_and_what_families_expect(tmp_path):
    path = fake_file(tmp_path / "lora.safetensors", {"lora_unet_down.alpha": (), "lora_te_text.weight": (4, 4)})
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    message = str(error.value)
    assert "lora.safetensors: unknown checkpoint layout: found " in message
    assert "lora_unet_down.alpha.* (1)" in message and "lora_te_text.weight.* (1)" in message
    assert "SD1: model.diffusion_model.input_blocks.*" in message and "standalone VAE: encoder.*" in message


def test_sdxl_diffusers_folder_is_refused(tiny_sd1_folder, tmp_path):
    folder = tmp_path / "xl"
    shutil.copytree(tiny_sd1_folder, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionXLPipeline"
    index["text_encoder_2"] = ["transformers", "CLIPTextModelWithProjection"]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="detected SDXL diffusers folder; not supported yet"):
        load_checkpoint(folder)


def test_diffusers_folder_family_comes_from_the_unet_structure(tiny_sd1_folder, tiny_sd2_folder):
    assert (folder_family(tiny_sd1_folder), folder_family(tiny_sd2_folder)) == ("sd1", "sd2")


# --- prediction type --------------------------------------------------------------------------------------


def test_v_pred_marker_means_v_prediction(tmp_path):
    path = write_tiny_checkpoint(tmp_path / "v.safetensors", "sd1", v_prediction=True)
    loaded = load_checkpoint(path, overrides=tiny_overrides("sd1"))
    assert (loaded.prediction, loaded.prediction_source) == ("v_prediction", "v_pred key")


def test_override_beats_the_marker():
    choice = detect_prediction({"v_pred": (0,)}, family="sd1", override="eps")
    assert (choice.prediction, choice.source) == ("eps", "override")


def test_unknown_override_is_rejected():
    with pytest.raises(ValueError, match="prediction override must be one of"):
        detect_prediction({}, family="sd1", override="v")


def test_ztsnr_marker_is_reported():
    assert detect_prediction({"v_pred": (0,), "ztsnr": (0,)}, family="sd1").zsnr is True


def test_modelspec_metadata_is_a_hint_when_no_marker_exists():
    choice = detect_prediction({}, family="sd1", metadata={"modelspec.prediction_type": "v"})
    assert (choice.prediction, choice.source) == ("v_prediction", "modelspec.prediction_type")


def test_sidecar_yaml_parameterization_v(tmp_path):
    path = tmp_path / "model.safetensors"
    (tmp_path / "model.yaml").write_text('model:\n  params:\n    parameterization: "v"\n    linear_start: 0.00085\n')
    choice = detect_prediction({}, family="sd2", path=path)
    assert (choice.prediction, choice.source) == ("v_prediction", "sidecar model.yaml")


def test_sidecar_yaml_without_parameterization_means_eps(tmp_path):
    (tmp_path / "model.yaml").write_text("model:\n  params:\n    linear_start: 0.00085\n")
    choice = detect_prediction({}, family="sd2", path=tmp_path / "model.safetensors")
    assert (choice.prediction, choice.source) == ("eps", "sidecar model.yaml")


@pytest.mark.parametrize("spread, expected", [(0.2, "v_prediction"), (0.05, "eps")])
def test_sd2_heuristic_reads_the_last_output_norm_bias_spread(tiny_sd2_checkpoint, spread, expected):
    shapes = shapes_of(tiny_sd2_checkpoint)
    bias = torch.tensor([-spread, spread] * 16)  # biased std == spread
    key = UNET_PREFIX + "output_blocks.11.1.transformer_blocks.0.norm1.bias"
    choice = detect_prediction(shapes, family="sd2", read_tensor={key: bias}.__getitem__)
    assert (choice.prediction, choice.source) == (expected, "SD2 norm-bias heuristic")


def test_sd1_without_markers_defaults_to_eps(tiny_sd1_checkpoint):
    choice = detect_prediction(shapes_of(tiny_sd1_checkpoint), family="sd1", read_tensor=lambda name: 1 / 0)
    assert (choice.prediction, choice.source) == ("eps", "family default")


def test_diffusers_folder_prediction_comes_from_scheduler_config(tmp_path):
    from diffusion.tiny_models import write_tiny_diffusers_folder

    folder = write_tiny_diffusers_folder(tmp_path / "v", "sd2", v_prediction=True)
    loaded = load_checkpoint(folder)
    assert (loaded.prediction, loaded.prediction_source) == ("v_prediction", "scheduler_config.json")
    assert load_checkpoint(folder, prediction="eps").prediction_source == "override"


def test_sd2_unets_attend_in_float32_from_either_form(tiny_sd2_checkpoint, tiny_sd2_folder):
    # ComfyUI runs every SD2 UNet's attention in float32: SD2.1's attention logits overflow fp16 (NaN images),
    # and a single file does not say which SD2 it is. Free in fp32; SD1 stays in the model dtype.
    single = unet_config_from_shapes(strip_prefix(shapes_of(tiny_sd2_checkpoint), UNET_PREFIX), "sd2",
                                     tiny_overrides("sd2"))
    assert json.loads((tiny_sd2_folder / "unet" / "config.json").read_text())["upcast_attention"] is False
    folder = load_checkpoint(tiny_sd2_folder)
    assert (single.upcast_attention, folder.unet_config.upcast_attention) == (True, True)


def test_inpaint_config_has_nine_input_channels(tmp_path):
    path = write_tiny_checkpoint(tmp_path / "inpaint.safetensors", "sd1", inpaint=True)
    loaded = load_checkpoint(path, overrides=tiny_overrides("sd1"))
    assert loaded.unet_config == tiny_unet_config("sd1", inpaint=True) and loaded.variant == "inpaint"


# --- real-size key sets ------------------------------------------------------------------------------------


def write_header_only(path, shapes: dict) -> None:
    """A real-layout fp16 safetensors file whose data section is a hole: the header is exact, the file sparse."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 2 * math.prod(shape)
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(raw)) + raw)
        handle.truncate(8 + len(raw) + offset)


def real_single_file_shapes(family: str) -> dict:
    """Every key and shape of a real SD1 / SD2 single file, from meta-built modules in the file's naming."""
    unet = UNetModel({"sd1": SD1_UNET, "sd2": SD2_UNET}[family], device="meta").state_dict()
    vae = AutoencoderKL(SD_VAE, device="meta").state_dict()
    text = {k.removeprefix("transformer."): v for k, v in ClipTextEncoder(
        {"sd1": SD1_CLIP_L, "sd2": SD2_OPENCLIP_H}[family], device="meta").state_dict().items()}
    if family == "sd1":
        text = {f"cond_stage_model.transformer.text_model.{k}": v for k, v in text.items()}
    else:
        text = {f"cond_stage_model.model.{k}": v for k, v in transformers_to_open_clip(text).items()}
    tensors = {UNET_PREFIX + k: v for k, v in unet.items()} | {VAE_PREFIX + k: v for k, v in vae.items()} | text
    return {name: tuple(t.shape) for name, t in tensors.items()}


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def real_size_file(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("real") / f"real_{request.param}.safetensors"
    write_header_only(path, real_single_file_shapes(request.param))
    return request.param, path


def test_real_size_header_is_detected_as_its_family(real_size_file):
    family, path = real_size_file
    assert path.stat().st_size > 1_500_000_000  # the real ~2 GB fp16 layout, held as a sparse file
    found = detect_family(shapes_of(path))
    assert (found.family, found.in_channels, found.variant) == (family, 4, "base")


def test_real_size_header_gives_the_real_unet_vae_and_text_presets(real_size_file):
    family, path = real_size_file
    shapes = shapes_of(path)
    unet = unet_config_from_shapes(strip_prefix(shapes, UNET_PREFIX), family)
    # SD2 attention runs in float32 (ComfyUI does this for every SD2 model: SD2.1's logits overflow fp16).
    expected_unet = {"sd1": SD1_UNET, "sd2": dataclasses.replace(SD2_UNET, upcast_attention=True)}[family]
    assert unet == expected_unet
    assert vae_config_from_shapes(strip_prefix(shapes, VAE_PREFIX)) == SD_VAE
    text_prefix = detect_family(shapes).text_prefix
    text = text_encoder_config_from_state_dict(strip_prefix(shapes, text_prefix), base={
        "sd1": SD1_CLIP_L, "sd2": SD2_OPENCLIP_H}[family])
    assert text == {"sd1": SD1_CLIP_L, "sd2": SD2_OPENCLIP_H}[family]


def test_real_size_sd2_header_without_markers_runs_the_norm_bias_heuristic(real_size_file):
    family, path = real_size_file
    with SafetensorsFiles([path]) as source:
        choice = detect_prediction(source.shapes(), family=family, read_tensor=source.get, path=path)
    # All-zero weights: the SD2 norm-bias spread is 0, so the heuristic says eps (SD1 never runs it).
    expected = {"sd1": "family default", "sd2": "SD2 norm-bias heuristic"}[family]
    assert (choice.prediction, choice.source) == ("eps", expected)
