"""SoftPAG cost benchmark: (a) the extra guidance pass per step vs plain CFG sampling on the tiny models,
(b) peak memory of one SoftPAG attention call (map-free) vs an explicit-map implementation at ~4k tokens.

(a) For every family's tiny model, plain sampling (the stock pipeline with its own CFG), SoftPAG with a
separate extra forward (default) and SoftPAG with `batched=True` (perturbed rows appended to the
pipeline's forward) are timed in the same process, interleaved round-robin. Reported: median / min
process CPU seconds per pipeline call, the ratio to plain, and the denoiser forwards and batch rows per
step (counted with a forward pre-hook). One extra conditional pass per step means a ratio of about
1.5 for CFG-batched pipelines (2 rows -> 3 rows), 2 for FLUX (1 -> 2 rows) and 1.5 for Wan
(2 forwards -> 3), once the denoiser dominates; on the tiny models fixed per-step costs (scheduler,
text encoders, Python) dilute the ratio. One torch thread by default (`--threads`): with several OpenMP
threads on a busy machine, process CPU time includes spin-waits and the ratios become noise.

(b) One attention call, B rows (the last one "perturbed"), H heads, N tokens, head dim D, u = 0.5 on
every head of the perturbed row:
    sdpa          the host kernel alone (baseline)
    softpag       attnlab's map-free effect: (1-u)·SDPA(Q,K,V) + u·V on the selected rows/heads
    explicit      A = softmax(QKᵀ/√d) materialised, M = (1-u)·A + u·I, M·V (what the official code does)
    fisher_rao    attnlab's gated explicit slow path (query-chunked maps), for reference
Each variant runs in its own subprocess; the peak is measured by `benchmarks/peak_memory.py` over the
level after q/k/v were allocated and the code path warmed on a tiny call (CPU: resident-set high-water
mark; CUDA: `torch.cuda.max_memory_allocated()`).
The size of one N×N fp32 map per row and head is reported alongside ("theory_map_mib").

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/softpag_cost.py            # CPU, writes benchmarks/results/softpag_cost.json
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/softpag_cost.py --device cuda --out benchmarks/results/softpag_cost_cuda.json
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/softpag_cost.py --families flux sd15 --repeats 5 --tokens 4096
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
from diffusers.hooks.hooks import HookRegistry, ModelHook

from attnlab.models.tiny import FAMILIES, build_tiny_pipeline, denoiser_of, tiny_call_kwargs
from attnlab.pipelines.softpag import SoftPAGPipeline

ROOT = Path(__file__).resolve().parent.parent

# the layer SoftPAG perturbs per family (a middle self/joint attention layer, every head)
LAYER = {"sd15": 1, "sdxl": 3, "sd3": 1, "flux": 1, "pixart": 1, "wan": 0}
VARIANTS = ("sdpa", "softpag", "explicit", "fisher_rao")


# --- (a) cost per step ------------------------------------------------------------------------------------
class _Count(ModelHook):
    def __init__(self, log: list):
        super().__init__()
        self.log = log

    def pre_forward(self, module, *args, **kwargs):
        x = kwargs.get("sample", kwargs.get("hidden_states", args[0] if args else None))
        self.log.append(int(x.shape[0]))
        return args, kwargs


def bench_family(family: str, repeats: int, steps: int, scale: float, device: str) -> dict:
    pipe = build_tiny_pipeline(family).to(device)
    denoiser = denoiser_of(pipe)
    configs = {
        "plain": pipe,
        "softpag": SoftPAGPipeline.from_pipe(pipe, heads=f"L{LAYER[family]}:*", scale=scale, u=0.5),
        "softpag_batched": SoftPAGPipeline.from_pipe(pipe, heads=f"L{LAYER[family]}:*", scale=scale, u=0.5,
                                                     batched=True),
    }
    forwards: list[int] = []
    # counted by an innermost diffusers hook: the guidance hook's extra forward runs inside the hook chain,
    # where torch's forward pre-hooks (which wrap __call__) do not see it
    registry = HookRegistry.check_if_exists_or_initialize(denoiser)
    registry.register_hook(_Count(forwards), "softpag_cost_count")
    times = {name: [] for name in configs}
    shape = {}
    try:
        for rep in range(repeats + 1):  # the first round warms up
            for name, runner in configs.items():
                forwards.clear()
                kwargs = tiny_call_kwargs(family, num_inference_steps=steps, output_type="latent")
                t0 = time.process_time()
                with torch.no_grad():
                    runner(**kwargs)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                dt = time.process_time() - t0
                if rep:
                    times[name].append(dt)
                shape[name] = {"forwards_per_step": len(forwards) / steps, "rows_per_step": sum(forwards) / steps}
    finally:
        registry.remove_hook("softpag_cost_count", recurse=False)
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    return {
        "family": family,
        "steps": steps,
        "median_s": {k: round(v, 5) for k, v in med.items()},
        "ratio_to_plain": {k: round(v / med["plain"], 3) for k, v in med.items()},
        "min_s": {k: round(v, 5) for k, v in best.items()},
        "min_ratio_to_plain": {k: round(v / best["plain"], 3) for k, v in best.items()},
        "per_step": shape,
    }


# --- (b) memory of one attention call -----------------------------------------------------------------------
def _explicit_map(q, k, v, u: float, rows):
    """The official-code way: materialise A, blend it with I, multiply V (on the perturbed rows)."""
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    qs, ks, vs = q[rows], k[rows], v[rows]
    a = torch.softmax(qs @ ks.transpose(-1, -2) * qs.shape[-1] ** -0.5, dim=-1)
    m = (1.0 - u) * a + u * torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    out[rows] = m @ vs
    return out


def _variant_fn(variant: str, rows: list[int], u: float):
    from attnlab.processors import EffectStack
    from attnlab.processors.reference import sdpa_kernel
    from attnlab.processors.softpag import SoftPAG

    if variant == "sdpa":
        return lambda call: sdpa_kernel(call.q, call.k, call.v)
    if variant == "explicit":
        return lambda call: _explicit_map(call.q, call.k, call.v, u, rows)
    path = "fisher_rao" if variant == "fisher_rao" else "linear"
    stack = EffectStack([SoftPAG({0: "*"}, u=u, path=path, max_explicit_tokens=1 << 20)])
    return lambda call: stack.run(call, sdpa_kernel)


def measure_memory(variant: str, batch: int, heads: int, tokens: int, dim: int, u: float, device: str) -> dict:
    """Runs in a fresh process: peak bytes of one call above the level after inputs and warm-up."""
    from attnlab.processors import AttentionCall, Site

    torch.manual_seed(0)
    roles = ("cond",) * (batch - 1) + ("perturbed",)
    site = Site("pixart", "self", 0, "transformer_blocks.0.attn1")
    fn = _variant_fn(variant, [batch - 1], u)

    def make(n):
        q, k, v = (torch.randn(batch, heads, n, dim, device=device) for _ in range(3))
        return AttentionCall(q, k, v, site, roles=roles)

    with torch.no_grad():
        fn(make(64))  # warm the code path (lazy imports, kernels) on a tiny call
        call = make(tokens)
        return {"variant": variant, **peak_of(lambda: fn(call), device)}

def memory_table(args) -> dict:
    rows = run_children(str(Path(__file__).resolve()), VARIANTS,
                        ["--batch", str(args.batch), "--heads", str(args.heads), "--tokens", str(args.tokens),
                         "--dim", str(args.dim), "--u", str(args.u), "--device", args.device,
                         "--threads", str(args.threads)], str(ROOT))
    mark_same_result(rows, "explicit", ("softpag", "explicit"), "same_result_as_explicit")
    one_map = args.heads * args.tokens * args.tokens * 4  # fp32 N×N map, perturbed row, all heads
    return {"batch": args.batch, "heads": args.heads, "tokens": args.tokens, "dim": args.dim, "u": args.u,
            "perturbed_rows": 1, "theory_map_mib": round(one_map / 2**20, 1),
            "theory_qkv_mib": round(3 * args.batch * args.heads * args.tokens * args.dim * 4 / 2**20, 1),
            "rows": rows}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", nargs="*", default=list(FAMILIES))
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--scale", type=float, default=3.0, help="perturbation guidance scale w")
    ap.add_argument("--batch", type=int, default=2, help="rows of the attention call (the last is perturbed)")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--u", type=float, default=0.5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 by default: process CPU time of several OpenMP threads counts their "
                         "spin-waits, which makes ratios noisy on a shared machine)")
    ap.add_argument("--skip-pipelines", action="store_true", help="only the memory part (b)")
    ap.add_argument("--out", default="benchmarks/results/softpag_cost.json")
    ap.add_argument("--_memory-child", dest="child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(measure_memory(args.child, args.batch, args.heads, args.tokens, args.dim, args.u, args.device)))
        return

    memory = memory_table(args)
    rows = [] if args.skip_pipelines else [bench_family(f, args.repeats, args.steps, args.scale, args.device)
                                           for f in args.families]
    report = {
        "command": "HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/softpag_cost.py " + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items() if k not in ("out", "child", "skip_pipelines"))
            + (" --skip-pipelines" if args.skip_pipelines else ""),
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "device": args.device if args.device == "cpu" else torch.cuda.get_device_name()},
        "cost_per_step": rows,
        "memory_one_call": memory,
    }
    out = ROOT / args.out if not Path(args.out).is_absolute() else Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")

    if rows:
        print(f"(a) {args.steps}-step tiny pipelines, process CPU s per call, median (min); ratio to plain CFG sampling")
        print(f"{'model':<8}{'plain s':>10}{'softpag':>18}{'batched':>18}   forwards/step (rows/step): plain | softpag | batched")
        for r in rows:
            med, ratio, mratio, ps = r["median_s"], r["ratio_to_plain"], r["min_ratio_to_plain"], r["per_step"]
            cells = " | ".join(f"{ps[k]['forwards_per_step']:g} ({ps[k]['rows_per_step']:g})"
                               for k in ("plain", "softpag", "softpag_batched"))
            print(f"{r['family']:<8}{med['plain']:>10.4f}{ratio['softpag']:>10.3f} ({mratio['softpag']:.3f})"
                  f"{ratio['softpag_batched']:>10.3f} ({mratio['softpag_batched']:.3f})   {cells}")
    m = memory
    print(f"\n(b) one attention call on {args.device}: B={m['batch']} (1 perturbed), H={m['heads']}, N={m['tokens']}, "
          f"D={m['dim']}, u={m['u']}; one fp32 N×N map per head of the perturbed row = {m['theory_map_mib']} MiB, "
          f"q+k+v = {m['theory_qkv_mib']} MiB")
    print(f"{'variant':<12}{'peak MiB':>10}{'seconds':>10}")
    for r in m["rows"]:
        if "error" in r:
            print(f"{r['variant']:<12}  error: {r['error']}")
        else:
            print(f"{r['variant']:<12}{r['peak_mib']:>10.1f}{r['seconds']:>10.3f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
