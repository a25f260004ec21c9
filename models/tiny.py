"""Tiny random-weight diffusers pipelines for six families, built offline from explicit configs.

``build_tiny_pipeline(family)`` returns a real diffusers pipeline (``StableDiffusionPipeline``,
``StableDiffusionXLPipeline``, ``StableDiffusion3Pipeline``, ``FluxPipeline``,
``PixArtSigmaPipeline``, ``WanPipeline``) whose components are created from explicit configs (sizes
modelled on diffusers' own ``get_dummy_components``, with every ``from_pretrained("hf-internal-
testing/...")`` replaced by ``CLIPTextConfig`` / ``T5Config`` / ``UMT5Config``) and in-memory
tokenizers (:mod:`.offline_tokenizers`). Nothing touches the hub or the disk.

The models are shaped so attention methods can be exercised meaningfully: every denoiser attention
layer has >= 2 heads; the UNets have self+cross attention at two resolution levels plus the mid
block; SDXL has working add-embeddings (``text_encoder_2`` with projection); SD3 has 3 joint blocks
fed by both CLIP encoders and T5; FLUX has 2 double and 2 single blocks with ``axes_dims_rope``
summing to the head dim and guidance embedding (FLUX-dev style); PixArt-Sigma and Wan have
self+cross attention.

Determinism: each component is built under ``torch.random.fork_rng`` with its own seed derived from
``seed`` and the component name (so the caller's global RNG is untouched, two builds with the same
``seed`` have bit-identical weights, and components with equal configs still get different weights).
Every module is put in ``eval()``. No safety checker, feature extractor or watermarker.

Making attention matter in a random model:

* diffusers 0.42.1 zero-initialises none of these denoisers' output layers (checked); as a guard,
  any all-zero Linear/Conv weight found in a denoiser is re-initialised with small seeded random
  values (:func:`reinit_zero_weights`; the names are kept in ``denoiser._attnlab_reinitialised``).
* With diffusers' default init the attention logits are tiny (row std 0.03-0.3, ~1 with QK-RMSNorm):
  every attention map is almost uniform (entropy >= 0.99 log N), so methods that reshape attention
  barely show. By default each denoiser attention layer's query/key scale is calibrated once at build
  time to a logit row std of 2.0 (entropy ~0.55-0.8 log N, max prob 0.05-0.4), an exact
  reparametrisation of the softmax temperature (:func:`calibrate_attention`;
  ``build_tiny_pipeline(..., attention_logit_std=None)`` keeps the raw init).

``tiny_call_kwargs(family)`` gives call arguments for a 2-step run at the native size with
``output_type="pt"`` (decoded images in [0, 1], shape (B, 3, H, W); Wan: frames (B, F, 3, H, W)).
Pass ``output_type="latent"`` for raw latents (no VAE, no clamping), which are more sensitive for
tight comparisons; note FLUX returns its latents packed, (B, tokens, 4 * latent_channels).
Saved pipelines (``save_pretrained``) reload offline with ``DiffusionPipeline.from_pretrained(dir,
local_files_only=True)``; a reloaded FluxPipeline has diffusers' default ``default_sample_size`` again,
so pass ``height``/``width`` (as :func:`tiny_call_kwargs` does).

``size="mid"`` (FLUX and SD1.5 only) builds a few-million-parameter model with 1024 image tokens at
its default size, for benchmarks (FLUX 2.3M params, 128x128 px; SD1.5 UNet 5.8M params, 64x64 px;
a 2-step call takes ~0.2 s on 2 CPU cores).
"""

from __future__ import annotations

import contextlib
import copy
import math
import zlib
from typing import Any

import torch

from .offline_tokenizers import clip_token_ids, make_clip_tokenizer, make_t5_tokenizer, t5_token_ids

__all__ = [
    "FAMILIES",
    "SIZES",
    "build_tiny_pipeline",
    "build_mid_pipeline",
    "tiny_call_kwargs",
    "default_size",
    "native_tokens",
    "native_token_levels",
    "text_tokens",
    "family_of",
    "run_tiny_pipeline",
    "output_tensor",
    "reinit_zero_weights",
    "denoiser_of",
    "calibrate_attention",
    "attention_modules",
    "attention_summary",
    "describe",
]

