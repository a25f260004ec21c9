"""FreeSwim (arXiv 2511.14712; `WillWu111/FreeSwim`): inward sliding-window attention with a full-attention
branch that supplies the cross-attention, for generation above the training resolution.

Per denoiser forward (driven by the hosts' dual-pass hooks, `host_diffusers/dual_pass.py` and
`host_comfy/dual_pass.py`), every batch row is a *window* row; rows whose cross-attention is to be
overridden afresh get a *full* twin appended (role "full"):

    self / joint image queries   window rows: inward window (see `freeswim_window`); full rows: plain attention
    cross-attention (Wan, UNet)  window rows: the full twin's output, copied (their own text attention is never
                                 evaluated), or the cached copy of the last guide step; full rows: their own
    joint text queries (MMDiT)   option (a) "text_stream": the window rows' text-query outputs come from the full
                                 twin (or the cache); option (b) "lse": see `FreeSwim.mmdit_override`

Only the window rows' prediction leaves the forward. The cross-attention override is cached every
`cache_steps` = k steps (k = 1 recomputes each step = the official "nocache" code); `override_uncond`
chooses the uncond semantics (True: the uncond pass is overridden like the cond pass, as the official nocache
code; False: the uncond pass keeps its own cross-attention, as the official cache code). Steps whose rows all
use the cache (or keep their own) run no full branch at all.

The logit scale ×sqrt(1 + ln2/ln(h0·w0)) of the official code is the entropy-scaling effect with N = 2·T,
T = h0·w0 the base grid (`FreeSwimLogitScale`), tied to the base grid of each layer (no hard-coded 30×52).
"""

from __future__ import annotations

import contextlib
import math
import threading
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from .call import AttentionCall, Site, StepInfo, TokenLayout
from .effects import Attend, Effect
from .entropy import EntropyScaling, _size3
from .params import (InvalidParameter, boolean, choice, int_list, integer, number, pixel_size, real_pair)
from .tracing import compiling
from .freeswim_window import (BACKENDS, FlexWindow, WindowSpec, chunked_window_attention, dense_window_attention,
                              half_widths)

FULL = "full"
MMDIT_OVERRIDES = ("text_stream", "lse", "none")
MAX_TILE = 4096
SUPPORTED_FAMILIES = ("wan", "flux", "sd3", "unet", "pixart")


@dataclass
class BranchPlan:
    """The rows of one dual-path forward. Rows ``0..B-1`` are the window rows (the caller's own rows,
    roles kept), rows ``B..`` their full twins (role "full").

    modes[r] for window row r: "fresh" (override from its full twin ``partner[r]``, stored in the cache under
    ``keys[r]`` when `store`), "cached" (override from the cache entry ``keys[r]``) or "own" (no override).
    """

    modes: tuple[str, ...]
    partner: dict = field(default_factory=dict)
    keys: dict = field(default_factory=dict)
    store: bool = False

    @property
    def window_rows(self) -> int:
        return len(self.modes)

    @property
    def full_rows(self) -> list[int]:
        return [r for r, m in enumerate(self.modes) if m == "fresh"]


