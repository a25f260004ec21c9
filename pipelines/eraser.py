"""Attentive Eraser (AAS + SARG) object removal on stock diffusers pipelines (SIP; specs/attentive_eraser.md).

    from attnlab.pipelines.eraser import AttentiveEraserPipeline

    eraser = AttentiveEraserPipeline.from_pipe(pipe)              # SD1.5/2.x, SDXL; SD3 / FLUX experimental
    image = eraser(image, mask).images[0]                         # mask: 1 / white = remove

SIP (the official default, A.1.4): the family's stock inpaint pipeline, built from `pipe` with `from_pipe`
(components shared, nothing loaded), runs the sampling. With a standard (non-inpainting) denoiser those
pipelines replace the known region every step with `add_noise(z0, ε_fix, t_next)` (the last step with z0
itself), which is SIP. The mask handed to them reproduces the official latent blend mask
`max_pool2d(mask, f×f)` (f = the VAE factor) exactly: the (dilated) mask is max-pooled to the latent grid and
nearest-upsampled back to the image size; diffusers 0.42.1 binarises it (no-op), leaves a tensor of the
target size unresized, and takes it to the latent grid with nearest interpolation, which picks one pixel of
each constant f×f block (checked in tests/test_eraser_diffusers.py).

AAS is the `AttentiveEraser` effect (rows with role "redirected", default layers = up-block self-attention,
the official SD 7–15 / SDXL 34–69); SARG is one extra conditional forward per step folded into the
prediction by `GuidancePass` with w = −s:  ε̃ = ε + s(ε_AAS − ε). CFG is off by default (empty prompt,
guidance 1), as in the official code; with `guidance_scale > 1` the result is the three-pass form
ε_u + g(ε_c − ε_u) + s(ε_c^AAS − ε_c). `sarg_scale=0` or an empty mask runs no extra pass and is exactly
the plain SIP sampler; `sarg_scale=1` is pure AAS sampling (allowed here, unlike the official code).

Step gating (similarity suppression for the first `ss_steps + 1` steps, AAS from `start_step`) counts the
*executed* steps from 0, as the official code does, whatever index the scheduler gives the first executed
step (at strength 0.8 the run starts 10 steps into the 50-step schedule).

DIP (`mode="dip"`, UNet pipelines only; A.1.4): DDIM inversion of z0 = E(x) (mean) with the same number of
steps (empty prompt, guidance 1, ε at the destination t as in the official MasaCtrl-style `next_step`),
recording [z0, …, z_T]; then the stock text-to-image pipeline with a DDIM scheduler samples from z_T with
AAS+SARG, and after every step `callback_on_step_end` puts the inversion trajectory back outside the latent
mask (z = m·z + (1−m)·z_{t_next}; after the last step z0). Strength is always 1.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..processors.call import select
from ..processors.eraser import MAX_DILATE_PX, REDIRECTED, AttentiveEraser, as_mask_tensor, dilate
from ..processors.params import InvalidParameter, choice, number
from ..processors.softpag import MAX_GUIDANCE_SCALE
from ..processors.host_diffusers import Session
from .inputs import check_call_args, check_size_multiple, rgb_images
from .wrapper import PipelineWrapper, unet_conditioning
from ..processors.host_diffusers.guidance import GuidancePass, cfg_scales, guided

logger = logging.getLogger("attnlab")

MODES = ("sip", "dip")
MAX_SARG_SCALE = MAX_GUIDANCE_SCALE  # SARG is perturbation guidance with w = −s


def _inpaint_class(pipe):
    """The stock inpaint pipeline class for `pipe`'s family (SD, SDXL, SD3, FLUX)."""
    import diffusers

    name = type(pipe).__name__
    if name.startswith("StableDiffusionXL"):
        return diffusers.StableDiffusionXLInpaintPipeline
    if name.startswith("StableDiffusion3"):
        return diffusers.StableDiffusion3InpaintPipeline
    if name.startswith("Flux") and "Fill" not in name and "Kontext" not in name:
        return diffusers.FluxInpaintPipeline
    if name.startswith("StableDiffusion") and "Upscale" not in name and "Depth" not in name:
        return diffusers.StableDiffusionInpaintPipeline
    raise ValueError(f"Attentive Eraser supports StableDiffusion(XL/3) and FLUX pipelines; got {name}")


