"""Can StyleAligned's shared attention move the toy SD model's backgrounds? The bench's AlignedGen rows with other
options, on VALIDATION scenes (seeds 500 000 + offset…; the bench's are 10 000…).

    HF_HUB_OFFLINE=1 python benchmarks/alignedgen_probe.py [--model toy-sd] [--n 20]

Each batch: three captions without their background clause (the style is left to the model); agreement = a
target's parsed background style and colours equal the reference image's. Writes
benchmarks/results/alignedgen_probe.json.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from probe_common import record, save, validation_bench

from attnlab.loading import load_model
from attnlab.toyworld.bench import bench_alignedgen

OUT = Path(__file__).resolve().parent / "results" / "alignedgen_probe.json"
VARIANTS = {"defaults (λ 1, AdaIN qk, every self-attention layer)": {}, "λ 2": {"scale": 2.0},
            "no AdaIN": {"adain": "none"}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="toy-sd")
    ap.add_argument("--n", type=int, default=20, help="batches of three")
    ap.add_argument("--steps", type=int, default=20)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    model = load_model(a.model, "cpu")
    bench = validation_bench(model, a.n, a.steps)
    res = []
    for name, options in VARIANTS.items():
        record(res, name, bench_alignedgen(bench, options), options=options)
    save(OUT, a, res)


if __name__ == "__main__":
    main()
