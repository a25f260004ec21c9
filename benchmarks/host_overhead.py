"""Host overhead benchmark: stock pipeline vs attnlab's pass-through host vs entropy scaling.

For every family's tiny model and for the mid-size models (~1k image tokens), all configurations are
timed in the same process, interleaved round-robin, at a resolution above the native one (so entropy
scaling really scales). Reported: median and minimum CPU seconds (process time, which
excludes time stolen by other tenants of a shared machine) per pipeline call, and the ratios to stock.

    python benchmarks/host_overhead.py                  # all families + mid-size, writes benchmarks/results/
    python benchmarks/host_overhead.py --families flux --repeats 9
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from attnlab.models.tiny import FAMILIES, build_tiny_pipeline, default_size, tiny_call_kwargs
from attnlab.processors import EntropyScaling, Recorder
from attnlab.processors.host_diffusers import apply




CONFIGS = {
    "stock": None,
    "host": [],
    "host+noop": [Recorder(summary=lambda call: None)],
    "entropy": [EntropyScaling()],
}


def bench(family: str, size: str, repeats: int, scale: float, device: str) -> dict:
    pipe = build_tiny_pipeline(family, size=size).to(device)
    h, w = default_size(family, size)
    mult = 16
    h, w = int(round(h * scale / mult) * mult), int(round(w * scale / mult) * mult)

    def call():
        kwargs = tiny_call_kwargs(family, size=size, height=h, width=w, output_type="latent")
        with torch.no_grad():
            pipe(**kwargs)
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    times = {name: [] for name in CONFIGS}
    for rep in range(repeats + 1):  # first round is warm-up
        for name, effects in CONFIGS.items():
            session = None if effects is None else apply(pipe, effects)
            t0 = time.process_time()
            call()
            dt = time.process_time() - t0
            if session is not None:
                session.remove()
            if rep:
                times[name].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    return {
        "family": family,
        "size": size,
        "height": h,
        "width": w,
        "median_s": {k: round(v, 5) for k, v in med.items()},
        "ratio_to_stock": {k: round(v / med["stock"], 4) for k, v in med.items()},
        "min_s": {k: round(v, 5) for k, v in best.items()},
        "min_ratio_to_stock": {k: round(v / best["stock"], 4) for k, v in best.items()},
    }


def per_call_overhead(family: str, calls: int = 2000, repeats: int = 7) -> dict:
    """µs per attention-module call (16 image tokens, so Python dominates): stock processor vs attnlab's."""
    from attnlab.models.tiny import denoiser_of
    from attnlab.processors.host_diffusers import attention_sites

    pipe = build_tiny_pipeline(family)
    den = denoiser_of(pipe)
    spec = next(s for s in attention_sites(den) if s.site.kind in ("self", "joint"))
    mod = spec.module
    x = torch.randn(1, 16, mod.to_q.in_features)
    kwargs = {}
    if spec.site.kind == "joint":
        kwargs["encoder_hidden_states"] = torch.randn(1, 4, mod.add_q_proj.in_features)
    out = {}
    for name, effects in CONFIGS.items():
        if name == "entropy":
            effects = [EntropyScaling(train_size=8 if family != "wan" else (1, 16, 16))]
        session = apply(pipe, effects) if effects is not None else None
        if session is not None:  # the geometry a forward with a 4x4-token latent would have set
            state = session.state
            state.latent = (1, 4, 4) if family in ("sd15", "sdxl") else (1, 8, 8)
            state.grid, state.roles = (1, 4, 4), ("cond",)
        with torch.no_grad():
            for _ in range(200):
                mod(x, **kwargs)
            best = float("inf")
            for _ in range(repeats):
                t0 = time.process_time()
                for _ in range(calls):
                    mod(x, **kwargs)
                best = min(best, (time.process_time() - t0) / calls)
        if session is not None:
            session.remove()
        out[name] = best * 1e6
    return {"family": family, "module": spec.name, "us_per_call": {k: round(v, 2) for k, v in out.items()},
            "overhead_us": {k: round(v - out["stock"], 2) for k, v in out.items()}}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", nargs="*", default=list(FAMILIES))
    ap.add_argument("--mid", nargs="*", default=["flux", "sd15"], help="families to also run at mid size")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--scale", type=float, default=1.5, help="resolution multiple of the native size")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/host_overhead.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    calls = [per_call_overhead(f) for f in args.families] if args.device == "cpu" else []
    rows = [bench(f, "tiny", args.repeats, args.scale, args.device) for f in args.families]
    rows += [bench(f, "mid", args.repeats, 1.0, args.device) for f in args.mid]
    report = {
        "command": "python benchmarks/host_overhead.py " + " ".join(
            f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in vars(args).items() if k != "out"),
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "device": args.device if args.device == "cpu" else torch.cuda.get_device_name()},
        "rows": rows,
        "per_call": calls,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"{'model':<14}{'HxW':>10}{'stock s':>10}   ratios median (min): host | host+noop | entropy")
    for r in rows:
        med, best = r["ratio_to_stock"], r["min_ratio_to_stock"]
        cells = " | ".join(f"{med[k]:.3f} ({best[k]:.3f})" for k in ("host", "host+noop", "entropy"))
        print(f"{r['family'] + '/' + r['size']:<14}{str(r['height']) + 'x' + str(r['width']):>10}"
              f"{r['median_s']['stock']:>10.4f}   {cells}")
    print(f"\n{'per attention call':<20}{'stock us':>10}   overhead us: host | host+noop | entropy")
    for c in calls:
        o = c["overhead_us"]
        print(f"{c['family']:<20}{c['us_per_call']['stock']:>10.1f}   {o['host']:+.1f} | {o['host+noop']:+.1f} | {o['entropy']:+.1f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
