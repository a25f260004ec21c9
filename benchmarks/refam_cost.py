"""RefAM cost benchmark: one denoiser forward with the text-map recorder installed vs the same forward plain.

(a) The tiny offline pipelines of every family, RefAM's default layer set, one forward at σ = 0.5.
(b) A FLUX-shaped transformer stack at ~1k image tokens: FluxTransformer2DModel with FLUX's head size (128),
    8 heads, 2 double + 6 single blocks (default layers = the last 47/57 → blocks 1–7), a 32×32 token grid
    (512×512 px) and FLUX's 512 T5 text tokens, of which the prompt's words (~15) are the kept columns.
    Variants: plain; recorder img2txt_textsoftmax (default); recorder img2txt_joint (LSE slice, chunked).
Time: variants interleaved round-robin in one process, median over repeats, ratio = variant / plain
(target ≤ 1.25× for the default). Peak memory: each variant in a fresh child process
(`benchmarks/peak_memory.py`), growth of the high-water mark during the forward.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/refam_cost.py           # CPU, writes benchmarks/results/refam_cost.json
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/refam_cost.py --device cuda --out benchmarks/results/refam_cost_cuda.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from peak_memory import peak_of, run_children

ROOT = Path(__file__).resolve().parent.parent
EXPR = "the small red circle on the left of the blue square"
STACK_VARIANTS = ("plain", "textsoftmax", "joint")


def flux_stack(device):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=6,
                                   attention_head_dim=128, num_attention_heads=8, joint_attention_dim=256,
                                   pooled_projection_dim=64, guidance_embeds=False, axes_dims_rope=(16, 56, 56))
    return model.eval().to(device)


def stack_inputs(device, side=32, text=512):
    g = torch.Generator().manual_seed(0)
    img_ids = torch.zeros(side, side, 3)
    img_ids[..., 1] = torch.arange(side)[:, None]
    img_ids[..., 2] = torch.arange(side)[None, :]
    return dict(hidden_states=torch.randn(1, side * side, 64, generator=g).to(device),
                encoder_hidden_states=torch.randn(1, text, 256, generator=g).to(device),
                pooled_projections=torch.randn(1, 64, generator=g).to(device),
                timestep=torch.tensor([0.5], device=device), img_ids=img_ids.reshape(-1, 3).to(device),
                txt_ids=torch.zeros(text, 3, device=device), return_dict=False)


def stack_recorder(variant: str, model, text_len=512):
    from attnlab.models.offline_tokenizers import make_t5_tokenizer
    from attnlab.processors.host_diffusers.model_info import attention_sites
    from attnlab.processors.refam_run import RefAMOptions, Words, recorder_for
    from attnlab.processors.refam_tokens import token_sets

    opts = RefAMOptions(map_mode="img2txt_joint" if variant == "joint" else "img2txt_textsoftmax")
    prompt = opts.prompt(EXPR)
    words = Words.of(prompt, [token_sets(make_t5_tokenizer(text_len), prompt, text_len)])
    sites = [(s.site.layer, s.site.kind) for s in attention_sites(model)]
    return recorder_for(opts, words, "flux", sites, len(model.transformer_blocks))


def stack_forward(variant: str, device: str):
    """A zero-argument function running one forward of the stack in `variant` (session installed once)."""
    from attnlab.processors.host_diffusers.session import Session

    model = flux_stack(device)
    inputs = stack_inputs(device)
    if variant == "plain":
        return lambda: model(**inputs)[0], None, model
    rec = stack_recorder(variant, model)
    session = Session(model, [rec]).install()

    def run():
        rec.clear()
        with session.roles_for("cond"):
            return model(**inputs)[0]

    return run, rec, model


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fns: dict, repeats: int, device: str) -> dict:
    times = {k: [] for k in fns}
    with torch.no_grad():
        for fn in fns.values():
            fn()
        for _ in range(repeats):
            for k, fn in fns.items():
                sync(device)
                t0 = time.perf_counter()
                fn()
                sync(device)
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def tiny_rows(repeats: int) -> list[dict]:
    from attnlab.models.tiny import FAMILIES, build_tiny_pipeline
    from attnlab.pipelines.refam import RefAMPipeline
    from attnlab.processors.host_diffusers.session import Session
    from attnlab.toyworld.scenes import render, sample_scene

    rows = []
    for family in FAMILIES:
        seg = RefAMPipeline.from_pipe(build_tiny_pipeline(family))
        img = render(sample_scene(1), 64)
        prep = seg.prepare([img] * 5 if family == "wan" else img, EXPR, seg.options, max_sequence_length=64)
        plain = lambda: seg._forward(prep.z0, prep.noise, 0.5, prep.text)  # noqa: E731
        session = Session(seg.denoiser, [prep.recorder], vae_scale=seg.vae_scale).install()
        try:
            def recorded():
                with session.roles_for("cond"):
                    return seg._forward(prep.z0, prep.noise, 0.5, prep.text)

            session.remove()
            t_plain = timed({"plain": plain}, repeats, "cpu")["plain"]
            session.install()
            t_rec = timed({"recorded": recorded}, repeats, "cpu")["recorded"]
        finally:
            if session.installed:
                session.remove()
        rows.append({"family": family, "layers": len(prep.recorder.layers), "plain_ms": round(t_plain * 1e3, 2),
                     "recorded_ms": round(t_rec * 1e3, 2), "ratio": round(t_rec / t_plain, 3)})
    return rows


def child(variant: str, device: str) -> None:
    fn, rec, _ = stack_forward(variant, device)
    with torch.no_grad():
        fn()  # warm-up (allocator, kernels)
        row = peak_of(fn, device)
    row["variant"] = variant
    if rec is not None:
        row["kept_maps_mib"] = round(sum(m.numel() * m.element_size() for m in rec.maps.values()) / 2**20, 3)
    print(json.dumps(row))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (default 1, for stable timings)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "refam_cost.json"))
    ap.add_argument("--_memory-child", dest="memory_child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        child(args.memory_child, args.device)
        return
    fns = {}
    for v in STACK_VARIANTS:
        fns[v] = stack_forward(v, args.device)[0]
    t = timed(fns, args.repeats, args.device)
    stack = {v: {"ms": round(t[v] * 1e3, 1), "ratio": round(t[v] / t["plain"], 3)} for v in STACK_VARIANTS}
    memory = run_children(__file__, STACK_VARIANTS, ["--device", args.device, "--threads", str(args.threads)],
                          str(ROOT / "benchmarks"))
    tiny = tiny_rows(args.repeats) if args.device == "cpu" else []
    result = {"machine": platform.processor() or platform.machine(), "device": args.device, "threads": args.threads,
              "torch": torch.__version__, "repeats": args.repeats,
              "flux_stack": {"image_tokens": 1024, "text_tokens": 512, "heads": 8, "head_dim": 128,
                             "blocks": "2 double + 6 single", "time": stack, "memory": memory},
              "tiny": tiny}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(ROOT.parent))
    main()
