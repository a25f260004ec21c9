"""What the ComfyUI host knows about a model before sampling: family, geometry and the attention call plan.

Read from the ModelPatcher's BaseModel by class *names* and attributes, so this module never imports
ComfyUI (tests drive it with the pack's own fake of ComfyUI's contract).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..call import Site
from ..native import wan_native_size

# model_config class names (supported_models, matched along the MRO) -> family
CONFIG_FAMILIES = {
    "SD15": "unet", "SD20": "unet", "SD21UnclipL": "unet", "SDXL": "unet", "SDXLRefiner": "unet", "SSD1B": "unet",
    "SD3": "sd3",
    "Flux": "flux", "FluxSchnell": "flux", "FluxInpaint": "flux", "Chroma": "flux",
    "WAN21_T2V": "wan", "WAN21_I2V": "wan", "WAN22_T2V": "wan",
    "PixArtAlpha": "pixart", "PixArtSigma": "pixart",
}
# diffusion_model class names -> family (fallback)
MODEL_FAMILIES = {"UNetModel": "unet", "OpenAISignatureMMDITWrapper": "sd3", "Flux": "flux", "WanModel": "wan", "PixArtMS": "pixart"}
SUPPORTED = ("unet", "sd3", "flux", "wan")

NATIVE_SIZE = {  # (frames, height, width) pixels, by model_config class name, then by family
    "SD15": (1, 512, 512), "SD20": (1, 768, 768), "SDXL": (1, 1024, 1024), "SSD1B": (1, 1024, 1024),
    "unet": (1, 512, 512), "sd3": (1, 1024, 1024), "flux": (1, 1024, 1024), "wan": (81, 480, 832),
}  # Wan: by the model's width when it has one (`native.wan_native_size`: 14B 720×1280)


class UnsupportedComfyModel(ValueError):
    pass


def _mro_names(obj) -> list[str]:
    return [c.__name__ for c in type(obj).__mro__]


@dataclass(frozen=True)
class ModelPlan:
    """family; vae_scale (frames, pixels) per latent cell; patch (frames, rows, cols) cells per token;
    native_size in pixels; calls: the (kind, layer) of each attention call of one forward, in order
    (DiTs; empty for UNets, which carry block ids); unet_offsets: global layer index of the first
    transformer block of each SpatialTransformer, by ComfyUI's transformer_index."""

    family: str
    config_name: str
    vae_scale: tuple[int, int]
    patch: tuple[int, int, int]
    native_size: tuple[int, int, int]
    calls: tuple[tuple[str, int], ...] = ()
    unet_offsets: tuple[int, ...] = ()
    unet_names: tuple[str, ...] = ()
    register_length: int = 0
    double_blocks: int = 0
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def token_scale(self) -> tuple[int, int, int]:
        return (self.vae_scale[0] * self.patch[0], self.vae_scale[1] * self.patch[1], self.vae_scale[1] * self.patch[2])


def family_of(base_model) -> tuple[str, str]:
    """(family, model_config class name) of a ComfyUI BaseModel."""
    config = getattr(base_model, "model_config", None)
    for name in _mro_names(config) if config is not None else []:
        if name in CONFIG_FAMILIES:
            return CONFIG_FAMILIES[name], name
    dm = getattr(base_model, "diffusion_model", None)
    for name in _mro_names(dm) if dm is not None else []:
        if name in MODEL_FAMILIES:
            return MODEL_FAMILIES[name], type(config).__name__ if config is not None else name
    raise UnsupportedComfyModel(
        f"attnlab does not support this model ({type(config).__name__ if config is not None else '?'} / "
        f"{type(dm).__name__ if dm is not None else '?'}); supported: SD1.5/SD2/SDXL UNets, SD3, FLUX, Wan 2.1/2.2"
    )


