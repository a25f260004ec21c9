"""FreeSwim in ComfyUI: the node, the dual-path model_function_wrapper and the window/override effect, on the
pack's fake ComfyUI (always) and a real ComfyUI (tests marked `comfyui`, when COMFYUI_DIR is set):
a covering window equals stock, the input model stays stock, the override is bit-exact and the window rows'
own text attention never runs, the cache schedule, one latent per row surviving, bad input."""

import copy

import pytest
import torch

from comfy_pass_tools import Probe, parametrize_backends, tiny
from attnlab.nodes import NODE_SPECS
from attnlab.nodes.freeswim import FREESWIM
from attnlab.processors.freeswim import FreeSwim, freeswim_effects
from attnlab.processors.host_comfy import patch_model
from attnlab.processors.host_comfy.dual_pass import DualPassWrapper, install_dual_pass

FAMILIES = ("sd15", "sd3", "flux", "wan_t2v", "wan_i2v")
CFG = {"sd15": 4.0, "sdxl": 4.0, "sd3": 4.0, "flux": 1.0, "wan_t2v": 4.0, "wan_i2v": 4.0}
NODE = dict(window_scale=1.0, base_height=32, base_width=32, cache_steps=1, override_uncond=True, logit_scale=1.0,
            backend="auto", mmdit_override="text_stream")


@pytest.fixture(scope="module")
def cache():
    return {}


def sample(backend, model, family, steps=2):
    return backend.sample_tiny(model, family, steps=steps, cfg=CFG[family])


def stock(backend, family, cache, steps=2):
    key = (backend.NAME, family, "stock", steps)
    if key not in cache:
        model = tiny(backend, family, cache)
        cache[key] = (model, sample(backend, model, family, steps))
    return cache[key]


def node(model, **values):
    inputs = dict(NODE)
    inputs.update(values)
    return FREESWIM.execute(model=model, **inputs)[0]


def _close(a, b):
    torch.testing.assert_close(a, b, atol=1e-5 * max(1.0, float(b.abs().max())), rtol=0)




def test_node_is_registered():
    assert FREESWIM in NODE_SPECS
    assert FREESWIM.node_id == "AttnlabFreeSwim"


@parametrize_backends
@pytest.mark.parametrize("family", FAMILIES)
def test_covering_window_equals_stock_and_the_input_model_stays_stock(backend, family, cache):
    model, ref = stock(backend, family, cache)
    patched = node(model, base_height=4096, base_width=4096, logit_scale=0.0)
    _close(sample(backend, patched, family), ref)
    wrapper = patched.model_options["model_function_wrapper"]
    assert isinstance(wrapper, DualPassWrapper) and wrapper.full_rows > 0
    assert "model_function_wrapper" not in model.model_options
    assert torch.equal(sample(backend, model, family), ref)


@parametrize_backends
@pytest.mark.parametrize("family", FAMILIES + ("sdxl",))
def test_window_changes_the_result_and_one_latent_survives(backend, family, cache):
    model, ref = stock(backend, family, cache)
    patched = node(model)
    out = sample(backend, patched, family)
    assert out.shape == ref.shape
    assert not torch.allclose(out, ref, atol=1e-4)
    swim = patched.model_options["model_function_wrapper"].swim
    assert swim.stats["window_calls"] > 0 and not swim.skipped


@parametrize_backends
@pytest.mark.parametrize("family", ["wan_t2v", "sd15"])
def test_override_bit_exact_cross_never_evaluated_on_window_rows_and_cache_schedule(backend, family, cache):
    model = tiny(backend, family, cache)
    above, below = Probe("observe"), Probe("kernel")
    effects = freeswim_effects(logit_scale=1.0, base_size=(32, 32), cache_steps=2, override_uncond=False)
    swim = next(e for e in effects if isinstance(e, FreeSwim))
    patched = patch_model(model, [above, *effects, below])
    install_dual_pass(patched, swim)
    sample(backend, patched, family, steps=4)
    cross = [(c, o) for c, o in above.calls if c.site.kind == "cross"]
    fresh = [(c, o) for c, o in cross if "full" in c.roles]
    assert fresh
    for c, o in fresh:
        w, f = c.roles.index("cond"), c.roles.index("full")
        assert torch.equal(o[w], o[f])
    assert sorted({c.step.index for c, _ in fresh}) == [0, 2]
    assert not any(c.roles.count("full") > c.roles.count("cond") for c, _ in cross)
    # below FreeSwim: no cross call ever carried a cond window row (fresh: twin only; cached: nothing)
    for c, _ in below.calls:
        if c.site.kind == "cross":
            evaluated = c.q.shape[0]
            assert evaluated == c.roles.count("full") + c.roles.count("uncond")
    assert swim.stats["cache_hits"] > 0


@parametrize_backends
def test_an_existing_model_function_wrapper_is_chained(backend, cache):
    model = tiny(backend, "wan_t2v", cache).clone()
    seen = []

    def previous(apply_model, args):
        seen.append(args["input"].shape[0])
        return apply_model(args["input"], args["timestep"], **args["c"])

    model.set_model_unet_function_wrapper(previous)
    patched = node(model)
    sample(backend, patched, "wan_t2v")
    assert seen and set(seen) == {4}  # it ran on cond + uncond (2 rows) plus their 2 full twins


@parametrize_backends
def test_bad_input_raises_before_patching(backend, cache):
    model = tiny(backend, "flux", cache)
    before = copy.copy(model.model_options)
    with pytest.raises(ValueError, match="base_height and base_width"):
        node(model, base_height=512, base_width=0)
    with pytest.raises(ValueError, match="multiple of the flux model's patch"):
        node(model, base_height=1000, base_width=1024)
    with pytest.raises(ValueError, match=r"window_scale must be .*in \[0.05, 16\]"):
        node(model, window_scale=0.0)
    with pytest.raises(ValueError, match="mmdit_override must be one of"):
        node(model, mmdit_override="b")
    assert model.model_options == before and "model_function_wrapper" not in model.model_options


@parametrize_backends
def test_stacks_with_a_guidance_pass_node(backend, cache):
    """SoftPAG's extra pass runs through the dual path too: its rows keep the "perturbed" role (so SoftPAG still
    finds them) and get their own full twins."""
    from attnlab.nodes.softpag import SOFTPAG

    model = tiny(backend, "wan_t2v", cache)
    pag = SOFTPAG.execute(model=model, scale=3.0, u=1.0, heads="L1:*", preset="none", target="identity",
                          joint="full", sigma_start=-1.0, sigma_end=-1.0, adaptive_scale=0.0)[0]
    probe = Probe("observe")
    patched = node(patch_model(pag, [probe]))
    out = sample(backend, patched, "wan_t2v")
    assert torch.isfinite(out).all()
    roles = {c.roles for c, _ in probe.calls if c.site.kind == "cross"}
    assert ("perturbed", "full") in roles and any("cond" in r and "full" in r for r in roles)
