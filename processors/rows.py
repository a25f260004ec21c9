"""Batch-row selection shared by both hosts (no framework imports)."""

from __future__ import annotations

import torch


def take_rows(value, index: list[int], batch: int):
    """`value` with its batch rows `index` selected: tensors whose first dim is the batch, recursively
    inside dicts, lists and tuples; anything else (scalar timesteps, position ids, flags) unchanged."""
    if torch.is_tensor(value):
        return value[index] if value.ndim > 0 and value.shape[0] == batch else value
    if isinstance(value, dict):
        return type(value)((k, take_rows(v, index, batch)) for k, v in value.items())
    if isinstance(value, (list, tuple)) and not isinstance(value, str):
        return type(value)(take_rows(v, index, batch) for v in value)
    return value
