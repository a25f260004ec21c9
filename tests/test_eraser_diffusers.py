"""Attentive Eraser SIP on stock diffusers inpaint pipelines (pipelines/eraser.py; specs/attentive_eraser.md
A.1.4–A.1.6, A.5) with the tiny offline models: the exact latent blend mask, background preservation,
scale endpoints, extra-pass count, zero attention mass on object keys, layer selection, masks, cleanup."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel

from attnlab.models.tiny import build_tiny_pipeline
from attnlab.pipelines.eraser import AttentiveEraserPipeline
from attnlab.processors.eraser import AttentiveEraser, default_layers
from attnlab.processors.host_diffusers import attention_sites
from attnlab.processors.host_diffusers.session import site_heads

S = 32  # image size (latent 16x16 with the tiny VAEs' factor 2)
STEPS = 3
STRENGTH = 0.67  # 2 executed steps of 3


@pytest.fixture(scope="module")
def sd15():
    return build_tiny_pipeline("sd15")


@pytest.fixture(scope="module")
def sdxl():
    return build_tiny_pipeline("sdxl")


def _image(h=S, w=S, seed=0):
    return torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _mask(h=S, w=S):
    m = torch.zeros(h, w)
    m[h // 4: h // 4 + h // 3, w // 3: w // 3 + w // 3] = 1
    return m


def _run(e, image, mask, **kw):
    kw = {**dict(num_inference_steps=STEPS, strength=STRENGTH, output_type="latent"), **kw}
    with torch.no_grad():
        return e(image, mask, generator=torch.Generator().manual_seed(1), **kw).images


def _plain_sip(e, image, blend, **kw):
    """The stock inpaint pipeline with the same blend mask, no effects: plain SIP."""
    h, w = blend.shape[-2:]
    with torch.no_grad():
        return e.inpaint(prompt="", image=image, mask_image=blend, strength=STRENGTH, num_inference_steps=STEPS,
                         generator=torch.Generator().manual_seed(1), guidance_scale=1.0, height=h, width=w,
                         output_type="latent", **kw).images


class _Counter:
    def __init__(self, module):
        self.n = 0
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, *_):
        self.n += 1

    def remove(self):
        self.handle.remove()


# --- the mask path of the stock inpaint pipeline ------------------------------------------------------
def test_latent_blend_mask_is_official_maxpool_and_background_is_preserved(sd15):
    """diffusers 0.42.1 turns our image-size mask into exactly max_pool2d(mask, f) on the latent grid, and
    after every step the latents outside it equal add_noise(z0, ε_fix, t_next) (z0 after the last)."""
    e = AttentiveEraserPipeline.from_pipe(sd15)
    image, mask = _image(), _mask()
    sched = e.inpaint.scheduler
    noised = []
    original = sched.add_noise

    def add_noise(x, noise, t):
        out = original(x, noise, t)
        noised.append((x.clone(), noise.clone(), out.clone()))
        return out

    seen = []

    def callback(pipe, i, t, kw):
        seen.append((kw["latents"].clone(), kw["mask"].clone()))
        return {}

    sched.add_noise = add_noise
    try:
        _run(e, image, mask, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["latents", "mask"])
    finally:
        del sched.add_noise
    obj = e.prepare_mask(mask, S, S)
    f = e.inpaint.vae_scale_factor
    m_lat = F.max_pool2d(obj, f)
    executed = int(STEPS * STRENGTH)
    assert len(seen) == executed
    for _, m in seen:
        assert torch.equal(m, m_lat)  # bit-exact official blend mask
    assert 0 < m_lat.sum() < m_lat.numel()
    # noised[0] is the initial latent; noised[i + 1] the known region after step i (i < last)
    assert len(noised) == executed  # 1 initial + (executed − 1) per-step replacements
    z0, eps = noised[0][0], noised[0][1]
    for x, noise, _ in noised:
        assert torch.equal(x, z0) and torch.equal(noise, eps)  # one ε_fix for the whole run
    bg = 1 - m_lat
    for i, (lat, _) in enumerate(seen):
        target = noised[i + 1][2] if i + 1 < executed else z0
        assert torch.equal(lat * bg, target * bg)


def test_blend_mask_is_constant_on_vae_blocks(sd15):
    e = AttentiveEraserPipeline.from_pipe(sd15, dilate_px=0)
    obj = e.prepare_mask(_mask(), S, S)
    blend = e.blend_mask(obj)
    f = e.inpaint.vae_scale_factor
    assert torch.equal(F.interpolate(blend, scale_factor=1 / f, mode="nearest"), F.max_pool2d(obj, f))
    assert torch.all(blend >= obj)  # the blend mask contains the object


# --- scale endpoints, empty masks, extra passes -------------------------------------------------------
def test_sarg_zero_and_empty_mask_are_plain_sip_without_extra_pass(sd15):
    image, mask = _image(), _mask()
    e0 = AttentiveEraserPipeline.from_pipe(sd15, sarg_scale=0.0)
    counter = _Counter(e0.inpaint.unet)
    try:
        out = _run(e0, image, mask)
        assert counter.n == int(STEPS * STRENGTH)
    finally:
        counter.remove()
    assert e0.extra_passes == 0
    assert torch.equal(out, _plain_sip(e0, image, e0.last_mask))
    e9 = AttentiveEraserPipeline.from_pipe(sd15, sarg_scale=9.0)
    empty = np.zeros((S, S), dtype=bool)
    out = _run(e9, image, empty)
    assert e9.extra_passes == 0
    assert not e9.last_mask.any()
    assert torch.equal(out, _plain_sip(e9, image, e9.last_mask))


def test_sarg_runs_one_extra_forward_per_step_and_changes_only_the_mask(sd15):
    image, mask = _image(), _mask()
    e = AttentiveEraserPipeline.from_pipe(sd15, sarg_scale=9.0)
    counter = _Counter(e.inpaint.unet)
    try:
        out = _run(e, image, mask)
    finally:
        counter.remove()
    executed = int(STEPS * STRENGTH)
    # the extra pass calls the denoiser's original forward (inside its hook), so forward hooks see only the
    # pipeline's own forwards
    assert e.extra_passes == executed and counter.n == executed
    plain = _plain_sip(e, image, e.last_mask)
    m_lat = F.max_pool2d(e.prepare_mask(mask, S, S), e.inpaint.vae_scale_factor)
    assert torch.equal(out * (1 - m_lat), plain * (1 - m_lat))  # last step pastes z0 outside the mask
    assert (out - plain).abs().mul(m_lat).max() > 1e-4
    # s = 1 (pure AAS) is allowed and differs from both
    one = _run(AttentiveEraserPipeline.from_pipe(sd15, sarg_scale=1.0), image, mask)
    assert not torch.equal(one, plain) and not torch.equal(one, out)


def test_full_cover_mask_is_refused_before_any_forward(sd15):
    """A mask covering the whole image leaves no background to redirect to (AAS would skip every layer and the
    extra pass would equal the plain one): refused up front, no denoiser forward."""
    from attnlab.processors.params import InvalidParameter

    e = AttentiveEraserPipeline.from_pipe(sd15, sarg_scale=9.0)
    forwards = []
    handle = sd15.unet.register_forward_hook(lambda *a: forwards.append(1))
    try:
        with pytest.raises(InvalidParameter, match="covers the whole image"):
            _run(e, _image(), torch.ones(S, S))
    finally:
        handle.remove()
    assert forwards == []


# --- what AAS does inside the redirected pass ---------------------------------------------------------
def test_zero_attention_mass_on_object_keys_and_locality(sd15, monkeypatch):
    e = AttentiveEraserPipeline.from_pipe(sd15, kernel="bias")
    mask = _mask()
    obj_img = e.prepare_mask(mask, S, S)
    records, plain_calls = [], []
    original = AttentiveEraser.__call__

    def spy(self, call, attend):
        def probe(q, k, v, mask=None, **kw):
            if kw.get("roles") and all(r == "redirected" for r in kw["roles"]):
                logits = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
                if mask is not None:
                    logits = logits + mask
                records.append((call.site, call.tokens.grid, torch.softmax(logits, -1)))
            else:
                plain_calls.append(call.site)
            return attend(q, k, v, mask=mask, **kw)

        assert call.site.kind == "self"  # never installed on cross-attention
        return original(self, call, probe)

    monkeypatch.setattr(AttentiveEraser, "__call__", spy)
    _run(e, _image(), mask)
    layers = e.effect._layers
    assert records and {s.layer for s, _, _ in records} == set(layers)
    assert len(records) == len(layers) * int(STEPS * STRENGTH)
    for site, grid, probs in records:
        _, h, w = grid
        obj = (F.adaptive_max_pool2d(obj_img, (h, w)) > 0.5).flatten()
        assert obj.any() and not obj.all()
        assert torch.all(probs[..., obj] == 0)  # exactly zero mass on object keys
        assert torch.allclose(probs.sum(-1), torch.ones(()))
    # the pipeline's own (plain) forward reaches the kernel with the call's own q, k, v and nothing else
    assert len(plain_calls) == len(records) and all(plain_calls)


def test_layer_selection_matches_official_indices():
    """Default layers by module name = the official call-order indices on real-size configs (meta device)."""
    sd15 = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=768,
                block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8,
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    sdxl = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=2048,
                block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20),
                transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
                addition_embed_type="text_time", addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=2816,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
    for config, expected, total in ((sd15, range(7, 16), 16), (sdxl, range(34, 70), 70)):
        with torch.device("meta"):
            unet = UNet2DConditionModel(**config)
        sites = [s for s, _ in site_heads(unet)]
        assert len({s.layer for s in sites}) == total
        chosen = default_layers([s for s in sites if AttentiveEraser.acts_on(s)])
        assert chosen == list(expected)
        for spec in attention_sites(unet):
            if spec.site.layer in expected:
                assert spec.name.startswith("up_blocks.")
        effect = AttentiveEraser(torch.ones(1, 1, 2, 2))
        effect.check_sites(site_heads(unet))
        assert {s.layer for s in sites if effect.applies(s)} == set(expected)
        assert not any(effect.applies(s) for s in sites if s.kind == "cross")


# --- inputs, cleanup, other families -------------------------------------------------------------------
def test_non_square_image_and_mask_of_other_size(sdxl):
    e = AttentiveEraserPipeline.from_pipe(sdxl)
    image = _image(24, 40)
    mask = np.zeros((30, 50), dtype=np.uint8)
    mask[5:20, 10:30] = 255
    out = _run(e, image, mask)
    assert out.shape[-2:] == (24 // e.inpaint.vae_scale_factor, 40 // e.inpaint.vae_scale_factor)
    assert e.last_mask.shape[-2:] == (24, 40) and e.last_mask.any()
    assert e.extra_passes == int(STEPS * STRENGTH)
    assert torch.isfinite(out).all()


def test_processors_and_hooks_restored(sd15):
    unet = sd15.unet
    before = dict(unet.attn_processors)
    e = AttentiveEraserPipeline.from_pipe(sd15)
    _run(e, _image(), _mask())
    after = unet.attn_processors
    assert all(after[k] is v for k, v in before.items())
    registry = getattr(unet, "_diffusers_hook", None)
    if registry is not None:
        assert not [n for n in registry.hooks if "attnlab" in n]
    with pytest.raises(RuntimeError):  # also restored after an exception inside the call

        def boom(*a, **k):
            raise RuntimeError("boom")

        _run(e, _image(), _mask(), callback_on_step_end=lambda *a: boom())
    after = unet.attn_processors
    assert all(after[k] is v for k, v in before.items())


@pytest.mark.parametrize("bad, match", [
    (np.array([["a", "b"], ["c", "d"]]), "dtype"),
    (torch.full((8, 8), float("nan")), "NaN"),
    (torch.zeros(2, 3, 8, 8), "shape"),
    (None, "needs a mask"),
    ("mask.png", "PIL image, numpy array or torch tensor"),
])
def test_bad_masks_give_clear_errors(sd15, bad, match):
    e = AttentiveEraserPipeline.from_pipe(sd15)
    with pytest.raises(ValueError, match=match):
        _run(e, _image(), bad)


def test_bad_options(sd15):
    with pytest.raises(ValueError, match="sarg_scale"):
        AttentiveEraserPipeline.from_pipe(sd15, sarg_scale=-1)
    with pytest.raises(ValueError, match="mode"):
        AttentiveEraserPipeline.from_pipe(sd15, mode="xyz")
    with pytest.raises(ValueError, match="ss_scale"):
        AttentiveEraserPipeline.from_pipe(sd15, ss_scale=0)
    e = AttentiveEraserPipeline.from_pipe(sd15, mode="dip")
    with pytest.raises(ValueError, match="strength"):
        _run(e, _image(), _mask())  # DIP is strength 1 only
    with pytest.raises(NotImplementedError, match="DIP"):
        AttentiveEraserPipeline.from_pipe(build_tiny_pipeline("flux"), mode="dip")


def test_composite_keeps_pixels_far_from_the_mask(sd15):
    e = AttentiveEraserPipeline.from_pipe(sd15, dilate_px=0)
    image = _image()
    mask = torch.zeros(S, S)
    mask[1:5, 1:5] = 1
    with torch.no_grad():
        out = e(image, mask, num_inference_steps=STEPS, strength=STRENGTH, output_type="pt", composite=True,
                composite_blur=2.0, generator=torch.Generator().manual_seed(1)).images
    assert out.shape == (1, 3, S, S)
    assert torch.allclose(out[..., 16:, 16:], image[..., 16:, 16:], atol=1e-5)
    assert not torch.allclose(out[..., :4, :4], image[..., :4, :4], atol=1e-3)


def test_cfg_three_pass_form_runs(sd15):
    e = AttentiveEraserPipeline.from_pipe(sd15)
    out = _run(e, _image(), _mask(), prompt="a wall", guidance_scale=3.0)
    assert e.extra_passes == int(STEPS * STRENGTH) and torch.isfinite(out).all()


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_dit_experimental_path_runs(family):
    pipe = build_tiny_pipeline(family)
    e = AttentiveEraserPipeline.from_pipe(pipe, sarg_scale=3.0)
    plain = AttentiveEraserPipeline.from_pipe(pipe, sarg_scale=0.0)
    kw = dict(max_sequence_length=16, num_inference_steps=1, strength=1.0)
    out = _run(e, _image(), _mask(), **kw)
    ref = _run(plain, _image(), _mask(), **kw)
    assert e.extra_passes == 1 and plain.extra_passes == 0
    assert torch.isfinite(out).all() and not torch.equal(out, ref)


# --- DIP -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_dip_inversion_trajectory_replaces_background(family, sd15, sdxl):
    """DDIM inversion with the same number of steps, then AAS+SARG sampling from z_T with the trajectory put
    back outside the latent mask after every step, and z0 after the last."""
    pipe = sd15 if family == "sd15" else sdxl
    e = AttentiveEraserPipeline.from_pipe(pipe, mode="dip")
    image, mask = _image(), _mask()
    seen = []

    def callback(p, i, t, kw):
        seen.append(kw["latents"].clone())
        return {}

    with torch.no_grad():
        out = e(image, mask, num_inference_steps=STEPS, output_type="latent", callback_on_step_end=callback).images
    traj = e.last_trajectory
    assert len(traj) == STEPS + 1 and len(seen) == STEPS and e.extra_passes == STEPS
    back = traj[::-1]
    m = F.max_pool2d(e.prepare_mask(mask, S, S), e.inpaint.vae_scale_factor)
    for i, lat in enumerate(seen):
        assert torch.equal(lat * (1 - m), back[i + 1] * (1 - m))
    assert torch.equal(out * (1 - m), traj[0] * (1 - m))
    assert not torch.equal(out * m, traj[0] * m)
    # z0 is the VAE mean of the image; the trajectory is deterministic and moves away from z0
    assert not torch.equal(traj[-1], traj[0])
    again = AttentiveEraserPipeline.from_pipe(pipe, mode="dip", sarg_scale=0.0)
    with torch.no_grad():
        again(image, mask, num_inference_steps=STEPS, output_type="latent")
    assert again.extra_passes == 0
    assert all(torch.equal(a, b) for a, b in zip(again.last_trajectory, traj))


def test_similarity_suppression_counts_executed_steps(sd15, monkeypatch):
    """At strength < 1 the first executed step has scheduler index > 0; SS (ss_steps=0: one step) and AAS
    still count executed steps from 0, as the official code does."""
    seen = []
    original = AttentiveEraser.ss_active

    def spy(self, step):
        active = original(self, step)
        seen.append((step.executed, active))
        return active

    monkeypatch.setattr(AttentiveEraser, "ss_active", spy)
    e = AttentiveEraserPipeline.from_pipe(sd15, ss_steps=0)
    _run(e, _image(), _mask())
    assert sorted(set(seen)) == [(0, True), (1, False)]


def test_dip_inversion_inverts_the_ddim_sampler_exactly():
    """With a prediction that does not depend on z (zeroed conv_out weight), DDIM inversion followed by DDIM
    sampling from z_T (no SARG, full mask: no background replacement) gives z0 back to float precision."""
    pipe = build_tiny_pipeline("sd15")
    with torch.no_grad():
        pipe.unet.conv_out.weight.zero_()
        pipe.unet.conv_out.bias.normal_(generator=torch.Generator().manual_seed(0))
    e = AttentiveEraserPipeline.from_pipe(pipe, mode="dip", sarg_scale=0.0, dilate_px=0)
    with torch.no_grad():
        out = e(_image(), torch.ones(S, S), num_inference_steps=5, output_type="latent").images
    z0 = e.last_trajectory[0]
    assert (e.last_trajectory[-1] - z0).abs().max() > 0.1
    assert torch.allclose(out, z0, atol=1e-5)
