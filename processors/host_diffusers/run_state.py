"""Run state for the diffusers host: step, sigma, row roles and token geometry of the current forward.

A diffusers `ModelHook` on the denoiser fills it before every forward from what the pipeline supplies:
the forward's own arguments (latent shape, timestep, text length), the pipeline's scheduler
(step index and sigma, looked up, never counted), the pipeline's `cache_context("cond"/"uncond", ...)`
(FLUX and Wan run cond and uncond as separate forwards), and the pipeline's known batch layout for
CFG-batched pipelines (``cat([uncond, cond])``). Callers that build their own batches (guidance
pipelines) set roles explicitly with `RunState.roles_for(...)`.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from typing import Optional

import torch
from diffusers.hooks.hooks import HookRegistry, ModelHook, StateManager

from ..call import ROLES, StepInfo
from .model_info import Geometry

HOOK_NAME = "attnlab_run_state"

# Pipelines that batch CFG as cat([negative, positive]) along the batch axis.
_CFG_BATCHED_FAMILIES = ("unet", "sd3", "pixart")


class _ContextSink(StateManager):
    """Receives the pipeline's `cache_context` (diffusers pushes it into stateful hooks' StateManagers)."""

    def __init__(self):
        super().__init__(object)
        self.latest = None

    def set_context(self, context) -> None:
        self.latest = context


class RunState:
    """Per-denoiser state shared by every attnlab processor installed on it."""

    def __init__(self, geometry: Geometry, pipeline=None):
        self.geometry = geometry
        self.pipeline = pipeline
        self.step = StepInfo()
        self.roles: Optional[tuple[str, ...]] = None
        self.latent: Optional[tuple[int, int, int]] = None  # latent cells (frames, height, width)
        self.grid: Optional[tuple[int, int, int]] = None  # image tokens (frames, rows, cols)
        self.text_len: Optional[int] = None
        self._role_override: list = []
        self.cfg_from_encode: Optional[bool] = None  # set by `watch_cfg` for pipelines without the property
        self._run, self._run_first, self._run_last = None, None, -1  # current run: key, first and last index
        self._context = _ContextSink()

    # --- explicit roles -------------------------------------------------------------------------
    @contextlib.contextmanager
    def roles_for(self, roles):
        """Declare the role of every batch row for forwards run inside this block: one role per row, or a
        single role name for all rows of any batch size."""
        roles = roles if isinstance(roles, str) else tuple(roles)
        bad = [r for r in ((roles,) if isinstance(roles, str) else roles) if r not in ROLES]
        if bad:
            raise ValueError(f"unknown row roles {bad}; known roles: {ROLES}")
        self._role_override.append(roles)
        try:
            yield
        finally:
            self._role_override.pop()

    # --- filled before each forward -------------------------------------------------------------
    def begin_forward(self, batch: int, latent: tuple[int, int, int], grid, text_len, timestep) -> None:
        self.latent, self.grid, self.text_len = latent, grid, text_len
        self.roles = self.resolve_roles(batch)
        self.step = self.resolve_step(timestep)

    def resolve_roles(self, batch: int) -> tuple[str, ...]:
        if self._role_override:
            roles = self._role_override[-1]
            if isinstance(roles, str):
                return (roles,) * batch
            if len(roles) != batch:
                raise ValueError(f"roles_for declared {len(roles)} rows but the denoiser got a batch of {batch}")
            return roles
        ctx = self._context.latest
        if ctx is not None and ctx.name in ("cond", "uncond"):
            return (ctx.name,) * batch
        pipe = self.pipeline
        cfg = getattr(pipe, "do_classifier_free_guidance", self.cfg_from_encode)
        if pipe is not None and self.geometry.family in _CFG_BATCHED_FAMILIES and cfg and batch % 2 == 0:
            half = batch // 2
            return ("uncond",) * half + ("cond",) * half
        return ("cond",) * batch

    def resolve_step(self, timestep) -> StepInfo:
        t = None
        if timestep is not None:
            t = float(timestep.flatten().max()) if torch.is_tensor(timestep) else float(timestep)
        ctx = self._context.latest
        if ctx is not None and ctx.step_index is not None:
            first = self._first(("context", ctx.num_inference_steps), ctx.step_index)
            return StepInfo(ctx.step_index, ctx.num_inference_steps, ctx.sigma, t, first)
        scheduler = getattr(self.pipeline, "scheduler", None)
        if scheduler is None or t is None or getattr(scheduler, "timesteps", None) is None:
            return StepInfo(timestep=t)
        timesteps = scheduler.timesteps
        count = len(timesteps)
        index = getattr(scheduler, "step_index", None)
        if index is None:
            # FLUX feeds t/1000 to its transformer; compare in the scheduler's units.
            t_sched = t * 1000.0 if self.geometry.family == "flux" else t
            diffs = (timesteps.float().cpu() - t_sched).abs()
            best = int(diffs.argmin())
            index = best if float(diffs[best]) <= 1e-3 * max(1.0, abs(t_sched)) else None
        sigma = None
        if index is not None and getattr(scheduler, "sigmas", None) is not None and index < len(scheduler.sigmas):
            sigma = float(scheduler.sigmas[index])
        elif getattr(scheduler, "alphas_cumprod", None) is not None and 0 <= int(round(t)) < len(scheduler.alphas_cumprod):
            a = float(scheduler.alphas_cumprod[int(round(t))])
            sigma = ((1 - a) / a) ** 0.5
        return StepInfo(index, count, sigma, t, self._first(("schedule", id(timesteps)), index))

    def _first(self, run, index) -> Optional[int]:
        """The first step index seen in the current run. A run is keyed by the schedule the pipeline set up
        for it (`set_timesteps` makes a new tensor; cache contexts carry the step count) and restarts when the
        index goes back (a new call with the same schedule)."""
        if index is None:
            return None
        if self._run != run or self._run_first is None or index < self._run_last:
            self._run, self._run_first = run, index
        self._run_last = index
        return self._run_first


def forward_arg(names, args, kwargs, name):
    """Argument `name` of a forward call given positionally or by keyword (`names`: the forward's parameter
    names in order); None when absent."""
    if name in kwargs:
        return kwargs[name]
    i = names.index(name) if name in names else None
    return args[i] if i is not None and i < len(args) else None


class RunStateHook(ModelHook):
    """Fills the RunState from the denoiser's forward arguments. Stateful so that diffusers pushes the
    pipeline's cache context into it."""

    _is_stateful = True

    def __init__(self, state: RunState, denoiser: torch.nn.Module):
        super().__init__()
        self.state = state
        self.context = state._context
        self._signature = inspect.signature(denoiser.forward)
        self._names = list(self._signature.parameters)
        self._flux_ids = (None, None)  # (img_ids tensor, its grid): pipelines reuse one ids tensor for all steps

    def reset_state(self, module):
        self.context.latest = None
        return module

    def _arg(self, args, kwargs, name):
        return forward_arg(self._names, args, kwargs, name)

    def pre_forward(self, module, *args, **kwargs):
        g = self.state.geometry
        family = g.family
        x = self._arg(args, kwargs, "sample" if family == "unet" else "hidden_states")
        timestep = self._arg(args, kwargs, "timestep")
        text = self._arg(args, kwargs, "encoder_hidden_states")
        text_len = None if text is None else int(text.shape[1])
        pt, ph, pw = g.patch
        if family == "flux":
            ids = self._arg(args, kwargs, "img_ids")
            if ids is None or ids is not self._flux_ids[0]:
                self._flux_ids = (ids, _flux_grid(ids, x.shape[1]))
            grid = self._flux_ids[1] if self._flux_ids[1] and math.prod(self._flux_ids[1]) == x.shape[1] else None
            latent = None if grid is None else (1, grid[1] * ph, grid[2] * pw)
        elif family == "wan":
            latent = tuple(int(s) for s in x.shape[2:5])
            grid = (latent[0] // pt, latent[1] // ph, latent[2] // pw)
        else:
            latent = (1, int(x.shape[-2]), int(x.shape[-1]))
            grid = (1, latent[1] // ph, latent[2] // pw)
        self.state.begin_forward(int(x.shape[0]), latent, grid, text_len, timestep)
        return args, kwargs


def _flux_grid(img_ids, n_tokens: int):
    if img_ids is None:
        return None
    if img_ids.ndim == 3:  # deprecated batched ids
        img_ids = img_ids[0]
    rows = int(img_ids[:, 1].max()) + 1
    cols = int(img_ids[:, 2].max()) + 1
    return (1, rows, cols) if rows * cols == n_tokens else None


def watch_encode_prompt(pipeline, on_call) -> "callable":
    """Wrap `pipeline.encode_prompt` (an instance attribute over the class's method) so that every call also runs
    `on_call(arguments, result)` with the call's bound arguments (defaults applied). Returns the undo."""
    if pipeline is None or not hasattr(pipeline, "encode_prompt"):
        return lambda: None
    original = pipeline.encode_prompt
    signature = inspect.signature(original)

    def encode_prompt(*args, **kwargs):
        result = original(*args, **kwargs)
        bound = signature.bind_partial(*args, **kwargs)
        bound.apply_defaults()
        on_call(bound.arguments, result)
        return result

    pipeline.encode_prompt = encode_prompt

    def undo():
        if pipeline.__dict__.get("encode_prompt") is encode_prompt:
            del pipeline.encode_prompt

    return undo


def watch_cfg(pipeline, state: RunState):
    """For CFG-batched pipelines without a `do_classifier_free_guidance` property (PixArt), record the
    flag the pipeline passes to its own `encode_prompt`. Returns a function that undoes the watch."""
    if pipeline is None or state.geometry.family not in _CFG_BATCHED_FAMILIES:
        return lambda: None
    if hasattr(type(pipeline), "do_classifier_free_guidance") or not hasattr(pipeline, "encode_prompt"):
        return lambda: None
    if "do_classifier_free_guidance" not in inspect.signature(pipeline.encode_prompt).parameters:
        return lambda: None

    def record(arguments, result):
        state.cfg_from_encode = bool(arguments["do_classifier_free_guidance"])

    return watch_encode_prompt(pipeline, record)


def attach_hook(denoiser: torch.nn.Module, hook: ModelHook, name: str) -> None:
    """Register `hook` on the denoiser's diffusers HookRegistry under `name`."""
    registry = HookRegistry.check_if_exists_or_initialize(denoiser)
    registry.register_hook(hook, name)
    registry.invalidate_child_registries_cache()


def detach_hook(denoiser: torch.nn.Module, name: str) -> None:
    registry = getattr(denoiser, "_diffusers_hook", None)
    if registry is not None and registry.get_hook(name) is not None:
        registry.remove_hook(name, recurse=False)


def attach_state(denoiser: torch.nn.Module, state: RunState) -> None:
    attach_hook(denoiser, RunStateHook(state, denoiser), HOOK_NAME)


def detach_state(denoiser: torch.nn.Module) -> None:
    detach_hook(denoiser, HOOK_NAME)
