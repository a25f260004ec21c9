"""torch.compile and host overhead benchmark (issue 16): stock vs attnlab, eager and compiled, in one process.

Modes (each writes benchmarks/results/compile_<mode>_<device>.json and prints a table):

    table      graph breaks in one denoiser forward (`torch._dynamo.explain`) and graph compiles over two 4-step
               runs at 1.5x the native size (`module.compile(backend=CompileCounter)`: traces, then runs the
               graphs eagerly) per family and method, on the tiny pipelines. Runs against whatever `attnlab` imports, so the same command with
               PYTHONPATH pointing at an export of an older commit gives the "before" column.
    overhead   eager Python overhead per attention call (µs over the stock processor, 16 image tokens so Python
               dominates; configs interleaved round-robin, best of N rounds) and, with --profile, a cProfile of
               the calls (where the time goes).
    pipelines  whole tiny-pipeline runs (3 steps at 1.5x the native size), stock vs attnlab, eager and compiled
               with inductor (CPU: slow to compile, fine once), all configurations of a family round-robin, median
               of N rounds; ratios to stock in the same process and mode.
    gpu        (device machine) an SDXL-size UNet (1024 px, batch 2) and the FLUX.1-size transformer (1024 px),
               bf16, random weights: denoiser forward time for stock / host / host + no-op effect / entropy
               scaling, eager and compiled (inductor), synchronised wall time over --per-sync forwards,
               configurations interleaved, median of N rounds. --smoke runs it on tiny CPU models.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/compile_bench.py table
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/compile_bench.py overhead --families sd15 sdxl flux wan --profile
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/compile_bench.py pipelines --families sd15 flux
    python benchmarks/compile_bench.py gpu --rounds 10                     # on a CUDA machine
    python benchmarks/compile_bench.py gpu --models sdxl --modes eager      # one piece at a time (time budget)
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/compile_bench.py gpu --smoke --rounds 1 --backend eager --out /tmp/smoke.json
"""

from __future__ import annotations

import argparse
import cProfile
import inspect
import json
import platform
import pstats
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


# --- what each configuration installs ---------------------------------------------------------------------------
def _effects(name: str, family: str = "", train_size=None):
    from attnlab.processors import EntropyScaling, Recorder

    if name == "host":
        return []
    if name == "noop":
        return [Recorder(summary=lambda call: None)]
    if name == "entropy":
        return [EntropyScaling() if train_size is None else EntropyScaling(train_size=train_size)]
    raise ValueError(name)


