"""Loading checkpoints: round trips between formats, dtypes, memory, and every kind of bad file."""
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import textwrap
import weakref

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffusion import safetensors_io
from diffusion.checkpoints import default_dtype, load_checkpoint, load_vae
from diffusion.legacy_pickle import load_pickle_state_dict, safe_globals
from diffusion.memory import weight_bytes
from diffusion.safetensors_io import CheckpointError
from diffusion.tiny_models import (
    tiny_checkpoint_tensors,
    tiny_overrides,
    write_tiny_diffusers_folder,
    write_tiny_vae,
)
from diffusion.unet import UNetModel

PARTS = ("unet", "vae", "text_encoder")


def load_tiny(path, family="sd1", **kwargs):
    return load_checkpoint(path, overrides=tiny_overrides(family), **kwargs)


def state(loaded, part):
    return getattr(loaded, part).state_dict()


def differing_keys(a: dict, b: dict) -> list[str]:
    assert sorted(a) == sorted(b)
    return [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]


def rewrite(path, out, change):
    """Copy a checkpoint with its tensor dict changed by `change` (which edits it in place)."""
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, str(out))
    return out


# --- round trips ------------------------------------------------------------------------------------------


def test_sd1_single_file_and_diffusers_folder_load_identical_tensors(tiny_sd1_checkpoint, tiny_sd1_folder):
    single, folder = load_tiny(tiny_sd1_checkpoint), load_checkpoint(tiny_sd1_folder)
    for part in PARTS:
        assert differing_keys(state(single, part), state(folder, part)) == [], part
    assert (single.unet_config, single.vae_config, single.text_config) == (
        folder.unet_config, folder.vae_config, folder.text_config)


def test_sd2_single_file_and_diffusers_folder_load_identical_tensors(tiny_sd2_checkpoint, tiny_sd2_folder):
    single, folder = load_tiny(tiny_sd2_checkpoint, "sd2"), load_checkpoint(tiny_sd2_folder)
    for part in ("unet", "vae"):
        assert differing_keys(state(single, part), state(folder, part)) == [], part
    # SD2 diffusers folders hold a plain CLIPTextModel without the projection and without the last block.
    last_block = f"transformer.encoder.layers.{single.text_config.num_layers - 1}."
    text = {k: v for k, v in state(single, "text_encoder").items()
            if not k.startswith(("text_projection", last_block))}
    assert differing_keys(text, state(folder, "text_encoder")) == []


@pytest.mark.parametrize("layer", [None, -2, -3])
def test_sd2_folder_encodes_the_same_clip_layers_as_the_single_file(tiny_sd2_checkpoint, tiny_sd2_folder, layer):
    single, folder = load_tiny(tiny_sd2_checkpoint, "sd2"), load_checkpoint(tiny_sd2_folder)
    assert (single.text_config.missing_last_layers, folder.text_config.missing_last_layers) == (0, 1)
    assert folder.text_config.default_layer == single.text_config.default_layer == -2
    tokens = [[49406, 320, 1125, 539, 320, 2368, 49407] + [0] * 70]
    with torch.no_grad():
        assert torch.equal(single.text_encoder.encode_tokens(tokens, layer=layer)[0],
                           folder.text_encoder.encode_tokens(tokens, layer=layer)[0])


def test_single_file_tensors_are_the_written_tensors(tiny_sd2_checkpoint):
    written = tiny_checkpoint_tensors("sd2")
    unet = state(load_tiny(tiny_sd2_checkpoint, "sd2"), "unet")
    assert differing_keys(unet, {k.removeprefix("model.diffusion_model."): v for k, v in written.items()
                                 if k.startswith("model.diffusion_model.")}) == []


