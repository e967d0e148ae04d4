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
