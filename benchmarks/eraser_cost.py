"""Attentive Eraser cost benchmark: one redirected attention call vs plain SDPA (time), and the explicit-map
official implementation's peak memory vs ours.

Shapes follow SDXL's 64² level at 1024 px: B = 2 rows ("cond" + "redirected"), H = 10 heads, N = 4096 tokens
(a 64×64 grid), D = 64, fp32, similarity suppression active (step 0). The object is a centred rectangle
covering ~10 % and ~40 % of the tokens.

(a) Time. Variants, timed interleaved round-robin in one process (wall clock, median and min over repeats):
    sdpa       the host kernel alone on the whole call (baseline)
    gather     attnlab's AttentiveEraser, default kernel: the redirected row attends the gathered background
               keys (no mask, fast kernels stay usable); the plain row is plain SDPA
    bias       attnlab's AttentiveEraser, kernel="bias": a 0/−∞ key bias on the redirected row
Ratio = variant / sdpa. Target ≤ 1.05×. Gather drops the object keys, so with a large object the redirected
row does *less* work than plain attention and the ratio goes below 1; bias pays for the masked SDPA path.

(c) A whole SIP run with AAS + SARG vs plain SIP (the same stock inpaint pipeline, s = 0) on the tiny models:
    the cost of the extra redirected pass per step; target ≤ 2.1×.

(b) Peak memory of the same call (10 % object), each variant in its own subprocess:
    sdpa, gather, bias   as above
    official   the official code path (AAS_utils.py forward replacement + AAS.py attn_batch): explicit
               sim = q·kᵀ·scale and softmax(sim) for the whole batch, then for the AAS row sim_fg = λ·sim + bias,
               sim_bg = sim + bias, two softmaxes, two map·V products, row blend by the object mask
The peak is measured by `benchmarks/peak_memory.py` over the level after q/k/v were allocated and the code
path warmed on a tiny call (CPU: resident-set high-water mark; CUDA: `torch.cuda.max_memory_allocated()`). The size of one N×N fp32 map per head of one row is reported alongside.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/eraser_cost.py            # CPU, writes benchmarks/results/eraser_cost.json
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/eraser_cost.py --device cuda --out benchmarks/results/eraser_cost_cuda.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from peak_memory import mark_same_result, peak_of, run_children

ROOT = Path(__file__).resolve().parent.parent

TIME_VARIANTS = ("sdpa", "gather", "bias")
MEMORY_VARIANTS = ("sdpa", "gather", "bias", "official")
SS_SCALE = 0.3


def object_box(side: int, cover: float) -> torch.Tensor:
    """A (1, 1, side·8, side·8) pixel mask whose centred square covers ~`cover` of the side×side tokens."""
    px = side * 8
    half = round(side * cover ** 0.5 / 2) * 8
    m = torch.zeros(1, 1, px, px)
    c = px // 2
    m[..., c - half:c + half, c - half:c + half] = 1.0
    return m


def make_call(batch, heads, tokens, dim, device, seed=0):
    from attnlab.processors import AttentionCall, Site, StepInfo, TokenLayout

    side = int(round(tokens ** 0.5))
    assert side * side == tokens, "tokens must be a square number (a side×side grid)"
    g = torch.Generator(device="cpu").manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, tokens, dim, generator=g).to(device) for _ in range(3))
    roles = ("cond",) * (batch - 1) + ("redirected",)
    layout = TokenLayout(q_image=slice(0, tokens), k_image=slice(0, tokens), grid=(1, side, side))
    site = Site("unet", "self", 40, "up_blocks.0.attentions.0.transformer_blocks.0.attn1")
    return AttentionCall(q, k, v, site, layout, roles, StepInfo(0, 40, 1.0, 999.0))


def official(call, obj: torch.Tensor, lam: float) -> torch.Tensor:
    """The official explicit-map path (AAS_utils.py forward + AAS.py attn_batch), rows: plain half + AAS half."""
    q, k, v = call.q, call.k, call.v
    scale = q.shape[-1] ** -0.5
    sim = torch.einsum("bhid,bhjd->bhij", q, k) * scale  # the replaced forward: explicit for the whole batch
    attn = sim.softmax(-1)
    out = torch.einsum("bhij,bhjd->bhid", attn, v)
    b = call.batch - 1  # the AAS half
    bias = torch.zeros(obj.shape[-1], dtype=q.dtype, device=q.device).masked_fill(obj, torch.finfo(q.dtype).min)
    sim_fg = sim[b] * lam + bias
    sim_bg = sim[b] + bias
    out_fg = sim_fg.softmax(-1) @ v[b]
    out_bg = sim_bg.softmax(-1) @ v[b]
    m = obj.to(q.dtype)[None, :, None]
    out[b] = out_fg * m + out_bg * (1 - m)
    return out


def variant_fn(variant: str, mask: torch.Tensor):
    from attnlab.processors import EffectStack
    from attnlab.processors.eraser import AttentiveEraser, token_mask
    from attnlab.processors.reference import sdpa_kernel

    if variant == "sdpa":
        return lambda call: sdpa_kernel(call.q, call.k, call.v)
    if variant == "official":
        cache = {}

        def run_official(call):
            grid = call.tokens.grid
            if grid not in cache:
                cache[grid] = token_mask(mask, grid)[0].to(call.q.device)
            return official(call, cache[grid], SS_SCALE)

        return run_official
    effect = AttentiveEraser(mask, ss_scale=SS_SCALE, ss_steps=9, kernel=variant)
    effect.validate()
    from attnlab.processors import Site

    effect.check_sites([(Site("unet", "self", 40, "up_blocks.0.attentions.0.transformer_blocks.0.attn1"), 10)])
    stack = EffectStack([effect])
    return lambda call: stack.run(call, sdpa_kernel)


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# --- (a) time ---------------------------------------------------------------------------------------------
def time_table(args) -> list[dict]:
    from attnlab.processors.eraser import token_mask

    side = int(round(args.tokens ** 0.5))
    call = make_call(args.batch, args.heads, args.tokens, args.dim, args.device)
    rows = []
    for cover in args.covers:
        mask = object_box(side, cover)
        frac = float(token_mask(mask, (1, side, side)).float().mean())
        fns = {v: variant_fn(v, mask) for v in TIME_VARIANTS}
        times = {v: [] for v in TIME_VARIANTS}
        with torch.no_grad():
            for rep in range(args.repeats + 1):  # round 0 warms up
                for v, fn in fns.items():
                    sync(args.device)
                    t0 = time.perf_counter()
                    fn(call)
                    sync(args.device)
                    if rep:
                        times[v].append(time.perf_counter() - t0)
            ref = official(call, token_mask(mask, (1, side, side))[0].to(args.device), SS_SCALE) if args.check else None
            err = {v: float((fns[v](call) - ref).abs().max()) for v in ("gather", "bias")} if ref is not None else {}
        med = {v: statistics.median(t) for v, t in times.items()}
        best = {v: min(t) for v, t in times.items()}
        rows.append({"cover_target": cover, "object_token_fraction": round(frac, 4),
                     "median_s": {v: round(t, 5) for v, t in med.items()},
                     "min_s": {v: round(t, 5) for v, t in best.items()},
                     "ratio_median": {v: round(med[v] / med["sdpa"], 3) for v in TIME_VARIANTS},
                     "ratio_min": {v: round(best[v] / best["sdpa"], 3) for v in TIME_VARIANTS},
                     "max_abs_err_vs_official": err})
    return rows


# --- (b) memory -------------------------------------------------------------------------------------------
def measure_memory(variant: str, args) -> dict:
    """Runs in a fresh process: peak bytes of one call above the level after inputs and warm-up."""
    side = int(round(args.tokens ** 0.5))
    mask = object_box(side, args.memory_cover)
    fn = variant_fn(variant, mask)
    with torch.no_grad():
        fn(make_call(args.batch, args.heads, 64, args.dim, args.device))  # warm the path on an 8×8 grid
        call = make_call(args.batch, args.heads, args.tokens, args.dim, args.device)
        return {"variant": variant, **peak_of(lambda: fn(call), args.device)}

def memory_table(args) -> dict:
    rows = run_children(str(Path(__file__).resolve()), MEMORY_VARIANTS,
                        ["--batch", str(args.batch), "--heads", str(args.heads), "--tokens", str(args.tokens),
                         "--dim", str(args.dim), "--memory-cover", str(args.memory_cover), "--device", args.device,
                         "--threads", str(args.threads)], str(ROOT))
    mark_same_result(rows, "official", [v for v in MEMORY_VARIANTS if v != "sdpa"], "same_result_as_official")
    one_map = args.heads * args.tokens * args.tokens * 4
    return {"batch": args.batch, "heads": args.heads, "tokens": args.tokens, "dim": args.dim,
            "cover_target": args.memory_cover, "theory_map_mib": round(one_map / 2**20, 1),
            "theory_qkv_mib": round(3 * args.batch * args.heads * args.tokens * args.dim * 4 / 2**20, 1),
            "rows": rows}


def sip_table(args) -> list[dict]:
    """(c) A whole SIP run with AAS + SARG vs the same run without (s = 0: the stock inpaint pipeline's
    plain SIP), on the tiny offline models; process CPU seconds, interleaved repeats."""
    from attnlab.models.tiny import build_tiny_pipeline
    from attnlab.pipelines.eraser import AttentiveEraserPipeline

    rows = []
    for family in args.sip_families:
        pipe = build_tiny_pipeline(family)
        size = args.sip_size
        image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
        mask = torch.zeros(size, size)
        mask[size // 4: size // 2, size // 4: 3 * size // 4] = 1.0
        runs = {"plain_sip": AttentiveEraserPipeline.from_pipe(pipe, sarg_scale=0.0),
                "eraser": AttentiveEraserPipeline.from_pipe(pipe, sarg_scale=9.0)}
        times = {k: [] for k in runs}
        for _ in range(args.sip_repeats):
            for name, e in runs.items():
                t0 = time.process_time()
                with torch.no_grad():
                    e(image, mask, num_inference_steps=args.sip_steps, strength=0.8, output_type="latent",
                      generator=torch.Generator().manual_seed(0))
                times[name].append(time.process_time() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append({"family": family, "size": size, "steps": args.sip_steps, "strength": 0.8,
                     "median_s": med, "ratio": med["eraser"] / med["plain_sip"],
                     "extra_passes": runs["eraser"].extra_passes})
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=2, help="rows of the call (the last one is redirected)")
    ap.add_argument("--heads", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=4096, help="a square number (side×side grid)")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--covers", type=float, nargs="*", default=[0.1, 0.4], help="object token fractions to time")
    ap.add_argument("--memory-cover", type=float, default=0.1)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 by default: stable timings on a shared machine)")
    ap.add_argument("--no-check", dest="check", action="store_false", help="skip the error check vs official")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/eraser_cost.json")
    ap.add_argument("--sip-families", nargs="*", default=["sd15", "sdxl"], help="tiny models for (c)")
    ap.add_argument("--sip-size", type=int, default=64)
    ap.add_argument("--sip-steps", type=int, default=10)
    ap.add_argument("--sip-repeats", type=int, default=5)
    ap.add_argument("--_memory-child", dest="child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(measure_memory(args.child, args)))
        return

    memory = None if args.skip_memory else memory_table(args)  # first: children fork from a small parent
    timing = time_table(args)
    sip = sip_table(args) if args.sip_families else []
    report = {
        "command": "HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/eraser_cost.py " + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items() if k not in ("out", "child", "skip_memory", "check"))
            + (" --skip-memory" if args.skip_memory else "") + ("" if args.check else " --no-check"),
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "device": args.device if args.device == "cpu" else torch.cuda.get_device_name()},
        "time_one_call": timing,
        "memory_one_call": memory,
        "sip_run": sip,
    }
    out = ROOT / args.out if not Path(args.out).is_absolute() else Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")

    print(f"(a) one call on {args.device}: B={args.batch} (1 redirected), H={args.heads}, N={args.tokens}, "
          f"D={args.dim}, SS on; wall s median (min), ratio to plain SDPA median (min); target <= 1.05")
    print(f"{'object':>8}{'sdpa s':>16}{'gather s':>18}{'ratio':>16}{'bias s':>18}{'ratio':>16}  max err vs official")
    for r in timing:
        med, best, rm, rn = r["median_s"], r["min_s"], r["ratio_median"], r["ratio_min"]
        err = " ".join(f"{k}={v:.1e}" for k, v in r["max_abs_err_vs_official"].items())
        print(f"{r['object_token_fraction']:>8.1%}{med['sdpa']:>9.4f} ({best['sdpa']:.4f})"
              f"{med['gather']:>10.4f} ({best['gather']:.4f}){rm['gather']:>9.3f} ({rn['gather']:.3f})"
              f"{med['bias']:>10.4f} ({best['bias']:.4f}){rm['bias']:>9.3f} ({rn['bias']:.3f})  {err}")
    if memory:
        m = memory
        print(f"\n(b) peak memory of one call ({m['cover_target']:.0%} object): one fp32 N×N map per head of one row "
              f"= {m['theory_map_mib']} MiB, q+k+v = {m['theory_qkv_mib']} MiB")
        print(f"{'variant':<10}{'peak MiB':>10}{'seconds':>10}  same result as official")
        for r in m["rows"]:
            if "error" in r:
                print(f"{r['variant']:<10}  error: {r['error']}")
            else:
                print(f"{r['variant']:<10}{r['peak_mib']:>10.1f}{r['seconds']:>10.3f}  {r.get('same_result_as_official', '')}")
    if sip:
        print("\n(c) whole SIP run, AAS + SARG (s = 9) vs plain SIP (s = 0), process CPU s median; target <= 2.1")
        for r in sip:
            print(f"{r['family']:<8}{r['size']}² {r['steps']} steps x{r['strength']}: plain {r['median_s']['plain_sip']:.3f}"
                  f"  eraser {r['median_s']['eraser']:.3f}  ratio {r['ratio']:.3f}  (extra passes in the last run: "
                  f"{r['extra_passes']})")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