def test_old_sd1_file_without_the_text_model_level_loads_the_same(tmp_path, tiny_sd1_checkpoint):
    def drop_level(tensors):
        for key in [k for k in tensors if k.startswith("cond_stage_model.transformer.text_model.")]:
            tensors[key.replace("transformer.text_model.", "transformer.")] = tensors.pop(key)

    old = load_tiny(rewrite(tiny_sd1_checkpoint, tmp_path / "old.safetensors", drop_level))
    assert differing_keys(state(old, "text_encoder"), state(load_tiny(tiny_sd1_checkpoint), "text_encoder")) == []


def test_open_clip_in_proj_is_split_into_q_k_v(tiny_sd2_checkpoint):
    fused = load_file(tiny_sd2_checkpoint)["cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight"]
    text = {k.removeprefix("transformer.").removeprefix("text_model."): v
            for k, v in state(load_tiny(tiny_sd2_checkpoint, "sd2"), "text_encoder").items()}
    loaded = torch.cat([text[f"encoder.layers.1.self_attn.{p}_proj.weight"] for p in "qkv"])
    assert torch.equal(loaded, fused)


@pytest.fixture
def one_thread():
    # A tiny forward pass gains nothing from threads and, on a busy 2-core machine, loses seconds to them.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_loaded_unet_computes_like_one_loaded_the_ordinary_way(tiny_sd1_checkpoint, one_thread):
    loaded = load_tiny(tiny_sd1_checkpoint)
    reference = UNetModel(loaded.unet_config, device="meta")
    reference.load_state_dict({k: v.clone() for k, v in state(loaded, "unet").items()}, assign=True)
    torch.manual_seed(0)
    x, t, context = torch.randn(1, 4, 16, 16), torch.tensor([500.0]), torch.randn(1, 77, 32)
    with torch.no_grad():
        ours, theirs = loaded.unet(x, t, context), reference(x, t, context)
    # Not bit-equal: kernels may pick other code paths for differently aligned (memory-mapped) weights.
    assert (ours - theirs).abs().max() <= 1e-5 * theirs.abs().max()


def test_sharded_fp16_variant_folder_loads_the_fp16_weights(tmp_path, tiny_sd1_checkpoint):
    folder = write_tiny_diffusers_folder(tmp_path / "sharded", "sd1", variant="fp16", sharded=True)
    loaded = load_checkpoint(folder, variant="fp16", dtype=torch.float16)
    single = load_tiny(tiny_sd1_checkpoint, dtype=torch.float16)
    for part in PARTS:
        assert differing_keys(state(single, part), state(loaded, part)) == [], part


def test_old_folder_with_pickled_bin_weights_loads_the_same(tmp_path, tiny_sd1_folder):
    folder = tmp_path / "old"
    shutil.copytree(tiny_sd1_folder, folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), weights.with_suffix(".bin"))
    weights.unlink()
    for part in PARTS:
        assert differing_keys(state(load_checkpoint(folder), part), state(load_checkpoint(tiny_sd1_folder), part)) == []


def test_transformers_spelling_of_a_sharded_variant_index_is_found(tmp_path, tiny_sd1_folder):
    from diffusion.diffusers_folders import component_weight_files

    folder = tmp_path / "text_encoder"
    folder.mkdir()
    weights = load_file(tiny_sd1_folder / "text_encoder" / "model.safetensors")
    keys = sorted(weights)
    for number, part in enumerate((keys[:10], keys[10:]), start=1):
        save_file({k: weights[k] for k in part}, str(folder / f"model.fp16-0000{number}-of-00002.safetensors"))
    weight_map = {k: f"model.fp16-0000{1 if i < 10 else 2}-of-00002.safetensors" for i, k in enumerate(keys)}
    (folder / "model.fp16.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert [p.name for p in component_weight_files(folder, "model", "fp16")] == [
        "model.fp16-00001-of-00002.safetensors", "model.fp16-00002-of-00002.safetensors"]


def test_unusable_folder_config_is_named(tmp_path, tiny_sd1_folder):
    folder = tmp_path / "odd"
    shutil.copytree(tiny_sd1_folder, folder)
    config = json.loads((folder / "unet" / "config.json").read_text())
    config["down_block_types"][0] = "SimpleCrossAttnDownBlock2D"
    (folder / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"odd/unet/config\.json: .*unsupported down_block_types"):
        load_checkpoint(folder)


