"""Checks for what users hand a pipeline wrapper's call (prompts, step counts, strengths, images), run before
any denoiser work so that a bad value fails with a message that names it instead of deep inside diffusers."""

from __future__ import annotations

import numpy as np
import torch

from ..processors.params import (MAX_PIXELS, InvalidParameter, ParameterTypeError, integer, number, pixel_size,
                                 prompts)

MAX_STEPS = 1000
MAX_GUIDANCE = 100.0

#: call arguments every wrapper checks the same way: name -> check(name, value) (None always passes through)
_CALL_CHECKS = {
    "prompt": prompts,
    "negative_prompt": prompts,
    "prompt_2": prompts,
    "num_inference_steps": lambda n, v: integer(n, v, 1, MAX_STEPS),
    "base_steps": lambda n, v: integer(n, v, 1, MAX_STEPS),
    "strength": lambda n, v: number(n, v, 0.0, 1.0, low_open=True),
    "guidance_scale": lambda n, v: number(n, v, 0.0, MAX_GUIDANCE),
    "true_cfg_scale": lambda n, v: number(n, v, 0.0, MAX_GUIDANCE),
    "num_images_per_prompt": lambda n, v: integer(n, v, 1, 64),
    "height": lambda n, v: integer(n, v, 1, MAX_PIXELS),
    "width": lambda n, v: integer(n, v, 1, MAX_PIXELS),
    "num_frames": lambda n, v: integer(n, v, 1, 10_000),
    "max_sequence_length": lambda n, v: integer(n, v, 1, 4096),
}


def check_call_args(args: dict) -> None:
    """Check the common call arguments present in `args` (a pipeline call's keyword arguments)."""
    for name, check in _CALL_CHECKS.items():
        if args.get(name) is not None:
            check(name, args[name])


def check_size_multiple(name: str, height: int, width: int, multiple: int) -> None:
    """Sides that are positive multiples of `multiple` pixels (the VAE factor × patch size)."""
    height, width = pixel_size(name, (height, width), dims=(2,))
    if height % multiple or width % multiple:
        raise InvalidParameter(f"{name} is {height}x{width} pixels; this model needs sides that are multiples of "
                               f"{multiple} pixels: crop or resize it, or pass height= and width= to resize")


def _array_image(name: str, x: np.ndarray) -> np.ndarray:
    """An (H, W), (H, W, C) or (B, H, W, C) array as float RGB in [0, 1], (B, H, W, 3)."""
    if x.dtype.kind not in "buif":
        raise ParameterTypeError(f"{name} must be a numeric array; got dtype {x.dtype}")
    x = x.astype(np.float32) / (255.0 if x.dtype.kind in "ui" and x.size and x.max() > 1 else 1.0)
    if x.ndim == 2:
        x = x[..., None]
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3, 4):
        raise InvalidParameter(f"{name} must be (H, W), (H, W, C) or (B, H, W, C) with C in 1, 3, 4; "
                               f"got shape {x.shape}")
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    return x[..., :3]


def _finite(name: str, x) -> None:
    if not bool(np.isfinite(np.asarray(x)).all()):
        raise InvalidParameter(f"{name} contains NaN or infinite values")


def rgb_images(name: str, image, *, min_side: int = 8):
    """The image input of a pipeline call, checked and made RGB: a PIL image of any mode (grayscale, RGBA,
    palette, 16-bit: converted to RGB, alpha dropped), an array (H, W[, C]) / (B, H, W, C) with C in 1/3/4, a
    tensor (C, H, W) / (B, C, H, W) as diffusers takes it, or a list of those. Returns (images, count,
    (height, width)): images as a PIL image / list of PIL images, an array (B, H, W, 3) or a tensor."""
    from PIL import Image

    if image is None:
        raise InvalidParameter(f"{name} is missing")
    items = image if isinstance(image, (list, tuple)) else [image]
    if not items:
        raise InvalidParameter(f"{name} is an empty list")
    out, sizes, count = [], set(), 0
    for item in items:
        if isinstance(item, Image.Image):
            rgb = item if item.mode == "RGB" else (
                item.convert("RGBA").convert("RGB") if item.mode == "P" else item.convert("RGB"))
            if item.mode.startswith("I") or item.mode == "F":  # 16/32-bit: scale to 8 bits, not clip
                arr = np.asarray(item, dtype=np.float32)
                peak = float(arr.max()) if arr.size else 1.0
                rgb = Image.fromarray((np.clip(arr / max(peak, 1.0), 0, 1) * 255).astype(np.uint8)).convert("RGB")
            out.append(rgb)
            sizes.add((rgb.height, rgb.width))
            count += 1
        elif isinstance(item, np.ndarray):
            arr = _array_image(name, item)
            _finite(name, arr)
            out.append(arr)
            sizes.add(arr.shape[1:3])
            count += arr.shape[0]
        elif torch.is_tensor(item):
            t = item[None] if item.ndim == 3 else item
            if t.ndim != 4 or t.shape[1] not in (1, 3) or t.is_complex():
                raise InvalidParameter(f"{name} as a tensor must be (C, H, W) or (B, C, H, W) with C = 3 (or 1); "
                                       f"got shape {tuple(item.shape)}")
            if not bool(torch.isfinite(t).all()):
                raise InvalidParameter(f"{name} contains NaN or infinite values")
            out.append(t.expand(-1, 3, -1, -1) if t.shape[1] == 1 else t)
            sizes.add(tuple(t.shape[-2:]))
            count += t.shape[0]
        else:
            raise ParameterTypeError(f"{name} must be a PIL image, numpy array or torch tensor (or a list of them); "
                                     f"got {type(item).__name__}")
    if len(sizes) > 1:
        raise InvalidParameter(f"the images of {name} differ in size: {sorted(sizes)}")
    (h, w), = sizes
    if min(h, w) < min_side:
        raise InvalidParameter(f"{name} is {h}x{w} pixels; it must be at least {min_side} pixels on each side")
    if max(h, w) > MAX_PIXELS:
        raise InvalidParameter(f"{name} is {h}x{w} pixels; the largest side accepted is {MAX_PIXELS}")
    if isinstance(image, (list, tuple)):
        kinds = {type(o) for o in out}
        result = out if kinds == {Image.Image} or all(issubclass(k, Image.Image) for k in kinds) else (
            np.concatenate(out) if kinds == {np.ndarray} else torch.cat(out) if kinds == {torch.Tensor} else None)
        if result is None:
            raise ParameterTypeError(f"{name} mixes PIL images, arrays and tensors; pass one kind")
    else:
        result = out[0]
    return result, count, (h, w)
