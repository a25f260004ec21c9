"""AlignedGen / StyleAligned in ComfyUI (nodes/alignedgen.py), on the pack's fake ComfyUI and a real one (tests
marked `comfyui`, when COMFYUI_DIR is set): off switch, input model untouched, the reference row equals a
stock run of the batch's first latent in the layouts [1, 0] (cfg > 1), [0] (cfg 1) and split cond/uncond
calls, gating counts, ShiftPE through the model's own RoPE, the style-reference lock-step, bad input."""

import copy

import pytest
import torch

from comfy_pass_tools import parametrize_backends, tiny
from attnlab.nodes import alignedgen as node_module
from attnlab.nodes.alignedgen import ALIGNEDGEN_BATCH, ALIGNEDGEN_REFERENCE, LockStepReference
from attnlab.processors.alignedgen import AlignedGen
from attnlab.processors.host_comfy import EFFECTS_KEY

FAMILIES = ("sdxl", "sd3", "flux", "wan_t2v")  # SD1.5 runs in tests/test_alignedgen.py (diffusers)
CFG = {"sd15": 4.0, "sdxl": 4.0, "sd3": 4.0, "flux": 1.0, "wan_t2v": 4.0}
NODE = dict(adain="qk", scale=0.0, schedule="fix", shift="width", layers="", start_step=0, end_step=-1, enabled=True)
BATCH = 3


@pytest.fixture(scope="module")
def cache():
    return {}


def _latent(backend, family, batch=BATCH):
    return backend.latent(family, batch)


def _sample(backend, model, family, cfg=None, batch=BATCH, steps=2, split=False, latent=None):
    return backend.sample_tiny(model, family, steps=steps, cfg=CFG[family] if cfg is None else cfg, batch=batch,
                               split_calls=split, latent=latent)


def close(a, b, tol=1e-5):
    """Equal up to float32 rounding relative to the result's scale (the tiny UNets reach |x| ~ 1e3)."""
    return bool((a - b).abs().max() <= tol * max(1.0, float(b.abs().max())))


def align(model, **values):
    inputs = dict(NODE)
    inputs.update(values)
    return ALIGNEDGEN_BATCH.execute(model=model, **inputs)[0]


def _effect(model):
    return next(e for e in model.model_options["transformer_options"][EFFECTS_KEY] if isinstance(e, AlignedGen))


@parametrize_backends
@pytest.mark.parametrize("family", FAMILIES)
def test_off_stock_reference_row_and_targets(backend, family, cache):
    model = tiny(backend, family, cache)
    before = copy.copy(model.model_options)
    stock = _sample(backend, model, family, steps=1)
    off = align(model, enabled=False)
    assert torch.equal(_sample(backend, off, family, steps=1), stock)  # off == stock, bit for bit
    aligned = align(model)
    out = _sample(backend, aligned, family, steps=1)
    assert model.model_options == before and torch.equal(_sample(backend, model, family, steps=1), stock)  # input untouched
    assert close(out[0], stock[0])  # the reference row is what the first latent gives alone
    assert (out[1:] - stock[1:]).abs().max() > 1e-4  # targets do change
    assert _effect(aligned).calls > 0


@parametrize_backends
@pytest.mark.parametrize("family", ["sdxl", "flux", "sd3"])
def test_layouts_and_gating_counts(backend, family, cache):
    """[1, 0] batched, cond/uncond as separate calls, and cfg 1 ([0]): chunk bookkeeping from cond_or_uncond."""
    model = tiny(backend, family, cache)
    stock4 = _sample(backend, model, family, batch=2, cfg=4.0)
    aligned = align(model)
    e = _effect(aligned)
    batched = _sample(backend, aligned, family, batch=2, cfg=4.0)
    n_batched = e.calls
    split = _sample(backend, aligned, family, batch=2, cfg=4.0, split=True)
    assert close(batched, split)  # each chunk shares from its own reference
    assert e.calls - n_batched == n_batched  # same number of shared (call, chunk) pairs
    assert close(split[0], stock4[0])
    from attnlab.processors.host_comfy import plan_for, plan_sites
    plan = plan_for(model.model)
    n_layers = sum(1 for s, _ in plan_sites(plan, model.model) if AlignedGen().applies(s))
    assert n_batched == n_layers * 2 * 2  # layers × steps × CFG chunks
    e.calls = 0
    cfg1 = _sample(backend, aligned, family, batch=2, cfg=1.0)
    assert e.calls == n_layers * 2 * 1
    assert close(cfg1[0], _sample(backend, model, family, batch=2, cfg=1.0)[0])
    # step gating: only the first step
    first = align(model, end_step=1)
    _sample(backend, first, family, batch=2, cfg=4.0)
    assert _effect(first).calls == n_layers * 1 * 2


