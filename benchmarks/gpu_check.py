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
import statistics
import time
import traceback

import torch

from attnlab.models.tiny import FAMILIES, build_tiny_pipeline, denoiser_of, run_tiny_pipeline
from attnlab.processors import Effect, EntropyScaling
from attnlab.processors.host_diffusers import apply

DEV = "cuda"


class NoOp(Effect):
    stage = "observe"

    def __call__(self, call, attend):
        return attend(call.q, call.k, call.v)


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
        with apply(pipe, [NoOp()]):
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
    with apply(pipe, [NoOp()]):
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
                with apply(pipe, [NoOp()]) as session:
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


def time_configs(forward, model, configs, rounds):
    """Median ms of forward() per config, interleaved round-robin, CUDA events."""
    times = {name: [] for name in configs}
    for r in range(rounds + 2):
        for name, effects in configs.items():
            session = apply(model, effects) if effects is not None else None
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            with torch.no_grad():
                forward()
            end.record()
            torch.cuda.synchronize()
            if session is not None:
                session.remove()
            if r >= 2:
                times[name].append(start.elapsed_time(end))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"median_ms": {k: round(v, 3) for k, v in med.items()},
            "ratio_to_stock": {k: round(v / med["stock"], 4) for k, v in med.items()},
            "spread_ms": {k: [round(min(v), 3), round(max(v), 3)] for k, v in times.items()}}


def flux_timing(report, rounds):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(DEV):
        model = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
            axes_dims_rope=(16, 56, 56)).eval()
    torch.set_default_dtype(torch.float32)
    out = {"params_B": round(sum(p.numel() for p in model.parameters()) / 1e9, 3)}
    for px in (1024, 2048):
        side = px // 16
        n_img, n_txt = side * side, 512
        ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(side).float(), torch.arange(side).float(), indexing="ij"), -1)
        inputs = dict(
            hidden_states=torch.randn(1, n_img, 64, device=DEV, dtype=torch.bfloat16),
            encoder_hidden_states=torch.randn(1, n_txt, 4096, device=DEV, dtype=torch.bfloat16),
            pooled_projections=torch.randn(1, 768, device=DEV, dtype=torch.bfloat16),
            timestep=torch.tensor([0.5], device=DEV, dtype=torch.bfloat16),
            guidance=torch.tensor([3.5], device=DEV, dtype=torch.bfloat16),
            img_ids=ids.reshape(-1, 3).to(DEV), txt_ids=torch.zeros(n_txt, 3, device=DEV), return_dict=False)
        configs = {"stock": None, "host": [], "host+noop": [NoOp()],
                   "entropy": [EntropyScaling()]}  # native 1024: λ = 1 at 1024 (short-circuit), ≠ 1 at 2048
        out[f"{px}px_{n_img + n_txt}tok"] = time_configs(lambda: model(**inputs), model, configs, rounds)
        with torch.no_grad():
            ref = model(**inputs)[0]
            with apply(model, [NoOp()]):
                got = model(**inputs)[0]
        out[f"{px}px_noop_max_diff"] = max_diff(got, ref)
    report["flux_full_size_bf16"] = out
    del model
    torch.cuda.empty_cache()


def sdxl_timing(report, rounds):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(DEV):
        unet = UNet2DConditionModel(
            sample_size=128, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816, layers_per_block=2).eval()
    torch.set_default_dtype(torch.float32)
    inputs = dict(sample=torch.randn(2, 4, 128, 128, device=DEV, dtype=torch.bfloat16),
                  timestep=torch.tensor([500.0], device=DEV),
                  encoder_hidden_states=torch.randn(2, 77, 2048, device=DEV, dtype=torch.bfloat16),
                  added_cond_kwargs={"text_embeds": torch.randn(2, 1280, device=DEV, dtype=torch.bfloat16),
                                     "time_ids": torch.randn(2, 6, device=DEV, dtype=torch.bfloat16)},
                  return_dict=False)
    configs = {"stock": None, "host": [], "host+noop": [NoOp()], "entropy": [EntropyScaling(train_size=768)]}
    report["sdxl_unet_1024px_bf16_batch2"] = {
        "params_B": round(sum(p.numel() for p in unet.parameters()) / 1e9, 3),
        **time_configs(lambda: unet(**inputs), unet, configs, rounds)}
    del unet
    torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--device", default="cuda", help="cpu: dry run of the correctness and backend checks only")
    args = ap.parse_args()
    global DEV
    DEV = args.device
    report = {"device": torch.cuda.get_device_name() if DEV == "cuda" else DEV, "torch": torch.__version__}
    t0 = time.time()
    for name, step in (("correctness", correctness), ("backends", backends),
                       ("flux", lambda r: flux_timing(r, args.rounds)), ("sdxl", lambda r: sdxl_timing(r, args.rounds))):
        if DEV != "cuda" and name in ("flux", "sdxl"):
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
