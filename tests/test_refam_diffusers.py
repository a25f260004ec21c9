"""RefAM through the diffusers host on the tiny offline pipelines (specs/refam.md §A.6): the recorder is
read-only on every family, the recorded maps equal explicit softmax slices in both token orders (FLUX text
first, SD3 image first), sink suppression, end-to-end segmentation of a toy-world scene, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnlab.models.tiny import build_tiny_pipeline
from attnlab.pipelines.refam import RefAMPipeline
from attnlab.processors.effects import Recorder
from attnlab.processors.host_diffusers.session import Session
from attnlab.processors.refam_run import RefAMOptions
from attnlab.toyworld.scenes import render, sample_scene

FAMILIES = ("flux", "sd3", "sd15", "sdxl", "wan", "pixart")
EXPR = "the small red circle on the left"
SEQ = 64


@pytest.fixture(scope="module")
def pipes():
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = build_tiny_pipeline(family)
        return cache[family]

    return get


def image(size=64, seed=3):
    return render(sample_scene(seed), size)


def picture(family, size=64):
    img = image(size)
    return [img] * 5 if family == "wan" else img


@pytest.mark.parametrize("family", FAMILIES)
def test_recording_is_read_only_and_segments(family, pipes):
    seg = RefAMPipeline.from_pipe(pipes(family), sigmas=(0.3, 0.6))
    prep = seg.prepare(picture(family), EXPR, seg.options, max_sequence_length=SEQ)
    with torch.no_grad():
        stock = seg._forward(prep.z0, prep.noise, 0.3, prep.text)[0]
        with Session(seg.denoiser, [prep.recorder], vae_scale=seg.vae_scale) as s, s.roles_for("cond"):
            prep.recorder.at(0.3)
            recorded = seg._forward(prep.z0, prep.noise, 0.3, prep.text)[0]
    assert torch.equal(stock, recorded)
    assert dict(seg.denoiser.attn_processors).keys() and prep.recorder.maps
    layers = sorted(prep.recorder.layers)
    assert sorted(layer for _, layer in prep.recorder.maps) == layers
    n_cols = len(prep.words.columns)
    for maps in prep.recorder.maps.values():
        assert maps.shape[:2] == (1, n_cols) and maps.dtype == torch.float32
        assert torch.allclose(maps.sum(1), torch.ones(()), atol=1e-4)  # softmax over the prompt's words
    out = seg(picture(family), EXPR, max_sequence_length=SEQ)
    frames = 2 if family == "wan" else None
    shape = (64, 64) if frames is None else (frames, 64, 64)
    assert out.heatmap.shape == shape and out.mask.shape == shape and out.mask.dtype == torch.bool
    assert float(out.heatmap.max()) == pytest.approx(1.0) and float(out.heatmap.min()) == pytest.approx(0.0)
    assert bool(out.mask.any()) and not bool(out.mask.all())
    overlays = out.overlay if isinstance(out.overlay, list) else [out.overlay]
    assert len(overlays) == (frames or 1) and overlays[0].size == (64, 64)
    assert out.words == ["small", "red", "circle", "left"] and out.timings["forwards"] == 2
    assert out.prompt.startswith(EXPR + " a the of")


@pytest.mark.parametrize("family,text_first", [("flux", True), ("sd3", False)])
def test_joint_slices_equal_explicit_softmax_in_both_token_orders(family, text_first, pipes):
    for mode in ("img2txt_joint", "txt2img_joint", "img2txt_textsoftmax"):
        seg = RefAMPipeline.from_pipe(pipes(family), map_mode=mode, layers=[1])
        prep = seg.prepare(image(), EXPR, seg.options, max_sequence_length=SEQ)
        spy = Recorder()
        with Session(seg.denoiser, [prep.recorder, spy], vae_scale=seg.vae_scale) as s, s.roles_for("cond"), \
                torch.no_grad():
            prep.recorder.at(0.5)
            seg._forward(prep.z0, prep.noise, 0.5, prep.text)
        call = next(c for c in spy.calls if c.site.layer == 1 and c.site.kind in ("joint", "single"))
        t = call.tokens
        assert t.text_first == text_first
        cols = torch.tensor([t.k_text.start + c for c in prep.words.columns])
        logits = (call.q.double() @ call.k.double().transpose(-1, -2)) * call.default_scale()
        if mode == "img2txt_textsoftmax":
            want = logits[:, :, t.q_image][..., cols].softmax(-1).mean(1)
        elif mode == "img2txt_joint":
            want = logits.softmax(-1)[:, :, t.q_image][..., cols].mean(1)
        else:
            qcols = cols
            want = logits.softmax(-1)[:, :, qcols][..., t.k_image].mean(1).transpose(1, 2)
        got = prep.recorder.maps[(0.5, 1)]  # [1, cols, F, h, w]
        got = got.flatten(2).transpose(1, 2)
        assert (got.double() - want).abs().max() < 1e-6, mode


def test_suppress_changes_the_forward_from_the_sink_layers_on_and_zero_bias_does_not(pipes):
    pipe = pipes("flux")
    seg = RefAMPipeline.from_pipe(pipe)
    forced = dict(gas_mode="suppress", gas_mass=0.0, gas_cv=1e9, gas_min_layer=2)  # every text column is a "sink"
    outs = {}
    for name, opts in (("drop", RefAMOptions()), ("zero", RefAMOptions(**forced, gas_bias=0.0)),
                       ("inf", RefAMOptions(**forced))):
        prep = seg.prepare(image(), EXPR, opts, max_sequence_length=SEQ)
        with Session(seg.denoiser, [prep.recorder], vae_scale=seg.vae_scale) as s, s.roles_for("cond"), \
                torch.no_grad():
            prep.recorder.at(0.5)
            outs[name] = (seg._forward(prep.z0, prep.noise, 0.5, prep.text)[0], prep.recorder)
    assert torch.equal(outs["drop"][0], outs["zero"][0])
    assert not torch.equal(outs["drop"][0], outs["inf"][0])
    sinks = outs["inf"][1].sinks
    assert sinks and all(layer >= 2 for (_, layer) in sinks)


def test_redirect_appends_aux_tokens_and_runs(pipes):
    seg = RefAMPipeline.from_pipe(pipes("flux"), gas_mode="redirect", n_aux=3)
    out = seg(image(), EXPR, max_sequence_length=SEQ)
    assert out.prompt.endswith(", . . . .") and out.mask.any()  # the "," and "." magnets, then 3 aux "." tokens


def test_sam_backend_is_prompted_from_the_heatmap(pipes):
    seg = RefAMPipeline.from_pipe(pipes("sd15"))

    class Predictor:
        def set_image(self, img):
            self.shape = img.shape

        def predict(self, point_coords=None, point_labels=None, box=None, multimask_output=True):
            self.points = point_coords
            m = np.zeros((2,) + self.shape[:2], bool)
            m[0, :8, :8] = True
            x, y = point_coords[0].astype(int)
            m[1, max(0, y - 4):y + 4, max(0, x - 4):x + 4] = True
            return m, np.array([0.9, 0.1]), None

    sam = Predictor()
    out = seg(image(), EXPR, mask_mode="sam_point", sam=sam)
    x, y = sam.points[0].astype(int)
    assert bool(out.mask[y, x]) and out.points[0]["chosen"] == 1
    with pytest.raises(ValueError, match="SAM"):
        seg(image(), EXPR, mask_mode="sam_point")


@pytest.mark.parametrize("family", ["flux", "sd15"])
def test_bad_input_gives_clear_errors_before_any_forward(family, pipes):
    seg = RefAMPipeline.from_pipe(pipes(family))
    calls = []
    hook = seg.denoiser.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match="expression is empty"):
            seg(image(), "  ")
        with pytest.raises(ValueError, match="not a multiple of"):
            seg(np.zeros((61, 64, 3), np.uint8), EXPR)
        with pytest.raises(ValueError, match="frames"):
            seg([image(), image()], EXPR)
        with pytest.raises(ValueError, match="layers"):
            seg(image(), EXPR, layers=[99], max_sequence_length=SEQ)
        with pytest.raises(ValueError, match="sigmas"):
            seg(image(), EXPR, sigmas=(1.5,))
        with pytest.raises(TypeError, match="unknown RefAM option"):
            seg(image(), EXPR, colour="red")
        with pytest.raises(ValueError, match="RGB"):
            seg(np.zeros((64, 64, 5), np.uint8), EXPR)
        if family == "sd15":
            with pytest.raises(ValueError, match="joint attention"):
                seg(image(), EXPR, map_mode="txt2img_joint")
        assert not calls
        assert seg(np.zeros((61, 64, 3), np.uint8), EXPR, resize=True, max_sequence_length=SEQ).heatmap.shape == (61, 64)
    finally:
        hook.remove()
    assert all(type(p).__module__.startswith("diffusers") for p in seg.denoiser.attn_processors.values())


def test_wan_needs_1_plus_4k_frames(pipes):
    seg = RefAMPipeline.from_pipe(pipes("wan"))
    with pytest.raises(ValueError, match="1 \\+ 4"):
        seg([image()] * 3, EXPR)
