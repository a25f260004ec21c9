"""Where the host's CPU time goes on a launch-bound model: cProfile of an SDXL-sized UNet forward (bf16,
CUDA), stock processors vs attnlab's pass-through processors, plus the per-call cost of diffusers'
`inspect.signature(processor.__call__)` for both processor classes.

    python benchmarks/profile_host.py
"""

import cProfile
import inspect
import io
import pstats
import sys
import time

import torch
from big_models import sdxl_inputs, sdxl_unet

from attnlab.processors.host_diffusers import apply

dev = "cuda" if torch.cuda.is_available() else "cpu"
unet = sdxl_unet(dev)
inputs = sdxl_inputs(dev, size=128 if dev == "cuda" else 16)


def profile(label, n=5):
    with torch.no_grad():
        for _ in range(3):
            unet(**inputs)
        if dev == "cuda":
            torch.cuda.synchronize()
        pr = cProfile.Profile()
        t0 = time.process_time()
        pr.enable()
        for _ in range(n):
            unet(**inputs)
        pr.disable()
        cpu = (time.process_time() - t0) / n * 1e3
        if dev == "cuda":
            torch.cuda.synchronize()
    out = io.StringIO()
    pstats.Stats(pr, stream=out).sort_stats("tottime").print_stats(18)
    print(f"==== {label}: {cpu:.1f} ms CPU per forward (under cProfile)\n" + out.getvalue()[-4000:])


print(sys.version, torch.__version__, dev)
mod = next(m for m in unet.modules() if hasattr(m, "set_processor"))
for label, proc in (("stock", mod.processor),):
    t0 = time.perf_counter()
    for _ in range(20000):
        inspect.signature(proc.__call__)
    print(label, "inspect.signature us", round((time.perf_counter() - t0) / 20000 * 1e6, 2))
profile("stock")
with apply(unet, []):
    t0 = time.perf_counter()
    for _ in range(20000):
        inspect.signature(mod.processor.__call__)
    print("attnlab inspect.signature us", round((time.perf_counter() - t0) / 20000 * 1e6, 2))
    profile("attnlab host, no effects")
