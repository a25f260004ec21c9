"""ComfyUI node "Entropy Scaling": attention-logit scaling that keeps attention entropy stable across resolutions."""

from __future__ import annotations

from ..processors.entropy import TOKEN_COUNTS, EntropyScaling
from .host import patch
from .specs import CATEGORY, NodeSpec, Output, Param


def apply_entropy_scaling(model, strength: float, train_height: int, train_width: int, token_count: str):
    if (train_height == 0) != (train_width == 0):
        raise ValueError("train_height and train_width: set both, or leave both at 0 for the model's native size")
    train_size = (train_height, train_width) if train_height else None
    return (patch(model, [EntropyScaling(strength=strength, train_size=train_size, token_count=token_count)]),)


ENTROPY_SCALING = NodeSpec(
    node_id="AttnlabEntropyScaling",
    display_name="Entropy Scaling",
    category=CATEGORY,
    description=(
        "Scales self-attention logits by λ = (ln N / ln T)^(strength/2), N = keys now, T = keys at the training "
        "resolution, per layer, so attention entropy stays near its training value when you sample larger or "
        "smaller than the model was trained (Jin et al. 2023). Cross-attention is untouched; at the native size it "
        "changes nothing. SD1.5/SD2/SDXL, SD3, FLUX, Wan."
    ),
    inputs=(
        Param("model", "MODEL", tooltip="the model to patch (a patched clone is returned; the input is untouched)"),
        Param("strength", "FLOAT", 1.0, 0.0, 4.0, 0.05,
              tooltip="exponent multiplier: 1 = the paper's λ = sqrt(ln N / ln T), 0 = off"),
        Param("train_height", "INT", 0, 0, 16384, 8,
              tooltip="training resolution height in pixels; 0 = the model's native size (SD1.5 512, SDXL/SD3/FLUX 1024, Wan 480)"),
        Param("train_width", "INT", 0, 0, 16384, 8,
              tooltip="training resolution width in pixels; 0 = the model's native size (Wan 832)"),
        Param("token_count", "COMBO", "joint", options=TOKEN_COUNTS,
              tooltip="SD3/FLUX joint attention: count all keys (joint) or image keys only (image)"),
    ),
    outputs=(Output("MODEL", "model"),),
    run=apply_entropy_scaling,
)