@parametrize_backends
def test_flux_shiftpe_uses_model_rope(backend, cache):
    model = tiny(backend, "flux", cache)
    plain = _sample(backend, align(model, shift="none", adain="none"), "flux")
    shifted = _sample(backend, align(model, shift="width", adain="none"), "flux")
    assert close(plain[0], shifted[0])
    assert (plain[1:] - shifted[1:]).abs().max() > 1e-5
    e = _effect(align(model))
    assert e.rope_source is not None  # built from diffusion_model.pe_embedder


@parametrize_backends
def test_no_dense_mask_in_comfy_flux(backend, cache):
    from test_alignedgen import Shapes, dense_masks

    model = tiny(backend, "flux", cache)
    aligned = align(model)
    with Shapes() as mode:
        _sample(backend, aligned, "flux", steps=1)
    n_img = (_latent(backend, "flux").shape[-1] // 2) * (_latent(backend, "flux").shape[-2] // 2)
    # 4-D (B, H, L, L+N) only: ComfyUI's CPU attention backends (split / sub-quadratic) build their own 3-D score
    # chunks (B·H, L, keys) for every attention, shared or not; that is the kernel, not a mask
    assert _effect(aligned).calls > 0 and not [s for s in dense_masks(mode.shapes, n_img) if len(s) == 4]


@parametrize_backends
@pytest.mark.parametrize("family", ["flux", "wan_t2v"])
def test_rope_tables_match_the_models_own(backend, family, cache):
    """AdaIN before RoPE and ShiftPE in ComfyUI rebuild the RoPE tables from the model's own embedder: they must
    be the tables the model applied (FLUX: txt zeros + process_img ids; Wan: rope_encode)."""
    from attnlab.processors import Recorder
    from attnlab.processors.alignedgen import comfy_rope_source
    from attnlab.processors.host_comfy import patch_model

    model = tiny(backend, family, cache)
    rec = Recorder()
    _sample(backend, patch_model(model, [rec]), family, steps=1, batch=1, cfg=1.0)
    call = next(c for c in rec.calls if c.site.kind in ("single", "self"))
    dm = model.model.diffusion_model
    lat = _latent(backend, family, 1)
    if family == "flux":
        _, ids = dm.process_img(lat)
        full = torch.cat([torch.zeros(1, call.tokens.q_text.stop, 3), ids.float()], 1)
        pe, rope = dm.pe_embedder(full), comfy_rope_source(dm.pe_embedder)(call)
    else:
        pe, rope = dm.rope_encode(*lat.shape[2:]), comfy_rope_source(dm.rope_embedder)(call)
    table = pe.reshape(-1, pe.shape[-3], 2, 2)
    assert rope.cos.shape == table[..., 0, 0].shape
    assert torch.allclose(rope.cos, table[..., 0, 0], atol=1e-6) and torch.allclose(rope.sin, table[..., 1, 0], atol=1e-6)


class StubVAE:
    """Encodes [1, H, W, 3] pixels to a [1, C, H/8, W/8] latent (average pool, channels tiled)."""

    def __init__(self, channels, factor=8):
        self.channels, self.factor = channels, factor

    def encode(self, pixels):
        x = torch.nn.functional.avg_pool2d(pixels.permute(0, 3, 1, 2), self.factor) * 2 - 1
        return x.repeat(1, -(-self.channels // 3), 1, 1)[:, :self.channels]


@parametrize_backends
@pytest.mark.parametrize("family", ["sdxl", "flux", "wan_t2v"])
def test_style_reference_node(backend, family, cache):
    model = tiny(backend, family, cache)
    lat = {"samples": _latent(backend, family, 2)}
    c, h, w = lat["samples"].shape[1], lat["samples"].shape[-2], lat["samples"].shape[-1]
    vae = StubVAE(c)
    img = torch.rand(1, h * 8 + 5, w * 8 - 3, 3, generator=torch.Generator().manual_seed(0))  # any size: resized
    m, out_lat = ALIGNEDGEN_REFERENCE.execute(model=align(model), vae=vae, image=img, latent=lat, style_seed=0)
    assert out_lat["samples"].shape[0] == 3
    wrapper = m.get_wrappers("apply_model", node_module.LOCKSTEP_KEY)[0]
    out = _sample(backend, m, family, latent=out_lat["samples"])  # 2 steps: at sigma 1 the noised image is pure noise
    assert wrapper.calls > 0 and out.shape[0] == 3
    m2, _ = ALIGNEDGEN_REFERENCE.execute(model=align(model), vae=vae, image=img.flip(2), latent=lat, style_seed=0)
    out2 = _sample(backend, m2, family, latent=out_lat["samples"])  # 2 steps: at sigma 1 the noised image is pure noise
    assert (out[1:] - out2[1:]).abs().max() > 1e-5  # targets follow the style image
    # without Batch Align in front, the node adds AlignedGen itself
    m3, _ = ALIGNEDGEN_REFERENCE.execute(model=model, vae=vae, image=img, latent=lat, style_seed=0)
    assert any(isinstance(e, AlignedGen) for e in m3.model_options["transformer_options"][EFFECTS_KEY])
    # the wrapper puts the noised reference in row 0 of every chunk: check against model_sampling directly
    seen = []
    sigma = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.5, 0.5])
    x = torch.randn(6, *lat["samples"].shape[1:])
    wrapper(lambda x_, t_, *a, **k: seen.append(x_), x, sigma)
    expect = m.model.model_sampling.noise_scaling(sigma[:1], wrapper.noise, wrapper.reference)[0]
    assert torch.allclose(seen[0][0], expect) and torch.allclose(seen[0][3], expect)
    assert torch.equal(seen[0][[1, 2, 4, 5]], x[[1, 2, 4, 5]])


def test_bad_input():
    import fake_comfy

    model = fake_comfy.build_tiny("sdxl")
    before = copy.copy(model.model_options)
    lat = {"samples": fake_comfy.latent("sdxl", 2)}
    vae = StubVAE(4)
    for image, match in ((torch.rand(2, 64, 64, 3), "one image"), (torch.rand(1, 64, 64, 2), "C = 1, 3 or 4"),
                         (torch.rand(1, 4, 4, 3), "too small"), ("pic.png", "IMAGE tensor"),
                         (torch.full((1, 64, 64, 3), float("nan")), "NaN")):
        with pytest.raises(ValueError, match=match):
            ALIGNEDGEN_REFERENCE.execute(model=model, vae=vae, image=image, latent=lat, style_seed=0)
    with pytest.raises(ValueError, match="VAE gives latents"):
        ALIGNEDGEN_REFERENCE.execute(model=model, vae=StubVAE(16), image=torch.rand(1, 64, 64, 3), latent=lat,
                                     style_seed=0)
    with pytest.raises(ValueError, match="layers"):
        align(model, layers="999")
    with pytest.raises(ValueError, match="end_step"):
        align(model, start_step=3, end_step=1)
    with pytest.raises(ValueError, match="adain"):
        align(model, adain="v")
    assert model.model_options == before
    # a batch of one is documented as unchanged (nothing to align)
    stock = fake_comfy.sample_tiny(model, "sdxl", steps=1, cfg=4.0, batch=1)
    assert torch.equal(fake_comfy.sample_tiny(align(model), "sdxl", steps=1, cfg=4.0, batch=1), stock)
    # grayscale and RGBA style images are accepted
    for image in (torch.rand(1, 40, 40, 1), torch.rand(1, 40, 40, 4)):
        ALIGNEDGEN_REFERENCE.execute(model=model, vae=vae, image=image, latent=lat, style_seed=0)


def test_lockstep_skips_foreign_batches():
    class Base:
        class model_sampling:
            @staticmethod
            def noise_scaling(sigma, noise, latent):
                return latent + sigma * noise

    w = LockStepReference(Base, torch.zeros(1, 4, 2, 2), 0, rows=3)
    x = torch.randn(4, 4, 2, 2)
    seen = []
    w(lambda x_, t_: seen.append(x_), x, torch.ones(4))
    assert torch.equal(seen[0], x) and w.calls == 0
