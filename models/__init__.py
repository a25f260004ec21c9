"""Models for tests and benchmarks: in-memory tokenizers and tiny random-weight diffusers pipelines."""

from .offline_tokenizers import make_clip_tokenizer, make_t5_tokenizer
from .tiny import (
    FAMILIES,
    attention_modules,
    attention_summary,
    build_mid_pipeline,
    build_tiny_pipeline,
    calibrate_attention,
    default_size,
    denoiser_of,
    describe,
    family_of,
    native_token_levels,
    native_tokens,
    output_tensor,
    run_tiny_pipeline,
    text_tokens,
    tiny_call_kwargs,
)

__all__ = [
    "FAMILIES",
    "attention_modules",
    "attention_summary",
    "build_mid_pipeline",
    "build_tiny_pipeline",
    "calibrate_attention",
    "default_size",
    "denoiser_of",
    "describe",
    "family_of",
    "make_clip_tokenizer",
    "make_t5_tokenizer",
    "native_token_levels",
    "native_tokens",
    "output_tensor",
    "run_tiny_pipeline",
    "text_tokens",
    "tiny_call_kwargs",
]
