"""Guidance through one extra conditional model pass per step, as a ComfyUI post-CFG function.

Written once for every guidance-style method (SoftPAG now; Attentive Eraser's SARG, FreeSwim's dual
path later). ComfyUI calls post-CFG functions after CFG on every step, with the CFG result and the
conditional prediction (ComfyUI's core PAG and SLG nodes use the same point)::

    w   = schedule.scale_at(StepInfo(index, count, sigma, timestep), timestep on the 0-1000 scale)
    w == 0:  return denoised                                 (unchanged, bit for bit; no extra pass)
    extra   = calc_cond_batch(model, [cond], x, sigma, model_options with rows marked `role`)
    return    denoised + w·(cond_denoised − extra)           (`combine` may replace this)

The extra pass runs with a *copy* of the caller's ``model_options`` whose ``transformer_options``
carry ``ROLE_KEY = role`` (every row of that pass gets the role, e.g. "perturbed", which is what the
effects select on) and only the effects this guidance owns among the "pass-only" effects (so two
stacked SoftPAG nodes each perturb their own heads in their own pass). The APPLY_MODEL router leaves
pass-only effects out of ComfyUI's normal cond/uncond passes altogether, so those run the stock code.

ComfyUI is imported lazily (`comfy.samplers.calc_cond_batch`), only when a pass runs inside ComfyUI;
tests hand in another `calc_cond_batch`.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional, Sequence

import torch

from ..call import StepInfo
from .context import EFFECTS_KEY, ROLE_KEY, step_info

logger = logging.getLogger("attnlab")

#: transformer_options key: effects that act only inside their guidance's extra pass
PASS_EFFECTS_KEY = "attnlab_pass_effects"


def comfy_calc_cond_batch() -> Callable:
    """ComfyUI's ``comfy.samplers.calc_cond_batch`` (imported on first use)."""
    try:
        import comfy.samplers  # noqa: PLC0415 - only inside ComfyUI
    except ImportError as e:  # pragma: no cover - outside ComfyUI
        raise RuntimeError("attnlab guidance passes run inside ComfyUI (comfy.samplers is not importable)") from e
    return comfy.samplers.calc_cond_batch


def _first(value) -> Optional[float]:
    if value is None:
        return None
    if torch.is_tensor(value):
        return float(value.flatten()[0]) if value.numel() else None
    return float(value)


def timestep_1000(model_sampling, sigma) -> Optional[float]:
    """The model's timestep for `sigma` on the 0-1000 scale (diffusers' convention, which adaptive
    schedules use): ``model_sampling.timestep(sigma)``, times 1000 for models whose timesteps run 0-1
    (FLUX: ``ModelSamplingFlux.timestep(sigma) == sigma``; SD3/Wan flow models already multiply by 1000,
    EPS models give 0-999). None when the model cannot tell."""
    if model_sampling is None or not hasattr(model_sampling, "timestep") or sigma is None:
        return None
    try:
        s = sigma if torch.is_tensor(sigma) else torch.tensor([float(sigma)])
        t = _first(model_sampling.timestep(s.flatten()[:1].float()))
        top = getattr(model_sampling, "sigma_max", None)
        t_max = _first(model_sampling.timestep(torch.tensor([_first(top)]))) if top is not None else None
    except Exception:  # a model_sampling this host does not know: no timestep rather than no guidance
        return None
    if t is None:
        return None
    return t * 1000.0 if t_max is not None and t_max <= 1.0 + 1e-6 else t


def _without(effects: Sequence, drop: Sequence) -> list:
    return [e for e in effects if not any(e is d for d in drop)]


def normal_pass_effects(effects: Sequence, transformer_options: dict) -> Sequence:
    """The effects a model call runs: all of them in a guidance pass (its options carry ROLE_KEY), and
    without the pass-only effects in ComfyUI's own cond/uncond passes."""
    pass_only = transformer_options.get(PASS_EFFECTS_KEY)
    if not pass_only or transformer_options.get(ROLE_KEY):
        return effects
    return _without(effects, pass_only)


def options_for_pass(model_options: dict, role: str, own: Sequence = ()) -> dict:
    """A copy of `model_options` for one extra pass: rows marked `role`; of the pass-only effects only
    `own` stay. The caller's dicts and lists are never modified."""
    options = dict(model_options)
    to = dict(options.get("transformer_options") or {})
    to[ROLE_KEY] = role
    effects = to.get(EFFECTS_KEY)
    pass_only = to.get(PASS_EFFECTS_KEY)
    if effects and pass_only:
        others = [p for p in pass_only if not any(p is o for o in own)]
        to[EFFECTS_KEY] = _without(effects, others)
    options["transformer_options"] = to
    return options


