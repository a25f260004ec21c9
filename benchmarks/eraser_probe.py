"""Why does the Attentive Eraser gain less on the better-trained toy SD model? The bench's eraser rows at other SARG
scales, on VALIDATION scenes (seeds 500 000 + offset…; the bench's are 10 000…), for one or more models.

    HF_HUB_OFFLINE=1 python benchmarks/eraser_probe.py [--model toy-sd,out/sd_v8/pipeline] [--n 25]

"off" is plain inpainting (SARG scale 0) in every row; PSNR is taken inside the removed object's mask against the
scene rendered without it. Writes benchmarks/results/eraser_probe.json.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from probe_common import record, save, validation_bench

from attnlab.loading import load_model
from attnlab.toyworld.bench import bench_eraser

OUT = Path(__file__).resolve().parent / "results" / "eraser_probe.json"
SCALES = (4.5, 9.0, 13.5)  # half, the default (the bench's), one and a half times


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="toy-sd", help="comma-separated model names or folders")
    ap.add_argument("--n", type=int, default=25, help="scenes")
    ap.add_argument("--steps", type=int, default=20)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    res = []
    for name in a.model.split(","):
        bench = validation_bench(load_model(name, "cpu"), a.n, a.steps)
        for scale in SCALES:
            record(res, f"{name}, SARG scale {scale}", bench_eraser(bench, {"sarg_scale": scale}),
                   model=name, sarg_scale=scale)
    save(OUT, a, res)


if __name__ == "__main__":
    main()
