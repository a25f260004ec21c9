"""`attnlab` command line: one subcommand per method, writing PNG files plus a JSON of the parameters.

    attnlab entropy --height 128 --width 128          # embedded tiny model, off/on side by side
    attnlab entropy --model /path/to/diffusers/folder --height 2048 --width 2048 --prompt "..."
    attnlab headhunter --model tiny:sd3 --objective sharpness --prompts prompts.txt --seeds 0,1 --out out/hh
    attnlab softpag --model tiny-sd3 --heads 'L1:*' --scale 3 --u 0.5 --out out/softpag
    attnlab eraser --model tiny-sd15 --steps 10 --out out/eraser        # generated input, centred mask

Every option is checked when it is parsed (`arguments`), models are loaded by `loading`; a user error ends with
exit code 2 and one line on stderr (`user_errors`), anything else with its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from . import arguments as arg
from .images import captioned_row, centred_mask, difference, frames_of, mask_overlay, side_by_side
from .loading import DTYPES, LoadedModel, load_model
from .processors.params import InvalidParameter
from .user_errors import run_reporting_user_errors

DEFAULT_PROMPT = "a red circle left of a blue square on a striped green background"


def _generator(seed: int):
    import torch

    return torch.Generator().manual_seed(seed)


def _save(frames, path: Path) -> str:
    if len(frames) == 1:
        frames[0].save(path.with_suffix(".png"))
        return path.with_suffix(".png").name
    frames[0].save(path.with_suffix(".gif"), save_all=True, append_images=frames[1:], duration=120, loop=0)
    return path.with_suffix(".gif").name


def _size_for(args, model: LoadedModel, factor: int = 1) -> tuple[int, int]:
    """--height/--width, each defaulting to `factor` × the model's own size, checked against the model."""
    height = args.height or factor * model.size[0]
    width = args.width or factor * model.size[1]
    model.check_size(height, width)
    return height, width


def _pipe_call(args, model: LoadedModel, height: int, width: int) -> dict:
    """The pipeline arguments the off/on subcommands share (video models: frames; the model's fixed arguments)."""
    call = dict(prompt=args.prompt, height=height, width=width, num_inference_steps=args.steps,
                guidance_scale=args.guidance)
    if model.frames is not None:
        call["num_frames"] = args.frames or model.frames
    call.update(model.call_kwargs)
    return call


