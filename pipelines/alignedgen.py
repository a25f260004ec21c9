"""AlignedGen / StyleAligned style-consistent batches on stock diffusers pipelines.

    from attnlab.pipelines.alignedgen import AlignedGenPipeline

    aligned = AlignedGenPipeline.from_pipe(pipe)                   # FLUX, SD1.5/SDXL, SD3, PixArt, Wan
    images = aligned(["a cat, watercolor", "a dog, watercolor", "a car, watercolor"]).images
    images = aligned(["a cat", "a dog"], style_image=img, style_prompt="a watercolor painting").images

The first prompt's image is the reference; the others attend to its image keys/values (the `AlignedGen`
effect, `processors/alignedgen.py`). With a style image, the reference is that image, run in lock-step as
row 0 of every chunk: before every denoiser forward its row is replaced by the image's latent forward-noised
to the forward's own noise level (flow models: (1−σ)·z + σ·ε with σ the timestep the denoiser gets;
ε-prediction UNets/PixArt: √ᾱ_t·z + √(1−ᾱ_t)·ε, which is the scheduler's scaled model input for DDIM, Euler
and the other schedulers alike). ε is fixed for the run (`style_seed`); no inversion. The reference row is
dropped from the output unless `return_reference=True`.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Optional, Sequence

import numpy as np
import torch

from ..processors.alignedgen import AlignedGen
from ..processors.tracing import compiling
from ..processors.host_diffusers import Session
from ..processors.host_diffusers.model_info import unwrap
from ..processors.effects import Effect
from ..processors.params import InvalidParameter, ParameterTypeError, choice, effect_list, integer, text
from .inputs import check_call_args
from .wrapper import PipelineWrapper, unet_conditioning

STYLE_FAMILIES = ("flux", "unet", "sd3", "pixart")
_PIL_MODES = ("RGB", "RGBA", "L", "LA", "P", "PA", "CMYK", "YCbCr", "RGBX")


def style_tensor(image, height: int, width: int) -> torch.Tensor:
    """A style image (PIL image in an RGB-convertible mode, HWC/CHW uint8 or float array/tensor in [0, 1], or a
    ComfyUI IMAGE [1, H, W, 3]) as a [1, 3, height, width] float tensor in [-1, 1]. Any size is accepted and
    resized (stretched, bicubic) to the generation size; grayscale is replicated, alpha is dropped."""
    if image is None:
        raise InvalidParameter("style_image is None")
    if hasattr(image, "convert") and hasattr(image, "mode"):  # PIL
        if image.mode not in _PIL_MODES:
            raise InvalidParameter(f"style_image has PIL mode {image.mode!r}; use an RGB, RGBA, L or palette image "
                             f"(accepted modes: {', '.join(_PIL_MODES)})")
        image = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    channels_last = False
    if isinstance(image, np.ndarray):
        if image.dtype.kind not in "uif":
            raise ParameterTypeError(f"style_image must be numeric, got an array of dtype {image.dtype}")
        scale = 255.0 if image.dtype.kind in "ui" else 1.0
        image = torch.from_numpy(np.ascontiguousarray(image)).float() / scale
        channels_last = True  # numpy images are (H, W, C)
    if not torch.is_tensor(image):
        raise ParameterTypeError(f"style_image must be a PIL image, numpy array or torch tensor, got "
                                 f"{type(image).__name__}")
    x = image.detach().float()
    if x.ndim == 4:
        if x.shape[0] != 1:
            raise InvalidParameter(f"style_image must be one image; got a batch of {x.shape[0]}")
        x = x[0]
    if x.ndim == 2:
        x = x[None].expand(3, -1, -1)
    elif x.ndim == 3 and x.shape[-1] in (1, 3, 4) and (channels_last or x.shape[0] not in (1, 3)):
        x = x.permute(2, 0, 1)  # (H, W, C) -> (C, H, W); a tensor is (C, H, W) unless only its last axis fits
    if x.ndim != 3:
        raise InvalidParameter(f"style_image must be (H, W), (H, W, C), (C, H, W) or (1, ...); got shape "
                               f"{tuple(image.shape)}")
    if x.shape[0] not in (1, 3, 4):
        raise InvalidParameter(f"style_image must have 1, 3 or 4 channels; got shape {tuple(image.shape)}")
    x = x[:3] if x.shape[0] >= 3 else x.expand(3, -1, -1)
    if min(x.shape[-2:]) < 8:
        raise InvalidParameter(f"style_image is too small ({x.shape[-2]}x{x.shape[-1]} pixels; at least 8x8)")
    if not torch.isfinite(x).all():
        raise InvalidParameter("style_image contains NaN or infinite values")
    if x.min() < -1e-3 or x.max() > 1 + 1e-3:
        raise InvalidParameter(f"style_image values must be in [0, 1] (floats) or 0..255 (integers); got "
                         f"[{float(x.min()):.3g}, {float(x.max()):.3g}]")
    x = torch.nn.functional.interpolate(x[None], size=(height, width), mode="bicubic", align_corners=False,
                                        antialias=True).clamp(0, 1)
    return x * 2.0 - 1.0


class LockStepReference:
    """Forward pre-hook on the denoiser: row 0 of every chunk of `rows` rows gets the style latent noised to
    the forward's noise level. `noised(t, like)` returns that latent (shape of one row) for timestep `t`."""

    def __init__(self, denoiser, rows: int, noised):
        self.rows, self.noised = rows, noised
        self.names = list(inspect.signature(unwrap(denoiser).forward).parameters)
        self.forwards = 0
        self.handle = denoiser.register_forward_pre_hook(self, with_kwargs=True)

    def _get(self, args, kwargs, names):
        for name in names:
            if name in kwargs:
                return kwargs[name], ("kw", name)
            if name in self.names and self.names.index(name) < len(args):
                return args[self.names.index(name)], ("pos", self.names.index(name))
        return None, None

    def __call__(self, module, args, kwargs):
        x, where = self._get(args, kwargs, ("hidden_states", "sample"))
        t, _ = self._get(args, kwargs, ("timestep",))
        if x is None or t is None:
            raise RuntimeError("AlignedGen style image: the denoiser was called without a latent/timestep")
        if x.shape[0] % self.rows:
            raise RuntimeError(f"AlignedGen style image: denoiser batch {x.shape[0]} is not a multiple of the "
                               f"{self.rows} rows per chunk")
        if compiling():  # the timestep stays a tensor in a compiled graph (its value changes every step)
            tval = t.flatten()[0].float() if torch.is_tensor(t) else float(t)
        else:
            tval = float(t.flatten()[0]) if torch.is_tensor(t) else float(t)
            self.forwards += 1
        x = x.clone()
        ref = self.noised(tval, x[0]).to(dtype=x.dtype, device=x.device)
        x[0::self.rows] = ref
        if where[0] == "kw":
            kwargs = dict(kwargs)
            kwargs[where[1]] = x
        else:
            args = list(args)
            args[where[1]] = x
            args = tuple(args)
        return args, kwargs

    def remove(self):
        self.handle.remove()