def test_missing_variant_lists_the_files_found(tiny_sd1_folder):
    with pytest.raises(CheckpointError, match=r"no diffusion_pytorch_model\.fp16\.safetensors.*found: \['config.json'"):
        load_checkpoint(tiny_sd1_folder, variant="fp16")


# --- dtypes -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fp32_file_loads_straight_into_a_lower_precision(tiny_sd1_checkpoint, dtype):
    loaded = load_tiny(tiny_sd1_checkpoint, dtype=dtype)
    fp32 = load_tiny(tiny_sd1_checkpoint)
    for part in PARTS:
        converted = {k: v.to(dtype) for k, v in state(fp32, part).items()}
        assert differing_keys(state(loaded, part), converted) == [], part


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_file_loads_bit_exact_in_its_own_dtype(tmp_path, dtype):
    from diffusion.tiny_models import write_tiny_checkpoint

    path = write_tiny_checkpoint(tmp_path / "half.safetensors", "sd2", dtype=dtype)
    loaded = load_tiny(path, "sd2", dtype=dtype)
    file_vae = {k.removeprefix("first_stage_model."): v for k, v in load_file(path).items()
                if k.startswith("first_stage_model.")}
    assert differing_keys(state(loaded, "vae"), file_vae) == []


def test_default_dtype_on_cpu_is_fp32_even_for_an_fp16_file(tmp_path):
    from diffusion.tiny_models import write_tiny_checkpoint

    loaded = load_tiny(write_tiny_checkpoint(tmp_path / "half.safetensors", dtype=torch.float16))
    assert {p.dtype for part in PARTS for p in getattr(loaded, part).parameters()} == {torch.float32}


def test_tensors_are_placed_on_the_requested_device(tiny_sd1_checkpoint):
    loaded = load_tiny(tiny_sd1_checkpoint, device="meta", dtype=torch.float16)
    assert {(p.device.type, p.dtype) for part in PARTS for p in getattr(loaded, part).parameters()} == {
        ("meta", torch.float16)}


def test_default_dtype_is_fp16_on_cuda_and_fp32_on_cpu():
    assert (default_dtype("cuda:0"), default_dtype("cpu")) == (torch.float16, torch.float32)


def test_mixed_precision_file_is_converted_per_tensor(tmp_path, tiny_sd1_checkpoint):
    def mix(tensors):
        for index, key in enumerate(sorted(tensors)):
            if tensors[key].is_floating_point():
                tensors[key] = tensors[key].to((torch.float32, torch.float16, torch.bfloat16)[index % 3])

    path = rewrite(tiny_sd1_checkpoint, tmp_path / "mixed.safetensors", mix)
    mixed = load_file(path)
    unet = state(load_tiny(path), "unet")
    expected = {k: mixed["model.diffusion_model." + k].float() for k in unet}
    assert differing_keys(unet, expected) == []


# --- memory -----------------------------------------------------------------------------------------------


def test_each_file_tensor_is_released_before_the_next_is_read(tiny_sd1_checkpoint, monkeypatch):
    # Converting fp32 -> fp16 makes a new tensor; the one read from the file must be dead by the next read,
    # so at most one file tensor is alive beside the model at any time.
    alive_at_read: list[int] = []
    reads: list[weakref.ref] = []
    original = safetensors_io.SafetensorsFiles.get

    def spied(self, name):
        alive_at_read.append(sum(ref() is not None for ref in reads))
        tensor = original(self, name)
        reads.append(weakref.ref(tensor))
        return tensor

    monkeypatch.setattr(safetensors_io.SafetensorsFiles, "get", spied)
    loaded = load_tiny(tiny_sd1_checkpoint, dtype=torch.float16)
    assert len(reads) > 300 and max(alive_at_read) == 0
    assert all(ref() is None for ref in reads)
    assert loaded.unet.out[2].weight.dtype == torch.float16


