"""ComfyUI nodes "AlignedGen Batch Align" and "AlignedGen Style Reference": style-consistent batches by shared
attention (AlignedGen on FLUX, StyleAligned on SD1.5/SDXL; SD3 and Wan too).

Batch Align patches a clone of the model with the `AlignedGen` effect: in every CFG chunk of a call (from
ComfyUI's ``cond_or_uncond``, so [1, 0], [0] and split cond/uncond calls all work) the first latent of the
batch is the reference and the others attend to its image keys/values (AdaIN on Q/K, ShiftPE on FLUX, key
scale λ). The reference attends only to itself, so it is exactly what the batch's first latent gives alone.

Style Reference makes an image the reference: it encodes the image with the VAE, returns the latent batch
with one extra first row, and patches the model so that this row is, at every model call, the image latent
forward-noised to the call's sigma (``model_sampling.noise_scaling``, fixed noise from `style_seed`; no
inversion). The first decoded image is then the (denoised) style reference; drop it with ImageFromBatch or
LatentFromBatch. Every row uses the sampler's conditioning (ComfyUI conditions a whole batch with one prompt);
describe the content per image by sampling separate batches, or use the diffusers pipeline for per-row prompts.
"""

from __future__ import annotations

import logging

import torch

from ..processors.alignedgen import AlignedGen, comfy_rope_source
from ..processors.host_comfy import UnsupportedComfyModel, check_patch
from ..processors.host_comfy.context import EFFECTS_KEY
from .host import patch
from .specs import CATEGORY, NodeSpec, Output, Param

logger = logging.getLogger("attnlab")

APPLY_MODEL = "apply_model"
LOCKSTEP_KEY = "attnlab_alignedgen_reference"
SHIFTS = ("width", "height", "index", "none")


def alignedgen_effect(model, adain: str = "qk", scale: float = 0.0, schedule: str = "fix", shift: str = "width",
                      layers: str = "", start_step: int = 0, end_step: int = -1, enabled: bool = True) -> AlignedGen:
    """The effect for the node's inputs, checked against `model` before anything is patched."""
    if shift not in SHIFTS:
        raise ValueError(f"shift must be one of {list(SHIFTS)}; got {shift!r}")
    if end_step != -1 and end_step < start_step:
        raise ValueError(f"end_step must be -1 (all steps) or >= start_step ({start_step}); got {end_step}")
    steps = None if (start_step == 0 and end_step == -1) else (int(start_step), 10**9 if end_step == -1 else int(end_step))
    text = (layers or "").strip() or None
    dm = model.model.diffusion_model
    pe = getattr(dm, "pe_embedder", None) or getattr(dm, "rope_embedder", None)  # FLUX / Wan
    rope = comfy_rope_source(pe, len(getattr(pe, "axes_dim", (0, 0, 0)))) if pe is not None else None
    effect = AlignedGen(layers=text, steps=steps, adain=adain, scale=None if scale == 0.0 else float(scale),
                        schedule=schedule, shift=0 if shift == "none" else "auto",
                        shift_axis="width" if shift == "none" else shift, enabled=enabled, rope_source=rope)
    try:
        check_patch(model, [effect])
    except UnsupportedComfyModel:
        raise
    except ValueError as e:
        raise ValueError(f"AlignedGen layers {text or '(default)'!r}: {e}") from None
    return effect


def apply_batch_align(model, adain: str, scale: float, schedule: str, shift: str, layers: str, start_step: int,
                      end_step: int, enabled: bool):
    effect = alignedgen_effect(model, adain, scale, schedule, shift, layers, start_step, end_step, enabled)
    if not enabled:
        return (model.clone(),)
    return (patch(model, [effect]),)