class AlignedGenPipeline(PipelineWrapper):
    """Style-aligned batches on a stock pipeline. `pipe(prompts, **kwargs)` arguments pass through.

    Effect options (see `attnlab.processors.alignedgen.AlignedGen`): layers, steps, adain ("qk"/"q"/"none"),
    scale (λ), schedule ("fix"/"decrease"), shift ("auto" = +W tokens, or an int; 0 = naive sharing),
    shift_axis, ref_frames (Wan). session_options go to the attnlab Session.
    """

    def __init__(self, pipe, *, layers=None, steps=None, adain: str = "qk", scale: Optional[float] = None,
                 schedule: str = "fix", shift="auto", shift_axis: str = "width", ref_frames="all",
                 effects: Sequence = (), **session_options):
        self._wrap(pipe)
        self.effect = AlignedGen(layers=layers, steps=steps, adain=adain, scale=scale, schedule=schedule,
                                 shift=shift, shift_axis=shift_axis, ref_frames=ref_frames)
        self.extra_effects = effect_list("effects", effects, Effect)
        if any(isinstance(e, AlignedGen) for e in self.extra_effects):
            raise InvalidParameter("effects contains an AlignedGen effect: AlignedGenPipeline installs its own; a "
                                   "second one would share attention twice")
        self.session_options = session_options
        self.lockstep: Optional[LockStepReference] = None
        self.last_trajectory: Optional[dict] = None
        Session(pipe, [self.effect, *self.extra_effects], **session_options)  # validate now

    def __repr__(self) -> str:
        return f"AlignedGenPipeline({type(self.pipe).__name__}, {self.effect!r})"

    @contextlib.contextmanager
    def enabled(self):
        """Install the sharing effect for the block (for code that calls the wrapped pipeline itself)."""
        with Session(self.pipe, [self.effect, *self.extra_effects], **self.session_options) as session:
            yield session

    def __call__(self, prompt=None, *args, style_image=None, style_prompt: str = "", style_seed: int = 0,
                 inversion: str = "none", return_reference: bool = False, **kwargs):
        """prompt: the list of prompts (the first is the reference unless `style_image` is given). style_image:
        an image to use as the reference (see `style_tensor`); style_prompt: its prompt; style_seed: the fixed
        noise it is forward-noised with; inversion: "none" (forward noising) or "ddim" (SD1.5/SDXL: the
        reference row follows the DDIM inversion of the image with `style_prompt`, one extra UNet forward per
        step, as StyleAligned's transfer notebook). return_reference: keep the reference row in the output."""
        if args:
            raise TypeError("AlignedGenPipeline takes the prompt list positionally and everything else by keyword")
        check_call_args(dict(prompt=prompt, **kwargs))
        text("style_prompt", style_prompt, allow_empty=True)
        integer("style_seed", style_seed, 0, 2**63 - 1)
        choice("inversion", inversion, ("none", "ddim"))
        prompts = [prompt] if isinstance(prompt, str) else list(prompt or [])
        per = int(kwargs.get("num_images_per_prompt", 1) or 1)
        if style_image is None:
            if len(prompts) * per < 2:
                raise ValueError("AlignedGen needs a batch of at least 2 images (the first is the style reference): "
                                 "pass 2+ prompts, num_images_per_prompt >= 2, or a style_image")
            with self.enabled():
                return self.pipe(prompt=prompts, **kwargs)
        if not prompts:
            raise ValueError("AlignedGen with a style_image needs at least one prompt")
        if per != 1:
            raise ValueError("AlignedGen with a style_image supports num_images_per_prompt=1 only; repeat the prompts")
        if self.family not in STYLE_FAMILIES:
            raise ValueError(f"a style_image is supported on FLUX, SD1.5/SDXL, SD3 and PixArt pipelines, not {self.family}")
        if inversion not in ("none", "ddim"):
            raise ValueError(f"inversion must be 'none' or 'ddim', got {inversion!r}")
        if inversion == "ddim" and self.family != "unet":
            raise ValueError(f"inversion='ddim' is supported on SD1.5/SDXL (UNet) pipelines, not {self.family}")
        if "latents" in kwargs:
            raise ValueError("AlignedGen with a style_image builds the reference row itself; do not pass latents")
        out = self._with_style(prompts, style_image, style_prompt, style_seed, kwargs, inversion)
        return out if return_reference else _drop_first(out)

    # --- style image ----------------------------------------------------------------------------------
    def _size(self, kwargs):
        pipe = self.pipe
        h, w = kwargs.get("height"), kwargs.get("width")
        if h is None or w is None:  # the stock pipelines' own defaults
            size = getattr(pipe, "default_sample_size", None)
            if size is None:
                size = getattr(getattr(pipe, self.names[0]).config, "sample_size", 64)
            d = int(size) * int(pipe.vae_scale_factor)
            h, w = h or d, w or d
        return int(h), int(w)

    def encode_style(self, image, height: int, width: int) -> torch.Tensor:
        """The style image's latent (the model's latent space, unpacked [1, C, h, w])."""
        vae = self.pipe.vae
        x = style_tensor(image, height, width).to(device=vae.device, dtype=vae.dtype)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mode()
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (z - shift) * vae.config.scaling_factor

    def _with_style(self, prompts, style_image, style_prompt, style_seed, kwargs, inversion="none"):
        pipe = self.pipe
        height, width = self._size(kwargs)
        f = int(pipe.vae_scale_factor) * (2 if self.family == "flux" else 1)
        if height % f or width % f:
            raise ValueError(f"height and width must be multiples of {f} for this pipeline; got {height}x{width}")
        z = self.encode_style(style_image, height, width).float()
        gen = torch.Generator().manual_seed(int(style_seed))
        eps = torch.randn(z.shape, generator=gen)
        denoiser = getattr(pipe, self.names[0])
        if self.family == "flux":
            c, h, w = z.shape[1:]
            z = pipe._pack_latents(z, 1, c, h, w)
            eps = pipe._pack_latents(eps, 1, c, h, w)
        z, eps = z[0], eps[0]

        self.last_trajectory = None
        if inversion == "ddim":
            steps = int(kwargs.get("num_inference_steps", 50))
            self.last_trajectory = self.invert(z[None], style_prompt, steps, height, width)
        trajectory = self.last_trajectory

        def noised(t, like: torch.Tensor) -> torch.Tensor:
            if trajectory is not None:
                if torch.is_tensor(t):
                    raise RuntimeError("AlignedGen's DDIM-inverted style trajectory is looked up by the timestep's "
                                       "value, which a compiled graph cannot read; use inversion='none' or run eager")
                hit = min(trajectory, key=lambda k: abs(k - t))
                if abs(hit - t) <= 1e-3 * max(1.0, abs(t)):
                    return trajectory[hit][0]
            if self.family in ("flux", "sd3"):
                sigma = t if self.family == "flux" else t / 1000.0
                return (1.0 - sigma) * z + sigma * eps
            a = self._alpha(t)
            return a ** 0.5 * z + (1.0 - a) ** 0.5 * eps

        kwargs = {k: v for k, v in kwargs.items() if k not in ("height", "width")}
        rows = 1 + len(prompts)
        hook = LockStepReference(denoiser, rows, noised)
        self.lockstep = hook
        try:
            with self.enabled():
                return pipe(prompt=[style_prompt] + prompts, height=height, width=width, **kwargs)
        finally:
            hook.remove()


    def _alpha(self, t):
        ac = self.pipe.scheduler.alphas_cumprod.float()
        if torch.is_tensor(t):  # torch.compile: the same interpolation in tensor ops
            ac = ac.to(t.device)
            lo = t.floor().clamp(0, len(ac) - 1).long()
            hi = (lo + 1).clamp(max=len(ac) - 1)
            a_lo, a_hi = ac.index_select(0, lo.reshape(1)).reshape(()), ac.index_select(0, hi.reshape(1)).reshape(())
            return a_lo + (a_hi - a_lo) * (t - lo)
        lo = int(np.clip(np.floor(t), 0, len(ac) - 1))
        hi = min(lo + 1, len(ac) - 1)
        return float(ac[lo] + (ac[hi] - ac[lo]) * (t - lo))

    @torch.no_grad()
    def invert(self, z0: torch.Tensor, prompt: str, steps: int, height: int, width: int) -> dict:
        """DDIM inversion of the clean latent `z0` ([1, C, h, w]) with `prompt` (no CFG) along the timesteps the
        pipeline's scheduler uses for `steps` steps: {timestep: z_t} (z_t in the UNet's input space,
        √ᾱ_t·x0 + √(1−ᾱ_t)·ε). ε is evaluated at the destination timestep with the current latent (MasaCtrl's
        `next_step`, as the Attentive Eraser DIP and StyleAligned's inversion do). The UNet's other inputs (text
        embedding, SDXL added conditions) are captured from the stock pipeline's first forward for `prompt`."""
        pipe, unet = self.pipe, self.pipe.unet
        sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
        sched.set_timesteps(steps)
        timesteps = [float(t) for t in sched.timesteps]
        extra = unet_conditioning(unet, lambda: pipe(prompt=prompt, guidance_scale=1.0, num_inference_steps=steps,
                                                     height=height, width=width, output_type="latent"))
        z = z0.to(device=unet.device, dtype=unet.dtype)
        a_prev, out = 1.0, {}
        for t in sorted(timesteps):
            a_next = self._alpha(t)
            eps = unet(z, torch.tensor(t, device=z.device), **extra, return_dict=False)[0]
            x0 = (z - (1 - a_prev) ** 0.5 * eps) / a_prev ** 0.5
            z = a_next ** 0.5 * x0 + (1 - a_next) ** 0.5 * eps
            out[t] = z.float().cpu()
            a_prev = a_next
        return out


def _drop_first(out):
    """The pipeline output without its first image (the reference)."""
    for name in ("images", "frames"):
        value = getattr(out, name, None)
        if value is not None:
            setattr(out, name, value[1:])
            return out
    if isinstance(out, tuple):
        return (out[0][1:],) + tuple(out[1:])
    return out


def alignedgen(pipe, **options) -> AlignedGenPipeline:
    """Shorthand for `AlignedGenPipeline.from_pipe(pipe, **options)`."""
    return AlignedGenPipeline(pipe, **options)