def test_peak_memory_of_a_converting_load_is_one_model_not_two(tiny_sd1_checkpoint):
    # Anonymous memory sampled around every tensor read, in a fresh process (file pages of the memory map
    # are not ours to count). Two copies would be the fp32 state dict plus the fp16 model: 3x the model.
    script = textwrap.dedent(f"""
        import torch
        from diffusion import safetensors_io
        from diffusion.checkpoints import load_checkpoint
        from diffusion.memory import weight_bytes
        from diffusion.text_encoders import ClipTextEncoder
        from diffusion.tiny_models import TINY_SD1_TEXT, tiny_overrides

        def anon():
            return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("RssAnon:"))

        samples, read = [], safetensors_io.SafetensorsFiles.get
        def sampled(self, name):
            samples.append(anon())
            return read(self, name)
        safetensors_io.SafetensorsFiles.get = sampled
        ClipTextEncoder(TINY_SD1_TEXT, device="meta")  # transformers' lazy imports, before the baseline
        base = anon()
        loaded = load_checkpoint({str(tiny_sd1_checkpoint)!r}, dtype=torch.float16, overrides=tiny_overrides("sd1"))
        samples.append(anon())
        print(max(samples) - base, sum(weight_bytes(m) for m in (loaded.unet, loaded.vae, loaded.text_encoder)))
    """)
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    peak, model = map(int, result.stdout.split())
    assert model > 20_000_000  # tens of MB, so allocator noise is small against it
    assert peak < 1.5 * model, f"peak extra {peak / 1e6:.1f} MB for a {model / 1e6:.1f} MB model"


def test_loaded_parameters_share_no_storage_with_the_legacy_state_dict(tmp_path, tiny_sd1_checkpoint):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(tiny_sd1_checkpoint)}, path)
    loaded = load_tiny(path, dtype=torch.float16)
    again = torch.load(path, weights_only=True, mmap=True)["state_dict"]
    pointers = {t.untyped_storage().data_ptr() for t in again.values()}
    assert not any(p.untyped_storage().data_ptr() in pointers for p in loaded.unet.parameters())
    assert weight_bytes(loaded.unet) * 2 == sum(
        t.numel() * 4 for k, t in again.items() if k.startswith("model.diffusion_model."))


# --- legacy pickles ---------------------------------------------------------------------------------------


