"""Static facts about a diffusers denoiser: its family, its attention sites and its token geometry."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch

from ..call import Site
from ..native import wan_native_size
from ..params import integer, pixel_size

# denoiser class name -> family
DENOISER_FAMILIES = {
    "UNet2DConditionModel": "unet",
    "SD3Transformer2DModel": "sd3",
    "FluxTransformer2DModel": "flux",
    "PixArtTransformer2DModel": "pixart",
    "WanTransformer3DModel": "wan",
}

# Native (training) size in pixels, (frames, height, width), for families whose config has no sample size.
DEFAULT_NATIVE_SIZE = {"flux": (1, 1024, 1024)}  # Wan: by model width (`native.wan_native_size`)


class UnsupportedModelError(ValueError):
    pass


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The model inside a `torch.compile(model)` wrapper (an OptimizedModule); the module itself otherwise."""
    return getattr(module, "_orig_mod", module)


def family_of(denoiser: torch.nn.Module) -> str:
    name = type(unwrap(denoiser)).__name__
    try:
        return DENOISER_FAMILIES[name]
    except KeyError:
        raise UnsupportedModelError(
            f"attnlab does not support the denoiser {name}; supported: {', '.join(DENOISER_FAMILIES)}"
        ) from None


@dataclass(frozen=True)
class SiteSpec:
    name: str
    module: torch.nn.Module
    site: Site


_UNET_SECTIONS = ("down_blocks", "mid_block", "up_blocks")


def _unet_block_key(name: str):
    """Execution-order sort key of a UNet transformer block: section (down, mid, up), then indices."""
    section = name.split(".")[0]
    nums = [int(n) for n in re.findall(r"\.(\d+)(?=\.|$)", name)]
    return (_UNET_SECTIONS.index(section), nums)


def attention_sites(denoiser: torch.nn.Module) -> list[SiteSpec]:
    """Every attention module of the denoiser with its Site (global layer index, kind), in layer order."""
    family = family_of(denoiser)
    denoiser = unwrap(denoiser)
    specs: list[SiteSpec] = []
    modules = dict(denoiser.named_modules())
    if family == "unet":
        blocks = sorted(
            (n for n, m in modules.items() if re.search(r"transformer_blocks\.\d+$", n) and n.split(".")[0] in _UNET_SECTIONS),
            key=_unet_block_key,
        )
        for layer, block in enumerate(blocks):
            for attr, kind in (("attn1", "self"), ("attn2", "cross")):
                mod = modules.get(f"{block}.{attr}")
                if mod is not None:
                    specs.append(SiteSpec(f"{block}.{attr}", mod, Site("unet", kind, layer, f"{block}.{attr}")))
    elif family == "sd3":
        for i, _ in enumerate(denoiser.transformer_blocks):
            specs.append(_spec(modules, f"transformer_blocks.{i}.attn", "sd3", "joint", i))
            if f"transformer_blocks.{i}.attn2" in modules:  # SD3.5 dual-attention blocks: image-only self-attention
                specs.append(_spec(modules, f"transformer_blocks.{i}.attn2", "sd3", "self", i))
    elif family == "flux":
        depth = len(denoiser.transformer_blocks)
        for i in range(depth):
            specs.append(_spec(modules, f"transformer_blocks.{i}.attn", "flux", "joint", i))
        for j in range(len(denoiser.single_transformer_blocks)):
            specs.append(_spec(modules, f"single_transformer_blocks.{j}.attn", "flux", "single", depth + j))
    elif family in ("pixart", "wan"):
        prefix = "transformer_blocks" if family == "pixart" else "blocks"
        for i in range(len(getattr(denoiser, prefix))):
            specs.append(_spec(modules, f"{prefix}.{i}.attn1", family, "self", i))
            if modules.get(f"{prefix}.{i}.attn2") is not None:
                specs.append(_spec(modules, f"{prefix}.{i}.attn2", family, "cross", i))
    return specs


def _spec(modules, name, family, kind, layer) -> SiteSpec:
    return SiteSpec(name, modules[name], Site(family, kind, layer, name))


@dataclass(frozen=True)
class Geometry:
    """How input pixels map to tokens for one denoiser.

    vae_scale: (frames, pixels) per latent cell; patch: (frames, rows, cols) latent cells per token;
    native_size: (frames, height, width) in pixels at the training resolution.
    """

    family: str
    vae_scale: tuple[int, int]
    patch: tuple[int, int, int]
    native_size: tuple[int, int, int]

    @property
    def token_scale(self) -> tuple[int, int, int]:
        """Pixels (and frames) per token at full resolution."""
        return (self.vae_scale[0] * self.patch[0], self.vae_scale[1] * self.patch[1], self.vae_scale[1] * self.patch[2])


def geometry_of(denoiser, pipeline=None, vae_scale: Optional[int] = None, native_size=None) -> Geometry:
    family = family_of(denoiser)
    denoiser = unwrap(denoiser)
    cfg = denoiser.config
    if vae_scale is not None:
        vae_scale = integer("vae_scale", vae_scale, 1, 64)
    spatial = vae_scale or getattr(pipeline, "vae_scale_factor_spatial", None) or getattr(pipeline, "vae_scale_factor", None) or 8
    temporal = getattr(pipeline, "vae_scale_factor_temporal", None) or (4 if family == "wan" else 1)
    if family == "unet":
        patch = (1, 1, 1)
    elif family == "flux":
        patch = (1, 2, 2)  # the pipeline packs 2x2 latent cells into one token
    elif family == "wan":
        patch = tuple(cfg.patch_size)
    else:
        patch = (1, cfg.patch_size, cfg.patch_size)
    if native_size is None:
        sample = getattr(pipeline, "default_sample_size", None) or getattr(cfg, "sample_size", None)
        if isinstance(sample, (tuple, list)):
            sample = sample[0]
        if sample is not None and family != "wan":
            native_size = (1, int(sample) * spatial, int(sample) * spatial)
        elif family == "wan":
            native_size = wan_native_size(int(cfg.num_attention_heads) * int(cfg.attention_head_dim))
        else:
            native_size = DEFAULT_NATIVE_SIZE.get(family, (1, 1024, 1024))
    else:
        native_size = pixel_size("native_size", native_size)
        if len(native_size) == 2:
            native_size = (1,) + native_size
    return Geometry(family, (int(temporal), int(spatial)), patch, native_size)
