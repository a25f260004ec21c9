"""SoftPAG in ComfyUI: the node, the host's site/head checks and the post-CFG extra pass, driven through the
pack's fake of ComfyUI (always) and a real ComfyUI (tests marked `comfyui`, when COMFYUI_DIR is set)."""

import copy

import pytest
import torch

import fake_comfy
from comfy_pass_tools import Probe, guided_passes, parametrize_backends, record_batches, tiny
from attnlab.nodes import NODE_SPECS
from attnlab.nodes.softpag import SOFTPAG
from attnlab.processors import Recorder
from attnlab.processors.effects import Effect
from attnlab.processors.host_comfy import (EFFECTS_KEY, PASS_EFFECTS_KEY, ROLE_KEY, ExtraPassGuidance,
                                           UnsupportedComfyModel, install_guidance, options_for_pass, patch_model,
                                           plan_for, plan_sites, timestep_1000)
from attnlab.processors.host_comfy import guidance as guidance_module
from attnlab.processors.softpag import GuidanceSchedule, SoftPAG

FAMILIES = ("sd15", "sdxl", "sd3", "flux", "wan_t2v")
#: a head set per family touching a few layers, and the CFG scale its users sample with (FLUX: cfg 1)
HEADS = {"sd15": "d1, m0:H1", "sdxl": "m0; u0", "sd3": "L1:H0", "flux": "L0:*; L3:H1", "wan_t2v": "L1:*"}
CFG = {"sd15": 4.0, "sdxl": 4.0, "sd3": 4.0, "flux": 1.0, "wan_t2v": 4.0}
NODE = dict(scale=3.0, u=1.0, preset="none", target="identity", joint="full", sigma_start=-1.0, sigma_end=-1.0,
            adaptive_scale=0.0)





@pytest.fixture(scope="module")
def cache():
    return {}

def sample(backend, model, family, steps=1, cfg=None):
    return backend.sample_tiny(model, family, steps=steps, cfg=CFG[family] if cfg is None else cfg)



def stock(backend, family, cache):
    """(the tiny model, its stock one-step sampling result), cached per backend and family."""
    key = (backend.NAME, family, "stock")
    if key not in cache:
        model = tiny(backend, family, cache)
        cache[key] = (model, sample(backend, model, family))
    return cache[key]


def node(model, **values):
    inputs = dict(NODE, heads="")
    inputs.update(values)
    return SOFTPAG.execute(model=model, **inputs)[0]





# ----------------------------------------------------------------------------- host: sites and checks
@parametrize_backends
@pytest.mark.parametrize("family", FAMILIES + ("sd3_x", "wan_i2v"))
def test_sites_carry_head_counts_and_match_the_calls(backend, family, cache):
    model = tiny(backend, family, cache)
    plan = plan_for(model.model)
    sites = plan_sites(plan, model.model)
    observer = Recorder()
    sample(backend, patch_model(model, [observer]), family, cfg=4.0)
    seen = {(c.site, c.heads) for c in observer.calls}
    assert seen == set(sites), "every site the model calls is listed, with the heads the call has"


@parametrize_backends
@pytest.mark.parametrize("family,heads,match", [
    ("flux", "L4:*", r"layer 4 is out of range: this flux model has perturbable layers 0-3"),
    ("flux", "L1:H2", r"head 2 is out of range for layer 1: it has 2 heads \(0-1\)"),
    ("flux", "m0", "UNet blocks"),
    ("sd15", "d2", r"block index 2 is out of range; section 'd' has attention blocks 0-1"),
    ("sd15", "m0.1", "transformer index 1 is out of range"),
    ("sd15", "L7", "layer 7 is out of range"),
    ("wan_t2v", "L2", "layer 2 is out of range"),
    ("sd3", "L7:H3;;L9:Hx", "cannot read head 'Hx'"),
    ("sd3", "layer 3", "cannot read 'layer3'"),
])
def test_bad_heads_raise_a_clear_error_before_anything_is_patched(backend, family, heads, match, cache):
    model = tiny(backend, family, cache)
    before = copy.copy(model.model_options)
    with pytest.raises(ValueError, match=match):
        node(model, heads=heads)
    with pytest.raises(ValueError, match=match):
        patch_model(model, [SoftPAG(heads)])
    assert model.model_options == before and not model.get_wrappers("apply_model", "attnlab")