def _tiny_run(pipe, family: str, method: str, steps: int, scale: float = 1.5):
    """Install `method` on the tiny pipeline; returns (object holding the denoiser, attribute, run)."""
    import attnlab
    from attnlab.models.tiny import default_size, output_tensor, tiny_call_kwargs

    h, w = default_size(family)
    kw = lambda: tiny_call_kwargs(family, num_inference_steps=steps, output_type="latent",  # noqa: E731
                                  height=int(h * scale) // 16 * 16, width=int(w * scale) // 16 * 16)
    attr = "unet" if family in ("sd15", "sdxl") else "transformer"
    if method == "stock":
        return pipe, attr, lambda: output_tensor(pipe(**kw()))
    if method == "softpag":
        sp = attnlab.SoftPAGPipeline(pipe, heads="L1:*", scale=2.0)
        return pipe, attr, lambda: output_tensor(sp(**kw()))
    attnlab.apply(pipe, _effects(method), **({"native_size": (5, 128, 128)} if family == "wan" else {}))
    return pipe, attr, lambda: output_tensor(pipe(**kw()))


# --- table: graph breaks and compiles --------------------------------------------------------------------------
def table(args) -> dict:
    import torch._dynamo as dynamo
    from torch._dynamo.testing import CompileCounter

    from attnlab.models.tiny import build_tiny_pipeline

    rows = []
    for family in args.families:
        for method in args.methods:
            row = {"family": family, "method": method}
            try:
                pipe = build_tiny_pipeline(family)
                holder, attr, run = _tiny_run(pipe, family, method, steps=4)
                den = getattr(holder, attr)
                reports = []

                def explain_first(module, a, k):
                    handle.remove()
                    reports.append(dynamo.explain(module)(*a, **k))

                handle = den.register_forward_pre_hook(explain_first, with_kwargs=True)
                with torch.no_grad():
                    run()
                row["graph_breaks"] = reports[0].graph_break_count
                row["break_reasons"] = sorted({r.reason.splitlines()[0][:120] for r in reports[0].break_reasons})
                dynamo.reset()
                counter = CompileCounter()
                den.compile(backend=counter)  # in place: older commits refuse a torch.compile wrapper
                with torch.no_grad():
                    run()
                    run()
                row["compiles_two_runs"] = counter.frame_count
            except Exception as e:  # an older commit may not support a method at all
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            dynamo.reset()
            rows.append(row)
            print(f"{family:<7}{method:<9}", {k: v for k, v in row.items() if k not in ("family", "method")}, flush=True)
    return {"rows": rows}


# --- overhead: µs of Python per attention call -----------------------------------------------------------------
def overhead(args) -> dict:
    from attnlab.models.tiny import build_tiny_pipeline, denoiser_of
    from attnlab.processors.host_diffusers import apply, attention_sites

    out = []
    for family in args.families:
        pipe = build_tiny_pipeline(family)
        spec = next(s for s in attention_sites(denoiser_of(pipe)) if s.site.kind in ("self", "joint"))
        mod = spec.module
        x = torch.randn(1, 16, mod.to_q.in_features)
        kw = {}
        if spec.site.kind == "joint":
            kw["encoder_hidden_states"] = torch.randn(1, 4, mod.add_q_proj.in_features)
        configs = ["stock", "host", "noop", "entropy"]
        sessions = {}

        def install(name):
            if name == "stock":
                return None
            s = apply(pipe, _effects(name, train_size=8 if family != "wan" else (1, 16, 16)))
            st = s.state  # the geometry a forward with a 4x4-token latent would have set
            st.latent = (1, 4, 4) if family in ("sd15", "sdxl") else (1, 8, 8)
            st.grid, st.roles = (1, 4, 4), ("cond",)
            return s

        best = {c: float("inf") for c in configs}
        with torch.no_grad():
            for r in range(args.rounds + 1):
                for name in configs:
                    s = install(name)
                    for _ in range(100):
                        mod(x, **kw)
                    t0 = time.process_time()
                    for _ in range(args.calls):
                        mod(x, **kw)
                    dt = (time.process_time() - t0) / args.calls * 1e6
                    if r:
                        best[name] = min(best[name], dt)
                    if s is not None:
                        s.remove()
            profiles = {}
            if args.profile:
                for name in configs:
                    s = install(name)
                    pr = cProfile.Profile()
                    pr.enable()
                    for _ in range(args.calls):
                        mod(x, **kw)
                    pr.disable()
                    if s is not None:
                        s.remove()
                    profiles[name] = _attnlab_lines(pr, args.calls)
        row = {"family": family, "module": spec.name, "us_per_call": {k: round(v, 2) for k, v in best.items()},
               "overhead_us": {k: round(v - best["stock"], 2) for k, v in best.items()}}
        if profiles:
            row["profile_us_per_call"] = profiles
        out.append(row)
        print(f"{family:<7} stock {best['stock']:.1f} us   overhead us: "
              + " | ".join(f"{k} {v - best['stock']:+.2f}" for k, v in best.items() if k != "stock"), flush=True)
        for name, lines in profiles.items():
            if lines:
                print(f"   {name}: " + "; ".join(f"{fn} {us}" for fn, us in lines[:6]))
    return {"per_call": out}


def _attnlab_lines(profile: cProfile.Profile, calls: int, top: int = 8) -> list:
    """attnlab's own functions in a profile: (file:function, µs of own time per attention call), largest first.
    (cProfile inflates every function call; compare configurations, not absolute µs.)"""
    import attnlab

    root = str(Path(attnlab.__file__).resolve().parent)
    rows = [(f"{Path(f).name}:{fn}", tt / calls * 1e6) for (f, _, fn), (_, _, tt, _, _) in pstats.Stats(profile).stats.items()
            if f.startswith(root) and "/.venv/" not in f]
    return [(name, round(us, 2)) for name, us in sorted(rows, key=lambda r: -r[1])[:top]]


# --- pipelines: eager and inductor-compiled runs ---------------------------------------------------------------
def pipelines(args) -> dict:
    """Every (method, eager/compiled) configuration of a family gets its own pipeline; after each is warmed up
    (compiled ones: the first call compiles, timed separately) they run round-robin, so a slow phase of a shared
    machine hits all of them; per configuration the median of the rounds."""
    from attnlab.models.tiny import build_tiny_pipeline

    rows = []
    for family in args.families:
        runs, first = {}, {}
        with torch.no_grad():
            for method in args.methods:
                for mode in ("eager", "compiled"):
                    holder, attr, run = _tiny_run(build_tiny_pipeline(family), family, method, steps=3)
                    if mode == "compiled":
                        setattr(holder, attr, torch.compile(getattr(holder, attr), backend=args.backend))
                    t0 = time.perf_counter()
                    run()
                    first[(method, mode)] = time.perf_counter() - t0
                    run()
                    runs[(method, mode)] = run
                    print(f"{family:<7}{method:<9}{mode:<9} ready (first call {first[(method, mode)]:.1f} s)", flush=True)
            times = {key: [] for key in runs}
            for _ in range(args.repeats):
                for key, run in runs.items():
                    t0 = time.process_time()
                    run()
                    times[key].append(time.process_time() - t0)
        med = {key: statistics.median(v) for key, v in times.items()}
        for (method, mode), m in med.items():
            rows.append({"family": family, "method": method, "mode": mode, "median_s": round(m, 5),
                         "min_s": round(min(times[(method, mode)]), 5),
                         "ratio_to_stock": round(m / med[("stock", mode)], 4),
                         "speedup_vs_eager": round(med[(method, "eager")] / m, 3),
                         "first_call_s": round(first[(method, mode)], 2)})
        for r in rows[-len(med):]:
            print(f"{family:<7}{r['method']:<9}{r['mode']:<9} median {r['median_s']:.4f} s  ratio to stock "
                  f"{r['ratio_to_stock']:.3f}  speed-up vs eager {r['speedup_vs_eager']:.2f}", flush=True)
    return {"rows": rows}


# --- gpu: real-size denoisers ----------------------------------------------------------------------------------
def _gpu_models(smoke: bool, which=("sdxl", "flux")):
    """(name, model, inputs, entropy train size, unpacked latent for `begin_run`) at real size on CUDA, or with
    --smoke the tiny SDXL/FLUX denoisers on the CPU (checks the script, not the numbers)."""
    if smoke:
        from attnlab.models.tiny import build_tiny_pipeline

        for family in which:
            pipe = build_tiny_pipeline(family)
            den = pipe.unet if family == "sdxl" else pipe.transformer
            captured = {}
            hook = den.register_forward_pre_hook(lambda m, a, k: captured.setdefault("kw", (a, k)), with_kwargs=True)
            with torch.no_grad():
                pipe(**_tiny_kwargs(family))
            hook.remove()
            a, k = captured["kw"]
            k = {**dict(zip(inspect.signature(den.forward).parameters, a)), **k}
            yield family, den, k, 32, torch.empty(1, 16, 32, 32)
        return
    sys.path.insert(0, str(HERE))
    from big_models import flux_inputs, flux_transformer, sdxl_inputs, sdxl_unet

    if "sdxl" in which:
        yield "sdxl_unet_1024px_bf16_batch2", sdxl_unet("cuda"), sdxl_inputs("cuda"), 768, None
        torch.cuda.empty_cache()
    if "flux" in which:  # entropy at FLUX's native 1024 px: λ = 1 (the short-circuit); its 64x64-token grid, as a
        # pipeline sets it
        yield ("flux_1024px_bf16", flux_transformer("cuda"), flux_inputs("cuda"), None,
               torch.empty(1, 16, 128, 128, device="cuda"))


def _tiny_kwargs(family):
    from attnlab.models.tiny import tiny_call_kwargs

    return tiny_call_kwargs(family, num_inference_steps=1, output_type="latent")


def gpu(args) -> dict:
    import random

    import torch._dynamo as dynamo

    from attnlab.processors.host_diffusers import apply

    sync = torch.cuda.synchronize if torch.cuda.is_available() and not args.smoke else (lambda: None)
    report = {}
    for name, model, x, train, latents in _gpu_models(args.smoke, args.models):
        configs = {"stock": None, "host": [], "noop": _effects("noop"), "entropy": _effects("entropy", train_size=train)}
        result = {}
        for mode in args.modes:
            dynamo.reset()
            fn = torch.compile(model, backend=args.backend) if mode == "compiled" else model  # a graph per config
            times = {c: [] for c in configs}
            order = random.Random(0)
            for r in range(args.rounds + 2):  # the first two rounds warm up (and compile)
                names = list(configs)
                order.shuffle(names)
                for c in names:
                    session = apply(model, configs[c]) if configs[c] is not None else None
                    if session is not None and latents is not None:
                        session.state.begin_run(latents)
                    with torch.no_grad():
                        fn(**x)
                        sync()
                        t0 = time.perf_counter()
                        for _ in range(args.per_sync):
                            fn(**x)
                        sync()
                        dt = (time.perf_counter() - t0) / args.per_sync * 1e3
                    if session is not None:
                        session.remove()
                    if r >= 2:
                        times[c].append(dt)
            med = {c: statistics.median(v) for c, v in times.items()}
            result[mode] = {"median_ms": {c: round(v, 3) for c, v in med.items()},
                            "min_ms": {c: round(min(v), 3) for c, v in times.items()},
                            "ratio_to_stock": {c: round(v / med["stock"], 4) for c, v in med.items()}}
            print(name, mode, result[mode], flush=True)
        if len(result) == 2:
            result["compiled_speedup_vs_eager"] = {
                c: round(result["eager"]["median_ms"][c] / result["compiled"]["median_ms"][c], 3) for c in configs}
        report[name] = result
        del model
    return report


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["table", "overhead", "pipelines", "gpu"])
    ap.add_argument("--families", nargs="*", default=None)
    ap.add_argument("--methods", nargs="*", default=None)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--per-sync", type=int, default=3)
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="gpu mode: tiny models on the CPU, to check the script")
    ap.add_argument("--models", nargs="*", default=["sdxl", "flux"], help="gpu mode: sdxl and/or flux")
    ap.add_argument("--modes", nargs="*", default=["eager", "compiled"], help="gpu mode: eager and/or compiled")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    defaults = {"table": (["sd15", "flux"], ["stock", "host", "entropy", "softpag"]),
                "overhead": (["sd15", "sdxl", "flux", "wan"], None),
                "pipelines": (["sd15", "flux"], ["stock", "host", "noop", "entropy", "softpag"]),
                "gpu": (None, None)}[args.mode]
    args.families = args.families or defaults[0]
    args.methods = args.methods or defaults[1]
    device = "cuda" if args.mode == "gpu" and not args.smoke else "cpu"
    t0 = time.time()
    try:
        body = {"table": table, "overhead": overhead, "pipelines": pipelines, "gpu": gpu}[args.mode](args)
    except Exception:
        body = {"error": traceback.format_exc()[-3000:]}
        print(body["error"])
    report = {"command": "python benchmarks/compile_bench.py " + " ".join(sys.argv[1:]),
              "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                          "device": torch.cuda.get_device_name() if device == "cuda" else "cpu"},
              "seconds": round(time.time() - t0, 1), **body}
    out = Path(args.out or HERE / "results" / f"compile_{args.mode}_{device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
