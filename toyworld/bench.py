"""One command that measures every available method on the toy world, off vs on, with the scene parser:

    attnlab bench [--model toy-sd] [--n 20] [--steps 20] [--methods entropy,softpag,...]
    python -m attnlab.toyworld.bench ...

Prompts are captions of held-out scenes (seeds from 10 000 on); images are read back by `toyworld.parser`.
Metrics (off → on):
  entropy     object adherence (colour + shape present) and background style, at 0.5× and 2× the native size
  softpag     object adherence and sharpness (variance of the Laplacian) at the native size
  refam       mIoU / oIoU of the referring-expression masks, and pointing (the heatmap's peak on the target);
              off = the plain cross-attention map (no stop-word filtering, no magnets, no sink handling), on = RefAM
  eraser      object-colour leakage (share of mask pixels whose nearest palette colour, objects and backgrounds,
              is the removed object's colour) and PSNR inside
              the mask against the scene rendered without the object; off = plain inpainting (s = 0)
  alignedgen  background-style agreement with the batch's first image, and adherence; off = plain batch
  freeswim    duplicated objects (parsed objects beyond the caption's) at 4× the area; off = direct sampling
Methods whose modules are missing are skipped with a message. Numbers only mean something for a model that
learned the toy world (the trained toy models); on the random tiny models they exercise the plumbing.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
import time
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image

from .. import arguments as arg
from ..loading import LoadedModel, OnModel, load_model
from ..user_errors import run_reporting_user_errors
from .parser import adherence, parse
from .scenes import (BACKGROUND_COLOURS, OBJECT_COLOURS, caption, ground_truth, render, sample_scene,
                     without_background)

HELD_OUT = 10_000
METHODS = ("entropy", "softpag", "refam", "eraser", "alignedgen", "freeswim")
REQUIRES = {"entropy": "pipelines.entropy", "softpag": "pipelines.softpag", "refam": "pipelines.refam",
            "eraser": "pipelines.eraser", "alignedgen": "pipelines.alignedgen", "freeswim": "pipelines.freeswim"}


@dataclasses.dataclass
class Bench(OnModel):
    model: LoadedModel
    n: int
    steps: int
    seed: int
    progress: Optional[Callable[[str], None]] = None

    @property
    def call_extras(self) -> dict:
        return self.model.call_kwargs

    def scenes(self, n_objects=None):
        return [sample_scene(HELD_OUT + self.seed + i, n_objects=n_objects) for i in range(self.n)]

    def generate(self, prompt, height, width, seed, runner=None, **extra):
        runner = runner or self.pipe
        kw = dict(prompt=prompt, height=height, width=width, num_inference_steps=self.steps,
                  generator=torch.Generator().manual_seed(seed), **self.call_extras, **extra)
        if self.family == "wan":
            kw["num_frames"] = 1
        out = runner(**kw)
        imgs = getattr(out, "images", None)
        if imgs is None:
            imgs = out.frames[0]
        img = imgs[0]
        if torch.is_tensor(img):
            img = Image.fromarray((img.float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8))
        elif isinstance(img, np.ndarray):
            img = Image.fromarray((np.clip(img, 0, 1) * 255).round().astype(np.uint8) if img.dtype != np.uint8 else img)
        return img.convert("RGB")

    def say(self, text):
        if self.progress is not None:
            self.progress(text)


def _adherence(images, scenes) -> tuple[float, float]:
    objs, style = [], []
    for img, scene in zip(images, scenes):
        a = adherence(parse(img), scene)
        objs.append(a["object_rate"])
        style.append(a["background_style"])
    return float(np.mean(objs)), float(np.mean(style))


def _row(method, metric, off, on, n, **extra):
    return {"method": method, "metric": metric, "off": round(float(off), 4), "on": round(float(on), 4), "n": n,
            **extra}


# --- methods ---------------------------------------------------------------------------------------

def bench_entropy(b: Bench) -> list[dict]:
    from ..pipelines.entropy import entropy_scaling

    rows = []
    scenes = b.scenes()
    for factor in (0.5, 2.0):
        h, w = (max(16, round(s * factor / 16) * 16) for s in b.native)
        off, on = [], []
        for i, scene in enumerate(scenes):
            off.append(b.generate(caption(scene), h, w, i))
            with entropy_scaling(b.pipe):
                on.append(b.generate(caption(scene), h, w, i))
            b.say(f"entropy {factor}×: {i + 1}/{len(scenes)}")
        a_off, s_off = _adherence(off, scenes)
        a_on, s_on = _adherence(on, scenes)
        rows += [_row("entropy", f"object adherence at {factor:g}× ({w}×{h})", a_off, a_on, len(scenes)),
                 _row("entropy", f"background style at {factor:g}×", s_off, s_on, len(scenes))]
    return rows


def bench_softpag(b: Bench, options: Optional[dict] = None) -> list[dict]:
    """options: SoftPAGPipeline options over the bench's (the model's default heads, w = 3)."""
    from ..pipelines.headhunter import sharpness
    from ..pipelines.softpag import SoftPAGPipeline

    options = {"heads": b.model.default_heads, "scale": 3.0, **(options or {})}
    pag = SoftPAGPipeline.from_pipe(b.pipe, **options)
    scenes = b.scenes()
    off, on = [], []
    for i, scene in enumerate(scenes):
        off.append(b.generate(caption(scene), *b.native, i))
        on.append(b.generate(caption(scene), *b.native, i, runner=pag))
        b.say(f"softpag: {i + 1}/{len(scenes)}")
    a_off, _ = _adherence(off, scenes)
    a_on, _ = _adherence(on, scenes)
    return [_row("softpag", "object adherence", a_off, a_on, len(scenes), heads=str(pag.effect.resolved_heads)),
            _row("softpag", "sharpness", np.mean([sharpness(x) for x in off]), np.mean([sharpness(x) for x in on]),
                 len(scenes))]


def bench_refam(b: Bench) -> list[dict]:
    from ..pipelines.refam import RefAMPipeline
    from .refam_eval import evaluate

    if b.family == "wan":
        return []
    seg = RefAMPipeline.from_pipe(b.pipe)
    extras = b.model.text_lengths()
    variants = {"off": {"filter_stopwords": False, "magnets": (), "gas_mass": 1.0}, "on": {}}
    rows = {r["variant"]: r for r in evaluate(seg, scenes=b.n, size=b.native[0], seed=HELD_OUT + b.seed,
                                              variants=variants, **extras)}
    n = rows["on"]["expressions"]
    return [_row("refam", "mIoU", rows["off"]["mIoU"], rows["on"]["mIoU"], n),
            _row("refam", "oIoU", rows["off"]["oIoU"], rows["on"]["oIoU"], n),
            _row("refam", f"pointing: heatmap peak on the target (chance {rows['on']['pointing_chance']:.2f})",
                 rows["off"]["pointing"], rows["on"]["pointing"], n)]


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 99.0 if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def object_leakage(image, mask: np.ndarray, colour: str) -> float:
    """Share of the pixels of ``mask`` whose nearest palette colour is the removed object's ``colour``. Background
    colours are in the palette too: a navy dot must not count as a leaked blue object."""
    palette = np.array(list(OBJECT_COLOURS.values()) + list(BACKGROUND_COLOURS.values()), np.float64)
    px = np.asarray(image.convert("RGB"), np.float64)[mask]
    nearest = np.linalg.norm(px[:, None] - palette, axis=-1).argmin(-1)
    return float(np.mean(np.all(palette[nearest] == np.array(OBJECT_COLOURS[colour], np.float64), axis=-1)))


def bench_eraser(b: Bench, options: Optional[dict] = None) -> list[dict]:
    """options: AttentiveEraserPipeline options of the "on" run (None: SARG scale 9, as the bench runs it;
    benchmarks/eraser_probe.py sweeps them on validation scenes). "off" is plain inpainting (SARG scale 0)."""
    from ..pipelines.eraser import AttentiveEraserPipeline, default_mode

    if b.family != "unet":
        return [{"method": "eraser", "skipped": f"the bench runs the eraser on SD1.5/SDXL models, not {b.family}"}]
    size = b.native[0]
    mode = default_mode(b.pipe)
    erasers = {"off": AttentiveEraserPipeline.from_pipe(b.pipe, sarg_scale=0.0, mode=mode),
               "on": AttentiveEraserPipeline.from_pipe(b.pipe, **{"sarg_scale": 9.0, "mode": mode, **(options or {})})}
    leak, psnr = {"off": [], "on": []}, {"off": [], "on": []}
    scenes = b.scenes(n_objects=2)
    for i, scene in enumerate(scenes):
        target = 0
        truth = ground_truth(scene, size)[target]["mask"]
        mask = Image.fromarray((truth * 255).astype(np.uint8))
        clean = np.asarray(render(dataclasses.replace(scene, objects=scene.objects[1:]), size))
        for name, er in erasers.items():
            out = er(render(scene, size), mask, prompt="", num_inference_steps=b.steps,
                     strength=0.8 if mode == "sip" else None, generator=torch.Generator().manual_seed(i)).images[0]
            leak[name].append(object_leakage(out, truth, scene.objects[target].colour))
            psnr[name].append(_psnr(np.asarray(out.convert("RGB"))[truth], clean[truth]))
        b.say(f"eraser: {i + 1}/{len(scenes)}")
    return [_row("eraser", "object-colour leakage in the mask (lower is better)", np.mean(leak["off"]),
                 np.mean(leak["on"]), len(scenes)),
            _row("eraser", "PSNR in the mask vs the scene without the object (dB)", np.mean(psnr["off"]),
                 np.mean(psnr["on"]), len(scenes))]


def bench_alignedgen(b: Bench, options: Optional[dict] = None) -> list[dict]:
    """options: AlignedGenPipeline options (None: its defaults, as the bench runs it; benchmarks/alignedgen_probe.py
    sweeps them on validation scenes)."""
    from ..pipelines.alignedgen import AlignedGenPipeline

    aligned = AlignedGenPipeline.from_pipe(b.pipe, **(options or {}))
    batch = 3
    agree, adh = {"off": [], "on": []}, {"off": [], "on": []}
    for i in range(b.n):
        scenes = [sample_scene(HELD_OUT + b.seed + i * batch + j) for j in range(batch)]
        prompts = [without_background(caption(sc)) for sc in scenes]  # the style left to the model
        for name, runner in (("off", b.pipe), ("on", aligned)):
            kw = dict(prompt=prompts, height=b.native[0], width=b.native[1], num_inference_steps=b.steps,
                      generator=torch.Generator().manual_seed(i), **b.call_extras)
            imgs = [x.convert("RGB") for x in _images(runner(**kw))]
            parsed = [parse(x) for x in imgs]
            ref = parsed[0].background
            agree[name] += [p.background.style == ref.style and set(p.background.colours) == set(ref.colours)
                            for p in parsed[1:]]
            adh[name] += [adherence(p, sc)["object_rate"] for p, sc in zip(parsed, scenes)]
        b.say(f"alignedgen: {i + 1}/{b.n}")
    return [_row("alignedgen", "background style + colours equal to the reference image's", np.mean(agree["off"]),
                 np.mean(agree["on"]), b.n * (batch - 1)),
            _row("alignedgen", "object adherence", np.mean(adh["off"]), np.mean(adh["on"]), b.n * batch)]


def _images(out):
    imgs = getattr(out, "images", None)
    if imgs is None:
        imgs = [f[len(f) // 2] for f in out.frames]
    return [x if isinstance(x, Image.Image) else Image.fromarray(np.asarray(x)) for x in imgs]


def bench_freeswim(b: Bench) -> list[dict]:
    from ..pipelines.freeswim import FreeSwimPipeline

    try:
        swim = FreeSwimPipeline.from_pipe(b.pipe)
    except ValueError as err:
        return [{"method": "freeswim", "skipped": str(err)}]
    h, w = 2 * b.native[0], 2 * b.native[1]
    dup, adh = {"off": [], "on": []}, {"off": [], "on": []}
    scenes = b.scenes()
    for i, scene in enumerate(scenes):
        direct = b.generate(caption(scene), h, w, i)
        kw = dict(b.call_extras, num_inference_steps=b.steps, generator=torch.Generator().manual_seed(i))
        swum = _images(swim(caption(scene), height=h, width=w, **kw))[0].convert("RGB")
        for name, img in (("off", direct), ("on", swum)):
            parsed = parse(img)
            dup[name].append(max(0, len(parsed.objects) - len(scene.objects)))
            adh[name].append(adherence(parsed, scene)["object_rate"])
        b.say(f"freeswim: {i + 1}/{len(scenes)}")
    return [_row("freeswim", f"duplicated objects per image at 4× area ({w}×{h}) (lower is better)",
                 np.mean(dup["off"]), np.mean(dup["on"]), len(scenes)),
            _row("freeswim", "object adherence at 4× area", np.mean(adh["off"]), np.mean(adh["on"]), len(scenes))]


BENCHES: dict[str, Callable[[Bench], list[dict]]] = {
    "entropy": bench_entropy, "softpag": bench_softpag, "refam": bench_refam, "eraser": bench_eraser,
    "alignedgen": bench_alignedgen, "freeswim": bench_freeswim}


def available(method: str) -> Optional[str]:
    """None if `method` can run, else why not."""
    if method not in BENCHES:
        return "no toy-world benchmark for it yet"
    try:
        importlib.import_module(f"attnlab.{REQUIRES[method]}")
    except ImportError as err:
        return f"not installed ({err})"
    return None


def run(model, methods=METHODS, n: int = 20, steps: int = 20, seed: int = 0, device: str = "cpu",
        progress=None) -> list[dict]:
    """The rows of `methods` on `model` (a name, or a `loading.LoadedModel`)."""
    model = model if isinstance(model, LoadedModel) else load_model(model, device)
    b = Bench(model, int(n), int(steps), int(seed), progress)
    rows = []
    for method in methods:
        why = available(method)
        if why is not None:
            rows.append({"method": method, "skipped": why})
            continue
        t0 = time.perf_counter()
        with torch.no_grad():
            got = BENCHES[method](b)
        for r in got:
            r.setdefault("seconds", round(time.perf_counter() - t0, 1))
        rows += got
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| method | metric | off | on | n |", "|---|---|---:|---:|---:|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['method']} | skipped: {r['skipped']} | | | |")
        else:
            lines.append(f"| {r['method']} | {r['metric']} | {r['off']:.3f} | {r['on']:.3f} | {r['n']} |")
    return "\n".join(lines)


def _method_list(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise argparse.ArgumentTypeError(f"choose among {', '.join(METHODS)} (comma-separated); got {text!r}")
    return methods


def main(argv=None) -> int:
    ap = arg.OneLineParser(prog="attnlab bench", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=arg.model_name, default=None,
                    help="a toy/tiny model name or a local diffusers folder (default: the trained toy SD model when "
                         "installed, else tiny-sd15)")
    ap.add_argument("--methods", type=_method_list, default=",".join(METHODS), help="comma-separated (default: all)")
    ap.add_argument("--n", type=arg.int_in(1, 10_000), default=20, help="held-out scenes per method (default: %(default)s)")
    ap.add_argument("--steps", type=arg.steps, default=20, help="sampling steps (default: %(default)s)")
    ap.add_argument("--seed", type=arg.int_in(0, 2**31 - 1), default=0,
                    help="offset into the held-out scene seeds (default: %(default)s)")
    ap.add_argument("--device", type=arg.device, default="cpu", help="torch device (default: %(default)s)")
    ap.add_argument("--out", type=arg.output_folder, default=None,
                    help="also write the rows as JSON and the table as Markdown here")
    args = ap.parse_args(argv)
    return run_reporting_user_errors("attnlab bench", lambda: _bench(args))


def _bench(args) -> int:
    model = args.model or _default_model()
    rows = run(model, args.methods, args.n, args.steps, args.seed, args.device,
               progress=lambda t: print(f"\r  {t:60s}", end="", file=sys.stderr, flush=True))
    print(file=sys.stderr)
    table = markdown(rows)
    print(f"model: {model}\n{table}")
    if args.out:
        from pathlib import Path

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.json").write_text(json.dumps({"model": str(model), "n": args.n, "steps": args.steps, "rows": rows},
                                                   indent=2))
        (out / "bench.md").write_text(table + "\n")
    return 0


def _default_model() -> str:
    try:
        from .models import available_toy_models

        names = available_toy_models()
        if names:
            return f"toy-{names[0]}"
    except ImportError:
        pass
    return "tiny-sd15"


if __name__ == "__main__":
    raise SystemExit(main())
