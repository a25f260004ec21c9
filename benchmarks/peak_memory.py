"""Peak memory of one call, measured in a fresh child process per variant (shared by the cost benchmarks).

CPU: the growth of the resident-set high-water mark over the level before the call — VmHWM after resetting
it (`/proc/self/clear_refs` 5; a child's `ru_maxrss` starts at its parent's RSS at fork, which hides peaks),
`ru_maxrss` where that reset is unavailable. CUDA: `torch.cuda.max_memory_allocated()` over the allocated level.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from typing import Callable

import torch


def _ru_maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _vm_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_of(fn: Callable[[], torch.Tensor], device: str) -> dict:
    """Run `fn()` once; its peak memory above the level before it (MiB), wall seconds, the method used and a
    checksum of the last row of its output (to compare variants' results)."""
    _sync(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base, method = torch.cuda.memory_allocated(), "cuda.max_memory_allocated"
    elif _reset_rss_peak():
        base, method = _vm_kib("VmRSS") * 1024, "VmHWM after clear_refs reset"
    else:
        base, method = _ru_maxrss_bytes(), "ru_maxrss"
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    wall = time.perf_counter() - t0
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() - base
    elif method == "ru_maxrss":
        peak = _ru_maxrss_bytes() - base
    else:
        peak = _vm_kib("VmHWM") * 1024 - base
    return {"peak_mib": round(max(0, peak) / 2**20, 1), "seconds": round(wall, 4), "method": method,
            "checksum": float(out[-1].double().abs().mean())}


def run_children(script: str, variants, child_args: list[str], cwd: str) -> list[dict]:
    """Run `script --_memory-child VARIANT *child_args` per variant; each child prints one JSON row last."""
    rows = []
    for variant in variants:
        done = subprocess.run([sys.executable, script, "--_memory-child", variant, *child_args],
                              capture_output=True, text=True, cwd=cwd)
        if done.returncode != 0:
            rows.append({"variant": variant, "error": done.stderr.strip().splitlines()[-1:]})
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return rows


def mark_same_result(rows: list[dict], reference: str, variants, key: str) -> None:
    """Set `key` on the rows of `variants`: whether their checksum matches the `reference` variant's."""
    ref = next((r for r in rows if r["variant"] == reference and "checksum" in r), None)
    for r in rows:
        if ref is not None and "checksum" in r and r["variant"] in variants:
            r[key] = abs(r["checksum"] - ref["checksum"]) <= 1e-4 * max(1.0, abs(ref["checksum"]))
