"""Host overhead benchmark: stock pipeline vs attnlab's pass-through host vs entropy scaling.

For every family's tiny model and for the mid-size models (~1k image tokens), all configurations are
timed in the same process, interleaved round-robin, at a resolution above the native one (so entropy
scaling really scales). Reported: median seconds per pipeline call and the ratio to stock.

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
from attnlab.processors import Effect, EntropyScaling
from attnlab.processors.host_diffusers import apply


class NoOp(Effect):
    """Runs the whole effect stack (call built, canonical layout) and changes nothing."""

    stage = "observe"

    def __call__(self, call, attend):
        return attend(call.q, call.k, call.v)


CONFIGS = {
    "stock": None,
    "host": [],
    "host+noop": [NoOp()],
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
            t0 = time.perf_counter()
            call()
            dt = time.perf_counter() - t0
            if session is not None:
                session.remove()
            if rep:
                times[name].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "family": family,
        "size": size,
        "height": h,
        "width": w,
        "median_s": {k: round(v, 5) for k, v in med.items()},
        "ratio_to_stock": {k: round(v / med["stock"], 4) for k, v in med.items()},
    }


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
    rows = [bench(f, "tiny", args.repeats, args.scale, args.device) for f in args.families]
    rows += [bench(f, "mid", max(3, args.repeats // 2), 1.0, args.device) for f in args.mid]
    report = {
        "command": "python benchmarks/host_overhead.py " + " ".join(
            f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in vars(args).items() if k != "out"),
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "device": args.device if args.device == "cpu" else torch.cuda.get_device_name()},
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"{'model':<14}{'HxW':>10}{'stock s':>10}{'host':>8}{'host+noop':>11}{'entropy':>9}")
    for r in rows:
        ratio = r["ratio_to_stock"]
        print(f"{r['family'] + '/' + r['size']:<14}{str(r['height']) + 'x' + str(r['width']):>10}"
              f"{r['median_s']['stock']:>10.4f}{ratio['host']:>8.3f}{ratio['host+noop']:>11.3f}{ratio['entropy']:>9.3f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
