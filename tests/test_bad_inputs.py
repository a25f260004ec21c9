"""Hostile-but-realistic inputs to the public Python API (effects, pipeline wrappers, nodes): every one fails with
an error that names the parameter, before any denoiser forward, and leaves the model exactly as it was.
(The CLI has its own sweep in tests/test_cli_errors.py.)"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from PIL import Image

from attnlab.models.tiny import build_tiny_pipeline
from attnlab.processors.alignedgen import AlignedGen
from attnlab.processors.entropy import EntropyScaling
from attnlab.processors.eraser import AttentiveEraser, dilate
from attnlab.processors.freeswim import FreeSwim, freeswim_effects
from attnlab.processors.params import InvalidParameter, ParameterTypeError
from attnlab.processors.softpag import GuidanceSchedule, SoftPAG

S = 32  # tiny pipelines: VAE factor 2
MASK = torch.zeros(S, S)
MASK[8:20, 8:20] = 1


@pytest.fixture(scope="module")
def sd15():
    return build_tiny_pipeline("sd15")


@pytest.fixture(scope="module")
def flux():
    return build_tiny_pipeline("flux")


def _denoiser(pipe):
    return getattr(pipe, "unet", None) or pipe.transformer


def _state(pipe) -> tuple:
    """What must not change: every attention processor object, and the denoiser's hooks."""
    d = _denoiser(pipe)
    registry = getattr(d, "_diffusers_hook", None)
    hooks = tuple(sorted(registry.hooks)) if registry is not None else ()
    return tuple((name, id(p)) for name, p in d.attn_processors.items()), hooks


def expect_refusal(pipe, call, error, *names):
    """`call()` raises `error` whose message names every one of `names`, with no denoiser forward and nothing
    left installed."""
    before = _state(pipe)
    forwards = []
    handle = _denoiser(pipe).register_forward_pre_hook(lambda *a: forwards.append(1))
    try:
        with pytest.raises(error) as info:
            call()
    finally:
        handle.remove()
    for name in names:
        assert name in str(info.value), (name, str(info.value))
    assert forwards == [], "a denoiser forward ran before the error"
    assert _state(pipe) == before, "something stayed installed"
    return info.value


