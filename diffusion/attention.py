"""Multi-head attention through ``torch.nn.functional.scaled_dot_product_attention``.

Every attention in the UNet and VAE goes through :func:`attention`, so there is one place that decides
layout, upcasting and the kernel. SDPA picks a fused flash / memory-efficient kernel where the device has one,
so no ``[batch, heads, N, N]`` score tensor is materialised by our code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, *, upcast: bool = False
) -> torch.Tensor:
    """Scaled dot-product attention over ``[batch, tokens, heads * head_width]`` tensors.

    ``q`` has ``N`` tokens, ``k``/``v`` have ``M``; the result has ``q``'s shape (with ``v``'s width). With
    ``upcast`` the product runs in float32 and is cast back, which SD2.1 needs in fp16 (its attention logits
    overflow half precision).
    """
    batch, tokens, width = q.shape
    if width % heads:
        raise ValueError(f"attention width {width} is not divisible by {heads} heads")
    out_dtype = q.dtype
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).flatten(2).to(out_dtype)


def share_one_weight(linears: list[torch.nn.Linear]) -> None:
    """Make the bias-free ``linears``' weights row blocks of one ``[sum(out), in]`` tensor, names unchanged.

    Projections that read the same input (self-attention's q/k/v, cross-attention's k/v) then run as one
    matmul through :func:`stacked_weight`. The parameters become views of the shared tensor, so a checkpoint
    loads and saves by the same keys and an in-place weight patch (LoRA) updates the stacked matmul as well;
    no second copy of the weights exists. Moving or re-assigning the module gives each weight its own storage
    again, and :func:`stacked_weight` then answers None until this is called again.
    """
    weights = [linear.weight for linear in linears]
    # Weights made under inference mode cannot be re-viewed as parameters; they stay separate matmuls.
    if any(torch.is_inference(weight) for weight in weights) or stacked_weight(linears) is not None:
        return
    # A normal (not inference-mode) tensor, so the weights stay patchable in place after inference runs.
    with torch.inference_mode(False), torch.no_grad():
        stacked = torch.cat([weight.detach() for weight in weights])
        start = 0
        for linear, weight in zip(linears, weights):
            linear.weight.data = stacked[start : start + weight.shape[0]]
            start += weight.shape[0]


def stacked_weight(linears: list[torch.nn.Linear]) -> torch.Tensor | None:
    """The ``linears``' weights as one tensor when :func:`share_one_weight` left them adjacent in memory.

    Only a view over memory the weights already own is returned (no reference is kept anywhere), so an
    offloaded model's device memory is never held alive by a stale stacked copy.
    """
    first = linears[0].weight
    if first.device.type == "meta" or not first.is_contiguous() or torch.is_inference(first):
        return None
    rows, width = first.shape
    expected = first.data_ptr() + first.numel() * first.element_size()
    for linear in linears[1:]:
        weight = linear.weight
        if weight.data_ptr() != expected or weight.dtype != first.dtype or not weight.is_contiguous():
            return None
        if weight.shape[1] != width or weight.device != first.device:
            return None
        rows += weight.shape[0]
        expected += weight.numel() * weight.element_size()
    if first.storage_offset() + rows * width > first.untyped_storage().nbytes() // first.element_size():
        return None
    return first.as_strided((rows, width), (width, 1), first.storage_offset())
