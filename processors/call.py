"""The attention call as data: what an effect may read about one attention invocation.

Everything here is framework-free. The two hosts (diffusers, ComfyUI) build an `AttentionCall`
from their own attention code; effects only ever see this object.

Canonical layout: q, k, v are ``[B, H, N, D]`` (batch, heads, tokens, head dim), after the
projections, QK-norm and RoPE, exactly as the model would hand them to its attention kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

import torch

FAMILIES = ("unet", "sd3", "flux", "pixart", "wan")
KINDS = ("self", "cross", "joint", "single")

#: Row roles a host or pipeline may assign. Effects select rows by role, never by position.
ROLES = ("cond", "uncond", "perturbed", "redirected", "reference", "target", "window", "full", "other")


@dataclass(frozen=True)
class Site:
    """Where in the model an attention call happens.

    family: "unet" | "sd3" | "flux" | "pixart" | "wan".
    kind:   "self" (image self-attention), "cross" (image queries, text keys),
            "joint" (text+image concatenated, two streams: SD3, FLUX double blocks),
            "single" (text+image as one fused stream: FLUX single blocks).
    layer:  one global index per model, documented per family in docs/addressing.md
            (UNet: transformer block in execution order down -> mid -> up, attn1 and attn2 share it;
            FLUX: double blocks 0..D-1 then single blocks D..D+S-1; SD3/PixArt/Wan: block index).
    name:   module path inside the denoiser, e.g. "down_blocks.1.attentions.0.transformer_blocks.0.attn1".
    """

    family: str
    kind: str
    layer: int
    name: str = ""

    @property
    def is_cross(self) -> bool:
        return self.kind == "cross"


@dataclass(frozen=True)
class TokenLayout:
    """Which token positions along the query / key axes are text and which are image.

    Spans are Python slices over the sequence axis. `grid` is the image span's token grid
    ``(frames, rows, cols)`` in raster order, frame-major (row-major inside a frame).
    `scale` is how many input pixels (and input frames) one token covers along each grid axis at
    this layer, so an effect can work out the grid the same layer has at another resolution
    (see `grid_for`). `native_grid` is the grid at the model's native (training) resolution.
    `text_segments` optionally names sub-spans of the text span, relative to its start
    (e.g. SD3: {"clip": slice(0, 77), "t5": slice(77, 333)}).
    """

    q_image: Optional[slice] = None
    q_text: Optional[slice] = None
    k_image: Optional[slice] = None
    k_text: Optional[slice] = None
    grid: Optional[tuple[int, int, int]] = None
    scale: Optional[tuple[int, int, int]] = None
    native_grid: Optional[tuple[int, int, int]] = None
    text_first: bool = False
    text_segments: Mapping[str, slice] = field(default_factory=dict)

    @property
    def image_tokens(self) -> int:
        return math.prod(self.grid) if self.grid is not None else 0

    @property
    def text_tokens(self) -> int:
        span = self.k_text if self.k_text is not None else self.q_text
        return 0 if span is None else span.stop - span.start

    @classmethod
    def at(cls, grid, scale, native_size, **spans) -> "TokenLayout":
        """A layout with image grid `grid`, `scale` pixels per token and the grid this layer has at the
        model's native size (frames, height, width) in pixels."""
        native = cls(scale=scale).grid_for(native_size) if scale is not None else None
        return cls(grid=grid, scale=scale, native_grid=native, **spans)

    def grid_for(self, size: Sequence[int]) -> tuple[int, int, int]:
        """Token grid of this layer for an input of ``size`` = (frames, height, width) pixels.

        Frames follow the causal-VAE rule ``(F - 1) // st + 1`` (st = 1 for images, so 1 frame -> 1);
        spatial axes round up like strided convolutions and padded patchifiers do.
        """
        if self.scale is None:
            raise ValueError("this call carries no pixel scale; the host could not tell the token grid")
        frames, height, width = size
        st, sh, sw = self.scale
        return ((frames - 1) // st + 1, -(-height // sh), -(-width // sw))


def unet_level(height: int, width: int, n_tokens: int) -> Optional[tuple[int, int, int]]:
    """(rows, cols, level) of the UNet resolution level that has `n_tokens` tokens, for a latent of
    height × width cells; each level halves, rounding up like a stride-2 convolution. None if none does."""
    h, w, level = height, width, 0
    while h * w > n_tokens:
        h, w, level = -(-h // 2), -(-w // 2), level + 1
    return (h, w, level) if h * w == n_tokens else None


def fold_scale_into_q(q: torch.Tensor, scale: Optional[float]) -> torch.Tensor:
    """For kernels that take no softmax scale: softmax(q·kᵀ·scale) == softmax((q·scale·√d)·kᵀ/√d)."""
    return q if scale is None else q * (scale * q.shape[-1] ** 0.5)


@dataclass(frozen=True)
class StepInfo:
    """Where the sampler is. Any field may be None when the host cannot know it.

    index/count: position in the scheduler's full schedule (so `progress` is comparable across
    strengths); first: the index of the first step this run executes (img2img/inpaint runs start
    part-way, at index > 0), so `executed` counts the run's own steps from 0.

    Under torch.compile the fields that change every step (index, sigma, timestep) are 0-d tensors, so
    a compiled graph takes them as inputs instead of recompiling per step; effects that read them use
    tensor arithmetic (`torch.where`, not `if`) so one code path serves both (see docs/performance.md).
    """

    index: Optional[int] = None
    count: Optional[int] = None
    sigma: Optional[float] = None
    timestep: Optional[float] = None
    first: Optional[int] = None

    @property
    def executed(self) -> Optional[int]:
        """Steps this run has executed before this one (index − first)."""
        if self.index is None:
            return None
        return self.index - (self.first or 0)

    @property
    def progress(self) -> Optional[float]:
        """Fraction of the schedule done before this step, in [0, 1)."""
        if self.index is None or not self.count:
            return None
        return self.index / self.count


def select(cond, a, b):
    """``a if cond else b`` for a Python bool, or elementwise for a bool tensor (a step-dependent condition
    under torch.compile, where a Python `if` on it would break the graph)."""
    if torch.is_tensor(cond):
        return torch.where(cond, a, b)
    return a if cond else b


class RopeInfo:
    """The rotary embedding that was already applied to q and k (canonical layout, sequence dim 2).

    cos, sin: ``[N, D]`` tables for the call's token sequence.
    rotate(x, cos, sin): the model's own rotation, applied to an ``[B, H, N, D]`` tensor.
    embed(ids): optional, position ids ``[N, axes]`` -> (cos, sin), for rotations to other positions.
    RoPE is a rotation, so rotating an already rotated tensor by the tables of an offset Δ equals RoPE
    at position p + Δ, and rotating by (cos, -sin) undoes it.
    """

    __slots__ = ("cos", "sin", "rotate", "embed")

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor,
                 rotate: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                 embed: Optional[Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]] = None):
        self.cos, self.sin, self.rotate, self.embed = cos, sin, rotate, embed

    def undo(self, x: torch.Tensor, span: slice = slice(None)) -> torch.Tensor:
        """Remove the rotation from the tokens `x` (which sit at sequence positions `span`)."""
        return self.rotate(x, self.cos[span], -self.sin[span])

    def shift(self, x: torch.Tensor, delta_ids: torch.Tensor) -> torch.Tensor:
        """Rotate already-rotated tokens further, as if their positions moved by `delta_ids` ([N, axes])."""
        if self.embed is None:
            raise ValueError("this model's RoPE cannot be re-embedded at new positions")
        cos, sin = self.embed(delta_ids)
        return self.rotate(x, cos.to(x.device), sin.to(x.device))


