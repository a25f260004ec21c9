"""`attnlab` command line: one subcommand per method, writing PNG files plus a JSON of the parameters.

    attnlab entropy --height 128 --width 128          # embedded tiny model, off/on side by side
    attnlab entropy --model /path/to/diffusers/folder --height 2048 --width 2048 --prompt "..."
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

TINY_PREFIX = "tiny-"


def load_pipeline(model: str, device: str = "cpu"):
    """`tiny-<family>` builds an embedded random-weight tiny pipeline offline; anything else is a local
    diffusers folder (or a hub id when the machine has internet)."""
    if model.startswith(TINY_PREFIX):
        from .models.tiny import FAMILIES, build_tiny_pipeline

        family = model[len(TINY_PREFIX):]
        if family not in FAMILIES:
            raise SystemExit(f"--model {model!r}: unknown tiny model; choose one of " + ", ".join(TINY_PREFIX + f for f in FAMILIES))
        pipe = build_tiny_pipeline(family)
    else:
        from diffusers import DiffusionPipeline

        local = Path(model).is_dir()
        pipe = DiffusionPipeline.from_pretrained(model, local_files_only=local)
    pipe.set_progress_bar_config(disable=False, desc="sampling")
    return pipe.to(device)


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
    if args.model.startswith(TINY_PREFIX):
        from .models.tiny import tiny_call_kwargs

        fixed = tiny_call_kwargs(args.model[len(TINY_PREFIX):])
        call.update({k: v for k, v in fixed.items() if k in ("max_sequence_length", "use_resolution_binning", "clean_caption")})
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
    return parser


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    try:
        report = args.func(args)
    except ValueError as err:
        print(f"attnlab {args.command}: {err}", file=sys.stderr)
        return 2
    print(json.dumps({k: report[k] for k in ("method", "model", "seconds", "files")}, indent=2))
    print(f"wrote {args.out}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
