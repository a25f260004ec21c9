"""The ComfyUI attention override: turns one `optimized_attention` call into an AttentionCall and runs
the effect stack, with the next attention down (a foreign override installed before ours, or the
backend ComfyUI chose) as the kernel.

ComfyUI calls an override as ``override(func, q, k, v, heads, mask=None, attn_precision=None,
skip_reshape=False, skip_output_reshape=False, **kwargs)``; `heads` and `mask` come positionally or
as keywords depending on the model, and q/k/v are ``[B, L, H·D]`` (v may be ``[B, L, H, D]``) or, with
`skip_reshape`, ``[B, H, L, D]``. Calls at sites with no applicable effect are handed on unchanged.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch

from ..call import AttentionCall, fold_scale_into_q
from .context import CONTEXT_KEY, CallContext

_POSITIONAL = ("q", "k", "v", "heads", "mask", "attn_precision", "skip_reshape", "skip_output_reshape")


def _as_kwargs(args, kwargs) -> dict:
    bound = dict(zip(_POSITIONAL, args))
    bound.update(kwargs)
    return bound


def _to_canonical(x: torch.Tensor, heads: int, skip_reshape: bool) -> torch.Tensor:
    if skip_reshape:
        return x
    if x.ndim == 4:
        return x.transpose(1, 2)  # [B, L, H, D]: SD3 hands v over unflattened
    return x.reshape(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


def _canonical_mask(mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if mask is None or mask.ndim == 4:
        return mask
    return mask[None, None] if mask.ndim == 2 else mask[:, None]


def _flat(x: torch.Tensor) -> torch.Tensor:
    """[B, H, N, D] -> ComfyUI's [B, N, H·D]."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


class AttentionAdapter:
    """One intercepted attention call: its canonical tensors, and the way back to ComfyUI's layout."""

    def __init__(self, nxt: Callable, args, kwargs, call: dict):
        """`call` is `args`/`kwargs` bound to the backend's parameter names."""
        self.nxt, self.args, self.kwargs = nxt, args, kwargs
        self.heads = int(call["heads"])
        self.skip_reshape = bool(call.get("skip_reshape", False))
        self.skip_output = bool(call.get("skip_output_reshape", False))
        self.q = _to_canonical(call["q"], self.heads, self.skip_reshape)
        self.k = _to_canonical(call["k"], self.heads, self.skip_reshape)
        self.v = _to_canonical(call["v"], self.heads, self.skip_reshape)
        self.mask = _canonical_mask(call.get("mask"))
        self.extra = {k: v for k, v in call.items() if k not in _POSITIONAL}
        self.attn_precision = call.get("attn_precision")

    def kernel(self, q, k, v, mask, scale) -> torch.Tensor:
        """Attention below the effects, in the canonical layout."""
        if q is self.q and k is self.k and v is self.v and mask is self.mask and scale is None:
            out = self.nxt(*self.args, **self.kwargs)  # untouched: the exact original call
            if self.skip_output:
                return out
            return out.reshape(out.shape[0], out.shape[1], self.heads, -1).transpose(1, 2)
        q = fold_scale_into_q(q, scale)
        if mask is not None and mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
        return self.nxt(q, k, v, self.heads, mask=mask, attn_precision=self.attn_precision,
                        skip_reshape=True, skip_output_reshape=True, **self.extra)

    def finish(self, out: torch.Tensor) -> torch.Tensor:
        return out if self.skip_output else _flat(out)


class Dispatcher:
    """Installed as `optimized_attention_override` for one model call; chains to `previous`."""

    def __init__(self, ctx: CallContext, previous: Optional[Callable] = None):
        self.ctx = ctx
        self.previous = previous

    def __call__(self, func, *args, **kwargs):
        ctx = self.ctx
        ctx.calls += 1
        nxt = functools.partial(self.previous, func) if self.previous is not None else func
        call = _as_kwargs(args, kwargs)
        q, k = call["q"], call["k"]
        n_q, n_k = (q.shape[2], k.shape[2]) if call.get("skip_reshape") else (q.shape[1], k.shape[1])
        site, layout = ctx.resolve(n_q, n_k, kwargs.get("transformer_options") or ctx.options)
        stack = ctx.stack_for(site) if site is not None else None
        if not stack:
            return nxt(*args, **kwargs)
        adapter = AttentionAdapter(nxt, args, kwargs, call)
        roles = ctx.roles if len(ctx.roles) == adapter.q.shape[0] else None
        attention = AttentionCall(adapter.q, adapter.k, adapter.v, site, layout(), roles, ctx, adapter.mask)
        return adapter.finish(stack.run(attention, adapter.kernel))


class ChainedReplace:
    """UNet fallback where the override is not reached: an attn1/attn2 *replace* patch that runs the
    effects with the replaced function (another node's replace, or ComfyUI's attention) as the kernel.

    ComfyUI calls a replace as ``patch(q, k, v, extra_options)`` with ``[B, L, H·D]`` tensors and
    expects ``[B, L, H·D]`` back.
    """

    def __init__(self, kind: str, previous: Optional[Callable] = None, attention: Optional[Callable] = None):
        self.kind = kind
        self.previous = previous
        self.attention = attention

    def _base(self, q, k, v, extra_options):
        if self.previous is not None:
            return self.previous(q, k, v, extra_options)
        return self.attention(q, k, v, extra_options["n_heads"], attn_precision=extra_options.get("attn_precision"))

    def __call__(self, q, k, v, extra_options):
        ctx: Optional[CallContext] = extra_options.get(CONTEXT_KEY)
        if ctx is None or not ctx.effects:
            return self._base(q, k, v, extra_options)
        ctx.calls += 1
        ctx.pending = (self.kind, extra_options.get("block"), extra_options.get("block_index"))
        site, layout = ctx.resolve(q.shape[1], k.shape[1], extra_options)
        stack = ctx.stack_for(site) if site is not None else None
        if not stack:
            return self._base(q, k, v, extra_options)
        heads = int(extra_options["n_heads"])
        qc, kc, vc = (_to_canonical(x, heads, False) for x in (q, k, v))

        def kernel(q2, k2, v2, mask, scale):
            if mask is not None:
                raise NotImplementedError(
                    f"{site.name} is replaced by another node; attnlab cannot pass an attention mask through it"
                )
            q2 = fold_scale_into_q(q2, scale)
            src = (q, k, v) if (q2 is qc and k2 is kc and v2 is vc) else (_flat(q2), _flat(k2), _flat(v2))
            return _to_canonical(self._base(*src, extra_options), heads, False)

        roles = ctx.roles if len(ctx.roles) == q.shape[0] else None
        out = stack.run(AttentionCall(qc, kc, vc, site, layout(), roles, ctx), kernel)
        return _flat(out)
