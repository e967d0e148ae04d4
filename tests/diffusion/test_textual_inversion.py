"""Textual inversion through the loaded CLIP: `embedding:name` vectors found in every model root's
embeddings folder, in each file format, entering the encoder exactly where the words they replace would."""
import os

import pytest
import safetensors.torch
import torch

from diffusion.text_encoders import embedding_folder_lookup, load_textual_inversion
from engine import ExecutionContext, RunSettings
from nodes.loaders import DEMO_CHECKPOINT, CheckpointLoaderSimple

RED_FOX_IDS = [736, 3240]  # "red</w>", "fox</w>" in CLIP's vocabulary


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    first, second = tmp_path_factory.mktemp("root_a"), tmp_path_factory.mktemp("root_b")
    for root in (first, second):
        (root / "embeddings").mkdir()
    return first, second


@pytest.fixture(scope="module")
def clip_and_settings(roots, tmp_path_factory):
    settings = RunSettings(models_dir=roots[0], extra_models_dirs=(roots[1],),
                           temp_dir=tmp_path_factory.mktemp("temp"), device="cpu", preview="none")
    context = ExecutionContext("1", "p", "CheckpointLoaderSimple", settings, lambda *a: None, lambda: False)
    return CheckpointLoaderSimple(DEMO_CHECKPOINT, context=context)[1], settings


def _word_vectors(clip, ids):
    return clip.text.encoder.transformer.embeddings.token_embedding.weight[ids].detach().clone()


def test_red_fox_ids_are_what_the_tokenizer_gives(clip_and_settings):
    clip, _ = clip_and_settings
    assert clip.text.tokenizer.encode("red fox") == RED_FOX_IDS


@pytest.mark.parametrize("file_name, make", [
    ("redfox-a1111.pt", lambda v: {"string_to_token": {"*": 265}, "string_to_param": {"*": torch.nn.Parameter(v)},
                                   "name": "redfox", "step": 3000, "sd_checkpoint_name": "v1-5"}),
    ("redfox-kohya.safetensors", lambda v: {"emb_params": v}),
    ("redfox-diffusers.bin", lambda v: {"<red-fox>": v}),
])
def test_an_embedding_encodes_exactly_as_the_words_it_holds(file_name, make, clip_and_settings, roots):
    clip, _ = clip_and_settings
    path = roots[1] / "embeddings" / file_name  # the extra root: every model root is searched
    content = make(_word_vectors(clip, RED_FOX_IDS))
    if file_name.endswith(".safetensors"):
        safetensors.torch.save_file(content, path)
    else:
        torch.save(content, path)
    name = file_name.rsplit(".", 1)[0]
    via_embedding = clip.encode(f"a photo of a embedding:{name} in snow")[0]
    torch.testing.assert_close(via_embedding, clip.encode("a photo of a red fox in snow")[0], rtol=0, atol=1e-6)
    assert not torch.allclose(via_embedding, clip.encode("a photo of a in snow")[0], atol=1e-3)


def test_the_first_model_root_wins_for_a_name_in_both(roots):
    safetensors.torch.save_file({"emb_params": torch.ones(1, 32)}, roots[0] / "embeddings" / "twice.safetensors")
    safetensors.torch.save_file({"emb_params": torch.zeros(2, 32)}, roots[1] / "embeddings" / "twice.safetensors")
    lookup = embedding_folder_lookup([roots[0] / "embeddings", roots[1] / "embeddings"])
    assert torch.equal(lookup("twice"), torch.ones(1, 32))


def test_the_lookup_accepts_any_sequence_of_folders(roots):
    safetensors.torch.save_file({"emb_params": torch.ones(3, 32)}, roots[1] / "embeddings" / "only-b.safetensors")
    folders = (str(roots[0] / "embeddings"), roots[1] / "embeddings")
    assert embedding_folder_lookup(folders)("only-b").shape == (3, 32)
    assert embedding_folder_lookup(iter(folders))("only-b").shape == (3, 32)


def test_a_symlink_out_of_the_embeddings_folder_is_not_followed(tmp_path):
    folder = tmp_path / "embeddings"
    folder.mkdir()
    secret = tmp_path / "secret.safetensors"
    safetensors.torch.save_file({"emb_params": torch.ones(1, 32)}, secret)
    os.symlink(secret, folder / "leak.safetensors")
    assert embedding_folder_lookup([folder])("leak") is None


def test_an_a1111_pickle_with_a_parameter_loads_under_weights_only(tmp_path):
    vectors = torch.randn(4, 32)
    torch.save({"string_to_param": {"*": torch.nn.Parameter(vectors)}}, tmp_path / "param.pt")
    assert torch.equal(load_textual_inversion(tmp_path / "param.pt"), vectors)