class FreeSwim(Effect):
    """The window/override effect ("kernel" stage: directly above the host's kernel).

    window_scale: window = (2⌊h0·s⌋//2 + 1) × (2⌊w0·s⌋//2 + 1) tokens of the base grid h0 × w0 (default 1.0).
    base_size:    (height, width) or (frames, height, width) pixels the window is sized for; None = the model's
                  native size as the host reports it (per UNet level: that level's native grid).
    cache_steps:  k; the override is recomputed on executed steps ≡ 0 mod k and reused in between (1 = always).
    override_uncond: override the uncond pass too (True, nocache semantics) or keep its own cross-attention.
    backend:      "auto" (flex on CUDA when available, else chunked), "chunked", "flex", "dense" (tests only).
    tile:         chunked query tile (rows, cols); None = half the window. flex_tile: flex token tile (8, 16).
    mmdit_override: joint attention (FLUX double blocks, SD3): "text_stream" (option a), "lse" (option b:
                  image queries merge their windowed image partial with the full twin's text partial by
                  log-sum-exp; chunked path) or "none".
    cache_device: where cached overrides live (e.g. "cpu" to spare GPU memory); None = where they were made.
    inward:       True (FreeSwim): border windows shift inward; False: the naive truncated window (ablation).
    override_layers: global layer indices (docs/addressing.md) whose cross-attention (MMDiT: text stream) is
                  overridden; None = all (official). Other layers keep the window rows' own.
    override_steps: (start, end) fractions of the schedule (step index / count, inclusive) with the override and
                  the full branch; outside it the window branch runs alone. Default (0, 1) = every step (official).
    """

    stage = "kernel"
    name = "freeswim"

    def __init__(self, window_scale: float = 1.0, base_size=None, cache_steps: int = 1, override_uncond: bool = True,
                 backend: str = "auto", tile: Optional[tuple[int, int]] = None, flex_tile=(8, 16),
                 mmdit_override: str = "text_stream", cache_device=None, inward: bool = True,
                 override_layers=None, override_steps: tuple[float, float] = (0.0, 1.0)):
        self.window_scale = number("window_scale", window_scale, 0.0, 16.0, low_open=True)
        self.base_size = _size3(base_size, "base_size")
        self.cache_steps = integer("cache_steps", cache_steps, 1, 1000)
        self.override_uncond = boolean("override_uncond", override_uncond)
        self.backend = choice("backend", backend, BACKENDS)
        self.tile = None if tile is None else pixel_size("tile", tile, dims=(2,), high=MAX_TILE)
        self.flex_tile = pixel_size("flex_tile", flex_tile, dims=(2,), high=MAX_TILE)
        self.mmdit_override = choice("mmdit_override", mmdit_override, MMDIT_OVERRIDES)
        self.cache_device = cache_device
        self.inward = boolean("inward", inward)
        self.override_layers = None if override_layers is None else frozenset(
            int_list("override_layers", override_layers, 0))
        self.override_steps = real_pair("override_steps", override_steps, 0.0, 1.0)
        self.validate()
        self.flex = FlexWindow(self.flex_tile)
        self.cache: dict = {}  # (site name, row key) -> override tensor [H, N, D]
        self.cache_meta: dict = {}  # row key -> (executed step, shape key) of the last store
        self._last_executed = None  # executed step of the previous plan: a smaller one starts a new run
        self.skipped: set = set()  # site names passed through (no usable grid)
        self.stats = {"window_calls": 0, "full_calls": 0, "cross_evaluated_rows": 0, "cache_hits": 0}
        self._plan = threading.local()
        self._traced_plan: Optional[BranchPlan] = None

    def __repr__(self) -> str:
        return (f"FreeSwim(window_scale={self.window_scale}, base_size={self.base_size}, cache_steps={self.cache_steps}, "
                f"override_uncond={self.override_uncond}, backend={self.backend!r}, mmdit_override={self.mmdit_override!r})")

    def __deepcopy__(self, memo):  # ComfyUI deep-copies model_options on clone: one effect, one cache
        return self

    # --- validation -------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Every setting is checked as it is set (`__init__`); a changed attribute is checked again here."""
        number("window_scale", self.window_scale, 0.0, 16.0, low_open=True)
        integer("cache_steps", self.cache_steps, 1, 1000)
        choice("backend", self.backend, BACKENDS)
        choice("mmdit_override", self.mmdit_override, MMDIT_OVERRIDES)
        real_pair("override_steps", self.override_steps, 0.0, 1.0)

    def check_sites(self, sites) -> None:
        if self.override_layers is None:
            return
        layers = {s.layer for s, _ in sites}
        missing = sorted(self.override_layers - layers)
        if missing:
            raise InvalidParameter(f"override_layers {missing} are not layers of this model (it has layers "
                                   f"{min(layers)}–{max(layers)}; see docs/addressing.md)")

    def check_model(self, family: str, token_scale) -> None:
        if family not in SUPPORTED_FAMILIES:
            raise ValueError(f"FreeSwim supports {SUPPORTED_FAMILIES}; got a {family} model")
        if self.base_size is None or token_scale is None:
            return
        frames, height, width = self.base_size
        st, sh, sw = token_scale
        if height % sh or width % sw:
            raise ValueError(f"FreeSwim base_size {self.base_size[1:]} must be a multiple of the {family} model's "
                             f"patch of {sh}×{sw} pixels")

    def applies(self, site: Site) -> bool:
        return True

    # --- plan ------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def active(self, plan: Optional[BranchPlan]):
        """The plan of the forward run inside this block (set by a dual-pass hook). Kept per thread, and in a
        plain attribute that compiled code reads (torch.compile cannot trace thread-local storage)."""
        previous = self._traced_plan if compiling() else getattr(self._plan, "value", None)
        self._set_plan(plan)
        try:
            yield
        finally:
            self._set_plan(previous)

    def _set_plan(self, plan: Optional[BranchPlan]) -> None:
        self._traced_plan = plan
        if not compiling():
            self._plan.value = plan

    @property
    def plan(self) -> Optional[BranchPlan]:
        return self._traced_plan if compiling() else getattr(self._plan, "value", None)

    def overrides(self, role: str) -> bool:
        return role != "uncond" or self.override_uncond

    def overrides_at(self, step: StepInfo) -> bool:
        """Whether `step` lies in `override_steps` (unknown steps count as inside)."""
        if tuple(self.override_steps) == (0.0, 1.0):
            return True
        p = step.progress
        return p is None or self.override_steps[0] <= p <= self.override_steps[1]

    def overrides_layer(self, site: Site) -> bool:
        return self.override_layers is None or site.layer in self.override_layers

    def plan_rows(self, roles: Sequence[str], step: StepInfo, shape_key) -> tuple[list[int], BranchPlan]:
        """(rows to duplicate as full twins, the plan) for a forward whose rows have `roles` at `step`.
        Rows of the same role are told apart by their ordinal; the cache is (re)filled on guide steps
        (executed ≡ 0 mod k, unknown steps, a new shape or a cache from another run). A step before the
        previous plan's starts a new sampling run: the cache is dropped first."""
        k = self.cache_steps
        # with k = 1 nothing is cached and the plan is the same every step: the step is not read at all (so a
        # compiled graph does not depend on it); caching (k > 1) decides per step in Python (eager only)
        executed = step.executed if k > 1 else None
        if executed is not None and self._last_executed is not None and executed < self._last_executed:
            self.reset()
        self._last_executed = executed
        modes, partner, keys, dup = [], {}, {}, []
        seen: dict = {}
        store = k > 1
        in_range = self.overrides_at(step)
        for r, role in enumerate(roles):
            ordinal = seen.get(role, 0)
            seen[role] = ordinal + 1
            if not in_range or not self.overrides(role):
                modes.append("own")
                continue
            key = (role, ordinal)
            keys[r] = key
            meta = self.cache_meta.get(key)
            valid = (k > 1 and meta is not None and executed is not None and meta[1] == shape_key
                     and meta[0] is not None and 0 <= executed - meta[0] < k)
            guide = k == 1 or executed is None or executed % k == 0 or not valid
            if guide:
                modes.append("fresh")
                partner[r] = len(roles) + len(dup)
                dup.append(r)
                if store:
                    self.cache_meta[key] = (executed, shape_key)
            else:
                modes.append("cached")
        return dup, BranchPlan(tuple(modes), partner, keys, store)

    def reset(self) -> None:
        """Drop the cached overrides (hosts call this at the start of a run)."""
        self.cache.clear()
        self.cache_meta.clear()
        self._last_executed = None

    def _count(self, stat: str, n: int = 1) -> None:
        """`stats` (and `skipped`, for a site name) count eager calls: a compiled graph would guard on them."""
        if compiling():
            return
        if stat in self.stats:
            self.stats[stat] += n
        else:
            self.skipped.add(stat)

    # --- geometry ----------------------------------------------------------------------------------------
    def spec(self, call: AttentionCall) -> Optional[WindowSpec]:
        t: TokenLayout = call.tokens
        if t.grid is None or t.q_image is None:
            return None
        if self.base_size is not None:
            if t.scale is None:
                return None
            base = t.grid_for(self.base_size)
        else:
            base = t.native_grid
        if base is None:
            return None
        half = half_widths((base[1], base[2]), self.window_scale)
        text = t.q_text if call.site.kind in ("joint", "single") else None
        if text is not None and text.stop - text.start == 0:
            text = None
        return WindowSpec(tuple(t.grid), half, t.q_image, text, self.inward)

    # --- the effect ----------------------------------------------------------------------------------------
    def __call__(self, call: AttentionCall, attend: Attend) -> torch.Tensor:
        if call.site.kind == "cross":
            return self._cross(call, attend)
        return self._self(call, attend)

    def _rows(self, call: AttentionCall):
        """(window rows, full rows) of this call; every row is a window row when the host knows no roles."""
        if call.roles is None:
            return list(range(call.batch)), []
        full = call.rows_with(FULL)
        return [r for r in range(call.batch) if r not in full], full

    def _window(self, q, k, v, spec: WindowSpec, call: AttentionCall, attend: Attend, image_only: bool = False):
        """Window attention of rows (q, k, v) through the chosen backend (image-query rows only if asked)."""
        self._count("window_calls")
        backend = self.backend
        if backend == "auto":
            backend = "flex" if q.is_cuda and self.flex.available() else "chunked"

        def kernel(q2, k2, v2, mask, scale):
            return attend(q2, k2, v2, mask=mask)

        if backend == "flex":
            out = self.flex(q, k, v, spec, call.scale)
        elif backend == "dense":
            out = dense_window_attention(q, k, v, spec, call.scale, kernel)
        else:
            if image_only and spec.text is not None:
                return _image_rows(q, k, v, spec, kernel, self.tile)
            out = chunked_window_attention(q, k, v, spec, call.scale, kernel, self.tile)
        return out[:, :, spec.image] if image_only and spec.text is not None else out

    def _self(self, call: AttentionCall, attend: Attend) -> torch.Tensor:
        if call.mask is not None:
            raise ValueError(f"FreeSwim cannot window a masked attention call ({call.site.name})")
        spec = self.spec(call)
        if spec is None:
            self._count(call.site.name)
            return attend(call.q, call.k, call.v)
        if spec.covers_grid and (call.site.kind != "joint" or self.plan is None):
            return attend(call.q, call.k, call.v)  # the window is the grid: plain attention, bit-exact
        win, full = self._rows(call)
        plan = (self.plan if call.site.kind == "joint" and self.mmdit_override != "none"
                and self.overrides_layer(call.site) else None)
        if plan is not None and (call.roles is None or len(win) != plan.window_rows):
            plan = None
        pieces: dict[int, torch.Tensor] = {}
        if full:
            self._count("full_calls")
            fi = torch.as_tensor(full, device=call.q.device)
            out_f = attend(call.q[fi], call.k[fi], call.v[fi])
            for i, r in enumerate(full):
                pieces[r] = out_f[i]
        if win:
            wi = torch.as_tensor(win, device=call.q.device)
            q, k, v = call.q[wi], call.k[wi], call.v[wi]
            if plan is None or spec.text is None:
                out_w = self._window(q, k, v, spec, call, attend) if not spec.covers_grid else attend(q, k, v)
                for i, r in enumerate(win):
                    pieces[r] = out_w[i]
            else:
                pieces.update(self._joint_override(call, attend, spec, win, q, k, v, pieces, plan))
        return torch.stack([pieces[r] for r in range(call.batch)])

    def _joint_override(self, call, attend, spec: WindowSpec, win, q, k, v, pieces, plan: BranchPlan) -> dict:
        """Window rows of a joint call under an MMDiT override: image queries windowed (option b: merged with
        the full twin's text partial), text queries from the full twin / the cache / their own."""
        txt = spec.text
        out = {}
        if self.mmdit_override == "lse":
            img_rows = self._lse_image_rows(call, spec, win, q, k, v, plan)
        elif spec.covers_grid:
            img_rows = attend(q, k, v)[:, :, spec.image]
        else:
            img_rows = self._window(q, k, v, spec, call, attend, image_only=True)
        own = [i for i, r in enumerate(win) if plan.modes[r] == "own"]
        own_text = None
        if own:
            oi = torch.as_tensor(own, device=q.device)
            own_text = attend(q[oi][:, :, txt], k[oi], v[oi], mask=None)
            self._count("cross_evaluated_rows", len(own))
        for i, r in enumerate(win):
            mode = plan.modes[r]
            if mode == "own":
                text_out = own_text[own.index(i)]
            else:
                text_out = self._override_for(call, plan, r, lambda: pieces[plan.partner[r]][:, txt])
            out[r] = _place(img_rows[i], text_out, spec)
        return out

    def _lse_image_rows(self, call, spec: WindowSpec, win, q, k, v, plan: BranchPlan) -> torch.Tensor:
        """Option (b): each window row's image-query output = LSE merge of (its windowed image-key partial) and
        (the text-key partial of its full twin's image queries, or of its own queries for "own" rows)."""
        from .freeswim_window import lse_window_partials

        scale = call.default_scale()
        out_w, lse_w = lse_window_partials(q, k, v, spec, scale, self.tile)
        rows = []
        for i, r in enumerate(win):
            mode = plan.modes[r]
            src = plan.partner.get(r) if mode == "fresh" else None
            if mode == "cached":
                o_t, l_t = self._override_for(call, plan, r, None, tag="lse")
            else:
                qs = call.q[src] if src is not None else q[i]
                o_t, l_t = _text_partial(qs[:, spec.image], (call.k[src] if src is not None else k[i])[:, spec.text],
                                         (call.v[src] if src is not None else v[i])[:, spec.text], scale)
                if mode == "fresh" and plan.store:
                    self._store(call, plan, r, (o_t, l_t), tag="lse")
            m = torch.maximum(lse_w[i], l_t)
            a, b = torch.exp(lse_w[i] - m), torch.exp(l_t - m)
            rows.append(((a[..., None] * out_w[i] + b[..., None] * o_t) / (a + b)[..., None]).to(q.dtype))
        return torch.stack(rows)

    def _store(self, call, plan, r, value, tag=""):
        dev = self.cache_device
        if dev is not None:
            value = tuple(x.to(dev) for x in value) if isinstance(value, tuple) else value.to(dev)
        self.cache[(call.site.name, tag, plan.keys[r])] = value

    def _override_for(self, call: AttentionCall, plan: BranchPlan, r: int, fresh, tag: str = ""):
        """The override of window row r: its full twin's output (`fresh()`), stored when caching, or the cache."""
        if plan.modes[r] == "fresh":
            value = fresh()
            if plan.store:
                self._store(call, plan, r, value.clone() if torch.is_tensor(value) else value, tag)
                value = self.cache[(call.site.name, tag, plan.keys[r])]
            return _to(value, call.q.device)
        try:
            value = self.cache[(call.site.name, tag, plan.keys[r])]
        except KeyError:
            raise RuntimeError(f"FreeSwim: no cached override for {call.site.name} rows {plan.keys[r]}; the cache "
                               "was reset mid-run") from None
        self._count("cache_hits")
        return _to(value, call.q.device)

    def _cross(self, call: AttentionCall, attend: Attend) -> torch.Tensor:
        plan = self.plan
        win, full = self._rows(call)
        if (plan is None or call.roles is None or len(win) != plan.window_rows
                or not self.overrides_layer(call.site)):
            return attend(call.q, call.k, call.v)  # no dual path running (or not at this layer): the model's own
        evaluate = full + [r for r in win if plan.modes[r] == "own"]
        pieces: dict[int, torch.Tensor] = {}
        if evaluate:
            evaluate.sort()
            ei = torch.as_tensor(evaluate, device=call.q.device)
            mask = call.mask
            if mask is not None and mask.ndim == 4 and mask.shape[0] == call.batch:
                mask = mask[ei]
            out = attend(call.q[ei], call.k[ei], call.v[ei], mask=mask)
            self._count("cross_evaluated_rows", sum(1 for r in evaluate if r in win))
            for i, r in enumerate(evaluate):
                pieces[r] = out[i]
        for r in win:
            if plan.modes[r] != "own":
                pieces[r] = self._override_for(call, plan, r, lambda r=r: pieces[plan.partner[r]])
        return torch.stack([pieces[r] for r in range(call.batch)])