def default_dilate_px(sd_family: bool, height: int, width: int) -> float:
    """The growth of the official blur-and-threshold dilation, scaled with the image size: ≈ 2.5 px at 512² for
    SD1.x/2.x (kernels 7 and 13), ≈ 15 px at 1024² for SDXL (kernel 77; also used for SD3/FLUX); applied as a
    disk dilation (`processors.eraser.dilate`)."""
    size = math.sqrt(height * width)
    return 2.5 * size / 512.0 if sd_family else 15.0 * size / 1024.0


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of [B, C, H, W] with edge replication (like PIL's GaussianBlur)."""
    if sigma <= 0:
        return x
    r = max(1, math.ceil(3 * sigma))
    g = torch.exp(-0.5 * ((torch.arange(2 * r + 1, dtype=torch.float32) - r) / sigma) ** 2)
    g = (g / g.sum()).to(x)
    c = x.shape[1]
    y = F.pad(x, (r, r, 0, 0), mode="replicate")
    y = F.conv2d(y, g.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    y = F.pad(y, (0, 0, r, r), mode="replicate")
    return F.conv2d(y, g.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def resize_mask(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A binary [B, 1, h, w] mask resized to (height, width) (stretched if the aspect differs): area/bilinear
    resampling, then ≥ 0.5 → 1."""
    if tuple(mask.shape[-2:]) == (height, width):
        return mask
    m = F.interpolate(mask, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    return (m >= 0.5).float()


class AttentiveEraserPipeline(PipelineWrapper):
    """Object removal with Attentive Eraser on a stock pipeline. Other attributes are the wrapped pipeline's.

    sarg_scale: s of SARG (official 9; 0 = plain SIP, 1 = pure AAS). ss_scale, ss_steps, start_step, layers,
    kernel, mask_text_queries: see `attnlab.processors.eraser.AttentiveEraser`. dilate_px: mask dilation in
    image pixels (None: the official amount scaled by image size, `default_dilate_px`). mode: "sip" (or
    "dip", not implemented yet). session_options: passed to the attnlab Session (e.g. strict=True).
    """

    def __init__(self, pipe, sarg_scale: float = 9.0, ss_scale: float = 0.3, ss_steps: int = 9, layers=None,
                 dilate_px: Optional[float] = None, mode: str = "sip", *, start_step: int = 0,
                 kernel: str = "gather", mask_text_queries: bool = True, **session_options):
        denoiser = self._wrap(pipe)
        self.mode = choice("mode", mode, MODES)
        # s beyond ~100 only amplifies the extra pass's difference into saturated or NaN images
        self.sarg_scale = number("sarg_scale", sarg_scale, 0.0, MAX_SARG_SCALE)
        self.dilate_px = None if dilate_px is None else number("dilate_px", dilate_px, 0.0, MAX_DILATE_PX)
        self.options = dict(ss_scale=ss_scale, ss_steps=ss_steps, start_step=start_step, layers=layers,
                            kernel=kernel, mask_text_queries=mask_text_queries)
        self.session_options = session_options
        cls = _inpaint_class(pipe)
        in_ch = getattr(denoiser.config, "in_channels", None)
        if self.family == "unet" and mode == "sip" and in_ch not in (None, 4):
            raise ValueError(f"SIP runs diffusers' inpaint pipeline, which blends known regions per step only for "
                             f"4-channel text-to-image UNets; this one has {in_ch} input channels (an inpainting "
                             "model, or a non-standard latent space): use mode='dip'")
        self.inpaint = pipe if type(pipe) is cls else cls.from_pipe(pipe)
        if mode == "dip" and self.family != "unet":
            raise NotImplementedError("Attentive Eraser DIP is implemented for UNet pipelines (SD1.x/2.x, SDXL) only; "
                                      "use mode='sip' for SD3 / FLUX")
        self.sd_family = cls.__name__ == "StableDiffusionInpaintPipeline"
        self.hooks: list[GuidancePass] = []
        self.last_mask: Optional[torch.Tensor] = None  # the image-size blend mask fed to the last call
        self.last_trajectory: Optional[list] = None  # DIP: the inversion trajectory [z0, …, z_T] of the last call
        self.effect = AttentiveEraser(torch.ones(1, 1, 2, 2), **self.options)
        self.effect.validate()
        Session(self.inpaint, [self.effect], **session_options)  # check the layers against the model now

    def __repr__(self) -> str:
        return (f"AttentiveEraserPipeline({type(self.inpaint).__name__}, sarg_scale={self.sarg_scale}, "
                f"mode={self.mode!r}, {self.options})")

    # --- masks --------------------------------------------------------------------------------------
    def image_size(self, image, height=None, width=None) -> tuple[int, int]:
        if isinstance(image, list):
            image = image[0]
        if isinstance(image, np.ndarray) and image.ndim == 3:
            image = image[None]
        if torch.is_tensor(image) and image.ndim == 3:
            image = image[None]
        return self.inpaint.image_processor.get_default_height_width(image, height, width)

    def prepare_mask(self, mask, height: int, width: int) -> torch.Tensor:
        """The user mask as the binary, dilated object mask at image size, [B, 1, height, width]."""
        m = resize_mask(as_mask_tensor(mask), height, width)
        px = self.dilate_px if self.dilate_px is not None else default_dilate_px(self.sd_family, height, width)
        return dilate(m, px)

    def blend_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """The image-size mask that makes the stock inpaint pipeline blend with exactly
        `max_pool2d(mask, f×f)` on the latent grid (f = VAE factor)."""
        f = int(self.inpaint.vae_scale_factor)
        h, w = mask.shape[-2:]
        if h % f or w % f:
            raise ValueError(f"image size {h}x{w} is not a multiple of the VAE factor {f}")
        return F.interpolate(F.max_pool2d(mask, f), size=(h, w), mode="nearest")

    # --- running ------------------------------------------------------------------------------------
    def __call__(self, image, mask, prompt="", strength: Optional[float] = None, num_inference_steps: int = 50,
                 generator=None, output_type: str = "pil", composite: bool = False,
                 guidance_scale: Optional[float] = None, height: Optional[int] = None, width: Optional[int] = None,
                 composite_blur: Optional[float] = None, return_dict: bool = True, **kwargs):
        if composite and output_type == "latent":
            raise ValueError("composite=True needs decoded images; use another output_type")
        check_call_args(dict(prompt=prompt, strength=strength, num_inference_steps=num_inference_steps,
                             guidance_scale=guidance_scale, height=height, width=width, **kwargs))
        image, count, (ih, iw) = rgb_images("image", image, min_side=2 * int(self.inpaint.vae_scale_factor))
        if composite_blur is not None:
            number("composite_blur", composite_blur, 0.0, 1000.0)
        if height is None and width is None:
            check_size_multiple("image", ih, iw, int(self.inpaint.vae_scale_factor))
        h, w = self.image_size(image, height, width)
        check_size_multiple("height x width", h, w, int(self.inpaint.vae_scale_factor))
        obj = self.prepare_mask(mask, h, w)
        if obj.shape[0] not in (1, count):
            raise InvalidParameter(f"mask has {obj.shape[0]} masks for {count} image(s): pass one mask, or one per "
                                   "image")
        if self.sarg_scale > 0 and bool(obj.flatten(1).all(1).any()):
            raise InvalidParameter("mask covers the whole image (after dilation): Attentive Eraser redirects "
                                   "attention to the background, and there is none; use a smaller mask or dilate_px")
        if not bool(obj.any()):
            logger.warning("Attentive Eraser: the mask is empty, so nothing is erased (plain inpaint sampling)")
        blend = self.blend_mask(obj)
        self.last_mask = blend
        if self.mode == "dip":
            if strength not in (None, 1.0):
                raise ValueError("DIP inverts the whole schedule (strength 1); other strengths are not supported")
            result = self._dip(image, obj, prompt, num_inference_steps, output_type="pt" if composite else output_type,
                               guidance_scale=guidance_scale, height=h, width=w, **kwargs)
            if composite:
                result = self._composite(result, image, obj, h, w, output_type, composite_blur)
            return result if return_dict else tuple(result.values())
        strength = 0.8 if strength is None else strength
        call = dict(prompt=prompt, image=image, mask_image=blend, strength=strength,
                    num_inference_steps=num_inference_steps, generator=generator, height=h, width=w,
                    output_type="pt" if composite else output_type, **kwargs)
        if guidance_scale is None:
            if self.family != "flux":
                call["guidance_scale"] = 1.0
        else:
            call["guidance_scale"] = guidance_scale
        scales = cfg_scales(self.inpaint, self.family, (), call)
        active = self.sarg_scale > 0 and bool(obj.any())
        with self.enabled(obj, scales, active):
            result = self.inpaint(**call)
        if composite:
            result = self._composite(result, image, obj, h, w, output_type, composite_blur)
        if not return_dict:
            return tuple(result.values()) if hasattr(result, "values") else result
        return result

    @contextlib.contextmanager
    def enabled(self, obj_mask: torch.Tensor, cfg_scale: dict, active: bool = True, pipeline=None):
        """AAS (on "redirected" rows) and the SARG extra pass installed on the denoiser of `pipeline` (default:
        the inpaint pipeline)."""
        pipeline = self.inpaint if pipeline is None else pipeline
        start = int(self.options["start_step"])

        def scale_at(step, t):  # SARG is perturbation guidance with w = −s
            if start == 0:
                return -self.sarg_scale
            executed = step.executed
            return -self.sarg_scale if executed is None else select(executed >= start, -self.sarg_scale, 0.0)

        scale_at.needs_step = start > 0

        with guided(pipeline, [AttentiveEraser(obj_mask, **self.options)], scale_at, REDIRECTED,
                    lambda name: (lambda: cfg_scale.get(name)), active=active, **self.session_options) as (session, hooks):
            self.hooks = hooks
            yield session

    # --- DIP ----------------------------------------------------------------------------------------
    def text2image(self):
        """The family's stock text-to-image pipeline sharing `pipe`'s components (for DIP sampling)."""
        import diffusers

        cls = (diffusers.StableDiffusionXLPipeline if type(self.inpaint).__name__.startswith("StableDiffusionXL")
               else diffusers.StableDiffusionPipeline)
        return cls.from_pipe(self.pipe)

    @torch.no_grad()
    def invert(self, t2i, z0: torch.Tensor, steps: int, call: dict) -> list[torch.Tensor]:
        """DDIM inversion (MasaCtrl-style next step, ε evaluated at the destination t; empty prompt, guidance
        1) on t2i's scheduler timesteps. Returns [z0, z_t1, …, z_T]. The UNet's other inputs (text embedding,
        SDXL added conditions) are the ones the stock pipeline builds for `call` (captured from its first
        forward, which is then aborted)."""
        unet = t2i.unet
        extra = unet_conditioning(unet, lambda: t2i(**{**call, "latents": z0, "output_type": "latent",
                                                        "num_inference_steps": steps}))
        sched = t2i.scheduler
        sched.set_timesteps(steps)
        timesteps = sched.timesteps.tolist()
        train = sched.config.num_train_timesteps
        acp = sched.alphas_cumprod
        final = sched.final_alpha_cumprod
        z = z0
        out = [z0]
        for t in reversed(timesteps):
            # diffusers' DDIM step goes t -> t − T_train // steps; invert exactly that (MasaCtrl's next_step)
            t = int(t)
            prev = min(t - train // steps, train - 1)
            a_t = acp[prev] if prev >= 0 else final
            a_next = acp[int(t)]
            eps = unet(z, t, **extra, return_dict=False)[0]
            x0 = (z - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5
            z = a_next ** 0.5 * x0 + (1 - a_next) ** 0.5 * eps
            out.append(z)
        return out

    def _dip(self, image, obj, prompt, steps, output_type, guidance_scale, height, width, **kwargs):
        from diffusers import DDIMScheduler

        t2i = self.text2image()
        # the official DDIM settings (A.2): no x0 clipping, final alpha from alphas_cumprod[0]
        t2i.scheduler = DDIMScheduler.from_config(self.pipe.scheduler.config, clip_sample=False,
                                                  set_alpha_to_one=False)
        vae = t2i.vae
        x = self.inpaint.image_processor.preprocess(image, height=height, width=width)
        x = x.to(device=vae.device, dtype=vae.dtype)
        with torch.no_grad():
            z0 = vae.encode(x).latent_dist.mode() * vae.config.scaling_factor
        f = int(self.inpaint.vae_scale_factor)
        m = F.max_pool2d(obj, f).to(z0)
        call = dict(prompt=prompt, height=height, width=width, **kwargs)
        call["guidance_scale"] = 1.0 if guidance_scale is None else guidance_scale
        trajectory = self.invert(t2i, z0, steps, {**call, "prompt": "", "guidance_scale": 1.0})
        backwards = trajectory[::-1]  # z_T … z_t1, z0
        self.last_trajectory = trajectory
        user_cb = call.pop("callback_on_step_end", None)

        def replace_background(pipe, i, t, kw):
            kw = dict(kw)
            kw["latents"] = m * kw["latents"] + (1 - m) * backwards[i + 1]
            out = dict(user_cb(pipe, i, t, kw) or {}) if user_cb is not None else {}
            out.setdefault("latents", kw["latents"])
            return out

        inputs = call.pop("callback_on_step_end_tensor_inputs", None) or ["latents"]
        if "latents" not in inputs:
            inputs = [*inputs, "latents"]
        call.update(num_inference_steps=steps, latents=backwards[0], output_type=output_type,
                    callback_on_step_end=replace_background, callback_on_step_end_tensor_inputs=inputs)
        scales = cfg_scales(t2i, self.family, (), call)
        active = self.sarg_scale > 0 and bool(obj.any())
        with self.enabled(obj, scales, active, pipeline=t2i):
            return t2i(**call)

    def _composite(self, result, image, obj, h, w, output_type, blur):
        """M_f = 1 − (1 − M)(1 − GaussBlur(M)); out = M_f·generated + (1 − M_f)·input (official SD scripts)."""
        proc = self.inpaint.image_processor
        gen = result.images  # [B, 3, h, w] in [0, 1]
        x = (proc.preprocess(image, height=h, width=w).to(gen) + 1) / 2
        sigma = 15.0 * math.sqrt(h * w) / 512.0 if blur is None else float(blur)
        m = obj.to(gen)
        mf = 1 - (1 - m) * (1 - gaussian_blur(m, sigma))
        out = mf * gen + (1 - mf) * x
        result.images = proc.postprocess(out * 2 - 1, output_type=output_type)
        return result



def default_mode(pipe) -> str:
    """"sip" where diffusers' inpaint pipeline can run the model (4-channel UNets, DiTs), else "dip"."""
    unet = getattr(pipe, "unet", None)
    return "dip" if unet is not None and unet.config.in_channels != 4 else "sip"


def attentive_eraser(pipe, **options) -> AttentiveEraserPipeline:
    """Shorthand for `AttentiveEraserPipeline.from_pipe(pipe, **options)`."""
    return AttentiveEraserPipeline(pipe, **options)
