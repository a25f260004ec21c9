"""AlignedGen (FLUX, NeurIPS 2025) and StyleAligned (UNet, CVPR 2024): style-consistent batches by
shared attention, as one "share"-stage effect.

Per attention call, the batch is split into *groups* (one per CFG chunk): a reference row and its target
rows. Every target attends to its own keys plus the reference's image keys/values:

    K_b^ext = [K_b ; λ·ShiftPE(K̃_ref^img)]      V_b^ext = [V_b ; V_ref^img]

with AdaIN on the targets' image-token Q and K toward the reference's token statistics (before RoPE),
ShiftPE (the reference keys rotated as if they sat W tokens to the right, FLUX/Wan RoPE only) and the key
scale λ ("fix" or the "decrease" (t/1000)² schedule). The reference attends to itself only
(`constrain_first`): it is computed in its own kernel call, so its trajectory equals a solo run of its
prompt, and no dense (B, H, L, L+N) mask is ever built — two calls of the host's kernel, flash stays usable.

Groups come from row roles, never from "the second half of the batch":

- explicit: rows with role "reference" start a group, the following "target" rows belong to it;
- otherwise: each contiguous run of rows with the same "cond"/"uncond" role is a chunk (split further into
  blocks of `chunk` rows when given); its row `reference` (default 0) is the reference. diffusers' CFG
  batches are ``[uncond…, cond…]``; ComfyUI's come from ``cond_or_uncond`` ([1, 0], [0], split calls);
  FLUX/Wan run cond and uncond as separate forwards. Rows of other roles (e.g. "perturbed") are untouched.

Family defaults (which sites share): FLUX single-stream blocks (global layers D..D+S-1, 19–56 on FLUX.1);
UNet (SD1.5/SDXL) and PixArt self-attention (StyleAligned); SD3 joint blocks (no RoPE: sharing without
ShiftPE, see docs/alignedgen.md); Wan self-attention (reference video frames: all, the first, or every k-th).
"""

from __future__ import annotations

import logging
from typing import Callable, Optional, Sequence

import torch

from .call import FAMILIES, AttentionCall, RopeInfo, Site, select
from .effects import Attend, Effect
from .params import InvalidParameter, ParameterTypeError, boolean, choice, integer, number
from .tracing import compiling

logger = logging.getLogger("attnlab")

ADAIN_MODES = ("qk", "q", "none")
SCHEDULES = ("fix", "decrease")
SHIFT_AXES = ("width", "height", "index")
FLOW_FAMILIES = ("flux", "sd3", "wan")
ROPE_FAMILIES = ("flux", "wan")
#: kinds that may share per family, and the default kinds when no layers are given
SHARE_KINDS = {"flux": ("single", "joint"), "unet": ("self",), "pixart": ("self",), "sd3": ("joint",), "wan": ("self",)}
DEFAULT_KINDS = {"flux": ("single",), "unet": ("self",), "pixart": ("self",), "sd3": ("joint",), "wan": ("self",)}
CHUNK_ROLES = ("cond", "uncond")
MAX_LAYER = 10_000  # layer numbers beyond any model: a typo, not a range to expand
MAX_STEP = 10_000
MAX_SHIFT = 1_000_000


def _pair(name: str, value) -> tuple:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise ParameterTypeError(f"{name} must be (start, end); got {value!r}")
    return tuple(value)


