"""What each demo tab does, without Gradio: plain functions from the inputs to images and a summary.

Pipelines are loaded once per model name and shared; every run takes that model's lock, because attnlab
installs its effects on the (shared) denoiser for the duration of a run, so two users never run on the same
pipeline at once and never see each other's effects. Nothing else is kept between calls.
"""

from __future__ import annotations

import inspect
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image

from ..images import frames_of
from ..loading import LoadedModel, OnModel, load_model

Progress = Callable[[float, str], None]

#: the embedded models offered by default (random-weight tiny models; trained toy models when shipped)
EMBEDDED = ("tiny-sd15", "tiny-sdxl", "tiny-sd3", "tiny-flux", "tiny-pixart", "tiny-wan")


def embedded_models() -> list[str]:
    """The trained toy models first (when their weights are installed), then the tiny random-weight ones."""
    names = []
    try:
        from ..toyworld.models import available_toy_models  # noqa: PLC0415 - shipped with issue 8's weights

        names += [f"toy-{n}" for n in available_toy_models()]
    except ImportError:
        pass
    return names + list(EMBEDDED)


@dataclass
class Loaded(OnModel):
    model: LoadedModel
    lock: threading.Lock


class ModelStore:
    """Loads each model once; `get(name)` returns it with its run lock."""

    def __init__(self, device: str = "cpu"):
        self.device = device
        self._models: dict[str, Loaded] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> Loaded:
        name = (name or "").strip()
        if not name:
            raise ValueError("choose a model: an embedded one, a local diffusers folder or a hub id")
        with self._lock:
            if name not in self._models:
                self._models[name] = Loaded(load_model(name, self.device), threading.Lock())
            return self._models[name]


def _steps_callback(progress: Optional[Progress], steps: int, start: float, span: float, what: str, pipe=None) -> dict:
    """Pipeline keyword arguments that report step i of `steps` as progress in [start, start + span]: diffusers'
    `callback_on_step_end`, or the older `callback` (PixArt)."""
    def report(i):
        if progress is not None:
            progress(start + span * (i + 1) / max(1, steps), f"{what}: step {i + 1}/{steps}")

    target = getattr(pipe, "pipe", pipe)
    params = inspect.signature(type(target).__call__).parameters if target is not None else {}
    if "callback_on_step_end" in params or target is None:
        return {"callback_on_step_end": lambda p, i, t, kw: (report(i), {})[1]}
    if "callback" in params:
        return {"callback": lambda i, t, latents: report(i), "callback_steps": 1}
    return {}


def _call(loaded: Loaded, prompt: str, height: int, width: int, steps: int, guidance: float) -> dict:
    if not prompt.strip():
        raise ValueError("the prompt is empty")
    call = dict(prompt=prompt, height=int(height), width=int(width), num_inference_steps=int(steps),
                guidance_scale=float(guidance))
    if loaded.model.frames is not None:
        call["num_frames"] = loaded.model.frames
    call.update(loaded.model.call_kwargs)
    return call


def _check_steps(steps) -> int:
    steps = int(steps)
    if not 1 <= steps <= 200:
        raise ValueError(f"steps must be in [1, 200]; got {steps}")
    return steps