def add_guidance(denoised: torch.Tensor, cond_denoised: torch.Tensor, extra: torch.Tensor, scale: float) -> torch.Tensor:
    """``denoised + w·(cond − extra)``: the CFG result (or the conditional prediction at cfg 1) plus the
    guidance term, as ComfyUI's PAG/SLG and HeadHunter compute it."""
    return denoised + scale * (cond_denoised - extra)


class ExtraPassGuidance:
    """A ComfyUI post-CFG function (``fn(args) -> denoised``) running one extra conditional pass per active step.

    schedule: has ``scale_at(StepInfo, timestep_1000) -> w`` (e.g. `processors.softpag.GuidanceSchedule`).
    effects:  the effects that act only in this pass (installed on the model by `patch_model`).
    role:     the role of every row of the extra pass ("perturbed" for SoftPAG).
    combine:  ``combine(args, extra, w) -> denoised``; default ``denoised + w·(cond_denoised − extra)``.
    calc_cond_batch: ComfyUI's ``comfy.samplers.calc_cond_batch`` unless given.
    `passes` counts the extra passes this object ran. ``ModelPatcher.clone`` deep-copies ``model_options``
    with one memo, so a clone's guidance holds the clone's copies of its effects (whatever effects do on
    deepcopy, `effects` and the model's effect lists stay the same objects).
    """

    def __init__(self, schedule, effects: Sequence = (), role: str = "perturbed",
                 combine: Optional[Callable] = None, calc_cond_batch: Optional[Callable] = None):
        self.schedule = schedule
        self.effects = tuple(effects)
        self.role = role
        self.combine = combine
        self.calc_cond_batch = calc_cond_batch
        self.passes = 0

    def __repr__(self) -> str:
        return f"ExtraPassGuidance({self.schedule!r}, role={self.role!r}, effects={list(self.effects)!r})"

    def step(self, args: dict) -> tuple[StepInfo, Optional[float]]:
        """(StepInfo, timestep on the 0-1000 scale) of the step a post-CFG call belongs to."""
        sigma = args.get("sigma")
        options = args.get("model_options") or {}
        schedule = (options.get("transformer_options") or {}).get("sample_sigmas")
        t = timestep_1000(getattr(args.get("model"), "model_sampling", None), sigma)
        return step_info(sigma, schedule, t), t

    def scale_for(self, args: dict) -> float:
        step, t = self.step(args)
        return float(self.schedule.scale_at(step, t))

    def __call__(self, args: dict) -> torch.Tensor:
        denoised = args["denoised"]
        cond = args.get("cond")
        if cond is None:
            return denoised
        w = self.scale_for(args)
        if w == 0.0:
            return denoised
        run = self.calc_cond_batch or comfy_calc_cond_batch()
        options = options_for_pass(args["model_options"], self.role, self.effects)
        (extra,) = run(args["model"], [cond], args["input"], args["sigma"], options)
        self.passes += 1
        if self.combine is not None:
            return self.combine(args, extra, w)
        return add_guidance(denoised, args["cond_denoised"], extra, w)


def install_guidance(patched, guidance: ExtraPassGuidance):
    """Add `guidance` as a post-CFG function to `patched` (a clone `patch_model` returned, holding the
    guidance's effects), and register its effects as pass-only. Returns `patched`.

    ``disable_cfg1_optimization`` stays False: at cfg 1 (FLUX, distilled models) ComfyUI skips the uncond
    pass but still calls post-CFG functions, with ``cond_denoised`` and ``denoised`` (== cond_denoised
    there, as uncond_pred is zeros: 0 + (c − 0)·1), which is all this guidance reads; it then gives
    ε_c + w(ε_c − ε_ptb), the no-CFG formula. Setting it would make ComfyUI run an uncond pass whose
    result cancels out of CFG at scale 1 (u + (c − u)·1): a wasted model call every step. (ComfyUI's own PAG
    node leaves it False too; SAG sets it because it reads the uncond pass.)
    """
    to = patched.model_options.setdefault("transformer_options", {})
    present = to.get(EFFECTS_KEY) or []
    missing = [e for e in guidance.effects if not any(e is p for p in present)]
    if missing:
        raise ValueError(f"install_guidance: the model does not hold the guidance's effects {missing}; "
                         "patch them in with patch_model first")
    to[PASS_EFFECTS_KEY] = list(to.get(PASS_EFFECTS_KEY, [])) + list(guidance.effects)
    patched.set_model_sampler_post_cfg_function(guidance, disable_cfg1_optimization=False)
    return patched
