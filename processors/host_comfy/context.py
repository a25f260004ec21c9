"""Per-model-call context of the ComfyUI host: rows, step, geometry, and which attention site a call is.

One `CallContext` is built by the APPLY_MODEL router for every model call (never stored on the
patcher), and the dispatcher / UNet markers read and update it during that call.
"""

from __future__ import annotations

import logging
import math
from typing import Optional

import torch

from ..call import Site, StepInfo, TokenLayout, unet_level
from ..effects import EffectStack
from ..tracing import cached, compiling
from .model_plan import ModelPlan, site_name

logger = logging.getLogger("attnlab")

EFFECTS_KEY = "attnlab_effects"
CONTEXT_KEY = "attnlab_context"
ROLE_KEY = "attnlab_role"  # set in a copied model_options by guidance passes, e.g. "perturbed"
OVERRIDE_KEY = "optimized_attention_override"

_warned: set = set()


def warn_once(key, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning("attnlab: %s", message)


class HostCache:
    """Effect stacks per site and token layouts, shared by the calls of one router (bounded)."""

    LIMIT = 4096

    def __init__(self):
        self.stacks: dict = {}
        self.layouts: dict = {}

    def trim(self) -> None:
        if len(self.stacks) > self.LIMIT or len(self.layouts) > self.LIMIT:
            self.stacks.clear()
            self.layouts.clear()


def step_info(sigma, schedule, timestep: Optional[float] = None) -> StepInfo:
    """The sampler step of `sigma` (a tensor, one value per latent row, or a number): its index in
    `schedule` (ComfyUI's ``sample_sigmas``, incl. the final 0) when it is one of the schedule's sigmas,
    the step count, the sigma itself and `timestep` as given."""
    s = float(sigma.flatten()[0]) if torch.is_tensor(sigma) else (None if sigma is None else float(sigma))
    if schedule is None or s is None:
        return StepInfo(sigma=s, timestep=timestep)
    sched = schedule.flatten().float().cpu() if torch.is_tensor(schedule) else torch.tensor(list(schedule)).float()
    diffs = (sched[:-1] - s).abs() if len(sched) > 1 else (sched - s).abs()
    index = int(diffs.argmin())
    tol = 1e-4 * max(1.0, abs(s))
    # sample_sigmas holds only the steps this run executes (denoise < 1 truncates it): the run starts at 0
    return StepInfo(index if float(diffs[index]) <= tol else None, max(len(sched) - 1, 1), s, timestep, 0)


def traced_step_info(sigma, schedule) -> StepInfo:
    """`step_info` in tensor ops, for a compiled graph: index (the nearest schedule entry) and sigma are 0-d
    tensors, so the graph takes them as inputs instead of recompiling every step."""
    if not torch.is_tensor(sigma):
        return step_info(sigma, schedule)
    s = sigma.flatten()[0].float()
    if schedule is None or not torch.is_tensor(schedule):
        return StepInfo(sigma=s)
    sched = schedule.flatten().float().to(s.device)
    diffs = ((sched[:-1] if len(sched) > 1 else sched) - s).abs()
    return StepInfo(diffs.argmin(), max(len(sched) - 1, 1), s, None, 0)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class CallContext:
    """What one model call looks like to the effects, plus the bookkeeping to tell sites apart."""

    def __init__(self, plan: ModelPlan, effects, x: torch.Tensor, sigma, c_crossattn, transformer_options: dict,
                 cache: HostCache):
        self.plan = plan
        self.effects = tuple(effects)
        self._cache = cache
        self.options = transformer_options
        cond_or_uncond = list(transformer_options.get("cond_or_uncond") or [0])
        chunk = max(1, x.shape[0] // len(cond_or_uncond))
        forced = transformer_options.get(ROLE_KEY)
        if isinstance(forced, tuple) and len(forced) == x.shape[0]:
            self.roles = forced  # one role per row (FreeSwim's dual-path forwards: window rows + "full" twins)
        else:
            self.roles = tuple(forced if forced else ("uncond" if c == 1 else "cond") for c in cond_or_uncond
                               for _ in range(chunk))
        self._sigma, self._schedule = sigma, transformer_options.get("sample_sigmas")
        self._step: Optional[StepInfo] = None
        self.text_len = 0 if c_crossattn is None else int(c_crossattn.shape[1]) + plan.register_length
        self.latent = tuple(int(s) for s in x.shape[2:])
        self.grid = self._grid()
        self.counter = 0  # DiT: index of the next attention call in the forward's call plan
        self.calls = 0  # dispatcher calls seen
        self.pending = None  # UNet: (kind, block) announced by an attn1/attn2 marker, not yet consumed
        self.missed: list = []
        self.broken: Optional[str] = None

    # --- step and geometry ----------------------------------------------------------------------
    @property
    def step(self) -> StepInfo:
        return self.current_step()

    def current_step(self) -> StepInfo:
        """The sampler step, found when an effect first asks (reading sigma's value is a device sync); in a
        compiled graph as tensors (`traced_step_info`)."""
        if compiling():
            return traced_step_info(self._sigma, self._schedule)
        if self._step is None:
            self._step = step_info(self._sigma, self._schedule)
        return self._step

    def _grid(self):
        if self.plan.family == "unet":
            return None  # per level: from the latent size and the call's token count
        pt, ph, pw = self.plan.patch
        if len(self.latent) == 3:
            t, h, w = self.latent
        else:
            t, (h, w) = 1, self.latent
        return (_ceil_div(t, pt), _ceil_div(h, ph), _ceil_div(w, pw))

    def _cached(self, key, build) -> TokenLayout:
        """Layouts are reused across calls and steps (effects key their caches on them)."""
        return cached(self._cache.layouts, key, build, HostCache.LIMIT)

    # --- sites ----------------------------------------------------------------------------------
    def stack_for(self, site: Site) -> EffectStack:
        key = (tuple(id(e) for e in self.effects), site)  # the cached stack keeps the effects (and ids) alive
        return cached(self._cache.stacks, key, lambda: EffectStack.for_site(self.effects, site), HostCache.LIMIT)

    def resolve(self, n_q: int, n_k: int, options: dict):
        """(site, token layout) of the attention call about to run, or (None, None) to pass it through."""
        if self.broken:
            return None, None
        if self.plan.family == "unet":
            return self._resolve_unet(n_q, n_k, options)
        return self._resolve_dit(n_q, n_k, options)

    def _resolve_unet(self, n_q, n_k, options):
        pending, self.pending = self.pending, None
        kind = pending[0] if pending else ("self" if n_q == n_k else "cross")
        tindex, bindex = options.get("transformer_index"), options.get("block_index", 0)
        if tindex is None or tindex >= len(self.plan.unet_offsets):
            self._break(f"UNet call without a usable transformer_index ({tindex})")
            return None, None
        layer = self.plan.unet_offsets[tindex] + int(bindex)
        name = f"{self.plan.unet_names[tindex]}.transformer_blocks.{bindex}.{'attn1' if kind == 'self' else 'attn2'}"
        site = Site("unet", kind, layer, name)
        full = options.get("original_shape")
        key = ("unet", kind, n_q, n_k, tuple(full[-2:]) if full is not None else self.latent[-2:])
        return site, (lambda: self._cached(key, lambda: self._unet_layout(kind, n_q, n_k, options)))

    def _unet_layout(self, kind, n_q, n_k, options) -> TokenLayout:
        full = options.get("original_shape")
        H, W = (int(full[-2]), int(full[-1])) if full is not None else self.latent[-2:]
        found = unet_level(H, W, n_q)
        spans = dict(q_image=slice(0, n_q))
        spans["k_text" if kind == "cross" else "k_image"] = slice(0, n_k)
        if found is None:  # a token count no level of this latent has
            return TokenLayout(**spans)
        h, w, level = found
        px = self.plan.vae_scale[1] * 2**level
        return TokenLayout.at((1, h, w), (1, px, px), self.plan.native_size, **spans)

    def _resolve_dit(self, n_q, n_k, options):
        plan = self.plan
        block_type, block_index = options.get("block_type"), options.get("block_index")
        if block_type is not None and block_index is not None and plan.family == "flux":
            kind = "joint" if block_type == "double" else "single"
            layer = int(block_index) + (plan.double_blocks if kind == "single" else 0)
        else:
            if self.counter >= len(plan.calls):
                self._break(f"{plan.family}: more attention calls per forward than the model has ({len(plan.calls)})")
                return None, None
            kind, layer = plan.calls[self.counter]
            self.counter += 1
        n_img = math.prod(self.grid)
        expected = {
            "joint": n_q == n_k and n_q >= n_img + (self.text_len if plan.family == "sd3" else 0),
            "single": n_q == n_k and n_q >= n_img,
            "self": n_q == n_k == n_img,
            "cross": n_q == n_img and (n_k == self.text_len or not self.text_len),
            "cross_image": n_q == n_img and n_k != self.text_len,
        }[kind]
        if not expected:
            self._break(f"{plan.family} attention call {self.counter} ({kind} of layer {layer}) has {n_q} queries "
                        f"and {n_k} keys, which does not match the model's call plan")
            return None, None
        if kind == "cross_image":
            return None, None  # Wan I2V attention to CLIP image tokens: left stock
        site = Site(plan.family, kind, layer, site_name(plan, kind, layer))
        key = (plan.family, kind, n_q, n_k, self.grid, self.text_len)
        return site, (lambda: self._cached(key, lambda: self._dit_layout(kind, n_q, n_k, n_img)))

    def _dit_layout(self, kind, n_q, n_k, n_img) -> TokenLayout:
        scale = self.plan.token_scale
        if kind in ("joint", "single"):
            n_text = self.text_len or n_q - n_img  # FLUX Kontext reference tokens follow the image span
            text, image = slice(0, n_text), slice(n_text, n_text + n_img)
            return TokenLayout.at(self.grid, scale, self.plan.native_size, q_image=image, k_image=image, q_text=text,
                                  k_text=text, text_first=True)
        k_span = "k_text" if kind == "cross" else "k_image"
        return TokenLayout.at(self.grid, scale, self.plan.native_size, q_image=slice(0, n_q), **{k_span: slice(0, n_k)})

    # --- UNet markers -----------------------------------------------------------------------------
    def announce(self, kind: str, options: dict) -> None:
        if self.pending is not None:
            self.missed.append(self.pending)
        self.pending = (kind, options.get("block"), options.get("block_index"))

    def _break(self, reason: str) -> None:
        self.broken = reason
        warn_once(("plan", self.plan.family, reason.split(" has ")[0]), reason + "; effects are off for the rest of this call")

    def finish(self) -> None:
        if self.pending is not None:
            self.missed.append(self.pending)
            self.pending = None
        if self.calls == 0 and self.effects:
            warn_once(("unreached", self.plan.family),
                      f"the attention override was never reached on this {self.plan.family} model (ComfyUI older than "
                      "0.3.60, or another node replaced every attention); attnlab effects did nothing")
        for kind, block, index in self.missed:
            warn_once(("missed", kind, str(block), index),
                      f"{'attn1' if kind == 'self' else 'attn2'} of UNet block {block}/{index} is replaced by another "
                      "node, so attnlab effects skip it (apply attnlab nodes after that node to chain through it)")
