"""Models by name, for the command line, the demo and the bench: a name is resolved once into a `LoadedModel`
that carries the pipeline and its defaults (size, frames, fixed call arguments, SoftPAG heads).

    tiny-<family> / tiny:<family>   embedded random-weight pipeline (attnlab.models.tiny), built offline
    toy-<name> / toy:<name>         shipped toy-world model (attnlab.toyworld.models), trained, offline
    a folder                        a local diffusers pipeline folder (with model_index.json)
    owner/name                      a hub id (needs internet or the hub cache; HF_HUB_OFFLINE=1 is the CLI default)

`parse_model_name` checks a name without loading anything, so a bad one fails before any work.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .processors.params import InvalidParameter

DTYPES = ("float32", "float16", "bfloat16")
_TINY_PREFIXES = ("tiny-", "tiny:")
_TOY_PREFIXES = ("toy-", "toy:")
_PIPELINE_MULTIPLE = {"wan": 16}  # diffusers' check_inputs; 8 for the others
#: the tiny models' call arguments that are part of the model (text lengths, no resolution binning)
_TINY_FIXED_CALL = ("max_sequence_length", "use_resolution_binning", "clean_caption")


@dataclass(frozen=True)
class ModelName:
    """A checked model name: `kind` is "tiny", "toy", "folder" or "hub"; `key` the family, toy name, path or id."""

    text: str
    kind: str
    key: str

    def __str__(self) -> str:
        return self.text


def _strip_prefix(text: str, prefixes) -> Optional[str]:
    for prefix in prefixes:
        if text.startswith(prefix):
            return text[len(prefix):]
    return None


def _is_hub_id(text: str) -> bool:
    if text.count("/") != 1:
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def parse_model_name(text) -> ModelName:
    """Check a model name (see the module docstring) without loading it; raises InvalidParameter saying what is
    wrong and what the valid names are."""
    from .models.tiny import FAMILIES
    from .toyworld.models import TOY_MODELS, available_toy_models, toy_model_dir

    if not isinstance(text, str) or not text.strip():
        raise InvalidParameter(f"model must be a non-empty name; got {text!r}")
    text = text.strip()
    family = _strip_prefix(text, _TINY_PREFIXES)
    if family is not None:
        if family not in FAMILIES:
            prefix = text[: len(text) - len(family)]
            raise InvalidParameter(f"{text!r}: unknown tiny model; choose one of "
                                   + ", ".join(prefix + f for f in FAMILIES))
        return ModelName(text, "tiny", family)
    toy = _strip_prefix(text, _TOY_PREFIXES)
    if toy is not None:
        if toy not in TOY_MODELS:
            raise InvalidParameter(f"{text!r}: unknown toy model; choose one of "
                                   + ", ".join(f"toy-{n}" for n in TOY_MODELS))
        if toy not in available_toy_models():
            raise InvalidParameter(f"toy model {text!r}: no weights in {toy_model_dir(toy)}; train them with "
                                   f"`python -m attnlab.toyworld.train --arch {toy}` or reinstall the package")
        return ModelName(text, "toy", toy)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise InvalidParameter(f"{text!r} is a folder but not a diffusers pipeline (no model_index.json)")
        return ModelName(text, "folder", str(path))
    if _is_hub_id(text) and not path.exists():
        return ModelName(text, "hub", text)
    raise InvalidParameter(f"{text!r} is no model: give tiny-<{'|'.join(FAMILIES)}>, toy-<name>, a local diffusers "
                           "folder or an owner/name hub id")


def _torch_dtype(dtype):
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise InvalidParameter(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    return getattr(torch, dtype)


class OnModel:
    """For holders of a `model: LoadedModel` (the demo's store entries, the bench): its pipe, family and size."""

    @property
    def pipe(self):
        return self.model.pipe

    @property
    def family(self) -> str:
        return self.model.family

    @property
    def native(self) -> tuple[int, int]:
        return self.model.size


@dataclass
class LoadedModel:
    """A pipeline with the defaults it works with.

    size: (height, width) in pixels it was made for; frames: its frame count (video models) or None;
    call_kwargs: call arguments it always needs (the tiny models' fixed text lengths, ...)."""

    name: ModelName
    pipe: object
    geometry: object  # processors.host_diffusers.model_info.Geometry
    size: tuple[int, int]
    frames: Optional[int]
    call_kwargs: dict = field(default_factory=dict)

    @property
    def family(self) -> str:
        return self.geometry.family

    @property
    def native_size(self) -> tuple[int, int, int]:
        """(frames, height, width) in pixels: the training size effects such as entropy scaling compare to."""
        return (self.frames or 1, *self.size)

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: pixels per token (VAE factor × patch size), and what diffusers'
        pipelines insist on (8; Wan 16) for the tiny models whose VAE factor is smaller."""
        return math.lcm(self.geometry.token_scale[1], _PIPELINE_MULTIPLE.get(self.family, 8))

    @functools.cached_property
    def default_heads(self) -> str:
        return default_softpag_heads(self.pipe)

    def text_lengths(self) -> dict:
        """Only the fixed text length (what a single forward such as RefAM's needs)."""
        return {k: v for k, v in self.call_kwargs.items() if k == "max_sequence_length"}

    def check_size(self, height: int, width: int, what: str = "--height/--width") -> None:
        """Raise InvalidParameter unless both sides are multiples of `size_multiple`."""
        step = self.size_multiple
        if height % step or width % step:
            raise InvalidParameter(f"{what} {height}x{width}: {self.name} needs sides that are multiples of {step} "
                                   f"pixels, e.g. {max(step, height // step * step)}x{max(step, width // step * step)}")


def _load_pipe(name: ModelName, dtype):
    if name.kind == "tiny":
        from .models.tiny import build_tiny_pipeline

        pipe = build_tiny_pipeline(name.key)
        return pipe if dtype is None else pipe.to(dtype=dtype)
    if name.kind == "toy":
        from .toyworld.models import load_toy_pipeline

        return load_toy_pipeline(name.key, "cpu", dtype)
    from diffusers import DiffusionPipeline

    extra = {"torch_dtype": dtype} if dtype is not None else {}
    try:
        return DiffusionPipeline.from_pretrained(name.key, local_files_only=name.kind == "folder", **extra)
    except (OSError, ValueError) as err:  # no such hub id, offline, a broken folder: what the user named
        raise InvalidParameter(f"model {name.text!r}: cannot load it as a diffusers pipeline ({err})") from None


def _defaults(name: ModelName, geometry) -> tuple[tuple[int, int], Optional[int], dict]:
    """(size, frames, fixed call arguments) of a model."""
    if name.kind == "tiny":
        from .models.tiny import default_size, tiny_call_kwargs

        fixed = tiny_call_kwargs(name.key)
        return default_size(name.key), fixed.get("num_frames"), {k: fixed[k] for k in _TINY_FIXED_CALL if k in fixed}
    if name.kind == "toy":
        from .toyworld.models import toy_call_kwargs

        fixed = toy_call_kwargs(name.key)
        text = {k: fixed[k] for k in ("max_sequence_length",) if k in fixed}
        return (fixed["height"], fixed["width"]), None, text
    frames = geometry.native_size[0] if geometry.family == "wan" else None
    return (geometry.native_size[1], geometry.native_size[2]), frames, {}


def load_model(name, device: str = "cpu", dtype=None, progress_bar: bool = True) -> LoadedModel:
    """Load a model by name (a string or a `ModelName`) onto `device`. dtype: a torch dtype or its name; None
    keeps the weights' own (float32 for the tiny and toy models on CPU)."""
    from .processors.host_diffusers import denoisers_of, geometry_of

    name = name if isinstance(name, ModelName) else parse_model_name(name)
    pipe = _load_pipe(name, _torch_dtype(dtype))
    pipe.set_progress_bar_config(disable=not progress_bar, desc="sampling")
    pipe = pipe.to(device)
    geometry = geometry_of(denoisers_of(pipe)[0], pipe)
    size, frames, call_kwargs = _defaults(name, geometry)
    return LoadedModel(name, pipe, geometry, size, frames, call_kwargs)


def default_softpag_heads(pipe) -> str:
    """A sensible SoftPAG head set when none is given: the UNet mid block ('m0') for SD1.5/SDXL, else every head
    of the middle perturbable (self/joint/single) layer."""
    from .processors.host_diffusers.model_info import attention_sites, family_of
    from .processors.host_diffusers.session import denoiser_names

    denoiser = getattr(pipe, denoiser_names(pipe)[0])
    family = family_of(denoiser)
    sites = [spec.site for spec in attention_sites(denoiser)]
    if family == "unet":
        if any(s.name.startswith("mid_block") and s.kind == "self" for s in sites):
            return "m0"
    layers = sorted({s.layer for s in sites if s.kind in ("joint", "single") or (s.kind == "self" and family != "sd3")})
    if not layers:
        raise InvalidParameter(f"{type(pipe).__name__}: no self/joint attention layers SoftPAG can perturb")
    return f"L{layers[len(layers) // 2]}:*"
