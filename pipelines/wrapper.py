"""What every attnlab pipeline wrapper shares: it wraps a stock pipeline, delegates every attribute it does
not define to it, and counts the extra guidance forwards of its last call."""

from __future__ import annotations


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

    @property
    def extra_passes(self) -> int:
        """Extra forwards run by the last call (one per step where guidance was active, per denoiser)."""
        return sum(h.passes for h in self.hooks)


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
