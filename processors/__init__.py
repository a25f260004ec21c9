"""The attention core: the call as data, effects as middleware, kernels, and the two hosts.

Framework-free modules (call, effects, reference, entropy) import only torch. The hosts import their
framework lazily: `host_diffusers` needs diffusers; `host_comfy` needs ComfyUI only when run inside it.
"""

from .call import AttentionCall, RopeInfo, Site, StepInfo, TokenLayout
from .effects import KEEP, STAGES, Effect, EffectStack, Recorder
from .entropy import EntropyScaling, entropy_lambda
from .headsets import HeadSet
from .reference import reference_attention, sdpa_kernel
from .softpag import GuidanceSchedule, SoftPAG, perturbation_guidance

__all__ = [
    "AttentionCall",
    "Effect",
    "EffectStack",
    "EntropyScaling",
    "GuidanceSchedule",
    "HeadSet",
    "KEEP",
    "Recorder",
    "RopeInfo",
    "STAGES",
    "Site",
    "SoftPAG",
    "StepInfo",
    "TokenLayout",
    "entropy_lambda",
    "perturbation_guidance",
    "reference_attention",
    "sdpa_kernel",
]
