"""The handles' cache accounting: weights shared by derived handles are counted once."""
from __future__ import annotations

from diffusion.memory import weight_bytes
from nodes.values import WeightPatch


def test_a_patched_model_or_clip_counts_none_of_the_weights_it_shares(sd1_handles):
    model, clip, vae = sd1_handles
    name = next(iter(dict(model.unet.named_parameters())))
    patch = {name: WeightPatch(lambda weight: weight, 0.5)}
    assert model.nbytes == weight_bytes(model.unet) > 0
    assert model.with_patches(patch).nbytes == 0
    assert clip.nbytes == weight_bytes(clip.text.encoder) > 0
    assert clip.with_layer(-2).nbytes == 0
    assert vae.nbytes == weight_bytes(vae.vae) > 0
