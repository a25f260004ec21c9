"""ComfyUI hook contract (test layer T2): the in-repo fake (``tests/fake_comfy``) is pinned to golden
traces recorded from a real ComfyUI (``tests/traces``); the real-ComfyUI half (marker ``comfyui``)
re-records the traces from ``COMFYUI_DIR`` and checks them against the committed ones.

CI (no ComfyUI):            pytest tests/test_comfy_contract.py
Real ComfyUI (T3):          COMFYUI_DIR=/path/to/ComfyUI PYTHONPATH=<torchvision stub dir> \
                                <comfy venv>/bin/python -m pytest tests/test_comfy_contract.py -m comfyui
Re-record golden traces:    ATTNLAB_UPDATE_TRACES=1 (same command), or tests/record_comfy_traces.py
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import comfy_traces as ct
import fake_comfy
import real_comfy
from fake_comfy import attention as fattn

TRACES = Path(__file__).parent / "traces"
SCENARIOS = sorted(ct.SCENARIOS)

needs_comfy = [pytest.mark.comfyui,
               pytest.mark.skipif(not real_comfy.comfy_available(),
                                  reason="needs a real ComfyUI checkout in COMFYUI_DIR (and its dependencies)")]


@pytest.fixture(scope="module")
def fake_models():
    return {}


@pytest.fixture(scope="module")
def real_models():
    return {}


@pytest.fixture(params=["fake", pytest.param("real", marks=needs_comfy)])
def backend(request):
    return fake_comfy if request.param == "fake" else real_comfy


@pytest.fixture
def models(backend, fake_models, real_models):
    return fake_models if backend is fake_comfy else real_models


def _tiny(backend, models, family):
    if family not in models:
        models[family] = backend.build_tiny(family, seed=0)
    return models[family]


# ============================================================================= (a) golden traces, fake
def test_every_scenario_has_a_golden_trace():
    assert sorted(p.stem for p in TRACES.glob("*.json")) == SCENARIOS
    for p in TRACES.glob("*.json"):
        assert p.stat().st_size < 100_000, p
        assert ct.load_trace(p)["format"] == ct.FORMAT


@pytest.mark.parametrize("name", SCENARIOS)
def test_fake_matches_golden_trace(name, fake_models):
    expected = ct.load_trace(TRACES / f"{name}.json")
    actual = ct.run_scenario(fake_comfy, name, fake_models)
    diffs = ct.compare(expected, actual)
    assert not diffs, f"fake ComfyUI deviates from the real trace {name}.json:\n  " + "\n  ".join(diffs)
    assert actual["summary"]["out_finite"]


def test_compare_reports_readable_differences():
    e = {"source": 1, "a": {"b": [1, 2, 3], "c": "x"}}
    a = {"source": 2, "a": {"b": [1, 5], "d": 1}}
    diffs = ct.compare(e, a)
    assert "a.b: length 2, expected 3" in diffs
    assert "a.b[1]: expected 2, got 5" in diffs
    assert any(d.startswith("a.c: missing") for d in diffs)
    assert any(d.startswith("a.d: unexpected") for d in diffs)
    assert not any("source" in d for d in diffs)


def test_row_pattern_sees_token_order():
    text = torch.randn(1, 1, 8).expand(2, 5, 8)
    img = torch.randn(2, 64, 8)
    assert ct.row_pattern(torch.cat([text, img], 1), "B,L,HD") == "S5+V64"
    assert ct.row_pattern(torch.cat([img, text], 1), "B,L,HD") == "V64+S5"
    assert ct.row_pattern(torch.cat([text, img], 1).reshape(2, 69, 2, 4).transpose(1, 2), "B,H,L,D") == "S5+V64"


# ============================================================================= (b) golden traces, real ComfyUI
@pytest.mark.comfyui
@pytest.mark.skipif(not real_comfy.comfy_available(), reason="needs a real ComfyUI checkout in COMFYUI_DIR")
@pytest.mark.parametrize("name", SCENARIOS)
def test_real_comfy_matches_golden_trace(name, real_models):
    actual = ct.run_scenario(real_comfy, name, real_models)
    path = TRACES / f"{name}.json"
    if os.environ.get("ATTNLAB_UPDATE_TRACES") == "1":
        ct.write_trace(path, actual)
        return
    diffs = ct.compare(ct.load_trace(path), actual)
    assert not diffs, (f"real ComfyUI ({actual['source']}) no longer matches {path.name}; if core changed on "
                       f"purpose, re-record with ATTNLAB_UPDATE_TRACES=1:\n  " + "\n  ".join(diffs))


# ============================================================================= override slot and backends
def _qkv(b=2, h=3, lq=5, lk=7, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g) for n in (lq, lk, lk)]


def _flat(t):
    b, h, l, d = t.shape
    return t.transpose(1, 2).reshape(b, l, h * d)


def test_override_gets_unwrapped_backend_and_guard():
    q, k, v = (_flat(t) for t in _qkv())
    seen = {}

    def override(func, *args, **kwargs):
        seen["func"] = func
        seen["args"] = len(args)
        seen["kwargs"] = sorted(kwargs)
        seen["guard"] = kwargs.get("_inside_attn_wrapper")
        return func(*args, **kwargs)

    to = {"optimized_attention_override": override}
    kwargs = {"transformer_options": to}
    out = fattn.attention_sub_quad(q, k, v, 3, **kwargs)
    assert seen["func"] is fattn.attention_sub_quad.__wrapped__
    assert seen["args"] == 4 and seen["guard"] is True
    assert seen["kwargs"] == ["_inside_attn_wrapper", "transformer_options"]
    assert "_inside_attn_wrapper" not in kwargs  # the caller's dict is untouched
    torch.testing.assert_close(out, fattn.attention_pytorch(q, k, v, 3))


def test_override_recursion_guard():
    q, k, v = (_flat(t) for t in _qkv())
    calls = {"n": 0}

    def calls_other_backend(func, *args, **kwargs):  # same kwargs -> guard present -> no recursion
        calls["n"] += 1
        return fattn.get_attention_function("pytorch")(*args, **kwargs)

    fattn.attention_sub_quad(q, k, v, 3, transformer_options={"optimized_attention_override": calls_other_backend})
    assert calls["n"] == 1

    depth = {"n": 0}

    def drops_guard(func, *args, **kwargs):  # without the guard the wrapped backend dispatches again
        depth["n"] += 1
        kwargs.pop("_inside_attn_wrapper")
        if depth["n"] < 3:
            return fattn.attention_pytorch(*args, **kwargs)
        return func(*args, **kwargs)

    fattn.attention_split(q, k, v, 3, transformer_options={"optimized_attention_override": drops_guard})
    assert depth["n"] == 3


def test_no_override_without_transformer_options():
    q, k, v = (_flat(t) for t in _qkv())

    def boom(func, *a, **kw):
        raise AssertionError("must not be called")

    fattn.attention_sub_quad(q, k, v, 3)  # no transformer_options at all
    fattn.attention_sub_quad(q, k, v, 3, transformer_options={})
    with pytest.raises(AssertionError):
        fattn.attention_sub_quad(q, k, v, 3, transformer_options={"optimized_attention_override": boom})


@pytest.mark.parametrize("name", ["pytorch", "sub_quad", "split"])
@pytest.mark.parametrize("skip_reshape", [False, True])
@pytest.mark.parametrize("skip_output_reshape", [False, True])
def test_backend_layouts(name, skip_reshape, skip_output_reshape):
    q4, k4, v4 = _qkv()
    ref = torch.nn.functional.scaled_dot_product_attention(q4, k4, v4)
    fn = fattn.get_attention_function(name)
    args = (q4, k4, v4) if skip_reshape else (_flat(q4), _flat(k4), _flat(v4))
    out = fn(*args, 3, skip_reshape=skip_reshape, skip_output_reshape=skip_output_reshape)
    torch.testing.assert_close(out, ref if skip_output_reshape else _flat(ref), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["pytorch", "sub_quad", "split"])
def test_backend_v_as_b_l_h_d_and_masks(name):
    q4, k4, v4 = _qkv(lq=70, lk=70)
    fn = fattn.get_attention_function(name)
    ref = _flat(torch.nn.functional.scaled_dot_product_attention(q4, k4, v4))
    out = fn(_flat(q4), _flat(k4), v4.transpose(1, 2), heads=3)  # SD3: v is (B, L, H, D)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    bias = torch.randn(70, 70)
    ref_m = _flat(torch.nn.functional.scaled_dot_product_attention(q4, k4, v4, attn_mask=bias))
    for m in (bias, bias[None].expand(2, -1, -1), bias[None, None].expand(2, 3, -1, -1), bias[None, None]):
        torch.testing.assert_close(fn(_flat(q4), _flat(k4), _flat(v4), 3, m), ref_m, atol=1e-5, rtol=1e-5)
    keep = torch.rand(70, 70) > 0.3
    keep[:, 0] = True
    ref_b = _flat(torch.nn.functional.scaled_dot_product_attention(q4, k4, v4, attn_mask=keep))
    torch.testing.assert_close(fn(_flat(q4), _flat(k4), _flat(v4), 3, mask=keep), ref_b, atol=1e-5, rtol=1e-5)


def test_registry():
    assert fattn.get_attention_function("optimized") is fattn.optimized_attention is fattn.attention_sub_quad
    assert fattn.get_attention_function("pytorch") is fattn.attention_pytorch
    assert fattn.get_attention_function("nope", default=None) is None
    with pytest.raises(KeyError):
        fattn.get_attention_function("nope")
    fattn.register_attention_function("pytorch", fattn.attention_split)  # first registration wins
    assert fattn.get_attention_function("pytorch") is fattn.attention_pytorch
    assert sorted(fattn.REGISTERED_ATTENTION_FUNCTIONS)[:3] == ["pytorch", "split", "sub_quad"]


def test_model_bound_backend_is_what_the_override_sees():
    seen = set()

    def spy(func, *args, **kwargs):
        seen.add(func.__name__)
        return func(*args, **kwargs)

    for backend_name, fn_name in (("sub_quad", "attention_sub_quad"), ("pytorch", "attention_pytorch")):
        seen.clear()
        mp = fake_comfy.build_fake_model("flux", attention_backend=backend_name)
        mp.model_options["transformer_options"]["optimized_attention_override"] = spy
        fake_comfy.sample_tiny(mp, "flux", steps=1, cfg=1.0)
        assert seen == {fn_name}


# ============================================================================= ModelPatcher semantics
class _Ctx:
    pass


class _CloneAware:
    def __init__(self):
        self.clones = 0

    def on_model_patcher_clone(self):
        n = _CloneAware()
        n.clones = self.clones + 1
        return n


def test_clone_semantics(backend, models):
    base = _tiny(backend, models, "sd15")
    a = base.clone()
    obj, fn, att, aware = _Ctx(), (lambda: None), _Ctx(), _CloneAware()
    a.model_options["transformer_options"]["attnlab_obj"] = obj
    a.model_options["transformer_options"]["attnlab_fn"] = fn
    a.set_attachments("attnlab_att", att)
    a.set_attachments("attnlab_aware", aware)
    a.add_wrapper_with_key(backend.WrappersMP.APPLY_MODEL, "attnlab_k", fn)
    clone_seen = []
    a.add_callback_with_key("on_clone", "attnlab_k", lambda old, new: clone_seen.append((old, new)))
    b = a.clone()
    assert b.model is a.model
    assert b.model_options is not a.model_options
    assert b.model_options["transformer_options"]["attnlab_obj"] is not obj  # deep-copied
    assert b.model_options["transformer_options"]["attnlab_fn"] is fn  # functions survive deepcopy
    assert b.get_attachment("attnlab_att") is att  # by reference
    assert b.get_attachment("attnlab_aware").clones == 1
    assert clone_seen == [(a, b)]
    b.add_wrapper_with_key(backend.WrappersMP.APPLY_MODEL, "attnlab_k", fn)
    assert len(a.get_wrappers(backend.WrappersMP.APPLY_MODEL, "attnlab_k")) == 1
    assert len(b.get_wrappers(backend.WrappersMP.APPLY_MODEL, "attnlab_k")) == 2
    b.remove_wrappers_with_key(backend.WrappersMP.APPLY_MODEL, "attnlab_k")
    assert b.get_all_wrappers(backend.WrappersMP.APPLY_MODEL) == []
    assert len(a.get_all_wrappers(backend.WrappersMP.APPLY_MODEL)) == 1
    assert base.get_all_wrappers(backend.WrappersMP.APPLY_MODEL) == []
    assert base.model_options == {"transformer_options": {}}


def test_patch_setters():
    mp = fake_comfy.build_fake_model("sd15")
    p1, p2, r = (lambda *a: a), (lambda *a: a), (lambda *a: a)
    mp.set_model_attn1_patch(p1)
    mp.set_model_attn1_patch(p2)
    mp.set_model_attn1_replace(r, "middle", 0, 0)
    mp.set_model_attn2_replace(r, "output", 1)
    mp.set_model_patch_replace(r, "dit", "double_block", 3)
    to = mp.model_options["transformer_options"]
    assert to["patches"]["attn1_patch"] == [p1, p2]
    assert to["patches_replace"]["attn1"] == {("middle", 0, 0): r}
    assert to["patches_replace"]["attn2"] == {("output", 1): r}
    assert to["patches_replace"]["dit"] == {("double_block", 3): r}
    post = lambda args: args["denoised"]  # noqa: E731
    mp.set_model_sampler_post_cfg_function(post, disable_cfg1_optimization=True)
    assert mp.model_options["sampler_post_cfg_function"] == [post]
    assert mp.model_options["disable_cfg1_optimization"] is True
    mp.set_model_sampler_cfg_function(lambda c, u, s: c)
    assert callable(mp.model_options["sampler_cfg_function"])
    mp.add_object_patch("diffusion_model.input_blocks.1.1.forward", p1)
    assert mp.object_patches == {"diffusion_model.input_blocks.1.1.forward": p1}
    assert fake_comfy.WrappersMP.APPLY_MODEL == "apply_model"
    assert fake_comfy.WrappersMP.DIFFUSION_MODEL == "diffusion_model"
    assert fake_comfy.WrappersMP.OUTER_SAMPLE == "outer_sample"


# ============================================================================= sampling semantics
def _record_applies(backend, mp, order=None):
    calls = []

    def mk(tag):
        def wrapper(executor, *args, **kwargs):
            if order is not None:
                order.append(tag)
            if tag == "inner":
                x, t, c_concat, c_crossattn, control, to = args
                calls.append({"n_args": len(args), "kw": sorted(kwargs), "class_obj": type(executor.class_obj).__name__,
                              "cond_or_uncond": list(to["cond_or_uncond"]), "x": tuple(x.shape),
                              "sigmas": tuple(to["sigmas"].shape), "sample_sigmas": to["sample_sigmas"].clone(),
                              "uuids": len(to["uuids"]), "ctx": c_crossattn.clone(),
                              "pass": to.get("attnlab_pass")})
            return executor(*args, **kwargs)
        return wrapper

    mp.add_wrapper_with_key(backend.WrappersMP.APPLY_MODEL, "attnlab_outer", mk("outer"))
    mp.add_wrapper_with_key(backend.WrappersMP.APPLY_MODEL, "attnlab_inner", mk("inner"))
    return calls


@pytest.mark.parametrize("cfg,kw,expected", [
    (4.0, {}, [[1, 0], [1, 0]]),
    (1.0, {}, [[0], [0]]),
    (1.0, {"disable_cfg1_optimization": True}, [[1, 0], [1, 0]]),
    (4.0, {"split_calls": True}, [[1], [0], [1], [0]]),
])
def test_batching_negative_first(backend, models, cfg, kw, expected):
    mp = _tiny(backend, models, "sd15").clone()
    order = []
    calls = _record_applies(backend, mp, order)
    pos, neg = backend.conditioning("sd15", seed=5)
    out = backend.sample_tiny(mp, "sd15", steps=2, cfg=cfg, batch=2, positive=pos, negative=neg, **kw)
    assert torch.isfinite(out).all()
    assert [c["cond_or_uncond"] for c in calls] == expected
    assert order[:2] == ["outer", "inner"]  # first added = outermost
    for c in calls:
        chunks = len(c["cond_or_uncond"])
        assert c["n_args"] == 6 and c["kw"] == [] and c["class_obj"] == "BaseModel"
        assert c["x"] == (2 * chunks, 4, 16, 16)
        assert c["sigmas"] == (2,)  # one per latent row, not per chunk
        assert c["uuids"] == chunks
        assert len(c["sample_sigmas"]) == 3 and float(c["sample_sigmas"][-1]) == 0.0
        for i, which in enumerate(c["cond_or_uncond"]):  # rows = chunks in cond_or_uncond order, each the whole batch
            src = (pos if which == 0 else neg)[0][0]
            torch.testing.assert_close(c["ctx"][2 * i:2 * i + 2], src.expand(2, -1, -1))


def test_post_cfg_extra_pass(backend, models):
    mp = _tiny(backend, models, "sd15").clone()
    calls = _record_applies(backend, mp)
    seen = []

    def post_cfg(args):
        seen.append(sorted(args))
        mo = dict(args["model_options"])
        mo["transformer_options"] = dict(mo["transformer_options"], attnlab_pass="perturbed")
        (ptb,) = backend.calc_cond_batch(args["model"], [args["cond"]], args["input"], args["sigma"], mo)
        assert ptb.shape == args["input"].shape
        return args["denoised"]

    mp.set_model_sampler_post_cfg_function(post_cfg)
    backend.sample_tiny(mp, "sd15", steps=2, cfg=4.0, batch=1)
    assert seen[0] == ["cond", "cond_denoised", "cond_scale", "denoised", "input", "model", "model_options", "sigma",
                       "uncond", "uncond_denoised"]
    assert [(c["cond_or_uncond"], c["pass"]) for c in calls] == [([1, 0], None), ([0], "perturbed")] * 2
    assert "attnlab_pass" not in mp.model_options["transformer_options"]


def test_per_call_options_do_not_leak(backend, models):
    mp = _tiny(backend, models, "flux").clone()

    def writer(executor, x, t, c_concat, c_crossattn, control, to, **kw):
        assert "attnlab_written" not in to
        to["attnlab_written"] = True
        to["optimized_attention_override"] = lambda func, *a, **k: func(*a, **k)
        return executor(x, t, c_concat, c_crossattn, control, to, **kw)

    mp.add_wrapper_with_key(backend.WrappersMP.APPLY_MODEL, "attnlab_w", writer)
    backend.sample_tiny(mp, "flux", steps=2, cfg=3.0)
    assert mp.model_options["transformer_options"] == {}


def test_unet_replace_skips_override_and_extra_options():
    mp = fake_comfy.build_fake_model("sd15")
    seen = {"attn": 0, "extra": None}

    def override(func, *args, **kwargs):
        seen["attn"] += 1
        return func(*args, **kwargs)

    def replace(q, k, v, extra_options):
        seen["extra"] = extra_options
        return v

    mp.model_options["transformer_options"]["optimized_attention_override"] = override
    mp.set_model_attn1_replace(replace, "middle", 0, 0)
    fake_comfy.sample_tiny(mp, "sd15", steps=1, cfg=4.0)
    assert seen["attn"] == 13
    ex = seen["extra"]
    assert ex["block"] == ("middle", 0) and ex["block_index"] == 0 and ex["transformer_index"] == 2
    assert ex["n_heads"] == 2 and ex["dim_head"] == 32 and ex["attn_precision"] is None
    assert "patches" not in ex and "patches_replace" not in ex and "optimized_attention_override" in ex


def test_direct_apply_model_runs_no_patcher_wrappers():
    mp = fake_comfy.build_fake_model("sd15")
    hit = []
    mp.add_wrapper_with_key(fake_comfy.WrappersMP.APPLY_MODEL, "attnlab", lambda e, *a, **k: hit.append(1) or e(*a, **k))
    x = torch.randn(1, 4, 16, 16)
    out = mp.model.apply_model(x, torch.ones(1), c_crossattn=torch.randn(1, 7, 32), transformer_options={})
    assert out.shape == x.shape and hit == []


@pytest.mark.parametrize("family", fake_comfy.FAMILIES)
def test_fake_output_depends_on_attention(family):
    mp = fake_comfy.build_fake_model(family)
    base = fake_comfy.sample_tiny(mp, family, steps=1, cfg=1.0)
    m2 = mp.clone()
    m2.model_options["transformer_options"]["optimized_attention_override"] = (
        lambda func, *a, **k: func(*a, **k) * 0.5)
    changed = fake_comfy.sample_tiny(m2, family, steps=1, cfg=1.0)
    m3 = mp.clone()
    m3.model_options["transformer_options"]["optimized_attention_override"] = lambda func, *a, **k: func(*a, **k)
    same = fake_comfy.sample_tiny(m3, family, steps=1, cfg=1.0)
    assert torch.isfinite(base).all()
    assert (changed - base).abs().max() > 1e-3
    torch.testing.assert_close(same, base, rtol=0, atol=0)


def test_family_names_shared_with_real_helpers():
    assert real_comfy.FAMILIES == fake_comfy.FAMILIES
    assert set(ct.SCENARIOS[n]["family"] for n in ct.SCENARIOS) == set(fake_comfy.FAMILIES)
    for fam in fake_comfy.FAMILIES:
        assert real_comfy._configs(fam)[0] == type(fake_comfy.build_fake_base_model(fam).model_config).__name__


def test_sampling_wrapper_points(backend, models):
    """Every wrapper/callback point a pack may hook: call order, positional arity, class_obj (values from
    ComfyUI v0.3.64)."""
    mp = _tiny(backend, models, "sd15").clone()
    W = backend.WrappersMP
    log = []

    def wrapper(name):
        def fn(executor, *args, **kwargs):
            log.append((name, len(args), tuple(sorted(kwargs)), type(executor.class_obj).__name__,
                        tuple(type(a).__name__ for a in args)))
            return executor(*args, **kwargs)
        return fn

    for name in ("OUTER_SAMPLE", "SAMPLER_SAMPLE", "PREDICT_NOISE", "CALC_COND_BATCH", "APPLY_MODEL",
                 "DIFFUSION_MODEL", "PREPARE_SAMPLING"):
        mp.add_wrapper_with_key(getattr(W, name), "attnlab", wrapper(name))
    for cb in ("on_pre_run", "on_cleanup", "on_prepare_state"):
        mp.add_callback_with_key(cb, "attnlab", lambda *a, cb=cb: log.append((cb, tuple(type(x).__name__ for x in a))))
    backend.sample_tiny(mp, "sd15", steps=1, cfg=4.0)
    assert log == [
        ("OUTER_SAMPLE", 8, (), "CFGGuider", ("Tensor", "Tensor", "KSAMPLER", "Tensor", "NoneType", "NoneType", "bool", "int")),
        ("PREPARE_SAMPLING", 3, ("model_options",), "NoneType", ("ModelPatcher", "Size", "dict")),
        ("on_pre_run", ("ModelPatcher",)),
        ("SAMPLER_SAMPLE", 8, (), "KSAMPLER", ("CFGGuider", "Tensor", "dict", "NoneType", "Tensor", "Tensor", "NoneType", "bool")),
        ("PREDICT_NOISE", 4, (), "CFGGuider", ("Tensor", "Tensor", "dict", "int")),
        ("CALC_COND_BATCH", 5, (), "NoneType", ("BaseModel", "list", "Tensor", "Tensor", "dict")),
        ("on_prepare_state", ("ModelPatcher", "Tensor")),
        ("APPLY_MODEL", 6, (), "BaseModel", ("Tensor", "Tensor", "NoneType", "Tensor", "NoneType", "dict")),
        ("DIFFUSION_MODEL", 6, (), "UNetModel", ("Tensor", "Tensor", "Tensor", "NoneType", "NoneType", "dict")),
        ("on_cleanup", ("ModelPatcher",)),
    ]
