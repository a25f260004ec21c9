"""Record the golden ComfyUI contract traces (``tests/traces/<scenario>.json``) from a real ComfyUI.

Usage (a user-supplied ComfyUI checkout; this script never downloads or installs ComfyUI)::

    COMFYUI_DIR=/path/to/ComfyUI [COMFYUI_COMMIT=<sha>] PYTHONPATH=/path/to/stubs \
        /path/to/comfy-venv/bin/python tests/record_comfy_traces.py [scenario ...] [--check] [--out DIR]

``--check`` compares with the committed traces instead of writing them (exit 1 on differences).
``COMFYUI_COMMIT`` is stored in the traces when the checkout has no ``.git`` (e.g. a ``git archive``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

TESTS = os.path.dirname(os.path.abspath(__file__))
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)

import torch  # noqa: E402

import comfy_traces as ct  # noqa: E402
import real_comfy  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scenarios", nargs="*", help="default: all of comfy_traces.SCENARIOS")
    ap.add_argument("--out", default=os.path.join(TESTS, "traces"))
    ap.add_argument("--check", action="store_true", help="compare instead of writing")
    args = ap.parse_args(argv)
    if not real_comfy.comfy_dir():
        print("set COMFYUI_DIR to a ComfyUI checkout", file=sys.stderr)
        return 2
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    torch.manual_seed(0)
    t0 = time.time()
    real_comfy.import_comfy()
    print(f"imported ComfyUI from {real_comfy.comfy_dir()} in {time.time() - t0:.1f}s: {real_comfy.source_info()}")
    names = args.scenarios or list(ct.SCENARIOS)
    os.makedirs(args.out, exist_ok=True)
    cache: dict = {}
    failed = 0
    for name in names:
        t = time.time()
        trace = ct.run_scenario(real_comfy, name, cache)
        path = os.path.join(args.out, f"{name}.json")
        s = trace["summary"]
        msg = (f"[{name}] apply={s['apply_model_calls']} attn={s['attention_calls']} "
               f"cond_or_uncond={s['cond_or_uncond']} finite={s['out_finite']} {time.time() - t:.2f}s")
        if args.check:
            diffs = ct.compare(ct.load_trace(path), trace) if os.path.exists(path) else [f"{path}: missing"]
            failed += bool(diffs)
            print(msg + ("  OK" if not diffs else "  DIFFERS:\n    " + "\n    ".join(diffs)))
        else:
            ct.write_trace(path, trace)
            print(msg + f"  -> {os.path.relpath(path)} ({os.path.getsize(path)} bytes)")
    print(f"done in {time.time() - t0:.1f}s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
