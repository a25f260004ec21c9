"""SoftPAG (HeadHunter, arXiv 2506.10978): perturbation guidance on selected attention heads.

The effect interpolates the attention map of selected (layer, head) pairs toward a target, only on
batch rows whose role is "perturbed":

    A' = (1 - u)·A + u·T          out = A'·V

For the map-free targets this is computed on the kernel's output, never on the map:

    identity   T = I              out = (1 - u)·O + u·V               (SoftPAG; u = 1 is PAG)
    uniform    T = 1/N            out = (1 - u)·O + u·mean_keys(V)    (SoftUG)
    mean_query T = softmax(q̄Kᵀ)   out = (1 - u)·O + u·SDPA(q̄, K, V)    (SoftSEG, σ → ∞)

written exactly as ``(1-u)·O + u·target`` so that u = 0 gives O and u = 1 gives V bit for bit.
Targets that need the map (`max`: one-hot at the row argmax) and the Fisher–Rao path (slerp of the
square-root maps) go through an explicit, query-chunked slow path with a token limit.

Joint attention (SD3, FLUX): ``joint="full"`` (default, HeadHunter) turns the whole joint map of the
head into the target, text rows included; ``joint="image"`` (diffusers' SD3 PAG) replaces only the
image→image block by the identity: image queries attend to the text keys and to themselves, text rows
keep their attention. Computed from image×text logits only (O(N·T), never N×N).

Guidance (all steps by default): ε = ε_u + s(ε_c − ε_u) + w(ε_c − ε_ptb), or ε_c + w(ε_c − ε_ptb)
without CFG; `perturbation_guidance` and `cond_correction` are the arithmetic both hosts use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .call import AttentionCall, Site, StepInfo, select
from .effects import Attend, Effect
from .headsets import HeadSet, unet_groups
from .params import InvalidParameter, boolean, choice, integer, number

TARGETS = ("identity", "uniform", "mean_query", "max")
PATHS = ("linear", "fisher_rao")
#: w beyond ~100 only saturates the image (1e30 turns it into NaN); the papers use 1–5 (the nodes allow up to 100)
MAX_GUIDANCE_SCALE = 100.0
JOINT_MODES = ("full", "image")
PERTURBED = "perturbed"

#: Elements of one explicit-map chunk: the slow path keeps about five such tensors alive (logits, map,
#: target, blend, product), so 2**24 fp32 elements bound it near 320 MB whatever the sequence length.
_EXPLICIT_CHUNK_ELEMENTS = 1 << 24


class SoftPAG(Effect):
    """Interpolate the attention of the selected heads toward a target on "perturbed" rows.

    heads:   a `HeadSet`, its text ("L7:H3,H5; L9:*", UNet blocks "d2.1-3, m0"), {layer: heads} or pairs.
    u:       interpolation in [0, 1]; 0 is off (bit-exact), 1 is the target itself (PAG for identity).
    target:  "identity" (SoftPAG), "uniform" (SoftUG), "mean_query" (SoftSEG), "max" (explicit maps).
    path:    "linear" (map-free for the first three targets) or "fisher_rao" (explicit maps).
    joint:   "full" (HeadHunter; identity over the whole joint sequence) or "image" (image→image only).
    dual_attention: also perturb SD3.5's extra image self-attention (attn2) in the selected layers;
             HeadHunter never exercised it (SD3-medium has none), so off by default.
    max_explicit_tokens: the explicit path refuses longer sequences (it is O(chunk·N) memory, but slow).
    """

    stage = "blend"
    name = "softpag"

    def __init__(self, heads, u: float = 1.0, target: str = "identity", path: str = "linear",
                 joint: str = "full", dual_attention: bool = False, max_explicit_tokens: int = 16384):
        self.heads = HeadSet.of(heads, "heads")
        if not self.heads and not isinstance(heads, HeadSet):  # an explicit HeadSet() is a no-op probe (HeadHunter)
            raise InvalidParameter(f"heads is empty ({heads!r}): name at least one layer, e.g. 'L7:H3,H5' or 'L9:*'")
        self.u = number("u", u, 0.0, 1.0)
        self.target = choice("target", target, TARGETS)
        self.path = choice("path", path, PATHS)
        self.joint = choice("joint", joint, JOINT_MODES)
        self.dual_attention = boolean("dual_attention", dual_attention)
        self.max_explicit_tokens = integer("max_explicit_tokens", max_explicit_tokens, 1)
        self._bound: Optional[tuple] = None  # (groups, resolved HeadSet) once checked against a UNet

    def __repr__(self) -> str:
        return (f"SoftPAG(heads={str(self.heads)!r}, u={self.u}, target={self.target!r}, path={self.path!r}, "
                f"joint={self.joint!r})")

    # --- validation ---------------------------------------------------------------------------------
    @property
    def explicit(self) -> bool:
        """True when this configuration needs explicit attention maps (the slow path)."""
        return self.path != "linear" or self.target == "max"

    def validate(self) -> None:
        if not (0.0 <= self.u <= 1.0) or math.isnan(self.u):
            raise ValueError(f"SoftPAG u must be in [0, 1] (0 = off, 1 = full target), got {self.u}")
        if self.target not in TARGETS:
            raise ValueError(f"SoftPAG target must be one of {TARGETS}, got {self.target!r}")
        if self.path not in PATHS:
            raise ValueError(f"SoftPAG path must be one of {PATHS}, got {self.path!r}")
        if self.joint not in JOINT_MODES:
            raise ValueError(f"SoftPAG joint must be one of {JOINT_MODES}, got {self.joint!r}")
        if self.joint == "image" and (self.target != "identity" or self.explicit):
            raise ValueError("SoftPAG joint='image' (image→image identity) is defined for target='identity' with "
                             "path='linear' only")
        if self.max_explicit_tokens < 1:
            raise ValueError(f"SoftPAG max_explicit_tokens must be >= 1, got {self.max_explicit_tokens}")

    def conflicts_with(self, other) -> bool:
        """Two SoftPAG effects clash where their layers overlap (the second would blend the same heads again)."""
        if not isinstance(other, SoftPAG):
            return False
        if not (self.heads.resolved and other.heads.resolved):
            return True  # UNet block refs: overlap unknown until resolved, so refuse rather than guess
        return bool(set(self.heads.layers) & set(other.heads.layers))

    def perturbs(self, site: Site) -> bool:
        """Kinds of attention SoftPAG acts on: self-attention and joint/single streams, never cross."""
        if site.kind in ("joint", "single"):
            return True
        if site.kind == "self":
            return site.family != "sd3" or self.dual_attention
        return False

    def check_sites(self, sites: Sequence[tuple[Site, int]]) -> None:
        """Resolve UNet block refs and check every layer/head exists (sites: (Site, heads) pairs)."""
        usable = [(s, n) for s, n in sites if self.perturbs(s)]
        what = f"this {sites[0][0].family} model" if sites else "this model"
        unet = bool(sites) and sites[0][0].family == "unet"
        groups = tuple(unet_groups((s.layer, s.name) for s, _ in usable)) if unet else ()
        resolved = self.heads.resolve(groups)
        heads_per_layer: dict[int, int] = {}
        for s, n in usable:
            heads_per_layer[s.layer] = n
        resolved.check(heads_per_layer, what)
        if self._bound is not None and self._bound[0] != groups and not self.heads.resolved:
            raise ValueError("this SoftPAG effect's UNet block refs were resolved for another UNet; "
                             "create one effect per model")
        self._bound = (groups, resolved)

    @property
    def resolved_heads(self) -> HeadSet:
        if self._bound is not None:
            return self._bound[1]
        if not self.heads.resolved:
            raise ValueError(f"SoftPAG heads {str(self.heads)!r} use UNet block refs; install the effect through a "
                             "host (attnlab.apply / the ComfyUI node) so they are resolved against the model")
        return self.heads

    def applies(self, site: Site) -> bool:
        return self.u > 0.0 and self.perturbs(site) and site.layer in self.resolved_heads

    # --- the effect ---------------------------------------------------------------------------------
    def __call__(self, call: AttentionCall, attend: Attend) -> torch.Tensor:
        out = attend(call.q, call.k, call.v)
        if self.u == 0.0 or call.q_len != call.kv_len:
            return out
        rows = call.rows_with(PERTURBED)
        if not rows:
            return out
        heads = call.local_heads(self.resolved_heads.heads_at(call.site.layer, call.heads_total))
        if not heads:
            return out
        return blend_heads(call, out, rows, heads, self.u, self.target, self.path, self.joint, self.max_explicit_tokens)

    def __deepcopy__(self, memo):  # ComfyUI deep-copies model_options on clone; the effect is immutable in use
        return self


def blend_heads(call: AttentionCall, out: torch.Tensor, rows: Sequence[int], heads: Sequence[int], u: float,
                target: str = "identity", path: str = "linear", joint: str = "full",
                max_explicit_tokens: int = 16384) -> torch.Tensor:
    """`out` with rows × heads replaced by ``(1-u)·out + u·target_output`` (a new tensor)."""
    device = out.device
    r = torch.as_tensor(list(rows), device=device)
    h = torch.as_tensor(list(heads), device=device)
    sel = (r[:, None], h[None, :])
    v = call.v[sel]
    o = out[sel]
    if path != "linear" or target == "max" or (call.mask is not None and target in ("uniform", "mean_query")):
        mixed = _explicit(call, call.q[sel], call.k[sel], v, r, h, u, target, path, max_explicit_tokens).to(out.dtype)
    else:
        wide = torch.promote_types(o.dtype, torch.float32)
        if joint == "image" and call.tokens.q_image is not None and call.tokens.k_text is not None:
            mixed = o.clone()
            qi = call.tokens.q_image
            img_only = _image_only_identity(call, call.q[sel], call.k[sel], v)
            mixed[..., qi, :] = ((1.0 - u) * o[..., qi, :].to(wide) + u * img_only).to(out.dtype)
        else:
            if target == "identity":
                tgt = v
            elif target == "uniform":
                tgt = v.to(wide).mean(dim=-2, keepdim=True)
            else:  # mean_query
                q_bar = call.q[sel].to(wide).mean(dim=-2, keepdim=True)
                tgt = F.scaled_dot_product_attention(q_bar, call.k[sel].to(wide), v.to(wide), scale=call.scale)
            mixed = ((1.0 - u) * o.to(wide) + u * tgt.to(wide)).to(out.dtype)
    result = out.clone()
    result[sel] = mixed
    return result


def _chunk_rows(n_rows: int, n_keys: int, batch: int) -> int:
    return max(1, min(n_rows, _EXPLICIT_CHUNK_ELEMENTS // max(1, n_keys * batch)))


def _image_only_identity(call: AttentionCall, q, k, v) -> torch.Tensor:
    """Attention output of the image query rows when their image→image block is the identity: each image
    query attends to all text keys and to its own key only (diffusers' PAGJointAttnProcessor2_0).
    At least fp32, computed chunk by chunk from image×text logits plus the diagonal."""
    if call.mask is not None:
        raise ValueError("SoftPAG joint='image' does not support masked attention calls; use joint='full'")
    t = call.tokens
    wide = torch.promote_types(q.dtype, torch.float32)
    qi, ki, vi = q[..., t.q_image, :].to(wide), k[..., t.k_image, :].to(wide), v[..., t.k_image, :].to(wide)
    kt, vt = k[..., t.k_text, :].to(wide), v[..., t.k_text, :].to(wide)
    scale = call.default_scale()
    n_img, n_txt = qi.shape[-2], kt.shape[-2]
    step = _chunk_rows(n_img, n_txt + 1, qi.shape[0] * qi.shape[1])
    parts = []
    for s in range(0, n_img, step):
        qc = qi[..., s:s + step, :]
        logits = torch.cat([qc @ kt.transpose(-1, -2) * scale,
                            (qc * ki[..., s:s + step, :]).sum(-1, keepdim=True) * scale], dim=-1)
        p = torch.softmax(logits, dim=-1)
        parts.append(p[..., :n_txt] @ vt + p[..., n_txt:] * vi[..., s:s + step, :])
    return torch.cat(parts, dim=-2)


def _mask_bias(mask: Optional[torch.Tensor], r, h, rows: slice, n_keys: int,
               dtype: torch.dtype = torch.float32) -> Optional[torch.Tensor]:
    """The call's mask as an additive bias (in `dtype`) for the selected rows/heads and query rows."""
    if mask is None:
        return None
    m = mask
    while m.ndim < 4:
        m = m.unsqueeze(0)
    m = m.expand(-1 if m.shape[0] > 1 else 1, -1, -1, n_keys)
    m = m[r] if m.shape[0] > 1 else m
    m = m[:, h] if m.shape[1] > 1 else m
    m = m[..., rows, :] if m.shape[2] > 1 else m
    if m.dtype == torch.bool:
        return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(~m, float("-inf"))
    return m.to(dtype)


def _explicit(call: AttentionCall, q, k, v, r, h, u: float, target: str, path: str, limit: int) -> torch.Tensor:
    """The slow path: explicit per-row maps, chunked over queries (never N×N at once)."""
    n_q, n_k = q.shape[-2], k.shape[-2]
    if max(n_q, n_k) > limit:
        raise ValueError(f"SoftPAG target={target!r} path={path!r} needs explicit attention maps and this call has "
                         f"{max(n_q, n_k)} tokens (> max_explicit_tokens={limit}); use a map-free configuration "
                         "(path='linear' with identity/uniform/mean_query) or raise max_explicit_tokens")
    wide = torch.promote_types(q.dtype, torch.float32)
    q, k, v = q.to(wide), k.to(wide), v.to(wide)
    scale = call.default_scale()
    kt = k.transpose(-1, -2)
    mean_row = None
    if target == "mean_query":
        logits_bar = q.mean(dim=-2, keepdim=True) @ kt * scale
        bias = _mask_bias(call.mask, r, h, slice(0, 1), n_k, wide)
        mean_row = torch.softmax(logits_bar if bias is None else logits_bar + bias[..., :1, :], dim=-1)
    step = _chunk_rows(n_q, n_k, q.shape[0] * q.shape[1])
    parts = []
    for s in range(0, n_q, step):
        e = min(n_q, s + step)
        logits = q[..., s:e, :] @ kt * scale
        bias = _mask_bias(call.mask, r, h, slice(s, e), n_k, wide)
        if bias is not None:
            logits = logits + bias
        a = torch.softmax(logits, dim=-1)
        if target == "identity":
            t = torch.zeros_like(a)
            idx = torch.arange(s, e, device=a.device)
            t[..., torch.arange(e - s, device=a.device), idx] = 1.0
        elif target == "uniform":
            t = torch.softmax(torch.zeros_like(logits) if bias is None else bias.expand_as(logits).clone(), dim=-1)
        elif target == "mean_query":
            t = mean_row.expand_as(a)
        else:  # max
            t = F.one_hot(logits.argmax(dim=-1), n_k).to(a.dtype)
        m = (1.0 - u) * a + u * t if path == "linear" else fisher_rao_path(a, t, u)
        parts.append(m @ v)
    return torch.cat(parts, dim=-2)


def fisher_rao_path(a: torch.Tensor, t: torch.Tensor, u: float) -> torch.Tensor:
    """Point at fraction `u` on the Fisher–Rao geodesic from rows `a` to rows `t` (probability rows):
    the great circle between √a and √t on the unit sphere, squared back. Rows stay distributions."""
    sa, st = a.clamp_min(0).sqrt(), t.clamp_min(0).sqrt()
    cos = (sa * st).sum(-1, keepdim=True).clamp(-1.0, 1.0)
    theta = torch.arccos(cos)
    sin = torch.sin(theta)
    small = sin < 1e-6
    safe = torch.where(small, torch.ones_like(sin), sin)
    wa = torch.where(small, torch.full_like(sin, 1.0 - u), torch.sin((1.0 - u) * theta) / safe)
    wt = torch.where(small, torch.full_like(sin, u), torch.sin(u * theta) / safe)
    return (wa * sa + wt * st) ** 2


# --- guidance arithmetic ----------------------------------------------------------------------------
def perturbation_guidance(cond: torch.Tensor, perturbed: Optional[torch.Tensor], scale: float,
                          uncond: Optional[torch.Tensor] = None, cfg_scale: Optional[float] = None) -> torch.Tensor:
    """ε = ε_u + s(ε_c − ε_u) + w(ε_c − ε_ptb); without CFG (uncond or cfg_scale None) ε_c + w(ε_c − ε_ptb).
    With w = 0 (or no perturbed prediction) the CFG result is returned unchanged."""
    base = cond if uncond is None or cfg_scale is None else uncond + cfg_scale * (cond - uncond)
    if perturbed is None or scale == 0.0:
        return base
    return base + scale * (cond - perturbed)


def cond_correction(cond: torch.Tensor, perturbed: torch.Tensor, scale: float,
                    cfg_scale: Optional[float] = None) -> torch.Tensor:
    """The conditional prediction to hand back to a pipeline that applies CFG itself afterwards:
    ε_c' = ε_c + (w/s)(ε_c − ε_ptb), so that ε_u + s(ε_c' − ε_u) = ε_u + s(ε_c − ε_u) + w(ε_c − ε_ptb).
    Without CFG (cfg_scale None) ε_c' = ε_c + w(ε_c − ε_ptb)."""
    if not torch.is_tensor(scale) and scale == 0.0:
        return cond
    k = scale if cfg_scale is None else scale / cfg_scale
    return cond + k * (cond - perturbed)


@dataclass(frozen=True)
class GuidanceSchedule:
    """When and how strongly the perturbed pass guides.

    scale: w. start/end: fraction of the schedule (step index / step count), active for
    ``start <= progress <= end`` (both inclusive, default all steps). sigma_min/sigma_max: active for
    ``sigma_min <= sigma <= sigma_max`` when given (ComfyUI-style window). adaptive: diffusers PAGMixin's
    schedule ``w_t = max(0, w − adaptive·(1000 − t))`` on the 0–1000 timestep scale (0 = off).
    Bounds that the host cannot evaluate (unknown step or sigma) do not switch guidance off.
    """

    scale: float = 3.0
    start: float = 0.0
    end: float = 1.0
    sigma_min: Optional[float] = None
    sigma_max: Optional[float] = None
    adaptive: float = 0.0

    def validate(self) -> None:
        number("scale", self.scale, 0.0, MAX_GUIDANCE_SCALE)
        for name in ("start", "end", "adaptive"):
            number(name, getattr(self, name), 0.0, 1.0 if name != "adaptive" else 1000.0)
        for name in ("sigma_min", "sigma_max"):
            if getattr(self, name) is not None:
                number(name, getattr(self, name), 0.0)
        if not (0.0 <= self.start <= self.end <= 1.0):
            raise ValueError(f"guidance window needs 0 <= start <= end <= 1, got start={self.start}, end={self.end}")
        if self.sigma_min is not None and self.sigma_max is not None and self.sigma_min > self.sigma_max:
            raise ValueError(f"sigma window needs sigma_min <= sigma_max, got {self.sigma_min} > {self.sigma_max}")
        if self.adaptive < 0:
            raise ValueError(f"adaptive scale must be >= 0, got {self.adaptive}")

    @property
    def needs_step(self) -> bool:
        """Whether w depends on the step (a window or the adaptive schedule); hosts skip finding the step
        otherwise (under torch.compile it would add graph inputs and guards for nothing)."""
        return (self.start > 0.0 or self.end < 1.0 or self.sigma_min is not None or self.sigma_max is not None
                or self.adaptive > 0.0)

    def scale_at(self, step: StepInfo, timestep_1000: Optional[float] = None) -> float:
        """w for this step (0.0 outside the window). Reads only the step fields its window uses; with
        tensor step fields (under torch.compile) w is a 0-d tensor."""
        if self.scale == 0.0:
            return 0.0
        on = True
        p = step.progress if (self.start > 0.0 or self.end < 1.0) else None
        if p is not None:
            on = (p >= self.start) & (p <= self.end)
        s = step.sigma if (self.sigma_min is not None or self.sigma_max is not None) else None
        if s is not None:
            if self.sigma_min is not None:
                on = on & (s >= self.sigma_min)
            if self.sigma_max is not None:
                on = on & (s <= self.sigma_max)
        w = self.scale
        if self.adaptive > 0.0 and timestep_1000 is not None:
            w = w - self.adaptive * (1000.0 - timestep_1000)
            w = w.clamp_min(0.0) if torch.is_tensor(w) else max(0.0, w)
        return select(on, w, 0.0) if torch.is_tensor(on) or torch.is_tensor(w) else (w if on else 0.0)