def _to(value, device):
    if isinstance(value, tuple):
        return tuple(x.to(device) for x in value)
    return value.to(device)


def _place(img: torch.Tensor, text: torch.Tensor, spec: WindowSpec) -> torch.Tensor:
    """[H, N, D] row from its image-query and text-query outputs in the call's token order."""
    parts = sorted([(spec.image.start, img), (spec.text.start, text)], key=lambda p: p[0])
    return torch.cat([p[1] for p in parts], dim=-2)


def _image_rows(q, k, v, spec: WindowSpec, kernel, tile):
    """Image-query rows of a joint window attention (chunked), without evaluating the text queries."""
    return chunked_window_attention(q, k, v, spec, None, kernel, tile, text_queries=False)


def _text_partial(q_img, k_txt, v_txt, scale):
    """(output, log-sum-exp) of image queries attending to the text keys only (fp32)."""
    logits = (q_img.float() @ k_txt.float().transpose(-1, -2)) * scale
    lse = torch.logsumexp(logits, dim=-1)
    return torch.softmax(logits, dim=-1) @ v_txt.float(), lse


class FreeSwimLogitScale(EntropyScaling):
    """The official logit scale ×sqrt(1 + ln2/ln(h0·w0)) = entropy scaling with N = 2·T, T = h0·w0 image tokens
    of one frame of the base grid (30×52 for Wan 480×832 → ≈ 1.046). strength s: λ = (ln 2T / ln T)^(s/2);
    1 = official, 0 = off (stock). Applies to self/joint attention of both branches, never to cross-attention."""

    name = "freeswim_logit_scale"

    def __init__(self, strength: float = 1.0, base_size=None):
        super().__init__(strength=strength, train_size=base_size, token_count="image")

    def counts(self, call: AttentionCall) -> tuple[int, int]:
        tokens = call.tokens
        base = tokens.grid_for(self.train_size) if self.train_size else tokens.native_grid
        if base is None:
            raise ValueError(f"FreeSwim's logit scale needs the base grid at {call.site.name or call.site}")
        t = base[1] * base[2]
        return 2 * t, t

    def check_model(self, family: str, token_scale) -> None:
        """base_size is checked by the FreeSwim effect (one message naming base_size)."""

    def lam(self, call: AttentionCall) -> float:
        if call.tokens.grid is None:
            return 1.0
        return super().lam(call)

    def __deepcopy__(self, memo):
        return self

    def __repr__(self) -> str:
        return f"FreeSwimLogitScale(strength={self.strength}, base_size={self.train_size})"


def freeswim_effects(logit_scale: float = 1.0, **options) -> list:
    """[FreeSwimLogitScale (when logit_scale > 0), FreeSwim(**options)]: what the hosts install."""
    logit_scale = number("logit_scale", logit_scale, 0.0, 4.0)
    swim = FreeSwim(**options)
    effects = [swim]
    if logit_scale:
        effects.insert(0, FreeSwimLogitScale(logit_scale, options.get("base_size")))
    return effects


def check_target_size(height: int, width: int, multiple: int, name: str = "target size") -> None:
    """Raise ValueError unless height and width are positive multiples of `multiple` pixels."""
    height, width = pixel_size(name, (height, width), dims=(2,))
    if height <= 0 or width <= 0 or height % multiple or width % multiple:
        raise ValueError(f"FreeSwim {name} {height}×{width} must be positive multiples of {multiple} pixels "
                         "(the model's VAE factor × patch size)")