def plan_for(base_model, native_size=None) -> ModelPlan:
    family, config_name = family_of(base_model)
    if family not in SUPPORTED:
        raise UnsupportedComfyModel(
            f"{config_name}: ComfyUI's {family} model calls attention without transformer_options, so the "
            "attention override never reaches it; attnlab's ComfyUI nodes support SD1.5/SD2/SDXL, SD3, FLUX and Wan "
            "(use the diffusers pipelines for PixArt)"
        )
    dm = base_model.diffusion_model
    latent_format = getattr(base_model, "latent_format", None)
    spatial = 16 if "Wan22" in _mro_names(latent_format) else 8
    if native_size is not None:
        native = tuple(native_size)
    elif family == "wan" and getattr(dm, "dim", None) is not None:
        native = wan_native_size(dm.dim)
    else:
        native = NATIVE_SIZE.get(config_name, NATIVE_SIZE[family])
    if len(native) == 2:
        native = (1,) + tuple(native)
    if family == "unet":
        offsets, names, total = [], [], 0
        for section in ("input_blocks", "middle_block", "output_blocks"):
            for name, module in getattr(dm, section).named_modules(prefix=section):
                if type(module).__name__ == "SpatialTransformer":
                    offsets.append(total)
                    names.append(name)
                    total += len(module.transformer_blocks)
        return ModelPlan("unet", config_name, (1, 8), (1, 1, 1), native, (), tuple(offsets), tuple(names))
    patch = getattr(dm, "patch_size", 2)
    patch = tuple(patch) if isinstance(patch, (tuple, list)) else (1, patch, patch)
    if family == "flux":
        depth = len(dm.double_blocks)
        calls = tuple(("joint", i) for i in range(depth)) + tuple(("single", depth + j) for j in range(len(dm.single_blocks)))
        return ModelPlan("flux", config_name, (1, spatial), patch, native, calls, double_blocks=depth)
    if family == "sd3":
        calls = []
        for i, block in enumerate(dm.joint_blocks):
            calls.append(("joint", i))
            if getattr(getattr(block, "x_block", None), "x_block_self_attn", False):
                calls.append(("self", i))
        return ModelPlan("sd3", config_name, (1, spatial), patch, native, tuple(calls),
                         register_length=int(getattr(dm, "register_length", 0) or 0))
    # Wan: self, [cross to CLIP image tokens for i2v], cross to text, per block
    i2v = getattr(dm, "model_type", "t2v") == "i2v" or getattr(dm, "img_emb", None) is not None
    calls = []
    for i in range(len(dm.blocks)):
        calls.append(("self", i))
        if i2v:
            calls.append(("cross_image", i))
        calls.append(("cross", i))
    return ModelPlan("wan", config_name, (4, spatial), patch, native, tuple(calls))


def site_name(plan: ModelPlan, kind: str, layer: int) -> str:
    """Module path of a DiT attention site (kind, global layer), as the sites of `plan_sites` name it."""
    if plan.family == "flux":
        return f"double_blocks.{layer}" if kind == "joint" else f"single_blocks.{layer - plan.double_blocks}"
    if plan.family == "sd3":
        return f"joint_blocks.{layer}" + (".x_block.attn2" if kind == "self" else "")
    if plan.family == "wan":
        return f"blocks.{layer}." + ("self_attn" if kind == "self" else "cross_attn")
    raise ValueError(f"no DiT site names for family {plan.family!r}")


def _dit_heads(plan: ModelPlan, dm, kind: str, layer: int) -> int:
    if plan.family == "flux":
        block = dm.double_blocks[layer] if kind == "joint" else dm.single_blocks[layer - plan.double_blocks]
        return int(block.num_heads)
    if plan.family == "sd3":
        x_block = dm.joint_blocks[layer].x_block
        return int((x_block.attn2 if kind == "self" else x_block.attn).num_heads)
    block = dm.blocks[layer]
    return int((block.self_attn if kind == "self" else block.cross_attn).num_heads)


def plan_sites(plan: ModelPlan, base_model) -> list[tuple[Site, int]]:
    """Every attention site of the model with its head count, as `check_effects` takes them: UNet attn1/attn2
    of each BasicTransformerBlock (``input_blocks.4.1.transformer_blocks.0.attn1``, global layers in execution
    order), FLUX double/single blocks, SD3 joint blocks (+ MMDiT-X attn2), Wan self/text-cross attention.
    Wan I2V's attention to CLIP image tokens is no site (effects never see it)."""
    dm = base_model.diffusion_model
    sites: list[tuple[Site, int]] = []
    if plan.family == "unet":
        modules = dict(dm.named_modules())
        for offset, name in zip(plan.unet_offsets, plan.unet_names):
            for b, block in enumerate(modules[name].transformer_blocks):
                for kind, attn in (("self", "attn1"), ("cross", "attn2")):
                    site = Site("unet", kind, offset + b, f"{name}.transformer_blocks.{b}.{attn}")
                    sites.append((site, int(getattr(block, attn).heads)))
        return sites
    for kind, layer in plan.calls:
        if kind == "cross_image":
            continue
        sites.append((Site(plan.family, kind, layer, site_name(plan, kind, layer)), _dit_heads(plan, dm, kind, layer)))
    return sites