# --- effects: type, finiteness, range, bounds; each message names the parameter ---------------------------
EFFECT_CASES = [
    (lambda: EntropyScaling(strength="1"), ParameterTypeError, "strength"),
    (lambda: EntropyScaling(strength=float("nan")), InvalidParameter, "strength"),
    (lambda: EntropyScaling(train_size="64"), ParameterTypeError, "train_size"),
    (lambda: EntropyScaling(train_size=(0, 0)), InvalidParameter, "train_size"),
    (lambda: EntropyScaling(train_size=(-64, 64)), InvalidParameter, "train_size"),
    (lambda: EntropyScaling(token_count=3), InvalidParameter, "token_count"),
    (lambda: AttentiveEraser(MASK, ss_steps=9.5), InvalidParameter, "ss_steps"),
    (lambda: AttentiveEraser(MASK, ss_scale=None), ParameterTypeError, "ss_scale"),
    (lambda: AttentiveEraser(MASK, dilate_px=1e30), InvalidParameter, "dilate_px"),
    (lambda: AttentiveEraser(MASK, layers=[]), InvalidParameter, "layers"),
    (lambda: AttentiveEraser(MASK, layers=""), InvalidParameter, "layers"),
    (lambda: AttentiveEraser(MASK, layers=3), ParameterTypeError, "layers"),
    (lambda: AttentiveEraser(MASK, mask_text_queries="no"), ParameterTypeError, "mask_text_queries"),
    (lambda: AttentiveEraser(torch.full((S, S), float("nan"))), InvalidParameter, "mask"),
    (lambda: FreeSwim(window_scale="2"), ParameterTypeError, "window_scale"),
    (lambda: FreeSwim(cache_steps=0), InvalidParameter, "cache_steps"),
    (lambda: FreeSwim(override_steps=(0.6, 0.2)), InvalidParameter, "override_steps"),
    (lambda: FreeSwim(tile=(0, 4)), InvalidParameter, "tile"),
    (lambda: FreeSwim(override_layers=[]), InvalidParameter, "override_layers"),
    (lambda: FreeSwim(base_size="1024"), ParameterTypeError, "base_size"),
    (lambda: freeswim_effects(logit_scale=-1), InvalidParameter, "logit_scale"),
    (lambda: AlignedGen(layers="0-100000000"), InvalidParameter, "layers"),
    (lambda: AlignedGen(layers=[]), InvalidParameter, "layers"),
    (lambda: AlignedGen(shift=1.5), InvalidParameter, "shift"),
    (lambda: AlignedGen(scale=float("nan")), InvalidParameter, "scale"),
    (lambda: AlignedGen(steps="ab"), ParameterTypeError, "steps"),
    (lambda: AlignedGen(ref_frames=0), InvalidParameter, "ref_frames"),
    (lambda: SoftPAG(""), InvalidParameter, "heads"),
    (lambda: SoftPAG(";;"), InvalidParameter, "heads"),
    (lambda: SoftPAG(set()), InvalidParameter, "heads"),
    (lambda: SoftPAG({1: []}), InvalidParameter, "heads"),
    (lambda: SoftPAG(3), ParameterTypeError, "heads"),
    (lambda: SoftPAG([1, 2]), ParameterTypeError, "heads"),
    (lambda: SoftPAG("L0-100000000"), InvalidParameter, "100000000"),
    (lambda: SoftPAG("L0:*", u="0.5"), ParameterTypeError, "u"),
    (lambda: SoftPAG("L0:*", u=float("nan")), InvalidParameter, "u"),
    (lambda: SoftPAG("L0:*", target="ident"), InvalidParameter, "target"),
    (lambda: GuidanceSchedule(scale=1e30).validate(), InvalidParameter, "scale"),
    (lambda: GuidanceSchedule(scale=2.0, start=float("nan")).validate(), InvalidParameter, "start"),
]


@pytest.mark.parametrize("make,error,name", EFFECT_CASES, ids=[f"{c[2]}-{i}" for i, c in enumerate(EFFECT_CASES)])
def test_effect_constructors_name_the_bad_parameter(make, error, name):
    with pytest.raises(error) as info:
        make()
    assert name in str(info.value)
    assert isinstance(info.value, ValueError)  # InvalidParameter and ParameterTypeError are ValueErrors too


def test_huge_dilation_and_layer_ranges_are_cheap():
    """A disk wider than the image covers it at once (no r² kernel); a typo'd layer range is refused, not
    expanded into memory."""
    m = torch.zeros(1, 1, 64, 64)
    m[..., 30, 30] = 1
    t = time.perf_counter()
    assert dilate(m, 3000.0).all()
    assert AttentiveEraser(m, dilate_px=20000).mask.all()
    with pytest.raises(InvalidParameter, match="layers"):
        AlignedGen(layers="0-100000000")
    assert time.perf_counter() - t < 2.0