def test_bad_node_inputs_and_unsupported_models():
    class NoClone:
        def clone(self):
            raise AssertionError("must not clone on bad input")

    flux = NoClone()
    flux.model = fake_comfy.build_tiny("flux").model
    with pytest.raises(ValueError, match=r"u must be .*in \[0, 1\]"):
        node(flux, heads="L0", u=1.5)
    with pytest.raises(ValueError, match=r"scale must be .*in \[0, 100\]"):
        node(flux, heads="L0", scale=-1.0)
    with pytest.raises(ValueError, match="target must be one of"):
        node(flux, heads="L0", target="max")
    with pytest.raises(ValueError, match="joint='image'"):
        node(flux, heads="L0", target="uniform", joint="image")
    with pytest.raises(ValueError, match="sigma_end .* must be <= sigma_start"):
        node(flux, heads="L0", sigma_start=0.2, sigma_end=0.5)
    with pytest.raises(ValueError, match="preset must be one of"):
        node(flux, heads="L0", preset="nope")
    with pytest.raises(ValueError, match="is a head set for sd3 models; this is a flux model"):
        node(flux, preset="sd3-medium-layers-7-10")
    sd3 = NoClone()
    sd3.model = fake_comfy.build_tiny("sd3").model
    with pytest.raises(ValueError, match=r"heads 'L7-10:\*' \(preset 'sd3-medium-layers-7-10'\): layer 7 is out of range"):
        node(sd3, preset="sd3-medium-layers-7-10")

    class PixArtAlpha:
        pass

    pixart = NoClone()
    pixart.model = type("BaseModel", (), {"model_config": PixArtAlpha(), "diffusion_model": torch.nn.Linear(1, 1)})()
    with pytest.raises(UnsupportedComfyModel, match="PixArt"):
        node(pixart, heads="L0")
    with pytest.raises(UnsupportedComfyModel, match="PixArt"):
        node(pixart, heads="")  # even when the node would do nothing


def test_preset_heads_are_used_unless_heads_are_given(monkeypatch):
    monkeypatch.setattr(guidance_module, "comfy_calc_cond_batch", lambda: fake_comfy.calc_cond_batch)
    model = fake_comfy.build_tiny("sd3")
    patched = node(model, heads="L1:H0", preset="sd3-medium-layers-7-10")  # heads override the preset's
    (effect,) = patched.model_options["transformer_options"][EFFECTS_KEY]
    assert str(effect.heads) == "L1:H0"
    preset = next(p for p in SOFTPAG.inputs if p.id == "preset")
    assert preset.options[0] == "none" and "sd3-medium-layers-7-10" in preset.options


# ----------------------------------------------------------------------------- the off switch and removal
@parametrize_backends
@pytest.mark.parametrize("family", FAMILIES)
def test_off_switch_and_inert_effect_are_bit_exact(backend, family, cache):
    model, base = stock(backend, family, cache)
    for off in (dict(scale=0.0), dict(u=0.0), dict(heads="")):
        patched = node(model, **dict(dict(heads=HEADS[family]), **off))
        assert patched is not model, off
        assert "sampler_post_cfg_function" not in patched.model_options, off
        assert EFFECTS_KEY not in patched.model_options["transformer_options"], off
        assert not patched.get_wrappers("apply_model", "attnlab"), off
    log = record_batches(patched, backend)
    assert torch.equal(sample(backend, patched, family), base)
    assert [role for _, _, role, _ in log] == [None], "no extra pass when off"
    # installed, but acting on "perturbed" rows only: ComfyUI's own cond/uncond passes are untouched
    inert = patch_model(model, [SoftPAG(HEADS[family], u=1.0)])
    assert torch.equal(sample(backend, inert, family), base)


@parametrize_backends
def test_callers_model_is_untouched(backend, cache):
    model, base = stock(backend, "sd15", cache)
    before = copy.deepcopy({k: v for k, v in model.model_options.items()})
    patched = node(model, heads="m0")
    assert patched is not model and patched.model_options.get("sampler_post_cfg_function")
    assert not torch.equal(sample(backend, patched, "sd15"), base)
    assert model.model_options == before and "sampler_post_cfg_function" not in model.model_options
    assert not model.get_wrappers("apply_model", "attnlab")
    assert torch.equal(sample(backend, model, "sd15"), base)


# ----------------------------------------------------------------------------- the extra pass
@parametrize_backends
@pytest.mark.parametrize("family", FAMILIES)
def test_one_extra_conditional_pass_per_step_inside_the_sigma_window(backend, family, cache):
    model = tiny(backend, family, cache)
    start = 0.9 * float(model.model.model_sampling.sigma_max)  # leaves out the first step
    patched = node(model, heads=HEADS[family], sigma_start=start)
    log = record_batches(patched, backend)
    assert torch.isfinite(sample(backend, patched, family, steps=3)).all()
    cfg1 = CFG[family] == 1.0
    # per step: ComfyUI's own pass (cond + uncond, or cond alone at cfg 1: no uncond pass is forced),
    # then, inside the window, exactly one conditional pass whose rows are all "perturbed"
    sigmas = [sigma for _, _, role, sigma in log if role is None]
    assert len(sigmas) == 3 and sigmas[0] > start >= sigmas[1]
    expected = []
    for sigma in sigmas:
        expected.append((2, not cfg1, None, sigma))
        if sigma <= start:
            expected.append((1, False, "perturbed", sigma))
    assert log == expected


