"""`attnlab` command line: one subcommand per method, writing PNG files plus a JSON of the parameters.

    attnlab entropy --height 128 --width 128          # embedded tiny model, off/on side by side
    attnlab entropy --model /path/to/diffusers/folder --height 2048 --width 2048 --prompt "..."
    attnlab headhunter --model tiny:sd3 --objective sharpness --prompts prompts.txt --seeds 0,1 --out out/hh
    attnlab softpag --model tiny-sd3 --heads 'L1:*' --scale 3 --u 0.5 --out out/softpag
    attnlab eraser --model tiny-sd15 --steps 10 --out out/eraser        # generated input, centred mask
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

TINY_PREFIX = "tiny-"
DEFAULT_HEADHUNTER_PROMPT = "a red circle left of a blue square on a striped green background"
_TINY_PREFIXES = ("tiny-", "tiny:")
DTYPES = ("float32", "float16", "bfloat16")


def tiny_family(model: str):
    """The family of an embedded tiny model name (`tiny-sd3` or `tiny:sd3`), None for anything else."""
    for prefix in _TINY_PREFIXES:
        if model.startswith(prefix):
            return model[len(prefix):]
    return None


def load_pipeline(model: str, device: str = "cpu", dtype=None):
    """`tiny-<family>` / `tiny:<family>` builds an embedded random-weight tiny pipeline offline; `toy-sd` /
    `toy-flux` loads a shipped toy-world model (trained, offline); anything else is a local diffusers folder (or a hub id when the machine has internet). `dtype`: a torch dtype
    or its name ("float16"); None keeps the weights' own (float32 for the tiny models)."""
    import torch

    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
        dtype = getattr(torch, dtype)
    family = tiny_family(model)
    if family is not None:
        from .models.tiny import FAMILIES, build_tiny_pipeline

        if family not in FAMILIES:
            prefix = model[: len(model) - len(family)]
            raise ValueError(f"--model {model!r}: unknown tiny model; choose one of " + ", ".join(prefix + f for f in FAMILIES))
        pipe = build_tiny_pipeline(family)
        if dtype is not None:
            pipe = pipe.to(dtype=dtype)
    elif model.startswith(("toy-", "toy:")):
        from .toyworld.models import TOY_MODELS, load_toy_pipeline, toy_name

        name = toy_name(model)
        if name is None:
            raise ValueError(f"--model {model!r}: unknown toy model; choose one of "
                             + ", ".join(f"toy-{n}" for n in TOY_MODELS))
        try:
            pipe = load_toy_pipeline(name, "cpu", dtype)
        except FileNotFoundError as err:
            raise ValueError(str(err)) from None
    else:
        from diffusers import DiffusionPipeline

        local = Path(model).is_dir()
        extra = {"torch_dtype": dtype} if dtype is not None else {}
        pipe = DiffusionPipeline.from_pretrained(model, local_files_only=local, **extra)
    pipe.set_progress_bar_config(disable=False, desc="sampling")
    return pipe.to(device)


def _tiny_extras(model: str) -> dict:
    """Fixed call arguments the embedded tiny models need (text lengths, no resolution binning)."""
    family = tiny_family(model)
    if family is None:
        if model.startswith(("toy-", "toy:")):
            from .toyworld.models import toy_call_kwargs, toy_name

            name = toy_name(model)
            return {} if name is None else {k: v for k, v in toy_call_kwargs(name).items() if k == "max_sequence_length"}
        return {}
    from .models.tiny import tiny_call_kwargs

    fixed = tiny_call_kwargs(family)
    return {k: v for k, v in fixed.items() if k in ("max_sequence_length", "use_resolution_binning", "clean_caption")}


def _generator(seed: int):
    import torch

    return torch.Generator().manual_seed(seed)


def _frames(output):
    """PIL images of a pipeline output (first frame list for video pipelines)."""
    import numpy as np
    from PIL import Image

    images = getattr(output, "images", None)
    if images is None:
        video = output.frames[0]
        return [Image.fromarray((np.clip(np.asarray(f), 0, 1) * 255).round().astype("uint8")) for f in video]
    return list(images)


