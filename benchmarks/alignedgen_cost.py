"""AlignedGen / StyleAligned cost: time and peak memory of an aligned batch vs plain batch generation.

(a) Tiny pipelines at their default size: plain batch generation (the stock pipeline with B prompts) and
    `AlignedGenPipeline` with the same prompts, timed in the same process, interleaved round-robin (process
    CPU seconds per call, median and min over `--repeats`, ratio to plain).
(b) The same two at about 4k image tokens per image (FLUX tiny at 256 px = 64×64 tokens, SDXL tiny at
    128 px = 64×64 tokens at its top level): peak memory of one pipeline call and its process CPU time (min of
    3 calls; the time ratio uses it, wall time is reported too), each variant in a fresh child process (`benchmarks/peak_memory.py`: CPU resident-set high-water mark above the level
    before the call; CUDA max_memory_allocated).
(c) One FLUX-like single-block attention call at ~4k image tokens (+ text), B rows (1 reference): the host
    kernel alone, the AlignedGen effect (two kernel calls, no mask), and the official code's way (every row
    gets the appended block, a dense (B, H, L, L+N) additive mask with −inf on the reference's block).

Targets from the issue: memory ≤ 1.2× plain batch, time ≤ 1.3×.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/alignedgen_cost.py     # CPU -> benchmarks/results/alignedgen_cpu.json
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/alignedgen_cost.py --device cuda --out benchmarks/results/alignedgen_cuda.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peak_memory import mark_same_result, peak_of, run_children  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["a cat, watercolor", "a dog, watercolor", "a red car, watercolor", "an owl, watercolor"]
PIPE_VARIANTS = ("plain", "alignedgen")
CALL_VARIANTS = ("sdpa", "alignedgen", "dense_mask")
SIZE_4K = {"flux": 256, "sdxl": 128, "sd15": 128, "sd3": 128, "pixart": 128}


def _pipes(family, device):
    from attnlab.models.tiny import build_tiny_pipeline
    from attnlab.pipelines.alignedgen import AlignedGenPipeline

    pipe = build_tiny_pipeline(family).to(device)
    return pipe, {"plain": pipe, "alignedgen": AlignedGenPipeline(pipe)}


def _kwargs(family, steps, batch, size=None):
    from attnlab.models.tiny import tiny_call_kwargs

    kw = tiny_call_kwargs(family, num_inference_steps=steps, output_type="latent")
    kw["prompt"] = PROMPTS[:batch]
    if size:
        kw["height"] = kw["width"] = size
    return kw


# --- (a) time per call on the tiny pipelines ---------------------------------------------------------------
def bench_family(family, repeats, steps, batch, device) -> dict:
    _, configs = _pipes(family, device)
    times = {k: [] for k in configs}
    for rep in range(repeats + 1):  # the first round warms up
        for name, runner in configs.items():
            kw = _kwargs(family, steps, batch)
            t0 = time.process_time()
            with torch.no_grad():
                runner(**kw)
            if rep:
                times[name].append(time.process_time() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    return {"family": family, "steps": steps, "batch": batch,
            "median_s": {k: round(v, 5) for k, v in med.items()},
            "ratio_to_plain": round(med["alignedgen"] / med["plain"], 3),
            "min_ratio_to_plain": round(best["alignedgen"] / best["plain"], 3)}


# --- (b) one pipeline call at ~4k tokens, in a child --------------------------------------------------------
def pipeline_child(variant, family, steps, batch, device) -> dict:
    _, configs = _pipes(family, device)
    runner = configs[variant]
    with torch.no_grad():
        runner(**_kwargs(family, 1, batch))  # warm up at the default size

        def run():
            return runner(**_kwargs(family, steps, batch, SIZE_4K[family])).images

        t0 = time.process_time()
        row = peak_of(run, device)
        cpu = [time.process_time() - t0]
        for _ in range(2):  # process CPU time (robust on a shared machine with one thread): min of 3 runs
            t0 = time.process_time()
            run()
            cpu.append(time.process_time() - t0)
    return {"variant": variant, "family": family, **row, "cpu_s": round(min(cpu), 4)}


# --- (c) one attention call ---------------------------------------------------------------------------------
def call_child(variant, batch, heads, tokens, text, dim, device) -> dict:
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    from attnlab.processors import AttentionCall, EffectStack, RopeInfo, Site, TokenLayout
    from attnlab.processors.alignedgen import AlignedGen
    from attnlab.processors.host_diffusers.processors import _flux_rotate
    from attnlab.processors.reference import sdpa_kernel

    side = int(math.isqrt(tokens))
    n_img = side * side
    axes = [dim - 2 * (dim // 8 * 3), dim // 8 * 3, dim // 8 * 3]
    pos = FluxPosEmbed(theta=10000, axes_dim=axes)

    def make(n_side, n_text):
        ids = torch.zeros(n_text + n_side * n_side, 3)
        r, c = torch.meshgrid(torch.arange(n_side), torch.arange(n_side), indexing="ij")
        ids[n_text:, 1], ids[n_text:, 2] = r.flatten().float(), c.flatten().float()
        cos, sin = pos(ids)
        n = ids.shape[0]
        q, k, v = (torch.randn(batch, heads, n, dim, device=device) for _ in range(3))
        layout = TokenLayout(q_image=slice(n_text, n), k_image=slice(n_text, n), q_text=slice(0, n_text),
                             k_text=slice(0, n_text), grid=(1, n_side, n_side), text_first=True)
        rope = RopeInfo(cos.to(device), sin.to(device), _flux_rotate, pos)
        return AttentionCall(q, k, v, Site("flux", "single", 19), layout, ("cond",) * batch, rope=rope)

    torch.manual_seed(0)  # the same q/k/v in every child (imports may draw random numbers)
    effect = AlignedGen(adain="none", shift=0, scale=1.0)  # comparable with the dense-mask version's result
    stack = EffectStack([effect])

    def dense(call):
        """The official code: K/V of every row extended by the reference image block, dense −inf mask on row 0."""
        img = call.tokens.k_image
        k_ref, v_ref = call.k[:1, :, img], call.v[:1, :, img]
        k = torch.cat([call.k, k_ref.expand(batch, -1, -1, -1)], 2)
        v = torch.cat([call.v, v_ref.expand(batch, -1, -1, -1)], 2)
        L, N = call.q_len, k_ref.shape[2]
        mask = torch.zeros(batch, heads, L, L + N, device=call.q.device)
        mask[0, :, :, L:] = float("-inf")
        return sdpa_kernel(call.q, k, v, mask)

    fn = {"sdpa": lambda c: sdpa_kernel(c.q, c.k, c.v), "alignedgen": lambda c: stack.run(c, sdpa_kernel),
          "dense_mask": dense}[variant]
    with torch.no_grad():
        fn(make(4, 2))
        call = make(side, text)
        t0 = time.process_time()
        row = peak_of(lambda: fn(call), device)
        row["cpu_s"] = round(time.process_time() - t0, 4)
    return {"variant": variant, "tokens": n_img + text, **row}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", nargs="*", default=["flux", "sdxl", "sd15", "sd3", "pixart"])
    ap.add_argument("--families-4k", nargs="*", default=["flux", "sdxl"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4, help="images per batch (the first is the reference)")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=4096, help="image tokens of the one-call benchmark (c)")
    ap.add_argument("--text", type=int, default=256, help="text tokens of the one-call benchmark (c)")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/alignedgen_cpu.json")
    ap.add_argument("--_memory-child", dest="child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_family", dest="child_family", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        if args.child_family:
            row = pipeline_child(args.child, args.child_family, args.steps, args.batch, args.device)
        else:
            row = call_child(args.child, args.batch, args.heads, args.tokens, args.text, args.dim, args.device)
        print(json.dumps(row))
        return

    common = ["--steps", str(args.steps), "--batch", str(args.batch), "--heads", str(args.heads), "--tokens",
              str(args.tokens), "--text", str(args.text), "--dim", str(args.dim), "--device", args.device,
              "--threads", str(args.threads)]
    script = str(Path(__file__).resolve())
    calls = run_children(script, CALL_VARIANTS, common, str(ROOT))
    mark_same_result(calls, "dense_mask", ("alignedgen", "dense_mask"), "same_result_as_dense_mask")
    ref = {r["variant"]: r for r in calls if "peak_mib" in r}
    mask_mib = args.batch * args.heads * (args.tokens + args.text) * (2 * args.tokens + args.text) * 4 / 2**20
    pipes4k = []
    for fam in args.families_4k:
        rows = run_children(script, PIPE_VARIANTS, common + ["--_family", fam], str(ROOT))
        ok = {r["variant"]: r for r in rows if "peak_mib" in r}
        entry = {"family": fam, "size_px": SIZE_4K[fam], "image_tokens": 4096, "rows": rows}
        if len(ok) == 2:
            entry["memory_ratio"] = round(ok["alignedgen"]["peak_mib"] / max(ok["plain"]["peak_mib"], 1e-9), 3)
            entry["time_ratio"] = round(ok["alignedgen"]["cpu_s"] / ok["plain"]["cpu_s"], 3)
            entry["wall_ratio"] = round(ok["alignedgen"]["seconds"] / ok["plain"]["seconds"], 3)
        pipes4k.append(entry)
    tiny = [bench_family(f, args.repeats, args.steps, args.batch, args.device) for f in args.families]
    report = {
        "command": "OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/alignedgen_cost.py " + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items() if k not in ("out", "child", "child_family")),
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "device": args.device if args.device == "cpu" else torch.cuda.get_device_name()},
        "targets": {"memory_ratio_max": 1.2, "time_ratio_max": 1.3},
        "tiny_pipelines_time": tiny,
        "pipelines_4k_tokens": pipes4k,
        "one_call": {"batch": args.batch, "heads": args.heads, "image_tokens": args.tokens, "text_tokens": args.text,
                     "dim": args.dim, "dense_mask_theory_mib": round(mask_mib, 1), "rows": calls,
                     "memory_ratio_alignedgen_to_sdpa": round(ref["alignedgen"]["peak_mib"] / ref["sdpa"]["peak_mib"], 3)
                     if "alignedgen" in ref and "sdpa" in ref and ref["sdpa"]["peak_mib"] else None},
    }
    out = ROOT / args.out if not Path(args.out).is_absolute() else Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")

    print(f"(a) tiny pipelines, {args.steps} steps, batch {args.batch}: process CPU s per call, median; ratio (min ratio)")
    for r in tiny:
        print(f"  {r['family']:<8} plain {r['median_s']['plain']:.4f}  aligned {r['median_s']['alignedgen']:.4f}  "
              f"ratio {r['ratio_to_plain']:.3f} ({r['min_ratio_to_plain']:.3f})")
    print("(b) one pipeline call at 4096 image tokens per image: peak MiB, process CPU s (min of 3)")
    for e in pipes4k:
        cells = "  ".join(f"{r['variant']}: {r.get('peak_mib')} MiB {r.get('cpu_s')} cpu-s" if "peak_mib" in r
                          else f"{r['variant']}: error {r['error']}" for r in e["rows"])
        print(f"  {e['family']:<6} {cells}  memory ratio {e.get('memory_ratio')}  time ratio {e.get('time_ratio')}")
    print(f"(c) one attention call, B={args.batch}, H={args.heads}, {args.tokens}+{args.text} tokens, D={args.dim}; "
          f"dense mask alone {mask_mib:.0f} MiB")
    for r in calls:
        print(f"  {r['variant']:<12} " + (f"{r['peak_mib']:>8.1f} MiB {r['cpu_s']:.3f} cpu-s" if "peak_mib" in r
                                          else f"error {r['error']}"))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
