"""Entropy scaling on any supported stock diffusers pipeline.

    from diffusers import StableDiffusionXLPipeline
    from attnlab.pipelines.entropy import entropy_scaling

    pipe = StableDiffusionXLPipeline.from_pretrained("stabilityai/stable-diffusion-xl-base-1.0")
    with entropy_scaling(pipe):                       # λ = sqrt(ln N / ln T) per self-attention layer
        image = pipe("a lighthouse at dusk", height=2048, width=2048).images[0]

Works on StableDiffusion(XL)Pipeline, StableDiffusion3Pipeline, FluxPipeline, PixArtSigmaPipeline,
WanPipeline (and any pipeline whose denoiser is one of those models). At the model's native size the
output is bit-identical to the stock pipeline.
"""

from __future__ import annotations

from ..processors.entropy import EntropyScaling
from ..processors.host_diffusers import Session, apply


def entropy_scaling(pipe, strength: float = 1.0, train_size=None, token_count: str = "joint", **options) -> Session:
    """Install entropy scaling on `pipe` (a pipeline or its denoiser) and return the installed session.

    Use it as a context manager (removed on exit, also after an exception) or call `.remove()`.
    strength: 1 = the paper's λ = sqrt(ln N / ln T); 0 = off; values in [0, 4] sharpen/soften further.
    train_size: the training resolution in pixels, int | (height, width) | (frames, height, width);
        default: the model's native size (config sample size, FLUX 1024², Wan 81×480×832).
    token_count: "joint" (keys of the call, text included) or "image" (image keys only) for SD3/FLUX.
    options: forwarded to `attnlab.apply` (vae_scale, native_size, strict).
    """
    return apply(pipe, [EntropyScaling(strength=strength, train_size=train_size, token_count=token_count)], **options)
