"""Why are RefAM's masks weak on the toy SD model? Heatmap vs mask, options, and the expression's wording, on
VALIDATION scenes (seeds 500 600…; the bench uses 10 000…, the evaluation 0-199).

    HF_HUB_OFFLINE=1 python benchmarks/refam_probe.py [--model toy-sd] [--scenes 30]

Part 1 (every expression of every scene, `toyworld.refam_eval`): mIoU, oIoU and pointing (the heatmap's peak on
the target; chance = the target's share of the image) for the plain cross-attention map, RefAM's defaults, and
one option changed at a time. Part 2 (each scene's first expression): the same target named in other words —
does text the model saw in training (its captions say "a <size> <colour> <shape>") give better maps?
Writes benchmarks/results/refam_probe.json.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from attnlab.loading import load_model
from attnlab.pipelines.refam import RefAMPipeline
from attnlab.processors.refam_heatmap import iou
from attnlab.toyworld.refam_eval import evaluate, markdown, pointing_hit
from attnlab.toyworld.scenes import describe_object, ground_truth, referring_expressions, render, sample_scene

SEED_BASE = 500_600
OUT = Path(__file__).resolve().parent / "results" / "refam_probe.json"
VARIANTS = {
    "plain cross-attention (no stop-word filter, magnets or sink handling)":
        {"filter_stopwords": False, "magnets": (), "gas_mass": 1.0},
    "RefAM defaults (noise 0.5, blur 1 token, Otsu)": {},
    "noise 0.2": {"sigmas": (0.2,)},
    "no blur": {"blur": 0.0},
    "threshold mean + 1 std": {"threshold": "mean_std"},
}
WORDINGS = {
    "referring expression (default)": lambda obj, expr: expr["text"],
    "'a <colour> <shape>'": lambda obj, expr: f"a {obj.colour} {obj.shape}",
    "caption wording 'a <size> <colour> <shape>'": lambda obj, expr: describe_object(obj),
    "the colour word alone": lambda obj, expr: obj.colour,
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="toy-sd")
    ap.add_argument("--scenes", type=int, default=30)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    model = load_model(a.model, "cpu")
    seg = RefAMPipeline.from_pipe(model.pipe)
    extras = model.text_lengths()
    size = model.size[0]
    rows = evaluate(seg, scenes=a.scenes, size=size, seed=SEED_BASE, variants=VARIANTS, **extras)
    print(markdown(rows), flush=True)
    wording = []
    for name, words in WORDINGS.items():
        ious, hits = [], []
        for k in range(a.scenes):
            scene = sample_scene(SEED_BASE + k)
            expr = referring_expressions(scene)[0]
            truth = torch.from_numpy(ground_truth(scene, size)[expr["target"]]["mask"])
            out = seg(render(scene, size), words(scene.objects[expr["target"]], expr), **extras)
            i, u = iou(out.mask, truth)
            ious.append(i / u if u else 1.0)
            hits.append(pointing_hit(out.heatmap, truth))
        wording.append({"wording": name, "expressions": a.scenes, "mIoU": round(float(np.mean(ious)), 4),
                        "pointing": round(float(np.mean(hits)), 4)})
        print(wording[-1], flush=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"model": a.model, "scenes": a.scenes, "seed_base": SEED_BASE, "variants": rows,
                               "wordings": wording}, indent=1) + "\n")


if __name__ == "__main__":
    main()
