"""ComfyUI node "FreeSwim": inward sliding-window attention with a full-attention branch supplying the
cross-attention (arXiv 2511.14712), for the second (high-resolution, denoise ≈ 0.7) pass of a two-stage graph."""

from __future__ import annotations

from ..processors.freeswim import MMDIT_OVERRIDES, FreeSwim, freeswim_effects
from ..processors.host_comfy import check_patch
from ..processors.host_comfy.dual_pass import install_dual_pass
from .host import patch
from .specs import CATEGORY, NodeSpec, Output, Param

NODE_BACKENDS = ("auto", "chunked", "flex")


def apply_freeswim(model, window_scale: float, base_height: int, base_width: int, cache_steps: int,
                   override_uncond: bool, logit_scale: float, backend: str, mmdit_override: str):
    if (base_height == 0) != (base_width == 0):
        raise ValueError("base_height and base_width: set both, or leave both at 0 for the model's native size")
    base = (base_height, base_width) if base_height else None
    effects = freeswim_effects(logit_scale=logit_scale, window_scale=window_scale, base_size=base,
                               cache_steps=cache_steps, override_uncond=override_uncond, backend=backend,
                               mmdit_override=mmdit_override)
    check_patch(model, effects)
    patched = patch(model, effects)
    swim = next(e for e in effects if isinstance(e, FreeSwim))
    install_dual_pass(patched, swim)
    return (patched,)


FREESWIM = NodeSpec(
    node_id="AttnlabFreeSwim",
    display_name="FreeSwim (sliding-window high-res attention)",
    category=CATEGORY,
    description=(
        "FreeSwim (arXiv 2511.14712) for sampling above the training resolution: self-attention of every image "
        "token sees only a window the size of the model's native token grid (shifted inward at the borders, all "
        "frames for video), while a full-attention branch run alongside supplies the cross-attention (text) output, "
        "which suppresses repeated subjects. Use on the second pass of a two-stage graph: sample at the native size, "
        "upscale, VAE-encode, sample again with denoise ≈ 0.7 (and ModelSamplingSD3 shift ≈ 9 for Wan). "
        "Wan, FLUX, SD3, SD1.5/SD2/SDXL."
    ),
    inputs=(
        Param("model", "MODEL", tooltip="the model to patch (a patched clone is returned; the input is untouched)"),
        Param("window_scale", "FLOAT", 1.0, 0.05, 16.0, 0.05,
              tooltip="window size relative to the native token grid (1 = the training grid, e.g. 31×53 tokens for Wan 480×832)"),
        Param("base_height", "INT", 0, 0, 16384, 8,
              tooltip="the native height in pixels the window is sized for; 0 = the model's (Wan 480, SD1.5 512, SDXL/SD3/FLUX 1024)"),
        Param("base_width", "INT", 0, 0, 16384, 8, tooltip="the native width in pixels; 0 = the model's (Wan 832)"),
        Param("cache_steps", "INT", 1, 1, 100, 1,
              tooltip="recompute the full branch's cross-attention every k steps and reuse it in between (1 = every "
                      "step; 2-5 saves most of the full branch's cost)"),
        Param("override_uncond", "BOOLEAN", True,
              tooltip="the negative (uncond) pass also takes its cross-attention from a full branch (the official "
                      "no-cache code); off = it keeps its own (the official cache code)"),
        Param("logit_scale", "FLOAT", 1.0, 0.0, 4.0, 0.05,
              tooltip="strength of the official logit scale ×sqrt(1 + ln2/ln(h0·w0)) (1 = official, 0 = off)"),
        Param("backend", "COMBO", "auto", options=NODE_BACKENDS,
              tooltip="window kernel: auto (FlexAttention on CUDA, else chunked exact SDPA), chunked, flex"),
        Param("mmdit_override", "COMBO", "text_stream", options=MMDIT_OVERRIDES,
              tooltip="FLUX/SD3 joint attention: text_stream (the window branch's text tokens take the full branch's "
                      "attention output), lse (also the image queries' text partial, merged by log-sum-exp), none"),
    ),
    outputs=(Output("MODEL", "model"),),
    run=apply_freeswim,
)