def test_dilation_is_the_exact_disk():
    """The row-decomposed dilation equals a 2-D convolution with the disk x² + y² ≤ r²."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    for trial in range(30):
        h, w = torch.randint(2, 30, (2,), generator=g).tolist()
        m = (torch.rand(2, 1, h, w, generator=g) > 0.95).float()
        px = float(torch.rand(1, generator=g) * 12) if trial % 3 else float(trial % 9)
        r = int(math.floor(px))
        if r == 0:
            assert torch.equal(dilate(m, px), m)
            continue
        y, x = torch.meshgrid(torch.arange(-r, r + 1), torch.arange(-r, r + 1), indexing="ij")
        disk = ((x * x + y * y) <= px * px).float()[None, None]
        want = (F.conv2d(F.pad(m, (r, r, r, r)), disk) > 0.5).float()
        assert torch.equal(dilate(m, px), want), (h, w, px)


# --- pipelines ------------------------------------------------------------------------------------------
def test_softpag_pipeline_refuses_bad_input(sd15):
    from attnlab.pipelines.softpag import SoftPAGPipeline
    from attnlab.processors.softpag import SoftPAG
    from attnlab.processors.headsets import HeadSet

    expect_refusal(sd15, lambda: SoftPAGPipeline(sd15, heads="L0:*", scale=1e30), InvalidParameter, "scale")
    expect_refusal(sd15, lambda: SoftPAGPipeline(sd15, heads="L0:*", scale="3"), ParameterTypeError, "scale")
    expect_refusal(sd15, lambda: SoftPAGPipeline(sd15, heads="L0:*", effects=EntropyScaling()),
                   ParameterTypeError, "effects", "[EntropyScaling(...)]")
    expect_refusal(sd15, lambda: SoftPAGPipeline(sd15, heads="L0:*", effects=[SoftPAG(HeadSet.of("L0:*"), u=0.5)]),
                   InvalidParameter, "effects", "SoftPAG")
    pag = SoftPAGPipeline(sd15, heads="L0:*", scale=2.0)
    expect_refusal(sd15, lambda: SoftPAGPipeline(pag, heads="L0:*"), ParameterTypeError, "SoftPAGPipeline",
                   "enabled()")
    call = dict(num_inference_steps=2, height=S, width=S, output_type="latent")
    expect_refusal(sd15, lambda: pag([], **call), InvalidParameter, "prompt")
    expect_refusal(sd15, lambda: pag(["ok", 3], **call), ParameterTypeError, "prompt")
    expect_refusal(sd15, lambda: pag("a red circle", **{**call, "num_inference_steps": 0}), InvalidParameter,
                   "num_inference_steps")
    expect_refusal(sd15, lambda: pag("a red circle", **{**call, "guidance_scale": float("nan")}), InvalidParameter,
                   "guidance_scale")

    def nested():
        with pag.enabled(cfg_scale=None):
            with pag.enabled(cfg_scale=None):
                pass

    before = _state(sd15)
    with pytest.raises(InvalidParameter, match="guidance pass"):
        nested()
    assert _state(sd15) == before


def test_wrappers_do_not_nest(sd15):
    from attnlab.pipelines.alignedgen import AlignedGenPipeline
    from attnlab.pipelines.eraser import AttentiveEraserPipeline
    from attnlab.pipelines.softpag import SoftPAGPipeline

    aligned = AlignedGenPipeline(sd15)
    for outer in (lambda p: SoftPAGPipeline(p, heads="L0:*"), AttentiveEraserPipeline, AlignedGenPipeline):
        expect_refusal(sd15, lambda: outer(aligned), ParameterTypeError, "AlignedGenPipeline", "enabled()")


def test_eraser_pipeline_refuses_bad_input(sd15):
    from attnlab.pipelines.eraser import AttentiveEraserPipeline

    expect_refusal(sd15, lambda: AttentiveEraserPipeline(sd15, sarg_scale=1e30), InvalidParameter, "sarg_scale")
    expect_refusal(sd15, lambda: AttentiveEraserPipeline(sd15, dilate_px=1e5), InvalidParameter, "dilate_px")
    expect_refusal(sd15, lambda: AttentiveEraserPipeline(sd15, mode="DIP"), InvalidParameter, "mode")
    expect_refusal(sd15, lambda: AttentiveEraserPipeline(sd15, layers=[]), InvalidParameter, "layers")
    e = AttentiveEraserPipeline(sd15)
    image = torch.rand(1, 3, S, S)
    run = dict(num_inference_steps=2, output_type="latent")
    nan_image = image.clone()
    nan_image[0, 0, 0, 0] = float("nan")
    expect_refusal(sd15, lambda: e(nan_image, MASK, **run), InvalidParameter, "image", "NaN")
    expect_refusal(sd15, lambda: e(Image.new("RGB", (1, 1)), MASK, **run), InvalidParameter, "image", "1x1")
    expect_refusal(sd15, lambda: e(np.zeros((S, S, 5), np.uint8), MASK, **run), InvalidParameter, "image")
    expect_refusal(sd15, lambda: e(Image.new("RGB", (S - 1, S - 1)), MASK, **run), InvalidParameter, "image",
                   f"{S - 1}x{S - 1}")
    expect_refusal(sd15, lambda: e(image, torch.stack([MASK, MASK]), **run), InvalidParameter, "2 masks")
    expect_refusal(sd15, lambda: e(image, torch.ones(S, S), **run), InvalidParameter, "mask", "whole image")
    expect_refusal(sd15, lambda: e(image, MASK, strength=float("nan"), **run), InvalidParameter, "strength")
    expect_refusal(sd15, lambda: e(image, MASK, num_inference_steps=0), InvalidParameter, "num_inference_steps")
    expect_refusal(sd15, lambda: e(image, MASK, prompt=[], **run), InvalidParameter, "prompt")


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "I;16"])
def test_eraser_takes_any_pil_mode_as_rgb(mode):
    from attnlab.pipelines.inputs import rgb_images

    img = Image.new("RGB", (16, 12), (200, 40, 10)).convert(mode)
    out, count, size = rgb_images("image", img)
    assert out.mode == "RGB" and count == 1 and size == (12, 16)


def test_freeswim_pipeline_refuses_bad_input(sd15, flux):
    from diffusers import DDIMScheduler

    from attnlab.pipelines.freeswim import FreeSwimPipeline

    for shift in (0, float("nan"), -1.0, "2"):
        error = ParameterTypeError if isinstance(shift, str) else InvalidParameter
        expect_refusal(flux, lambda: FreeSwimPipeline(flux, flow_shift=shift), error, "flow_shift")
    ddim = build_tiny_pipeline("sd15")
    ddim.scheduler = DDIMScheduler.from_config(ddim.scheduler.config)
    expect_refusal(ddim, lambda: FreeSwimPipeline(ddim, flow_shift=3.0), InvalidParameter, "flow_shift",
                   "DDIMScheduler")
    expect_refusal(flux, lambda: FreeSwimPipeline(flux, strength="0.7"), ParameterTypeError, "strength")
    expect_refusal(flux, lambda: FreeSwimPipeline(flux, base_size=(0, 64)), InvalidParameter, "base_size")
    swim = FreeSwimPipeline(flux, base_size=(32, 32))
    expect_refusal(flux, lambda: swim("a red circle", height=64, width=64, num_inference_steps=0),
                   InvalidParameter, "num_inference_steps")
    expect_refusal(flux, lambda: swim([], height=64, width=64), InvalidParameter, "prompt")


def test_freeswim_override_layers_must_exist(flux):
    import attnlab

    before = _state(flux)
    with pytest.raises(InvalidParameter, match="override_layers"):
        attnlab.apply(flux, [FreeSwim(override_layers=[999])])
    assert _state(flux) == before


def test_alignedgen_pipeline_refuses_bad_input(sd15):
    from attnlab.pipelines.alignedgen import AlignedGenPipeline, style_tensor

    aligned = AlignedGenPipeline(sd15)
    run = dict(num_inference_steps=2, height=S, width=S, output_type="latent")
    expect_refusal(sd15, lambda: aligned(["a", "b"], style_seed=-1, **run), InvalidParameter, "style_seed")
    expect_refusal(sd15, lambda: aligned(["a", "b"], **{**run, "num_inference_steps": "2"}), ParameterTypeError,
                   "num_inference_steps")
    expect_refusal(sd15, lambda: AlignedGenPipeline(sd15, effects=EntropyScaling()), ParameterTypeError, "effects")
    with pytest.raises(InvalidParameter, match="4x4 pixels"):  # a 4×4 RGB array, not "4x3"
        style_tensor(np.zeros((4, 4, 3), np.uint8), S, S)


def test_refam_pipeline_refuses_bad_input(sd15):
    from attnlab.pipelines.refam import RefAMPipeline

    seg = RefAMPipeline(sd15)
    image = np.zeros((S, S, 3), np.uint8)
    expect_refusal(sd15, lambda: seg(image, 123), ParameterTypeError, "expression", "string")
    expect_refusal(sd15, lambda: seg(image, "the of a"), InvalidParameter, "expression", "content word")
    expect_refusal(sd15, lambda: seg(image, "the circle", max_sequence_length=0), InvalidParameter,
                   "max_sequence_length")
    expect_refusal(sd15, lambda: seg(image, "the circle", layers=[]), InvalidParameter, "layers")
    expect_refusal(sd15, lambda: seg(image, "the circle", guidance=float("nan")), InvalidParameter, "guidance")
    nan = np.full((S, S, 3), np.nan, np.float32)
    expect_refusal(sd15, lambda: seg(nan, "the circle"), InvalidParameter, "image", "NaN")


# --- nodes: widget values the frontend could never send (API prompts, scripts) --------------------------
def test_node_widgets_refuse_nan_and_strings():
    from attnlab.nodes import NODE_SPECS

    for value, error in ((float("nan"), InvalidParameter), (float("inf"), InvalidParameter),
                         ("1", ParameterTypeError), (True, ParameterTypeError)):
        strength = next(p for spec in NODE_SPECS for p in spec.inputs if p.id == "strength")
        with pytest.raises(error, match="strength"):
            strength.check(value)


# --- attnlab.apply: session options, the effect list, double installs ------------------------------------
@pytest.mark.parametrize("options,error,name", [
    (dict(native_size=(0, 0)), InvalidParameter, "native_size"),
    (dict(native_size=(-64, 64)), InvalidParameter, "native_size"),
    (dict(native_size="64"), ParameterTypeError, "native_size"),
    (dict(vae_scale=0), InvalidParameter, "vae_scale"),
    (dict(vae_scale=-8), InvalidParameter, "vae_scale"),
    (dict(vae_scale=1.5), InvalidParameter, "vae_scale"),
])
def test_apply_checks_its_options(sd15, options, error, name):
    import attnlab

    expect_refusal(sd15, lambda: attnlab.apply(sd15, [EntropyScaling()], **options), error, name)


def test_apply_refuses_double_installs(sd15):
    import attnlab

    e = EntropyScaling()
    expect_refusal(sd15, lambda: attnlab.apply(sd15, e), ParameterTypeError, "effects", "[EntropyScaling(...)]")
    expect_refusal(sd15, lambda: attnlab.apply(sd15, [e, e]), InvalidParameter, "same effect object")
    expect_refusal(sd15, lambda: attnlab.apply(sd15, [e, EntropyScaling(strength=2)]), InvalidParameter,
                   "two EntropyScaling")
    with attnlab.entropy_scaling(sd15):
        expect_refusal(sd15, lambda: attnlab.entropy_scaling(sd15), InvalidParameter, "already installed")
        expect_refusal(sd15, lambda: attnlab.apply(sd15, [EntropyScaling(strength=0.5)]), InvalidParameter,
                       "already installed")
        with attnlab.apply(sd15, [SoftPAG("L0:*")]):  # another kind nests as before
            pass
    with attnlab.apply(sd15, [SoftPAG("L0:*", u=0.5), SoftPAG("L1:*")]):  # SoftPAG on other layers stacks
        expect_refusal(sd15, lambda: attnlab.apply(sd15, [SoftPAG("L1:H0")]), InvalidParameter, "already installed")


def test_wan_native_size_follows_the_model_size():
    """FreeSwim's and entropy scaling's default base: Wan 14B was trained at 720×1280, 1.3B at 480×832."""
    from attnlab.processors.host_diffusers.model_info import geometry_of

    pipe = build_tiny_pipeline("wan")
    assert geometry_of(pipe.transformer, pipe).native_size == (81, 480, 832)
    pipe.transformer.register_to_config(num_attention_heads=40, attention_head_dim=128)  # Wan 14B's width
    assert geometry_of(pipe.transformer, pipe).native_size == (81, 720, 1280)
