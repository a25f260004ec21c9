"""Where a toy model loses object shapes: two probes on validation scenes (never trained on, not the evaluation's).

    python -m attnlab.toyworld.diagnose --model sd [--n 40] [--json out.json]

* **shape words:** one-object scenes, each prompted four times with only the shape word changed (colour, size,
  position, background and the generator seed kept): the confusion matrix prompted shape → parsed shape, and
  the mean absolute pixel change when only the shape word changes against when only the seed changes. A
  model that ignores shape words draws the same picture for all four prompts (ratio near 0).
* **SDEdit:** the same scenes rendered clean, encoded, noised to strength s and denoised with their caption
  (diffusers' img2img pipeline on the same components): colour + shape found against s, at the default guidance
  and without guidance. Shapes kept at low s and lost at high s are lost while the layout forms, not by the
  decoder or the last steps.
* **attention (SD architecture):** the clean render's latent noised to one timestep, one UNet forward with the
  caption: the share of the object pixels' cross-attention (softmax over the text tokens, heads averaged) on
  the colour word, the shape word, the size word, the background words and the end token, per layer. It tells
  whether the shape word reaches the object at all.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from .parser import adherence, parse
from .scenes import SHAPES, Scene, caption, render, sample_scene

VALIDATION_SEEDS = 500_000
STRENGTHS = (0.1, 0.3, 0.5, 0.7, 1.0)
WORD_ROLES = ("colour", "shape", "size", "background words", "end token", "other")


def with_shape(scene: Scene, shape: str) -> Scene:
    return dataclasses.replace(scene, objects=(dataclasses.replace(scene.objects[0], shape=shape),))


def _generate(pipe, prompts, seeds, call_kwargs) -> list:
    import torch

    return pipe(prompts, generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="pil",
                **call_kwargs).images


def _pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im, np.float32) for im in images])


def shape_words(pipe, scenes, call_kwargs, log=print) -> dict:
    """Confusion prompted → parsed shape (None: no object of the prompted colour found) and pixel changes."""
    confusion = {p: {r: 0 for r in (*SHAPES, "none")} for p in SHAPES}
    per_scene = []
    for i, scene in enumerate(scenes):
        variants = [with_shape(scene, s) for s in SHAPES]
        images = _generate(pipe, [caption(v) for v in variants], [scene.seed] * 4, call_kwargs)
        for shape, variant, image in zip(SHAPES, variants, images):
            colour = variant.objects[0].colour
            found = [o.shape for o in parse(image).objects if o.colour == colour]
            read = shape if shape in found else (max(set(found), key=found.count) if found else "none")
            confusion[shape][read] += 1
        per_scene.append(_pixels(images))
        if (i + 1) % 10 == 0:
            log(f"  shape words: {i + 1}/{len(scenes)} scenes")
    stack = np.stack(per_scene)  # scenes × 4 shapes × H × W × 3
    word_change = float(np.mean([np.abs(stack[:, a] - stack[:, b]).mean()
                                 for a in range(4) for b in range(a + 1, 4)]))
    seed_change = float(np.abs(stack[1:, 0] - stack[:-1, 0]).mean())  # neighbouring scenes: new seed and scene
    hits = sum(confusion[s][s] for s in SHAPES)
    return {"confusion": confusion, "shape_read_as_prompted": hits / (4 * len(scenes)),
            "pixel_change_shape_word": word_change, "pixel_change_other_scene": seed_change}


def sdedit(pipe, scenes, call_kwargs, strengths=STRENGTHS, log=print) -> dict:
    """Colour + shape found after img2img from the clean render at each strength (keys: str(strength))."""
    import torch
    from diffusers import AutoPipelineForImage2Image

    i2i = AutoPipelineForImage2Image.from_pipe(pipe)
    i2i.set_progress_bar_config(disable=True)
    kw = {k: v for k, v in call_kwargs.items() if k not in ("height", "width")}
    renders = [render(s, pipe_size(call_kwargs)) for s in scenes]
    out = {}
    for strength in strengths:
        images = i2i([caption(s) for s in scenes], image=renders, strength=strength, output_type="pil",
                     generator=[torch.Generator().manual_seed(s.seed) for s in scenes], **kw).images
        found = [adherence(parse(im), s)["objects"][0] for im, s in zip(images, scenes)]
        out[str(strength)] = float(np.mean(found))
        log(f"  sdedit strength {strength}: colour + shape {out[str(strength)]:.1%}")
    return out


def pipe_size(call_kwargs) -> int:
    return int(call_kwargs.get("height", 48))


def _word_roles(tokens: list[str], obj) -> list[str]:
    roles, in_background = [], False
    for j, token in enumerate(tokens):
        word = token.replace("</w>", "")
        in_background = in_background or word == "on"
        roles.append("end token" if token == "<|endoftext|>" else "colour" if word == obj.colour and not in_background
                     else "shape" if word == obj.shape else "size" if word == obj.size
                     else "background words" if in_background else "other")
    return roles


def cross_attention_shares(pipe, scenes, timestep: int = 500) -> dict:
    """{layer: {role: mean share}} of the object pixels' cross-attention over the caption's words (UNet only)."""
    import torch
    import torch.nn.functional as F

    from .scenes import ground_truth

    if not hasattr(pipe, "unet"):
        raise ValueError("the attention probe reads a UNet's cross-attention (SD architecture)")
    captured, handles = {}, []

    def hook(name):
        def record(module, args, kwargs, _out):
            hidden = args[0] if args else kwargs["hidden_states"]
            q, k = module.to_q(hidden), module.to_k(kwargs["encoder_hidden_states"])
            b, n, c = q.shape
            q = q.view(b, n, module.heads, -1).transpose(1, 2)
            k = k.view(b, -1, module.heads, c // module.heads).transpose(1, 2)
            captured[name] = (q @ k.transpose(-1, -2) * (c // module.heads) ** -0.5).softmax(-1).mean(1)
        return record

    for name, module in pipe.unet.named_modules():
        if name.endswith("attn2"):
            handles.append(module.register_forward_hook(hook(name), with_kwargs=True))
    shares: dict = {}
    tok = pipe.tokenizer
    try:
        for i, scene in enumerate(scenes):
            ids = tok(caption(scene), padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
            roles = _word_roles(tok.convert_ids_to_tokens(ids[0]), scene.objects[0])
            image = torch.from_numpy(np.asarray(render(scene, 48), np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
            with torch.no_grad():
                latent = pipe.vae.encode(image).latent_dist.mean * pipe.vae.config.scaling_factor
                noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(i))
                t = torch.tensor([timestep])
                pipe.unet(pipe.scheduler.add_noise(latent, noise, t), t,
                          encoder_hidden_states=pipe.text_encoder(ids)[0])
            mask = torch.from_numpy(ground_truth(scene, 48)[0]["mask"].astype(np.float32))[None, None]
            for name, attn in captured.items():
                side = int(round(attn.shape[1] ** 0.5))
                inside = F.adaptive_avg_pool2d(mask, side).flatten() > 0.5
                if not inside.any():
                    continue
                share = attn[0][inside].mean(0)
                per_role = shares.setdefault(name, {r: [] for r in WORD_ROLES})
                for r in WORD_ROLES:
                    per_role[r].append(float(sum(share[j] for j, role in enumerate(roles) if role == r)))
    finally:
        for h in handles:
            h.remove()
    return {name: {r: float(np.mean(v)) for r, v in per_role.items()} for name, per_role in shares.items()}


def diagnose(pipe, call_kwargs, n: int = 40, seed_base: int = VALIDATION_SEEDS, log=print) -> dict:
    scenes = [sample_scene(seed_base + i, n_objects=1) for i in range(n)]
    t0 = time.time()
    res = {"n": n, "seed_base": seed_base, "call_kwargs": dict(call_kwargs),
           "shape_words": shape_words(pipe, scenes, call_kwargs, log),
           "sdedit": sdedit(pipe, scenes, call_kwargs, log=log),
           "sdedit_no_guidance": sdedit(pipe, scenes, {**call_kwargs, "guidance_scale": 1.0}, log=log)}
    if hasattr(pipe, "unet"):
        res["attention_t500"] = cross_attention_shares(pipe, scenes, 500)
    res["wall_s"] = round(time.time() - t0, 1)
    return res


def format_report(res: dict) -> str:
    sw = res["shape_words"]
    lines = [f"shape words ({res['n']} scenes × 4): read as prompted {sw['shape_read_as_prompted']:.1%}; mean pixel "
             f"change when only the shape word changes {sw['pixel_change_shape_word']:.1f}, between scenes "
             f"{sw['pixel_change_other_scene']:.1f}",
             "prompted \\ read: " + " ".join(f"{r:>8}" for r in (*SHAPES, "none"))]
    for p in SHAPES:
        lines.append(f"{p:>16}: " + " ".join(f"{sw['confusion'][p][r]:>8}" for r in (*SHAPES, "none")))
    for key, label in (("sdedit", "default guidance"), ("sdedit_no_guidance", "no guidance")):
        lines.append(f"SDEdit from clean renders ({label}), colour + shape found: "
                     + ", ".join(f"s={s} {v:.1%}" for s, v in res[key].items()))
    if "attention_t500" in res:
        lines.append("object pixels' cross-attention at t=500, share per word: " + " ".join(f"{r:>17}" for r in WORD_ROLES))
        for name, per_role in res["attention_t500"].items():
            lines.append(f"{name.replace('.transformer_blocks.0.attn2', ''):>56}: "
                         + " ".join(f"{per_role[r]:17.3f}" for r in WORD_ROLES))
    return "\n".join(lines)


def main(argv=None) -> None:
    import torch

    from .models import load_toy_pipeline, toy_call_kwargs

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="sd", help="sd, flux, or a pipeline folder")
    ap.add_argument("--arch", choices=("sd", "flux"), default=None, help="the architecture of a folder (default: sd)")
    ap.add_argument("--n", type=int, default=40, help="one-object validation scenes")
    ap.add_argument("--seed-base", type=int, default=VALIDATION_SEEDS)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.n < 2:
        ap.error("--n must be at least 2")
    torch.set_num_threads(args.threads)
    folder = Path(args.model)
    arch = args.arch or ("flux" if args.model == "flux" else "sd")
    pipe = load_toy_pipeline(arch, path=folder if folder.is_dir() else None)
    pipe.set_progress_bar_config(disable=True)
    res = diagnose(pipe, toy_call_kwargs(arch), n=args.n, seed_base=args.seed_base)
    res["model"] = args.model
    print(format_report(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
