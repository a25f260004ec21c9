"""The ComfyUI host, driven through the pack's fake of ComfyUI's hook contract (always) and through a
real ComfyUI (tests marked `comfyui`, when COMFYUI_DIR points at a checkout whose dependencies import)."""

import logging

import pytest
import torch

import fake_comfy
import real_comfy
from attnlab.nodes.entropy import ENTROPY_SCALING
from attnlab.processors import EntropyScaling, Recorder
from attnlab.processors.host_comfy import (CONTEXT_KEY, EFFECTS_KEY, ROLE_KEY, CallContext, ChainedReplace,
                                           UnsupportedComfyModel, patch_model, plan_for)
from attnlab.processors.host_comfy.context import HostCache, _warned

FAMILIES = ("sd15", "sdxl", "sd3", "sd3_x", "flux", "wan_t2v", "wan_i2v")
REAL = pytest.mark.skipif(not real_comfy.comfy_available(), reason="needs COMFYUI_DIR with ComfyUI importable")


def backends():
    return [pytest.param(fake_comfy, id="fake"),
            pytest.param(real_comfy, id="real", marks=[pytest.mark.comfyui, REAL])]




def native_px(family):
    """The pixel size whose token grid equals the tiny latent's, so entropy scaling has N == T."""
    shape = fake_comfy.LATENT_SHAPE[family]
    if len(shape) == 4:
        return ((shape[1] - 1) * 4 + 1, shape[2] * 8, shape[3] * 8)
    return (1, shape[1] * 8, shape[2] * 8)


@pytest.fixture(scope="module")
def stock_cache():
    return {}


def run(backend, model, family, **kw):
    return backend.sample_tiny(model, family, **kw)


def stock(backend, family, cache, **kw):
    key = (backend.__name__, family, tuple(sorted(kw.items())))
    if key not in cache:
        cache[key] = (backend.build_tiny(family), None)
        cache[key] = (cache[key][0], run(backend, cache[key][0], family, **kw))
    return cache[key]


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("family", FAMILIES)
def test_pass_through_zero_strength_and_native_size_are_bit_exact(backend, family, stock_cache):
    model, base = stock(backend, family, stock_cache)
    observer = Recorder()
    assert torch.equal(run(backend, patch_model(model, [observer]), family), base)
    assert observer.calls, "the override never reached the effect"
    assert torch.equal(run(backend, patch_model(model, [EntropyScaling(strength=0.0)]), family), base)
    assert torch.equal(run(backend, patch_model(model, [EntropyScaling()], native_size=native_px(family)), family), base)
    changed = run(backend, patch_model(model, [EntropyScaling()]), family)  # native 512/1024 px: tiny latents are smaller
    assert torch.isfinite(changed).all() and not torch.equal(changed, base)


@pytest.mark.parametrize("backend", backends())
def test_callers_model_is_untouched_and_nothing_leaks(backend, stock_cache):
    model, base = stock(backend, "sd15", stock_cache)
    before = repr(sorted(model.model_options.get("transformer_options", {}).keys()))
    patched = patch_model(model, [EntropyScaling(strength=2.0)])
    run(backend, patched, "sd15")
    assert repr(sorted(model.model_options.get("transformer_options", {}).keys())) == before
    assert not model.get_wrappers("apply_model", "attnlab")
    options = patched.model_options["transformer_options"]
    assert "optimized_attention_override" not in options and CONTEXT_KEY not in options
    assert torch.equal(run(backend, model, "sd15"), base)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("layout,kwargs,expected", [
    ("cfg", dict(cfg=4.0, batch=2), [("uncond", "uncond", "cond", "cond")]),
    ("cfg1", dict(cfg=1.0, batch=2), [("cond", "cond")]),
    ("split", dict(cfg=4.0, batch=2, split_calls=True), [("uncond", "uncond"), ("cond", "cond")]),
])
def test_row_roles_follow_cond_or_uncond(backend, layout, kwargs, expected):
    observer = Recorder()
    model = patch_model(backend.build_tiny("sd15"), [observer])
    run(backend, model, "sd15", steps=2, **kwargs)
    first = [c for c in observer.calls if c.site == observer.calls[0].site]
    roles = [c.roles for c in first]
    assert roles == expected * 2, layout  # two steps
    steps = [c.step.index for c in first]
    assert steps == sorted(steps) and steps[0] == 0 and steps[-1] == 1
    assert all(c.step.count == 2 and c.step.sigma is not None for c in first)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("family", FAMILIES)
