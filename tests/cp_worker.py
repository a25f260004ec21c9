"""Multi-process helpers for the context-parallel tests (tests/test_context_parallel.py).

`launch(target, world, *args)` forks `world` processes that join a gloo process group on 127.0.0.1 and run
``target(rank, world, *args)``; each returns a picklable result. A process that fails or outlives the timeout
fails the test (a divergence between the ranks' collectives hangs, so every launch has a deadline).

Two shims for diffusers 0.42.1 on CPU, kept here and out of attnlab:
- `enable_cp`: `ModelMixin._resolve_parallel_config` computes ``rank % torch.accelerator.device_count()``,
  which is 0 without an accelerator (ZeroDivisionError); the shim reports one device while it runs.
- `native_lse`: ring attention asks its kernel for the log-sum-exp, which the NATIVE backend (SDPA) does not
  return; the shim computes it explicitly (sites without effects use diffusers' ring kernel).
"""

from __future__ import annotations

import contextlib
import copy
import multiprocessing as mp
import os
import socket
import traceback

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank, world, port, target, args, queue):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    try:
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        result = target(rank, world, *args)
        dist.barrier()  # rank 0 hosts the store: nobody leaves while another rank still talks to it
    except BaseException:  # noqa: BLE001 - the parent reports it
        queue.put((rank, "error", traceback.format_exc()))
        return
    queue.put((rank, "ok", result))


def launch(target, world: int = 2, *args, timeout: float = 240.0) -> list:
    """Run ``target(rank, world, *args)`` in `world` forked processes; their results by rank."""
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(r, world, port, target, args, queue), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    results, errors = {}, []
    try:
        for _ in range(world):
            rank, status, value = queue.get(timeout=timeout)
            (results.__setitem__(rank, value) if status == "ok" else errors.append(f"rank {rank}:\n{value}"))
            if errors:
                break
    except Exception as exc:  # queue.Empty: a rank hung (diverging collectives) or died silently
        errors.append(f"no result within {timeout:.0f} s ({type(exc).__name__}); ranks done: {sorted(results)}")
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world)]


# --- the two shims ---------------------------------------------------------------------------------------
def enable_cp(model, mode: str, world: int, **options) -> None:
    """`model.enable_parallelism` with Ulysses or ring over `world` processes, on CPU as well."""
    from diffusers import ContextParallelConfig

    config = ContextParallelConfig(**{f"{mode}_degree": world}, **options)
    real = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: max(1, real())
    try:
        model.enable_parallelism(config=config)
    finally:
        torch.accelerator.device_count = real


def _native_forward_with_lse(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                             enable_gqa=False, return_lse=False, _save_ctx=True, _parallel_config=None):
    q, k, v = (x.permute(0, 2, 1, 3) for x in (query, key, value))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
    out = out.permute(0, 2, 1, 3)
    if not return_lse:
        return out
    logits = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if attn_mask is not None:
        logits = logits + attn_mask
    return out, logits.logsumexp(-1).permute(0, 2, 1)


@contextlib.contextmanager
def native_lse():
    from diffusers.models import attention_dispatch

    original = attention_dispatch._native_attention_forward_op
    attention_dispatch._native_attention_forward_op = _native_forward_with_lse
    try:
        yield
    finally:
        attention_dispatch._native_attention_forward_op = original


# --- tiny pipelines -----------------------------------------------------------------------------------------
def tiny_pipe(family: str):
    from attnlab.models.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(family)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def fresh_denoiser(pipe, pristine) -> torch.nn.Module:
    """Put a copy of the pristine denoiser into `pipe` (enable_parallelism cannot be undone)."""
    pipe.transformer = copy.deepcopy(pristine)
    return pipe.transformer


def call_kwargs(family: str, **overrides) -> dict:
    from attnlab.models.tiny import tiny_call_kwargs

    kw = tiny_call_kwargs(family, output_type="latent", num_inference_steps=2)
    kw.update(overrides)
    return kw


def max_error(a, b) -> float:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), (sorted(a), sorted(b))
        return max((max_error(a[k], b[k]) for k in a), default=0.0)
    return float((a.float() - b.float()).abs().max())