class LockStepReference:
    """APPLY_MODEL wrapper: row 0 of every chunk (rows per chunk = the latent batch) is the reference latent
    noised to the call's sigma. ComfyUI's x here is the sampler-space noisy latent, before calculate_input."""

    def __init__(self, base_model, reference: torch.Tensor, seed: int, rows: int):
        self.base = base_model
        self.reference = reference
        self.noise = torch.randn(reference.shape, generator=torch.Generator().manual_seed(int(seed)))
        self.rows = rows
        self.calls = 0

    def __deepcopy__(self, memo):
        return self

    def __call__(self, executor, x, t, *args, **kwargs):
        if x.shape[0] % self.rows == 0:
            sigma = t.flatten()[:1].to(x.device) if torch.is_tensor(t) else torch.tensor([float(t)])
            ms = self.base.model_sampling
            ref = ms.noise_scaling(sigma, self.noise.to(x.device, x.dtype), self.reference.to(x.device, x.dtype))
            x = x.clone()
            x[0::self.rows] = ref[0].to(x.dtype)
            self.calls += 1
        else:
            from ..processors.host_comfy.context import warn_once
            warn_once(("alignedgen-rows", x.shape[0], self.rows),
                      f"AlignedGen Style Reference: a model call with {x.shape[0]} rows is not made of chunks of "
                      f"{self.rows}; the reference row is not replaced in it")
        return executor(x, t, *args, **kwargs)


def style_pixels(image, height: int, width: int) -> torch.Tensor:
    """A ComfyUI IMAGE ([1, H, W, C], C = 1, 3 or 4, values in [0, 1]) resized to (height, width), as
    [1, height, width, 3]."""
    if not torch.is_tensor(image):
        raise ValueError(f"AlignedGen style image must be a ComfyUI IMAGE tensor, got {type(image).__name__}")
    x = image.detach().float()
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3, 4):
        raise ValueError(f"AlignedGen style image must be an IMAGE [B, H, W, C] with C = 1, 3 or 4; got shape "
                         f"{tuple(image.shape)}")
    if x.shape[0] != 1:
        raise ValueError(f"AlignedGen style image must be one image; got a batch of {x.shape[0]} "
                         "(use ImageFromBatch to pick one)")
    if min(x.shape[1:3]) < 8:
        raise ValueError(f"AlignedGen style image is too small ({x.shape[1]}x{x.shape[2]} pixels; at least 8x8)")
    if not torch.isfinite(x).all():
        raise ValueError("AlignedGen style image contains NaN or infinite values")
    x = x[..., :3] if x.shape[-1] >= 3 else x.expand(-1, -1, -1, 3)
    if tuple(x.shape[1:3]) != (height, width):
        x = torch.nn.functional.interpolate(x.permute(0, 3, 1, 2), size=(height, width), mode="bicubic",
                                            align_corners=False, antialias=True).clamp(0, 1).permute(0, 2, 3, 1)
    return x


def apply_style_reference(model, vae, image, latent, style_seed: int):
    if not isinstance(latent, dict) or "samples" not in latent:
        raise ValueError("AlignedGen Style Reference needs a LATENT input (e.g. EmptyLatentImage)")
    samples = latent["samples"]
    if samples.shape[0] < 1:
        raise ValueError("AlignedGen Style Reference: the latent batch is empty")
    check_patch(model, [AlignedGen()])  # the model is supported
    spatial = 16 if samples.ndim == 5 and samples.shape[1] == 48 else 8  # Wan 2.2's 16x VAE
    h, w = samples.shape[-2] * spatial, samples.shape[-1] * spatial
    pixels = style_pixels(image, h, w)
    z = vae.encode(pixels)
    if samples.ndim == 5 and z.ndim == 4:
        z = z[:, :, None]
    if tuple(z.shape[1:]) != tuple(samples.shape[1:]):
        if samples.ndim == 5 and tuple(z.shape[1:2]) == tuple(samples.shape[1:2]) and z.shape[-2:] == samples.shape[-2:]:
            z = z[:, :, :1].expand(-1, -1, samples.shape[2], -1, -1)  # a still image as every frame
        else:
            raise ValueError(f"AlignedGen Style Reference: the VAE gives latents of shape {tuple(z.shape[1:])} but the "
                             f"latent batch is {tuple(samples.shape[1:])}; use the model's own VAE")
    reference = model.model.process_latent_in(z.float())
    m = model.clone()
    effects = m.model_options.get("transformer_options", {}).get(EFFECTS_KEY, [])
    if not any(isinstance(e, AlignedGen) for e in effects):
        logger.info("attnlab: AlignedGen Style Reference adds AlignedGen with its defaults (no Batch Align before it)")
        m = patch(m, [alignedgen_effect(m)])
    rows = samples.shape[0] + 1
    m.remove_wrappers_with_key(APPLY_MODEL, LOCKSTEP_KEY) if m.get_wrappers(APPLY_MODEL, LOCKSTEP_KEY) else None
    m.add_wrapper_with_key(APPLY_MODEL, LOCKSTEP_KEY, LockStepReference(m.model, reference, style_seed, rows))
    out = {k: v for k, v in latent.items() if k not in ("samples", "batch_index", "noise_mask")}
    out["samples"] = torch.cat([torch.zeros_like(samples[:1]), samples], dim=0)
    return (m, out)


