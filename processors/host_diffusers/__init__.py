"""diffusers host: attnlab processors, run state and the install/remove session."""

from .model_info import DENOISER_FAMILIES, UnsupportedModelError, attention_sites, family_of, geometry_of
from .run_state import RunState
from .session import Session, apply, denoisers_of

__all__ = [
    "DENOISER_FAMILIES",
    "RunState",
    "Session",
    "UnsupportedModelError",
    "apply",
    "attention_sites",
    "denoisers_of",
    "family_of",
    "geometry_of",
]