def side_by_side(left, right, labels=("off", "on"), min_size: int = 256):
    """[left | right | amplified |difference|] with captions; small images are enlarged (nearest)."""
    import numpy as np
    from PIL import Image, ImageDraw

    a = np.asarray(left.convert("RGB"), dtype=np.float32)
    b = np.asarray(right.convert("RGB"), dtype=np.float32)
    diff = np.abs(a - b).mean(-1)
    gain = 255.0 / max(float(diff.max()), 1e-6)
    diff_img = Image.fromarray((diff * gain).clip(0, 255).astype("uint8")).convert("RGB")
    panels = [left.convert("RGB"), right.convert("RGB"), diff_img]
    labels = list(labels) + [f"|difference| x{gain:.0f}" if diff.max() > 0 else "identical"]
    factor = max(1, -(-min_size // max(left.size)))
    panels = [p.resize((p.width * factor, p.height * factor), Image.NEAREST) for p in panels]
    w, h = panels[0].size
    pad = 18
    canvas = Image.new("RGB", (len(panels) * w, h + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (panel, text) in enumerate(zip(panels, labels)):
        canvas.paste(panel, (i * w, pad))
        draw.text((i * w + 4, 3), text, fill="black")
    return canvas


def _save(frames, path: Path) -> str:
    if len(frames) == 1:
        frames[0].save(path.with_suffix(".png"))
        return path.with_suffix(".png").name
    frames[0].save(path.with_suffix(".gif"), save_all=True, append_images=frames[1:], duration=120, loop=0)
    return path.with_suffix(".gif").name


def _pipe_call(args, family: str, height: int, width: int) -> dict:
    """The pipeline arguments the off/on subcommands share (Wan: frames; tiny models: fixed text lengths)."""
    call = dict(prompt=args.prompt, height=height, width=width, num_inference_steps=args.steps,
                guidance_scale=args.guidance)
    if family == "wan":
        call["num_frames"] = args.frames
    call.update(_tiny_extras(args.model))
    return call


def _off_on(stock, method, seed: int, out: Path, labels) -> tuple[dict, tuple[float, float]]:
    """Run `stock(generator)` and `method(generator)` with the same seed; save off/on (PNG, or GIF for
    videos) and a side-by-side compare.png in `out`. Returns (files, (seconds off, seconds on))."""
    import torch

    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        t0 = time.perf_counter()
        off = _frames(stock(_generator(seed)))
        t_off = time.perf_counter() - t0
        t0 = time.perf_counter()
        on = _frames(method(_generator(seed)))
        t_on = time.perf_counter() - t0
    files = {"off": _save(off, out / "off"), "on": _save(on, out / "on")}
    side_by_side(off[len(off) // 2], on[len(on) // 2], labels).save(out / "compare.png")
    files["compare"] = "compare.png"
    return files, (round(t_off, 3), round(t_on, 3))


def cmd_entropy(args) -> dict:

    from .pipelines.entropy import entropy_scaling
    from .processors.host_diffusers import denoisers_of, geometry_of

    pipe = load_pipeline(args.model, args.device)
    geometry = geometry_of(denoisers_of(pipe)[0], pipe)
    height = args.height or geometry.native_size[1] * 2
    width = args.width or geometry.native_size[2] * 2
    call = _pipe_call(args, geometry.family, height, width)
    used = []

    def scaled(generator):
        with entropy_scaling(pipe, strength=args.strength, train_size=args.train_size,
                             token_count=args.token_count) as session:
            used.append(session.effects[0])
            return pipe(**call, generator=generator)

    files, (t_off, t_on) = _off_on(lambda g: pipe(**call, generator=g), scaled, args.seed, Path(args.out),
                                   ("stock", f"entropy scaling (s={args.strength})"))
    effect = used[0]
    report = {
        "method": "entropy_scaling",
        "model": args.model,
        "family": geometry.family,
        "native_size": list(geometry.native_size),
        "call": dict(call),
        "seed": args.seed,
        "effect": {"strength": args.strength, "train_size": args.train_size, "token_count": args.token_count},
        "lambda_per_layer": dict(sorted(effect.last_lambda.items())),
        "seconds": {"stock": t_off, "entropy_scaling": t_on},
        "files": files,
    }
    (Path(args.out) / "params.json").write_text(json.dumps(report, indent=2))
    return report


def _row(panels, labels, min_size: int = 256):
    """Captioned panels side by side; small images are enlarged (nearest)."""
    from PIL import Image, ImageDraw

    panels = [p.convert("RGB") for p in panels]
    factor = max(1, -(-min_size // max(panels[0].size)))
    panels = [p.resize((p.width * factor, p.height * factor), Image.NEAREST) for p in panels]
    w, h = panels[0].size
    pad = 18
    canvas = Image.new("RGB", (len(panels) * w, h + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (panel, text) in enumerate(zip(panels, labels)):
        canvas.paste(panel.resize((w, h), Image.NEAREST), (i * w, pad))
        draw.text((i * w + 4, 3), text, fill="black")
    return canvas


def _native_size(pipe, model: str):
    """(height, width) the pipeline was made for: the tiny model's default, else the denoiser's native size."""
    from .processors.host_diffusers import denoisers_of, geometry_of

    geometry = geometry_of(denoisers_of(pipe)[0], pipe)
    return geometry, (geometry.native_size[1], geometry.native_size[2])


def default_heads(pipe) -> str:
    """A sensible SoftPAG head set when none is given: the UNet mid block ('m0') for SD1.5/SDXL, else every head
    of the middle perturbable (self/joint/single) layer."""
    from .processors.host_diffusers.model_info import attention_sites, family_of
    from .processors.host_diffusers.session import denoiser_names

    denoiser = getattr(pipe, denoiser_names(pipe)[0])
    family = family_of(denoiser)
    sites = [spec.site for spec in attention_sites(denoiser)]
    if family == "unet":
        if any(s.name.startswith("mid_block") and s.kind == "self" for s in sites):
            return "m0"
    layers = sorted({s.layer for s in sites if s.kind in ("joint", "single") or (s.kind == "self" and family != "sd3")})
    if not layers:
        raise ValueError(f"{type(pipe).__name__}: no self/joint attention layers SoftPAG can perturb")
    return f"L{layers[len(layers) // 2]}:*"


def cmd_softpag(args) -> dict:

    from .pipelines.softpag import SoftPAGPipeline

    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if args.heads is not None and not args.heads.strip():
        raise ValueError("--heads: empty head set; give e.g. 'L1:*', 'L7:H3,H5; L9:*' or UNet blocks like 'm0'")
    pipe = load_pipeline(args.model, args.device)
    geometry, native = _native_size(pipe, args.model)
    heads = args.heads
    if heads is None and args.preset is None:
        heads = default_heads(pipe)
    # build (and validate heads/layers against the model) before any generation
    pag = SoftPAGPipeline.from_pipe(pipe, heads=heads, scale=args.scale, u=args.u, preset=args.preset,
                                    target=args.target, joint=args.joint)
    resolved = str(pag.effect.resolved_heads)  # UNet block refs as global layers
    height = args.height or native[0]
    width = args.width or native[1]
    call = _pipe_call(args, geometry.family, height, width)
    scale = pag.schedule.scale
    files, (t_off, t_on) = _off_on(lambda g: pipe(**call, generator=g), lambda g: pag(**call, generator=g), args.seed,
                                   Path(args.out), ("stock", f"SoftPAG (w={scale:g}, u={pag.effect.u:g}, {pag.effect.target})"))
    report = {
        "method": "softpag",
        "model": args.model,
        "family": geometry.family,
        "native_size": list(geometry.native_size),
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


def centred_mask(width: int, height: int):
    """A white (= remove) centred rectangle of half the width and half the height (1/4 of the area)."""
    from PIL import Image, ImageDraw

    mask = Image.new("L", (width, height), 0)
    x0, y0 = width // 4, height // 4
    ImageDraw.Draw(mask).rectangle((x0, y0, x0 + width // 2 - 1, y0 + height // 2 - 1), fill=255)
    return mask


def _mask_overlay(image, mask):
    """The image with the object mask tinted red."""
    from PIL import Image

    image = image.convert("RGB")
    red = Image.new("RGB", image.size, (255, 0, 0))
    alpha = mask.convert("L").resize(image.size, Image.NEAREST).point(lambda v: 110 if v >= 128 else 0)
    return Image.composite(red, image, alpha)


def _open_image(path: str, what: str, mode: str):
    from PIL import Image, UnidentifiedImageError

    if not Path(path).is_file():
        raise ValueError(f"{what} {path}: no such file")
    try:
        with Image.open(path) as img:
            return img.convert(mode)
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{what} {path}: not a readable image ({err})") from None


def cmd_eraser(args) -> dict:
    import math

    import torch

    from .pipelines.eraser import AttentiveEraserPipeline

    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if args.mode == "sip" and not 0.0 < args.strength <= 1.0:
        raise ValueError(f"--strength must be in (0, 1], got {args.strength}")
    if args.ss_steps < 0:
        raise ValueError(f"--ss-steps must be >= 0, got {args.ss_steps}")
    if not math.isfinite(args.scale) or args.scale < 0:
        raise ValueError(f"--scale must be a finite number >= 0, got {args.scale}")
    image = _open_image(args.image, "--image", "RGB") if args.image else None
    user_mask = _open_image(args.mask, "--mask", "L") if args.mask else None
    pipe = load_pipeline(args.model, args.device)
    geometry, native = _native_size(pipe, args.model)
    options = dict(ss_scale=args.ss_scale, ss_steps=args.ss_steps, mode=args.mode)
    # build (and validate against the model) before any generation
    try:
        eraser = AttentiveEraserPipeline.from_pipe(pipe, sarg_scale=args.scale, **options)
    except NotImplementedError as err:
        raise ValueError(str(err)) from None
    plain = AttentiveEraserPipeline.from_pipe(pipe, sarg_scale=0.0, **options)
    extras = _tiny_extras(args.model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seconds = {}
    with torch.no_grad():
        if image is None:
            height = args.height or native[0]
            width = args.width or native[1]
            call = dict(prompt=args.prompt, height=height, width=width, num_inference_steps=args.steps,
                        guidance_scale=args.guidance, **extras)
            t0 = time.perf_counter()
            image = _frames(pipe(**call, generator=_generator(args.seed)))[0].convert("RGB")
            seconds["input"] = round(time.perf_counter() - t0, 3)
        elif args.height or args.width:
            image = image.resize((args.width or image.width, args.height or image.height))
        mask = user_mask if user_mask is not None else centred_mask(image.width, image.height)
        erase = dict(prompt=args.eraser_prompt, num_inference_steps=args.steps, composite=args.composite,
                     strength=None if args.mode == "dip" else args.strength, **extras)
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
    import numpy as np
    from PIL import Image

    a = np.asarray(plain_img.convert("RGB"), dtype=np.float32)
    b = np.asarray(erased_img.convert("RGB"), dtype=np.float32)
    diff = np.abs(a - b).mean(-1)
    gain = 255.0 / max(float(diff.max()), 1e-6)
    diff_img = Image.fromarray((diff * gain).clip(0, 255).astype("uint8"))
    _row([_mask_overlay(image, mask), plain_img, erased_img, diff_img],
         ["input + mask", "plain SIP (s=0)" if args.mode == "sip" else "plain DIP (s=0)", f"erased (s={args.scale:g})",
          f"|difference| x{gain:.0f}" if float(diff.max()) > 0 else "identical"]).save(out / "compare.png")
    files = {"input": "input.png", "mask": "mask.png", "plain": "plain.png", "erased": "erased.png",
             "compare": "compare.png"}
    report = {
        "method": "attentive_eraser",
        "model": args.model,
        "family": geometry.family,
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

    pipe = load_pipeline(args.model, args.device)
    options = dict(sigmas=tuple(_float_list(args.noise, "--noise")), seed=args.seed, map_mode=args.map_mode,
                   gas_mode=args.gas_mode, caption=args.caption,
                   caption_mode="caption+expr" if args.caption.strip() else "expr", threshold=args.threshold,
                   filter_stopwords=not args.keep_stopwords, blur=args.blur)
    if args.layers:
        options["layers"] = _int_list(args.layers, "--layers")
    if args.magnets is not None:
        options["magnets"] = tuple(args.magnets.split())
    seg = RefAMPipeline.from_pipe(pipe, **options)
    call = {k: v for k, v in _tiny_extras(args.model).items() if k == "max_sequence_length"}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.eval:
        from .toyworld.refam_eval import evaluate, markdown

        size = args.size or 64

        def progress(done, total):
            print(f"\r  {done}/{total} segmentations", end="", file=sys.stderr, flush=True)

        t0 = time.perf_counter()
        rows = evaluate(seg, scenes=args.eval, size=size, progress=progress, **call)
        print(file=sys.stderr)
        (out / "eval.md").write_text(markdown(rows) + "\n")
        report = {"method": "refam", "model": args.model, "family": seg.family, "eval": rows,
                  "seconds": {"eval": round(time.perf_counter() - t0, 1)}, "files": {"table": "eval.md"},
                  "options": {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}}
        (out / "params.json").write_text(json.dumps(report, indent=2))
        return report
    if args.image:
        image = _open_image(args.image, "--image", "RGB")
        expression = args.expression or ""
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
    _row([image, result.overlay, mask.convert("RGB")], ["input", f"heatmap: {expression}", "mask"]).save(out / "compare.png")
    report = {
        "method": "refam", "model": args.model, "family": seg.family, "image": args.image or f"toy scene {args.seed}",
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


def _float_list(text: str, what: str) -> list[float]:
    try:
        return [float(x) for x in text.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"{what}: expected numbers separated by commas, got {text!r}") from None


def _read_prompts(values) -> list[str]:
    """--prompts values: a text file (one prompt per line; blank lines and '#' comments skipped) or a prompt."""
    prompts: list[str] = []
    for value in values or []:
        path = Path(value)
        if value.strip() and path.is_file():
            lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
            found = [line for line in lines if line and not line.startswith("#")]
            if not found:
                raise ValueError(f"--prompts {value}: the file has no prompts (one per line)")
            prompts += found
        elif value.strip():
            prompts.append(value.strip())
        else:
            raise ValueError("--prompts: empty prompt; give a prompt text or a file with one prompt per line")
    if not prompts:
        raise ValueError("--prompts: give at least one prompt (repeat --prompts or pass a file)")
    return prompts


def _int_list(text: str, what: str) -> list[int]:
    """'0,1,5' or '0-3' or 'L7-10' -> integers."""
    out: list[int] = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        part = part.lstrip("Ll")
        lo, dash, hi = part.partition("-")
        try:
            lo_i, hi_i = int(lo), int(hi) if dash else int(lo)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} {text!r}: expected integers like 0,1,2 or ranges like 0-3") from None
        if hi_i < lo_i or lo_i < 0:
            raise argparse.ArgumentTypeError(f"{what} {text!r}: {part!r} is not a non-negative ascending range")
        out += range(lo_i, hi_i + 1)
    if not out:
        raise argparse.ArgumentTypeError(f"{what} {text!r}: empty list")
    return out


def cmd_headhunter(args) -> dict:
    from .pipelines.headhunter import check_seeds, check_settings, load_objective, run_headhunter

    prompts = _read_prompts(args.prompts or [DEFAULT_HEADHUNTER_PROMPT])
    seeds = check_seeds(args.seeds)
    if args.top_k < 1:
        raise ValueError(f"--top-k must be >= 1 (heads added per round), got {args.top_k}")
    if args.rounds < 1:
        raise ValueError(f"--rounds must be >= 1, got {args.rounds}")
    check_settings(args.u, args.scale, args.cfg, args.steps, args.target, args.joint)
    if args.max_candidates is not None and args.max_candidates < 1:
        raise ValueError(f"--max-candidates must be >= 1, got {args.max_candidates}")
    objective = args.objective
    if not objective.startswith("clip:"):
        load_objective(objective)  # fail on a bad name before loading the model
    size = args.size
    frames = args.frames
    if isinstance(size, tuple) and len(size) == 3:
        frames, size = size[0], size[1:]
    if size is None and tiny_family(args.model) is not None:
        from .models.tiny import FAMILIES, default_size

        if tiny_family(args.model) in FAMILIES:
            size = default_size(tiny_family(args.model))
    if args.threads is not None:
        import torch

        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    pipe = load_pipeline(args.model, args.device, args.dtype)
    t_load = time.perf_counter() - t0
    result, files = run_headhunter(
        pipe, prompts, seeds, objective, args.out, top_k=args.top_k, rounds=args.rounds, u=args.u, scale=args.scale,
        cfg=args.cfg, steps=args.steps, size=size, frames=frames, target=args.target, joint=args.joint,
        layers=args.layers, max_candidates=args.max_candidates, restart=args.restart,
        validation=not args.no_validation, progress=not args.quiet, call_kwargs=_tiny_extras(args.model),
        model=args.model)
    out = Path(args.out)
    cost = json.loads(Path(files["preset"]).read_text())["search"]["cost"]
    return {
        "method": "headhunter",
        "model": args.model,
        "heads": str(result.selected),
        "rounds": [{"round": r["round"], "added": [f"L{a}:H{b}" for a, b in r["added"]],
                    "best_score": r["added_scores"][0] if r["added_scores"] else None} for r in result.rounds],
        "validation": {v["label"]: v["score"] for v in result.validation},
        "seconds": {"load": round(t_load, 3), "search": cost["seconds"], "generation": cost["generation_s"],
                    "objective": cost["objective_s"]},
        "generations": cost["generations"],
        "files": {k: str(Path(v).relative_to(out)) for k, v in files.items()},
    }


def _size(text: str):
    parts = [int(p) for p in text.lower().replace("x", ",").split(",") if p.strip()]
    if not parts or len(parts) > 3 or min(parts) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give HEIGHT, HEIGHTxWIDTH or FRAMESxHEIGHTxWIDTH in pixels")
    return parts[0] if len(parts) == 1 else tuple(parts)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnlab", description="Training-free attention methods for diffusion models.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "entropy",
        help="entropy scaling: generate off/on at a resolution other than the model's training size",
        description="Generate the same prompt and seed with the stock model and with attention-entropy scaling "
        "(λ = sqrt(ln N / ln T) per self-attention layer), writing off/on images, a side-by-side "
        "compare.png and params.json (parameters, λ per layer, timings).",
    )
    p.add_argument("--model", default="tiny-sd15",
                   help="tiny-sd15|tiny-sdxl|tiny-sd3|tiny-flux|tiny-pixart|tiny-wan (embedded random-weight "
                        "models, offline) or a local diffusers pipeline folder (default: %(default)s)")
    p.add_argument("--prompt", default="a red circle left of a blue square on a striped green background",
                   help="text prompt (default: %(default)r)")
    p.add_argument("--height", type=int, default=None, help="output height in pixels (default: 2x the native size)")
    p.add_argument("--width", type=int, default=None, help="output width in pixels (default: 2x the native size)")
    p.add_argument("--frames", type=int, default=5, help="video frames for Wan models (default: %(default)s)")
    p.add_argument("--steps", type=int, default=4, help="sampling steps (default: %(default)s)")
    p.add_argument("--guidance", type=float, default=5.0, help="guidance scale (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--strength", type=float, default=1.0,
                   help="exponent multiplier s in λ=(ln N/ln T)^(s/2); 1 = paper, 0 = off, range [0, 4] (default: %(default)s)")
    p.add_argument("--train-size", type=_size, default=None,
                   help="training resolution the model was trained at, e.g. 1024 or 768x1344 (default: the model's native size)")
    p.add_argument("--token-count", choices=["joint", "image"], default="joint",
                   help="for SD3/FLUX joint attention: count all keys (joint) or image keys only (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    p.add_argument("--out", default="out/entropy", help="output folder (default: %(default)s)")
    p.set_defaults(func=cmd_entropy)

    p = sub.add_parser(
        "headhunter",
        help="HeadHunter: search the attention heads whose SoftPAG perturbation most improves an objective",
        description="Greedy head search (HeadHunter, arXiv 2506.10978, Algorithm 1): each round scores every "
        "remaining (layer, head) by the mean objective of images generated with SoftPAG on the selected heads "
        "plus that head, over prompts x seeds, and adds the top-k. Costs prompts*seeds*candidates*rounds "
        "generations. Writes OUT/state.json (resumable: rerun the same command), OUT/headset.json (a SoftPAG "
        "preset) and validation images (baseline without guidance, then after each round).",
    )
    p.add_argument("--model", default="tiny:sd3",
                   help="tiny:sd15|tiny:sdxl|tiny:sd3|tiny:flux|tiny:pixart|tiny:wan (embedded random-weight models, "
                        "offline) or a local diffusers pipeline folder (default: %(default)s)")
    p.add_argument("--objective", default="sharpness",
                   help="sharpness|colorfulness|contrast (built-in, no weights), clip:PATH (local CLIP/PickScore "
                        "folder) or module:function / file.py:function taking (PIL image, prompt) -> float, "
                        "higher is better (default: %(default)s)")
    p.add_argument("--prompts", action="append", metavar="TEXT_OR_FILE",
                   help="a prompt, or a text file with one prompt per line; repeatable (default: one demo prompt)")
    p.add_argument("--seeds", type=lambda t: _int_list(t, "--seeds"), default=[0],
                   help="seeds, e.g. 0,1,2 or 0-4; every prompt is generated with every seed (default: 0)")
    p.add_argument("--top-k", type=int, default=3, help="heads added per round (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=5, help="search rounds (default: %(default)s)")
    p.add_argument("--u", type=float, default=1.0,
                   help="SoftPAG interpolation during the search, (0, 1]; 1 = PAG as the official code "
                        "(default: %(default)s)")
    p.add_argument("--scale", type=float, default=3.0, help="perturbation guidance scale w (default: %(default)s)")
    p.add_argument("--cfg", type=float, default=0.0,
                   help="CFG scale during the search; <= 1 is off, as in the official code (FLUX: true CFG with "
                        "an empty negative prompt) (default: %(default)s)")
    p.add_argument("--steps", type=int, default=20, help="sampling steps (default: %(default)s)")
    p.add_argument("--size", type=_size, default=None,
                   help="HEIGHT, HEIGHTxWIDTH or FRAMESxHEIGHTxWIDTH in pixels (default: the model's own default)")
    p.add_argument("--frames", type=int, default=5, help="video frames for Wan models (default: %(default)s)")
    p.add_argument("--layers", type=lambda t: _int_list(t, "--layers"), default=None,
                   help="search only these layers, e.g. 7-10 or 0,2,5 (global layer indices; default: all)")
    p.add_argument("--max-candidates", type=int, default=None,
                   help="keep only the first N candidate heads (layer-major order, after --layers)")
    p.add_argument("--target", choices=["identity", "uniform", "mean_query"], default="identity",
                   help="SoftPAG target: identity (PAG), uniform (SoftUG), mean_query (SoftSEG) (default: %(default)s)")
    p.add_argument("--joint", choices=["full", "image"], default="full",
                   help="SD3/FLUX: perturb the full joint map (HeadHunter) or image->image only (default: %(default)s)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="model dtype (default: the weights' own)")
    p.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's own); 1 is fastest for the tiny models on a busy machine")
    p.add_argument("--out", default="out/headhunter", help="output folder (default: %(default)s)")
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
    p.add_argument("--model", default="tiny-sd15",
                   help="tiny-sd15|tiny-sdxl|tiny-sd3|tiny-flux|tiny-pixart|tiny-wan (embedded random-weight "
                        "models, offline) or a local diffusers pipeline folder (default: %(default)s)")
    p.add_argument("--prompt", default=DEFAULT_HEADHUNTER_PROMPT, help="text prompt (default: %(default)r)")
    p.add_argument("--heads", default=None,
                   help="head set: layers and heads 'L7:H3,H5; L9:*' (global self/joint layer indices) or UNet blocks "
                        "'d2.1-3, m0, u0' (default: the preset's, else the UNet mid block 'm0' for SD1.5/SDXL, or "
                        "all heads of the middle self/joint layer for DiTs)")
    p.add_argument("--preset", default=None,
                   help="a shipped SoftPAG preset name (e.g. sd3-medium-layers-7-10) or a preset JSON path (e.g. "
                        "HeadHunter's headset.json); --heads/--scale/--u/--target/--joint override it (default: none)")
    p.add_argument("--scale", type=float, default=None,
                   help="perturbation guidance scale w; 0 = off (default: the preset's, else 3.0)")
    p.add_argument("--u", type=float, default=None,
                   help="interpolation toward the target, (0, 1]; 1 = full PAG-style replacement "
                        "(default: the preset's, else 1.0)")
    p.add_argument("--target", choices=["identity", "uniform", "mean_query"], default=None,
                   help="SoftPAG target: identity (PAG), uniform (SoftUG), mean_query (SoftSEG) "
                        "(default: the preset's, else identity)")
    p.add_argument("--joint", choices=["full", "image"], default=None,
                   help="SD3/FLUX: perturb the full joint map or image->image only (default: the preset's, else full)")
    p.add_argument("--guidance", type=float, default=5.0,
                   help="classifier-free guidance scale of the pipeline; <= 1 is off (default: %(default)s)")
    p.add_argument("--steps", type=int, default=4, help="sampling steps (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed, the same for off and on (default: %(default)s)")
    p.add_argument("--height", type=int, default=None, help="output height in pixels (default: the native size)")
    p.add_argument("--width", type=int, default=None, help="output width in pixels (default: the native size)")
    p.add_argument("--frames", type=int, default=5, help="video frames for Wan models (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    p.add_argument("--out", default="out/softpag", help="output folder (default: %(default)s)")
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
    p.add_argument("--model", default="tiny-sd15",
                   help="tiny-sd15|tiny-sdxl (embedded random-weight UNet models, offline) or a local SD1.x/2.x/SDXL "
                        "diffusers folder; tiny-sd3|tiny-flux or SD3/FLUX folders are experimental (SIP only) "
                        "(default: %(default)s)")
    p.add_argument("--image", default=None,
                   help="input image file (default: generate one with the pipeline from --prompt)")
    p.add_argument("--mask", default=None,
                   help="mask image file, white = remove, resized to the image (default: a centred rectangle "
                        "covering 1/4 of the image)")
    p.add_argument("--prompt", default=DEFAULT_HEADHUNTER_PROMPT,
                   help="prompt used to generate the input image when --image is not given (default: %(default)r)")
    p.add_argument("--eraser-prompt", default="",
                   help="prompt of the removal run; empty as in the official code (default: %(default)r)")
    p.add_argument("--scale", type=float, default=9.0,
                   help="SARG scale s; 0 = plain SIP, 1 = pure AAS sampling (default: %(default)s)")
    p.add_argument("--ss-scale", type=float, default=0.3,
                   help="similarity suppression scale of AAS (default: %(default)s)")
    p.add_argument("--ss-steps", type=int, default=9,
                   help="similarity suppression for the first ss_steps + 1 executed steps (default: %(default)s)")
    p.add_argument("--strength", type=float, default=0.8,
                   help="SIP img2img strength, (0, 1]; DIP always uses 1 (default: %(default)s)")
    p.add_argument("--steps", type=int, default=50,
                   help="sampling steps (also for generating the input image) (default: %(default)s)")
    p.add_argument("--mode", choices=["sip", "dip"], default="sip",
                   help="sip: stock inpaint pipeline with known-region replacement (official default); dip: DDIM "
                        "inversion + trajectory replacement (UNet models only) (default: %(default)s)")
    p.add_argument("--guidance", type=float, default=5.0,
                   help="CFG scale for generating the input image; the removal runs without CFG, as in the "
                        "official code (default: %(default)s)")
    p.add_argument("--composite", action="store_true",
                   help="paste the result into the input outside a blurred mask (the official SD scripts' "
                        "post-processing)")
    p.add_argument("--seed", type=int, default=0,
                   help="random seed for the input image and both removal runs (default: %(default)s)")
    p.add_argument("--height", type=int, default=None,
                   help="image height in pixels; a given --image is resized (default: the native size, or the "
                        "image's)")
    p.add_argument("--width", type=int, default=None,
                   help="image width in pixels; a given --image is resized (default: the native size, or the image's)")
    p.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    p.add_argument("--out", default="out/eraser", help="output folder (default: %(default)s)")
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
    p.add_argument("--model", default="tiny-flux",
                   help="tiny-flux|tiny-sd3|tiny-sd15|tiny-sdxl|tiny-wan|tiny-pixart (embedded, offline) or a local "
                        "diffusers folder (default: %(default)s)")
    p.add_argument("--image", default=None, help="image file (default: render a toy-world scene)")
    p.add_argument("--expression", default=None,
                   help="the referring expression (default with a toy scene: its first referring expression)")
    p.add_argument("--caption", default="", help="optional caption put before the expression")
    p.add_argument("--noise", default="0.5", help="noise level(s) in (0, 1), one forward each, e.g. 0.3,0.5,0.7 "
                                                  "(default: %(default)s)")
    p.add_argument("--layers", default=None, help="layers to read, e.g. 10-56 (default: the family default)")
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
    p.add_argument("--blur", type=float, default=1.0, help="heatmap blur in tokens (default: %(default)s)")
    p.add_argument("--size", type=int, default=None, help="toy scene size in pixels (default: 64)")
    p.add_argument("--resize", action="store_true",
                   help="resize an image whose sides are not a multiple of the model's pixels per token")
    p.add_argument("--eval", type=int, default=0, metavar="N",
                   help="evaluate on the referring expressions of N toy-world scenes with ablations instead")
    p.add_argument("--seed", type=int, default=0, help="noise seed and toy scene (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    p.add_argument("--out", default="out/refam", help="output folder (default: %(default)s)")
    p.set_defaults(func=cmd_refam)
    return parser


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
    try:
        report = args.func(args)
    except ValueError as err:
        print(f"attnlab {args.command}: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"attnlab {args.command}: interrupted" + ("; rerun the same command to resume"
                                                        if args.command == "headhunter" else ""), file=sys.stderr)
        return 130
    keys = ("method", "model", "expression", "words", "eval", "heads", "rounds", "validation", "extra_passes", "seconds", "generations", "files")
    print(json.dumps({k: report[k] for k in keys if k in report}, indent=2))
    print(f"wrote {args.out}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
