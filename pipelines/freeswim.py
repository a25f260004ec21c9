"""FreeSwim for diffusers: the two-stage driver and the patch on its own.

    from attnlab.pipelines.freeswim import FreeSwimPipeline, freeswim

    swim = FreeSwimPipeline.from_pipe(wan_t2v_pipe)                # or a FluxPipeline
    video = swim("a corgi surfing", height=1088, width=1920, num_frames=81).frames

    # stage 1: the stock pipeline at its native size (Wan 480×832, FLUX 1024²);
    # upsample (bilinear) to the target; stage 2: video-to-video / img2img from the same components with
    # strength 0.7, a shifted schedule (Wan: flow_shift 9) and the FreeSwim patch installed.

    with freeswim(v2v_pipe, cache_steps=2):                        # the patch alone, on any stock pipeline
        video = v2v_pipe(video=frames, prompt=..., strength=0.7).frames

The patch = `FreeSwimLogitScale` + `FreeSwim` effects through the diffusers host, plus the dual-pass hook
(`processors/host_diffusers/dual_pass.py`) on each denoiser; all removed on exit.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch.nn.functional as F

from ..processors.freeswim import FreeSwim, check_target_size, freeswim_effects
from ..processors.host_diffusers.dual_pass import dual_pass
from ..processors.host_diffusers.model_info import family_of, geometry_of
from ..processors.host_diffusers.session import denoiser_names
from ..processors.params import InvalidParameter, number, pixel_size
from .inputs import check_call_args
from .wrapper import PipelineWrapper, refuse_nesting

#: stage-2 pipelines built from the stage-1 pipeline's components
STAGE2 = {"WanPipeline": "WanVideoToVideoPipeline", "FluxPipeline": "FluxImg2ImgPipeline",
          "StableDiffusion3Pipeline": "StableDiffusion3Img2ImgPipeline",
          "StableDiffusionPipeline": "StableDiffusionImg2ImgPipeline",
          "StableDiffusionXLPipeline": "StableDiffusionXLImg2ImgPipeline"}
DEFAULT_SHIFT = {"wan": 9.0, "flux": None, "sd3": None, "unet": None}
MAX_FLOW_SHIFT = 100.0


@contextlib.contextmanager
def freeswim(pipe, logit_scale: float = 1.0, **options):
    """Install FreeSwim on a stock pipeline (or denoiser) for the block; yields the `FreeSwim` effect.
    Options: see `attnlab.processors.freeswim.FreeSwim` (window_scale, base_size, cache_steps, override_uncond,
    backend, tile, flex_tile, mmdit_override, cache_device); session options vae_scale / native_size / strict."""
    session_keys = ("vae_scale", "native_size", "strict")
    session_options = {k: options.pop(k) for k in session_keys if k in options}
    effects = freeswim_effects(logit_scale=logit_scale, **options)
    with dual_pass(pipe, effects, **session_options) as (session, hooks):
        swim = next(e for e in effects if isinstance(e, FreeSwim))
        swim.hooks = hooks
        yield swim


def shifted_scheduler(scheduler, shift: Optional[float]):
    """A copy of `scheduler` with a fixed flow shift (`flow_shift` for UniPC/DPM flow schedulers, `shift` and no
    dynamic shifting for FlowMatchEuler); the scheduler itself when `shift` is None."""
    if shift is None:
        return scheduler
    config = dict(scheduler.config)
    if "flow_shift" in config:
        return type(scheduler).from_config(config, flow_shift=float(shift))
    if "shift" in config:
        return type(scheduler).from_config(config, shift=float(shift), use_dynamic_shifting=False)
    raise InvalidParameter(f"flow_shift={shift:g} needs a flow-matching scheduler; {type(scheduler).__name__} has no "
                           "flow shift: pass flow_shift=None")


class FreeSwimPipeline(PipelineWrapper):
    """Two-stage FreeSwim on a stock Wan text-to-video or FLUX / SD3 / SD1.5 / SDXL text-to-image pipeline.

    base_size: (height, width) of stage 1 in pixels; default the model's native size (Wan 480×832, FLUX/SD3/SDXL
    1024², SD1.5 512²).
    strength: stage-2 denoising strength (0.7). flow_shift: stage-2 schedule shift (Wan 9.0; FLUX None = the
    pipeline's own resolution-dependent shift). Everything else: FreeSwim options (window_scale, cache_steps,
    override_uncond, logit_scale, backend, mmdit_override, ...).
    `last_base` holds the stage-1 output (upsampled) of the last call.
    """

    def __init__(self, pipe, base_size=None, strength: float = 0.7, flow_shift=..., **options):
        refuse_nesting(self, pipe)
        names = denoiser_names(pipe)
        if not names:
            raise ValueError(f"{type(pipe).__name__} has no transformer; pass a Wan or FLUX pipeline")
        self.pipe = pipe
        self.family = family_of(getattr(pipe, names[0]))
        if type(pipe).__name__ not in STAGE2:
            raise ValueError(f"FreeSwimPipeline drives {sorted(STAGE2)} (text-to-video / text-to-image); got "
                             f"{type(pipe).__name__}. For other pipelines use `freeswim(pipe)` around your own stage 2")
        self.strength = number("strength", strength, 0.0, 1.0, low_open=True)
        self.flow_shift = DEFAULT_SHIFT[self.family] if flow_shift is ... else (
            None if flow_shift is None else number("flow_shift", flow_shift, 0.0, MAX_FLOW_SHIFT, low_open=True))
        shifted_scheduler(pipe.scheduler, self.flow_shift)  # a scheduler without a shift fails here, not in stage 2
        geometry = geometry_of(getattr(pipe, names[0]), pipe)
        self.multiple = geometry.token_scale[1]
        native = geometry.native_size[1:]
        self.base_size = native if base_size is None else pixel_size("base_size", base_size, dims=(2,))
        check_target_size(*self.base_size, self.multiple, "base_size")
        self.options = dict(options)
        self.options.setdefault("base_size", self.base_size)
        freeswim_effects(**self.options)  # validate now
        self.hooks: list = []
        self.last_base = None
        self._stage2 = None

    def __repr__(self) -> str:
        return f"FreeSwimPipeline({type(self.pipe).__name__}, base_size={self.base_size}, strength={self.strength})"

    @property
    def stage2(self):
        """The stage-2 pipeline (V2V / img2img), sharing the stage-1 pipeline's components."""
        if self._stage2 is None:
            import diffusers

            cls = getattr(diffusers, STAGE2[type(self.pipe).__name__])
            names = set(cls.__init__.__code__.co_varnames[1:cls.__init__.__code__.co_argcount])
            comps = {k: v for k, v in self.pipe.components.items() if k in names}
            comps["scheduler"] = shifted_scheduler(self.pipe.scheduler, self.flow_shift)
            self._stage2 = cls(**comps)
            self._stage2.set_progress_bar_config(disable=True)
        return self._stage2

    def __call__(self, prompt=None, height: Optional[int] = None, width: Optional[int] = None, *,
                 num_inference_steps: int = 50, base_steps: Optional[int] = None, generator=None,
                 output_type: str = "pil", **kwargs):
        if height is None or width is None:
            raise ValueError("FreeSwimPipeline needs the target height and width")
        check_call_args(dict(prompt=prompt, height=height, width=width, num_inference_steps=num_inference_steps,
                             base_steps=base_steps, **kwargs))
        check_target_size(height, width, self.multiple)
        bh, bw = self.base_size
        if self.family == "wan" and kwargs.get("prompt_embeds") is None:
            # encode once with the stage-1 pipeline (both stages then see the same embeddings)
            cfg = float(kwargs.get("guidance_scale", 5.0)) > 1.0
            pe, ne = self.pipe.encode_prompt(prompt=prompt, negative_prompt=kwargs.pop("negative_prompt", None),
                                             do_classifier_free_guidance=cfg,
                                             max_sequence_length=kwargs.get("max_sequence_length", 512),
                                             device=self.pipe._execution_device)
            kwargs.update(prompt_embeds=pe, negative_prompt_embeds=ne)
            prompt = None
        base = self.pipe(prompt=prompt, height=bh, width=bw, num_inference_steps=base_steps or num_inference_steps,
                         generator=generator, output_type="pt", **kwargs)
        if self.family == "wan":
            frames = base.frames if not isinstance(base, tuple) else base[0]  # [B, F, C, H, W] in [0, 1]
            b, f = frames.shape[:2]
            up = F.interpolate(frames.flatten(0, 1).float(), size=(height, width), mode="bilinear", align_corners=False)
            up = up.clamp(0, 1).unflatten(0, (b, f))
            stage_kwargs = dict(video=up)
        else:
            images = base.images if not isinstance(base, tuple) else base[0]  # [B, C, H, W] in [0, 1]
            up = F.interpolate(images.float(), size=(height, width), mode="bilinear", align_corners=False).clamp(0, 1)
            stage_kwargs = dict(image=up)
        self.last_base = up
        stage_kwargs.update({k: v for k, v in kwargs.items() if k != "num_frames"})
        with freeswim(self.stage2, **self.options) as swim:
            self.hooks = swim.hooks
            return self.stage2(prompt=prompt, height=height, width=width, num_inference_steps=num_inference_steps,
                               strength=self.strength, generator=generator, output_type=output_type, **stage_kwargs)

    @property
    def extra_passes(self) -> int:
        """Full-branch rows appended by the last call's stage 2 (one per overridden row per fresh step)."""
        return sum(h.full_rows for h in self.hooks)
