"""FreeSwim's dual path on a stock diffusers denoiser: a forward hook that appends a full-attention twin for
the rows whose cross-attention is overridden afresh at this step, runs one batched forward, and returns
only the window rows' prediction (the caller never sees the twins). Works for pipelines that batch CFG
(SD, SDXL, SD3, PixArt) and for those running cond and uncond as separate forwards (FLUX, Wan), because
the rows' roles come from the run state (cache contexts / CFG layout / explicit `roles_for`).

    with freeswim_session(pipe, effects) as session:      # effects: FreeSwimLogitScale + FreeSwim
        video = pipe(video=upsampled, prompt=..., strength=0.7).frames
"""

from __future__ import annotations

import contextlib
import inspect

import torch
from diffusers.hooks.hooks import ModelHook

from ..rows import take_rows
from .guidance import _sample_of, _with_sample
from ..tracing import compiling
from .run_state import attach_hook, detach_hook, forward_arg, watch_encode_prompt

HOOK_NAME = "attnlab_freeswim_dual_pass"


class DualPassHook(ModelHook):
    """Per-denoiser hook; `swim` is the installed `FreeSwim` effect, `state` the denoiser's RunState."""

    def __init__(self, state, swim):
        super().__init__()
        self.state = state
        self.swim = swim
        self._names: list[str] = []
        self.forwards = 0  # denoiser forwards run through the hook
        self.full_rows = 0  # full-branch rows appended, summed over forwards
        self.negative = None  # negative prompt embeddings the pipeline encoded (see `watch_negative`)

    def initialize_hook(self, module):
        self._names = list(inspect.signature(module.forward).parameters)
        return module

    def _arg(self, args, kwargs, name):
        return forward_arg(self._names, args, kwargs, name)

    def new_forward(self, module, *args, **kwargs):
        forward = self.fn_ref.original_forward
        x = self._arg(args, kwargs, "sample" if "sample" in self._names else "hidden_states")
        batch = int(x.shape[0])
        roles = self._uncond_by_text(self.state.resolve_roles(batch), self._arg(args, kwargs, "encoder_hidden_states"))
        t = self._arg(args, kwargs, "timestep")
        step = self.state.traced_step(t) if compiling() else self.state.resolve_step(t)
        dup, plan = self.swim.plan_rows(roles, step, tuple(x.shape[1:]))
        if not compiling():  # eager counts: a compiled graph would guard on them
            self.forwards += 1
            self.full_rows += len(dup)
        index = list(range(batch)) + dup
        if dup:
            args, kwargs = take_rows(args, index, batch), take_rows(kwargs, index, batch)
        with self.state.roles_for(tuple(roles) + ("full",) * len(dup)), self.swim.active(plan):
            output = forward(*args, **kwargs)
        if not dup:
            return output
        return _with_sample(output, _sample_of(output)[:batch])


    def _uncond_by_text(self, roles, text):
        """Pipelines that run cond and uncond as separate forwards without a cache context (Wan V2V, FLUX
        img2img): a forward whose text is the pipeline's negative prompt embedding is the uncond pass."""
        if (self.negative is None or text is None or any(r != "cond" for r in roles)
                or self.state._context.name in ("cond", "uncond")):
            return roles
        neg = self.negative
        if neg.shape == text.shape and (neg is text or torch.equal(neg.to(text.device, text.dtype), text)):
            return ("uncond",) * len(roles)
        return roles


def watch_negative(pipeline, hooks) -> "callable":
    """Record the negative prompt embeddings `pipeline.encode_prompt` returns (second element) on `hooks`.
    Returns a function that undoes the watch."""
    def record(arguments, result):
        if isinstance(result, tuple) and len(result) >= 2 and torch.is_tensor(result[1]):
            for h in hooks:
                h.negative = result[1]

    return watch_encode_prompt(pipeline, record)


def attach_dual_pass(denoiser: torch.nn.Module, hook: DualPassHook) -> None:
    attach_hook(denoiser, hook, HOOK_NAME)


def detach_dual_pass(denoiser: torch.nn.Module) -> None:
    detach_hook(denoiser, HOOK_NAME)


@contextlib.contextmanager
def dual_pass(target, effects, **session_options):
    """Install `effects` (one of them a `FreeSwim`) on a pipeline or denoiser, plus one `DualPassHook` per
    denoiser; yields (session, hooks). Everything is removed on exit, also after an exception."""
    from ..freeswim import FreeSwim
    from .session import Session

    swims = [e for e in effects if isinstance(e, FreeSwim)]
    if len(swims) != 1:
        raise ValueError(f"dual_pass needs exactly one FreeSwim effect; got {len(swims)}")
    swim = swims[0]
    session = Session(target, list(effects), **session_options).install()
    hooks, attached = [], []
    undo = lambda: None  # noqa: E731
    try:
        for denoiser, state in zip(session.denoisers, session.states):
            hook = DualPassHook(state, swim)
            attach_dual_pass(denoiser, hook)
            attached.append(denoiser)
            hooks.append(hook)
        swim.reset()
        undo = watch_negative(session.pipeline, hooks)
        yield session, hooks
    finally:
        undo()
        for denoiser in attached:
            detach_dual_pass(denoiser)
        swim.reset()
        session.remove()