def parse_layers(layers) -> Optional[frozenset]:
    """None (family default), an int, an iterable of ints, a range, or text like "19-56" / "0-3, 7"."""
    if layers is None:
        return None
    if isinstance(layers, str):
        out = set()
        for part in layers.replace(";", ",").split(","):
            part = part.strip()
            if not part:
                continue
            try:
                a, b = (int(s) for s in part.split("-", 1)) if "-" in part[1:] else (int(part), int(part))
            except ValueError:
                raise InvalidParameter(f"layers: cannot read {part!r}; use e.g. '19-56' or '0-3, 7'") from None
            if not 0 <= a <= b <= MAX_LAYER:
                raise InvalidParameter(f"layers: {part!r} must be a layer or a range a-b with "
                                       f"0 <= a <= b <= {MAX_LAYER}")
            out.update(range(a, b + 1))
        if not out:
            raise InvalidParameter(f"layers is empty ({layers!r}): name at least one layer, or pass None for the "
                                   "default layers")
        return frozenset(out)
    if isinstance(layers, (bool, dict, bytes)) or not isinstance(layers, (int, Sequence, range, set, frozenset)):
        raise ParameterTypeError(f"layers must be None, a layer number, a list of them or text like '19-56'; "
                                 f"got {layers!r} ({type(layers).__name__})")
    out = frozenset(integer("layers entry", x, 0, MAX_LAYER) for x in ((layers,) if isinstance(layers, int) else layers))
    if not out:
        raise InvalidParameter("layers is empty: name at least one layer, or pass None for the default layers")
    return out


