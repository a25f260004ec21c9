"""Fake of ComfyUI's attention entry point (``comfy.ldm.modules.attention``), our own code.

Contract reproduced (ComfyUI v0.3.64, see docs in ``tests/comfy_traces.py``):

* every backend has the signature
  ``backend(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
  skip_output_reshape=False, **kwargs)`` and is decorated by :func:`wrap_attn`;
* layouts: ``skip_reshape=False`` -> q/k/v ``(B, L, H*D)`` (``v`` may also be ``(B, L, H, D)``,
  as SD3 passes it), ``skip_reshape=True`` -> ``(B, H, L, D)``; output ``(B, Lq, H*D)`` unless
  ``skip_output_reshape=True`` -> ``(B, H, Lq, D)``;
* masks: additive float or boolean, ``(Lq, Lk)``, ``(B, Lq, Lk)`` or ``(B, 1|H, Lq, Lk)``;
* :func:`wrap_attn`: one override slot ``transformer_options["optimized_attention_override"]``,
  called as ``override(func, *args, **kwargs)`` with the *unwrapped* backend ``func``; the guard
  kwarg ``_inside_attn_wrapper=True`` is present in ``kwargs`` during the override call (so calling
  ``func`` or any wrapped backend again with the same kwargs does not recurse) and is removed
  from the caller's kwargs dict afterwards.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import torch
import torch.nn.functional as F

GUARD = "_inside_attn_wrapper"
OVERRIDE_KEY = "optimized_attention_override"


def wrap_attn(func: Callable) -> Callable:
    """Decorate a backend with ComfyUI's override dispatch (one slot, kwarg recursion guard)."""

    @functools.wraps(func)
    def dispatch(*args, **kwargs):
        added_guard = False
        try:
            if GUARD not in kwargs:
                added_guard = True
                kwargs[GUARD] = True
                options = kwargs.get("transformer_options")
                if options is not None and OVERRIDE_KEY in options:
                    return options[OVERRIDE_KEY](func, *args, **kwargs)
            return func(*args, **kwargs)
        finally:
            if added_guard:
                kwargs.pop(GUARD, None)

    return dispatch


# ----------------------------------------------------------------------------- layout helpers
def to_heads(q, k, v, heads, skip_reshape):
    """Return q, k, v as ``(B, H, L, D)`` plus ``(B, H, D)``."""
    if skip_reshape:
        b, h, _, d = q.shape
        return q, k, v, b, h, d
    b = q.shape[0]
    d = q.shape[-1] // heads

    def split(t):
        return t.reshape(b, -1, heads, d).transpose(1, 2)

    return split(q), split(k), split(v), b, heads, d


def from_heads(out, skip_output_reshape):
    if skip_output_reshape:
        return out
    b, h, lq, d = out.shape
    return out.transpose(1, 2).reshape(b, lq, h * d)


def expand_mask(mask, dtype):
    """Bring a mask to ``(B|1, H|1, Lq, Lk)``; boolean masks become additive."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    if mask.ndim == 2:
        mask = mask[None, None]
    elif mask.ndim == 3:
        mask = mask[:, None]
    return mask.to(dtype)


# ----------------------------------------------------------------------------- backends
QUERY_CHUNK = 64

@wrap_attn
def attention_pytorch(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
                      skip_output_reshape=False, **kwargs):
    """Exact reference: ``torch.nn.functional.scaled_dot_product_attention``."""
    q, k, v, _, _, _ = to_heads(q, k, v, heads, skip_reshape)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=expand_mask(mask, q.dtype))
    return from_heads(out, skip_output_reshape)


@wrap_attn
def attention_sub_quad(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
                       skip_output_reshape=False, **kwargs):
    """Same maths, computed differently: explicit fp32 softmax, chunked over queries.

    Named like ComfyUI's CPU default backend so traces from the fake and the real thing agree.
    """
    q, k, v, b, h, d = to_heads(q, k, v, heads, skip_reshape)
    mask = expand_mask(mask, torch.float32)
    scale = 1.0 / math.sqrt(d)
    lq = q.shape[2]
    query_chunk = QUERY_CHUNK
    out = torch.empty(b, h, lq, v.shape[-1], dtype=q.dtype, device=q.device)
    for s in range(0, lq, query_chunk):
        e = min(lq, s + query_chunk)
        logits = torch.matmul(q[:, :, s:e].float(), k.float().transpose(-1, -2)) * scale
        if mask is not None:
            logits = logits + (mask[..., s:e, :] if mask.shape[-2] == lq else mask)
        probs = torch.softmax(logits, dim=-1)
        out[:, :, s:e] = torch.matmul(probs, v.float()).to(q.dtype)
    return from_heads(out, skip_output_reshape)


@wrap_attn
def attention_split(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
                    skip_output_reshape=False, **kwargs):
    """Explicit softmax, one head at a time (a third way to compute the same thing)."""
    q, k, v, b, h, d = to_heads(q, k, v, heads, skip_reshape)
    mask = expand_mask(mask, q.dtype)
    outs = []
    for i in range(h):
        logits = torch.matmul(q[:, i], k[:, i].transpose(-1, -2)) / math.sqrt(d)
        if mask is not None:
            logits = logits + mask[:, min(i, mask.shape[1] - 1)]
        outs.append(torch.matmul(torch.softmax(logits, dim=-1), v[:, i]))
    return from_heads(torch.stack(outs, dim=1), skip_output_reshape)


@wrap_attn
def attention_basic(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
                    skip_output_reshape=False, **kwargs):
    """Explicit softmax over the whole sequence at once."""
    q, k, v, b, h, d = to_heads(q, k, v, heads, skip_reshape)
    logits = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(d)
    mask = expand_mask(mask, q.dtype)
    if mask is not None:
        logits = logits + mask
    return from_heads(torch.matmul(torch.softmax(logits, dim=-1), v), skip_output_reshape)


# ----------------------------------------------------------------------------- registry
REGISTERED_ATTENTION_FUNCTIONS: dict[str, Callable] = {}


def register_attention_function(name: str, func: Callable) -> None:
    """First registration wins (like ComfyUI)."""
    REGISTERED_ATTENTION_FUNCTIONS.setdefault(name, func)


register_attention_function("pytorch", attention_pytorch)
register_attention_function("sub_quad", attention_sub_quad)
register_attention_function("split", attention_split)

#: the backend ComfyUI picks on a CPU-only install
optimized_attention = attention_sub_quad
optimized_attention_masked = optimized_attention


def get_attention_function(name: str, default: Any = ...) -> Callable:
    """``"optimized"`` -> the default backend; unknown -> ``KeyError`` unless ``default`` given."""
    if name == "optimized":
        return optimized_attention
    if name in REGISTERED_ATTENTION_FUNCTIONS:
        return REGISTERED_ATTENTION_FUNCTIONS[name]
    if default is ...:
        raise KeyError(f"Attention function {name} not found.")
    return default
