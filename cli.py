"""`attnlab` command line: one subcommand per method, writing PNG files plus a JSON of the parameters.

    attnlab entropy --height 128 --width 128          # embedded tiny model, off/on side by side
    attnlab entropy --model /path/to/diffusers/folder --height 2048 --width 2048 --prompt "..."
    attnlab headhunter --model tiny:sd3 --objective sharpness --prompts prompts.txt --seeds 0,1 --out out/hh
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
    """`tiny-<family>` / `tiny:<family>` builds an embedded random-weight tiny pipeline offline; anything
    else is a local diffusers folder (or a hub id when the machine has internet). `dtype`: a torch dtype
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


def cmd_entropy(args) -> dict:
    import torch

    from .pipelines.entropy import entropy_scaling
    from .processors.host_diffusers import denoisers_of, geometry_of

    pipe = load_pipeline(args.model, args.device)
    geometry = geometry_of(denoisers_of(pipe)[0], pipe)
    height = args.height or geometry.native_size[1] * 2
    width = args.width or geometry.native_size[2] * 2
    call = dict(prompt=args.prompt, height=height, width=width, num_inference_steps=args.steps,
                guidance_scale=args.guidance)
    if geometry.family == "wan":
        call["num_frames"] = args.frames
    call.update(_tiny_extras(args.model))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        t0 = time.perf_counter()
        off = _frames(pipe(**call, generator=_generator(args.seed)))
        t_off = time.perf_counter() - t0
        with entropy_scaling(pipe, strength=args.strength, train_size=args.train_size, token_count=args.token_count) as session:
            effect = session.effects[0]
            t0 = time.perf_counter()
            on = _frames(pipe(**call, generator=_generator(args.seed)))
            t_on = time.perf_counter() - t0
    files = {"off": _save(off, out / "off"), "on": _save(on, out / "on")}
    side_by_side(off[len(off) // 2], on[len(on) // 2], ("stock", f"entropy scaling (s={args.strength})")).save(out / "compare.png")
    files["compare"] = "compare.png"
    report = {
        "method": "entropy_scaling",
        "model": args.model,
        "family": geometry.family,
        "native_size": list(geometry.native_size),
        "call": dict(call),
        "seed": args.seed,
        "effect": {"strength": args.strength, "train_size": args.train_size, "token_count": args.token_count},
        "lambda_per_layer": dict(sorted(effect.last_lambda.items())),
        "seconds": {"stock": round(t_off, 3), "entropy_scaling": round(t_on, 3)},
        "files": files,
    }
    (out / "params.json").write_text(json.dumps(report, indent=2))
    return report


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
    return parser


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
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
    keys = ("method", "model", "heads", "rounds", "validation", "seconds", "generations", "files")
    print(json.dumps({k: report[k] for k in keys if k in report}, indent=2))
    print(f"wrote {args.out}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
