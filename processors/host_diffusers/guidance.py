"""Extra denoiser passes for guidance methods, for any stock diffusers pipeline (no pipeline forks).

A `GuidancePass` hook wraps the denoiser's forward. After the pipeline's own forward it runs one more
forward on the conditional rows with their role set to e.g. "perturbed" (the installed effects act on
those rows only) and hands back a corrected conditional prediction, so that the pipeline's own CFG
arithmetic produces the guided result:

    ε_c' = ε_c + (w/s)(ε_c − ε_extra)   =>   ε_u + s(ε_c' − ε_u) = ε_u + s(ε_c − ε_u) + w(ε_c − ε_extra)

(without CFG: ε_c' = ε_c + w(ε_c − ε_extra)). It works the same whether the pipeline batches
cat([uncond, cond]) (SD, SDXL, SD3, PixArt) or runs cond and uncond as separate forwards (FLUX, Wan).
`batched=True` instead appends the extra rows to the pipeline's own forward (one larger batch, like
diffusers' PAG pipelines). The CFG scale `s` comes from the pipeline call's arguments (`cfg_scales`).
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Callable, Optional

import torch
from diffusers.hooks.hooks import ModelHook

from ..call import StepInfo
from ..rows import take_rows
from ..tracing import compiling
from .run_state import attach_hook, detach_hook

HOOK_NAME = "attnlab_guidance"


def _sample_of(output):
    return output[0] if isinstance(output, tuple) else output.sample


def _reads_step(scale_at) -> bool:
    """Whether `scale_at` looks at the step: its `needs_step` (on the function, or on the object of a bound method
    such as `GuidanceSchedule.scale_at`); True when it does not say."""
    needs = getattr(getattr(scale_at, "__self__", scale_at), "needs_step", True)
    return bool(needs() if callable(needs) else needs)


def _off(scale) -> bool:
    """w is known to be 0 (a tensor w, under torch.compile, is never known: the pass runs)."""
    return not torch.is_tensor(scale) and scale == 0.0


def _with_sample(output, sample):
    if isinstance(output, tuple):
        return (sample,) + tuple(output[1:])
    output.sample = sample
    return output


class GuidancePass(ModelHook):
    """The extra-pass hook on one denoiser.

    scale_at(step, timestep_1000) -> w (0 skips the pass); role: the role of the extra rows;
    cfg_scale(): the CFG scale `s` the pipeline applies afterwards, or None without CFG.
    """

    def __init__(self, state, scale_at: Callable[[StepInfo, Optional[float]], float], role: str,
                 cfg_scale: Callable[[], Optional[float]], batched: bool = False, timestep_factor: float = 1.0):
        super().__init__()
        self.state = state
        self.scale_at = scale_at
        self.reads_step = _reads_step(scale_at)
        self.role = role
        self.cfg_scale = cfg_scale
        self.batched = batched
        self.timestep_factor = timestep_factor
        self._names: list[str] = []
        self.passes = 0  # extra forwards run (or extra row groups, when batched)

    def initialize_hook(self, module):
        self._names = list(inspect.signature(module.forward).parameters)
        return module

    def _batch_of(self, args, kwargs) -> int:
        first = kwargs.get(self._names[0]) if self._names and self._names[0] in kwargs else (args[0] if args else None)
        if first is None:
            first = next(v for v in kwargs.values() if torch.is_tensor(v))
        return int(first.shape[0])

    def _timestep(self, args, kwargs):
        if "timestep" in kwargs:
            return kwargs["timestep"]
        i = self._names.index("timestep") if "timestep" in self._names else None
        return args[i] if i is not None and i < len(args) else None

    def _scale_now(self, step=None):
        """w for this forward: a float, or a 0-d tensor under torch.compile when it depends on the step (then
        the extra pass always runs and w = 0 leaves the prediction unchanged)."""
        if not self.reads_step:
            return float(self.scale_at(StepInfo(), None))
        step = self.state.step if step is None else step
        t = None if step.timestep is None else step.timestep * self.timestep_factor
        w = self.scale_at(step, t)
        return w if torch.is_tensor(w) else float(w)

    def _count_pass(self) -> None:
        if not compiling():  # a compiled graph would guard on the count and recompile every step
            self.passes += 1

    def new_forward(self, module, *args, **kwargs):
        forward = self.fn_ref.original_forward
        if self.batched:
            return self._batched(forward, args, kwargs)
        output = forward(*args, **kwargs)
        roles = self.state.roles or ()
        self._check_cfg(roles)
        cond = [i for i, r in enumerate(roles) if r == "cond"]
        if not cond:
            return output
        scale = self._scale_now()
        if _off(scale):
            return output
        batch = len(roles)
        if len(cond) == batch:
            extra_args, extra_kwargs = args, kwargs
        else:
            extra_args, extra_kwargs = take_rows(args, cond, batch), take_rows(kwargs, cond, batch)
        with self.state.roles_for((self.role,) * len(cond)):
            extra = _sample_of(forward(*extra_args, **extra_kwargs))
        self._count_pass()
        return _with_sample(output, self._corrected(_sample_of(output), extra, cond, scale))

    def _check_cfg(self, roles, step=None) -> None:
        if "uncond" in roles and self.cfg_scale() is None and not _off(self._scale_now(step)):
            raise RuntimeError("the pipeline runs an unconditional pass (CFG) but the guidance was set up without its "
                               "CFG scale; call the SoftPAGPipeline itself or pass cfg_scale to enabled()")

    def _batched(self, forward, args, kwargs):
        batch = self._batch_of(args, kwargs)
        roles = self.state.resolve_roles(batch)
        cond = [i for i, r in enumerate(roles) if r == "cond"]
        # the step this forward belongs to is known before it runs (the scheduler state is the same)
        t = self._timestep(args, kwargs)
        step = self.state.traced_step(t) if compiling() else self.state.resolve_step(t)
        self._check_cfg(roles, step)
        scale = self._scale_now(step) if cond else 0.0
        if _off(scale):
            return forward(*args, **kwargs)
        index = list(range(batch)) + cond
        with self.state.roles_for(tuple(roles) + (self.role,) * len(cond)):
            output = forward(*take_rows(args, index, batch), **take_rows(kwargs, index, batch))
        self._count_pass()
        sample = _sample_of(output)
        base, extra = sample[:batch], sample[batch:]
        return _with_sample(output, self._corrected(base, extra, cond, scale))

    def _corrected(self, sample: torch.Tensor, extra: torch.Tensor, cond: list[int], scale: float) -> torch.Tensor:
        from ..softpag import cond_correction

        s = self.cfg_scale()
        if s is not None and s == 0.0:
            raise ValueError("perturbation guidance cannot be folded into a CFG scale of 0; use a CFG scale > 1 or none")
        fixed = sample.clone()
        fixed[cond] = cond_correction(sample[cond], extra, scale, s)
        return fixed


@contextlib.contextmanager
def guided(pipeline, effects, scale_at: Callable[[StepInfo, Optional[float]], float], role: str,
           cfg_scale_for: Callable[[str], Callable[[], Optional[float]]], *, active: bool = True,
           batched: bool = False, **session_options):
    """Install `effects` on `pipeline` and, when `active`, one `GuidancePass` per denoiser (role `role`,
    w = scale_at(step, t), the CFG scale from ``cfg_scale_for(denoiser attribute)()``) for the block.
    Yields (session, hooks); everything is removed on exit, also after an exception."""
    from .session import Session, denoiser_names

    session = Session(pipeline, list(effects), **session_options).install()
    names = denoiser_names(pipeline)
    hooks, attached = [], []
    try:
        if active:
            factor = 1000.0 if session.states[0].geometry.family == "flux" else 1.0  # FLUX feeds t/1000
            for name, state in zip(names, session.states):
                hook = GuidancePass(state, scale_at, role, cfg_scale_for(name), batched=batched,
                                    timestep_factor=factor)
                attach_guidance(getattr(pipeline, name), hook)
                attached.append(getattr(pipeline, name))
                hooks.append(hook)
        yield session, hooks
    finally:
        for denoiser in attached:
            detach_guidance(denoiser)
        session.remove()


def attach_guidance(denoiser: torch.nn.Module, hook: GuidancePass) -> None:
    attach_hook(denoiser, hook, HOOK_NAME)


def detach_guidance(denoiser: torch.nn.Module) -> None:
    detach_hook(denoiser, HOOK_NAME)


# --- CFG scale from the pipeline call -----------------------------------------------------------------
def cfg_scales(pipeline, family: str, args: tuple, kwargs: dict) -> dict[str, Optional[float]]:
    """The CFG scale the pipeline will apply for each denoiser attribute ("unet", "transformer",
    "transformer_2"), read from the call's arguments; None where the call runs without CFG.

    FLUX: true CFG (`true_cfg_scale` > 1 with a negative prompt); its `guidance_scale` is the distilled
    guidance embedding, not CFG. Wan 2.2: `guidance_scale_2` for the low-noise transformer.
    """
    bound = inspect.signature(type(pipeline).__call__).bind(pipeline, *args, **kwargs)
    bound.apply_defaults()
    a = bound.arguments
    if family == "flux":
        negative = a.get("negative_prompt") is not None or a.get("negative_prompt_embeds") is not None
        s = float(a.get("true_cfg_scale") or 1.0)
        scale = s if s > 1.0 and negative else None
        return {"transformer": scale, "transformer_2": scale}
    g = a.get("guidance_scale")
    g = None if g is None else float(g)
    on = g is not None and g > 1.0
    scales = {"unet": g if on else None, "transformer": g if on else None}
    g2 = a.get("guidance_scale_2")
    scales["transformer_2"] = (float(g2) if g2 is not None else g) if on else None
    return scales