@parametrize_backends
def test_sigma_window_bounds_are_inclusive(backend, cache):
    model, _ = stock(backend, "flux", cache)
    patched = node(model, heads="L0")
    log = record_batches(patched, backend)
    sample(backend, patched, "flux", steps=3)
    sigmas = [sigma for _, _, role, sigma in log if role is None]
    assert [sigma for _, _, role, sigma in log if role == "perturbed"] == sigmas  # no window: every step
    for start, end, active in [(sigmas[1], -1.0, sigmas[1:]), (-1.0, sigmas[1], sigmas[:2]),
                               (sigmas[1], sigmas[1], sigmas[1:2]), (sigmas[2] / 2, -1.0, [])]:
        windowed = node(model, heads="L0", sigma_start=start, sigma_end=end)
        log = record_batches(windowed, backend)
        sample(backend, windowed, "flux", steps=3)
        assert [sigma for _, _, role, sigma in log if role == "perturbed"] == active, (start, end)


@parametrize_backends
@pytest.mark.parametrize("family", FAMILIES)
def test_perturbation_acts_only_in_the_perturbed_pass_and_u1_gives_v(backend, family, cache):
    model, _ = stock(backend, family, cache)
    above, below = Probe("observe"), Probe("kernel")
    patched = node(patch_model(model, [above, below]), heads=HEADS[family], u=1.0)
    sample(backend, patched, family)
    effect = next(e for e in patched.model_options["transformer_options"][EFFECTS_KEY] if isinstance(e, SoftPAG))
    assert len(above.calls) == len(below.calls) > 0
    touched = 0
    for (call, out), (_, stock_out) in zip(above.calls, below.calls):
        perturbed = call.roles is not None and set(call.roles) == {"perturbed"}
        assert perturbed or set(call.roles) <= {"cond", "uncond"}
        heads = effect.resolved_heads.heads_at(call.site.layer, call.heads) if effect.applies(call.site) else ()
        if not perturbed or not heads:
            assert torch.equal(out, stock_out), (call.site, call.roles)
            continue
        touched += 1
        rest = [h for h in range(call.heads) if h not in heads]
        assert torch.equal(out[:, list(heads)], call.v[:, list(heads)]), call.site  # u = 1: the output is V
        assert torch.equal(out[:, rest], stock_out[:, rest]), call.site
    assert touched == len({c.site for c, _ in above.calls if effect.applies(c.site)}) > 0


@parametrize_backends
@pytest.mark.parametrize("family,cfg", [("sd15", 4.0), ("flux", 1.0), ("wan_t2v", 4.0)])
def test_guidance_arithmetic_matches_the_passes_exactly(backend, family, cfg, cache):
    model, _ = stock(backend, family, cache)
    w = 2.5
    patched = node(model, heads=HEADS[family], scale=w, u=0.5)
    normal, extra, results = guided_passes(patched, backend, family, "perturbed", steps=2, cfg=cfg)
    assert len(normal) == len(extra) == len(results) == 2
    for (cond, uncond), (ptb,), got in zip(normal, extra, results):
        cfg_result = uncond + (cond - uncond) * cfg  # ComfyUI's CFG (cfg 1: uncond is zeros, cfg_result == cond)
        if cfg == 1.0:
            assert torch.equal(cfg_result, cond)
        assert not torch.equal(ptb, cond)
        assert torch.equal(got, cfg_result + w * (cond - ptb))


@parametrize_backends
def test_stacked_nodes_each_perturb_their_own_heads_in_their_own_pass(backend, cache):
    model, _ = stock(backend, "flux", cache)
    above, below = Probe("observe"), Probe("kernel")
    patched = node(node(patch_model(model, [above, below]), heads="L0:*"), heads="L3:*")
    assert len(patched.model_options["sampler_post_cfg_function"]) == 2
    log = record_batches(patched, backend)
    sample(backend, patched, "flux")
    assert [role for _, _, role, _ in log] == [None, "perturbed", "perturbed"]
    passes, current = [], None
    for (call, out), (_, stock_out) in zip(above.calls, below.calls):
        if call.site.layer == 0:  # the first call of a forward
            current = set()
            passes.append((call.roles, current))
        if not torch.equal(out, stock_out):
            current.add(call.site.layer)
    assert [(set(roles), changed) for roles, changed in passes] == [({"cond"}, set()), ({"perturbed"}, {0}),
                                                                   ({"perturbed"}, {3})]