FAMILIES = ("sd15", "sdxl", "sd3", "flux", "pixart", "wan")
SIZES = ("tiny", "mid")
MID_FAMILIES = ("sd15", "flux")

# Text lengths used by the call kwargs. CLIP always pads to its model_max_length (77).
CLIP_MAX_LENGTH = 77
T5_MAX_SEQUENCE_LENGTH = 32

# Row std of the denoiser's attention logits after calibration (see calibrate_attention).
DEFAULT_ATTENTION_LOGIT_STD = 2.0

_PIPELINE_CLASS_NAMES = {
    "sd15": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "sd3": "StableDiffusion3Pipeline",
    "flux": "FluxPipeline",
    "pixart": "PixArtSigmaPipeline",
    "wan": "WanPipeline",
}

# ------------------------------------------------------------------------------------------ configs

_CLIP_BASE = dict(
    hidden_size=32,
    intermediate_size=37,
    num_attention_heads=4,
    num_hidden_layers=2,
    max_position_embeddings=CLIP_MAX_LENGTH,
    layer_norm_eps=1e-5,
    hidden_act="quick_gelu",
    attention_dropout=0.0,
    dropout=0.0,
)

_T5_BASE = dict(
    d_model=32,
    d_ff=37,
    d_kv=8,
    num_heads=4,
    num_layers=2,
    relative_attention_num_buckets=8,
    dropout_rate=0.0,
)


def _clip(**kw) -> dict:
    cfg = dict(_CLIP_BASE)
    cfg.update(kw)
    return cfg


def _vae(latent_channels: int, block_out_channels=(8, 16), **kw) -> dict:
    n = len(block_out_channels)
    cfg = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n,
        block_out_channels=list(block_out_channels),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=64,
    )
    cfg.update(kw)
    return cfg


def _check_family(family: str) -> str:
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    return family


def _check_size(family: str, size: str) -> str:
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    if size == "mid" and family not in MID_FAMILIES:
        raise ValueError(f"size='mid' is available for families {MID_FAMILIES}, not {family!r}")
    return size


