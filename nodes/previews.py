"""Sampler progress for the SD nodes: each step is reported through `context.progress` (which is also how an
interrupt reaches inside the sampler loop), with a throttled JPEG preview of the current x0 estimate when
the run allows previews and the model carries fitted latent -> RGB factors (ModelHandle.preview_factors).
"""
from __future__ import annotations

from torch import Tensor

from diffusion.latent_preview import PreviewThrottle, preview_jpeg
from diffusion.sampling import StepCallback
from engine import ExecutionContext
from nodes.values import ModelHandle

# comfyui-interface.md 7: previews go out "a few times a second at most".
PREVIEWS_PER_SECOND = 4.0


def sampling_progress(context: ExecutionContext | None, model: ModelHandle) -> StepCallback | None:
    """The step callback for one sampler run of `model`; None when the node runs outside an engine."""
    if context is None:
        return None
    factors = model.preview_factors if context.settings.preview != "none" else None
    throttle = PreviewThrottle(PREVIEWS_PER_SECOND)

    def on_step(step: int, total: int, x: Tensor, denoised: Tensor) -> None:
        preview = None
        if factors is not None and throttle.ready():
            # The sampler's x0 is in the denoiser's space; the factors were fitted on raw VAE latents.
            preview = preview_jpeg(model.latent_format.process_out(denoised), factors)
        # dpm_adaptive cannot know its step count (total 0): report the steps done so far as the maximum.
        context.progress(step + 1, max(total, step + 1), preview)

    return on_step
