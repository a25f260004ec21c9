"""Naive explicit-softmax attention, the ground truth every kernel and effect is tested against.

Materialises the full ``[B, H, Nq, Nk]`` probability matrix: tests and tiny models only.
"""

from __future__ import annotations

from typing import Optional

import torch


def attention_probs(
    q: torch.Tensor, k: torch.Tensor, mask: Optional[torch.Tensor] = None, scale: Optional[float] = None
) -> torch.Tensor:
    """softmax(q·kᵀ·scale + mask) over keys; `mask` is additive (float) or boolean (True = attend)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = torch.matmul(q, k.transpose(-1, -2)) * scale
    if mask is not None:
        if mask.dtype == torch.bool:
            logits = logits.masked_fill(~mask, float("-inf"))
        else:
            logits = logits + mask
    return torch.softmax(logits, dim=-1)


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Explicit softmax(q·kᵀ·scale + mask)·v in the inputs' dtype; layout ``[B, H, N, D]``."""
    return torch.matmul(attention_probs(q, k, mask, scale), v)


def sdpa_kernel(q, k, v, mask=None, scale=None) -> torch.Tensor:
    """torch SDPA with the host-kernel signature ``(q, k, v, mask, scale)``."""
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False, scale=scale
    )


def reference_kernel(q, k, v, mask=None, scale=None) -> torch.Tensor:
    return reference_attention(q, k, v, mask, scale)