def _component_specs(family: str, size: str = "tiny") -> dict[str, dict]:
    """Config dicts per component (no objects built). Keys are the pipeline component names."""
    _check_family(family)
    _check_size(family, size)
    clip_ids = clip_token_ids()
    t5_ids = t5_token_ids()
    mid = size == "mid"

    if family == "sd15":
        if mid:
            unet = dict(
                sample_size=32,
                in_channels=4,
                out_channels=4,
                block_out_channels=(64, 128, 128),
                layers_per_block=1,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                attention_head_dim=(2, 4, 4),  # UNet2DConditionModel: this is the number of heads
                cross_attention_dim=64,
                norm_num_groups=16,
            )
            clip = _clip(hidden_size=64, intermediate_size=128, **clip_ids)
        else:
            unet = dict(
                sample_size=32,
                in_channels=4,
                out_channels=4,
                block_out_channels=(16, 32, 32),
                layers_per_block=1,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                attention_head_dim=(2, 4, 4),  # number of heads -> head_dim 8 everywhere
                cross_attention_dim=32,
                norm_num_groups=8,
            )
            clip = _clip(**clip_ids)
        return {
            "unet": unet,
            "vae": _vae(4),
            "text_encoder": clip,
            "scheduler": dict(
                beta_start=0.00085,
                beta_end=0.012,
                beta_schedule="scaled_linear",
                clip_sample=False,
                set_alpha_to_one=False,
                steps_offset=1,
            ),
        }

    if family == "sdxl":
        return {
            "unet": dict(
                sample_size=32,
                in_channels=4,
                out_channels=4,
                block_out_channels=(16, 32, 64),
                layers_per_block=1,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                attention_head_dim=(2, 4, 8),  # number of heads -> head_dim 8
                transformer_layers_per_block=(1, 1, 2),
                use_linear_projection=True,
                addition_embed_type="text_time",
                addition_time_embed_dim=8,
                projection_class_embeddings_input_dim=6 * 8 + 32,  # 6 time ids * 8 + text_encoder_2 proj
                cross_attention_dim=64,  # 32 (text_encoder) + 32 (text_encoder_2)
                norm_num_groups=8,
            ),
            "vae": _vae(4),
            "text_encoder": _clip(**clip_ids),
            "text_encoder_2": _clip(projection_dim=32, **clip_ids),
            "scheduler": dict(
                beta_start=0.00085,
                beta_end=0.012,
                beta_schedule="scaled_linear",
                steps_offset=1,
                timestep_spacing="leading",
            ),
        }

    if family == "sd3":
        # The two CLIP encoders (16 + 16) concatenate to T5's d_model (32), so no padding/cropping.
        return {
            "transformer": dict(
                sample_size=32,
                patch_size=2,
                in_channels=16,
                out_channels=16,
                num_layers=3,
                attention_head_dim=8,
                num_attention_heads=4,
                joint_attention_dim=32,
                caption_projection_dim=32,
                pooled_projection_dim=32,  # 16 + 16 (CLIP projections)
                pos_embed_max_size=64,
            ),
            "vae": _vae(16, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
                        scaling_factor=1.5035),
            "text_encoder": _clip(hidden_size=16, intermediate_size=37, num_attention_heads=2,
                                  projection_dim=16, **clip_ids),
            "text_encoder_2": _clip(hidden_size=16, intermediate_size=37, num_attention_heads=2,
                                    projection_dim=16, **clip_ids),
            "text_encoder_3": dict(_T5_BASE, **t5_ids),
            "scheduler": dict(shift=3.0),
        }

    if family == "flux":
        if mid:
            transformer = dict(
                patch_size=1,
                in_channels=64,  # 16 latent channels packed 2x2
                num_layers=2,
                num_single_layers=4,
                attention_head_dim=32,
                num_attention_heads=4,
                joint_attention_dim=32,
                pooled_projection_dim=32,
                guidance_embeds=True,
                axes_dims_rope=(8, 12, 12),
            )
            vae = _vae(16, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159,
                       scaling_factor=0.3611)
        else:
            transformer = dict(
                patch_size=1,
                in_channels=16,  # 4 latent channels packed 2x2
                num_layers=2,
                num_single_layers=2,
                attention_head_dim=16,
                num_attention_heads=2,
                joint_attention_dim=32,
                pooled_projection_dim=32,
                guidance_embeds=True,
                axes_dims_rope=(4, 6, 6),
            )
            vae = _vae(4, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159,
                       scaling_factor=0.3611)
        return {
            "transformer": transformer,
            "vae": vae,
            "text_encoder": _clip(**clip_ids),
            "text_encoder_2": dict(_T5_BASE, **t5_ids),
            "scheduler": dict(
                shift=3.0,
                use_dynamic_shifting=True,
                base_shift=0.5,
                max_shift=1.15,
                base_image_seq_len=256,
                max_image_seq_len=4096,
            ),
        }

    if family == "pixart":
        return {
            "transformer": dict(
                sample_size=32,
                num_layers=2,
                patch_size=2,
                attention_head_dim=8,
                num_attention_heads=4,
                caption_channels=32,
                in_channels=4,
                cross_attention_dim=32,
                out_channels=8,  # learned sigma, as in PixArt
                attention_bias=True,
                activation_fn="gelu-approximate",
                num_embeds_ada_norm=1000,
                norm_type="ada_norm_single",
                norm_elementwise_affine=False,
                norm_eps=1e-6,
                use_additional_conditions=False,
                interpolation_scale=1,
            ),
            "vae": _vae(4),
            "text_encoder": dict(_T5_BASE, **t5_ids),
            "scheduler": dict(
                beta_start=0.0001,
                beta_end=0.02,
                beta_schedule="linear",
                clip_sample=False,
                set_alpha_to_one=False,
                steps_offset=1,
            ),
        }

    # wan
    return {
        "transformer": dict(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=12,
            in_channels=16,
            out_channels=16,
            text_dim=32,
            freq_dim=256,
            ffn_dim=32,
            num_layers=2,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=32,
        ),
        "vae": dict(
            base_dim=3,
            z_dim=16,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
        ),
        "text_encoder": dict(_T5_BASE, **t5_ids),
        "scheduler": dict(shift=3.0),
    }


