"""Choose the demo's default inputs by measurement: run each tab's own function (demo/runs.py) on candidate inputs
and score its off/on pair with the toy-world parser, so a first-time user's first click shows the method's effect.

    HF_HUB_OFFLINE=1 python benchmarks/demo_defaults.py [--model toy-sd] [--n 8] [--tabs softpag,eraser,...]

Candidates are captions / scenes of VALIDATION seeds (500 000…), never the evaluation's or the bench's. A demo
default is one example picked from these; what a method does on average is `attnlab bench` (docs/toyworld.md).
Writes benchmarks/results/demo_defaults.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np

from attnlab.demo import runs
from attnlab.toyworld.bench import object_leakage
from attnlab.toyworld.parser import adherence, parse
from attnlab.toyworld.scenes import (caption, ground_truth, referring_expressions, render,
                                     sample_scene, without_background)

SEED_BASE = 500_000
OUT = Path(__file__).resolve().parent / "results" / "demo_defaults.json"


def _adh(img, scene) -> float:
    return adherence(parse(img), scene)["object_rate"]


def _one_object_tab(run, seed_offset):
    """A tab that turns a one-object caption into an off/on pair: object adherence of each."""
    def tab(store, model, n):
        rows = []
        for k in range(n):
            scene = sample_scene(SEED_BASE + seed_offset + k, n_objects=1)
            off, on, _ = run(store, model, caption(scene))
            rows.append({"prompt": caption(scene), "off": _adh(off, scene), "on": _adh(on, scene)})
        return rows
    return tab


softpag = _one_object_tab(lambda store, model, prompt: runs.run_softpag(store, model, prompt, "", 3.0, 1.0, 20, 0), 0)
entropy = _one_object_tab(lambda store, model, prompt: runs.run_entropy(store, model, prompt, 2.0, 20, 0), 100)


def freeswim(store, model, n):
    rows = []
    for k in range(n):
        scene = sample_scene(SEED_BASE + 200 + k, n_objects=2)
        direct, swum, _ = runs.run_freeswim(store, model, caption(scene), 2.0, 20, 0)
        row = {"prompt": caption(scene)}
        for name, img in (("off", direct), ("on", swum)):
            parsed = parse(img)
            row[f"{name}_duplicates"] = max(0, len(parsed.objects) - len(scene.objects))
            row[name] = adherence(parsed, scene)["object_rate"]
        rows.append(row)
    return rows


def alignedgen(store, model, n):
    """As the bench: captions without their background clause, agreement with the reference image's parse."""
    rows = []
    for k in range(n):
        scenes = [sample_scene(SEED_BASE + 300 + 3 * k + j, n_objects=1) for j in range(3)]
        prompts = [without_background(caption(sc)) for sc in scenes]
        plain, aligned, _ = runs.run_alignedgen(store, model, "\n".join(prompts), 20, 0)
        row = {"prompts": prompts}
        for name, items in (("off", plain), ("on", aligned)):
            parsed = [parse(img) for img, _ in items]
            ref = parsed[0].background
            row[name] = float(np.mean([p.background.style == ref.style and set(p.background.colours) == set(ref.colours)
                                       for p in parsed[1:]]))
            row[f"{name}_adherence"] = float(np.mean([adherence(p, sc)["object_rate"]
                                                      for p, sc in zip(parsed, scenes)]))
        rows.append(row)
    return rows


def eraser(store, model, n):
    rows = []
    for k in range(n):
        seed = SEED_BASE + 400 + k
        value = runs.eraser_scene(seed)
        scene = sample_scene(seed, n_objects=2)
        inp, before, after, _ = runs.run_eraser(store, model, value, 9.0, 20, 0)
        size = inp.size[0]
        truth = ground_truth(scene, size)[0]["mask"]
        clean = np.asarray(render(dataclasses.replace(scene, objects=scene.objects[1:]), size), np.float64)
        row = {"scene_seed": seed}
        for name, img in (("off", before), ("on", after)):
            img = img.convert("RGB").resize((size, size))
            row[f"{name}_leakage"] = object_leakage(img, truth, scene.objects[0].colour)
            px = np.asarray(img, np.float64)
            row[name] = float(np.abs(px[truth] - clean[truth]).mean())  # mean abs error in the mask (lower = better)
        rows.append(row)
    return rows


def refam(store, model, n):
    rows = []
    for k in range(n):
        seed = SEED_BASE + 500 + k
        img, expr = runs.toy_scene(seed)
        overlay, mask, heat, _ = runs.run_refam(store, model, img, expr, 0.5, "drop")
        scene = sample_scene(seed)
        target = ground_truth(scene, img.size[0])[referring_expressions(scene)[0]["target"]]["mask"]
        pred = np.asarray(mask.resize(img.size)) > 127
        rows.append({"scene_seed": seed, "expression": expr,
                     "on": float((pred & target).sum() / max(1, (pred | target).sum()))})
    return rows


TABS = {"softpag": softpag, "entropy": entropy, "freeswim": freeswim, "alignedgen": alignedgen, "eraser": eraser,
        "refam": refam}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="toy-sd")
    ap.add_argument("--n", type=int, default=8, help="candidates per tab")
    ap.add_argument("--tabs", default=",".join(TABS))
    a = ap.parse_args(argv)
    store = runs.ModelStore()
    res = json.loads(OUT.read_text()) if OUT.exists() else {}
    for tab in a.tabs.split(","):
        rows = TABS[tab](store, a.model, a.n)
        res[tab] = {"model": a.model, "rows": rows}
        for r in rows:
            print(tab, {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
        OUT.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
