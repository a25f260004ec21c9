"""ComfyUI host: a per-call APPLY_MODEL router installing a chained attention override.

Never imports ComfyUI itself; `nodes/` passes ComfyUI objects in. Tested in CI against the pack's own
fake of ComfyUI's hook contract (tests/fake_comfy), pinned to traces recorded from a real ComfyUI.
"""

from .context import CONTEXT_KEY, EFFECTS_KEY, ROLE_KEY, CallContext
from .dispatcher import ChainedReplace, Dispatcher
from .model_plan import ModelPlan, UnsupportedComfyModel, family_of, plan_for
from .patch import Router, patch_model

__all__ = [
    "CONTEXT_KEY",
    "CallContext",
    "ChainedReplace",
    "Dispatcher",
    "EFFECTS_KEY",
    "ModelPlan",
    "ROLE_KEY",
    "Router",
    "UnsupportedComfyModel",
    "family_of",
    "patch_model",
    "plan_for",
]