# Native sizes (height, width) in pixels and frames.
_DEFAULT_SIZE = {
    ("sd15", "tiny"): (64, 64),
    ("sd15", "mid"): (64, 64),
    ("sdxl", "tiny"): (64, 64),
    ("sd3", "tiny"): (64, 64),
    ("flux", "tiny"): (64, 64),
    ("flux", "mid"): (128, 128),
    ("pixart", "tiny"): (64, 64),
    ("wan", "tiny"): (128, 128),
}
_WAN_NUM_FRAMES = 5  # -> 2 latent frames


def default_size(family: str, size: str = "tiny") -> tuple[int, int]:
    """Native (height, width) in pixels of the tiny (or mid) model of ``family``."""
    _check_family(family)
    _check_size(family, size)
    return _DEFAULT_SIZE[(family, size)]


def _vae_factor(family: str, size: str) -> int:
    if family == "wan":
        return 8
    return 2 ** (len(_component_specs(family, size)["vae"]["block_out_channels"]) - 1)


def native_token_levels(family: str, size: str = "tiny") -> dict[str, int]:
    """Image tokens seen by the attention layers at the default size, per level.

    UNets: one entry per block holding attention (``down_blocks.i``, ``mid_block``, ``up_blocks.i``),
    DiTs: a single entry ``"image"`` (for Wan: tokens of the whole clip, frames x grid).
    """
    specs = _component_specs(family, size)
    h, w = default_size(family, size)
    f = _vae_factor(family, size)
    lh, lw = h // f, w // f
    if family in ("sd15", "sdxl"):
        unet = specs["unet"]
        out: dict[str, int] = {}
        n = len(unet["down_block_types"])
        for i, kind in enumerate(unet["down_block_types"]):
            s = 2**i
            if kind.startswith("CrossAttn"):
                out[f"down_blocks.{i}"] = (lh // s) * (lw // s)
        s = 2 ** (n - 1)
        out["mid_block"] = (lh // s) * (lw // s)
        for i, kind in enumerate(unet["up_block_types"]):
            s = 2 ** (n - 1 - i)
            if kind.startswith("CrossAttn"):
                out[f"up_blocks.{i}"] = (lh // s) * (lw // s)
        return out
    if family == "flux":
        return {"image": (lh // 2) * (lw // 2)}
    if family == "wan":
        frames = (_WAN_NUM_FRAMES - 1) // 4 + 1
        return {"image": frames * (lh // 2) * (lw // 2)}
    p = specs["transformer"]["patch_size"]
    return {"image": (lh // p) * (lw // p)}


def native_tokens(family: str, size: str = "tiny") -> int:
    """Image token count at the default size (largest attention level for UNets; whole clip for Wan).

    This is the training-resolution token count ``T`` that entropy scaling compares against.
    """
    return max(native_token_levels(family, size).values())


def text_tokens(family: str) -> int:
    """Text tokens the denoiser's attention sees with :func:`tiny_call_kwargs` (joint or cross)."""
    _check_family(family)
    return {
        "sd15": CLIP_MAX_LENGTH,
        "sdxl": CLIP_MAX_LENGTH,
        "sd3": CLIP_MAX_LENGTH + T5_MAX_SEQUENCE_LENGTH,
        "flux": T5_MAX_SEQUENCE_LENGTH,
        "pixart": T5_MAX_SEQUENCE_LENGTH,
        "wan": T5_MAX_SEQUENCE_LENGTH,
    }[family]


# ------------------------------------------------------------------------------------------ building


@contextlib.contextmanager
def _seeded(seed: int, name: str):
    """Seed torch's CPU RNG for one component without disturbing the caller's RNG state."""
    sub = (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(sub)
        yield sub


def reinit_zero_weights(module: torch.nn.Module, seed: int = 0, std: float = 0.02) -> list[str]:
    """Re-initialise every all-zero Linear/Conv weight of ``module`` with small seeded noise.

    Zero-initialised output projections (common in DiTs) make attention changes invisible in the
    output of a random model. Returns the names of the re-initialised modules.
    """
    gen = torch.Generator().manual_seed(int(seed))
    fixed = []
    for name, m in module.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
            w = m.weight
            if w.numel() and not bool(w.detach().ne(0).any()):
                with torch.no_grad():
                    w.copy_(torch.randn(w.shape, generator=gen, dtype=w.dtype) * std)
                fixed.append(name)
    return fixed


def _apply_overrides(specs: dict[str, dict], overrides: dict[str, Any]) -> dict[str, Any]:
    """Merge dict overrides into component configs; return component objects given directly."""
    objects: dict[str, Any] = {}
    for key, value in overrides.items():
        if key not in specs:
            raise TypeError(
                f"unknown override {key!r}; expected one of {sorted(specs)} (a dict updates that "
                f"component's config, any other value replaces the component)"
            )
        if isinstance(value, dict):
            specs[key].update(value)
        else:
            objects[key] = value
    return objects


def _finish(module: torch.nn.Module) -> torch.nn.Module:
    module.eval()
    return module


def build_tiny_pipeline(
    family: str,
    seed: int = 0,
    size: str = "tiny",
    attention_logit_std: float | None = DEFAULT_ATTENTION_LOGIT_STD,
    **overrides,
):
    """Build the tiny random-weight diffusers pipeline of ``family`` (one of :data:`FAMILIES`).

    ``overrides``: ``<component>=dict(...)`` updates that component's config (e.g.
    ``transformer={"num_layers": 3}``, ``unet={...}``, ``scheduler={...}``); any other value for a
    component name replaces the component (e.g. ``scheduler=DDIMScheduler(...)``). ``size="mid"``
    builds the larger benchmark model (``sd15`` and ``flux`` only).

    ``attention_logit_std``: with diffusers' default init, the denoiser's attention logits have a
    row std of ~0.03-0.3 (1.0 with QK-RMSNorm), i.e. almost uniform attention maps, so methods that
    reshape attention barely show. By default every denoiser attention layer's query/key scale is
    calibrated once (see :func:`calibrate_attention`) to this logit std; ``None`` keeps the raw init.
    """
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config
    from transformers import T5EncoderModel, UMT5Config, UMT5EncoderModel

    _check_family(family)
    specs = copy.deepcopy(_component_specs(family, size))
    given = _apply_overrides(specs, overrides)
    seed = int(seed)

    def make(name: str, factory):
        if name in given:
            return given[name]
        with _seeded(seed, name):
            return factory(specs[name])

    def clip_model(cls):
        return lambda cfg: _finish(cls(CLIPTextConfig(**cfg)))

    t5_model = lambda cfg: _finish(T5EncoderModel(T5Config(**cfg)))  # noqa: E731
    vae_kl = lambda cfg: _finish(diffusers.AutoencoderKL(**cfg))  # noqa: E731

    def denoiser(cls):
        def build(cfg):
            model = _finish(cls(**cfg))
            fixed = reinit_zero_weights(model, seed=zlib.crc32(f"{seed}:reinit".encode()))
            model._attnlab_reinitialised = tuple(fixed)  # for inspection; not part of the config
            return model

        return build

    clip_tok = make_clip_tokenizer(CLIP_MAX_LENGTH)

    if family == "sd15":
        pipe = diffusers.StableDiffusionPipeline(
            vae=make("vae", vae_kl),
            text_encoder=make("text_encoder", clip_model(CLIPTextModel)),
            tokenizer=clip_tok,
            unet=make("unet", denoiser(diffusers.UNet2DConditionModel)),
            scheduler=make("scheduler", lambda c: diffusers.DDIMScheduler(**c)),
            safety_checker=None,
            feature_extractor=None,
            image_encoder=None,
            requires_safety_checker=False,
        )
    elif family == "sdxl":
        pipe = diffusers.StableDiffusionXLPipeline(
            vae=make("vae", vae_kl),
            text_encoder=make("text_encoder", clip_model(CLIPTextModel)),
            text_encoder_2=make("text_encoder_2", clip_model(CLIPTextModelWithProjection)),
            tokenizer=clip_tok,
            tokenizer_2=make_clip_tokenizer(CLIP_MAX_LENGTH),
            unet=make("unet", denoiser(diffusers.UNet2DConditionModel)),
            scheduler=make("scheduler", lambda c: diffusers.EulerDiscreteScheduler(**c)),
            image_encoder=None,
            feature_extractor=None,
            add_watermarker=False,
        )
    elif family == "sd3":
        pipe = diffusers.StableDiffusion3Pipeline(
            transformer=make("transformer", denoiser(diffusers.SD3Transformer2DModel)),
            scheduler=make("scheduler", lambda c: diffusers.FlowMatchEulerDiscreteScheduler(**c)),
            vae=make("vae", vae_kl),
            text_encoder=make("text_encoder", clip_model(CLIPTextModelWithProjection)),
            tokenizer=clip_tok,
            text_encoder_2=make("text_encoder_2", clip_model(CLIPTextModelWithProjection)),
            tokenizer_2=make_clip_tokenizer(CLIP_MAX_LENGTH),
            text_encoder_3=make("text_encoder_3", t5_model),
            tokenizer_3=make_t5_tokenizer(T5_MAX_SEQUENCE_LENGTH),
        )
    elif family == "flux":
        pipe = diffusers.FluxPipeline(
            scheduler=make("scheduler", lambda c: diffusers.FlowMatchEulerDiscreteScheduler(**c)),
            vae=make("vae", vae_kl),
            text_encoder=make("text_encoder", clip_model(CLIPTextModel)),
            tokenizer=clip_tok,
            text_encoder_2=make("text_encoder_2", t5_model),
            tokenizer_2=make_t5_tokenizer(T5_MAX_SEQUENCE_LENGTH),
            transformer=make("transformer", denoiser(diffusers.FluxTransformer2DModel)),
        )
        # FluxPipeline hard-codes default_sample_size=128 (latent px); match our native size.
        pipe.default_sample_size = default_size("flux", size)[0] // pipe.vae_scale_factor
    elif family == "pixart":
        pipe = diffusers.PixArtSigmaPipeline(
            tokenizer=make_t5_tokenizer(T5_MAX_SEQUENCE_LENGTH),
            text_encoder=make("text_encoder", t5_model),
            vae=make("vae", vae_kl),
            transformer=make("transformer", denoiser(diffusers.PixArtTransformer2DModel)),
            scheduler=make("scheduler", lambda c: diffusers.DDIMScheduler(**c)),
        )
    else:  # wan
        pipe = diffusers.WanPipeline(
            tokenizer=make_t5_tokenizer(T5_MAX_SEQUENCE_LENGTH),
            text_encoder=make("text_encoder", lambda c: _finish(UMT5EncoderModel(UMT5Config(**c)))),
            vae=make("vae", lambda c: _finish(diffusers.AutoencoderKLWan(**c))),
            scheduler=make("scheduler", lambda c: diffusers.FlowMatchEulerDiscreteScheduler(**c)),
            transformer=make("transformer", denoiser(diffusers.WanTransformer3DModel)),
        )

    for comp in pipe.components.values():
        if isinstance(comp, torch.nn.Module):
            comp.eval()
    pipe.set_progress_bar_config(disable=True)
    den = denoiser_of(pipe)
    den._attnlab_qk_gains = {}
    if attention_logit_std is not None:
        calibrate_attention(pipe, target_std=attention_logit_std, seed=seed, size=size)
    return pipe


_QK_PAIRS = (("to_q", "norm_q"), ("to_k", "norm_k"), ("add_q_proj", "norm_added_q"),
             ("add_k_proj", "norm_added_k"))


def _scalable(module: torch.nn.Module) -> bool:
    for proj, norm in _QK_PAIRS:
        if getattr(module, proj, None) is None:
            continue
        n = getattr(module, norm, None)
        if n is not None and getattr(n, "weight", None) is None:
            return False  # a non-affine QK norm would undo any scaling
    return True


@torch.no_grad()
def _scale_qk(module: torch.nn.Module, gain: float) -> None:
    """Multiply the attention logits of ``module`` by ``gain**2`` exactly (queries and keys by ``gain``):
    scale the QK-norm's affine parameters where there is a norm, else the projection itself."""
    for proj, norm in _QK_PAIRS:
        lin = getattr(module, proj, None)
        if lin is None:
            continue
        n = getattr(module, norm, None)
        target = n if n is not None else lin
        for name in ("weight", "bias"):
            t = getattr(target, name, None)
            if t is not None:
                t.mul_(gain)


def _row_logit_std(q, k, attn_mask=None, scale=None) -> float:
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if k.shape[-3] != q.shape[-3]:  # grouped-query attention
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
    logits = (q.double() @ k.double().transpose(-1, -2)) * scale
    if attn_mask is None:
        return float(logits.std(dim=-1, unbiased=False).mean())
    valid = attn_mask if attn_mask.dtype == torch.bool else attn_mask > -1e4
    valid = valid.expand_as(logits).to(logits.dtype)
    count = valid.sum(-1).clamp_min(1)
    mean = (logits * valid).sum(-1) / count
    var = (((logits - mean.unsqueeze(-1)) ** 2) * valid).sum(-1) / count
    keep = valid.sum(-1) > 1
    return float(var[keep].sqrt().mean()) if bool(keep.any()) else 0.0


def calibrate_attention(pipe, target_std: float = DEFAULT_ATTENTION_LOGIT_STD, seed: int = 0,
                        size: str = "tiny") -> dict[str, float]:
    """Rescale each denoiser attention layer's queries and keys so its logits have row std
    ``target_std`` on the first denoiser call of a default run (:func:`tiny_call_kwargs`).

    Layers are calibrated in execution order within one pass (later layers see the already
    calibrated earlier ones). Values and outputs projections are untouched; the change is an exact
    reparametrisation of the logit temperature (weights of ``to_q``/``to_k``/``add_q_proj``/
    ``add_k_proj``, or of their QK-norms where present). Deterministic; returns ``{module: gain}``,
    also stored as ``denoiser._attnlab_qk_gains``.
    """
    from torch.overrides import TorchFunctionMode

    sdpa = torch.nn.functional.scaled_dot_product_attention
    den = denoiser_of(pipe)
    mods = {name: m for name, (_, m) in attention_modules(den).items()}
    gains: dict[str, float] = {}
    state: dict[str, Any] = {"current": None, "den_calls": 0}

    class _Calibrate(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = dict(kwargs or {})
            name = state["current"]
            if func is not sdpa or name is None or name in gains or state["den_calls"] != 1:
                return func(*args, **kwargs)
            args = list(args)
            names = ("query", "key", "value", "attn_mask")
            vals = args + [kwargs.pop(n, None) for n in names[len(args):]]
            q, k, v, mask = (vals + [None] * 4)[:4]
            std = _row_logit_std(q, k, mask, kwargs.get("scale"))
            gain = math.sqrt(target_std / std) if std > 0 and _scalable(mods[name]) else 1.0
            gains[name] = gain
            _scale_qk(mods[name], gain)
            rest = vals[4:]
            return func(q * gain, k * gain, v, mask, *rest, **kwargs)

    def enter(name):
        def hook(module, args):
            state["current"] = name

        return hook

    def leave(module, args, output):
        state["current"] = None

    def count(module, args):
        state["den_calls"] += 1

    handles = [den.register_forward_pre_hook(count)]
    for name, m in mods.items():
        handles.append(m.register_forward_pre_hook(enter(name)))
        handles.append(m.register_forward_hook(leave))
    kwargs = tiny_call_kwargs(family_of(pipe), size=size, output_type="latent",
                              generator=torch.Generator().manual_seed(int(seed)))
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad(), _Calibrate():
            pipe(**kwargs)
    finally:
        for h in handles:
            h.remove()
    den._attnlab_qk_gains = dict(gains)
    return gains


def build_mid_pipeline(family: str = "flux", seed: int = 0, **overrides):
    """The 1024-image-token benchmark model (``size="mid"``): ``"flux"`` or ``"sd15"``.

    Call it with ``tiny_call_kwargs(family, size="mid")`` / ``run_tiny_pipeline(pipe, size="mid")``.
    """
    return build_tiny_pipeline(family, seed=seed, size="mid", **overrides)


# -------------------------------------------------------------------------------------------- calls


def tiny_call_kwargs(family: str, size: str = "tiny", **overrides) -> dict:
    """Default ``pipe(**kwargs)`` arguments: 2 steps at the native size, ``output_type="pt"``.

    CFG families use ``guidance_scale=5`` (doubling the batch); FLUX uses ``guidance_scale=3.5`` as
    the distilled guidance embedding (one pass per step). Text lengths are fixed so token counts are
    known (:func:`text_tokens`). A fresh ``torch.Generator().manual_seed(0)`` is created per call.
    Any keyword overrides or adds an argument.
    """
    _check_family(family)
    h, w = default_size(family, size)
    kw: dict[str, Any] = dict(
        prompt="a photo of a cat sitting on a red chair",
        height=h,
        width=w,
        num_inference_steps=2,
        guidance_scale=5.0,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    )
    if family == "sd3":
        kw["max_sequence_length"] = T5_MAX_SEQUENCE_LENGTH
    elif family == "flux":
        kw["guidance_scale"] = 3.5
        kw["max_sequence_length"] = T5_MAX_SEQUENCE_LENGTH
    elif family == "pixart":
        kw.update(max_sequence_length=T5_MAX_SEQUENCE_LENGTH, use_resolution_binning=False,
                  clean_caption=False)
    elif family == "wan":
        kw.update(num_frames=_WAN_NUM_FRAMES, max_sequence_length=T5_MAX_SEQUENCE_LENGTH)
    kw.update(overrides)
    return kw


def family_of(pipe) -> str:
    """The family name of a pipeline built here (by pipeline class name)."""
    name = type(pipe).__name__
    for fam, cls_name in _PIPELINE_CLASS_NAMES.items():
        if name == cls_name:
            return fam
    raise ValueError(f"not a pipeline of a known family: {name}")


def denoiser_of(pipe) -> torch.nn.Module:
    """The pipeline's denoiser (``unet`` or ``transformer``)."""
    return pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer


def output_tensor(result) -> torch.Tensor:
    """The image/frames/latent tensor of a pipeline output (``.images`` or ``.frames``)."""
    for attr in ("images", "frames"):
        value = getattr(result, attr, None)
        if value is not None:
            return value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    return result[0]


def run_tiny_pipeline(pipe, size: str = "tiny", **overrides) -> torch.Tensor:
    """Run ``pipe`` with :func:`tiny_call_kwargs` (plus ``overrides``) and return the output tensor."""
    kwargs = tiny_call_kwargs(family_of(pipe), size=size, **overrides)
    with torch.no_grad():
        return output_tensor(pipe(**kwargs))


def attention_modules(pipe_or_model) -> dict[str, tuple[str, torch.nn.Module]]:
    """Denoiser attention modules by path -> (kind, module).

    kind: ``"self"`` (``attn1``), ``"cross"`` (``attn2``), ``"joint"`` (SD3 / FLUX double blocks,
    text and image projected separately), ``"single"`` (FLUX single blocks: one fused text+image
    sequence).
    """
    model = pipe_or_model if isinstance(pipe_or_model, torch.nn.Module) else denoiser_of(pipe_or_model)
    out: dict[str, tuple[str, torch.nn.Module]] = {}
    for name, m in model.named_modules():
        if not (hasattr(m, "get_processor") and hasattr(m, "heads") and hasattr(m, "to_q")):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if name.startswith("single_transformer_blocks"):
            kind = "single"
        elif getattr(m, "add_q_proj", None) is not None:
            kind = "joint"
        elif leaf == "attn2" or getattr(m, "is_cross_attention", False):
            kind = "cross"
        else:
            kind = "self"
        out[name] = (kind, m)
    return out


def attention_summary(pipe_or_model) -> dict:
    """Counts of attention modules per kind, and the sets of head counts and head dims."""
    mods = attention_modules(pipe_or_model)
    counts = {k: 0 for k in ("self", "cross", "joint", "single")}
    heads, dims = set(), set()
    for kind, m in mods.values():
        counts[kind] += 1
        heads.add(int(m.heads))
        dims.add(int(m.to_q.out_features // m.heads))
    return {**counts, "heads": sorted(heads), "head_dim": sorted(dims)}


def _param_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def describe(pipe) -> dict:
    """A short summary of a pipeline built here (for reports and benchmarks)."""
    den = denoiser_of(pipe)
    return {
        "pipeline": type(pipe).__name__,
        "denoiser_params": _param_count(den),
        "processors": sorted({type(p).__name__ for p in den.attn_processors.values()}),
        **attention_summary(den),
    }
