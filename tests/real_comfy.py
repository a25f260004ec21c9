"""Helpers for tests against a real, user-supplied ComfyUI checkout (env ``COMFYUI_DIR``).

Our own code (MIT). Nothing here copies ComfyUI code; ComfyUI (GPL-3.0) is imported at run time
from ``COMFYUI_DIR`` only. Needs ComfyUI's Python dependencies in the running interpreter (for a
CPU-only venv without torchvision, put a torchvision stub package on ``PYTHONPATH``), e.g.::

    COMFYUI_DIR=/path/to/ComfyUI PYTHONPATH=/path/to/stubs /path/to/comfy-venv/bin/python -m pytest \
        tests/test_comfy_contract.py -m comfyui

Same public names/signatures as ``tests/fake_comfy`` so tests can be parametrised over both:
``build_tiny``, ``conditioning``, ``latent``, ``sample_tiny`` (alias ``sample``), ``WrappersMP``,
``calc_cond_batch``, ``source_info``.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import types

import torch

from fake_comfy.models import FAMILIES, LATENT_SHAPE, TEXT_LEN, conditioning, latent  # shared plain-data helpers

NAME = "real"
__all__ = ["FAMILIES", "LATENT_SHAPE", "NAME", "TEXT_LEN", "build_tiny", "comfy_available", "comfy_dir",
           "conditioning", "import_comfy", "init_weights", "latent", "sample", "sample_tiny", "source_info"]


def comfy_dir() -> str | None:
    d = os.environ.get("COMFYUI_DIR")
    return os.path.abspath(d) if d else None


@functools.lru_cache(maxsize=1)
def import_comfy() -> types.SimpleNamespace:
    """Import ComfyUI from ``COMFYUI_DIR`` as a library on CPU; returns its modules."""
    d = comfy_dir()
    if not d or not os.path.isdir(os.path.join(d, "comfy")):
        raise RuntimeError("COMFYUI_DIR does not point at a ComfyUI checkout")
    if d not in sys.path:
        sys.path.insert(0, d)
    import comfy.options
    comfy.options.enable_args_parsing(False)
    import comfy.cli_args
    comfy.cli_args.args.cpu = True  # must happen before comfy.model_management is imported
    import comfy.model_management
    import comfy.model_patcher
    import comfy.patcher_extension
    import comfy.sample
    import comfy.samplers
    import comfy.supported_models
    import comfy.ldm.modules.attention
    return types.SimpleNamespace(
        model_management=comfy.model_management, model_patcher=comfy.model_patcher,
        patcher_extension=comfy.patcher_extension, sample=comfy.sample, samplers=comfy.samplers,
        supported_models=comfy.supported_models, attention=comfy.ldm.modules.attention)


@functools.lru_cache(maxsize=1)
def comfy_available() -> bool:
    """True when ``COMFYUI_DIR`` is set and ComfyUI imports in this interpreter."""
    if not comfy_dir():
        return False
    try:
        import_comfy()
        return True
    except Exception:  # missing deps, wrong dir, ...
        return False


def __getattr__(name):  # lazy ComfyUI-backed names
    if name == "WrappersMP":
        return import_comfy().patcher_extension.WrappersMP
    if name == "CallbacksMP":
        return import_comfy().patcher_extension.CallbacksMP
    if name == "calc_cond_batch":
        return import_comfy().samplers.calc_cond_batch
    raise AttributeError(name)


def source_info() -> dict:
    d = comfy_dir()
    info = {"backend": "real_comfyui", "torch": torch.__version__.split("+")[0]}
    try:
        sys.path.insert(0, d)
        import comfyui_version
        info["comfyui_version"] = comfyui_version.__version__
    except Exception:
        info["comfyui_version"] = "unknown"
    commit = os.environ.get("COMFYUI_COMMIT")
    if not commit and d:
        try:
            commit = subprocess.run(["git", "-C", d, "rev-parse", "HEAD"], capture_output=True, text=True,
                                    timeout=10).stdout.strip() or None
        except Exception:
            commit = None
    info["comfyui_commit"] = commit or "unknown"
    return info


# ----------------------------------------------------------------------------- tiny models
# Same seeded initialisation as the fake (ComfyUI builds layers uninitialised; norms by type or by a
# class name containing "norm": Flux RMSNorm.scale, MMDiT/Wan RMSNorm.weight; the MMDiT pos_embed buffer).
from fake_comfy.models import init_weights  # noqa: E402


def _configs(family: str):
    """``(supported_models class name, unet_config, post-init overrides)``: the tiny probe configs."""
    f32 = torch.float32
    if family in ("sd15", "sdxl"):
        uc = {"model_channels": 32, "channel_mult": [1, 2], "num_res_blocks": [1, 1], "transformer_depth": [1, 1],
              "transformer_depth_output": [1, 1, 1, 1], "transformer_depth_middle": 1,
              "use_spatial_transformer": True, "context_dim": 32, "in_channels": 4, "out_channels": 4,
              "legacy": False, "image_size": 32, "dtype": f32, "use_linear_in_transformer": family == "sdxl",
              "adm_in_channels": 2816 if family == "sdxl" else None, "use_temporal_attention": False}
        if family == "sdxl":
            uc["num_classes"] = "sequential"
            return "SDXL", uc, {"num_heads": -1, "num_head_channels": 16}
        return "SD15", uc, {"num_heads": 2}
    if family in ("sd3", "sd3_x"):
        x = family == "sd3_x"
        uc = {"in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 2, "pos_embed_scaling_factor": None,
              "pos_embed_max_size": 16, "num_patches": 256, "adm_in_channels": 32,
              "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 32, "out_features": 128}},
              "qk_norm": "rms" if x else None, "x_block_self_attn_layers": [0] if x else [],
              "x_block_self_attn": False, "dtype": f32}
        return "SD3", uc, {}
    if family == "flux":
        uc = {"image_model": "flux", "guidance_embed": True, "in_channels": 16, "out_channels": 16, "vec_in_dim": 32,
              "context_in_dim": 32, "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 2, "depth": 2,
              "depth_single_blocks": 2, "axes_dim": [8, 12, 12], "theta": 10000, "patch_size": 2, "qkv_bias": True,
              "dtype": f32}
        return "Flux", uc, {}
    if family in ("wan_t2v", "wan_i2v"):
        i2v = family == "wan_i2v"
        uc = {"image_model": "wan2.1", "model_type": "i2v" if i2v else "t2v", "patch_size": (1, 2, 2), "text_len": 8,
              "in_dim": 36 if i2v else 16, "dim": 32, "ffn_dim": 64, "freq_dim": 32, "text_dim": 32, "out_dim": 16,
              "num_heads": 2, "num_layers": 2, "window_size": (-1, -1), "qk_norm": True, "cross_attn_norm": True,
              "eps": 1e-6, "dtype": f32}
        return ("WAN21_I2V" if i2v else "WAN21_T2V"), uc, {}
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def build_tiny(family: str, seed: int = 0):
    """A real ``comfy.model_patcher.ModelPatcher`` around a tiny ``family`` model, all weights seeded."""
    c = import_comfy()
    cls_name, uc, post = _configs(family)
    cfg = getattr(c.supported_models, cls_name)(uc)
    cfg.unet_config.update(post)
    model = cfg.get_model({})
    init_weights(model, seed)
    model.eval()
    cpu = torch.device("cpu")
    return c.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def sample_tiny(patcher, family: str, steps: int = 2, cfg: float = 4.0, batch: int = 1, split_calls: bool = False,
                positive=None, negative=None, seed: int = 0, disable_cfg1_optimization: bool = False, latent=None):
    """``comfy.sample.sample`` (euler / normal, denoise 1) on an empty latent of the recorded size.

    ``split_calls=True`` forces ComfyUI's memory-pressure path (cond/uncond as separate model calls) by
    making ``model.memory_required`` report a huge number inside a ``SAMPLER_SAMPLE`` wrapper (so model
    loading is unaffected); the wrapper is removed afterwards."""
    c = import_comfy()
    W = c.patcher_extension.WrappersMP
    if positive is None or negative is None:
        p, n = conditioning(family, seed=seed)
        positive = p if positive is None else positive
        negative = n if negative is None else negative
    lat = globals()["latent"](family, batch) if latent is None else latent
    key = "attnlab_real_comfy_memsplit"
    saved_cfg1 = patcher.model_options.get("disable_cfg1_optimization", None)
    if split_calls:
        def memsplit(executor, *args, **kwargs):
            model = patcher.model
            model.memory_required = lambda *a, **k: 1e30
            try:
                return executor(*args, **kwargs)
            finally:
                del model.memory_required
        patcher.add_wrapper_with_key(W.SAMPLER_SAMPLE, key, memsplit)
    if disable_cfg1_optimization:
        patcher.model_options["disable_cfg1_optimization"] = True
    try:
        noise = c.sample.prepare_noise(lat, seed)
        return c.sample.sample(patcher, noise, steps, cfg, "euler", "normal", positive, negative, lat,
                               denoise=1.0, disable_pbar=True, seed=seed)
    finally:
        if split_calls:
            patcher.remove_wrappers_with_key(W.SAMPLER_SAMPLE, key)
        if disable_cfg1_optimization:
            if saved_cfg1 is None:
                patcher.model_options.pop("disable_cfg1_optimization", None)
            else:
                patcher.model_options["disable_cfg1_optimization"] = saved_cfg1


#: the name used in the brief: ``sample(patcher, family, steps=2, cfg=..., batch=..., split_calls=False)``
sample = sample_tiny
