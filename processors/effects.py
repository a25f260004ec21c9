"""Effects as middleware over one attention call, and the stack that composes them.

An effect is ``effect(call, attend) -> out`` where ``attend(q, k, v, mask=KEEP, scale=KEEP, **changes)``
is the next layer down (the next effect, or the host's own fast kernel at the bottom). `mask` and
`scale` default to the call's own (pass None explicitly to drop a mask); `changes` are further
`AttentionCall` fields the layers below should see (e.g. a new `tokens` layout after appending keys).
An effect that does nothing returns ``attend(call.q, call.k, call.v)``, which keeps the output
bit-identical to the stock model.

Composition order (outermost first), by the effect's `stage`:

    observe  read-only recorders (RefAM maps) see the call exactly as the model made it
    blend    output-space blends (SoftPAG: (1-u)·attend(...) + u·v on selected heads)
    share    key/value extension across rows (AlignedGen / StyleAligned)
    mask     key restriction (Attentive Eraser)
    scale    logit scaling (entropy scaling scales q)
    kernel   replacement kernels (FreeSwim's windowed attention), directly above the host's kernel

Effects of the same stage run in the order they were given.
"""

from __future__ import annotations

from typing import Callable, Optional, Protocol, Sequence

import torch

from .call import AttentionCall, Site
from .tracing import compiling

STAGES = ("observe", "blend", "share", "mask", "scale", "kernel")


class _Keep:
    def __repr__(self) -> str:
        return "KEEP"


#: Default for `attend`'s mask/scale: keep the call's own value.
KEEP = _Keep()

Attend = Callable[..., torch.Tensor]
Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[float]], torch.Tensor]


class Effect:
    """Base class. Subclasses set `stage`, override `applies` (a static filter on the site, evaluated
    once when the effect is installed) and `__call__`."""

    stage: str = "kernel"
    name: str = "effect"

    def applies(self, site: Site) -> bool:
        return True

    def __call__(self, call: AttentionCall, attend: Attend) -> torch.Tensor:  # pragma: no cover - interface
        return attend(call.q, call.k, call.v)

    def validate(self) -> None:
        """Raise ValueError for bad parameters. Called by hosts before anything is patched."""

    def check_model(self, family: str, token_scale: tuple[int, int, int]) -> None:
        """Raise ValueError if the effect cannot work on this model (family, pixels per token at full
        resolution as (frames, height, width)). Called by hosts before anything is patched."""

    def check_sites(self, sites: Sequence[tuple[Site, int]]) -> None:
        """Raise ValueError if the effect addresses layers or heads the model does not have. `sites` are
        the model's attention sites with their head counts. Called by hosts before anything is patched."""

    def prepare(self, grids: Sequence[tuple[int, int, int]], device) -> None:
        """Work out, in eager code before a run, what the effect needs per image token grid (`grids`: every
        grid the coming forwards have, e.g. each UNet level) on `device`. Effects whose per-grid set-up reads
        tensor values (a mask's token coverage) do it here, so a compiled graph only looks it up; eager calls
        that find nothing prepared work it out themselves."""


class EffectLike(Protocol):
    stage: str

    def applies(self, site: Site) -> bool: ...

    def __call__(self, call: AttentionCall, attend: Attend) -> torch.Tensor: ...


def ordered(effects: Sequence[EffectLike]) -> list[EffectLike]:
    """Effects sorted by stage (stable inside a stage). Raises on an unknown stage."""
    for e in effects:
        if getattr(e, "stage", None) not in STAGES:
            raise ValueError(f"effect {e!r} has stage {getattr(e, 'stage', None)!r}; expected one of {STAGES}")
    return sorted(effects, key=lambda e: STAGES.index(e.stage))


def check_effects(effects: Sequence[EffectLike], family: str, token_scale,
                  sites: Optional[Sequence[tuple[Site, int]]] = None) -> None:
    """Everything hosts verify before patching: each effect's parameters, its stage, and that it can work
    on this model (family, pixels per token, and the attention sites with their head counts when the host
    knows them). Raises ValueError with the parameter and accepted range."""
    for e in effects:
        if hasattr(e, "validate"):
            e.validate()
    ordered(effects)
    for e in effects:
        if hasattr(e, "check_model"):
            e.check_model(family, token_scale)
        if sites is not None and hasattr(e, "check_sites"):
            e.check_sites(sites)


class EffectStack:
    """The effects that apply at one site, in composition order, over a host kernel."""

    __slots__ = ("effects", "_run")

    def __init__(self, effects: Sequence[EffectLike]):
        self.effects = tuple(ordered(effects))
        run = _kernel_layer
        for effect in reversed(self.effects):  # the layers are built once per site, not per call
            run = _effect_layer(effect, run)
        self._run = run

    @classmethod
    def for_site(cls, effects: Sequence[EffectLike], site: Site) -> "EffectStack":
        return cls([e for e in effects if e.applies(site)])

    def __bool__(self) -> bool:
        return bool(self.effects)

    def __len__(self) -> int:
        return len(self.effects)

    def run(self, call: AttentionCall, kernel: Kernel) -> torch.Tensor:
        """Run the stack on `call`; `kernel(q, k, v, mask, scale)` is the host's attention."""
        return self._run(call, kernel)


def _kernel_layer(call: AttentionCall, kernel: Kernel) -> torch.Tensor:
    return kernel(call.q, call.k, call.v, call.mask, call.scale)


def _effect_layer(effect, inner):
    """The function that runs `effect` on a call, with `inner` (the layers below) behind its `attend`."""

    def run(call: AttentionCall, kernel: Kernel) -> torch.Tensor:
        def attend(q, k, v, mask=KEEP, scale=KEEP, **changes):
            if mask is not KEEP:
                changes["mask"] = mask
            if scale is not KEEP:
                changes["scale"] = scale
            if changes or q is not call.q or k is not call.k or v is not call.v:
                return inner(call.replace(q=q, k=k, v=v, **changes), kernel)
            return inner(call, kernel)

        return effect(call, attend)

    return run


class Recorder(Effect):
    """Changes nothing; keeps every call it sees (or `summary(call)` of it) in `calls`.

    Handy to find out which attention sites a pipeline or workflow hits, with which token layout,
    roles and step; also the no-op effect the tests and benchmarks use. Keeps references to the calls'
    tensors unless `summary` is given (e.g. ``summary=lambda c: (c.site, c.step.index)``).
    Records eager calls only: inside a torch.compile graph the Python of an effect runs once, at trace
    time, and appending to a list there would recompile every call, so a compiled call passes through.
    """

    stage = "observe"
    name = "recorder"

    def __init__(self, summary=None):
        self.summary = summary
        self.calls: list = []

    def __call__(self, call: AttentionCall, attend: Attend) -> torch.Tensor:
        if not compiling():  # a kept call gets its step now: it is found lazily, from the forward's state
            self.calls.append(call.replace(step=call.step) if self.summary is None else self.summary(call))
        return attend(call.q, call.k, call.v)

    def __deepcopy__(self, memo):  # ComfyUI deep-copies model_options on clone: keep one log
        return self