def _mid(frames: list[Image.Image]) -> Image.Image:
    return frames[len(frames) // 2].convert("RGB")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


# --- entropy scaling -------------------------------------------------------------------------------

def run_entropy(store: ModelStore, model: str, prompt: str, resolution: float, steps: int, seed: int,
                strength: float = 1.0, progress: Optional[Progress] = None):
    """Stock vs entropy-scaled sampling at `resolution` × the model's native size."""
    from ..pipelines.entropy import entropy_scaling

    steps = _check_steps(steps)
    if not 0.25 <= float(resolution) <= 4.0:
        raise ValueError(f"resolution must be between 0.25× and 4× the native size; got {resolution}")
    loaded = store.get(model)
    mult = loaded.model.size_multiple
    h = max(mult, round(loaded.native[0] * float(resolution) / mult) * mult)
    w = max(mult, round(loaded.native[1] * float(resolution) / mult) * mult)
    call = _call(loaded, prompt, h, w, steps, 5.0 if loaded.family != "flux" else 3.5)
    with loaded.lock, torch.no_grad():
        t0 = time.perf_counter()
        off = _mid(frames_of(loaded.pipe(**call, generator=_gen(seed),
                                       **_steps_callback(progress, steps, 0.0, 0.5, "stock", loaded.pipe))))
        t1 = time.perf_counter()
        with entropy_scaling(loaded.pipe, strength=float(strength), train_size=loaded.model.native_size) as session:
            on = _mid(frames_of(loaded.pipe(**call, generator=_gen(seed),
                                          **_steps_callback(progress, steps, 0.5, 0.5, "scaled", loaded.pipe))))
            lam = session.effects[0].last_lambda
        t2 = time.perf_counter()
    lams = sorted(set(round(v, 3) for v in lam.values())) if lam else []
    info = (f"{model} at {w}×{h} (native {loaded.native[1]}×{loaded.native[0]}); λ per layer: "
            f"{', '.join(map(str, lams[:6])) or '1 (native size: bit-identical)'}; stock {t1 - t0:.2f} s, "
            f"scaled {t2 - t1:.2f} s")
    return off, on, info


# --- SoftPAG ---------------------------------------------------------------------------------------

def softpag_choices(store: ModelStore, model: str) -> list[str]:
    """Head-set suggestions for the picker: the model's default, its presets, whole middle layers."""
    from ..processors.presets import list_presets

    loaded = store.get(model)
    out = [loaded.model.default_heads]
    out += [f"preset:{p}" for p in list_presets()]
    return out


def run_softpag(store: ModelStore, model: str, prompt: str, heads: str, scale: float, u: float, steps: int,
                seed: int, progress: Optional[Progress] = None):
    from ..pipelines.softpag import SoftPAGPipeline

    steps = _check_steps(steps)
    loaded = store.get(model)
    heads = (heads or "").strip() or loaded.model.default_heads
    preset = heads[len("preset:"):] if heads.startswith("preset:") else None
    pag = SoftPAGPipeline.from_pipe(loaded.pipe, heads=None if preset else heads, preset=preset, scale=float(scale),
                                    u=float(u))
    call = _call(loaded, prompt, *loaded.native, steps, 5.0 if loaded.family != "flux" else 3.5)
    with loaded.lock, torch.no_grad():
        t0 = time.perf_counter()
        off = _mid(frames_of(loaded.pipe(**call, generator=_gen(seed),
                                       **_steps_callback(progress, steps, 0.0, 0.5, "stock", loaded.pipe))))
        t1 = time.perf_counter()
        on = _mid(frames_of(pag(**call, generator=_gen(seed),
                              **_steps_callback(progress, steps, 0.5, 0.5, "SoftPAG", loaded.pipe))))
        t2 = time.perf_counter()
    info = (f"heads {pag.effect.resolved_heads}, w = {pag.schedule.scale:g}, u = {pag.effect.u:g}; "
            f"{pag.extra_passes} extra forwards; stock {t1 - t0:.2f} s, SoftPAG {t2 - t1:.2f} s")
    return off, on, info


# --- RefAM -----------------------------------------------------------------------------------------

def toy_scene(seed: int, size: int = 64):
    """A toy-world scene and its first referring expression."""
    from ..toyworld.scenes import referring_expressions, render, sample_scene

    scene = sample_scene(int(seed))
    return render(scene, size), referring_expressions(scene)[0]["text"]


def run_refam(store: ModelStore, model: str, image, expression: str, noise: float, gas_mode: str,
              progress: Optional[Progress] = None):
    from ..pipelines.refam import RefAMPipeline
    from ..processors.refam_heatmap import colorize

    if image is None:
        raise ValueError("upload an image or make a toy scene first")
    loaded = store.get(model)
    if loaded.family == "wan":
        raise ValueError("the demo's RefAM tab takes images; choose an image model (Wan segments videos in the API)")
    seg = RefAMPipeline.from_pipe(loaded.pipe, sigmas=(float(noise),), gas_mode=gas_mode)
    if progress is not None:
        progress(0.1, "encoding")
    extras = loaded.model.text_lengths()
    with loaded.lock, torch.no_grad():
        out = seg(image, expression, resize=True, **extras)
    heat = Image.fromarray(colorize(out.heatmap))
    mask = Image.fromarray((out.mask.numpy() * 255).astype(np.uint8))
    info = (f"prompt: {out.prompt!r}; content words: {', '.join(out.words)}; sinks dropped: "
            f"{sum(len(v) for v in out.sinks.values())}; forward {out.timings['forward_s']:.2f} s, total "
            f"{out.timings['total_s']:.2f} s")
    return out.overlay, mask, heat, info


# --- Attentive Eraser ------------------------------------------------------------------------------

MASK_RGBA = (0, 0, 0, 200)  # the painted-over colour of the Eraser tab's mask layer (the brush's)


def eraser_scene(seed: int, size: int = 64, margin: int = 2) -> dict:
    """A two-object toy scene for the Eraser tab as an ImageMask value, its first object already painted over
    (its mask grown by a ``margin``-pixel disk, as a careful stroke would be), so Erase shows the effect at once."""
    from ..processors.eraser import dilate
    from ..toyworld.scenes import ground_truth, render, sample_scene

    scene = sample_scene(int(seed), n_objects=2)
    image = np.asarray(render(scene, size).convert("RGB"))
    obj = torch.from_numpy(ground_truth(scene, size)[0]["mask"])[None, None].float()
    mask = dilate(obj, margin)[0, 0].numpy() > 0.5
    layer = np.zeros((size, size, 4), np.uint8)
    layer[mask] = MASK_RGBA
    alpha = layer[..., 3:].astype(np.float32) / 255.0
    composite = (image * (1 - alpha) + layer[..., :3] * alpha).astype(np.uint8)
    return {"background": image, "layers": [layer], "composite": composite}


def editor_mask(value) -> tuple[Image.Image, Image.Image]:
    """(image, mask) from a Gradio ImageMask value: the background and the union of the painted layers' alpha."""
    if value is None or value.get("background") is None:
        raise ValueError("upload an image (or make a toy scene) and paint over the object to remove")
    bg = np.asarray(value["background"])
    alpha = np.zeros(bg.shape[:2], bool)
    for layer in value.get("layers") or []:
        layer = np.asarray(layer)
        if layer.ndim == 3 and layer.shape[-1] == 4 and layer.shape[:2] == alpha.shape:
            alpha |= layer[..., 3] > 0
    if not alpha.any():
        raise ValueError("paint over the object to remove (the mask is empty)")
    image = Image.fromarray(bg[..., :3].astype(np.uint8))
    return image, Image.fromarray((alpha * 255).astype(np.uint8))


def run_eraser(store: ModelStore, model: str, editor, scale: float, steps: int, seed: int,
               progress: Optional[Progress] = None):
    from ..pipelines.eraser import AttentiveEraserPipeline, default_mode

    steps = _check_steps(steps)
    image, mask = editor_mask(editor)
    loaded = store.get(model)
    if loaded.family != "unet":
        raise ValueError(f"the Attentive Eraser tab runs on SD1.5/SDXL models; {model} is a {loaded.family} model")
    h, w = loaded.native
    image, mask = image.resize((w, h)), mask.resize((w, h), Image.NEAREST)
    mode = default_mode(loaded.pipe)  # SIP needs a 4-channel UNet (diffusers' inpaint pipeline); the toy models: DIP
    erase = dict(prompt="", num_inference_steps=steps, strength=0.8 if mode == "sip" else None, **loaded.model.call_kwargs)
    with loaded.lock, torch.no_grad():
        t0 = time.perf_counter()
        eraser = AttentiveEraserPipeline.from_pipe(loaded.pipe, sarg_scale=float(scale), mode=mode)
        plain = AttentiveEraserPipeline.from_pipe(loaded.pipe, sarg_scale=0.0, mode=mode)
        before = plain(image, mask, generator=_gen(seed), **erase).images[0]
        if progress is not None:
            progress(0.5, "plain inpainting done")
        after = eraser(image, mask, generator=_gen(seed), **erase).images[0]
        t = time.perf_counter() - t0
    info = (f"{mode.upper()}, SARG scale {scale:g}, {steps} steps, {eraser.extra_passes} extra forwards; {t:.2f} s for "
            "both runs")
    return image, before, after, info


# --- AlignedGen ------------------------------------------------------------------------------------

def _prompt_list(text: str) -> list[str]:
    prompts = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if len(prompts) < 2:
        raise ValueError("give at least 2 prompts, one per line (the first image is the style reference)")
    if len(prompts) > 6:
        raise ValueError(f"the demo aligns up to 6 prompts; got {len(prompts)}")
    return prompts


def run_alignedgen(store: ModelStore, model: str, prompts: str, steps: int, seed: int,
                   progress: Optional[Progress] = None):
    """The same batch plain and style-aligned (shared attention to the first image)."""
    from ..pipelines.alignedgen import AlignedGenPipeline

    steps = _check_steps(steps)
    items = _prompt_list(prompts)
    loaded = store.get(model)
    aligned = AlignedGenPipeline.from_pipe(loaded.pipe)
    call = _call(loaded, items[0], *loaded.native, steps, 5.0 if loaded.family != "flux" else 3.5)
    call["prompt"] = items
    with loaded.lock, torch.no_grad():
        t0 = time.perf_counter()
        plain = frames_of(loaded.pipe(**call, generator=_gen(seed),
                                    **_steps_callback(progress, steps, 0.0, 0.5, "plain batch", loaded.pipe)))
        t1 = time.perf_counter()
        shared = frames_of(aligned(**call, generator=_gen(seed),
                                 **_steps_callback(progress, steps, 0.5, 0.5, "aligned batch", loaded.pipe)))
        t2 = time.perf_counter()
    info = f"{len(items)} prompts; plain batch {t1 - t0:.2f} s, aligned batch {t2 - t1:.2f} s ({(t2 - t1) / max(t1 - t0, 1e-9):.2f}×)"
    return ([(img, p) for img, p in zip(plain, items)], [(img, p) for img, p in zip(shared, items)], info)


# --- FreeSwim --------------------------------------------------------------------------------------

def run_freeswim(store: ModelStore, model: str, prompt: str, scale: float, steps: int, seed: int,
                 progress: Optional[Progress] = None):
    """Direct sampling at the target size vs FreeSwim's two stages (native size, then windowed re-denoising)."""
    from ..pipelines.freeswim import FreeSwimPipeline

    steps = _check_steps(steps)
    if not 1.0 < float(scale) <= 4.0:
        raise ValueError(f"target size must be more than 1× and at most 4× the native size; got {scale}")
    loaded = store.get(model)
    swim = FreeSwimPipeline.from_pipe(loaded.pipe)  # raises for pipelines it cannot drive
    mult = swim.multiple
    h, w = (max(mult, round(s * float(scale) / mult) * mult) for s in loaded.native)
    call = _call(loaded, prompt, h, w, steps, 5.0 if loaded.family != "flux" else 3.5)
    with loaded.lock, torch.no_grad():
        t0 = time.perf_counter()
        direct = _mid(frames_of(loaded.pipe(**call, generator=_gen(seed),
                                          **_steps_callback(progress, steps, 0.0, 0.5, "direct", loaded.pipe))))
        t1 = time.perf_counter()
        kw = {k: v for k, v in call.items() if k not in ("height", "width", "num_inference_steps")}
        out = swim(height=h, width=w, num_inference_steps=steps, generator=_gen(seed), **kw)
        swum = _mid(frames_of(out))
        t2 = time.perf_counter()
        if progress is not None:
            progress(1.0, "FreeSwim done")
    info = (f"{w}×{h} ({float(scale):g}× native {loaded.native[1]}×{loaded.native[0]}); direct {t1 - t0:.2f} s, "
            f"FreeSwim (both stages) {t2 - t1:.2f} s")
    return direct, swum, info
