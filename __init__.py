"""attnlab: training-free attention methods for diffusion models, for diffusers and ComfyUI.

Python API (needs diffusers):

    import attnlab
    with attnlab.apply(pipe, [attnlab.EntropyScaling()]):
        image = pipe(prompt, height=1024, width=1024).images[0]

ComfyUI loads this same folder as a custom node pack through `comfy_entrypoint` (V3 nodes).
Importing the package imports neither diffusers nor ComfyUI; both are loaded on first use.
"""

from .processors import (AttentionCall, Effect, EffectStack, EntropyScaling, HeadSet, Site, SoftPAG, StepInfo,
                         TokenLayout)

__version__ = "0.1.0"

_LAZY = {
    "apply": ("processors.host_diffusers", "apply"),
    "Session": ("processors.host_diffusers", "Session"),
    "entropy_scaling": ("pipelines.entropy", "entropy_scaling"),
    "SoftPAGPipeline": ("pipelines.softpag", "SoftPAGPipeline"),
    "softpag": ("pipelines.softpag", "softpag"),
    "SoftPAGGuider": ("pipelines.softpag_guider", "SoftPAGGuider"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{module}", __name__), attr)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


async def comfy_entrypoint():
    """ComfyUI V3 entry point: the extension listing this pack's nodes."""
    from .nodes.v3 import AttnlabExtension

    return AttnlabExtension()


__all__ = [
    "AttentionCall",
    "Effect",
    "EffectStack",
    "EntropyScaling",
    "HeadSet",
    "Session",
    "Site",
    "SoftPAG",
    "SoftPAGGuider",
    "SoftPAGPipeline",
    "StepInfo",
    "TokenLayout",
    "apply",
    "comfy_entrypoint",
    "entropy_scaling",
    "softpag",
]
