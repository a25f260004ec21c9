"""ComfyUI host: a per-call APPLY_MODEL router installing a chained attention override.

Never imports ComfyUI itself; `nodes/` passes ComfyUI objects in. Tested in CI against the pack's own
fake of ComfyUI's hook contract (tests/fake_comfy), pinned to traces recorded from a real ComfyUI.
"""

from .context import CONTEXT_KEY, EFFECTS_KEY, ROLE_KEY, CallContext
from .dispatcher import ChainedReplace, Dispatcher
from .guidance import PASS_EFFECTS_KEY, ExtraPassGuidance, install_guidance, options_for_pass, timestep_1000
from .model_plan import ModelPlan, UnsupportedComfyModel, family_of, plan_for, plan_sites
from .patch import Router, check_patch, patch_model

__all__ = [
    "CONTEXT_KEY",
    "CallContext",
    "ChainedReplace",
    "Dispatcher",
    "EFFECTS_KEY",
    "ExtraPassGuidance",
    "ModelPlan",
    "PASS_EFFECTS_KEY",
    "ROLE_KEY",
    "Router",
    "UnsupportedComfyModel",
    "check_patch",
    "family_of",
    "install_guidance",
    "options_for_pass",
    "patch_model",
    "plan_for",
    "plan_sites",
    "timestep_1000",
]