def test_sites_and_layouts(backend, family):
    observer = Recorder()
    base = backend.build_tiny(family)
    plan = plan_for(base.model)
    run(backend, patch_model(base, [observer]), family, steps=1, cfg=4.0)
    calls = observer.calls
    assert not any(c is None for c in calls)
    sites = [c.site for c in calls]
    assert len(set(sites)) == len(sites), "one call per site per forward (one forward at cfg>1 batched)"
    for c in calls:
        t = c.tokens
        n_img = t.image_tokens
        assert t.q_image.stop - t.q_image.start == n_img and t.native_grid is not None
        if c.site.kind in ("joint", "single"):
            assert t.text_first and t.q_text.start == 0 and t.q_image.start == t.q_text.stop
            assert t.q_image.stop <= c.q_len
        elif c.site.kind == "cross":
            assert t.k_text.stop == c.kv_len
        else:
            assert c.kv_len == c.q_len == n_img
        assert c.roles == ("uncond", "cond")
    if plan.family == "unet":
        layers = sorted({s.layer for s in sites})
        assert layers == list(range(len(layers)))
        assert {s.kind for s in sites} == {"self", "cross"}
        assert all(s.name.endswith("attn1" if s.kind == "self" else "attn2") for s in sites)
        level_px = {c.tokens.scale[1] for c in calls}
        assert min(level_px) == 8 and len(level_px) >= 2
    else:
        expected = [(k, layer) for k, layer in plan.calls if k != "cross_image"]
        assert [(s.kind, s.layer) for s in sites] == expected
    if plan.family == "flux":
        assert [s.layer for s in sites] == list(range(len(sites)))


@pytest.mark.parametrize("backend", backends())
def test_foreign_override_before_and_after_our_node_is_chained(backend, stock_cache):
    model, base = stock(backend, "flux", stock_cache)
    calls = {"before": 0, "after": 0}

    def foreign(name):
        def override(func, *args, **kwargs):
            calls[name] += 1
            return func(*args, **kwargs)
        return override

    first = model.clone()
    first.model_options["transformer_options"]["optimized_attention_override"] = foreign("before")
    observer = Recorder()
    ours = patch_model(first, [observer])
    out = run(backend, ours, "flux")
    assert calls["before"] > 0 and observer.calls and torch.equal(out, base)

    later = ours.clone()
    later.model_options["transformer_options"]["optimized_attention_override"] = foreign("after")
    n_seen = len(observer.calls)
    out = run(backend, later, "flux")
    assert calls["after"] > 0 and len(observer.calls) > n_seen and torch.equal(out, base)


@pytest.mark.parametrize("backend", backends())
def test_stacked_nodes_compose_with_one_router(backend):
    a, b = Recorder(), Recorder()
    model = patch_model(patch_model(backend.build_tiny("sd15"), [a]), [b])
    assert len(model.get_wrappers("apply_model", "attnlab")) == 1
    assert model.model_options["transformer_options"][EFFECTS_KEY] == [a, b]
    patches = model.model_options["transformer_options"]["patches"]
    assert len(patches["attn1_patch"]) == 1 and len(patches["attn2_patch"]) == 1
    run(backend, model, "sd15")
    assert len(a.calls) == len(b.calls) > 0


@pytest.mark.parametrize("backend", backends())
def test_existing_replace_is_chained_and_late_replace_warns(backend, caplog):
    model = backend.build_tiny("sd15")
    hits = []

    def identity_replace(q, k, v, extra_options):  # PAG-style: attention replaced by identity
        hits.append(extra_options["block"])
        return v

    early = model.clone()
    early.set_model_attn1_replace(identity_replace, "middle", 0, 0)
    observer = Recorder()
    patched = patch_model(early, [observer])
    replaced = patched.model_options["transformer_options"]["patches_replace"]["attn1"][("middle", 0, 0)]
    assert isinstance(replaced, ChainedReplace)
    run(backend, patched, "sd15", steps=1)
    assert hits, "the other node's replace must still run"
    middle = [c for c in observer.calls if c.site.name.startswith("middle_block") and c.site.kind == "self"]
    assert middle, "effects reach the replaced block through the chained replace"

    _warned.clear()
    late = patch_model(model, [Recorder()])
    late.set_model_attn1_replace(identity_replace, "middle", 0, 0)
    with caplog.at_level(logging.WARNING, logger="attnlab"):
        run(backend, late, "sd15", steps=1)
    assert "replaced by another node" in caplog.text


