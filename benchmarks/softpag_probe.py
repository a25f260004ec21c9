"""Does SoftPAG do anything on the toy SD model? The bench's SoftPAG rows with other heads, scales and without
classifier-free guidance (PAG's own setting), on VALIDATION scenes (seeds 500 000…; the bench's are 10 000…).

    HF_HUB_OFFLINE=1 python benchmarks/softpag_probe.py [--model toy-sd] [--n 30]

Writes benchmarks/results/softpag_probe.json.
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch
from probe_common import record, save, validation_bench

from attnlab.loading import load_model
from attnlab.toyworld.bench import bench_softpag

OUT = Path(__file__).resolve().parent / "results" / "softpag_probe.json"
# (name, guidance of the stock sampler, SoftPAG options); the model's default heads are its mid block
VARIANTS = [("defaults (mid block, w 3), CFG 4", 4.0, {}),
            ("w 6, CFG 4", 4.0, {"scale": 6.0}),
            ("first up-block attention 'u0', w 3, CFG 4", 4.0, {"heads": "u0"}),
            ("mid block, w 3, no CFG (guidance 1)", 1.0, {})]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="toy-sd")
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--steps", type=int, default=20)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    model = load_model(a.model, "cpu")
    res = []
    for name, guidance, options in VARIANTS:
        m = dataclasses.replace(model, call_kwargs={**model.call_kwargs, "guidance_scale": guidance})
        record(res, name, bench_softpag(validation_bench(m, a.n, a.steps), options), guidance=guidance,
               options=options)
    save(OUT, a, res)


if __name__ == "__main__":
    main()
