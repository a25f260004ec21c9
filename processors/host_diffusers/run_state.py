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
from ..tracing import compiling
from .model_info import Geometry
from .parallel import gather_ids, input_split

HOOK_NAME = "attnlab_run_state"

# Pipelines that batch CFG as cat([negative, positive]) along the batch axis.
_CFG_BATCHED_FAMILIES = ("unet", "sd3", "pixart")


class _ContextSink(StateManager):
    """Receives the pipeline's `cache_context` (diffusers pushes it into stateful hooks' StateManagers)."""

    def __init__(self):
        super().__init__(object)
        self.latest = None
        self.name = None  # the context's name, read by compiled code instead of the per-step context object

    def set_context(self, context) -> None:
        self.latest = context
        self.name = None if context is None else context.name


class _Run:
    """One denoising run: its key (the schedule tensor the pipeline set up, or the cache-context step count),
    the timestep of its first forward, and its first step index once known."""

    __slots__ = ("key", "start", "first")

    def __init__(self, key, start=None, first: Optional[int] = None):
        self.key, self.start, self.first = key, start, first


class _ForwardStep:
    """The step of one eager forward, found when first asked (reading the timestep's value is a device
    sync), from what the forward saw: its timestep, cache context, scheduler index and run."""

    __slots__ = ("state", "timestep", "context", "index", "run", "step")

    def __init__(self, state: "RunState", timestep):
        self.state, self.timestep, self.context, self.run = state, timestep, state._context.latest, state._run
        self.index = getattr(state._scheduler(), "step_index", None)
        self.step: Optional[StepInfo] = None

    def current_step(self) -> StepInfo:
        if self.step is None:
            self.step = self.state._resolve(self)
        return self.step


