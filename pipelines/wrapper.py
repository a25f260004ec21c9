"""What every attnlab pipeline wrapper shares: it wraps a stock pipeline, delegates every attribute it does
not define to it, and counts the extra guidance forwards of its last call."""

from __future__ import annotations

from ..processors.host_diffusers.model_info import family_of
from ..processors.host_diffusers.session import denoiser_names
from ..processors.params import InvalidParameter, ParameterTypeError


class PipelineWrapper:
    hooks: list = []

    @classmethod
    def from_pipe(cls, pipe, **options):
        """Wrap an existing pipeline (shares its components; nothing is copied or loaded)."""
        return cls(pipe, **options)

    def __getattr__(self, name):
        if name == "pipe":
            raise AttributeError(name)
        return getattr(self.pipe, name)

    def _wrap(self, pipe):
        """Set-up every wrapper shares: refuse a wrapped wrapper, keep `pipe`, find its denoiser(s) (`names`) and
        their family; returns the first denoiser."""
        refuse_nesting(self, pipe)
        self.pipe = pipe
        self.names = denoiser_names(pipe)
        if not self.names:
            raise ValueError(f"{type(pipe).__name__} has no unet/transformer; pass a diffusers pipeline")
        denoiser = getattr(pipe, self.names[0])
        self.family = family_of(denoiser)
        return denoiser

    @property
    def extra_passes(self) -> int:
        """Extra forwards run by the last call (one per step where guidance was active, per denoiser)."""
        return sum(h.passes for h in self.hooks)


def refuse_nesting(wrapper, pipe) -> None:
    """attnlab wrappers wrap stock pipelines. One wrapped in another would read the CFG scale off the inner
    wrapper's signature and install a second guidance hook, so it is refused here, with the ways that work."""
    if isinstance(pipe, PipelineWrapper):
        outer, inner = type(wrapper).__name__, type(pipe).__name__
        raise ParameterTypeError(
            f"{outer} wraps a stock diffusers pipeline, not another attnlab wrapper ({inner}). To combine methods, "
            f"wrap the stock pipeline (`{inner.lower()}.pipe`) with each and call one inside the other's "
            f"`enabled()` block, e.g. `with softpag.enabled(): aligned(...)`; effects without a pipeline of their "
            "own (EntropyScaling, ...) go in `effects=[...]`")


def refuse_second_guidance(pipe, names, who: str) -> None:
    """Refuse to stack a second guidance pass on a denoiser that already runs one (another wrapper's
    `enabled()` block, or this one entered twice): each extra pass assumes it is the only one."""
    from ..processors.host_diffusers.guidance import HOOK_NAME

    for name in names:
        registry = getattr(getattr(pipe, name), "_diffusers_hook", None)
        if registry is not None and registry.get_hook(HOOK_NAME) is not None:
            raise InvalidParameter(
                f"{who}: the {name} already runs an attnlab guidance pass (SoftPAG or Attentive Eraser, from an "
                "enclosing `enabled()` block or call); one guidance method at a time: leave that block first")


class _Captured(Exception):
    pass


def unet_conditioning(unet, run) -> dict:
    """The UNet's conditioning inputs (text embedding, SDXL added conditions, ...) exactly as the stock pipeline
    builds them: `run()` starts the pipeline, its first UNet forward is captured and the run aborted there."""
    captured: dict = {}

    def grab(module, args, kwargs):
        captured["args"], captured["kwargs"] = args, dict(kwargs)
        raise _Captured

    handle = unet.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        run()
    except _Captured:
        pass
    finally:
        handle.remove()
    if "args" not in captured:
        raise RuntimeError("the pipeline finished without calling its UNet")
    args, kwargs = captured["args"], captured["kwargs"]
    extra = {k: v for k, v in kwargs.items() if k not in ("sample", "timestep", "return_dict")}
    if args[2:]:
        extra["encoder_hidden_states"] = args[2]
    return extra
