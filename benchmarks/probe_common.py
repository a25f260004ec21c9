"""Shared by the method probes (benchmarks/*_probe.py): bench rows on VALIDATION scenes, printed and saved."""
from __future__ import annotations

import json
from pathlib import Path

from attnlab.toyworld.bench import HELD_OUT, Bench

VALIDATION = 500_000  # scene seeds from here on: neither the bench's (10 000…) nor the evaluation's (0-199)


def validation_bench(model, n: int, steps: int) -> Bench:
    return Bench(model, n, steps, VALIDATION - HELD_OUT)


def record(results: list, name: str, rows: list[dict], **extra) -> None:
    results.append({"variant": name, **extra, "rows": rows})
    for r in rows:
        print(f"{name}: {r['metric']}: {r['off']:.3f} -> {r['on']:.3f} (n {r['n']})", flush=True)


def save(path: Path, args, results: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"model": args.model, "n": args.n, "steps": args.steps, "variants": results},
                               indent=1) + "\n")