def adain(x: torch.Tensor, ref: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """AdaIN over the token axis (dim -2): x's per-(row, head, channel) mean/std replaced by ref's.
    x: [T, H, N, D]; ref: [T or 1, H, M, D]. Variance with eps as in StyleAligned/AlignedGen's `calc_mean_std`."""
    mx, vx = x.mean(dim=-2, keepdim=True), x.var(dim=-2, keepdim=True, unbiased=True)
    mr, vr = ref.mean(dim=-2, keepdim=True), ref.var(dim=-2, keepdim=True, unbiased=True)
    return (x - mx) / (vx + eps).sqrt() * (vr + eps).sqrt() + mr


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on interleaved channel pairs (x[2i], x[2i+1]) with half-size tables cos/sin [N, D/2] (ComfyUI's
    FLUX convention: rotation matrices [[c, -s], [s, c]] per pair)."""
    x0, x1 = x[..., 0::2].float(), x[..., 1::2].float()
    out = torch.stack((cos * x0 - sin * x1, sin * x0 + cos * x1), dim=-1).flatten(-2)
    return out.to(x.dtype)


def comfy_rope_source(pe_embedder, axes: int = 3) -> Callable[[AttentionCall], Optional[RopeInfo]]:
    """A RopeInfo builder for ComfyUI's FLUX and Wan (whose attention override hands over post-RoPE q/k without
    the tables): the ids the model uses, embedded by its own EmbedND (`pe_embedder` / `rope_embedder`: ids ->
    (B, 1, L, D/2, 2, 2) rotation matrices). FLUX: [txt: zeros ; img: (0, row, col)]; Wan: (frame, row, col),
    frame-major raster. Tables are cached per token layout."""
    cache: dict = {}

    def embed(ids: torch.Tensor):
        pe = pe_embedder(ids.reshape(1, -1, ids.shape[-1]).float())
        pe = pe.reshape(-1, pe.shape[-3], 2, 2)
        return pe[..., 0, 0], pe[..., 1, 0]

    def source(call: AttentionCall) -> Optional[RopeInfo]:
        t = call.tokens
        if t.grid is None or t.q_image is None:
            return None
        frames, rows, cols = t.grid
        img = t.q_image
        if img.stop - img.start != frames * rows * cols:
            return None
        key = (call.q_len, img.start, t.grid, call.q.device)
        hit = cache.get(key)
        if hit is None:
            ids = torch.zeros(call.q_len, axes)
            f, r, c = torch.meshgrid(torch.arange(frames), torch.arange(rows), torch.arange(cols), indexing="ij")
            span = slice(img.start, img.start + frames * rows * cols)
            if t.q_text is None:  # video/image self-attention (Wan): (frame, row, col)
                ids[span, 0] = f.flatten().float()
            ids[span, 1] = r.flatten().float()
            ids[span, 2] = c.flatten().float()
            cos, sin = embed(ids)
            hit = cache[key] = (cos.to(call.q.device), sin.to(call.q.device))
            if len(cache) > 64:
                cache.clear()
                cache[key] = hit
        return RopeInfo(hit[0], hit[1], rotate_pairs, lambda ids: embed(ids))

    return source


class AlignedGen(Effect):
    """Style-aligned batch generation by shared attention (AlignedGen on FLUX, StyleAligned on UNets).

    layers: global layer indices that share (None: the family default, see module doc); text "19-56" works.
    steps: (start, end) step indices that share, end exclusive (None: every step; official AlignedGen: all).
    adain: "qk" (default), "q" or "none": AdaIN of the targets' image-token queries/keys to the reference's.
    scale: λ, the key scale of the shared block for targets (None: 1.1 on FLUX as AlignedGen, 1.0 elsewhere as
        StyleAligned's shared_score_scale; 1.0 = plain concatenation).
    schedule: "fix" or "decrease" (λ_t = (t/1000)², t the timestep; flow models: σ², else 1 − progress).
    shift: ShiftPE offset of the reference keys in tokens along `shift_axis`: "auto" (FLUX: the grid size
        along the axis, i.e. +W for the width axis, +H for height, +frames for the index axis; other families:
        off), or an int (0 = naive sharing). Only RoPE families (FLUX, Wan) have ShiftPE, and only where the
        host's RoPE can be re-embedded (diffusers FLUX, ComfyUI FLUX and Wan); elsewhere it is ignored.
    shift_axis: "width" (default), "height" or "index" (FLUX axis 0 / Wan frame axis).
    reference: the row of each chunk that is the reference (default 0).
    chunk: rows per chunk when one role run holds several chunks (e.g. ComfyUI area conds); None: one run = one chunk.
    ref_frames: video (Wan): reference frames shared: "all", "first", or an int k (every k-th frame).
    enabled: False switches the effect off (bit-identical to stock).
    rope_source: optional ``fn(call) -> RopeInfo`` for hosts that do not hand over the RoPE tables (ComfyUI FLUX).
    """

    stage = "share"
    name = "alignedgen"

    def __init__(self, layers=None, steps: Optional[Sequence[int]] = None, adain: str = "qk", scale: Optional[float] = None,
                 schedule: str = "fix", shift="auto", shift_axis: str = "width", reference: int = 0,
                 chunk: Optional[int] = None, ref_frames="all", enabled: bool = True,
                 rope_source: Optional[Callable] = None):
        self.layers = parse_layers(layers)
        self.steps = None if steps is None else tuple(
            integer(f"steps[{i}]", s, 0, MAX_STEP) for i, s in enumerate(_pair("steps", steps)))
        self.adain = choice("adain", adain, ADAIN_MODES)
        self.scale = None if scale is None else number("scale", scale, 0.0, 10.0)
        self.schedule = choice("schedule", schedule, SCHEDULES)
        self.shift = shift if shift == "auto" else integer("shift", shift, -MAX_SHIFT, MAX_SHIFT)
        self.shift_axis = choice("shift_axis", shift_axis, SHIFT_AXES)
        self.reference = integer("reference", reference, 0)
        self.chunk = None if chunk is None else integer("chunk", chunk, 2)
        self.ref_frames = ref_frames if ref_frames in ("all", "first") else integer("ref_frames", ref_frames, 1)
        self.enabled = boolean("enabled", enabled)
        self.rope_source = rope_source
        self.validate()
        self.calls = 0  # shared (modified) calls, per group: for gating tests and logging
        self._warned: set = set()

    def __repr__(self) -> str:
        return (f"AlignedGen(layers={'default' if self.layers is None else sorted(self.layers)}, steps={self.steps}, "
                f"adain={self.adain!r}, scale={self.scale}, schedule={self.schedule!r}, shift={self.shift!r}, "
                f"shift_axis={self.shift_axis!r}, reference={self.reference}, enabled={self.enabled})")

    def __deepcopy__(self, memo):  # ComfyUI deep-copies model_options on clone; the effect may hold a model
        return self

    # --- validation -------------------------------------------------------------------------------------
    def validate(self) -> None:
        if self.adain not in ADAIN_MODES:
            raise ValueError(f"adain must be one of {ADAIN_MODES}, got {self.adain!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.scale is not None and (not (self.scale == self.scale) or self.scale < 0 or self.scale > 10):
            raise ValueError(f"scale (λ) must be in [0, 10], got {self.scale}")
        if self.shift != "auto" and (isinstance(self.shift, bool) or not isinstance(self.shift, int)):
            raise ValueError(f"shift must be 'auto' or an integer number of tokens, got {self.shift!r}")
        if self.shift_axis not in SHIFT_AXES:
            raise ValueError(f"shift_axis must be one of {SHIFT_AXES}, got {self.shift_axis!r}")
        if self.reference < 0:
            raise ValueError(f"reference must be a row index >= 0, got {self.reference}")
        if self.chunk is not None and (int(self.chunk) < 2):
            raise ValueError(f"chunk must be None or >= 2 rows (a reference and a target), got {self.chunk}")
        if self.steps is not None and (len(self.steps) != 2 or self.steps[0] < 0 or self.steps[1] < self.steps[0]):
            raise ValueError(f"steps must be (start, end) with 0 <= start <= end, got {self.steps}")
        rf = self.ref_frames
        if not (rf in ("all", "first") or (isinstance(rf, int) and not isinstance(rf, bool) and rf >= 1)):
            raise ValueError(f"ref_frames must be 'all', 'first' or an int stride >= 1, got {rf!r}")

    def check_model(self, family: str, token_scale) -> None:
        if family not in FAMILIES:
            raise ValueError(f"AlignedGen does not support model family {family!r}; supported: {FAMILIES}")

    def check_sites(self, sites) -> None:
        if self.layers is None:
            return
        ok = {s.layer for s, _ in sites if s.kind in SHARE_KINDS.get(s.family, ())}
        bad = sorted(self.layers - ok)
        if bad:
            have = sorted(ok)
            span = f"{have[0]}-{have[-1]}" if have else "none"
            raise ValueError(f"layers {bad} are not self/joint/single attention layers of this model "
                             f"(sharing layers: {span})")

    # --- gating -----------------------------------------------------------------------------------------
    def applies(self, site: Site) -> bool:
        if site.kind not in SHARE_KINDS.get(site.family, ()):
            return False
        if self.layers is None:
            return site.kind in DEFAULT_KINDS[site.family]
        return site.layer in self.layers

    def active(self, call: AttentionCall):
        """Whether to share at this call: a bool, or a bool tensor when the step is one (torch.compile)."""
        if not self.enabled:
            return False
        if self.steps is None:
            return True
        i = call.step.index
        if i is None:
            return True  # the host cannot tell the step: share (the default range is all steps)
        return (i >= self.steps[0]) & (i < self.steps[1])

    def lam(self, call: AttentionCall):
        """λ for the reference keys: a float, or a 0-d tensor from tensor step fields (torch.compile)."""
        if self.schedule == "fix":
            if self.scale is None:
                return 1.1 if call.site.family == "flux" else 1.0
            return self.scale
        st, fam = call.step, call.site.family
        if fam in FLOW_FAMILIES and st.sigma is not None:
            s = st.sigma.clamp(0.0, 1.0) if torch.is_tensor(st.sigma) else min(max(float(st.sigma), 0.0), 1.0)
        elif st.timestep is not None:
            t = st.timestep if torch.is_tensor(st.timestep) else float(st.timestep)
            s = select(t <= 1.0, t, t / 1000.0) if fam in FLOW_FAMILIES else t / 1000.0
        elif st.progress is not None:
            s = 1.0 - st.progress
        else:
            s = 1.0
        return s * s

    # --- rows ---------------------------------------------------------------------------------------------
    def groups(self, call: AttentionCall) -> list[tuple[int, list[int]]]:
        """(reference row, target rows) per chunk of this call."""
        roles = call.roles if call.roles is not None else ("cond",) * call.batch
        groups: list[tuple[int, list[int]]] = []
        if "reference" in roles:
            for i, r in enumerate(roles):
                if r == "reference":
                    groups.append((i, []))
                elif r == "target" and groups:
                    groups[-1][1].append(i)
            return groups
        i, n = 0, len(roles)
        while i < n:
            j = i
            while j < n and roles[j] == roles[i]:
                j += 1
            if roles[i] in CHUNK_ROLES:
                size = int(self.chunk) if self.chunk else j - i
                for start in range(i, j, size):
                    rows = list(range(start, min(start + size, j)))
                    if self.reference < len(rows):
                        ref = rows[self.reference]
                        groups.append((ref, [r for r in rows if r != ref]))
            i = j
        return groups

    # --- the effect ---------------------------------------------------------------------------------------
    def __call__(self, call: AttentionCall, attend: Attend) -> torch.Tensor:
        on = self.active(call)
        if on is False:
            return attend(call.q, call.k, call.v)
        out = self._shared(call, attend)
        if on is not True:  # a step tensor (torch.compile): outside the step range the call is plain attention
            out = torch.where(on, out, attend(call.q, call.k, call.v))
        return out

    def _shared(self, call: AttentionCall, attend: Attend) -> torch.Tensor:
        groups = [g for g in self.groups(call) if g[1]]
        t = call.tokens
        k_img = t.k_image if t.k_image is not None else (slice(0, call.kv_len) if call.site.kind == "self" else None)
        q_img = t.q_image if t.q_image is not None else (slice(0, call.q_len) if call.site.kind == "self" else None)
        if not groups or k_img is None:
            return attend(call.q, call.k, call.v)
        rope = self._rope(call)
        lam = self.lam(call)
        keep = self._frames(call)
        out = None
        done: set = set()
        # one group (CFG chunk) at a time: its targets are usually contiguous rows (views, no copies), and only one
        # chunk's extended K/V exist at once
        for ref, ts in groups:
            rows = _index(ts, call.q.device)
            q_t, k_t, v_t = _take(call.q, rows), _take(call.k, rows), _take(call.v, rows)
            if self.adain != "none" and q_img is not None:
                q_t = self._adain_rows(q_t, call.q[ref:ref + 1], q_img, rope, call)
            if self.adain == "qk":
                k_t = self._adain_rows(k_t, call.k[ref:ref + 1], k_img, rope, call)
            # the shared block: the reference's image keys (ShiftPE-rotated, λ-scaled) and values
            k_ref, v_ref = call.k[ref:ref + 1, :, k_img], call.v[ref:ref + 1, :, k_img]
            k_ref = self._shift(k_ref, rope, k_img, call)
            if keep is not None:
                k_ref, v_ref = k_ref[:, :, keep], v_ref[:, :, keep]
            if torch.is_tensor(lam) or lam != 1.0:
                k_ref = k_ref * lam
            n = len(ts)
            k_ext = torch.cat([k_t, k_ref.expand(n, -1, -1, -1)], dim=2)
            v_ext = torch.cat([v_t, v_ref.expand(n, -1, -1, -1)], dim=2)
            del k_t, v_t
            mask_t = self._extend_mask(_take_mask(call.mask, rows), k_ref.shape[2])
            out_t = attend(q_t, k_ext, v_ext, mask=mask_t, roles=_sub_roles(call.roles, ts))
            del k_ext, v_ext, q_t
            if out is None:
                out = out_t.new_empty((call.batch,) + tuple(out_t.shape[1:]))
            out[rows] = out_t.to(out.dtype)
            del out_t
            done.update(ts)
            if not compiling():  # a compiled graph would guard on the count and recompile every call
                self.calls += 1

        rest = [r for r in range(call.batch) if r not in done]
        if rest:
            rows = _index(rest, call.q.device)
            out_r = attend(_take(call.q, rows), _take(call.k, rows), _take(call.v, rows),
                           mask=_take_mask(call.mask, rows), roles=_sub_roles(call.roles, rest))
            out[rows] = out_r.to(out.dtype)
        return out

    # --- pieces -------------------------------------------------------------------------------------------
    def _rope(self, call: AttentionCall) -> Optional[RopeInfo]:
        if call.site.family not in ROPE_FAMILIES:
            return None
        if call.rope is not None:
            return call.rope
        if self.rope_source is not None:
            return self.rope_source(call)
        self._warn(("norope", call.site.family),
                   f"{call.site.family}: the host gives no RoPE tables, so AdaIN acts on rotated q/k and ShiftPE is off")
        return None

    def _adain_rows(self, x_t, x_r, span: slice, rope, call) -> torch.Tensor:
        """AdaIN of x_t's image tokens (positions `span`) toward x_r's (one reference row per target row),
        computed before RoPE when the tables are known."""
        a, b = x_t[:, :, span], x_r[:, :, span]
        if rope is not None:
            a, b = rope.undo(a, span), rope.undo(b, span)
        y = adain(a.float(), b.float()).to(x_t.dtype)
        if rope is not None:
            y = rope.rotate(y, rope.cos[span], rope.sin[span])
        out = x_t.clone()
        out[:, :, span] = y
        return out

    def _shift_delta(self, call) -> Optional[torch.Tensor]:
        grid = call.tokens.grid
        axis = {"index": 0, "height": 1, "width": 2}[self.shift_axis]
        if self.shift == "auto":
            if grid is None or call.site.family != "flux":
                return None  # auto: ShiftPE on FLUX (AlignedGen); other RoPE families only when given explicitly
            amount = grid[axis] if axis else max(grid[0], 1)
        else:
            amount = int(self.shift)
        if amount == 0:
            return None
        return axis, amount

    def _shift(self, k_ref, rope, span: slice, call) -> torch.Tensor:
        if call.site.family not in ROPE_FAMILIES or rope is None:
            return k_ref
        d = self._shift_delta(call)
        if d is None:
            return k_ref
        axis, amount = d
        if rope.embed is not None:
            n_axes = _rope_axes(rope)
            ids = torch.zeros(1, n_axes)
            ids[0, axis] = float(amount)
            return rope.shift(k_ref, ids)
        if self.shift != "auto":  # asked for explicitly: say it cannot be done (auto is quietly off, documented)
            self._warn(("noembed", call.site.family),
                       f"{call.site.family}: this host's RoPE cannot be re-embedded at new positions; ShiftPE is off")
        return k_ref

    def _frames(self, call) -> Optional[torch.Tensor]:
        """Token indices (within the image span) of the reference frames to share, for videos."""
        grid = call.tokens.grid
        if self.ref_frames == "all" or grid is None or grid[0] <= 1:
            return None
        frames, rows, cols = grid
        chosen = [0] if self.ref_frames == "first" else list(range(0, frames, int(self.ref_frames)))
        per = rows * cols
        return torch.cat([torch.arange(f * per, (f + 1) * per) for f in chosen]).to(call.q.device)

    @staticmethod
    def _extend_mask(mask, n_extra: int):
        if mask is None:
            return None
        if mask.dtype == torch.bool:
            pad = torch.ones(mask.shape[:-1] + (n_extra,), dtype=torch.bool, device=mask.device)
        else:
            pad = torch.zeros(mask.shape[:-1] + (n_extra,), dtype=mask.dtype, device=mask.device)
        return torch.cat([mask, pad], dim=-1)

    def _warn(self, key, message: str) -> None:
        if key not in self._warned and not compiling():  # warned by eager calls; a graph would guard on the set
            self._warned.add(key)
            logger.warning("attnlab AlignedGen: %s", message)


def _rope_axes(rope: RopeInfo) -> int:
    n = getattr(rope, "axes", None)
    if n:
        return int(n)
    embed = rope.embed
    for attr in ("axes_dim", "axes_dims_rope"):
        for obj in (embed, getattr(embed, "__self__", None)):
            dims = getattr(obj, attr, None)
            if dims is not None:
                return len(dims)
    return 3


def _index(rows: list, device):
    """A slice for contiguous rows (views, no copies), else an index tensor."""
    if rows == list(range(rows[0], rows[0] + len(rows))):
        return slice(rows[0], rows[0] + len(rows))
    return torch.tensor(rows, device=device)


def _take(x: torch.Tensor, rows):
    return x[rows] if isinstance(rows, slice) else x.index_select(0, rows)


def _take_mask(mask, rows):
    if mask is None or mask.shape[0] == 1:
        return mask
    return _take(mask, rows if isinstance(rows, slice) else rows.to(mask.device))


def _sub_roles(roles, rows):
    return None if roles is None else tuple(roles[r] for r in rows)
