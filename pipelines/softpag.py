"""SoftPAG / HeadHunter perturbation guidance on any supported stock diffusers pipeline.

    from attnlab.pipelines.softpag import SoftPAGPipeline

    pag = SoftPAGPipeline.from_pipe(pipe, heads="L7:H3,H5; L9:*", scale=3.0, u=0.5)
    image = pag("a lighthouse at dusk", guidance_scale=4.0).images[0]     # same arguments as `pipe`

    pag = SoftPAGPipeline.from_pipe(pipe, preset="sd3-medium-layers-7-10")  # shipped / searched presets

One mechanism for SD1.5, SDXL, SD3, FLUX, PixArt and Wan: the SoftPAG effect is installed on the
self-/joint-attention layers of the head set (active on "perturbed" rows only), and a guidance hook on
the denoiser runs exactly one extra conditional forward per step with those rows, folding
``w(ε_c − ε_ptb)`` into the conditional prediction the pipeline then combines with its own CFG
(`processors/host_diffusers/guidance.py`). Nothing is forked; everything is removed after the call.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence


from ..processors.headsets import HeadSet
from ..processors.host_diffusers import Session
from ..processors.effects import Effect
from ..processors.params import InvalidParameter, boolean, effect_list, number
from .inputs import check_call_args
from .wrapper import PipelineWrapper, refuse_second_guidance
from ..processors.host_diffusers.guidance import GuidancePass, cfg_scales, guided
from ..processors.host_diffusers.model_info import attention_sites
from ..processors.presets import load_preset, preset_options
from ..processors.softpag import MAX_GUIDANCE_SCALE, GuidanceSchedule, SoftPAG

_AUTO = object()


class SoftPAGPipeline(PipelineWrapper):
    """A stock pipeline with SoftPAG guidance. Calls take exactly the wrapped pipeline's arguments;
    every other attribute is the wrapped pipeline's.

    heads: head set (text "L7:H3,H5; L9:*", UNet blocks "d2.1-3, m0, u0", {layer: heads}, pairs or HeadSet).
    scale: w, the perturbation guidance scale (0 = off, no extra pass). u: interpolation toward the target.
    preset: a shipped preset name or a preset JSON path; explicit arguments override its values.
    target, path, joint, dual_attention: see `attnlab.processors.softpag.SoftPAG`.
    start, end: fraction of the steps with guidance (inclusive; default all steps).
    sigma_min, sigma_max: optional sigma window. adaptive_scale: w_t = max(0, w − a·(1000 − t)).
    batched: run the perturbed rows inside the pipeline's own forward (one larger batch) instead of a
        separate forward (default; less memory, and what HeadHunter's code does).
    effects: further attnlab effects to install for the same run (e.g. EntropyScaling()).
    """

    def __init__(self, pipe, heads=None, scale: Optional[float] = None, u: Optional[float] = None, *,
                 preset=None, target: Optional[str] = None, path: str = "linear", joint: Optional[str] = None,
                 dual_attention: bool = False, start: float = 0.0, end: float = 1.0,
                 sigma_min: Optional[float] = None, sigma_max: Optional[float] = None, adaptive_scale: float = 0.0,
                 batched: bool = False, effects: Sequence = (), **session_options):
        self._wrap(pipe)
        if scale is not None:  # beyond ~100 the guidance term only saturates the image (or turns it into NaN)
            scale = number("scale", scale, 0.0, MAX_GUIDANCE_SCALE)
        self.extra_effects = effect_list("effects", effects, Effect)
        if any(isinstance(e, SoftPAG) for e in self.extra_effects):
            raise InvalidParameter("effects contains a SoftPAG effect: SoftPAGPipeline installs its own (from heads, "
                                   "u, ...); a second one would blend the same heads twice. Put every head in `heads`")
        options = {}
        if preset is not None:
            data = load_preset(preset)
            if data.get("family") not in (None, self.family):
                raise ValueError(f"preset {data['name']!r} is for {data['family']} models; this pipeline's denoiser is "
                                 f"{self.family}")
            options = preset_options(data)
        given = {"heads": heads, "u": u, "scale": scale, "target": target, "joint": joint}
        options.update({k: v for k, v in given.items() if v is not None})
        if "heads" not in options:
            raise ValueError("SoftPAG needs `heads` (e.g. 'L7:H3,H5; L9:*') or a `preset`")
        self.effect = SoftPAG(HeadSet.of(options["heads"]), u=options.get("u", 1.0),
                              target=options.get("target", "identity"), path=path,
                              joint=options.get("joint", "full"), dual_attention=dual_attention)
        self.schedule = GuidanceSchedule(float(options.get("scale", 3.0)), start, end, sigma_min, sigma_max,
                                         adaptive_scale)
        self.effect.validate()
        self.schedule.validate()
        self.batched = boolean("batched", batched)
        self.session_options = session_options
        self.hooks: list[GuidancePass] = []
        # validate heads/layers against the model now, before any call
        Session(pipe, [self.effect, *self.extra_effects], **session_options)

    def __repr__(self) -> str:
        return f"SoftPAGPipeline({type(self.pipe).__name__}, {self.effect!r}, {self.schedule!r})"

    # --- running ------------------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        check_call_args({**dict(zip(("prompt",), args)), **kwargs})
        scales = cfg_scales(self.pipe, self.family, args, kwargs)
        with self.enabled(cfg_scale=scales):
            return self.pipe(*args, **kwargs)

    @contextlib.contextmanager
    def enabled(self, cfg_scale=_AUTO):
        """Install SoftPAG and the guidance hook for the duration of the block, for code that calls the
        wrapped pipeline itself. `cfg_scale`: the CFG scale the pipeline applies (None: no CFG; a dict per
        denoiser attribute), by default read from the pipeline's `guidance_scale` / CFG flag as it runs
        (FLUX true CFG cannot be seen that way: pass it, or call this wrapper instead)."""
        if cfg_scale is _AUTO and self.family != "flux" and not hasattr(type(self.pipe), "guidance_scale"):
            raise ValueError(f"{type(self.pipe).__name__} does not expose its CFG scale while it runs; call the "
                             "SoftPAGPipeline itself, or pass enabled(cfg_scale=<the guidance_scale you use, or None>)")
        refuse_second_guidance(self.pipe, self.names, "SoftPAGPipeline")
        active = self.schedule.scale > 0.0 and any(
            self.effect.applies(spec.site) for name in self.names for spec in attention_sites(getattr(self.pipe, name)))
        with guided(self.pipe, [self.effect, *self.extra_effects], self.schedule.scale_at, "perturbed",
                    lambda name: self._cfg_reader(name, cfg_scale), active=active, batched=self.batched,
                    **self.session_options) as (session, hooks):
            self.hooks = hooks
            self._check_installed(session)
            yield session

    def _check_installed(self, session) -> None:
        """Refuse to run when a layer of the head set was left stock (a processor attnlab cannot host):
        SoftPAG would silently do nothing there."""
        skipped = dict(session.skipped)
        for name in self.names:
            for spec in attention_sites(getattr(self.pipe, name)):
                if spec.name in skipped and self.effect.applies(spec.site):
                    raise ValueError(f"SoftPAG layer {spec.site.layer} ({spec.name}) cannot be perturbed: "
                                     f"{skipped[spec.name]}")

    def _cfg_reader(self, name: str, cfg_scale):
        if isinstance(cfg_scale, dict):
            return lambda: cfg_scale.get(name)
        if cfg_scale is not _AUTO:
            return lambda: cfg_scale
        pipe = self.pipe

        def live() -> Optional[float]:
            if self.family == "flux":
                return None  # true CFG is only an argument of the call; the hook refuses an uncond pass
            g = float(pipe.guidance_scale)
            on = getattr(pipe, "do_classifier_free_guidance", g > 1.0)
            return g if on else None

        return live



def softpag(pipe, heads=None, scale: Optional[float] = None, u: Optional[float] = None, **options) -> SoftPAGPipeline:
    """Shorthand for `SoftPAGPipeline.from_pipe(pipe, heads=..., scale=..., u=..., **options)`."""
    return SoftPAGPipeline(pipe, heads=heads, scale=scale, u=u, **options)
