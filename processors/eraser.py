"""Attentive Eraser (AAS + SARG, AAAI 2025, arXiv 2412.12974): object removal by self-attention redirection.

AAS acts on self-attention of the rows whose role is "redirected" (the extra pass of SARG guidance):
every query is barred from the object keys, and during the first steps the object queries' logits are
multiplied by `ss_scale` λ (similarity suppression):

    O_i = Σ_j softmax_j(s_i·q_i·k_j/√d + b_j)·v_j      b_j = −∞ on object keys, s_i = λ on object queries

computed as one call of the host's kernel on the *gathered* background keys (no N×N map, no mask, so fast
kernels still apply); `kernel="bias"` passes a 0/−∞ key bias instead. A layer whose token mask covers every
image token (or none) is left unchanged. In joint attention (SD3, FLUX) text keys stay open; text queries
are barred from the object keys too unless `mask_text_queries=False`.

SARG: ε̃ = ε + s(ε_AAS − ε) (s = 9 for SD models), i.e. perturbation guidance with w = −s; the hosts' extra
pass machinery runs it (`pipelines/eraser.py`, the ComfyUI node).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .call import AttentionCall, Site, TokenLayout, select
from .effects import Attend, Effect
from .headsets import HeadSet
from .params import InvalidParameter, ParameterTypeError, boolean, choice, integer, number
from .tracing import compiling

REDIRECTED = "redirected"
KERNELS = ("gather", "bias")
MAX_STEPS = 10_000
#: mask growth beyond which a disk covers any image attnlab accepts (params.MAX_PIXELS · √2)
MAX_DILATE_PX = 23_200.0


# --- masks ------------------------------------------------------------------------------------------
def as_mask_tensor(mask) -> torch.Tensor:
    """A user mask (PIL image, ndarray or tensor; (H, W), (H, W, C) with C in 1/3/4 and H > 4 (first channel),
    (B, H, W) as ComfyUI's MASK, (B, 1, H, W); bool, int or float; 1/True/white = remove) as a float tensor
    [B, 1, H, W] with values in {0, 1}. Integer masks with values above 1 are 8-bit images (255 = remove);
    values are thresholded at 0.5 (anti-aliased edges count as object from half coverage)."""
    if mask is None:
        raise InvalidParameter("mask is missing: Attentive Eraser needs a mask (1 / white = object to remove)")
    if hasattr(mask, "convert") and hasattr(mask, "size"):  # PIL
        mask = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
    if isinstance(mask, np.ndarray):
        if mask.dtype.kind not in "biuf":
            raise ParameterTypeError(f"mask must be boolean or numeric, got an array of dtype {mask.dtype}")
        mask = torch.from_numpy(np.ascontiguousarray(mask))
    if not torch.is_tensor(mask):
        raise ParameterTypeError(f"mask must be a PIL image, numpy array or torch tensor, got {type(mask).__name__}")
    if mask.is_complex():
        raise ParameterTypeError("mask must be real-valued, not complex")
    m = mask.detach().float()
    if not mask.is_floating_point() and mask.dtype != torch.bool and m.numel() and m.max() > 1:
        m = m / 255.0  # an 8-bit image: white (255) = remove
    if m.ndim == 3 and m.shape[-1] in (1, 3, 4) and m.shape[0] > 4:  # (H, W, C); else (B, H, W) as ComfyUI's MASK
        m = m[..., :1].permute(2, 0, 1)
    if m.ndim == 2:
        m = m[None, None]
    elif m.ndim == 3:
        m = m[:, None] if m.shape[0] != 1 else m[None]
    if m.ndim != 4 or m.shape[1] != 1:
        raise InvalidParameter(f"mask must be (H, W), (H, W, C), (1, H, W) or (B, 1, H, W); got shape {tuple(mask.shape)}")
    if not torch.isfinite(m).all():
        raise InvalidParameter("mask contains NaN or infinite values")
    if m.shape[-1] < 2 or m.shape[-2] < 2:
        raise InvalidParameter(f"mask is too small ({m.shape[-2]}x{m.shape[-1]} pixels)")
    return (m >= 0.5).float()


def dilate(mask: torch.Tensor, dilate_px: float) -> torch.Tensor:
    """Grow the mask by `dilate_px` pixels in every direction (a disk). The official code blurs and
    thresholds at 0.1 instead, which grows large objects by about as much (≈ 1.28σ) but can shrink or
    erase thin ones; a disk never loses an object pixel.

    The disk is the union of its rows: row dy of the disk is a horizontal run of half-width
    w(dy) = ⌊√(r² − dy²)⌋, and a horizontal run is a window sum of prefix sums, so the cost is O(r·H·W), not
    the O(r²·H·W) of a 2-D convolution; r beyond the image diagonal changes nothing and is clipped."""
    h, w = mask.shape[-2:]
    radius = min(float(dilate_px), math.hypot(h, w) + 1.0)
    r = int(math.floor(radius))
    if r <= 0:
        return mask
    if radius >= math.hypot(h - 1, w - 1):  # the disk reaches every pixel from any object pixel
        return (mask > 0.5).flatten(1).any(1).view(-1, 1, 1, 1).expand(mask.shape).float()
    rows = F.pad((mask > 0.5).float(), (1, 0)).cumsum(-1)  # [B, 1, H, W + 1] prefix sums along each row
    cols = torch.arange(w, device=mask.device)
    out = torch.zeros(mask.shape, dtype=torch.bool, device=mask.device)
    r2 = radius * radius
    for dy in range(-min(r, h - 1), min(r, h - 1) + 1):
        half = math.isqrt(int(r2 - dy * dy))
        while (half + 1) ** 2 + dy * dy <= r2:
            half += 1
        while half > 0 and half * half + dy * dy > r2:
            half -= 1
        hi = (cols + half + 1).clamp(max=w)
        lo = (cols - half).clamp(min=0)
        run = (rows[..., hi] - rows[..., lo]) > 0  # any object pixel within `half` columns
        # output row y takes the run of input row y + dy
        if dy >= 0:
            out[..., : h - dy, :] |= run[..., dy:, :]
        else:
            out[..., -dy:, :] |= run[..., : h + dy, :]
    return out.float()


def token_mask(mask: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """Object tokens of a (frames, rows, cols) grid, raster order frame-major: a token is object if any of
    its pixels is (adaptive max-pooling, any aspect ratio). Returns bool [B, frames·rows·cols]."""
    t, h, w = grid
    pooled = F.adaptive_max_pool2d(mask, (h, w)) > 0.5  # [B, 1, h, w]
    return pooled.flatten(1).repeat(1, t)


def layer_set(name: str, layers) -> HeadSet:
    """Layers as a HeadSet (every head): head-set text ("L34-69", "u0-8"), a HeadSet, or layer numbers."""
    if isinstance(layers, HeadSet):
        chosen = layers
    elif isinstance(layers, str):
        chosen = HeadSet.of(layers)
    elif isinstance(layers, (list, tuple, set, frozenset, range)):
        chosen = HeadSet.of({integer(f"{name} entry", x, 0): "*" for x in layers})
    else:
        raise ParameterTypeError(f"{name} must be head-set text such as 'L34-69' / 'u0-8', or a list of layer "
                                 f"numbers; got {layers!r} ({type(layers).__name__})")
    if not chosen:
        raise InvalidParameter(f"{name} is empty ({layers!r}): name at least one layer, or pass None for the "
                               "default layers")
    return chosen


# --- the effect -------------------------------------------------------------------------------------
class AttentiveEraser(Effect):
    """AAS on the rows whose role is "redirected".

    mask: the object mask (see `as_mask_tensor`), at any resolution and aspect ratio; one mask for all rows
        (or one per redirected row). dilate_px: disk dilation in mask pixels (the official blur-and-threshold
        grows masks by ≈ 2–3 px at 512², ≈ 15 px at 1024²).
    ss_scale: λ for object queries (1 = no similarity suppression). ss_steps: λ applies while the step index
        (`StepInfo.executed`: counted from the run's first executed step) is ≤ ss_steps (official 9, i.e. 10
        steps). start_step: AAS from this executed step on.
    layers: which layers (head-set text such as "L34-69" or "u0-8", or layer numbers); default: UNet up-block
        self-attention (the official SD 7–15 / SDXL 34–69); DiTs (experimental): FLUX single blocks, SD3,
        PixArt and Wan the second half of their blocks.
    mask_text_queries: in joint attention also bar text queries from the object keys (default True).
    kernel: "gather" (drop the object keys; default) or "bias" (0/−∞ key bias).
    """

    stage = "mask"
    name = "attentive_eraser"

    def __init__(self, mask, ss_scale: float = 0.3, ss_steps: int = 9, start_step: int = 0, layers=None,
                 dilate_px: float = 0.0, mask_text_queries: bool = True, kernel: str = "gather"):
        self.ss_scale = number("ss_scale", ss_scale, 0.0, 1.0, low_open=True)
        self.ss_steps = integer("ss_steps", ss_steps, -1, MAX_STEPS)
        self.start_step = integer("start_step", start_step, 0, MAX_STEPS)
        self.layers = None if layers is None else layer_set("layers", layers)
        self.dilate_px = number("dilate_px", dilate_px, 0.0, MAX_DILATE_PX)
        self.mask_text_queries = boolean("mask_text_queries", mask_text_queries)
        self.kernel = choice("kernel", kernel, KERNELS)
        self.mask = dilate(as_mask_tensor(mask), self.dilate_px)
        self._layers: Optional[frozenset] = None
        self._plans: dict = {}  # (grid, device) -> _Plan

    def __repr__(self) -> str:
        return (f"AttentiveEraser(mask={tuple(self.mask.shape)}, ss_scale={self.ss_scale}, ss_steps={self.ss_steps}, "
                f"layers={None if self.layers is None else str(self.layers)!r}, kernel={self.kernel!r})")

    def __deepcopy__(self, memo):  # ComfyUI deep-copies model_options on clone; the effect is immutable in use
        return self

    # --- validation ---------------------------------------------------------------------------------
    def validate(self) -> None:
        """Every setting is checked as it is set (`__init__`); a changed attribute is checked again here."""
        number("ss_scale", self.ss_scale, 0.0, 1.0, low_open=True)
        integer("ss_steps", self.ss_steps, -1, MAX_STEPS)
        integer("start_step", self.start_step, 0, MAX_STEPS)
        choice("kernel", self.kernel, KERNELS)
        number("dilate_px", self.dilate_px, 0.0, MAX_DILATE_PX)

    @staticmethod
    def acts_on(site: Site) -> bool:
        return site.kind in ("self", "joint", "single")

    def check_sites(self, sites: Sequence[tuple[Site, int]]) -> None:
        usable = [s for s, _ in sites if self.acts_on(s)]
        if not usable:
            raise ValueError("this model has no self-attention layers Attentive Eraser can redirect")
        layers = sorted({s.layer for s in usable})
        if self.layers is None:
            self._layers = frozenset(default_layers(usable))
            return
        from .headsets import unet_groups

        groups = unet_groups((s.layer, s.name) for s in usable) if usable[0].family == "unet" else ()
        resolved = self.layers.resolve(groups)
        resolved.check({layer: 1 for layer in layers}, f"this {usable[0].family} model", "self-attention layers")
        self._layers = frozenset(resolved.layers)

    def applies(self, site: Site) -> bool:
        if not self.acts_on(site):
            return False
        if self._layers is None:
            raise ValueError("install Attentive Eraser through a host (attnlab.apply / the ComfyUI node) so its "
                             "layers are resolved against the model")
        return site.layer in self._layers

    # --- the effect ---------------------------------------------------------------------------------
    def prepare(self, grids, device) -> None:
        for grid in grids:
            self._plan(grid, device)

    def _plan(self, grid, device) -> "_Plan":
        """What the mask means at this token grid; worked out in eager code (it reads the mask's values), so a
        compiled graph only looks it up (`prepare` runs before compiled forwards)."""
        plan = self._plans.get((grid, device))
        if plan is None:
            if compiling():
                raise RuntimeError(f"Attentive Eraser has no plan for the token grid {grid} on {device} inside a "
                                   "compiled graph; run it through AttentiveEraserPipeline / attnlab.apply on a "
                                   "pipeline (which prepares every grid before the run), or call prepare()")
            if len(self._plans) > 64:
                self._plans.clear()
            plan = self._plans[(grid, device)] = _Plan(token_mask(self.mask, grid).to(device))
        return plan

    def ss_active(self, step):
        """Similarity suppression while the run's executed-step count is ≤ ss_steps (a bool tensor when the
        step is one, under torch.compile)."""
        if self.ss_scale == 1.0:
            return False
        executed = step.executed
        return executed is not None and executed <= self.ss_steps

    def __call__(self, call: AttentionCall, attend: Attend) -> torch.Tensor:
        rows = call.rows_with(REDIRECTED)
        t = call.tokens
        if not rows or call.q_len != call.kv_len or t.grid is None or t.k_image is None:
            return attend(call.q, call.k, call.v)
        started = True
        if self.start_step > 0:
            executed = call.step.executed
            started = executed is None or executed >= self.start_step
            if started is False:
                return attend(call.q, call.k, call.v)
        plan = self._plan(t.grid, call.q.device)
        obj = plan.obj
        if obj.shape[1] != t.k_image.stop - t.k_image.start:
            return attend(call.q, call.k, call.v)
        if obj.shape[0] not in (1, len(rows)):
            raise ValueError(f"Attentive Eraser has {obj.shape[0]} masks but the call has {len(rows)} redirected rows; "
                             "give one mask, or one per redirected row")
        if plan.skip:
            return attend(call.q, call.k, call.v)  # nothing to remove, or a level fully covered: skip the layer
        per_row = obj if obj.shape[0] == len(rows) else obj[:1].expand(len(rows), -1)
        if len(rows) == call.batch:
            out = self._redirect(call, attend, rows, per_row, plan)
        else:
            plain = [i for i in range(call.batch) if i not in set(rows)]
            out = torch.empty_like(call.v)
            out[plain] = _attend_rows(call, attend, plain)
            out[rows] = self._redirect(call, attend, rows, per_row, plan)
        if started is not True:  # a step tensor (torch.compile): before start_step the call is plain attention
            out = torch.where(started, out, attend(call.q, call.k, call.v))
        return out

    def _redirect(self, call: AttentionCall, attend: Attend, rows: list[int], obj: torch.Tensor,
                  plan: "_Plan") -> torch.Tensor:
        """AAS for `rows` (obj: bool [len(rows), N_image], at least one background token in each row)."""
        t = call.tokens
        q, k, v = call.q[rows], call.k[rows], call.v[rows]
        keep = torch.ones(len(rows), call.kv_len, dtype=torch.bool, device=q.device)
        keep[:, t.k_image] = ~obj
        active = self.ss_active(call.step)
        if active is not False:
            row_scale = torch.ones(len(rows), call.q_len, dtype=q.dtype, device=q.device)
            row_scale[:, t.q_image] = torch.where(obj, torch.tensor(self.ss_scale, dtype=q.dtype, device=q.device),
                                                  torch.ones((), dtype=q.dtype, device=q.device))
            q = q * select(active, row_scale, torch.ones_like(row_scale))[:, None, :, None]
        roles = (REDIRECTED,) * len(rows)
        mask = _rows_of(call.mask, rows, call.batch)
        text_open = not self.mask_text_queries and t.q_text is not None
        layout = t
        if text_open:  # text queries keep every key: attend them separately
            out = torch.empty_like(v)
            out[..., t.q_text, :] = attend(q[..., t.q_text, :], k, v, mask=_query_rows(mask, t.q_text), roles=roles)
            q = q[..., t.q_image, :]
            mask = _query_rows(mask, t.q_image)
            n = t.q_image.stop - t.q_image.start
            layout = TokenLayout(slice(0, n), None, t.k_image, t.k_text, t.grid, t.scale, t.native_grid, t.text_first,
                                 t.text_segments)
        if self.kernel == "bias" or not plan.same_rows:
            bias = torch.zeros(keep.shape, dtype=q.dtype, device=q.device).masked_fill(~keep, float("-inf"))[:, None, None, :]
            bias = bias if mask is None else _add_mask(mask, bias)
            res = attend(q, k, v, mask=bias, roles=roles, tokens=layout)
        else:
            ki = t.k_image
            idx = torch.cat([torch.arange(ki.start, device=q.device), plan.kept + ki.start,
                             torch.arange(ki.stop, call.kv_len, device=q.device)])
            res = attend(q, k[..., idx, :], v[..., idx, :], mask=None if mask is None else mask[..., idx],
                         roles=roles, tokens=_gathered_layout(layout, plan.removed))
        if text_open:
            out[..., t.q_image, :] = res
            return out
        return res


class _Plan:
    """The mask at one token grid: object tokens `obj` (bool [masks, N_image]), whether the layer is skipped
    (no object token, or some mask covers the whole level), whether all masks agree (`same_rows`), and the
    first mask's kept image positions and removed count (for the gather kernel)."""

    __slots__ = ("obj", "skip", "same_rows", "kept", "removed")

    def __init__(self, obj: torch.Tensor):
        self.obj = obj
        self.skip = bool(not obj.any() or obj.all(dim=1).any())
        self.same_rows = bool((obj == obj[:1]).all())
        self.kept = (~obj[0]).nonzero().squeeze(1)
        self.removed = int(obj[0].sum())


def default_layers(sites: Sequence[Site]) -> list[int]:
    """The official UNet choice (every up-block self-attention: SD 7–15, SDXL 34–69) or, for DiTs (no
    official recipe), FLUX's single blocks and the second half of SD3's, PixArt's and Wan's blocks."""
    family = sites[0].family
    if family == "unet":
        return sorted({s.layer for s in sites if s.name.split(".")[0] in ("up_blocks", "output_blocks")})
    if family == "flux":
        return sorted({s.layer for s in sites if s.kind == "single"})
    layers = sorted({s.layer for s in sites})
    return layers[len(layers) // 2:]


def _gathered_layout(t: TokenLayout, removed: int) -> TokenLayout:
    """The key spans after dropping `removed` object image keys (query spans unchanged)."""
    n_img = t.k_image.stop - t.k_image.start - removed
    if t.k_text is None:
        k_image, k_text = slice(0, n_img), None
    elif t.text_first:
        k_text, k_image = t.k_text, slice(t.k_text.stop, t.k_text.stop + n_img)
    else:
        k_image = slice(0, n_img)
        k_text = slice(n_img, n_img + t.k_text.stop - t.k_text.start)
    return TokenLayout(t.q_image, t.q_text, k_image, k_text, t.grid, t.scale, t.native_grid, t.text_first,
                       t.text_segments)


def _rows_of(mask: Optional[torch.Tensor], rows: list[int], batch: int) -> Optional[torch.Tensor]:
    if mask is None:
        return None
    return mask[rows] if mask.ndim == 4 and mask.shape[0] == batch and batch > 1 else mask


def _query_rows(mask: Optional[torch.Tensor], span: slice) -> Optional[torch.Tensor]:
    if mask is None or mask.ndim < 2 or mask.shape[-2] == 1:
        return mask
    return mask[..., span, :]


def _add_mask(mask: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=bias.dtype, device=bias.device).masked_fill(~mask, float("-inf"))
    return mask.to(bias.dtype) + bias


def _attend_rows(call: AttentionCall, attend: Attend, rows: list[int]) -> torch.Tensor:
    roles = None if call.roles is None else tuple(call.roles[i] for i in rows)
    return attend(call.q[rows], call.k[rows], call.v[rows], mask=_rows_of(call.mask, rows, call.batch), roles=roles)


def sarg(plain: torch.Tensor, redirected: torch.Tensor, scale: float) -> torch.Tensor:
    """SARG: ε̃ = ε + s(ε_AAS − ε). Affine (weights sum to 1), so valid for ε, x0, v or flow velocity."""
    if scale == 0.0:
        return plain
    return plain + scale * (redirected - plain)
