"""Attention-entropy scaling (Jin et al., NeurIPS 2023, arXiv 2306.08645).

Self-attention logits are multiplied by ``λ = sqrt(ln N / ln T)`` per layer, where N is the key count
of the call and T the key count the same layer has at the training resolution. Passed to the kernel as
``scale = λ/√d`` (hosts whose backend takes no scale fold it into q, i.e. ``q·λ``); cross-attention is never touched, and at N == T the
call passes through untouched (bit-exact). `strength` s generalises the exponent, ``λ = (ln N / ln T)^(s/2)``:
s = 1 is the paper, s = 0 is off.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

from .call import AttentionCall, Site
from .effects import Attend, Effect
from .params import choice, number, pixel_size
from .tracing import compiling

TOKEN_COUNTS = ("joint", "image")


def entropy_lambda(n: int, t: int, strength: float = 1.0) -> float:
    """λ = (ln n / ln t)^(strength/2); 1.0 when n == t. Key counts below 2 are clamped to 2 so ln > 0."""
    n, t = max(int(n), 2), max(int(t), 2)
    if n == t or strength == 0:
        return 1.0
    return (math.log(n) / math.log(t)) ** (0.5 * strength)


def _size3(size, name: str = "train_size") -> Optional[tuple[int, int, int]]:
    """None, or a pixel size (an int, (height, width) or (frames, height, width)) as (frames, height, width)."""
    if size is None:
        return None
    size = pixel_size(name, size)
    return size if len(size) == 3 else (1,) + size


class EntropyScaling(Effect):
    """Scale self/joint attention logits so attention entropy stays near its training value.

    strength:    exponent multiplier s in λ = (ln N / ln T)^(s/2); 1 = the paper, 0 = off. Range [0, 4].
    train_size:  training resolution in pixels, an int, (height, width) or (frames, height, width);
                 None = the model's native size as reported by the host (diffusers config / ComfyUI family).
    token_count: "joint" (default) counts every key of the call, text included, for joint/single
                 attention (SD3, FLUX); "image" counts image tokens only (text keys still attended).
    """

    stage = "scale"
    name = "entropy_scaling"

    def __init__(self, strength: float = 1.0, train_size=None, token_count: str = "joint"):
        self.strength = number("strength", strength, 0.0, 4.0)
        self.train_size = _size3(train_size)
        self.token_count = choice("token_count", token_count, TOKEN_COUNTS)
        self.last_lambda: dict[str, float] = {}  # site name -> λ of its latest call (for reports)
        self._cache: dict = {}  # (key count, id(layout)) -> (layout, λ); hosts reuse layout objects
        self.validate()

    def validate(self) -> None:
        number("strength", self.strength, 0.0, 4.0)
        choice("token_count", self.token_count, TOKEN_COUNTS)

    def check_model(self, family: str, token_scale) -> None:
        if self.train_size is None or token_scale is None:
            return
        frames, height, width = self.train_size
        st, sh, sw = token_scale
        if height % sh or width % sw or (frames - 1) % st:
            raise ValueError(
                f"train_size {self.train_size[1:] if frames == 1 else self.train_size} does not fall on this "
                f"{family} model's token grid: height and width must be multiples of {sh} pixels"
                + (f" and frames of the form 1 + {st}k" if st > 1 else "")
            )

    def applies(self, site: Site) -> bool:
        return site.kind != "cross" and self.strength != 0.0

    def counts(self, call: AttentionCall) -> tuple[int, int]:
        """(N, T) for this call: current and training-resolution key counts."""
        tokens = call.tokens
        if tokens.grid is None or tokens.k_image is None:
            raise ValueError(f"entropy scaling needs the image token grid at {call.site.name or call.site}")
        train_grid = tokens.grid_for(self.train_size) if self.train_size else tokens.native_grid
        if train_grid is None:
            raise ValueError("entropy scaling needs a training size: pass train_size=(height, width)")
        t_image = math.prod(train_grid)
        if self.token_count == "image":
            return tokens.k_image.stop - tokens.k_image.start, t_image
        n = call.kv_len
        return n, n - tokens.image_tokens + t_image

    def lam(self, call: AttentionCall) -> float:
        if compiling():  # plain Python on the call's static shapes: traced once, nothing left at runtime
            return entropy_lambda(*self.counts(call), self.strength)
        key = (call.kv_len, id(call.tokens))
        hit = self._cache.get(key)
        if hit is not None and hit[0] is call.tokens:
            return hit[1]
        n, t = self.counts(call)
        lam = entropy_lambda(n, t, self.strength)
        if len(self._cache) > 4096:
            self._cache.clear()
        self._cache[key] = (call.tokens, lam)
        return lam

    def __call__(self, call: AttentionCall, attend: Attend):
        lam = self.lam(call)
        if not compiling():  # a report for eager runs; a compiled graph would replay the store every call
            self.last_lambda[call.site.name] = lam
        if lam == 1.0:
            return attend(call.q, call.k, call.v)
        # softmax(λ·qkᵀ·s) == softmax(qkᵀ·(λ·s)): a scale costs no extra pass over q where the kernel takes one
        return attend(call.q, call.k, call.v, scale=lam * call.default_scale())

    def __deepcopy__(self, memo):  # ComfyUI deep-copies model_options on clone: copy settings, not caches
        return EntropyScaling(self.strength, self.train_size, self.token_count)

    def __repr__(self) -> str:
        return f"EntropyScaling(strength={self.strength}, train_size={self.train_size}, token_count={self.token_count!r})"


def lambda_table(train_tokens: Sequence[int], tokens: Sequence[int], strength: float = 1.0) -> list[list[float]]:
    """λ for every (T, N) pair; handy for docs and tests."""
    return [[entropy_lambda(n, t, strength) for n in tokens] for t in train_tokens]