class RunState:
    """Per-denoiser state shared by every attnlab processor installed on it.

    Eager forwards resolve the roles up front (cheap) and the step only when an effect or hook reads it
    (a device sync). Under torch.compile both are worked out in the graph where they are read: roles as
    guards (stable within a run), the step as tensors (`traced_step`), so a graph whose effects read
    neither is the same for every forward.
    """

    def __init__(self, geometry: Geometry, pipeline=None):
        self.geometry = geometry
        self.pipeline = pipeline
        self.batch = 0
        self._roles: Optional[tuple[str, ...]] = None
        self.latent: Optional[tuple[int, int, int]] = None  # latent cells (frames, height, width)
        self.grid: Optional[tuple[int, int, int]] = None  # image tokens (frames, rows, cols)
        self.text_len: Optional[int] = None
        self._role_override: list = []
        self.cfg_from_encode: Optional[bool] = None  # set by `watch_cfg` for pipelines without the property
        self._timestep = None  # this forward's timestep argument
        self.step_source = StepInfo()  # eager: this forward's `_ForwardStep` (or a StepInfo set by a hook)
        self._run = _Run(None)
        self._run_last = -1  # the last cheaply known step index (cache context or scheduler.step_index)
        # set from the pipeline before a run (`watch_run`), read by compiled forwards
        self.run_first = 0  # the first step index the run executes
        self.run_grid: Optional[tuple[int, int, int]] = None  # FLUX: the image grid of the run's latents
        self.run_cfg: Optional[bool] = None  # the pipeline's `do_classifier_free_guidance` for the run
        self.effects: list = []  # every effect installed on this denoiser (sessions add and remove theirs)
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
        self.batch, self._timestep = batch, timestep
        if not compiling():
            self._roles = self.resolve_roles(batch)
            self._track_run(timestep)
            self.step_source = _ForwardStep(self, timestep)

    @property
    def roles(self) -> Optional[tuple[str, ...]]:
        """This forward's row roles (under compile: worked out in the graph, so only readers guard on them)."""
        if compiling():
            return self.resolve_roles(self.batch) if self.batch else None
        return self._roles

    @roles.setter
    def roles(self, value) -> None:
        self._roles = value

    def current_roles(self, batch: int) -> Optional[tuple[str, ...]]:
        """The roles for a call of `batch` rows: None when that is not this forward's batch (a call that
        bypassed the run-state hook, e.g. a direct block call)."""
        roles = self.roles
        return roles if roles is not None and len(roles) == batch else None

    @property
    def step(self) -> StepInfo:
        return self.current_step()

    @step.setter
    def step(self, value: StepInfo) -> None:
        self.step_source = value

    def current_step(self) -> StepInfo:
        """This forward's step: resolved on first use (eager), or as tensors in the graph (compiled)."""
        if compiling():
            return self.traced_step(self._timestep)
        source = self.step_source
        return source if isinstance(source, StepInfo) else source.current_step()

    def call_sources(self, batch: int):
        """(roles, step) for an AttentionCall of `batch` rows: eager, the roles and this forward's lazy step;
        compiled, the state itself, asked in the graph only if an effect reads them."""
        if compiling():
            return self, self
        roles = self._roles
        return (roles if roles is not None and len(roles) == batch else None), self.step_source

    def resolve_roles(self, batch: int) -> tuple[str, ...]:
        if self._role_override:
            roles = self._role_override[-1]
            if isinstance(roles, str):
                return (roles,) * batch
            if len(roles) != batch:
                raise ValueError(f"roles_for declared {len(roles)} rows but the denoiser got a batch of {batch}")
            return roles
        name = self._context.name
        if name in ("cond", "uncond"):
            return (name,) * batch
        pipe = self.pipeline
        if compiling():  # the pipeline's property reads its (compiled) denoiser: use the value seen at run start
            cfg = self.run_cfg if self.run_cfg is not None else self.cfg_from_encode
        else:
            cfg = getattr(pipe, "do_classifier_free_guidance", self.cfg_from_encode)
        if pipe is not None and self.geometry.family in _CFG_BATCHED_FAMILIES and cfg and batch % 2 == 0:
            half = batch // 2
            return ("uncond",) * half + ("cond",) * half
        return ("cond",) * batch

    def _scheduler(self):
        scheduler = getattr(self.pipeline, "scheduler", None)
        return scheduler if getattr(scheduler, "timesteps", None) is not None else None

    def _sched_units(self, t):
        return t * 1000.0 if self.geometry.family == "flux" else t  # FLUX feeds t/1000 to its transformer

    def resolve_step(self, timestep) -> StepInfo:
        """The step of a forward with this `timestep` argument, now (eager; for hooks that run before the
        forward's own run-state hook)."""
        self._track_run(timestep)
        return _ForwardStep(self, timestep).current_step()

    def _resolve(self, fwd: _ForwardStep) -> StepInfo:
        t = None
        if fwd.timestep is not None:
            t = float(fwd.timestep.flatten().max()) if torch.is_tensor(fwd.timestep) else float(fwd.timestep)
        ctx = fwd.context
        if ctx is not None and ctx.step_index is not None:
            return StepInfo(ctx.step_index, ctx.num_inference_steps, ctx.sigma, t, fwd.run.first)
        scheduler = self._scheduler()
        if scheduler is None or t is None:
            return StepInfo(timestep=t)
        index = fwd.index if fwd.index is not None else self._lookup(scheduler, self._sched_units(t))
        sigma = None
        if index is not None and getattr(scheduler, "sigmas", None) is not None and index < len(scheduler.sigmas):
            sigma = float(scheduler.sigmas[index])
        elif getattr(scheduler, "alphas_cumprod", None) is not None and 0 <= int(round(t)) < len(scheduler.alphas_cumprod):
            a = float(scheduler.alphas_cumprod[int(round(t))])
            sigma = ((1 - a) / a) ** 0.5
        run = fwd.run
        if run.first is None and run.start is not None:
            start = run.start
            t0 = float(start.flatten().max()) if torch.is_tensor(start) else float(start)
            run.first = self._lookup(scheduler, self._sched_units(t0))
        return StepInfo(index, len(scheduler.timesteps), sigma, t, run.first if run.first is not None else index)

    @staticmethod
    def _lookup(scheduler, t_sched: float) -> Optional[int]:
        """The index of the scheduler timestep `t_sched` (in the scheduler's units), None if it has none."""
        diffs = (scheduler.timesteps.float().cpu() - t_sched).abs()
        best = int(diffs.argmin())
        return best if float(diffs[best]) <= 1e-3 * max(1.0, abs(t_sched)) else None

    def _track_run(self, timestep) -> None:
        """Notice a new run without a sync: a new schedule tensor (`set_timesteps` makes one per call), a new
        cache-context step count, or a step index that goes back (a new call with the same schedule)."""
        ctx = self._context.latest
        if ctx is not None and ctx.step_index is not None:
            key, index = ("context", ctx.num_inference_steps), ctx.step_index
        else:
            scheduler = self._scheduler()
            if scheduler is None:
                return
            key, index = scheduler.timesteps, getattr(scheduler, "step_index", None)
        run = self._run
        same = run.key == key if isinstance(key, tuple) and isinstance(run.key, tuple) else run.key is key
        if not same or (index is not None and index < self._run_last):
            self._run = _Run(key, timestep, index)
        if index is not None:
            self._run_last = index
            if self._run.first is None and self._run.start is timestep:
                self._run.first = index

    def begin_run(self, latents: torch.Tensor, ids: Optional[torch.Tensor] = None) -> None:
        """Before a run, in eager code: note what compiled forwards cannot read from their inputs (FLUX's
        image grid: from the position `ids`, or from unpacked ``[B, C, h, w]`` latents) and let the effects
        set themselves up for the run's token grids (`Effect.prepare`). `watch_run` calls it for pipelines;
        code that calls the denoiser itself calls it with its latents."""
        if self.geometry.family == "flux":
            if ids is not None:
                self.run_grid = _flux_grid(ids, ids.shape[-2])
            elif latents.ndim == 4:
                _, ph, pw = self.geometry.patch
                self.run_grid = (1, latents.shape[-2] // ph, latents.shape[-1] // pw)
        grids = self.grids_of(latents)
        for effect in self.effects:
            if hasattr(effect, "prepare"):
                effect.prepare(grids, latents.device)

    def grids_of(self, latents: torch.Tensor) -> list[tuple[int, int, int]]:
        """The image token grids a forward on `latents` (as the pipeline prepared them) has: one per UNet
        level, one for a DiT (FLUX: the run's grid)."""
        pt, ph, pw = self.geometry.patch
        family = self.geometry.family
        if family == "flux":
            return [self.run_grid] if self.run_grid else []
        if family == "wan":
            f, h, w = latents.shape[2:5]
            return [(f // pt, h // ph, w // pw)]
        h, w = latents.shape[-2:]
        if family != "unet":
            return [(1, h // ph, w // pw)]
        grids = [(1, h, w)]
        while h * w > 1:
            h, w = -(-h // 2), -(-w // 2)
            grids.append((1, h, w))
        return grids

    def traced_step(self, timestep) -> StepInfo:
        """The step as 0-d tensors computed in a compiled graph from the forward's timestep and the
        scheduler's tensors: the nearest schedule entry (never `scheduler.step_index`, a Python int that
        would recompile every step); `first` is the run's first index as set before the run (`run_first`)."""
        if timestep is None:
            return StepInfo()
        t = timestep.flatten().max().float() if torch.is_tensor(timestep) else torch.tensor(float(timestep))
        scheduler = self._scheduler()
        if scheduler is None:
            return StepInfo(timestep=t)
        timesteps = scheduler.timesteps
        index = (timesteps.float().to(t.device) - self._sched_units(t)).abs().argmin()
        sigma = None
        sigmas = getattr(scheduler, "sigmas", None)
        if sigmas is not None and len(sigmas) >= len(timesteps):
            sigma = _at(sigmas.to(t.device), index).float()
        elif getattr(scheduler, "alphas_cumprod", None) is not None:
            ac = scheduler.alphas_cumprod.to(t.device)
            a = _at(ac, t.round().long().clamp(0, len(ac) - 1)).float()
            sigma = ((1 - a) / a).sqrt()
        return StepInfo(index, len(timesteps), sigma, t, self.run_first)


def _at(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """values[index] for a 0-d index tensor, in an op every torch.compile backend lowers (inductor does not
    lower `take`, and `values[index]` would read the index's value)."""
    return values.index_select(0, index.reshape(1)).reshape(())


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
        self.context.set_context(None)
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
            ids, n_image = self._arg(args, kwargs, "img_ids"), x.shape[1]
            split = None if compiling() else input_split(module, HOOK_NAME)
            if split is not None:  # context parallelism split the inputs before this hook: work with the whole
                world = split._flattened_mesh.size()
                ids, n_image = (None if ids is None else gather_ids(split, ids)), n_image * world
                text_len = None if text_len is None else text_len * world
            grid = self._flux_grid(ids, n_image)
            latent = None if grid is None else (1, grid[1] * ph, grid[2] * pw)
        elif family == "wan":
            latent = tuple(int(s) for s in x.shape[2:5])
            grid = (latent[0] // pt, latent[1] // ph, latent[2] // pw)
        else:
            latent = (1, int(x.shape[-2]), int(x.shape[-1]))
            grid = (1, latent[1] // ph, latent[2] // pw)
        self.state.begin_forward(int(x.shape[0]), latent, grid, text_len, timestep)
        return args, kwargs

    def _flux_grid(self, ids, n_tokens: int):
        """FLUX's image grid, from the position ids' values. A compiled graph cannot read values without a
        graph break, so compiled forwards use the grid the pipeline's latents had (`watch_run`)."""
        if compiling():
            grid = self.state.run_grid
        else:
            if ids is None or ids is not self._flux_ids[0]:
                self._flux_ids = (ids, _flux_grid(ids, n_tokens))
            grid = self._flux_ids[1]
        return grid if grid and math.prod(grid) == n_tokens else None


def _flux_grid(img_ids, n_tokens: int):
    if img_ids is None:
        return None
    if img_ids.ndim == 3:  # deprecated batched ids
        img_ids = img_ids[0]
    rows = int(img_ids[:, 1].max()) + 1
    cols = int(img_ids[:, 2].max()) + 1
    return (1, rows, cols) if rows * cols == n_tokens else None


def watch_method(pipeline, name: str, on_call) -> "callable":
    """Wrap `pipeline.<name>` (an instance attribute over the class's method) so that every call also runs
    `on_call(arguments, result)` with the call's bound arguments (defaults applied). Returns the undo."""
    if pipeline is None or not hasattr(pipeline, name):
        return lambda: None
    original = getattr(pipeline, name)
    signature = inspect.signature(original)

    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        bound = signature.bind_partial(*args, **kwargs)
        bound.apply_defaults()
        on_call(bound.arguments, result)
        return result

    setattr(pipeline, name, wrapper)

    def undo():
        if pipeline.__dict__.get(name) is wrapper:
            delattr(pipeline, name)

    return undo


def watch_encode_prompt(pipeline, on_call) -> "callable":
    """`watch_method` on the pipeline's `encode_prompt`."""
    return watch_method(pipeline, "encode_prompt", on_call)


def watch_run(pipeline, state: RunState):
    """Before each run's denoising loop (the pipeline's `prepare_latents`, in eager code even when the
    denoiser is compiled), record what compiled forwards cannot work out without a graph break: the run's
    first step index (`scheduler.begin_index`, or the `timestep` img2img pipelines pass; else 0) and FLUX's
    image grid (from the returned position ids), and whether it batches CFG. Returns the undo."""
    def record(arguments, result):
        scheduler = state._scheduler()
        first = getattr(scheduler, "begin_index", None)
        t = arguments.get("timestep")
        if first is None and scheduler is not None and t is not None:
            first = state._lookup(scheduler, float(t.flatten()[0]) if torch.is_tensor(t) else float(t))
        state.run_first = first or 0
        state.run_cfg = getattr(pipeline, "do_classifier_free_guidance", None)
        tensors = [r for r in (result if isinstance(result, tuple) else (result,)) if torch.is_tensor(r)]
        ids = next((r for r in tensors if r.ndim in (2, 3) and r.shape[-1] == 3), None)
        if tensors:
            state.begin_run(tensors[0], ids)

    return watch_method(pipeline, "prepare_latents", record)


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
