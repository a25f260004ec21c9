"""Measure a toy model's prompt adherence with the scene parser on held-out prompts (issue 8 quality bar).

    python -m attnlab.toyworld.evaluate --model sd [--n 200] [--steps 25] [--guidance 4] [--json out.json]

Prompts are ``caption(sample_scene(seed, n_objects=k))`` for seeds ``--seed-base .. --seed-base + n - 1``
(default 0, below the training range ``TRAIN_SEED_BASE``; held out), k = 1 and k = 2. Each image is
generated with ``torch.Generator().manual_seed(seed)`` at the model's native size, parsed with
``toyworld.parser.parse`` and scored with ``adherence``:

* single-object colour+shape: share of 1-object prompts whose object (colour and shape) is found;
* two-object (both): share of 2-object prompts where both objects are found (one-to-one);
  also reported per object, and the caption relation (left of / above ...) between them;
* background style: share of all prompts (1- and 2-object) whose background style is read back.

The same metrics on clean renders of the same scenes (parser ceiling at that size) are printed alongside,
and ("strict") with the parser's soft-edge growth off, i.e. object pixels only within the colour tolerance;
"VAE" parses the clean renders after an encode/decode round trip through the model's VAE (the ceiling for any
denoiser behind that decoder).
Quality bar (issue 15): single >= 90 %, two-object >= 70 % with the relation right in >= 80 % of those hits,
background style >= 95 %; the least it may resolve with (SD): 80 % / 50 % / 90 %.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from .parser import adherence, parse
from .scenes import caption, render, sample_scene

# Issue 15's goal and the least it may resolve with (the SD model); relation: share of two-object hits whose
# caption relation (left of / above ...) holds.
BAR = {"single_colour_shape": 0.90, "two_object_both": 0.70, "two_object_relation_of_hits": 0.80, "background_style": 0.95}
FLOOR = {"single_colour_shape": 0.80, "two_object_both": 0.50, "background_style": 0.90}


def prompts(n: int, n_objects: int, seed_base: int = 0) -> list:
    return [sample_scene(seed_base + i, n_objects=n_objects) for i in range(n)]


def _summarise(records: list[dict]) -> dict:
    one = [r for r in records if r["n_objects"] == 1]
    two = [r for r in records if r["n_objects"] == 2]

    def mean(xs):
        xs = [x for x in xs if x is not None]
        return float(np.mean(xs)) if xs else float("nan")

    return {
        "single_colour_shape": mean([r["objects"][0] for r in one]),
        "single_colour_only": mean([r["colours"][0] for r in one]),
        "two_object_both": mean([r["all_objects"] for r in two]),
        "two_object_per_object": mean([o for r in two for o in r["objects"]]),
        "two_object_relation": mean([r["relation"] for r in two]),
        "two_object_relation_of_hits": mean([r["relation"] for r in two if r["all_objects"]]),
        "two_object_colours_both": mean([all(r["colours"]) for r in two]),
        "background_style": mean([r["background_style"] for r in records]),
        "background_colours": mean([r["background_colours"] for r in records]),
        "size_class_of_found": mean([s for r in records for s in r["sizes"]]),
        "count_match": mean([r["count_match"] for r in records]),
        "n_single": len(one), "n_two": len(two),
    }


def _score(parsed, scene) -> dict:
    return dict(adherence(parsed, scene), n_objects=len(scene.objects))


def vae_roundtrip(vae, images: list) -> list:
    """Clean renders (PIL) encoded (posterior mean) and decoded by the model's VAE: the best any denoiser
    could do through that decoder."""
    import torch
    from PIL import Image

    dtype = next(vae.parameters()).dtype
    x = torch.from_numpy(np.stack([np.asarray(im, np.float32) for im in images])).permute(0, 3, 1, 2) / 127.5 - 1
    with torch.no_grad():
        rec = vae.decode(vae.encode(x.to(vae.device, dtype)).latent_dist.mean).sample.float().cpu()
    arr = ((rec.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arr]


def vae_ceiling(vae, n: int = 200, seed_base: int = 0, size: int = 48) -> dict:
    """The decoder's ceiling: n one-object and n two-object held-out scenes rendered clean, passed through
    encode (posterior mean) / decode and parsed. ``objects_medium_large``: colour + shape of every medium or
    large object of both sets (the issue's >= 97 % bar); ``single_colour_shape``: all sizes, one-object set."""
    scenes = prompts(n, 1, seed_base) + prompts(n, 2, seed_base)
    records = []
    for b in range(0, len(scenes), 50):
        chunk = scenes[b:b + 50]
        for sc, rt in zip(chunk, vae_roundtrip(vae, [render(s, size) for s in chunk])):
            records.append((sc, _score(parse(rt), sc)))
    res = _summarise([r for _, r in records])
    big = [ok for sc, r in records for o, ok in zip(sc.objects, r["objects"]) if o.size != "small"]
    res["objects_medium_large"] = float(np.mean(big))
    res["n_medium_large"] = len(big)
    return res


def evaluate(pipe, *, name: str = "sd", n: int = 200, seed_base: int = 0, batch: int = 50, call_kwargs: dict,
             log=print, grid: str | Path | None = None) -> dict:
    import torch

    scenes = prompts(n, 1, seed_base) + prompts(n, 2, seed_base)
    seeds = list(range(seed_base, seed_base + n)) * 2
    side = int(call_kwargs.get("height", 48))
    records, strict, clean, roundtrip, images = [], [], [], [], []
    t0 = time.time()
    for b in range(0, len(scenes), batch):
        chunk, sd = scenes[b:b + batch], seeds[b:b + batch]
        kw = dict(call_kwargs)
        if "negative_prompt" in kw and isinstance(kw["negative_prompt"], str):
            kw["negative_prompt"] = [kw["negative_prompt"]] * len(chunk)
        out = pipe([caption(s) for s in chunk], generator=[torch.Generator().manual_seed(s) for s in sd],
                   output_type="pil", **kw).images
        for sc, im in zip(chunk, out):
            records.append(_score(parse(im), sc))
            strict.append(_score(parse(im, soft_edges=False), sc))
            if grid is not None and len(images) < 32 and (len(images) < 16 or len(sc.objects) == 2):
                images.append((im, sc))
        renders = [render(sc, side) for sc in chunk]
        for sc, im, rt in zip(chunk, renders, vae_roundtrip(pipe.vae, renders)):
            clean.append(_score(parse(im), sc))
            roundtrip.append(_score(parse(rt), sc))
        log(f"  {min(b + batch, len(scenes))}/{len(scenes)} images ({time.time() - t0:.0f}s)")
    res = {"model": name, "n_per_set": n, "seed_base": seed_base, "call_kwargs": {k: v for k, v in call_kwargs.items()},
           "generated": _summarise(records), "generated_strict_edges": _summarise(strict),
           "clean_renders": _summarise(clean), "vae_roundtrip": _summarise(roundtrip), "wall_s": round(time.time() - t0, 1)}
    res["passes_bar"] = {k: res["generated"][k] >= v for k, v in BAR.items()}
    res["passes_floor"] = {k: res["generated"][k] >= v for k, v in FLOOR.items()}
    if grid is not None:
        _save_grid(images, grid, side)
    return res


def _save_grid(items, path, side):
    from PIL import Image

    cols = 8
    rows = (len(items) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * side * 2, rows * side * 2), (255, 255, 255))
    for i, (im, _) in enumerate(items):
        sheet.paste(im.resize((side * 2, side * 2), Image.NEAREST), ((i % cols) * side * 2, (i // cols) * side * 2))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def format_table(res: dict) -> str:
    g, c = res["generated"], res["clean_renders"]
    st, rt = res.get("generated_strict_edges", g), res.get("vae_roundtrip", c)
    lines = [f"{'metric':28s} {'model':>8s} {'strict':>8s} {'VAE':>8s} {'clean':>8s} {'bar':>6s}"]
    for k in ("single_colour_shape", "single_colour_only", "two_object_both", "two_object_per_object",
              "two_object_colours_both", "two_object_relation", "two_object_relation_of_hits",
              "background_style", "background_colours", "size_class_of_found", "count_match"):
        bar = f"{BAR[k]:.0%}" if k in BAR else ""
        lines.append(f"{k:28s} {g[k]:8.1%} {st[k]:8.1%} {rt[k]:8.1%} {c[k]:8.1%} {bar:>6s}")
    lines.append(f"(n = {g['n_single']} one-object + {g['n_two']} two-object held-out prompts, seeds "
                 f"{res['seed_base']}..{res['seed_base'] + res['n_per_set'] - 1}; {res['wall_s']} s)")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="sd", help="toy model name (sd, flux) or a pipeline folder")
    p.add_argument("--arch", default=None, help="sd or flux when --model is a folder (default: from its files)")
    p.add_argument("--n", type=int, default=200, help="prompts per set (one-object and two-object)")
    p.add_argument("--seed-base", type=int, default=0)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (SD guidance_scale, FLUX true_cfg_scale)")
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--grid", default=None, help="save a PNG sheet of generated samples")
    a = p.parse_args(argv)

    import torch

    from .models import load_toy_pipeline, toy_call_kwargs
    if a.threads:
        torch.set_num_threads(a.threads)
    path = Path(a.model)
    if (path / "model_index.json").is_file():
        arch = a.arch or ("flux" if (path / "transformer").is_dir() else "sd")
        pipe = load_toy_pipeline(arch, device=a.device, path=path)
    else:
        arch, path = a.model, None
        pipe = load_toy_pipeline(arch, device=a.device)
    kw = toy_call_kwargs(arch)
    if path is not None:
        info = json.loads((Path(a.model) / "training.json").read_text()) if (Path(a.model) / "training.json").is_file() else {}
        kw["height"] = kw["width"] = int(info.get("size", kw["height"]))
    if a.steps is not None:
        kw["num_inference_steps"] = a.steps
    if a.guidance is not None:
        kw["true_cfg_scale" if arch == "flux" else "guidance_scale"] = a.guidance
    res = evaluate(pipe, name=str(a.model), n=a.n, seed_base=a.seed_base, batch=a.batch, call_kwargs=kw,
                   grid=a.grid)
    print(format_table(res))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
