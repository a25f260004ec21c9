"""Installing and removing effects on a diffusers pipeline or denoiser.

    with attnlab.apply(pipe, [EntropyScaling()]) as session:
        image = pipe(prompt, height=1024, width=1024).images[0]

`apply` validates everything first, then swaps every supported attention module's processor for an
attnlab processor carrying the effects that apply at that site, and registers the run-state hook on
the denoiser. Leaving the block (also by an exception) puts the exact original processor objects back
and removes the hook. Sessions nest: an inner session adds its effects on top of the outer one's and
must be removed first.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Optional, Sequence

import torch

from ..effects import Effect, EffectStack, check_effects
from ..installs import check_single_install
from ..params import effect_list
from .model_info import UnsupportedModelError, attention_sites, family_of, geometry_of, unwrap
from .processors import PROCESSOR_FOR_KIND, STOCK_PROCESSORS, AttnlabFluxAttnProcessor, _HostProcessor
from .parallel import check_model as check_parallel
from .run_state import RunState, attach_state, detach_state, watch_cfg, watch_run

logger = logging.getLogger("attnlab")

_STATE_ATTR = "_attnlab_run_state"


#: pipeline attributes that can hold a denoiser (Wan 2.2 has two)
DENOISER_ATTRS = ("unet", "transformer", "transformer_2")


def denoiser_names(pipeline) -> list[str]:
    """The attributes of `pipeline` that hold its denoiser(s), in `DENOISER_ATTRS` order."""
    return [n for n in DENOISER_ATTRS if isinstance(getattr(pipeline, n, None), torch.nn.Module)]


def site_heads(denoiser: torch.nn.Module) -> list:
    """(Site, number of heads) of every attention site, for effects that address layers and heads."""
    return [(spec.site, int(spec.module.heads)) for spec in attention_sites(denoiser)]


def denoisers_of(target) -> list[torch.nn.Module]:
    """The denoiser(s) of a pipeline (Wan 2.2 has two), or the target itself if it is a model."""
    if isinstance(target, torch.nn.Module):
        family_of(target)
        return [unwrap(target)]
    found = [unwrap(getattr(target, n)) for n in denoiser_names(target)]
    if not found:
        raise UnsupportedModelError(
            f"{type(target).__name__} has no unet/transformer; pass a diffusers pipeline or its denoiser"
        )
    for m in found:
        family_of(m)
    return found


class Session:
    """Effects installed on one pipeline or model. Use as a context manager, or call `remove()`."""

    def __init__(self, target, effects: Sequence, *, vae_scale: Optional[int] = None, native_size=None, strict: bool = False):
        self.target = target
        self.effects = effect_list("effects", effects, Effect)
        self.pipeline = None if isinstance(target, torch.nn.Module) else target
        self.denoisers = denoisers_of(target)
        check_single_install(self.effects, installed_effects(self.denoisers))
        self._geometries = [geometry_of(d, self.pipeline, vae_scale=vae_scale, native_size=native_size)
                            for d in self.denoisers]
        for denoiser, geometry in zip(self.denoisers, self._geometries):
            check_effects(self.effects, geometry.family, geometry.token_scale, site_heads(denoiser))
            check_parallel(denoiser, [(spec.module, any(e.applies(spec.site) for e in self.effects))
                                      for spec in attention_sites(denoiser)])
        self._explicit_geometry = vae_scale is not None or native_size is not None
        self.strict = strict
        self.sites = []
        self.skipped: list[tuple[str, str]] = []
        self._swapped: list[tuple[torch.nn.Module, object, object]] = []  # (module, previous, ours)
        self._own_states: list[torch.nn.Module] = []
        self._undo: list = []
        self.states: list[RunState] = []
        self._prepared: list[RunState] = []  # states that hold this session's effects (for `Effect.prepare`)
        self.installed = False

    # --- install / remove -----------------------------------------------------------------------
    def install(self) -> "Session":
        if self.installed:
            raise RuntimeError("this session is already installed")
        try:
            for denoiser, geometry in zip(self.denoisers, self._geometries):
                self._install_on(denoiser, geometry)
        except BaseException:
            self._restore()
            raise
        self.installed = True
        return self

    def _install_on(self, denoiser: torch.nn.Module, geometry) -> None:
        state = getattr(denoiser, _STATE_ATTR, None)
        if state is not None and self._explicit_geometry and geometry != state.geometry:
            raise ValueError(
                f"an attnlab session is already installed on this model with {state.geometry}; a nested session "
                f"cannot change native_size/vae_scale (asked for {geometry}); remove the outer session first"
            )
        if state is None:
            state = RunState(geometry, self.pipeline)
            attach_state(denoiser, state)
            setattr(denoiser, _STATE_ATTR, state)
            self._own_states.append(denoiser)
            self._undo.append(watch_cfg(self.pipeline, state))
            self._undo.append(watch_run(self.pipeline, state))
        self.states.append(state)
        state.effects.extend(self.effects)
        self._prepared.append(state)
        pos_embed = getattr(denoiser, "pos_embed", None)
        for spec in attention_sites(denoiser):
            previous = spec.module.processor
            cls = PROCESSOR_FOR_KIND[(spec.site.family, spec.site.kind)]
            if isinstance(previous, _HostProcessor):
                effects = previous.effects + self.effects
            elif type(previous).__name__ in STOCK_PROCESSORS[cls]:
                effects = list(self.effects)
            else:
                reason = f"processor {type(previous).__name__} is not one attnlab can host"
                if self.strict:
                    raise UnsupportedModelError(f"{spec.name}: {reason}")
                self.skipped.append((spec.name, reason))
                continue
            stack = EffectStack.for_site(effects, spec.site)
            extra = {"pos_embed": pos_embed} if cls is AttnlabFluxAttnProcessor else {}
            ours = cls(spec.site, stack, state, original=previous, **extra)
            ours.effects = effects
            spec.module.set_processor(ours)
            self._swapped.append((spec.module, previous, ours))
            self.sites.append(spec.site)
        if self.skipped:
            logger.warning(
                "attnlab: %d attention layer(s) left stock (%s ...): %s",
                len(self.skipped), self.skipped[0][0], self.skipped[0][1],
            )

    def remove(self) -> None:
        """Put back the exact processor objects that were there before, and the stock forward."""
        for module, _, ours in self._swapped:
            if module.processor is not ours:
                raise RuntimeError(
                    "another attnlab session was installed on top of this one; remove it first (sessions nest LIFO)"
                )
        self._restore()
        self.installed = False

    def _restore(self) -> None:
        for module, previous, ours in reversed(self._swapped):
            keep_settings(ours, previous)
            module.set_processor(previous)
        self._swapped.clear()
        while self._prepared:
            effects = self._prepared.pop().effects
            del effects[len(effects) - len(self.effects):]
        for denoiser in self._own_states:
            detach_state(denoiser)
            if hasattr(denoiser, _STATE_ATTR):
                delattr(denoiser, _STATE_ATTR)
        self._own_states.clear()
        while self._undo:
            self._undo.pop()()

    def __enter__(self) -> "Session":
        if not self.installed:
            self.install()
        return self

    def __exit__(self, *exc) -> None:
        if self.installed:
            self.remove()

    # --- helpers for pipelines built on top -----------------------------------------------------
    @property
    def state(self) -> RunState:
        return self.states[0]

    def roles_for(self, roles):
        """Declare row roles for forwards run inside the returned context (all denoisers): one role per
        batch row, or one role name for every row."""
        stack = contextlib.ExitStack()
        for s in self.states:
            stack.enter_context(s.roles_for(roles))
        return stack


#: processor attributes diffusers changes in place (`set_attention_backend`, `enable_parallelism`)
RUNTIME_SETTINGS = ("_attention_backend", "_parallel_config")


def keep_settings(current, restored) -> None:
    """Hand the processor being put back the backend and parallel configuration the model has now (set on
    `current` during the session), so that both survive the session's removal."""
    for name in RUNTIME_SETTINGS:
        if hasattr(current, name) and hasattr(restored, name):
            value = getattr(current, name)
            if getattr(restored, name) is not value:
                setattr(restored, name, value)


def installed_effects(denoisers) -> list:
    """The effects attnlab processors already carry on these denoisers (enclosing sessions), each once."""
    found: dict[int, object] = {}
    for denoiser in denoisers:
        for processor in denoiser.attn_processors.values():
            if isinstance(processor, _HostProcessor):
                found.update((id(e), e) for e in processor.stack.effects)
    return list(found.values())


def apply(target, effects: Sequence, **options) -> Session:
    """Install `effects` on a diffusers pipeline or denoiser now; returns the installed `Session`.

    Options: vae_scale (pixels per latent cell, default: the pipeline's, else 8), native_size
    ((height, width) or (frames, height, width) in pixels the model was trained at; default from the
    config or the family), strict (raise instead of skipping layers with foreign processors).
    """
    return Session(target, effects, **options).install()
