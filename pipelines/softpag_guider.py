"""SoftPAG as a diffusers Guider, for modular pipelines (SD3, SDXL, Wan, ... `*AutoBlocks`).

    from attnlab.pipelines.softpag_guider import SoftPAGGuider

    mp = StableDiffusion3AutoBlocks().init_pipeline(repo)
    mp.update_components(guider=SoftPAGGuider(guidance_scale=4.0, perturbed_guidance_scale=3.0,
                                              heads="L7:H3,H5; L9:*", u=0.5))
    image = mp(prompt=..., output="images")

It keeps `PerturbedAttentionGuidance`'s pass structure (cond, uncond, perturbed cond; passes run one
after another) but perturbs through attnlab's own processors and row roles instead of diffusers'
layer-skip hook (which fails on FLUX/SD3/Wan in 0.42.1 and silently does nothing on non-SDPA
backends), and differs from it on purpose where the stock guider departs from the paper:

- the window defaults to all steps (stock: 1 %–20 %) and is inclusive, so step 0 is perturbed;
- without CFG the perturbed pass uses the *conditional* inputs (stock: the negative ones, unperturbed)
  and the result is ε_c + w(ε_c − ε_ptb) (stock: ε_ptb + w(ε_c − ε_ptb)).
"""

from __future__ import annotations

import contextlib
from typing import Optional

from diffusers.configuration_utils import register_to_config
from diffusers.guiders.guider_utils import BaseGuidance, GuiderOutput, rescale_noise_cfg
from diffusers.guiders.perturbed_attention_guidance import PerturbedAttentionGuidance

from ..processors.call import StepInfo
from ..processors.headsets import HeadSet
from ..processors.host_diffusers import Session
from ..processors.softpag import GuidanceSchedule, SoftPAG

COND, UNCOND, PERTURBED = "pred_cond", "pred_uncond", "pred_cond_skip"


class SoftPAGGuider(PerturbedAttentionGuidance):
    """CFG + SoftPAG for modular pipelines. `heads`, `u`, `target`, `joint` as for `SoftPAG`;
    `perturbed_guidance_scale` is w; `perturbed_guidance_start/stop` the (inclusive) window as fractions
    of the steps; the CFG arguments are diffusers' (`guidance_scale` ≤ 1 disables CFG)."""

    @register_to_config
    def __init__(self, guidance_scale: float = 7.5, perturbed_guidance_scale: float = 3.0, heads: str = "",
                 u: float = 1.0, target: str = "identity", joint: str = "full",
                 perturbed_guidance_start: float = 0.0, perturbed_guidance_stop: float = 1.0,
                 guidance_rescale: float = 0.0, use_original_formulation: bool = False,
                 start: float = 0.0, stop: float = 1.0, enabled: bool = True):
        BaseGuidance.__init__(self, start, stop, enabled)
        self.guidance_scale = guidance_scale
        self.skip_layer_guidance_scale = perturbed_guidance_scale
        self.skip_layer_guidance_start = perturbed_guidance_start
        self.skip_layer_guidance_stop = perturbed_guidance_stop
        self.guidance_rescale = guidance_rescale
        self.use_original_formulation = use_original_formulation
        self.skip_layer_config = []
        self._skip_layer_hook_names = []
        self.effect = SoftPAG(HeadSet.of(heads), u=u, target=target, joint=joint)
        self.effect.validate()
        if not self.effect.heads:
            raise ValueError("SoftPAGGuider needs `heads` (e.g. 'L7:H3,H5; L9:*')")
        self.schedule = GuidanceSchedule(perturbed_guidance_scale, perturbed_guidance_start, perturbed_guidance_stop)
        self.schedule.validate()
        self._passes: list[str] = []
        self._active: Optional[contextlib.ExitStack] = None
        self.perturbed_passes = 0

    # --- which passes run ---------------------------------------------------------------------------
    def _is_slg_enabled(self) -> bool:
        if not self._enabled or self.effect.u == 0.0:
            return False
        return self.schedule.scale_at(StepInfo(self._step, self._num_inference_steps)) > 0.0

    def _plan(self) -> tuple[list[int], list[str]]:
        cfg, ptb = self._is_cfg_enabled(), self._is_slg_enabled()
        indices, names = [0], [COND]
        if cfg:
            indices.append(1)
            names.append(UNCOND)
        if ptb:
            indices.append(0)  # the perturbed pass always uses the conditional inputs
            names.append(PERTURBED)
        self._passes = names
        return indices, names

    def prepare_inputs(self, data):
        return [self._prepare_batch(data, i, name) for i, name in zip(*self._plan())]

    def prepare_inputs_from_block_state(self, data, input_fields):
        return [self._prepare_batch_from_block_state(input_fields, data, i, name) for i, name in zip(*self._plan())]

    @property
    def is_conditional(self) -> bool:
        i = self._count_prepared - 1
        return 0 <= i < len(self._passes) and self._passes[i] != UNCOND

    # --- perturbing the model for the perturbed pass ------------------------------------------------
    def prepare_models(self, denoiser) -> None:
        self._count_prepared += 1
        i = self._count_prepared - 1
        if i < len(self._passes) and self._passes[i] == PERTURBED:
            stack = contextlib.ExitStack()
            session = stack.enter_context(Session(denoiser, [self.effect]))
            stack.enter_context(session.roles_for("perturbed"))
            self._active = stack
            self.perturbed_passes += 1

    def cleanup_models(self, denoiser) -> None:
        if self._active is not None:
            active, self._active = self._active, None
            active.close()

    # --- combination --------------------------------------------------------------------------------
    def forward(self, pred_cond, pred_uncond=None, pred_cond_skip=None) -> GuiderOutput:
        w = self.skip_layer_guidance_scale if self._is_slg_enabled() else 0.0
        if self._is_cfg_enabled():
            if self.use_original_formulation:
                base = pred_cond + self.guidance_scale * (pred_cond - pred_uncond)
            else:
                base = pred_uncond + self.guidance_scale * (pred_cond - pred_uncond)
        else:
            base = pred_cond
        pred = base + w * (pred_cond - pred_cond_skip) if w else base
        if self.guidance_rescale > 0.0:
            pred = rescale_noise_cfg(pred, pred_cond, self.guidance_rescale)
        return GuiderOutput(pred=pred, pred_cond=pred_cond, pred_uncond=pred_uncond)
