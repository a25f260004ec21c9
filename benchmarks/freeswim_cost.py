"""FreeSwim window-attention cost.

CPU (default): one self-attention call over a G×G image token grid (1 frame, H heads, head dim D) with a
window sized for a 16×16 base grid (d = 8: 17×17 keys per query), at growing G. Variants, each measured in
its own child process (`benchmarks/peak_memory.py`: resident-set high-water mark over the level after
q/k/v were allocated; time = best of `--repeats` runs after one warm-up (the machine is shared: the minimum is the least noisy)):

    dense_full     plain SDPA over all N keys (what stock attention costs)
    dense_masked   the window as an explicit N×N boolean mask + SDPA (the tests' reference)
    chunked        attnlab's exact chunked window (query tiles × their key rectangle; no N×N term)

Also the FlexAttention block density (128×128 blocks holding any allowed pair) of the FLUX 2048² window
mask (128² image tokens + 512 text, 65×65 window) in raster and tile-major (8×16) order.

Reported per N: seconds, peak MiB, and the log-log slopes of time and memory in N over the sizes (chunked:
≈ 1 and ≈ 0, dense: ≈ 2 and ≈ 2 once the N² terms dominate).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/freeswim_cost.py          # writes benchmarks/results/freeswim_cpu.json

GPU (prepared for an H100/H200-class GPU; `--device cuda`): bf16, tiled FlexAttention (token tile 8×16,
compiled, block mask cached) vs dense SDPA (no mask) at FLUX 2048² (128² tokens + 512 text, 24 heads × 128,
1024² base → 65×65 window) and 4096² (256²), and Wan 2.1 1.3B at 1088×1920 × 81 frames (21×68×120 tokens,
12 heads × 128, 480×832 base → 31×53 window). Also raster order (tile 1×W), the block-mask build time, the
block density and the end-to-end time including the token permutation. Targets (issue 7): ≥ 1.2× at 2048²
and ≥ 5× at 4096² (anchor on an H200: 1.20× and 4.79×, ../shared/anchors/).

    .venv/bin/python benchmarks/freeswim_cost.py --device cuda --out $OUT/freeswim_gpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent.parent))  # the folder holding the `attnlab` package

from peak_memory import peak_of, run_children  # noqa: E402

VARIANTS = ("dense_full", "dense_masked", "chunked")
GRIDS = (16, 32, 48, 64, 96)
HEADS, DIM, HALF = 2, 64, (8, 8)


def _window():
    from attnlab.processors import freeswim_window as fw

    return fw


def _qkv(g: int, device="cpu", dtype=torch.float32, heads=HEADS, dim=DIM, n_text=0, frames=1, batch=1):
    n = frames * g[0] * g[1] + n_text if isinstance(g, tuple) else g * g + n_text
    gen = torch.Generator(device="cpu").manual_seed(0)
    return [torch.randn(batch, heads, n, dim, generator=gen).to(device, dtype) for _ in range(3)]


def child(variant: str, g: int, repeats: int) -> dict:
    fw = _window()
    torch.set_num_threads(1)
    q, k, v = _qkv(g)
    spec = fw.WindowSpec((1, g, g), HALF, slice(0, g * g))

    if variant == "dense_full":
        def fn():
            return F.scaled_dot_product_attention(q, k, v)
    elif variant == "dense_masked":
        def fn():
            return fw.dense_window_attention(q, k, v, spec, limit=1 << 30)
    else:
        def fn():
            return fw.chunked_window_attention(q, k, v, spec)

    small = _qkv(16)  # warm the code path
    fw.chunked_window_attention(*small, fw.WindowSpec((1, 16, 16), HALF, slice(0, 256)))
    mem = peak_of(fn, "cpu")
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"variant": variant, "grid": g, "tokens": g * g, "seconds": round(min(times), 5),
            "peak_mib": mem["peak_mib"], "checksum": mem["checksum"], "memory_method": mem["method"]}


def slope(xs, ys) -> float:
    lx = [math.log(x) for x in xs]
    ly = [math.log(max(y, 1e-9)) for y in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def cpu_main(args) -> dict:
    rows = []
    for g in args.grids:
        variants = [f"{v}:{g}" for v in VARIANTS]
        rows += run_children(str(Path(__file__).resolve()), variants, ["--repeats", str(args.repeats)],
                             cwd=str(HERE.parent))
    summary = {}
    for v in VARIANTS:
        rs = [r for r in rows if r.get("variant") == v and "seconds" in r]
        if len(rs) >= 2:
            big = [r for r in rs if r["tokens"] >= 1024]
            big = big if len(big) >= 2 else rs
            summary[v] = {"time_slope": round(slope([r["tokens"] for r in big], [r["seconds"] for r in big]), 2),
                          "memory_slope": round(slope([r["tokens"] for r in big], [max(r["peak_mib"], 0.1) for r in big]), 2)}
    for g in args.grids:  # chunked == dense_masked (same window)
        ref = next((r for r in rows if r.get("variant") == "dense_masked" and r.get("grid") == g), None)
        ch = next((r for r in rows if r.get("variant") == "chunked" and r.get("grid") == g), None)
        if ref and ch and "checksum" in ref and "checksum" in ch:
            ch["same_as_dense_masked"] = abs(ref["checksum"] - ch["checksum"]) <= 1e-4 * max(1.0, abs(ref["checksum"]))
    fw = _window()
    density = {label: round(fw.block_density((1, 128, 128), (32, 32), tile, n_text=512), 4)
               for label, tile in (("raster", None), ("tiled_8x16", (8, 16)))}
    return {"benchmark": "freeswim window attention, CPU", "command": " ".join(["OMP_NUM_THREADS=1", "python"] + sys.argv),
            "machine": platform.processor() or platform.machine(), "torch": torch.__version__, "threads": 1,
            "heads": HEADS, "head_dim": DIM, "window": [2 * HALF[0] + 1, 2 * HALF[1] + 1], "rows": rows,
            "slopes_over_tokens_ge_1024": summary,
            "flex_block_density_flux2048": density}


# --- GPU -----------------------------------------------------------------------------------------------------
GPU_CASES = {
    "flux2048": dict(grid=(1, 128, 128), half=(32, 32), heads=24, text=512),
    "flux4096": dict(grid=(1, 256, 256), half=(32, 32), heads=24, text=512),
    "wan1080p": dict(grid=(21, 68, 120), half=(15, 26), heads=12, text=0),
}


def _bench(fn, iters=10, warm=3):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(iters):
        fn()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / iters


def gpu_main(args) -> dict:
    fw = _window()
    from torch.nn.attention.flex_attention import flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    res = {"benchmark": "freeswim window attention, GPU", "device": torch.cuda.get_device_name(0),
           "torch": torch.__version__, "command": " ".join(["python"] + sys.argv), "cases": {}}
    for name in args.cases:
        case = GPU_CASES[name]
        t, h, w = case["grid"]
        n_text = case["text"]
        n = t * h * w + n_text
        q, k, v = (torch.randn(1, case["heads"], n, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        spec = fw.WindowSpec(case["grid"], case["half"], slice(n_text, n), slice(0, n_text) if n_text else None)
        row = {"tokens": n, "window": [2 * case["half"][0] + 1, 2 * case["half"][1] + 1],
               "token_density": spec.keys_per_query() / (n - n_text)}
        try:
            row["dense_sdpa_ms"] = _bench(lambda: F.scaled_dot_product_attention(q, k, v))
        except Exception as e:  # noqa: BLE001
            row["dense_error"] = repr(e)[-300:]
        for label, tile in (("tiled", (8, 16)), ("raster", (1, w))):
            try:
                win = fw.FlexWindow(tile=tile, compile=True)
                t0 = time.time()
                index, real = win.order(spec.grid, q.device)
                length = n_text + index.numel()
                bm = win.block_mask(spec, length, q.device)
                torch.cuda.synchronize()
                row[f"{label}_mask_build_s"] = round(time.time() - t0, 2)
                qf, kf, vf = (torch.randn(1, case["heads"], length, 128, device="cuda", dtype=torch.bfloat16)
                              for _ in range(3))
                row[f"{label}_flex_ms"] = _bench(lambda: flex(qf, kf, vf, block_mask=bm))
                row[f"{label}_end_to_end_ms"] = _bench(lambda: win(q, k, v, spec))
                row[f"{label}_block_density"] = float(1 - bm.sparsity() / 100) if hasattr(bm, "sparsity") else None
                if "dense_sdpa_ms" in row:
                    row[f"{label}_speedup"] = row["dense_sdpa_ms"] / row[f"{label}_flex_ms"]
                    row[f"{label}_speedup_end_to_end"] = row["dense_sdpa_ms"] / row[f"{label}_end_to_end_ms"]
                qf = kf = vf = bm = None
            except Exception as e:  # noqa: BLE001
                row[f"{label}_error"] = repr(e)[-500:]
        res["cases"][name] = row
        print(name, json.dumps(row), flush=True)
        q = k = v = None
        torch.cuda.empty_cache()
    return res


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--grids", type=int, nargs="+", default=list(GRIDS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cases", nargs="+", default=list(GPU_CASES), choices=list(GPU_CASES))
    p.add_argument("--out", default=None)
    p.add_argument("--_memory-child", dest="child", default=None)
    args = p.parse_args(argv)
    if args.child:
        variant, g = args.child.split(":")
        print(json.dumps(child(variant, int(g), args.repeats)))
        return
    if args.device == "cuda":
        res = gpu_main(args)
        out = Path(args.out or os.path.join(os.environ.get("OUT", str(HERE / "results")), "freeswim_gpu.json"))
    else:
        res = cpu_main(args)
        out = Path(args.out or HERE / "results" / "freeswim_cpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res.get("slopes_over_tokens_ge_1024", res.get("cases")), indent=1))
    print("wrote", out)


if __name__ == "__main__":
    main()