# ----------------------------------------------------------------------------- the post-CFG function itself
def test_post_cfg_function_arithmetic_options_copy_and_off_switch():
    torch.manual_seed(1)
    cond, denoised, ptb = torch.randn(3, 2, 4, 8, 8)
    seen = []

    def calc(model, conds, x, sigma, options):
        seen.append((conds, x, sigma, options))
        return [ptb]

    a, b, shared = SoftPAG("L0"), SoftPAG("L1"), Recorder()
    to = {EFFECTS_KEY: [shared, a, b], PASS_EFFECTS_KEY: [a, b], "sample_sigmas": torch.tensor([2.0, 1.0, 0.0])}
    options = {"transformer_options": to, "other": [1]}
    frozen = copy.deepcopy(options)
    args = {"denoised": denoised, "cond_denoised": cond, "cond": ["c"], "uncond": None, "input": torch.ones(1),
            "sigma": torch.tensor([1.0]), "model": object(), "model_options": options, "cond_scale": 1.0}
    g = ExtraPassGuidance(GuidanceSchedule(scale=1.5), [b], calc_cond_batch=calc)
    out = g(args)
    assert torch.equal(out, denoised + 1.5 * (cond - ptb)) and g.passes == 1
    (conds, x, sigma, passed), = seen
    assert conds == [["c"]] and x is args["input"] and sigma is args["sigma"]
    assert passed["transformer_options"][ROLE_KEY] == "perturbed"
    assert passed["transformer_options"][EFFECTS_KEY] == [shared, b]  # the other guidance's effect stays out
    assert passed["other"] is options["other"]
    assert repr(options) == repr(frozen) and ROLE_KEY not in to, "the caller's options are never modified"

    class Plain(Effect):  # an effect that deepcopy really copies
        stage = "observe"

    mine, theirs = Plain(), Plain()
    g2 = ExtraPassGuidance(GuidanceSchedule(), [mine], calc_cond_batch=calc)
    cloned = copy.deepcopy({"transformer_options": {EFFECTS_KEY: [mine, theirs], PASS_EFFECTS_KEY: [mine, theirs]},
                            "sampler_post_cfg_function": [g2]})  # what ModelPatcher.clone does
    g2_clone = cloned["sampler_post_cfg_function"][0]
    (mine_clone, theirs_clone) = cloned["transformer_options"][EFFECTS_KEY]
    assert mine_clone is not mine and g2_clone.effects == (mine_clone,)
    passed = options_for_pass(cloned, "perturbed", g2_clone.effects)["transformer_options"]
    assert passed[EFFECTS_KEY] == [mine_clone]

    g_off = ExtraPassGuidance(GuidanceSchedule(scale=1.5, sigma_max=0.5), [b], calc_cond_batch=calc)
    assert g_off(args) is denoised and len(seen) == 1, "outside the window: unchanged, no pass"
    assert ExtraPassGuidance(GuidanceSchedule(scale=0.0), calc_cond_batch=calc)(args) is denoised
    assert ExtraPassGuidance(GuidanceSchedule(), calc_cond_batch=calc)(dict(args, cond=None)) is denoised
    assert options_for_pass({}, "perturbed")["transformer_options"] == {ROLE_KEY: "perturbed"}

    bare = fake_comfy.build_tiny("flux")
    with pytest.raises(ValueError, match="does not hold the guidance's effects"):
        install_guidance(bare.clone(), ExtraPassGuidance(GuidanceSchedule(), [a]))


@parametrize_backends
@pytest.mark.parametrize("family", ["sd15", "sd3", "flux"])
def test_timestep_is_on_the_0_1000_scale_and_drives_adaptive_scale(backend, family, cache):
    ms = tiny(backend, family, cache).model.model_sampling
    sigma = torch.tensor([0.5])
    t = timestep_1000(ms, sigma)
    if family == "sd15":
        assert t == pytest.approx(float(ms.timestep(sigma)[0])) and 0 < t < 999
    else:  # flow models: SD3 multiplies by 1000 itself, FLUX's timestep(sigma) is sigma
        assert t == pytest.approx(500.0)
    g = ExtraPassGuidance(GuidanceSchedule(scale=3.0, adaptive=0.002))
    args = {"sigma": sigma, "model": type("M", (), {"model_sampling": ms})(), "model_options": {}}
    assert g.scale_for(args) == pytest.approx(max(0.0, 3.0 - 0.002 * (1000.0 - t)))


def test_node_is_registered():
    assert SOFTPAG in NODE_SPECS
    widgets = [p.id for p in SOFTPAG.widgets]
    assert widgets == ["scale", "u", "heads", "preset", "target", "joint", "sigma_start", "sigma_end", "adaptive_scale"]
