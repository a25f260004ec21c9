"""Where do FreeSwim's duplicates on the toy SD model come from? An ablation on VALIDATION prompts (seeds 500 200…,
never the bench's 10 000… or the evaluation's 0-199), two-object captions at 2× the native side (4× the area).

    HF_HUB_OFFLINE=1 python benchmarks/freeswim_ablation.py [--model toy-sd] [--n 16] [--strengths 0.7,0.5,0.3]

Rows: direct sampling at the target size; stage 1 alone (native size, upsampled); stage 2 as plain img2img (no
FreeSwim attention) and with FreeSwim, at each stage-2 strength; at the first strength also FreeSwim's window branch
alone (no full-view cross-attention override) and a 1.5× window. Metrics as `attnlab bench`: duplicated objects
(parsed objects beyond the caption's) and object adherence.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from attnlab.loading import load_model
from attnlab.pipelines.freeswim import FreeSwimPipeline
from attnlab.toyworld.parser import adherence, parse
from attnlab.toyworld.scenes import caption, sample_scene

SEED_BASE = 500_200
OUT = Path(__file__).resolve().parent / "results" / "freeswim_ablation.json"


def _pil(x) -> Image.Image:
    if torch.is_tensor(x):
        return Image.fromarray((x.float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8))
    return x.convert("RGB")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="toy-sd")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--strengths", default="0.7,0.5,0.3")
    a = ap.parse_args(argv)
    model = load_model(a.model, "cpu")
    pipe, extras = model.pipe, model.call_kwargs
    h, w = (2 * s for s in model.size)
    strengths = [float(s) for s in a.strengths.split(",")]
    swims = {s: FreeSwimPipeline.from_pipe(pipe, strength=s) for s in strengths}
    # at the first strength: the window branch alone (the full-view cross-attention override never runs), and a
    # wider window
    variants = {"window only, no full-view override": dict(override_steps=(1.0, 1.0)),
                "window_scale 1.5": dict(window_scale=1.5)}
    variant_swims = {name: FreeSwimPipeline.from_pipe(pipe, strength=strengths[0], **kw) for name, kw in variants.items()}
    scores: dict[str, dict[str, list]] = {}

    def score(name, img, scene):
        parsed = parse(_pil(img))
        row = scores.setdefault(name, {"duplicates": [], "adherence": []})
        row["duplicates"].append(max(0, len(parsed.objects) - len(scene.objects)))
        row["adherence"].append(adherence(parsed, scene)["object_rate"])

    for i in range(a.n):
        scene = sample_scene(SEED_BASE + i, n_objects=2)
        kw = dict(prompt=caption(scene), num_inference_steps=a.steps, **extras)
        gen = lambda: torch.Generator().manual_seed(i)  # noqa: E731
        with torch.no_grad():
            score("direct", pipe(height=h, width=w, generator=gen(), **kw).images[0], scene)
            for s, swim in swims.items():
                score(f"FreeSwim s={s:g}", swim(height=h, width=w, generator=gen(), **kw).images[0], scene)
                if s == strengths[0]:
                    score("stage 1 alone (upsampled)", swim.last_base[0], scene)
                g = gen()  # stage 1 then stage 2 on one generator, as FreeSwimPipeline draws them
                base = pipe(height=model.size[0], width=model.size[1], generator=g, output_type="pt", **kw).images
                up = F.interpolate(base.float(), size=(h, w), mode="bilinear", align_corners=False).clamp(0, 1)
                plain = swim.stage2(image=up, height=h, width=w, strength=s, generator=g, **kw)
                score(f"plain img2img s={s:g}", plain.images[0], scene)
            for name, swim in variant_swims.items():
                score(f"FreeSwim s={strengths[0]:g}, {name}", swim(height=h, width=w, generator=gen(), **kw).images[0],
                      scene)
        print(f"{i + 1}/{a.n}", flush=True)
    table = {name: {k: round(float(np.mean(v)), 3) for k, v in row.items()} for name, row in scores.items()}
    for name, row in table.items():
        print(f"{name:56s} duplicates {row['duplicates']:.2f}  adherence {row['adherence']:.3f}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"model": a.model, "n": a.n, "steps": a.steps, "size": [w, h], "rows": table},
                              indent=1) + "\n")


if __name__ == "__main__":
    main()