def _off_on(stock, method, seed: int, out: Path, labels) -> tuple[dict, tuple[float, float]]:
    """Run `stock(generator)` and `method(generator)` with the same seed; save off/on (PNG, or GIF for
    videos) and a side-by-side compare.png in `out`. Returns (files, (seconds off, seconds on))."""
    import torch

    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        t0 = time.perf_counter()
        off = frames_of(stock(_generator(seed)))
        t_off = time.perf_counter() - t0
        t0 = time.perf_counter()
        on = frames_of(method(_generator(seed)))
        t_on = time.perf_counter() - t0
    files = {"off": _save(off, out / "off"), "on": _save(on, out / "on")}
    side_by_side(off[len(off) // 2], on[len(on) // 2], labels).save(out / "compare.png")
    files["compare"] = "compare.png"
    return files, (round(t_off, 3), round(t_on, 3))


def cmd_entropy(args) -> dict:
    from .pipelines.entropy import entropy_scaling

    model = load_model(args.model, args.device)
    height, width = _size_for(args, model, factor=2)
    call = _pipe_call(args, model, height, width)
    train_size = args.train_size or model.native_size
    scaled_with = []

    def scaled(generator):
        with entropy_scaling(model.pipe, strength=args.strength, train_size=train_size,
                             token_count=args.token_count) as session:
            scaled_with.append(session.effects[0])
            return model.pipe(**call, generator=generator)

    files, (t_off, t_on) = _off_on(lambda g: model.pipe(**call, generator=g), scaled, args.seed, Path(args.out),
                                   ("stock", f"entropy scaling (s={args.strength})"))
    report = {
        "method": "entropy_scaling",
        "model": str(args.model),
        "family": model.family,
        "native_size": list(model.native_size),
        "call": dict(call),
        "seed": args.seed,
        "effect": {"strength": args.strength, "train_size": args.train_size, "token_count": args.token_count},
        "lambda_per_layer": dict(sorted(scaled_with[0].last_lambda.items())),
        "seconds": {"stock": t_off, "entropy_scaling": t_on},
        "files": files,
    }
    (Path(args.out) / "params.json").write_text(json.dumps(report, indent=2))
    return report


def cmd_softpag(args) -> dict:
    from .pipelines.softpag import SoftPAGPipeline

    model = load_model(args.model, args.device)
    heads = args.heads
    if heads is None and args.preset is None:
        heads = model.default_heads
    # build (and validate heads/layers against the model) before any generation
    pag = SoftPAGPipeline.from_pipe(model.pipe, heads=heads, scale=args.scale, u=args.u, preset=args.preset,
                                    target=args.target, joint=args.joint)
    resolved = str(pag.effect.resolved_heads)  # UNet block refs as global layers
    call = _pipe_call(args, model, *_size_for(args, model))
    scale = pag.schedule.scale
    files, (t_off, t_on) = _off_on(lambda g: model.pipe(**call, generator=g), lambda g: pag(**call, generator=g),
                                   args.seed, Path(args.out),
                                   ("stock", f"SoftPAG (w={scale:g}, u={pag.effect.u:g}, {pag.effect.target})"))
    report = {
        "method": "softpag",
        "model": str(args.model),
        "family": model.family,
        "native_size": list(model.native_size),
        "call": dict(call),
        "seed": args.seed,
        "heads": resolved,
        "heads_given": args.heads,
        "preset": args.preset,
        "effect": {"scale": scale, "u": pag.effect.u, "target": pag.effect.target, "joint": pag.effect.joint},
        "extra_passes": pag.extra_passes,
        "seconds": {"stock": t_off, "softpag": t_on},
        "files": files,
    }
    (Path(args.out) / "params.json").write_text(json.dumps(report, indent=2))
    return report


def _open_image(path: str, what: str, mode: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return img.convert(mode)
    except (UnidentifiedImageError, OSError) as err:
        raise InvalidParameter(f"{what} {path}: not a readable image ({err})") from None


def cmd_eraser(args) -> dict:
    import torch

    from .pipelines.eraser import AttentiveEraserPipeline

    image = _open_image(args.image, "--image", "RGB") if args.image else None
    user_mask = _open_image(args.mask, "--mask", "L") if args.mask else None
    model = load_model(args.model, args.device)
    options = dict(ss_scale=args.ss_scale, ss_steps=args.ss_steps, mode=args.mode)
    # build (and validate against the model) before any generation
    eraser = AttentiveEraserPipeline.from_pipe(model.pipe, sarg_scale=args.scale, **options)
    plain = AttentiveEraserPipeline.from_pipe(model.pipe, sarg_scale=0.0, **options)
    if image is None:
        height, width = _size_for(args, model)
    elif args.height or args.width:
        height, width = args.height or image.height, args.width or image.width
        model.check_size(height, width)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seconds = {}
    with torch.no_grad():
        if image is None:
            call = dict(prompt=args.prompt, height=height, width=width, num_inference_steps=args.steps,
                        guidance_scale=args.guidance, **model.call_kwargs)
            t0 = time.perf_counter()
            image = frames_of(model.pipe(**call, generator=_generator(args.seed)))[0].convert("RGB")
            seconds["input"] = round(time.perf_counter() - t0, 3)
        elif args.height or args.width:
            image = image.resize((width, height))
        mask = user_mask if user_mask is not None else centred_mask(image.width, image.height)
        erase = dict(prompt=args.eraser_prompt, num_inference_steps=args.steps, composite=args.composite,
                     strength=None if args.mode == "dip" else args.strength, **model.call_kwargs)
        t0 = time.perf_counter()
        plain_img = plain(image, mask, generator=_generator(args.seed), **erase).images[0]
        seconds["plain"] = round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()
        erased_img = eraser(image, mask, generator=_generator(args.seed), **erase).images[0]
        seconds["erased"] = round(time.perf_counter() - t0, 3)
    image.save(out / "input.png")
    mask.save(out / "mask.png")
    plain_img.save(out / "plain.png")
    erased_img.save(out / "erased.png")
    diff, diff_label = difference(plain_img, erased_img)
    captioned_row([mask_overlay(image, mask), plain_img, erased_img, diff],
                  ["input + mask", f"plain {args.mode.upper()} (s=0)", f"erased (s={args.scale:g})", diff_label]
                  ).save(out / "compare.png")
    files = {"input": "input.png", "mask": "mask.png", "plain": "plain.png", "erased": "erased.png",
             "compare": "compare.png"}
    report = {
        "method": "attentive_eraser",
        "model": str(args.model),
        "family": model.family,
        "inpaint_pipeline": type(eraser.inpaint).__name__,
        "image": args.image or "generated",
        "mask": args.mask or "centred rectangle (1/4 of the area)",
        "prompt": args.prompt if args.image is None else None,
        "eraser_prompt": args.eraser_prompt,
        "size": [image.height, image.width],
        "seed": args.seed,
        "steps": args.steps,
        "guidance": args.guidance,
        "effect": {"sarg_scale": args.scale, "ss_scale": args.ss_scale, "ss_steps": args.ss_steps,
                   "strength": 1.0 if args.mode == "dip" else args.strength, "mode": args.mode,
                   "composite": args.composite, "dilate_px": eraser.dilate_px},
        "extra_passes": {"plain": plain.extra_passes, "erased": eraser.extra_passes},
        "seconds": seconds,
        "files": files,
    }
    (out / "params.json").write_text(json.dumps(report, indent=2))
    return report


def cmd_refam(args) -> dict:
    import numpy as np
    from PIL import Image

    from .pipelines.refam import RefAMPipeline
    from .processors.refam_heatmap import colorize

    if args.image and not args.expression and not args.eval:
        raise InvalidParameter("--expression: give the referring expression for --image (the toy scenes have "
                               "their own)")
    image = _open_image(args.image, "--image", "RGB") if args.image and not args.eval else None
    model = load_model(args.model, args.device)
    options = dict(sigmas=tuple(args.noise), seed=args.seed, map_mode=args.map_mode,
                   gas_mode=args.gas_mode, caption=args.caption,
                   caption_mode="caption+expr" if args.caption.strip() else "expr", threshold=args.threshold,
                   filter_stopwords=not args.keep_stopwords, blur=args.blur)
    if args.layers:
        options["layers"] = args.layers
    if args.magnets is not None:
        options["magnets"] = tuple(args.magnets.split())
    seg = RefAMPipeline.from_pipe(model.pipe, **options)
    call = model.text_lengths()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.eval:
        from .toyworld.refam_eval import evaluate, markdown

        def progress(done, total):
            print(f"\r  {done}/{total} segmentations", end="", file=sys.stderr, flush=True)

        t0 = time.perf_counter()
        rows = evaluate(seg, scenes=args.eval, size=args.size or 64, progress=progress, **call)
        print(file=sys.stderr)
        (out / "eval.md").write_text(markdown(rows) + "\n")
        report = {"method": "refam", "model": str(args.model), "family": seg.family, "eval": rows,
                  "seconds": {"eval": round(time.perf_counter() - t0, 1)}, "files": {"table": "eval.md"},
                  "options": {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}}
        (out / "params.json").write_text(json.dumps(report, indent=2))
        return report
    if image is not None:
        expression = args.expression
    else:
        from .toyworld.scenes import referring_expressions, render, sample_scene

        scene = sample_scene(args.seed)
        image = render(scene, args.size or 64)
        expression = args.expression or referring_expressions(scene)[0]["text"]
    result = seg(image, expression, resize=args.resize, **call)
    image.save(out / "input.png")
    heat = Image.fromarray(colorize(result.heatmap))
    mask = Image.fromarray((result.mask.numpy() * 255).astype(np.uint8))
    heat.save(out / "heatmap.png")
    mask.save(out / "mask.png")
    result.overlay.save(out / "overlay.png")
    captioned_row([image, result.overlay, mask.convert("RGB")], ["input", f"heatmap: {expression}", "mask"]
                  ).save(out / "compare.png")
    report = {
        "method": "refam", "model": str(args.model), "family": seg.family,
        "image": args.image or f"toy scene {args.seed}",
        "expression": expression, "prompt": result.prompt, "words": result.words,
        "sinks": {f"sigma={k[0]} layer={k[1]}": v for k, v in result.sinks.items()},
        "layers": sorted(seg.options.layers or []) or "default",
        "options": {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()},
        "mask_fraction": round(float(result.mask.float().mean()), 4),
        "seconds": {k: round(v, 4) if isinstance(v, float) else v for k, v in result.timings.items()},
        "files": {"input": "input.png", "heatmap": "heatmap.png", "mask": "mask.png", "overlay": "overlay.png",
                  "compare": "compare.png"},
    }
    (out / "params.json").write_text(json.dumps(report, indent=2))
    return report


def _read_prompts(values) -> list[str]:
    """--prompts values: a text file (one prompt per line; blank lines and '#' comments skipped) or a prompt."""
    prompts: list[str] = []
    for value in values or []:
        path = Path(value)
        if value.strip() and path.is_file():
            try:
                lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
            except UnicodeDecodeError:
                raise InvalidParameter(f"--prompts {value}: not a UTF-8 text file") from None
            found = [line for line in lines if line and not line.startswith("#")]
            if not found:
                raise InvalidParameter(f"--prompts {value}: the file has no prompts (one per line)")
            prompts += found
        elif value.strip():
            prompts.append(value.strip())
        else:
            raise InvalidParameter("--prompts: empty prompt; give a prompt text or a file with one prompt per line")
    if not prompts:
        raise InvalidParameter("--prompts: give at least one prompt (repeat --prompts or pass a file)")
    return prompts


def cmd_headhunter(args) -> dict:
    from .pipelines.headhunter import check_settings, join_processes, load_objective, run_headhunter

    prompts = _read_prompts(args.prompts or [DEFAULT_PROMPT])
    check_settings(args.u, args.scale, args.cfg, args.steps, args.target, args.joint)
    if not args.objective.startswith("clip:"):
        try:
            load_objective(args.objective)  # fail on a bad name before loading the model
        except ValueError as err:
            raise InvalidParameter(f"--objective: {err}") from None
    size, frames = args.size, args.frames
    if isinstance(size, tuple) and len(size) == 3:
        frames, size = size[0], size[1:]
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    workers = join_processes()  # torchrun / accelerate launch: share the search (before loading: picks the GPU)
    t0 = time.perf_counter()
    model = load_model(args.model, args.device, args.dtype)
    t_load = time.perf_counter() - t0
    size = size or model.size
    model.check_size(*((size, size) if isinstance(size, int) else size), what="--size")
    result, files = run_headhunter(
        model.pipe, prompts, args.seeds, args.objective, args.out, top_k=args.top_k, rounds=args.rounds, u=args.u,
        scale=args.scale, cfg=args.cfg, steps=args.steps, size=size, frames=frames or model.frames,
        target=args.target, joint=args.joint, layers=args.layers, max_candidates=args.max_candidates,
        restart=args.restart, validation=not args.no_validation, progress=not args.quiet,
        call_kwargs=model.call_kwargs, model=str(args.model), workers=workers)
    if workers.rank:  # process 0 writes the files and reports
        return {"method": "headhunter", "process": workers.rank, "heads": str(result.selected)}
    out = Path(args.out)
    cost = json.loads(Path(files["preset"]).read_text())["search"]["cost"]
    return {
        "method": "headhunter",
        "model": str(args.model),
        "heads": str(result.selected),
        "rounds": [{"round": r["round"], "added": [f"L{a}:H{b}" for a, b in r["added"]],
                    "best_score": r["added_scores"][0] if r["added_scores"] else None} for r in result.rounds],
        "validation": {v["label"]: v["score"] for v in result.validation},
        "seconds": {"load": round(t_load, 3), "search": cost["seconds"], "generation": cost["generation_s"],
                    "objective": cost["objective_s"]},
        "generations": cost["generations"],
        "files": {k: str(Path(v).relative_to(out)) for k, v in files.items()},
    }


def _head_set(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("empty head set; give e.g. 'L1:*', 'L7:H3,H5; L9:*' or UNet blocks like "
                                         "'m0'")
    return text


def _softpag_scale(text: str) -> float:
    from .processors.softpag import MAX_GUIDANCE_SCALE as MAX_SCALE

    return arg.float_in(0.0, MAX_SCALE)(text)


def _sarg_scale(text: str) -> float:
    from .pipelines.eraser import MAX_SARG_SCALE

    return arg.float_in(0.0, MAX_SARG_SCALE)(text)


def build_parser() -> argparse.ArgumentParser:
    parser = arg.OneLineParser(prog="attnlab", description="Training-free attention methods for diffusion models.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "entropy",
        help="entropy scaling: generate off/on at a resolution other than the model's training size",
        description="Generate the same prompt and seed with the stock model and with attention-entropy scaling "
        "(λ = sqrt(ln N / ln T) per self-attention layer), writing off/on images, a side-by-side "
        "compare.png and params.json (parameters, λ per layer, timings).",
    )
    p.add_argument("--model", type=arg.model_name, default="tiny-sd15",
                   help="tiny-sd15|tiny-sdxl|tiny-sd3|tiny-flux|tiny-pixart|tiny-wan (embedded random-weight "
                        "models, offline) or a local diffusers pipeline folder (default: %(default)s)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT,
                   help="text prompt (default: %(default)r)")
    p.add_argument("--height", type=arg.pixels, default=None,
                   help="output height in pixels (default: 2x the native size)")
    p.add_argument("--width", type=arg.pixels, default=None,
                   help="output width in pixels (default: 2x the native size)")
    p.add_argument("--frames", type=arg.frames, default=None,
                   help="video frames for Wan models, 4k + 1 (default: the model's own: 5 for tiny-wan, 81 for Wan)")
    p.add_argument("--steps", type=arg.steps, default=4, help="sampling steps (default: %(default)s)")
    p.add_argument("--guidance", type=arg.guidance, default=5.0, help="guidance scale (default: %(default)s)")
    p.add_argument("--seed", type=arg.seed, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--strength", type=arg.float_in(0.0, 4.0), default=1.0,
                   help="exponent multiplier s in λ=(ln N/ln T)^(s/2); 1 = paper, 0 = off, range [0, 4] (default: %(default)s)")
    p.add_argument("--train-size", type=arg.size, default=None,
                   help="training resolution the model was trained at, e.g. 1024 or 768x1344 (default: the model's native size)")
    p.add_argument("--token-count", choices=["joint", "image"], default="joint",
                   help="for SD3/FLUX joint attention: count all keys (joint) or image keys only (default: %(default)s)")
    p.add_argument("--device", type=arg.device, default="cpu", help="torch device (default: %(default)s)")
    p.add_argument("--out", type=arg.output_folder, default="out/entropy", help="output folder (default: %(default)s)")
    p.set_defaults(func=cmd_entropy)

    p = sub.add_parser(
        "headhunter",
        help="HeadHunter: search the attention heads whose SoftPAG perturbation most improves an objective",
        description="Greedy head search (HeadHunter, arXiv 2506.10978, Algorithm 1), on one process or shared by "
                    "several (torchrun --nproc_per_node=N -m attnlab.cli headhunter ..., or accelerate launch: each "
                    "process scores its share of every round, process 0 writes the one resumable state file; "
                    "docs/scale_out.md). Each round scores every "
        "remaining (layer, head) by the mean objective of images generated with SoftPAG on the selected heads "
        "plus that head, over prompts x seeds, and adds the top-k. Costs prompts*seeds*candidates*rounds "
        "generations. Writes OUT/state.json (resumable: rerun the same command), OUT/headset.json (a SoftPAG "
        "preset) and validation images (baseline without guidance, then after each round).",
    )
    p.add_argument("--model", type=arg.model_name, default="tiny:sd3",
                   help="tiny:sd15|tiny:sdxl|tiny:sd3|tiny:flux|tiny:pixart|tiny:wan (embedded random-weight models, "
                        "offline) or a local diffusers pipeline folder (default: %(default)s)")
    p.add_argument("--objective", type=arg.non_empty, default="sharpness",
                   help="sharpness|colorfulness|contrast (built-in, no weights), clip:PATH (local CLIP/PickScore "
                        "folder) or module:function / file.py:function taking (PIL image, prompt) -> float, "
                        "higher is better (default: %(default)s)")
    p.add_argument("--prompts", action="append", metavar="TEXT_OR_FILE",
                   help="a prompt, or a text file with one prompt per line; repeatable (default: one demo prompt)")
    p.add_argument("--seeds", type=arg.int_list, default=[0],
                   help="seeds, e.g. 0,1,2 or 0-4; every prompt is generated with every seed (default: 0)")
    p.add_argument("--top-k", type=arg.int_in(1, 10_000), default=3, help="heads added per round (default: %(default)s)")
    p.add_argument("--rounds", type=arg.int_in(1, 10_000), default=5, help="search rounds (default: %(default)s)")
    p.add_argument("--u", type=arg.float_in(0.0, 1.0, low_open=True), default=1.0,
                   help="SoftPAG interpolation during the search, (0, 1]; 1 = PAG as the official code "
                        "(default: %(default)s)")
    p.add_argument("--scale", type=arg.float_in(0.0, 100.0, low_open=True), default=3.0,
                   help="perturbation guidance scale w (default: %(default)s)")
    p.add_argument("--cfg", type=arg.guidance, default=0.0,
                   help="CFG scale during the search; <= 1 is off, as in the official code (FLUX: true CFG with "
                        "an empty negative prompt) (default: %(default)s)")
    p.add_argument("--steps", type=arg.steps, default=20, help="sampling steps (default: %(default)s)")
    p.add_argument("--size", type=arg.size, default=None,
                   help="HEIGHT, HEIGHTxWIDTH or FRAMESxHEIGHTxWIDTH in pixels (default: the model's own default)")
    p.add_argument("--frames", type=arg.frames, default=None,
                   help="video frames for Wan models, 4k + 1 (default: the model's own: 5 for tiny-wan, 81 for Wan)")
    p.add_argument("--layers", type=arg.int_list, default=None,
                   help="search only these layers, e.g. 7-10 or 0,2,5 (global layer indices; default: all)")
    p.add_argument("--max-candidates", type=arg.int_in(1, 1_000_000), default=None,
                   help="keep only the first N candidate heads (layer-major order, after --layers)")
    p.add_argument("--target", choices=["identity", "uniform", "mean_query"], default="identity",
                   help="SoftPAG target: identity (PAG), uniform (SoftUG), mean_query (SoftSEG) (default: %(default)s)")
    p.add_argument("--joint", choices=["full", "image"], default="full",
                   help="SD3/FLUX: perturb the full joint map (HeadHunter) or image->image only (default: %(default)s)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="model dtype (default: the weights' own)")
    p.add_argument("--device", type=arg.device, default="cpu", help="torch device (default: %(default)s)")
    p.add_argument("--threads", type=arg.int_in(1, 1024), default=None,
                   help="CPU threads for torch (default: torch's own); 1 is fastest for the tiny models on a busy machine")
    p.add_argument("--out", type=arg.output_folder, default="out/headhunter", help="output folder (default: %(default)s)")
    p.add_argument("--restart", action="store_true", help="discard an existing OUT/state.json instead of resuming it")
    p.add_argument("--no-validation", action="store_true", help="skip the validation images")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_headhunter)

    p = sub.add_parser(
        "softpag",
        help="SoftPAG: generate off/on with perturbed-attention guidance on a head set",
        description="Generate the same prompt and seed with the stock pipeline and with SoftPAG perturbation guidance "
        "(one extra conditional forward per step with the attention of the head set interpolated toward a target by "
        "u, folded in as w(ε_c − ε_ptb)), writing off/on images, a side-by-side compare.png and params.json "
        "(parameters, the resolved head set, extra passes, timings).",
    )
    p.add_argument("--model", type=arg.model_name, default="tiny-sd15",
                   help="tiny-sd15|tiny-sdxl|tiny-sd3|tiny-flux|tiny-pixart|tiny-wan (embedded random-weight "
                        "models, offline) or a local diffusers pipeline folder (default: %(default)s)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="text prompt (default: %(default)r)")
    p.add_argument("--heads", type=_head_set, default=None,
                   help="head set: layers and heads 'L7:H3,H5; L9:*' (global self/joint layer indices) or UNet blocks "
                        "'d2.1-3, m0, u0' (default: the preset's, else the UNet mid block 'm0' for SD1.5/SDXL, or "
                        "all heads of the middle self/joint layer for DiTs)")
    p.add_argument("--preset", type=arg.non_empty, default=None,
                   help="a shipped SoftPAG preset name (e.g. sd3-medium-layers-7-10) or a preset JSON path (e.g. "
                        "HeadHunter's headset.json); --heads/--scale/--u/--target/--joint override it (default: none)")
    p.add_argument("--scale", type=_softpag_scale, default=None,
                   help="perturbation guidance scale w; 0 = off (default: the preset's, else 3.0)")
    p.add_argument("--u", type=arg.float_in(0.0, 1.0, low_open=True), default=None,
                   help="interpolation toward the target, (0, 1]; 1 = full PAG-style replacement "
                        "(default: the preset's, else 1.0)")
    p.add_argument("--target", choices=["identity", "uniform", "mean_query"], default=None,
                   help="SoftPAG target: identity (PAG), uniform (SoftUG), mean_query (SoftSEG) "
                        "(default: the preset's, else identity)")
    p.add_argument("--joint", choices=["full", "image"], default=None,
                   help="SD3/FLUX: perturb the full joint map or image->image only (default: the preset's, else full)")
    p.add_argument("--guidance", type=arg.guidance, default=5.0,
                   help="classifier-free guidance scale of the pipeline; <= 1 is off (default: %(default)s)")
    p.add_argument("--steps", type=arg.steps, default=4, help="sampling steps (default: %(default)s)")
    p.add_argument("--seed", type=arg.seed, default=0, help="random seed, the same for off and on (default: %(default)s)")
    p.add_argument("--height", type=arg.pixels, default=None, help="output height in pixels (default: the native size)")
    p.add_argument("--width", type=arg.pixels, default=None, help="output width in pixels (default: the native size)")
    p.add_argument("--frames", type=arg.frames, default=None,
                   help="video frames for Wan models, 4k + 1 (default: the model's own: 5 for tiny-wan, 81 for Wan)")
    p.add_argument("--device", type=arg.device, default="cpu", help="torch device (default: %(default)s)")
    p.add_argument("--out", type=arg.output_folder, default="out/softpag", help="output folder (default: %(default)s)")
    p.set_defaults(func=cmd_softpag)

    p = sub.add_parser(
        "eraser",
        help="Attentive Eraser: remove the masked object (AAS + SARG), plain vs erased",
        description="Object removal with Attentive Eraser (attention activation and suppression + self-attention "
        "redirection guidance) on the stock inpaint pipeline of the model's family. Without --image the input is "
        "generated by the pipeline itself from --prompt (fully offline with the tiny models); without --mask a "
        "centred rectangle (1/4 of the area) is removed. Writes input.png, mask.png, plain.png (the same sampler "
        "with s = 0), erased.png, compare.png and params.json.",
    )
    p.add_argument("--model", type=arg.model_name, default="tiny-sd15",
                   help="tiny-sd15|tiny-sdxl (embedded random-weight UNet models, offline) or a local SD1.x/2.x/SDXL "
                        "diffusers folder; tiny-sd3|tiny-flux or SD3/FLUX folders are experimental (SIP only) "
                        "(default: %(default)s)")
    p.add_argument("--image", type=arg.existing_file, default=None,
                   help="input image file (default: generate one with the pipeline from --prompt)")
    p.add_argument("--mask", type=arg.existing_file, default=None,
                   help="mask image file, white = remove, resized to the image (default: a centred rectangle "
                        "covering 1/4 of the image)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT,
                   help="prompt used to generate the input image when --image is not given (default: %(default)r)")
    p.add_argument("--eraser-prompt", default="",
                   help="prompt of the removal run; empty as in the official code (default: %(default)r)")
    p.add_argument("--scale", type=_sarg_scale, default=9.0,
                   help="SARG scale s; 0 = plain SIP, 1 = pure AAS sampling (default: %(default)s)")
    p.add_argument("--ss-scale", type=arg.float_in(0.0, 1.0, low_open=True), default=0.3,
                   help="similarity suppression scale of AAS (default: %(default)s)")
    p.add_argument("--ss-steps", type=arg.int_in(0, arg.MAX_STEPS), default=9,
                   help="similarity suppression for the first ss_steps + 1 executed steps (default: %(default)s)")
    p.add_argument("--strength", type=arg.float_in(0.0, 1.0, low_open=True), default=0.8,
                   help="SIP img2img strength, (0, 1]; DIP always uses 1 (default: %(default)s)")
    p.add_argument("--steps", type=arg.steps, default=50,
                   help="sampling steps (also for generating the input image) (default: %(default)s)")
    p.add_argument("--mode", choices=["sip", "dip"], default="sip",
                   help="sip: stock inpaint pipeline with known-region replacement (official default); dip: DDIM "
                        "inversion + trajectory replacement (UNet models only) (default: %(default)s)")
    p.add_argument("--guidance", type=arg.guidance, default=5.0,
                   help="CFG scale for generating the input image; the removal runs without CFG, as in the "
                        "official code (default: %(default)s)")
    p.add_argument("--composite", action="store_true",
                   help="paste the result into the input outside a blurred mask (the official SD scripts' "
                        "post-processing)")
    p.add_argument("--seed", type=arg.seed, default=0,
                   help="random seed for the input image and both removal runs (default: %(default)s)")
    p.add_argument("--height", type=arg.pixels, default=None,
                   help="image height in pixels; a given --image is resized (default: the native size, or the "
                        "image's)")
    p.add_argument("--width", type=arg.pixels, default=None,
                   help="image width in pixels; a given --image is resized (default: the native size, or the image's)")
    p.add_argument("--device", type=arg.device, default="cpu", help="torch device (default: %(default)s)")
    p.add_argument("--out", type=arg.output_folder, default="out/eraser", help="output folder (default: %(default)s)")
    p.set_defaults(func=cmd_eraser)

    sub.add_parser("demo", help="the Gradio demo: one tab per method (attnlab demo --help for its options)",
                   add_help=False)
    sub.add_parser("bench", help="every method off vs on on the toy world, scored by the scene parser "
                                 "(attnlab bench --help)", add_help=False)

    p = sub.add_parser(
        "refam",
        help="RefAM: segment the object an expression refers to, from the model's image-text attention",
        description="Zero-shot referring segmentation (RefAM): one forward of the denoiser per noise level on the "
        "noised image with the expression plus appended stop-word magnets as the prompt; the image->text attention "
        "of the selected layers, without stop words, magnets and global attention sinks, is the heatmap; the mask "
        "is its Otsu (or mean+std) threshold at the peak. Without --image a toy-world scene is rendered and its "
        "first referring expression used. Writes input.png, heatmap.png, mask.png, overlay.png, compare.png and "
        "params.json; with --eval N, mIoU/oIoU over the referring expressions of N toy-world scenes with the "
        "ablations (eval.md, params.json). The embedded tiny models have random weights: their maps show the "
        "plumbing, not the method's quality.",
    )
    p.add_argument("--model", type=arg.model_name, default="tiny-flux",
                   help="tiny-flux|tiny-sd3|tiny-sd15|tiny-sdxl|tiny-wan|tiny-pixart (embedded, offline) or a local "
                        "diffusers folder (default: %(default)s)")
    p.add_argument("--image", type=arg.existing_file, default=None,
                   help="image file (default: render a toy-world scene)")
    p.add_argument("--expression", type=arg.non_empty, default=None,
                   help="the referring expression (default with a toy scene: its first referring expression)")
    p.add_argument("--caption", default="", help="optional caption put before the expression")
    p.add_argument("--noise", type=arg.float_list_in(0.0, 1.0, low_open=True, high_open=True), default="0.5",
                   help="noise level(s) in (0, 1), one forward each, e.g. 0.3,0.5,0.7 "
                                                  "(default: %(default)s)")
    p.add_argument("--layers", type=arg.int_list, default=None,
                   help="layers to read, e.g. 10-56 (default: the family default)")
    p.add_argument("--map-mode", default="img2txt_textsoftmax",
                   choices=["img2txt_textsoftmax", "img2txt_joint", "txt2img_joint"],
                   help="which softmax the maps slice (default: %(default)s)")
    p.add_argument("--gas-mode", default="drop", choices=["drop", "suppress", "redirect"],
                   help="global attention sinks: drop from the maps (read-only), suppress in the forward, or redirect "
                        "to appended '.' tokens (default: %(default)s)")
    p.add_argument("--magnets", default=None, help="space-separated magnet words (default: 'a the of and with , .'; "
                                                   "'' for none)")
    p.add_argument("--keep-stopwords", action="store_true", help="aggregate stop words too (ablation)")
    p.add_argument("--threshold", default="otsu", choices=["otsu", "mean_std"], help="mask threshold (default: %(default)s)")
    p.add_argument("--blur", type=arg.float_in(0.0, 100.0), default=1.0,
                   help="heatmap blur in tokens (default: %(default)s)")
    p.add_argument("--size", type=arg.int_in(16, 4096), default=None, help="toy scene size in pixels (default: 64)")
    p.add_argument("--resize", action="store_true",
                   help="resize an image whose sides are not a multiple of the model's pixels per token")
    p.add_argument("--eval", type=arg.int_in(0, 10_000), default=0, metavar="N",
                   help="evaluate on the referring expressions of N toy-world scenes with ablations instead")
    p.add_argument("--seed", type=arg.seed, default=0, help="noise seed and toy scene (default: %(default)s)")
    p.add_argument("--device", type=arg.device, default="cpu", help="torch device (default: %(default)s)")
    p.add_argument("--out", type=arg.output_folder, default="out/refam", help="output folder (default: %(default)s)")
    p.set_defaults(func=cmd_refam)
    return parser


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["demo"]:  # the Gradio app has its own options (attnlab demo --help)
        from .demo import main as demo_main


REPORT_KEYS = ("method", "model", "expression", "words", "eval", "heads", "rounds", "validation", "extra_passes",
               "seconds", "generations", "files")


def _run(args) -> int:
    report = args.func(args)
    print(json.dumps({k: report[k] for k in REPORT_KEYS if k in report}, indent=2))
    print(f"wrote {args.out}/")
    return 0


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["demo"]:  # the Gradio app has its own options (attnlab demo --help)
        from .demo import main as demo_main

        return demo_main(argv[1:])
    if argv[:1] == ["bench"]:  # the toy-world benchmark has its own options (attnlab bench --help)
        from .toyworld.bench import main as bench_main

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    resume = "; rerun the same command to resume" if args.command == "headhunter" else ""
    return run_reporting_user_errors(f"attnlab {args.command}", lambda: _run(args), resume)


if __name__ == "__main__":
    raise SystemExit(main())