def test_role_override_for_guidance_passes():
    """A post-CFG extra pass (as SoftPAG will run) marks its rows through a copied model_options."""
    observer = Recorder()
    model = patch_model(fake_comfy.build_tiny("sd15"), [observer])

    def post_cfg(args):
        options = fake_comfy.create_model_options_clone(args["model_options"])
        options["transformer_options"][ROLE_KEY] = "perturbed"
        fake_comfy.calc_cond_batch(args["model"], [args["cond"]], args["input"], args["sigma"], options)
        return args["denoised"]

    model.set_model_sampler_post_cfg_function(post_cfg)
    run(fake_comfy, model, "sd15", steps=1)
    assert {c.roles for c in observer.calls} == {("uncond", "cond"), ("perturbed",)}


def test_old_comfyui_without_override_routes_unet_through_replaces():
    base = fake_comfy.build_tiny("sd15")
    stock_out = run(fake_comfy, base, "sd15")
    observer = Recorder()
    attention = fake_comfy.get_attention_function("sub_quad")
    patched = patch_model(base, [observer], override_supported=False, attention=attention)

    def no_override(executor, *args, **kwargs):  # what an old ComfyUI does: never consults the override
        args[5].pop("optimized_attention_override", None)
        return executor(*args, **kwargs)

    patched.add_wrapper_with_key("apply_model", "zz_old_comfy", no_override)
    out = run(fake_comfy, patched, "sd15")
    sites = {c.site for c in observer.calls}
    assert len(sites) == 14 and torch.equal(out, stock_out)
    with pytest.raises(RuntimeError, match="0.3.60"):
        patch_model(fake_comfy.build_tiny("flux"), [observer], override_supported=False)


def test_block_info_of_newer_comfyui_is_used_when_present():
    model = fake_comfy.build_tiny("flux")
    plan = plan_for(model.model)
    x = torch.zeros(1, 16, 16, 16)
    ctx = CallContext(plan, [Recorder()], x, torch.tensor([1.0]), torch.zeros(1, 5, 32), {"cond_or_uncond": [0]},
                      HostCache())
    site, _ = ctx.resolve(69, 69, {"block_type": "single", "block_index": 1})
    assert (site.kind, site.layer, site.name) == ("single", plan.double_blocks + 1, "single_blocks.1")
    assert ctx.counter == 0


def test_unsupported_models_and_bad_input_raise_before_cloning():
    class PixArtAlpha:
        pass

    class NoClone:
        def clone(self):
            raise AssertionError("must not clone on bad input")

    pixart = NoClone()
    pixart.model = type("BaseModel", (), {"model_config": PixArtAlpha(), "diffusion_model": torch.nn.Linear(1, 1)})()
    with pytest.raises(UnsupportedComfyModel, match="PixArt|pixart"):
        patch_model(pixart, [EntropyScaling()])
    unknown = NoClone()
    unknown.model = type("BaseModel", (), {"model_config": object(), "diffusion_model": torch.nn.Linear(1, 1)})()
    with pytest.raises(UnsupportedComfyModel, match="supported"):
        patch_model(unknown, [EntropyScaling()])
    sd15 = fake_comfy.build_tiny("sd15")
    sd15.clone = NoClone().clone
    with pytest.raises(ValueError, match="multiples of 8"):
        patch_model(sd15, [EntropyScaling(train_size=(500, 512))])
    with pytest.raises(ValueError, match="token_count"):
        ENTROPY_SCALING.execute(model=sd15, strength=1.0, train_height=0, train_width=0, token_count="x")


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_entropy_node_end_to_end(backend, family, stock_cache):
    model, base = stock(backend, family, stock_cache)
    node = dict(train_height=0, train_width=0, token_count="joint")
    (patched,) = ENTROPY_SCALING.execute(model=model, strength=1.0, **node)
    assert not torch.equal(run(backend, patched, family), base)
    (off,) = ENTROPY_SCALING.execute(model=model, strength=0.0, **node)
    assert torch.equal(run(backend, off, family), base)
    _, h, w = native_px(family)
    (native,) = ENTROPY_SCALING.execute(model=model, strength=1.0, train_height=h, train_width=w, token_count="joint")
    assert torch.equal(run(backend, native, family), base)
