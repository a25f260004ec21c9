"""GPU checks for the attention core, in one run (device machine; CI never runs this).

1. Bit-exactness on CUDA: every family's tiny pipeline, stock vs the pass-through host vs a no-op
   effect vs entropy scaling at the native size (fp32; FLUX also bf16).
2. diffusers attention backends with attnlab processors installed (FLUX and Wan tiny, bf16):
   set_attention_backend(...) still reaches our processors; pass-through stays bit-exact per backend.
3. Host overhead at real sizes: random-weight FLUX.1 (19 double + 38 single blocks, 3072 wide) at
   1024² and 2048², and an SDXL-sized UNet at 1024², bf16: denoiser forward time for stock / host /
   host + no-op effect / entropy scaling, interleaved, CUDA-event timed, median of N.

    python benchmarks/gpu_check.py --out $OUT/gpu_check.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
import traceback

import torch

from big_models import flux_inputs, flux_transformer, sdxl_inputs, sdxl_unet

from attnlab.models.tiny import FAMILIES, build_tiny_pipeline, denoiser_of, run_tiny_pipeline
from attnlab.processors import EntropyScaling, Recorder
from attnlab.processors.host_diffusers import apply

DEV = "cuda"




def native_opts(family):
    return {"native_size": (5, 128, 128)} if family == "wan" else {}


def max_diff(a, b):
    return float((a.float() - b.float()).abs().max())


def correctness(report):
    rows = {}
    for family in FAMILIES:
        pipe = build_tiny_pipeline(family).to(DEV)
        stock = run_tiny_pipeline(pipe, output_type="latent")
        with apply(pipe, []):
            host = run_tiny_pipeline(pipe, output_type="latent")
        with apply(pipe, [Recorder(summary=lambda call: None)]):
            noop = run_tiny_pipeline(pipe, output_type="latent")
        with apply(pipe, [EntropyScaling()], **native_opts(family)):
            native = run_tiny_pipeline(pipe, output_type="latent")
        with apply(pipe, [EntropyScaling(train_size=32)]):
            scaled = run_tiny_pipeline(pipe, output_type="latent")
        rows[family] = {"host": max_diff(host, stock), "noop": max_diff(noop, stock),
                        "entropy_native": max_diff(native, stock), "entropy_other_size": max_diff(scaled, stock),
                        "finite": bool(torch.isfinite(scaled).all())}
    pipe = build_tiny_pipeline("flux").to(DEV, torch.bfloat16)
    stock = run_tiny_pipeline(pipe, output_type="latent")
    with apply(pipe, [Recorder(summary=lambda call: None)]):
        noop = run_tiny_pipeline(pipe, output_type="latent")
    rows["flux_bf16"] = {"noop": max_diff(noop, stock)}
    report["correctness_cuda"] = rows


def backends(report):
    rows = {}
    for family in ("flux", "wan"):
        pipe = build_tiny_pipeline(family).to(DEV, torch.bfloat16)
        denoiser = denoiser_of(pipe)
        for backend in ("native", "_native_math", "_native_efficient", "_native_cudnn", "_native_flash", "flex"):
            key = f"{family}/{backend}"
            try:
                denoiser.set_attention_backend(backend)
                stock = run_tiny_pipeline(pipe, output_type="latent")
                with apply(pipe, [Recorder(summary=lambda call: None)]) as session:
                    seen = {str(p._attention_backend) for p in (m.processor for m in denoiser.modules()
                                                                 if hasattr(m, "set_processor"))}
                    noop = run_tiny_pipeline(pipe, output_type="latent")
                with apply(pipe, [EntropyScaling(train_size=32)]):
                    scaled = run_tiny_pipeline(pipe, output_type="latent")
                rows[key] = {"noop_vs_stock": max_diff(noop, stock), "entropy_changes": max_diff(scaled, stock),
                             "backend_on_our_processors": sorted(seen), "sites": len(session.sites)}
            except Exception as err:  # report, do not stop the run
                rows[key] = {"error": f"{type(err).__name__}: {err}"[:300]}
            finally:
                denoiser.set_attention_backend("native")
    report["backends"] = rows


def time_configs(model, inputs, configs, rounds, per_sync=1):
    """Per config: median/min GPU ms per forward (CUDA events around `per_sync` back-to-back forwards,
    interleaved round-robin) and the host CPU ms spent issuing one forward (process time)."""
    times = {name: [] for name in configs}
    cpu = {name: [] for name in configs}
    order = random.Random(0)
    for r in range(rounds + 2):
        names = list(configs)
        order.shuffle(names)  # no config always runs first or last in a round
        for name in names:
            effects = configs[name]
            session = apply(model, effects) if effects is not None else None
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            c0 = time.process_time()
            start.record()
            with torch.no_grad():
                for _ in range(per_sync):
                    model(**inputs)
            end.record()
            c1 = time.process_time()
            torch.cuda.synchronize()
            if session is not None:
                session.remove()
            if r >= 2:
                times[name].append(start.elapsed_time(end) / per_sync)
                cpu[name].append((c1 - c0) * 1e3 / per_sync)
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    return {"median_ms": {k: round(v, 3) for k, v in med.items()},
            "ratio_to_stock": {k: round(v / med["stock"], 4) for k, v in med.items()},
            "min_ms": {k: round(v, 3) for k, v in best.items()},
            "min_ratio_to_stock": {k: round(v / best["stock"], 4) for k, v in best.items()},
            "host_cpu_ms_per_forward": {k: round(statistics.median(v), 3) for k, v in cpu.items()}}


def flux_timing(report, rounds):
    model = flux_transformer(DEV)
    out = {"params_B": round(sum(p.numel() for p in model.parameters()) / 1e9, 3)}
    for px in (1024, 2048):
        inputs = flux_inputs(DEV, px)
        n_img, n_txt = inputs["hidden_states"].shape[1], inputs["encoder_hidden_states"].shape[1]
        configs = {"stock": None, "host": [], "host+noop": [Recorder(summary=lambda call: None)],
                   "entropy": [EntropyScaling()]}  # native 1024: λ = 1 at 1024 (short-circuit), ≠ 1 at 2048
        out[f"{px}px_{n_img + n_txt}tok"] = time_configs(model, inputs, configs, rounds)
        with torch.no_grad():
            ref = model(**inputs)[0]
            with apply(model, [Recorder(summary=lambda call: None)]):
                got = model(**inputs)[0]
        out[f"{px}px_noop_max_diff"] = max_diff(got, ref)
    report["flux_full_size_bf16"] = out
    del model
    torch.cuda.empty_cache()


def sdxl_timing(report, rounds):
    unet = sdxl_unet(DEV)
    inputs = sdxl_inputs(DEV)
    configs = {"stock": None, "host": [], "host+noop": [Recorder(summary=lambda call: None)], "entropy": [EntropyScaling(train_size=768)]}
    report["sdxl_unet_1024px_bf16_batch2"] = {
        "params_B": round(sum(p.numel() for p in unet.parameters()) / 1e9, 3),
        **time_configs(unet, inputs, configs, rounds, per_sync=5)}
    del unet
    torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--device", default="cuda", help="cpu: dry run of the correctness and backend checks only")
    ap.add_argument("--only", nargs="*", default=None, help="run only these steps: correctness backends flux sdxl")
    args = ap.parse_args()
    global DEV
    DEV = args.device
    report = {"device": torch.cuda.get_device_name() if DEV == "cuda" else DEV, "torch": torch.__version__}
    t0 = time.time()
    for name, step in (("correctness", correctness), ("backends", backends),
                       ("flux", lambda r: flux_timing(r, args.rounds)), ("sdxl", lambda r: sdxl_timing(r, args.rounds))):
        if (DEV != "cuda" and name in ("flux", "sdxl")) or (args.only and name not in args.only):
            continue
        t = time.time()
        try:
            step(report)
        except Exception:
            report[f"{name}_error"] = traceback.format_exc()[-2000:]
        report.setdefault("seconds", {})[name] = round(time.time() - t, 1)
        print(name, "done", round(time.time() - t0, 1), "s", flush=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
