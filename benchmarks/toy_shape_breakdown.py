"""Where a toy SD model's single-object misses are: hit rate by shape and by size on VALIDATION prompts
(seeds 500 000…, never the evaluation's), beside the VAE round trip of the clean render (the decoder's ceiling),
and what the parser read for each missed square (its box fill: a square needs > 0.9, a circle is 0.785).

    HF_HUB_OFFLINE=1 python benchmarks/toy_shape_breakdown.py [MODEL_DIR|sd] [N]
"""
import sys
from collections import Counter, defaultdict

import torch

from attnlab.toyworld.evaluate import prompts, vae_roundtrip
from attnlab.toyworld.models import load_toy_pipeline, toy_call_kwargs
from attnlab.toyworld.parser import adherence, parse
from attnlab.toyworld.scenes import caption, render

VALIDATION_SEEDS = 500_000


def main(path: str | None = None, n: int = 300) -> None:
    torch.set_num_threads(2)
    pipe = load_toy_pipeline("sd", path=path)
    pipe.set_progress_bar_config(disable=True)
    kw = toy_call_kwargs("sd")
    scenes = prompts(n, 1, VALIDATION_SEEDS)
    hits, ceiling, squares_read = defaultdict(list), defaultdict(list), Counter()
    for b in range(0, n, 50):
        chunk = scenes[b:b + 50]
        gens = [torch.Generator().manual_seed(VALIDATION_SEEDS + b + i) for i in range(len(chunk))]
        images = pipe([caption(s) for s in chunk], generator=gens, output_type="pil", **kw).images
        trips = vae_roundtrip(pipe.vae, [render(s, kw["height"]) for s in chunk])
        for scene, image, trip in zip(chunk, images, trips):
            want, parsed = scene.objects[0], parse(image)
            ok = adherence(parsed, scene)["objects"][0]
            ok_through_vae = adherence(parse(trip), scene)["objects"][0]
            for key in (("shape", want.shape), ("size", want.size)):
                hits[key].append(ok)
                ceiling[key].append(ok_through_vae)
            if want.shape == "square" and not ok:
                same = [o for o in parsed.objects if o.colour == want.colour]
                o = max(same, key=lambda o: o.area) if same else None
                squares_read[f"{o.shape}, fill {o.fill:.2f}" if o else "no object of its colour"] += 1
    print(f"{'':16s}{'n':>5s}{'generated':>11s}{'VAE':>7s}")
    for key in sorted(hits):
        g, c = hits[key], ceiling[key]
        print(f"{key[0]:6s}{key[1]:10s}{len(g):5d}{sum(g) / len(g):11.2f}{sum(c) / len(c):7.2f}")
    print("missed squares read as:", dict(sorted(squares_read.items())))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] != "sd" else None,
         int(sys.argv[2]) if len(sys.argv) > 2 else 300)
