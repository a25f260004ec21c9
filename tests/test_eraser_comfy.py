"""Attentive Eraser in ComfyUI: the node, its redirected extra pass and SARG, driven through the pack's fake of
ComfyUI (always) and a real ComfyUI (tests marked `comfyui`, when COMFYUI_DIR is set)."""

import copy
import logging

import pytest
import torch
import torch.nn.functional as F

import fake_comfy
from comfy_pass_tools import Probe, guided_passes, parametrize_backends, record_batches, tiny
from attnlab.nodes import NODE_SPECS
from attnlab.nodes.eraser import ATTENTIVE_ERASER, mask_batch
from attnlab.processors.eraser import REDIRECTED, AttentiveEraser, token_mask
from attnlab.processors.host_comfy import EFFECTS_KEY, UnsupportedComfyModel, patch_model
from attnlab.processors.host_comfy import guidance as guidance_module

FAMILIES = ("sd15", "sdxl", "sd3", "flux")  # SD3/FLUX: experimental in the node, but they must run
NODE = dict(scale=9.0, ss_scale=0.3, ss_steps=9, dilate_px=0.0, layers="")





@pytest.fixture(scope="module")
def cache():
    return {}

def object_mask(h=40, w=64):
    """A pixel-space ComfyUI MASK [1, H, W] (not the latent's size or aspect) with a rectangle of object."""
    m = torch.zeros(1, h, w)
    m[:, h // 4: (5 * h) // 8, (5 * w) // 16: (5 * w) // 8] = 1.0
    return m


def sample(backend, model, family, steps=1, cfg=1.0, latent=None):
    return backend.sample_tiny(model, family, steps=steps, cfg=cfg, latent=latent)



def stock(backend, family, cache, steps=1):
    key = (backend.NAME, family, "stock", steps)
    if key not in cache:
        model = tiny(backend, family, cache)
        cache[key] = (model, sample(backend, model, family, steps=steps))
    return cache[key]


_DEFAULT = object()


def node(model, mask=_DEFAULT, **values):
    inputs = dict(NODE, mask=object_mask() if mask is _DEFAULT else mask)
    inputs.update(values)
    return ATTENTIVE_ERASER.execute(model=model, **inputs)[0]





def redirected_reference(call, obj, ss: float):
    """The official two-step semantics, with explicit probabilities: logits s_i·q_i·k_j·scale, object keys barred
    (−∞), softmax, times V. Returns (output, probabilities)."""
    t = call.tokens
    q = call.q.double()
    row_scale = torch.ones(call.batch, call.q_len, dtype=torch.float64)
    row_scale[:, t.q_image] = torch.where(obj, torch.tensor(ss, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    q = q * row_scale[:, None, :, None]
    scale = call.scale if call.scale is not None else call.q.shape[-1] ** -0.5
    logits = q @ call.k.double().transpose(-1, -2) * scale
    barred = torch.zeros(call.batch, call.kv_len, dtype=torch.bool)
    barred[:, t.k_image] = obj
    logits = logits.masked_fill(barred[:, None, None, :], float("-inf"))
    probs = logits.softmax(-1)
    return probs @ call.v.double(), probs, barred


# ----------------------------------------------------------------------------- off switch
@parametrize_backends
@pytest.mark.parametrize("family", FAMILIES)
def test_scale_0_and_empty_or_full_masks_are_bit_exact_and_run_no_extra_pass(backend, family, cache, caplog):
    model, base = stock(backend, family, cache)
    full = torch.ones(1, 24, 24)
    for off in (dict(scale=0.0), dict(mask=torch.zeros(1, 40, 64)), dict(mask=full)):
        with caplog.at_level(logging.WARNING, logger="attnlab"):
            patched = node(model, **off)
        assert patched is not model, off
        assert "sampler_post_cfg_function" not in patched.model_options, off
        assert EFFECTS_KEY not in patched.model_options.get("transformer_options", {}), off
        assert not patched.get_wrappers("apply_model", "attnlab"), off
        log = record_batches(patched, backend)
        assert torch.equal(sample(backend, patched, family), base), off
        assert [role for _, _, role, _ in log] == [None], "no extra pass when off"
    assert "mask is empty" in caplog.text and "covers the whole image" in caplog.text
    # installed but acting on "redirected" rows only: ComfyUI's own cond/uncond passes are untouched
    inert = patch_model(model, [AttentiveEraser(mask_batch(object_mask()))])
    assert torch.equal(sample(backend, inert, family), base)


@parametrize_backends
def test_callers_model_is_untouched(backend, cache):
    model, base = stock(backend, "sd15", cache)
    before = copy.deepcopy(dict(model.model_options))
    patched = node(model)
    assert not torch.equal(sample(backend, patched, "sd15"), base)
    assert model.model_options == before and "sampler_post_cfg_function" not in model.model_options
    assert torch.equal(sample(backend, model, "sd15"), base)


# ----------------------------------------------------------------------------- the extra pass
@parametrize_backends
@pytest.mark.parametrize("family", FAMILIES)
def test_one_extra_redirected_conditional_pass_per_step(backend, family, cache):
    model = tiny(backend, family, cache)
    patched = node(model)
    log = record_batches(patched, backend)
    assert torch.isfinite(sample(backend, patched, family, steps=3)).all()
    sigmas = [sigma for _, _, role, sigma in log if role is None]
    assert len(sigmas) == 3
    # cfg 1 (as the method is used): ComfyUI's own pass has the cond alone; then one all-"redirected" cond pass
    assert log == [e for s in sigmas for e in ((2, False, None, s), (1, False, REDIRECTED, s))]


@parametrize_backends
@pytest.mark.parametrize("family", FAMILIES)
def test_redirected_pass_gives_object_keys_zero_attention_and_leaves_the_rest_alone(backend, family, cache):
    model = tiny(backend, family, cache)
    above, below = Probe("observe"), Probe("kernel")
    patched = node(patch_model(model, [above, below]), ss_steps=0)  # similarity suppression in step 0 only
    sample(backend, patched, family, steps=2)
    effect = next(e for e in patched.model_options["transformer_options"][EFFECTS_KEY] if isinstance(e, AttentiveEraser))
    assert len(above.calls) == len(below.calls) > 0
    touched, steps_seen = set(), set()
    for (call, out), (_, stock_out) in zip(above.calls, below.calls):
        roles = set(call.roles or ())
        assert roles in ({REDIRECTED}, {"cond"}, {"uncond"}, {"cond", "uncond"}), roles
        if roles != {REDIRECTED} or not effect.applies(call.site):
            assert torch.equal(out, stock_out), (call.site, roles)  # plain passes and other layers: stock
            continue
        obj = token_mask(effect.mask, call.tokens.grid).expand(call.batch, -1)
        assert obj.any() and not obj.all(dim=1).any(), "the test mask is partial at every redirected layer"
        ss = 0.3 if call.step.index == 0 else 1.0
        steps_seen.add(call.step.index)
        ref, probs, barred = redirected_reference(call, obj, ss)
        assert probs.masked_select(barred[:, None, None, :].expand_as(probs)).abs().max() == 0.0
        assert torch.allclose(out.double(), ref, atol=2e-5, rtol=1e-4), call.site
        plain = F.scaled_dot_product_attention(call.q, call.k, call.v, scale=call.scale)
        assert (out - plain).abs().max() > 1e-3, call.site  # the kernel below saw the redirected call
        touched.add(call.site.layer)
    layers = {c.site.layer for c, _ in above.calls if effect.applies(c.site)}
    assert touched == layers and layers and steps_seen == {0, 1}
    if family in ("sd15", "sdxl"):  # the default: every up-block (output_blocks) self-attention
        assert all(c.site.name.startswith("output_blocks") == (c.site.layer in layers)
                   for c, _ in above.calls if c.site.kind == "self")


@parametrize_backends
@pytest.mark.parametrize("family,cfg", [("sd15", 1.0), ("sd15", 4.0), ("sdxl", 1.0), ("flux", 1.0)])
def test_sarg_arithmetic_is_exactly_denoised_plus_s_times_extra_minus_cond(backend, family, cfg, cache):
    model = tiny(backend, family, cache)
    s = 9.0
    patched = node(model, scale=s)
    normal, extra, results = guided_passes(patched, backend, family, REDIRECTED, steps=2, cfg=cfg)
    assert len(normal) == len(extra) == len(results) == 2
    for (cond, uncond), (aas,), got in zip(normal, extra, results):
        denoised = cond if cfg == 1.0 else uncond + (cond - uncond) * cfg
        assert not torch.equal(aas, cond)
        assert torch.equal(got, denoised + s * (aas - cond))


@parametrize_backends
def test_scale_1_is_pure_redirected_sampling(backend, cache):
    model = tiny(backend, "sd15", cache)
    patched = node(model, scale=1.0)
    _, extra, results = guided_passes(patched, backend, "sd15", REDIRECTED, steps=1, cfg=1.0)
    (aas,) = extra[0]
    assert torch.allclose(results[0], aas, atol=1e-5)


# ----------------------------------------------------------------------------- masks
@parametrize_backends
def test_mask_resolution_and_layout_do_not_matter_only_its_pooled_tokens(backend, cache):
    model = tiny(backend, "sd15", cache)
    small = object_mask(16, 16)  # latent-sized
    big = F.interpolate(small[None], size=(128, 128), mode="nearest")[0]  # pixel-sized, same tokens
    outs = [sample(backend, node(model, mask=m), "sd15") for m in (small, big, big[0], big[:, None])]
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    # any aspect ratio, and a non-square latent whose sides are not multiples of 8 tokens
    lat = torch.zeros(1, 4, 12, 20)
    out = sample(backend, node(model, mask=object_mask(300, 200)), "sd15", latent=lat)
    assert out.shape == lat.shape and torch.isfinite(out).all()
    assert not torch.equal(out, sample(backend, model, "sd15", latent=lat))


def test_dilation_grows_the_redirect_mask_monotonically(monkeypatch):
    monkeypatch.setattr(guidance_module, "comfy_calc_cond_batch", lambda: fake_comfy.calc_cond_batch)
    model = fake_comfy.build_tiny("sd15")
    masks = []
    for px in (0.0, 3.0, 12.0):
        patched = node(model, mask=object_mask(128, 128), dilate_px=px)
        (effect,) = patched.model_options["transformer_options"][EFFECTS_KEY]
        masks.append(effect.mask)
    assert torch.equal(masks[0], mask_batch(object_mask(128, 128)))
    assert (masks[0] <= masks[1]).all() and (masks[1] <= masks[2]).all() and masks[2].sum() > masks[1].sum() > masks[0].sum()


# ----------------------------------------------------------------------------- bad inputs
class NoClone:
    def __init__(self, family):
        self.model = fake_comfy.build_tiny(family).model

    def clone(self):
        raise AssertionError("must not clone on bad input")


@pytest.mark.parametrize("values,match", [
    (dict(mask=torch.zeros(1, 0, 8)), "mask is empty"),
    (dict(mask=torch.full((1, 8, 8), float("nan"))), "NaN or infinite"),
    (dict(mask=torch.zeros(2, 1, 1, 8, 8)), r"must be \[B, H, W\] or \[H, W\]"),
    (dict(mask=None), "needs a mask"),
    (dict(mask=[[0, 1]]), "must be a ComfyUI MASK tensor"),
    (dict(layers="L99"), r"layers 'L99': layer 99 is out of range"),
    (dict(layers="u9"), r"layers 'u9': .*block index 9 is out of range"),
    (dict(layers="blocks"), r"layers 'blocks': .*cannot read"),
    (dict(scale=-1.0), r"scale must be .*in \[0, 100\]"),
    (dict(ss_scale=0.0), r"ss_scale must be .*in \[0.01, 1\]"),
    (dict(ss_steps=-2), r"ss_steps must be .*in \[-1, 10000\]"),
    (dict(dilate_px=-1.0), r"dilate_px must be .*in \[0, 256\]"),
    (dict(layers=7), "layers must be text"),
])
def test_bad_inputs_raise_before_anything_is_patched(values, match):
    with pytest.raises(ValueError, match=match):
        node(NoClone("sd15"), **values)


def test_bad_inputs_raise_even_when_the_node_would_do_nothing():
    with pytest.raises(ValueError, match="layer 99"):
        node(NoClone("sd15"), scale=0.0, layers="L99")
    with pytest.raises(ValueError, match="NaN"):
        node(NoClone("sd15"), scale=0.0, mask=torch.full((8, 8), float("inf")))

    class PixArtAlpha:
        pass

    pixart = NoClone("sd15")
    pixart.model = type("BaseModel", (), {"model_config": PixArtAlpha(), "diffusion_model": torch.nn.Linear(1, 1)})()
    with pytest.raises(UnsupportedComfyModel, match="PixArt"):
        node(pixart)
    with pytest.raises(UnsupportedComfyModel, match="PixArt"):
        node(pixart, scale=0.0)


@parametrize_backends
@pytest.mark.parametrize("layers,expected", [("u0", "output_blocks.0."), ("L5-6", "output_blocks.2.|output_blocks.3."),
                                             ("m0", "middle_block.")])
def test_layers_input_selects_the_redirected_layers(backend, layers, expected, cache):
    model = tiny(backend, "sd15", cache)
    above = Probe("observe")
    patched = node(patch_model(model, [above]), layers=layers)
    sample(backend, patched, "sd15")
    changed = {(c.site.name, c.roles) for c, out in above.calls
               if not torch.allclose(out, F.scaled_dot_product_attention(c.q, c.k, c.v, scale=c.scale), atol=1e-5)}
    assert changed == {(c.site.name, (REDIRECTED,)) for c, _ in above.calls
                       if c.site.kind == "self" and any(c.site.name.startswith(p) for p in expected.split("|"))}


def test_node_is_registered():
    assert ATTENTIVE_ERASER in NODE_SPECS and ATTENTIVE_ERASER.node_id == "AttnlabAttentiveEraser"
    assert [p.id for p in ATTENTIVE_ERASER.inputs] == ["model", "mask", "scale", "ss_scale", "ss_steps", "dilate_px",
                                                       "layers"]
    assert [p.id for p in ATTENTIVE_ERASER.widgets] == ["scale", "ss_scale", "ss_steps", "dilate_px", "layers"]
    defaults = {p.id: p.default for p in ATTENTIVE_ERASER.widgets}
    assert defaults == {"scale": 9.0, "ss_scale": 0.3, "ss_steps": 9, "dilate_px": 0.0, "layers": ""}