@dataclass(frozen=True)
class HeadShard:
    """The call holds heads ``offset … offset + count − 1`` of the site's `total` heads; the others are on other
    processes (the diffusers host under context parallelism hands each process the whole sequence with a slice
    of the heads). `mean(x)` averages a tensor of the same shape over those processes (a collective: every
    process must call it, in the same order)."""

    offset: int
    total: int
    mean: Callable[[torch.Tensor], torch.Tensor]


class AttentionCall:
    """One attention invocation. Treat it as immutable: effects derive modified calls with `replace`.

    (A slotted class rather than a frozen dataclass: hosts build one per attention call and effects
    derive new ones, so construction and `replace` sit on the hot path.)

    `step` and `roles` may be given as they are or as a source (an object with ``current_step()`` and
    ``current_roles(batch)``, e.g. the diffusers host's run state), which is asked only when an effect reads
    them: finding the step costs a device sync in eager mode, and under torch.compile every value read
    becomes a guard (roles differ between a pipeline's cond and uncond forwards), so calls whose effects
    never look at them pay nothing and compile once.

    `shard` is None unless the call holds only some of the site's heads (`HeadShard`); effects that address
    heads by number use `heads_total` and `local_heads`, and reductions over heads use `mean_over_heads`.
    """

    __slots__ = ("q", "k", "v", "site", "tokens", "_roles", "_step", "mask", "scale", "rope", "shard")

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, site: Site,
                 tokens: Optional[TokenLayout] = None, roles: Optional[tuple[str, ...]] = None,
                 step=None, mask: Optional[torch.Tensor] = None,
                 scale: Optional[float] = None, rope: Optional[RopeInfo] = None,
                 shard: Optional[HeadShard] = None):
        self.q, self.k, self.v, self.site = q, k, v, site
        self.tokens = _EMPTY_LAYOUT if tokens is None else tokens
        self._roles = roles
        self._step = _EMPTY_STEP if step is None else step
        self.mask, self.scale, self.rope = mask, scale, rope
        self.shard = shard

    @property
    def step(self) -> StepInfo:
        step = self._step
        if type(step) is StepInfo or not hasattr(step, "current_step"):
            return step
        return step.current_step()

    @property
    def roles(self) -> Optional[tuple[str, ...]]:
        roles = self._roles
        if roles is None or type(roles) is tuple or not hasattr(roles, "current_roles"):
            return roles
        return roles.current_roles(self.q.shape[0])

    def replace(self, **changes) -> "AttentionCall":
        new = object.__new__(AttentionCall)
        pop = changes.pop
        new.q, new.k, new.v = pop("q", self.q), pop("k", self.k), pop("v", self.v)
        new.site, new.tokens = pop("site", self.site), pop("tokens", self.tokens)
        new._roles, new._step = pop("roles", self._roles), pop("step", self._step)
        new.mask, new.scale, new.rope = pop("mask", self.mask), pop("scale", self.scale), pop("rope", self.rope)
        new.shard = pop("shard", self.shard)
        if changes:
            raise TypeError(f"AttentionCall has no field(s) {sorted(changes)}")
        return new

    def __repr__(self) -> str:
        return (f"AttentionCall(site={self.site}, q={tuple(self.q.shape)}, k={tuple(self.k.shape)}, "
                f"roles={self.roles}, step={self.step}, mask={None if self.mask is None else tuple(self.mask.shape)}, "
                f"scale={self.scale})")

    @property
    def batch(self) -> int:
        return self.q.shape[0]

    @property
    def heads(self) -> int:
        return self.q.shape[1]

    @property
    def heads_total(self) -> int:
        """The site's number of heads (more than `heads` when the call holds a `HeadShard`)."""
        return self.heads if self.shard is None else self.shard.total

    def local_heads(self, heads: Sequence[int]) -> list[int]:
        """Positions in this call of the site's heads `heads` (global head numbers); heads held elsewhere are left out."""
        if self.shard is None:
            return list(heads)
        first, n = self.shard.offset, self.heads
        return [h - first for h in heads if first <= h < first + n]

    def mean_over_heads(self, x: torch.Tensor) -> torch.Tensor:
        """`x`, a mean over this call's heads, as the mean over all the site's heads."""
        return x if self.shard is None else self.shard.mean(x)

    @property
    def head_dim(self) -> int:
        return self.q.shape[-1]

    @property
    def q_len(self) -> int:
        return self.q.shape[-2]

    @property
    def kv_len(self) -> int:
        return self.k.shape[-2]

    def rows_with(self, *roles: str) -> list[int]:
        """Batch rows whose role is one of `roles` (all rows count as "cond" when roles are unknown)."""
        row_roles = self.roles if self.roles is not None else ("cond",) * self.batch
        return [i for i, r in enumerate(row_roles) if r in roles]

    def default_scale(self) -> float:
        return self.scale if self.scale is not None else self.head_dim ** -0.5


_EMPTY_LAYOUT = TokenLayout()
_EMPTY_STEP = StepInfo()
