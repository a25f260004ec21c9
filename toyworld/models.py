"""Loader for the small toy-world models shipped with the pack (issue 8).

The weights live in ``<package>/models/toy/<name>/`` as ordinary diffusers pipeline folders (fp16
safetensors, made by ``python -m attnlab.toyworld.train``), so they also load with
``DiffusionPipeline.from_pretrained(dir)``. Loading never touches the network (``local_files_only``), so it
works with ``HF_HUB_OFFLINE=1``.

    from attnlab.toyworld.models import load_toy_pipeline, toy_call_kwargs
    pipe = load_toy_pipeline("sd")                     # StableDiffusionPipeline, 48x48 images
    image = pipe("a large red circle on a plain white background", **toy_call_kwargs("sd")).images[0]
"""

from __future__ import annotations

import json
from pathlib import Path

TOY_ROOT = Path(__file__).resolve().parents[1] / "models" / "toy"
TOY_MODELS = ("sd", "flux")
_ALIASES = {"toy-sd": "sd", "toy-flux": "flux", "toy_sd": "sd", "toy_flux": "flux"}
_PIPELINE_CLASSES = {"sd": "StableDiffusionPipeline", "flux": "FluxPipeline"}
# Sampling settings the evaluation numbers in docs/toyworld.md were measured with.
_CALL_DEFAULTS = {
    "sd": {"num_inference_steps": 25, "guidance_scale": 2.5},
    "flux": {"num_inference_steps": 20, "guidance_scale": 1.0, "true_cfg_scale": 4.0, "negative_prompt": "",
             "max_sequence_length": 32},
}

__all__ = ["TOY_MODELS", "TOY_ROOT", "available_toy_models", "load_toy_pipeline", "toy_call_kwargs",
           "toy_image_size", "toy_model_dir"]


def _canonical(name: str) -> str:
    key = _ALIASES.get(str(name).lower(), str(name).lower())
    if key not in TOY_MODELS:
        raise ValueError(f"unknown toy model {name!r}; expected one of {TOY_MODELS} (or toy-sd / toy-flux)")
    return key


def toy_model_dir(name: str = "sd") -> Path:
    """Folder of the shipped toy model ``name`` ("sd" / "flux", or "toy-sd" / "toy-flux"); may not exist."""
    return TOY_ROOT / _canonical(name)


def available_toy_models() -> list[str]:
    """Names of the toy models whose weights are present on disk."""
    return [n for n in TOY_MODELS if (TOY_ROOT / n / "model_index.json").is_file()]


def _training_info(path: Path) -> dict:
    f = path / "training.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def toy_image_size(name: str = "sd") -> int:
    """Native (training) image side in pixels."""
    return int(_training_info(toy_model_dir(name)).get("size", 48))


def toy_call_kwargs(name: str = "sd", **overrides) -> dict:
    """Call arguments (size, steps, guidance) the toy model was evaluated with; ``overrides`` win."""
    key = _canonical(name)
    side = toy_image_size(key)
    kw = {"height": side, "width": side, **_CALL_DEFAULTS[key]}
    kw.update(overrides)
    return kw


def load_toy_pipeline(name: str = "sd", device: str = "cpu", dtype=None, path: str | Path | None = None):
    """Load a shipped toy model as a diffusers pipeline, offline.

    name: "sd" (StableDiffusionPipeline) or "flux" (FluxPipeline); path: load another folder made by
    ``attnlab.toyworld.train`` instead. dtype: default float32 on CPU, float16 elsewhere. Raises
    FileNotFoundError naming the train command when the weights are missing.
    """
    import diffusers
    import torch

    key = _canonical(name)
    folder = Path(path) if path is not None else toy_model_dir(key)
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(
            f"toy model {key!r} weights not found in {folder} (no model_index.json). Train them with "
            f"`python -m attnlab.toyworld.train --arch {key} --out {folder}`"
            + (" --vae-from models/toy/sd" if key == "flux" else "") + ", or reinstall the package with its data.")
    if dtype is None:
        dtype = torch.float32 if str(device).startswith("cpu") else torch.float16
    cls = getattr(diffusers, _PIPELINE_CLASSES[key])
    pipe = cls.from_pretrained(str(folder), dtype=dtype, local_files_only=True)
    if key == "flux":  # a reloaded FluxPipeline forgets its native size
        pipe.default_sample_size = int(_training_info(folder).get("size", 48)) // pipe.vae_scale_factor
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def comfy_incompatibilities(configs: dict) -> list[str]:
    """What keeps ComfyUI's own model classes from building a toy model with these component configs
    (``{"vae": {...}, "unet" | "transformer": {...}}``, diffusers config dicts); [] when nothing does.

    ComfyUI's VAE (``Normalize``) and UNet (``GroupNorm32``) hard-code 32-group norms, its VAE always has the
    mid-block attention, its UNet takes one head width (``num_head_channels``) for every level, and its
    ``Flux`` class packs 2x2 latent patches into tokens whose RoPE axes must fill the head width."""
    problems = []
    vae = configs.get("vae") or {}
    if vae:
        if vae.get("norm_num_groups") != 32:
            problems.append(f"vae: norm_num_groups {vae.get('norm_num_groups')} (ComfyUI's VAE uses 32)")
        if any(c % 32 for c in vae.get("block_out_channels", ())):
            problems.append(f"vae: block_out_channels {list(vae['block_out_channels'])} not multiples of 32")
        if not vae.get("mid_block_add_attention", True):
            problems.append("vae: no mid-block attention (ComfyUI's VAE always has one)")
    unet = configs.get("unet")
    if unet:
        blocks = list(unet["block_out_channels"])
        heads = unet.get("num_attention_heads") or unet.get("attention_head_dim")
        heads = [heads] * len(blocks) if isinstance(heads, int) else list(heads)
        if unet.get("norm_num_groups") != 32 or any(c % 32 for c in blocks):
            problems.append(f"unet: norm_num_groups {unet.get('norm_num_groups')} / channels {blocks} "
                            "(ComfyUI's GroupNorm32 needs 32 groups)")
        widths = {c // h for c, h in zip(blocks, heads)}
        if len(widths) != 1:
            problems.append(f"unet: head widths {sorted(widths)} differ across levels (ComfyUI takes one)")
    flux = configs.get("transformer")
    if flux:
        if flux.get("patch_size", 1) != 1 or flux["in_channels"] % 4:
            problems.append("transformer: expected diffusers' packed 2x2 patches (patch_size 1, in_channels 4*c)")
        if sum(flux["axes_dims_rope"]) != flux["attention_head_dim"]:
            problems.append("transformer: RoPE axes do not fill the head width")
    return problems


def folder_configs(folder: str | Path) -> dict:
    """The component config dicts of a saved pipeline folder."""
    folder = Path(folder)
    return {p.parent.name: json.loads(p.read_text()) for p in folder.glob("*/config.json")}
