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
    "sd": {"num_inference_steps": 25, "guidance_scale": 4.0},
    "flux": {"num_inference_steps": 20, "guidance_scale": 1.0, "true_cfg_scale": 4.0, "negative_prompt": "",
             "max_sequence_length": 32},
}

__all__ = ["TOY_MODELS", "TOY_ROOT", "available_toy_models", "load_toy_pipeline", "toy_call_kwargs",
           "toy_image_size", "toy_model_dir", "toy_name"]


def _canonical(name: str) -> str:
    key = _ALIASES.get(str(name).lower(), str(name).lower())
    if key not in TOY_MODELS:
        raise ValueError(f"unknown toy model {name!r}; expected one of {TOY_MODELS} (or toy-sd / toy-flux)")
    return key


def toy_name(model: str) -> str | None:
    """"sd" / "flux" for a CLI model string "toy-sd", "toy:sd", "toy-flux", "toy:flux"; None for anything else."""
    for prefix in ("toy-", "toy:"):
        if str(model).startswith(prefix) and model[len(prefix):] in TOY_MODELS:
            return model[len(prefix):]
    return None


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
