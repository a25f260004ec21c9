"""The one place nodes reach ComfyUI's attention: patch a MODEL through the core's ComfyUI host."""

from __future__ import annotations

from ..processors.host_comfy import patch_model


def _comfy_attention():
    """(override supported?, ComfyUI's attention function) of the running ComfyUI, or (True, None) outside it."""
    try:
        import comfy.ldm.modules.attention as attention  # noqa: PLC0415 - only inside ComfyUI
    except ImportError:
        return True, None
    return hasattr(attention, "wrap_attn"), attention.optimized_attention


def patch(model, effects):
    supported, attention = _comfy_attention()
    return patch_model(model, effects, override_supported=supported, attention=attention)
