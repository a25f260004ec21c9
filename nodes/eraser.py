"""ComfyUI node "Attentive Eraser": object removal by self-attention redirection (AAS + SARG, arXiv 2412.12974).

The node patches the model with the AAS effect (acting only in an extra, "redirected" conditional pass) and
a post-CFG function that runs that pass once per step and returns SARG's extrapolation

    result = denoised + scale·(D_AAS − cond_denoised)

(ComfyUI's "denoised" space; SARG is affine, so this equals the official ε-space formula). With cfg 1 and an
empty prompt, as the method is used, denoised == cond_denoised and this is D + s·(D_AAS − D).

The stochastic inpainting process (SIP) is plain ComfyUI: VAEEncode → SetLatentNoiseMask → KSampler (ddim,
ddim_uniform, denoise 0.8), see `workflows/attentive_eraser_sd15.json`.

dilate_px defaults to 0: ComfyUI users grow masks with GrowMask (which then also widens the repainted
region, as the official dilation does), and the token masks are max-pooled to each
layer's grid, which already marks a token as object when any of its pixels is.
"""

from __future__ import annotations

import logging

import torch

from ..processors.eraser import REDIRECTED, AttentiveEraser
from ..processors.host_comfy import ExtraPassGuidance, UnsupportedComfyModel, check_patch, install_guidance
from ..processors.softpag import GuidanceSchedule
from .host import patch
from .specs import CATEGORY, NodeSpec, Output, Param

logger = logging.getLogger("attnlab")


def sarg_combine(args: dict, extra: torch.Tensor, scale: float) -> torch.Tensor:
    """SARG in ComfyUI's post-CFG space: ``denoised + s·(extra − cond_denoised)``."""
    return args["denoised"] + scale * (extra - args["cond_denoised"])


def mask_batch(mask) -> torch.Tensor:
    """A ComfyUI MASK ([B, H, W] or [H, W], 1 = object) as a float tensor [B, 1, H, W]; raises ValueError for
    a missing, empty, non-finite or oddly shaped mask."""
    if mask is None:
        raise ValueError("Attentive Eraser needs a mask (a MASK input, 1/white = object to remove)")
    if not torch.is_tensor(mask):
        raise ValueError(f"Attentive Eraser mask must be a ComfyUI MASK tensor, got {type(mask).__name__}")
    if mask.numel() == 0:
        raise ValueError(f"Attentive Eraser mask is empty (shape {tuple(mask.shape)})")
    m = mask.detach().float().cpu()
    if m.ndim == 2:
        m = m[None]
    if m.ndim == 4 and m.shape[1] == 1:
        m = m[:, 0]
    if m.ndim != 3:
        raise ValueError(f"Attentive Eraser mask must be [B, H, W] or [H, W]; got shape {tuple(mask.shape)}")
    if not torch.isfinite(m).all():
        raise ValueError("Attentive Eraser mask contains NaN or infinite values")
    return m[:, None]


def _layers(text: str):
    text = text.strip()
    return text or None


def eraser_setup(model, mask, ss_scale: float, ss_steps: int, dilate_px: float, layers: str):
    """(the AAS effect, active?) for the node's inputs, all checked against `model` before anything is
    patched. Inactive: the mask selects nothing or everything (AAS would change nothing)."""
    m = mask_batch(mask)
    text = _layers(layers)
    try:
        effect = AttentiveEraser(m, ss_scale=ss_scale, ss_steps=ss_steps, layers=text, dilate_px=dilate_px)
    except ValueError as e:
        raise ValueError(f"Attentive Eraser layers {text!r}: {e}") from None
    effect.validate()
    try:
        check_patch(model, [effect])
    except UnsupportedComfyModel:
        raise
    except ValueError as e:
        raise ValueError(f"Attentive Eraser layers {text or '(default)'!r}: {e}") from None
    if not effect.mask.any():
        logger.warning("attnlab: Attentive Eraser mask is empty (no pixel >= 0.5); the node changes nothing")
        return effect, False
    if effect.mask.all():
        logger.warning("attnlab: Attentive Eraser mask covers the whole image (no background to redirect "
                       "attention to); the node changes nothing")
        return effect, False
    return effect, True


def apply_attentive_eraser(model, mask, scale: float, ss_scale: float, ss_steps: int, dilate_px: float,
                           layers: str):
    effect, active = eraser_setup(model, mask, ss_scale, ss_steps, dilate_px, layers)
    if not active or scale == 0.0:  # the stock model, and no extra pass
        return (model.clone(),)
    schedule = GuidanceSchedule(scale=float(scale))
    schedule.validate()
    patched = patch(model, [effect])
    return (install_guidance(patched, ExtraPassGuidance(schedule, [effect], role=REDIRECTED, combine=sarg_combine)),)


ATTENTIVE_ERASER = NodeSpec(
    node_id="AttnlabAttentiveEraser",
    display_name="Attentive Eraser (object removal)",
    category=CATEGORY,
    description=(
        "Training-free object removal (Attentive Eraser, AAAI 2025, arXiv 2412.12974). Each step runs one extra "
        "conditional pass in which self-attention is redirected away from the masked object (no query may attend "
        "to object tokens; during the first ss_steps+1 steps the object queries' logits are scaled by ss_scale), "
        "and the result is pushed toward it: denoised + scale·(redirected − cond). Use it for inpainting: "
        "VAEEncode → SetLatentNoiseMask → KSampler (ddim, ddim_uniform, denoise 0.8, cfg 1, empty prompts). "
        "scale 0 or an empty mask leave the model unchanged. SD1.5/SD2/SDXL; SD3/FLUX/Wan experimental."
    ),
    inputs=(
        Param("model", "MODEL", tooltip="the model to patch (a patched clone is returned; the input is untouched)"),
        Param("mask", "MASK",
              tooltip="the object to remove (1/white = object), any size and aspect ratio: it is resized to every "
                      "attention layer's token grid (a token is object if any of its pixels is; values >= 0.5 count)"),
        Param("scale", "FLOAT", 9.0, 0.0, 100.0, 0.1,
              tooltip="SARG s: result = denoised + s·(redirected − cond); 9 as in the paper for SD/SDXL, 1 = pure "
                      "redirected sampling, 0 = off (no extra pass)"),
        Param("ss_scale", "FLOAT", 0.3, 0.01, 1.0, 0.01,
              tooltip="similarity suppression λ: object queries' logits are multiplied by λ in the early steps; "
                      "1 = no suppression"),
        Param("ss_steps", "INT", 9, -1, 10000, 1,
              tooltip="similarity suppression while the step index (among the steps the sampler runs) is <= "
                      "ss_steps; 9 = the first 10 steps (official), -1 = never"),
        Param("dilate_px", "FLOAT", 0.0, 0.0, 256.0, 0.5,
              tooltip="grow the mask by this many pixels (a disk) for attention redirection only; "
                      "0 = as given. To grow the repainted region too, put "
                      "GrowMask in front of both this node and SetLatentNoiseMask"),
        Param("layers", "STRING", "", multiline=False,
              tooltip="self-attention layers to redirect; empty = every up-block layer (official: SD1.5 'L7-15', "
                      "SDXL 'L34-69'); else a layer set like 'L34-69' or UNet blocks 'u0-8' (DiTs: 'L10-18')"),
    ),
    outputs=(Output("MODEL", "model"),),
    run=apply_attentive_eraser,
)
