"""ComfyUI node "SoftPAG": perturbation guidance on selected attention heads (HeadHunter, arXiv 2506.10978)."""

from __future__ import annotations

import logging

from ..processors.headsets import HeadSet
from ..processors.host_comfy import ExtraPassGuidance, UnsupportedComfyModel, check_patch, install_guidance, plan_for
from ..processors.presets import list_presets, load_preset
from ..processors.softpag import JOINT_MODES, PERTURBED, GuidanceSchedule, SoftPAG
from .host import patch
from .specs import CATEGORY, NodeSpec, Output, Param

logger = logging.getLogger("attnlab")

NO_PRESET = "none"
NODE_TARGETS = ("identity", "uniform", "mean_query")  # the map-free targets (no explicit attention maps)


def _bound(value: float):
    """ComfyUI-style sigma bound: negative = no bound."""
    return None if value < 0 else float(value)


def softpag_setup(model, scale: float, u: float, heads: str, preset: str, target: str, joint: str,
                  sigma_start: float, sigma_end: float, adaptive_scale: float):
    """(SoftPAG effect, GuidanceSchedule, active?) for the node's inputs, all checked against `model`
    before anything is patched. Raises ValueError naming the input and the accepted values."""
    text = heads.strip()
    source = ""
    if preset != NO_PRESET:
        data = load_preset(preset)
        family = data.get("family")
        model_family = plan_for(model.model).family
        if family and family != model_family:
            raise ValueError(f"SoftPAG preset {preset!r} is a head set for {family} models; this is a {model_family} "
                             "model (choose preset 'none' and enter heads, e.g. 'L7:H3,H5; L9:*')")
        if not text:
            text, source = data["heads"], f" (preset {preset!r})"
    try:
        head_set = HeadSet.parse(text)
    except ValueError as e:
        raise ValueError(f"SoftPAG heads {text!r}{source}: {e}") from None
    effect = SoftPAG(head_set, u=u, target=target, joint=joint)
    effect.validate()
    if sigma_start >= 0 and sigma_end >= 0 and sigma_end > sigma_start:
        raise ValueError(f"SoftPAG sigma window: sigma_end ({sigma_end}) must be <= sigma_start ({sigma_start}); "
                         "guidance runs while sigma_end <= sigma <= sigma_start (-1 = no bound)")
    schedule = GuidanceSchedule(scale=float(scale), sigma_min=_bound(sigma_end), sigma_max=_bound(sigma_start),
                                adaptive=float(adaptive_scale))
    schedule.validate()
    try:
        check_patch(model, [effect])
    except UnsupportedComfyModel:
        raise
    except ValueError as e:
        raise ValueError(f"SoftPAG heads {text!r}{source}: {e}") from None
    active = bool(head_set) and effect.u > 0.0 and schedule.scale > 0.0
    if not head_set and effect.u > 0.0 and schedule.scale > 0.0:
        logger.warning("attnlab: SoftPAG has no heads (empty heads and preset 'none'); the node changes nothing")
    return effect, schedule, active


def apply_softpag(model, scale: float, u: float, heads: str, preset: str, target: str, joint: str,
                  sigma_start: float, sigma_end: float, adaptive_scale: float):
    effect, schedule, active = softpag_setup(model, scale, u, heads, preset, target, joint, sigma_start, sigma_end,
                                             adaptive_scale)
    if not active:  # scale 0, u 0 or no heads: the stock model, and no extra pass
        return (model.clone(),)
    patched = patch(model, [effect])
    return (install_guidance(patched, ExtraPassGuidance(schedule, [effect], role=PERTURBED)),)


SOFTPAG = NodeSpec(
    node_id="AttnlabSoftPAG",
    display_name="SoftPAG (head-level perturbation guidance)",
    category=CATEGORY,
    description=(
        "Perturbation guidance on selected attention heads (HeadHunter / SoftPAG, arXiv 2506.10978). Each step runs "
        "one extra conditional pass in which the selected heads' attention is moved toward a target, "
        "A' = (1-u)·A + u·I for identity (u = 1 is PAG), and adds scale·(cond − perturbed) to the CFG result. "
        "Heads are global layer/head indices: 'L7:H3,H5; L9:*' (SD3 joint blocks; FLUX double blocks 0-18 then "
        "single blocks 19-56; Wan blocks) or UNet blocks 'd2.1-3, m0, u0' (SD1.5/SDXL self-attention). "
        "scale 0, u 0 or no heads leave the model unchanged. SD1.5/SD2/SDXL, SD3, FLUX, Wan."
    ),
    inputs=(
        Param("model", "MODEL", tooltip="the model to patch (a patched clone is returned; the input is untouched)"),
        Param("scale", "FLOAT", 3.0, 0.0, 100.0, 0.01,
              tooltip="w: guidance strength, added as w·(cond − perturbed) after CFG; 0 = off (no extra pass)"),
        Param("u", "FLOAT", 1.0, 0.0, 1.0, 0.01,
              tooltip="interpolation toward the target on the selected heads: 0 = off, 1 = the target itself (PAG)"),
        Param("heads", "STRING", "", multiline=True,
              tooltip="head set: 'L7:H3,H5; L9:*' (layer 7 heads 3 and 5, all heads of layer 9), 'L7-10' (all heads "
                      "of layers 7-10), UNet blocks 'd2.1-3, m0, u0' (SD1.5/SDXL, e.g. 'm0' = PAG's middle block). "
                      "Overrides the preset's heads when both are given"),
        Param("preset", "COMBO", NO_PRESET, options=(NO_PRESET, *list_presets()),
              tooltip="a shipped head set (used when heads is empty); scale, u, target and joint still come from "
                      "this node"),
        Param("target", "COMBO", "identity", options=NODE_TARGETS,
              tooltip="what the selected heads' attention moves toward: identity (SoftPAG/PAG), uniform (SoftUG), "
                      "mean_query (SoftSEG)"),
        Param("joint", "COMBO", "full", options=JOINT_MODES,
              tooltip="SD3/FLUX joint attention: full = the whole joint text+image map (HeadHunter); image = only the "
                      "image→image block (diffusers' SD3 PAG; identity target only)"),
        Param("sigma_start", "FLOAT", -1.0, -1.0, 10000.0, 0.01,
              tooltip="guidance only while sigma <= sigma_start (the high-noise end of the window); -1 = no bound"),
        Param("sigma_end", "FLOAT", -1.0, -1.0, 10000.0, 0.01,
              tooltip="guidance only while sigma >= sigma_end (the low-noise end of the window); -1 = no bound"),
        Param("adaptive_scale", "FLOAT", 0.0, 0.0, 1.0, 0.0001,
              tooltip="decay w over the run: w_t = max(0, w − adaptive_scale·(1000 − t)), t the timestep on the "
                      "0-1000 scale; 0 = constant w"),
    ),
    outputs=(Output("MODEL", "model"),),
    run=apply_softpag,
)
