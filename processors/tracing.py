"""What keeps the hot path cheap in eager mode and traceable by torch.compile (see docs/performance.md).

A compiled graph bakes in every Python value it read and guards on it: an int that changes every step
recompiles every step, and a cache dict that the first call fills fails the guard of the second call.
So per-site Python work is memoised in eager mode but traced (and then free) under compile, and values
that change every step reach the graph as tensors.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import torch

T = TypeVar("T")

compiling: Callable[[], bool] = torch.compiler.is_compiling


def cached(cache: dict, key, build: Callable[[], T], limit: int = 256) -> T:
    """`build()` memoised in `cache` under `key` in eager mode (the cache is cleared past `limit` entries);
    under torch.compile computed directly, so the graph guards on `key`'s parts, not on the cache."""
    if compiling():
        return build()
    found = cache.get(key)
    if found is None:
        if len(cache) >= limit:
            cache.clear()
        found = cache[key] = build()
    return found
