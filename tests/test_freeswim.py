"""FreeSwim (specs/freeswim.md §B.5): the inward window's mask identities and key counts, the kernels'
agreement (dense / chunked / flex in tiled and raster order), the token order, the logit scale, and the
dual path through the diffusers host on tiny offline pipelines (Wan, FLUX, SD3, SD1.5): a covering window
equals stock, the override is bit-exact and the window rows' own text attention is never evaluated, the
cache schedule, one latent surviving, removal restoring stock, the two-stage pipeline, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from attnlab.models.tiny import build_tiny_pipeline, denoiser_of, output_tensor, tiny_call_kwargs
from attnlab.pipelines.freeswim import FreeSwimPipeline, freeswim
from attnlab.processors.call import AttentionCall, Site, StepInfo, TokenLayout
from attnlab.processors.effects import EffectStack
from comfy_pass_tools import Probe
from attnlab.processors.freeswim import FreeSwim, FreeSwimLogitScale, check_target_size, freeswim_effects
from attnlab.processors.freeswim_window import (FlexWindow, WindowSpec, block_density, chunked_window_attention,
                                                decode_raster, decode_tiled, dense_window_attention, half_widths,
                                                image_mask, sdpa_kernel, sequence_mask, tiled_order)
from attnlab.processors.host_diffusers import Session


# ------------------------------------------------------------------------------------------ mask maths
def official_mask(t, h, w, dh, dw, inward=True):
    """FreeSwim's `get_mask` as the spec writes it (b/u/r/l inward shifts; all four 0 = the "w/o inward"
    ablation), over raster tokens."""
    n = t * h * w
    idx = torch.arange(n)
    _, qy, qx = decode_raster(idx, (t, h, w))
    on = int(inward)
    b = (dh - qy).clamp_min(0) * on
    u = (dh + qy - h + 1).clamp_min(0) * on
    r = (dw - qx).clamp_min(0) * on
    left = (dw + qx - w + 1).clamp_min(0) * on
    ky, kx = qy[None, :], qx[None, :]
    lo_y, hi_y = (qy - dh - u)[:, None], (qy + dh + b)[:, None]
    lo_x, hi_x = (qx - dw - left)[:, None], (qx + dw + r)[:, None]
    return (ky >= lo_y) & (ky <= hi_y) & (kx >= lo_x) & (kx <= hi_x)


def natten_mask(t, h, w, dh, dw):
    """NATTEN clamped-centre neighbourhood (attention-gym `generate_natten`), full temporal kernel."""
    idx = torch.arange(t * h * w)
    _, y, x = decode_raster(idx, (t, h, w))
    if 2 * dh + 1 <= h:
        cy = y.clamp(dh, h - 1 - dh)
        my = (y[None, :] - cy[:, None]).abs() <= dh
    else:
        my = torch.ones(len(idx), len(idx), dtype=torch.bool)
    if 2 * dw + 1 <= w:
        cx = x.clamp(dw, w - 1 - dw)
        mx = (x[None, :] - cx[:, None]).abs() <= dw
    else:
        mx = torch.ones(len(idx), len(idx), dtype=torch.bool)
    return my & mx


@pytest.mark.parametrize("t", [1, 2, 3])
def test_inward_mask_equals_official_and_natten_with_exact_key_counts(t):
    for h in (1, 2, 3, 5, 8):
        for w in (1, 2, 5, 8):
            for dh in range(0, 5):
                for dw in (0, 1, 3):
                    ours = image_mask((t, h, w), (dh, dw))
                    assert torch.equal(ours, official_mask(t, h, w, dh, dw)), (t, h, w, dh, dw)
                    assert torch.equal(ours, natten_mask(t, h, w, dh, dw)), (t, h, w, dh, dw)
                    counts = ours.sum(1)
                    expected = t * min(2 * dh + 1, h) * min(2 * dw + 1, w)
                    assert bool((counts == expected).all()), (t, h, w, dh, dw)
                    spec = WindowSpec((t, h, w), (dh, dw), slice(0, t * h * w))
                    assert spec.keys_per_query() == expected
                    if 2 * dh + 1 >= h and 2 * dw + 1 >= w:
                        assert bool(ours.all()) and spec.covers_grid


def test_truncated_window_ablation_is_the_official_mask_without_shifts():
    for h, w, dh, dw in [(5, 7, 1, 2), (8, 3, 3, 0), (4, 4, 5, 5), (9, 9, 2, 2)]:
        ours = image_mask((2, h, w), (dh, dw), inward=False)
        assert torch.equal(ours, official_mask(2, h, w, dh, dw, inward=False))
        spec = WindowSpec((2, h, w), (dh, dw), slice(0, 2 * h * w), inward=False)
        assert spec.covers_grid == bool(ours.all())
    corner = image_mask((1, 9, 9), (2, 2), inward=False).sum(1)
    assert int(corner[0]) == 9 and int(corner[40]) == 25  # cut at the border, full in the middle


def test_interior_windows_are_centred_and_translation_equivariant():
    t, h, w, dh, dw = 1, 11, 13, 2, 3
    m = image_mask((t, h, w), (dh, dw)).reshape(h, w, h, w)
    base = m[5, 6]
    ys, xs = base.nonzero(as_tuple=True)
    assert (int(ys.min()), int(ys.max()), int(xs.min()), int(xs.max())) == (3, 7, 3, 9)
    shifted = m[6, 7]
    assert torch.equal(shifted[1:, 1:], base[:-1, :-1])
    # a border query's window is shifted inward, not cut: same size as the interior one
    assert int(m[0, 0].sum()) == int(base.sum())
    ys0, xs0 = m[0, 0].nonzero(as_tuple=True)
    assert (int(ys0.max()), int(xs0.max())) == (4, 6)


def test_half_widths_follow_the_base_grid():
    assert half_widths((30, 52)) == (15, 26)  # Wan 480×832 → 31×53
    assert half_widths((64, 64)) == (32, 32)  # FLUX 1024² → 65×65
    assert half_widths((30, 52), 0.5) == (7, 13)
    assert half_widths((45, 80)) == (22, 40)  # Wan 14B 720×1280


# ------------------------------------------------------------------------------------------- token order
def test_tiled_order_is_a_padded_permutation_and_decodes():
    grid, tile = (2, 5, 7), (2, 4)
    index, (hp, wp) = tiled_order(grid, tile)
    assert (hp, wp) == (6, 8) and index.numel() == 2 * hp * wp
    real = index[index >= 0]
    assert torch.equal(real.sort().values, torch.arange(math.prod(grid)))
    pos = torch.arange(index.numel())
    t, y, x = decode_tiled(pos, grid, tile)
    keep = index >= 0
    rt, ry, rx = decode_raster(index[keep], grid)
    assert torch.equal(t[keep], rt) and torch.equal(y[keep], ry) and torch.equal(x[keep], rx)
    assert bool(((y[~keep] >= grid[1]) | (x[~keep] >= grid[2])).all())


def test_wan_token_order_through_the_models_patchify():
    """A coordinate-encoded patch embedding pushed through the tiny Wan transformer's own flatten: token i
    sits at (t, y, x) = decode_raster(i), and the host reports that grid."""
    pipe, _ = tiny("wan")
    den = denoiser_of(pipe)
    seen = {}

    def coords(module, args, out):
        b, c, t, h, w = out.shape
        tt, yy, xx = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
        fake = torch.zeros_like(out)
        fake[:, 0], fake[:, 1], fake[:, 2] = tt.float(), yy.float(), xx.float()
        return fake

    def grab(module, args, kwargs):
        seen.setdefault("x", (args[0] if args else kwargs["hidden_states"]).clone())

    h1 = den.patch_embedding.register_forward_hook(coords)
    h2 = den.blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    effects = freeswim_effects(logit_scale=0.0)
    try:
        with Session(pipe, effects) as session, torch.no_grad():
            pipe(**tiny_call_kwargs("wan", num_inference_steps=1, output_type="latent"))
            grid = session.state.grid
    finally:
        h1.remove()
        h2.remove()
    x = seen["x"][0]
    n = x.shape[0]
    assert n == math.prod(grid)
    t, y, xx = decode_raster(torch.arange(n), grid)
    assert torch.equal(x[:, 0].long(), t) and torch.equal(x[:, 1].long(), y) and torch.equal(x[:, 2].long(), xx)


# ------------------------------------------------------------------------------------------------ kernels
CASES = [((2, 7, 9), (2, 3), 0, True), ((1, 11, 6), (1, 5), 5, True), ((3, 5, 8), (1, 2), 4, False),
         ((1, 9, 9), (1, 1), 3, True), ((1, 4, 4), (3, 3), 0, True)]


def _spec(grid, half, n_text, text_first, inward=True):
    n_img = math.prod(grid)
    n = n_img + n_text
    image = slice(n_text, n) if text_first else slice(0, n_img)
    text = (slice(0, n_text) if text_first else slice(n_img, n)) if n_text else None
    return WindowSpec(grid, half, image, text, inward), n


@pytest.mark.parametrize("inward", [True, False])
@pytest.mark.parametrize("grid,half,n_text,text_first", CASES)
def test_backends_agree_fp32(grid, half, n_text, text_first, inward):
    spec, n = _spec(grid, half, n_text, text_first, inward)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, n, 16, generator=g) for _ in range(3))
    scale = 0.31
    ref = dense_window_attention(q, k, v, spec, scale)
    # explicit-softmax ground truth in fp64
    m = sequence_mask(spec, n)
    logits = (q.double() @ k.double().transpose(-1, -2)) * scale
    truth = torch.softmax(logits.masked_fill(~m, float("-inf")), -1) @ v.double()
    torch.testing.assert_close(ref.double(), truth, atol=1e-5, rtol=0)
    for tile in [(1, 1), (2, 3), (3, 5), None]:
        out = chunked_window_attention(q, k, v, spec, scale, tile=tile)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    for tile in ([(2, 4), (1, grid[2]), (4, 4)] if inward else [(2, 4)]):  # (1, W) is raster order
        out = FlexWindow(tile=tile, compile=False)(q, k, v, spec, scale)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_a_window_covering_the_grid_is_full_attention():
    spec, n = _spec((2, 4, 5), (9, 9), 3, True)
    q, k, v = (torch.randn(1, 2, n, 8) for _ in range(3))
    full = sdpa_kernel(q, k, v)
    assert torch.equal(chunked_window_attention(q, k, v, spec), full)
    torch.testing.assert_close(dense_window_attention(q, k, v, spec), full, atol=1e-6, rtol=0)


def test_chunked_memory_is_bounded_by_tile_times_window():
    """The chunked kernel never hands the kernel more than (T·th·tw) × (text + T·rect) scores."""
    spec, n = _spec((1, 40, 40), (3, 3), 4, True)
    q, k, v = (torch.randn(1, 1, n, 4) for _ in range(3))
    sizes = []

    def kernel(q2, k2, v2, mask, scale):
        sizes.append(q2.shape[-2] * k2.shape[-2])
        return sdpa_kernel(q2, k2, v2, mask, scale)

    chunked_window_attention(q, k, v, spec, None, kernel, tile=(4, 4), text_queries=False)
    assert max(sizes) <= (4 * 4) * (4 + (4 + 6) * (4 + 6))
    assert max(sizes) < n * n / 50


def test_dense_reference_refuses_long_sequences():
    spec, n = _spec((1, 100, 100), (3, 3), 0, True)
    q = torch.zeros(1, 1, n, 2)
    with pytest.raises(ValueError, match="dense window reference"):
        dense_window_attention(q, q, q, spec, limit=4096)


def test_tiled_order_improves_block_sparsity():
    # a 4× area grid at a quarter-size window (FLUX 2048² at 1024² base, scaled down 2× per axis)
    raster = block_density((1, 64, 64), (16, 16), None, n_text=0)
    tiled = block_density((1, 64, 64), (16, 16), (8, 16), n_text=0)
    assert tiled < raster


# ------------------------------------------------------------------------------------------- logit scale
def test_logit_scale_is_the_official_constant_tied_to_the_base_grid():
    d = 128
    grid = (21, 68, 120)
    layout = TokenLayout.at(grid, (4, 16, 16), (81, 480, 832), q_image=slice(0, 171360), k_image=slice(0, 171360))
    q = torch.zeros(1, 1, 1, d)
    call = AttentionCall(q, q, q, Site("wan", "self", 0, "blocks.0.attn1"), layout)
    lam = FreeSwimLogitScale().lam(call)
    official = math.sqrt(math.log(2 * 30 * 52, 30 * 52) / d)
    assert abs(lam / math.sqrt(d) - official) < 1e-12
    # 14B base (720×1280 → 45×80), not the hard-coded 30·52
    lam14 = FreeSwimLogitScale(base_size=(720, 1280)).lam(call)
    assert abs(lam14 - math.sqrt(1 + math.log(2) / math.log(45 * 80))) < 1e-12
    assert FreeSwimLogitScale(0.0).applies(Site("wan", "self", 0)) is False
    assert FreeSwimLogitScale().applies(Site("wan", "cross", 0)) is False


# --------------------------------------------------------------------------------------- the effect alone
def _cross_call(roles, n=12, t=5):
    g = torch.Generator().manual_seed(3)
    b = len(roles)
    q = torch.randn(b, 2, n, 8, generator=g)
    k, v = torch.randn(b, 2, t, 8, generator=g), torch.randn(b, 2, t, 8, generator=g)
    layout = TokenLayout(q_image=slice(0, n), k_text=slice(0, t), grid=(1, 3, 4))
    return AttentionCall(q, k, v, Site("wan", "cross", 0, "blocks.0.attn2"), layout, tuple(roles), StepInfo(0, 4, None, None, 0))


def test_cross_override_is_bit_exact_and_the_window_rows_text_attention_never_runs():
    swim = FreeSwim()
    below = Probe("kernel")
    above = Probe("observe")
    stack = EffectStack([above, swim, below])
    dup, plan = swim.plan_rows(("uncond", "cond"), StepInfo(0, 4, None, None, 0), ("x",))
    assert dup == [0, 1] and plan.modes == ("fresh", "fresh")
    call = _cross_call(("uncond", "cond", "full", "full"))
    with swim.active(plan):
        out = stack.run(call, sdpa_kernel)
    (seen, _), = below.calls
    assert seen.q.shape[0] == 2 and torch.equal(seen.q, call.q[2:])  # only the full rows were evaluated
    assert torch.equal(out[0], out[2]) and torch.equal(out[1], out[3])
    torch.testing.assert_close(out[2:], sdpa_kernel(call.q[2:], call.k[2:], call.v[2:]), atol=0, rtol=0)
    # without a plan (no dual path running) the call is the model's own
    assert torch.equal(EffectStack([swim]).run(_cross_call(("cond",)), sdpa_kernel),
                       sdpa_kernel(*(lambda c: (c.q, c.k, c.v))(_cross_call(("cond",)))))


def test_cache_schedule_and_uncond_semantics():
    swim = FreeSwim(cache_steps=3, override_uncond=False)
    modes = []
    for e in range(7):
        dup, plan = swim.plan_rows(("cond",), StepInfo(e, 10, None, None, 0), ("s",))
        modes.append(plan.modes[0])
        if plan.modes[0] == "fresh":
            call = _cross_call(("cond", "full"))
            with swim.active(plan):
                swim(call, lambda q, k, v, mask=None, **kw: sdpa_kernel(q, k, v))
        _, uplan = swim.plan_rows(("uncond",), StepInfo(e, 10, None, None, 0), ("s",))
        assert uplan.modes == ("own",)
    assert modes == ["fresh", "cached", "cached", "fresh", "cached", "cached", "fresh"]
    # a shape change or a new run invalidates the cache
    assert swim.plan_rows(("cond",), StepInfo(7, 10, None, None, 0), ("other",))[1].modes == ("fresh",)
    swim2 = FreeSwim(cache_steps=2)
    assert swim2.plan_rows(("cond",), StepInfo(1, 10, None, None, 0), ("s",))[1].modes == ("fresh",)  # nothing stored
    # a step before the previous plan's starts a new run: the stored overrides are dropped
    swim.cache[("blocks.0.attn2", "", ("cond", 0))] = torch.zeros(1)
    assert swim.plan_rows(("cond",), StepInfo(1, 10, None, None, 0), ("s",))[1].modes == ("fresh",)
    assert swim.cache == {} and list(swim.cache_meta) == [("cond", 0)]
    with pytest.raises(ValueError, match="cache_steps"):
        FreeSwim(cache_steps=0)


def test_cached_override_is_the_stored_tensor():
    swim = FreeSwim(cache_steps=2)
    attend = lambda q, k, v, mask=None, **kw: sdpa_kernel(q, k, v)  # noqa: E731
    _, plan0 = swim.plan_rows(("cond",), StepInfo(0, 4, None, None, 0), ("s",))
    call0 = _cross_call(("cond", "full"))
    with swim.active(plan0):
        out0 = swim(call0, attend)
    stored = swim.cache[("blocks.0.attn2", "", ("cond", 0))]
    assert torch.equal(stored, out0[1])
    _, plan1 = swim.plan_rows(("cond",), StepInfo(1, 4, None, None, 0), ("s",))
    assert plan1.modes == ("cached",)
    evaluated = []

    def counting(q, k, v, mask=None, **kw):
        evaluated.append(q.shape[0])
        return sdpa_kernel(q, k, v)

    call1 = _cross_call(("cond",))
    with swim.active(plan1):
        out1 = swim(call1, counting)
    assert evaluated == [] and torch.equal(out1[0], stored)
    assert swim.cache[("blocks.0.attn2", "", ("cond", 0))] is stored


def test_joint_lse_option_equals_text_stream_when_the_twins_match():
    """Option (b): with identical window and full rows, merging the windowed image partial with the full
    twin's text partial is exactly joint window attention (image keys windowed, text keys full)."""
    grid, n_text = (1, 6, 6), 4
    spec, n = _spec(grid, (1, 1), n_text, True)
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, n, 8, generator=g).repeat(2, 1, 1, 1) for _ in range(3))
    layout = TokenLayout(q_image=spec.image, k_image=spec.image, q_text=spec.text, k_text=spec.text, grid=grid,
                         scale=(1, 16, 16))
    call = AttentionCall(q, k, v, Site("flux", "joint", 0, "transformer_blocks.0.attn"), layout, ("cond", "full"))
    attend = lambda q2, k2, v2, mask=None, **kw: sdpa_kernel(q2, k2, v2, mask)  # noqa: E731
    outs = {}
    for mode in ("text_stream", "lse"):
        swim = FreeSwim(base_size=(48, 48), mmdit_override=mode)
        _, plan = swim.plan_rows(("cond",), StepInfo(0, 2, None, None, 0), ("s",))
        with swim.active(plan):
            outs[mode] = swim(call, attend)
    ref = dense_window_attention(q[:1], k[:1], v[:1], spec, None)
    torch.testing.assert_close(outs["text_stream"][0], ref[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(outs["lse"][0], ref[0], atol=1e-5, rtol=0)
    assert torch.equal(outs["text_stream"][0][:, spec.text], outs["text_stream"][1][:, spec.text])


# ------------------------------------------------------------------------------------ the diffusers host
STEPS = 2
#: base sizes whose window is smaller than the tiny models' grids (and one that covers them)
SMALL_BASE = {"wan": (48, 48), "flux": (24, 24), "sd3": (32, 32), "sd15": (32, 32), "sdxl": (32, 32)}
_PIPES: dict = {}


def tiny(family):
    if family not in _PIPES:
        pipe = build_tiny_pipeline(family)
        _PIPES[family] = (pipe, run(pipe, family))
    return _PIPES[family]


@pytest.fixture(scope="module", autouse=True)
def _release():
    yield
    _PIPES.clear()


def run(pipe, family, **kw):
    kw.setdefault("num_inference_steps", STEPS)
    args = tiny_call_kwargs(family, output_type="latent", **kw)
    with torch.no_grad():
        return output_tensor(pipe(**args))


def _close(a, b):
    torch.testing.assert_close(a, b, atol=1e-5 * max(1.0, float(b.abs().max())), rtol=0)


@pytest.mark.parametrize("family", ["wan", "flux", "sd3", "sd15"])
def test_covering_window_run_equals_stock_and_removal_restores_it(family):
    pipe, stock = tiny(family)
    before = dict(denoiser_of(pipe).attn_processors)
    with freeswim(pipe, logit_scale=0.0, base_size=(4096, 4096)) as swim:
        covered = run(pipe, family)
    _close(covered, stock)
    assert sum(h.full_rows for h in swim.hooks) > 0  # the dual path did run
    assert dict(denoiser_of(pipe).attn_processors) == before
    assert torch.equal(run(pipe, family), stock)


@pytest.mark.parametrize("family", ["wan", "flux", "sd3", "sd15"])
def test_window_run_changes_the_result_and_keeps_one_latent(family):
    pipe, stock = tiny(family)
    den = denoiser_of(pipe)
    batches = []

    def record(module, args, kwargs, out):
        x = args[0] if args else kwargs.get("hidden_states", kwargs.get("sample"))
        y = out[0] if isinstance(out, tuple) else out.sample
        batches.append((x.shape[0], y.shape[0]))

    handle = den.register_forward_hook(record, with_kwargs=True)
    try:
        with freeswim(pipe, base_size=SMALL_BASE[family]) as swim:
            out = run(pipe, family)
    finally:
        handle.remove()
    assert out.shape == stock.shape
    assert not torch.allclose(out, stock, atol=1e-4)
    assert swim.stats["window_calls"] > 0 and not swim.skipped
    # every forward handed back exactly its own rows (the window rows); the full twins never leave it
    assert batches and all(i == o for i, o in batches)
    assert swim.hooks[0].full_rows == sum(i for i, _ in batches)  # cache_steps=1: a twin for every row, every step


def test_wan_override_probe_bit_exact_and_cache_schedule():
    pipe, _ = tiny("wan")
    probe = Probe("observe")
    below = Probe("kernel")
    effects = freeswim_effects(logit_scale=1.0, base_size=SMALL_BASE["wan"], cache_steps=2, override_uncond=False)
    swim = effects[-1]
    effects = [probe, *effects, below]
    from attnlab.processors.host_diffusers.dual_pass import dual_pass

    with dual_pass(pipe, effects) as (session, hooks):
        run(pipe, "wan", num_inference_steps=4)
    cross = [(c, o) for c, o in probe.calls if c.site.kind == "cross"]
    fresh = [(c, o) for c, o in cross if "full" in c.roles]
    assert fresh, "the full branch never ran"
    for c, o in fresh:
        w, f = c.roles.index("cond"), c.roles.index("full")
        assert torch.equal(o[w], o[f])  # bit-exact override
    # cond pass: full rows only at executed steps 0 and 2; uncond pass: never (override_uncond=False)
    full_steps = sorted({c.step.executed for c, _ in cross if "full" in c.roles})
    assert full_steps == [0, 2]
    assert not any("full" in c.roles and "uncond" in c.roles for c, _ in cross)
    # below FreeSwim, cross-attention of a cond forward ran on its full twin only, and not at all when cached
    below_cross = [c for c, _ in below.calls if c.site.kind == "cross"]
    assert not any(c.roles == ("cond",) for c in below_cross)
    assert all(c.q.shape[0] == 1 for c in below_cross if c.roles == ("cond", "full"))
    assert swim.stats["cross_evaluated_rows"] == sum(1 for c, _ in cross if c.roles == ("uncond",))
    assert swim.stats["cache_hits"] > 0


def test_window_branch_uses_flex_and_chunked_alike_on_a_pipeline():
    pipe, _ = tiny("flux")
    outs = {}
    for backend in ("chunked", "dense"):
        with freeswim(pipe, base_size=SMALL_BASE["flux"], backend=backend):
            outs[backend] = run(pipe, "flux")
    _close(outs["chunked"], outs["dense"])


# -------------------------------------------------------------------------------------- the two-stage driver
@pytest.mark.parametrize("family,base,target", [("wan", (64, 64), (128, 128)), ("flux", (32, 32), (64, 64)),
                                                ("sd15", (32, 32), (64, 64))])
def test_two_stage_pipeline(family, base, target):
    pipe, _ = tiny(family)
    kw = tiny_call_kwargs(family)
    for key in ("height", "width", "output_type", "num_inference_steps"):
        kw.pop(key)
    swim = FreeSwimPipeline.from_pipe(pipe, base_size=base, cache_steps=2)
    with torch.no_grad():
        out = output_tensor(swim(height=target[0], width=target[1], num_inference_steps=4, output_type="latent", **kw))
    assert swim.last_base.shape[-2:] == target
    assert swim.extra_passes > 0
    if family == "wan":
        assert out.shape[-2:] == (target[0] // 8, target[1] // 8)
        assert swim.stage2.scheduler.config.shift == 9.0
    elif family == "sd15":
        assert out.shape[-2:] == (target[0] // 2, target[1] // 2)
    else:
        assert out.shape[1] == (target[0] // 4) * (target[1] // 4)
    assert dict(denoiser_of(pipe).attn_processors) == dict(denoiser_of(pipe).attn_processors)
    assert not any(type(p).__name__.startswith("Attnlab") for p in denoiser_of(pipe).attn_processors.values())


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_input_gives_clear_errors_before_patching():
    pipe, _ = tiny("wan")
    before = dict(denoiser_of(pipe).attn_processors)
    with pytest.raises(ValueError, match="window_scale"):
        FreeSwim(window_scale=0)
    with pytest.raises(ValueError, match="backend"):
        FreeSwim(backend="natten")
    with pytest.raises(ValueError, match="mmdit_override"):
        FreeSwim(mmdit_override="b")
    with pytest.raises(ValueError, match="multiple of"):
        with freeswim(pipe, base_size=(50, 64)):
            pass
    assert dict(denoiser_of(pipe).attn_processors) == before
    with pytest.raises(ValueError, match="multiples of 16"):
        check_target_size(1080, 1920, 16)
    swim = FreeSwimPipeline(pipe, base_size=(64, 64))
    with pytest.raises(ValueError, match="multiples of 16"):
        swim(prompt="x", height=100, width=128)
    with pytest.raises(ValueError, match="base_size"):
        FreeSwimPipeline(pipe, base_size=(60, 64))
    with pytest.raises(ValueError, match="strength"):
        FreeSwimPipeline(pipe, strength=0.0)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_mmdit_options_run_on_a_pipeline(family):
    """Option (b) (LSE split) runs end to end, and equals stock with a covering window (option (a) is the default
    of the other pipeline tests)."""
    pipe, stock = tiny(family)
    for mode in ("lse",):
        with freeswim(pipe, logit_scale=0.0, base_size=(4096, 4096), mmdit_override=mode):
            _close(run(pipe, family), stock)
        with freeswim(pipe, base_size=SMALL_BASE[family], mmdit_override=mode) as swim:
            out = run(pipe, family)
        assert torch.isfinite(out).all() and swim.stats["window_calls"] + swim.stats["full_calls"] > 0


def test_patch_alone_on_a_stock_wan_v2v_pipeline_tells_uncond_from_the_negative_prompt():
    """Wan V2V runs cond and uncond as separate forwards without a cache context: the hook recognises the
    uncond forward by the pipeline's negative prompt embedding, so override_uncond=False keeps it stock."""
    import diffusers

    pipe, _ = tiny("wan")
    v2v = diffusers.WanVideoToVideoPipeline(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder,
                                            transformer=pipe.transformer, vae=pipe.vae, scheduler=pipe.scheduler)
    v2v.set_progress_bar_config(disable=True)
    pe, ne = pipe.encode_prompt(prompt="a cat", negative_prompt="blurry", do_classifier_free_guidance=True,
                                max_sequence_length=tiny_call_kwargs("wan")["max_sequence_length"])
    video = torch.rand(1, 5, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    probe = Probe("observe")
    swim = FreeSwim(base_size=SMALL_BASE["wan"], cache_steps=2, override_uncond=False)
    from attnlab.processors.host_diffusers.dual_pass import dual_pass

    with dual_pass(v2v, [probe, swim]) as (_, hooks), torch.no_grad():
        out = v2v(video=video, prompt_embeds=pe, negative_prompt_embeds=ne, height=128, width=128,
                  num_inference_steps=6, strength=0.7, guidance_scale=5.0, output_type="latent",
                  generator=torch.Generator().manual_seed(0)).frames
    roles = {c.roles for c, _ in probe.calls if c.site.kind == "cross"}
    assert ("uncond",) in roles and ("cond", "full") in roles and ("cond",) in roles
    assert ("uncond", "full") not in roles
    assert out.shape[0] == 1 and hooks[0].full_rows == 2  # 4 executed steps, k = 2: cond twins at steps 0 and 2


def test_flex_backend_matches_chunked_through_the_host_on_cpu():
    pipe, _ = tiny("wan")
    outs = {}
    for backend in ("chunked", "flex"):
        with freeswim(pipe, base_size=SMALL_BASE["wan"], backend=backend, flex_tile=(2, 4)):
            outs[backend] = run(pipe, "wan")
    _close(outs["flex"], outs["chunked"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (compiled FlexAttention)")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_compiled_flex_on_cuda_agrees_with_chunked(dtype, tol):
    spec, n = _spec((2, 24, 40), (5, 9), 16, True)
    q, k, v = (torch.randn(1, 4, n, 64, device="cuda", dtype=dtype) for _ in range(3))
    flex = FlexWindow(tile=(8, 16))(q, k, v, spec)
    ref = chunked_window_attention(q.float(), k.float(), v.float(), spec)
    torch.testing.assert_close(flex.float(), ref, atol=tol, rtol=0)


def test_override_layer_and_step_ranges():
    swim = FreeSwim(override_steps=(0.25, 0.5), override_layers=[1])
    modes = [swim.plan_rows(("cond",), StepInfo(i, 8, None, None, 0), ("s",))[1].modes[0] for i in range(8)]
    assert modes == ["own", "own", "fresh", "fresh", "fresh", "own", "own", "own"]
    _, plan = swim.plan_rows(("cond",), StepInfo(2, 8, None, None, 0), ("s",))
    call = _cross_call(("cond", "full"))  # layer 0: not overridden, the window row keeps its own
    with swim.active(plan):
        out = swim(call, lambda q, k, v, mask=None, **kw: sdpa_kernel(q, k, v))
    assert not torch.equal(out[0], out[1])
    torch.testing.assert_close(out, sdpa_kernel(call.q, call.k, call.v), atol=0, rtol=0)
    call1 = call.replace(site=Site("wan", "cross", 1, "blocks.1.attn2"))
    with swim.active(plan):
        out1 = swim(call1, lambda q, k, v, mask=None, **kw: sdpa_kernel(q, k, v))
    assert torch.equal(out1[0], out1[1])
    with pytest.raises(ValueError, match="override_steps"):
        FreeSwim(override_steps=(0.6, 0.2))


def test_truncated_window_ablation_through_the_host():
    pipe, stock = tiny("flux")
    outs = {}
    for inward in (True, False):
        with freeswim(pipe, base_size=SMALL_BASE["flux"], inward=inward):
            outs[inward] = run(pipe, "flux")
    assert outs[True].shape == outs[False].shape == stock.shape
    assert not torch.allclose(outs[True], outs[False], atol=1e-5)


@pytest.mark.parametrize("family", ["wan", "sd15"])
def test_installed_but_inactive_is_bit_exact(family):
    """A covering window, no logit scale and no override step: the installed patch changes nothing, bit for bit
    (no twins are appended, every attention call reaches the host's kernel untouched)."""
    pipe, stock = tiny(family)
    with freeswim(pipe, logit_scale=0.0, base_size=(4096, 4096), override_steps=(1.0, 1.0)) as swim:
        out = run(pipe, family)
    assert torch.equal(out, stock)
    assert sum(h.full_rows for h in swim.hooks) == 0 and sum(h.forwards for h in swim.hooks) > 0
