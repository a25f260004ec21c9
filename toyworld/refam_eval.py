"""RefAM on the toy world's referring expressions: mIoU and oIoU against the renderer's ground-truth masks, and
pointing accuracy (the heatmap's peak on the target; chance = the target's share of the image),
with the ablations of specs/refam.md §A.6 (stop-word filtering, magnets, GAS handling, layer sets).

    from attnlab.toyworld.refam_eval import evaluate
    rows = evaluate(RefAMPipeline.from_pipe(pipe), scenes=50)

Numbers are only meaningful for a model that has learned the toy world (issue 8's trained models); on a
random-weight model they measure the plumbing, not the method."""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch

from ..processors.refam_heatmap import iou
from .scenes import ground_truth, referring_expressions, render, sample_scene


def ablations(n_layers: int) -> dict[str, dict]:
    """Named option sets: the default and one change each."""
    half = n_layers // 2
    return {
        "default": {},
        "no stop-word filtering": {"filter_stopwords": False},
        "no magnets": {"magnets": ()},
        "no GAS handling": {"gas_mass": 1.0},
        "GAS suppress": {"gas_mode": "suppress"},
        "all layers": {"layers": list(range(n_layers))},
        "first half of the layers": {"layers": list(range(half))},
        "second half of the layers": {"layers": list(range(half, n_layers))},
    }


def pointing_hit(heatmap: torch.Tensor, mask: torch.Tensor) -> bool:
    """Whether the heatmap's peak lies on the target (pointing accuracy: no threshold, no mask step)."""
    heat = torch.as_tensor(heatmap, dtype=torch.float32)
    if heat.shape != mask.shape:
        heat = torch.nn.functional.interpolate(heat[None, None], size=tuple(mask.shape), mode="bilinear")[0, 0]
    return bool(mask.flatten()[heat.flatten().argmax()])


def evaluate(seg, scenes: int = 50, size: int = 64, seed: int = 1000, variants: Optional[dict] = None,
             progress: Optional[Callable[[int, int], None]] = None, **call_options) -> list[dict]:
    """mIoU / oIoU of `seg` (a RefAMPipeline) per option variant over the expressions of `scenes` held-out
    scenes (seeds seed, seed+1, …), each expression segmenting its target object."""
    if variants is None:
        from ..processors.host_diffusers.model_info import attention_sites

        layers = sorted({s.site.layer for s in attention_sites(seg.denoiser) if s.site.kind in ("joint", "single", "cross")})
        variants = ablations(len(layers))
    items = []
    for i in range(scenes):
        scene = sample_scene(seed + i)
        truth = ground_truth(scene, size)
        img = render(scene, size)
        for expr in referring_expressions(scene):
            items.append((img, expr["text"], torch.from_numpy(truth[expr["target"]]["mask"])))
    rows = []
    total = len(items) * len(variants)
    done = 0
    for name, options in variants.items():
        inter = union = 0
        ious, hits = [], []
        for img, text, mask in items:
            out = seg(img, text, **options, **call_options)
            i, u = iou(out.mask, mask)
            inter, union = inter + i, union + u
            ious.append(i / u if u else 1.0)
            hits.append(pointing_hit(out.heatmap, mask))
            done += 1
            if progress is not None:
                progress(done, total)
        rows.append({"variant": name, "expressions": len(items), "mIoU": round(float(np.mean(ious)), 4),
                     "oIoU": round(inter / union if union else 1.0, 4), "pointing": round(float(np.mean(hits)), 4),
                     "pointing_chance": round(float(np.mean([m.float().mean().item() for _, _, m in items])), 4)})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| variant | expressions | mIoU | oIoU | pointing (chance) |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['variant']} | {r['expressions']} | {r['mIoU']:.3f} | {r['oIoU']:.3f} | {r['pointing']:.3f} "
              f"({r['pointing_chance']:.3f}) |" for r in rows]
    return "\n".join(lines)