ALIGNEDGEN_BATCH = NodeSpec(
    node_id="AttnlabAlignedGen",
    display_name="AlignedGen Batch Align (style-consistent batch)",
    category=CATEGORY,
    description=(
        "Style-consistent batches by shared attention (AlignedGen, NeurIPS 2025, on FLUX; StyleAligned, CVPR 2024, "
        "on SD1.5/SDXL; SD3 and Wan too). The first latent of the batch is the style reference; every other image "
        "attends to its image keys/values (AdaIN on queries/keys, ShiftPE on FLUX so the reference sits to the "
        "right of each target, key scale λ). The reference attends only to itself. Use a batch of 2 or more "
        "(EmptyLatentImage batch_size); a batch of 1 is left unchanged."
    ),
    inputs=(
        Param("model", "MODEL", tooltip="the model to patch (a patched clone is returned; the input is untouched)"),
        Param("adain", "COMBO", "qk", options=("qk", "q", "none"),
              tooltip="AdaIN of the targets' image queries and keys toward the reference's statistics "
                      "(AlignedGen/StyleAligned code: qk; the AlignedGen paper: q)"),
        Param("scale", "FLOAT", 0.0, 0.0, 10.0, 0.01,
              tooltip="λ, key scale of the shared reference block (higher = more style, less prompt); "
                      "0 = the family default (FLUX 1.1, others 1.0)"),
        Param("schedule", "COMBO", "fix", options=("fix", "decrease"),
              tooltip="fix: λ every step; decrease: λ_t = σ² (flow models) / (t/1000)², sharing fades late"),
        Param("shift", "COMBO", "width", options=SHIFTS,
              tooltip="ShiftPE (FLUX): the reference's keys are placed one image further along this RoPE axis "
                      "(width: to the right, as AlignedGen); none = naive sharing. No effect on models without RoPE"),
        Param("layers", "STRING", "",
              tooltip="layers that share, e.g. '19-56'; empty = FLUX single-stream blocks, UNet/PixArt "
                      "self-attention, SD3 joint blocks, Wan self-attention"),
        Param("start_step", "INT", 0, 0, 10000, 1, tooltip="first step (index among the sampler's steps) that shares"),
        Param("end_step", "INT", -1, -1, 10000, 1, tooltip="sharing stops before this step; -1 = to the end"),
        Param("enabled", "BOOLEAN", True, tooltip="off: the model is returned unchanged"),
    ),
    outputs=(Output("MODEL", "model"),),
    run=apply_batch_align,
)

ALIGNEDGEN_REFERENCE = NodeSpec(
    node_id="AttnlabAlignedGenReference",
    display_name="AlignedGen Style Reference (image)",
    category=CATEGORY,
    description=(
        "Makes an image the style reference of an aligned batch: returns the latent batch with one extra first "
        "row and a model in which that row is, at every step, the image's latent noised to the step's sigma "
        "(fixed noise; no inversion). Put AlignedGen Batch Align before it to choose the sharing options (else "
        "its defaults are used). The first output image is the reference; drop it with ImageFromBatch."
    ),
    inputs=(
        Param("model", "MODEL", tooltip="the (aligned) model"),
        Param("vae", "VAE", tooltip="the model's VAE, to encode the style image"),
        Param("image", "IMAGE", tooltip="the style image (one image; resized to the latent's size if it differs)"),
        Param("latent", "LATENT", tooltip="the latent batch of the images to generate (e.g. EmptyLatentImage)"),
        Param("style_seed", "INT", 0, 0, 2**31 - 1, 1, tooltip="seed of the fixed noise the reference is noised with"),
    ),
    outputs=(Output("MODEL", "model"), Output("LATENT", "latent")),
    run=apply_style_reference,
)