class WritesMarker:
    """Pickles as a call to os.system: what a malicious checkpoint does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickle_that_runs_code_is_refused_and_nothing_runs(tmp_path):
    marker, path = tmp_path / "pwned", tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "payload": WritesMarker(marker)}, path)
    refusal = r"unsafe or unsupported checkpoint: .*evil\.ckpt wants (posix|os)\.system"
    with pytest.raises(CheckpointError, match=refusal):
        load_checkpoint(path)
    assert not marker.exists()


def test_refused_pickle_without_a_global_names_the_unpickler_reason_not_torchs_advice(tmp_path):
    path = tmp_path / "odd.ckpt"
    path.write_bytes(b"garbage")  # "g" is pickle's GET opcode, which the restricted unpickler does not run
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    assert str(error.value) == f"unsafe or unsupported checkpoint: {path}: Unsupported operand 103"


def write_lightning_checkpoint(path, state_dict):
    """A CompVis-era .ckpt: a Lightning ModelCheckpoint callback and numpy scalars beside the weights."""
    import types

    import numpy

    names = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"]
    modules = {name: types.ModuleType(name) for name in names}

    class ModelCheckpoint:
        def __init__(self):
            self.monitor, self.best_model_score = "val/loss", numpy.float64(0.12)

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = names[-1], "ModelCheckpoint"
    modules[names[-1]].ModelCheckpoint = ModelCheckpoint
    saved = {name: sys.modules.get(name) for name in names}
    sys.modules.update(modules)
    try:
        torch.save({"state_dict": state_dict, "global_step": numpy.int64(470000), "epoch": numpy.int64(6),
                    "callbacks": {"ModelCheckpoint": ModelCheckpoint()}}, path)
    finally:
        for name, module in saved.items():
            if module is None:
                del sys.modules[name]
            else:
                sys.modules[name] = module


def test_lightning_checkpoint_loads_like_the_safetensors_file(tmp_path, tiny_sd1_checkpoint):
    path = tmp_path / "compvis.ckpt"
    write_lightning_checkpoint(path, load_file(tiny_sd1_checkpoint))
    assert "pytorch_lightning" not in sys.modules
    from_ckpt, from_safetensors = load_tiny(path), load_tiny(tiny_sd1_checkpoint)
    for part in PARTS:
        assert differing_keys(state(from_ckpt, part), state(from_safetensors, part)) == [], part
    assert "pytorch_lightning" not in sys.modules


def test_lightning_allowlist_is_scoped_to_the_load(tmp_path):
    path = tmp_path / "compvis.ckpt"
    write_lightning_checkpoint(path, {"w": torch.zeros(2)})
    assert list(load_pickle_state_dict(path)) == ["w"]
    ours = {id(entry) for entry, _name in safe_globals()}
    registered = [g[0] if isinstance(g, tuple) else g for g in torch.serialization.get_safe_globals()]
    assert [g for g in registered if id(g) in ours] == []
    with pytest.raises(pickle.UnpicklingError, match="Unsupported global"):  # a plain load still refuses it
        torch.load(path, weights_only=True)


def test_garbage_ckpt_is_not_a_readable_torch_checkpoint(tmp_path):
    path = tmp_path / "garbage.ckpt"
    path.write_bytes(b"this is not a pickle" * 10)
    with pytest.raises(CheckpointError, match=r"garbage\.ckpt: not a readable torch checkpoint"):
        load_checkpoint(path)


# --- bad files --------------------------------------------------------------------------------------------


def test_truncated_checkpoint_is_a_clear_error(tmp_path, tiny_sd1_checkpoint):
    path = tmp_path / "partial.safetensors"
    path.write_bytes(tiny_sd1_checkpoint.read_bytes()[:5_000_000])
    with pytest.raises(CheckpointError, match=r"partial\.safetensors: truncated: tensor '.+' needs bytes up to"):
        load_checkpoint(path)


def test_missing_unet_key_is_named_with_module_and_file(tmp_path, tiny_sd1_checkpoint):
    path = rewrite(tiny_sd1_checkpoint, tmp_path / "holed.safetensors",
                   lambda t: t.pop("model.diffusion_model.output_blocks.4.1.proj_out.bias"))
    with pytest.raises(CheckpointError, match=r"holed\.safetensors: UNet is missing 1 of \d+ keys, e\.g\. "
                                              r"'model\.diffusion_model\.output_blocks\.4\.1\.proj_out\.bias'"):
        load_tiny(path)


def test_transposed_unet_weight_is_a_checkpoint_error_naming_file_key_and_shapes(tmp_path, tiny_sd1_checkpoint):
    key = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"  # [64, 32]

    def transpose(tensors):
        tensors[key] = tensors[key].t().contiguous()

    path = rewrite(tiny_sd1_checkpoint, tmp_path / "odd.safetensors", transpose)
    with pytest.raises(CheckpointError, match=rf"odd\.safetensors: UNet key '{re.escape(key)}' has shape \[32, 64\], "
                                              r"the model expects \[64, 32\]"):
        load_tiny(path)


def test_widths_that_break_group_norm_are_a_checkpoint_error_naming_the_file(tmp_path, tiny_sd1_checkpoint):
    from diffusion.tiny_models import random_weights
    from diffusion.vae import AutoencoderKL, VAEConfig

    narrow = random_weights(AutoencoderKL(VAEConfig(ch=16, ch_mult=(1, 1, 1, 1), num_groups=16), device="meta"), 0)

    def swap_vae(tensors):
        for key in [k for k in tensors if k.startswith("first_stage_model.")]:
            del tensors[key]
        tensors.update({f"first_stage_model.{k}": v for k, v in narrow.items()})

    path = rewrite(tiny_sd1_checkpoint, tmp_path / "narrow.safetensors", swap_vae)
    with pytest.raises(CheckpointError, match=r"narrow\.safetensors: VAE width 16 is not divisible by num_groups=32"):
        load_tiny(path)


def test_missing_text_encoder_key_is_named(tmp_path, tiny_sd1_checkpoint):
    key = "cond_stage_model.transformer.text_model.encoder.layers.2.mlp.fc2.weight"
    path = rewrite(tiny_sd1_checkpoint, tmp_path / "holed.safetensors", lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match=r"holed\.safetensors: .*missing keys: encoder\.layers\.2\.mlp\.fc2\."):
        load_tiny(path)


def test_stray_key_under_the_unet_prefix_is_refused(tmp_path, tiny_sd1_checkpoint):
    path = rewrite(tiny_sd1_checkpoint, tmp_path / "stray.safetensors",
                   lambda t: t.update({"model.diffusion_model.middle_block.1.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"1 tensors match no parameter .*middle_block\.1\.extra\.weight"):
        load_tiny(path)


def test_known_leftovers_are_skipped_and_other_top_level_keys_reported(tmp_path, tiny_sd1_checkpoint):
    path = rewrite(tiny_sd1_checkpoint, tmp_path / "extra.safetensors",
                   lambda t: t.update({"lora_leftover.weight": torch.zeros(2)}))
    loaded = load_tiny(path)
    assert loaded.unexpected_keys == ("lora_leftover.weight",)
    assert sorted(loaded.skipped_keys) == ["alphas_cumprod", "betas",
                                           "cond_stage_model.transformer.text_model.embeddings.position_ids",
                                           "model_ema.decay", "model_ema.num_updates"]


def test_scaled_fp8_checkpoint_is_refused(tmp_path, tiny_sd1_checkpoint):
    path = rewrite(tiny_sd1_checkpoint, tmp_path / "fp8.safetensors",
                   lambda t: t.update({"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}))
    with pytest.raises(CheckpointError, match=r"fp8\.safetensors: scaled fp8 checkpoint"):
        load_checkpoint(path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(CheckpointError, match=r"nothere\.safetensors: no such file"):
        load_checkpoint(tmp_path / "nothere.safetensors")


# --- standalone VAE ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("naming", ["ldm", "diffusers"])
def test_standalone_vae_in_either_naming_equals_the_checkpoint_vae(naming, tmp_path, tiny_sd1_checkpoint):
    vae = load_vae(write_tiny_vae(tmp_path / f"{naming}.safetensors", naming))
    assert differing_keys(vae.state_dict(), state(load_tiny(tiny_sd1_checkpoint), "vae")) == []


def test_vae_folder_and_checkpoint_first_stage_load_the_same(tiny_sd1_folder, tiny_sd1_checkpoint):
    from_folder, from_checkpoint = load_vae(tiny_sd1_folder / "vae"), load_vae(tiny_sd1_checkpoint)
    assert differing_keys(from_folder.state_dict(), from_checkpoint.state_dict()) == []


def test_standalone_vae_missing_a_layout_key_names_the_file(tmp_path, tiny_vae_file):
    path = rewrite(tiny_vae_file, tmp_path / "holed_vae.safetensors", lambda t: t.pop("decoder.conv_out.weight"))
    with pytest.raises(CheckpointError, match=r"holed_vae\.safetensors: expected key 'decoder\.conv_out\.weight'"):
        load_vae(path)


def test_vae_loader_refuses_a_file_without_a_vae(tmp_path):
    path = tmp_path / "unet.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 4, 3, 3)}, str(path))
    with pytest.raises(CheckpointError, match=r"unet\.safetensors: not a VAE file"):
        load_vae(path)
