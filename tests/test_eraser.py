"""Attentive Eraser (AAS + SARG) at the effect level on synthetic attention calls: the invariants of
specs/attentive_eraser.md A.1.2, A.1.5, A.4.1 and A.5 (kernel equivalence with the official two-softmax
blend, zero mass on object keys, locality, skip guards, similarity suppression schedule, joint layouts,
mask preprocessing, default layers, per-row and existing call masks, SARG arithmetic)."""

import numpy as np
import pytest
import torch

from attnlab.processors import AttentionCall, Effect, EffectStack, Site, StepInfo, TokenLayout
from attnlab.processors.eraser import AttentiveEraser, as_mask_tensor, default_layers, dilate, sarg, token_mask
from attnlab.processors.reference import attention_probs, sdpa_kernel

LAYER = 3
SELF = Site("pixart", "self", LAYER, f"transformer_blocks.{LAYER}.attn1")
SD3_JOINT = Site("sd3", "joint", LAYER, f"transformer_blocks.{LAYER}.attn")
FLUX_JOINT = Site("flux", "joint", LAYER, f"transformer_blocks.{LAYER}.attn")
DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: 1e-6, torch.float64: 1e-12}
GRID = (1, 4, 6)  # non-square on purpose
ROLES = ("cond", "redirected")


def pixel_mask(h=32, w=48, box=(8, 20, 12, 30), batch=1):
    """A float (B, 1, h, w) mask with one rectangle [r0:r1, c0:c1] = 1."""
    m = torch.zeros(batch, 1, h, w)
    r0, r1, c0, c1 = box
    m[..., r0:r1, c0:c1] = 1.0
    return m


def make_call(b=2, h=3, grid=GRID, d=8, dtype=torch.float32, roles=ROLES, site=SELF, text=0, text_first=False,
              step=0, mask=None, scale=None, seed=0, gain=2.0):
    g = torch.Generator().manual_seed(seed)
    n_img = grid[0] * grid[1] * grid[2]
    n = n_img + text
    q = torch.randn(b, h, n, d, generator=g, dtype=torch.float64).to(dtype) * gain
    k = torch.randn(b, h, n, d, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(b, h, n, d, generator=g, dtype=torch.float64).to(dtype)
    if text and text_first:
        img, txt = slice(text, n), slice(0, text)
    elif text:
        img, txt = slice(0, n_img), slice(n_img, n)
    else:
        img, txt = slice(0, n), None
    tokens = TokenLayout(q_image=img, q_text=txt, k_image=img, k_text=txt, grid=grid, text_first=text_first)
    return AttentionCall(q, k, v, site, tokens, roles, StepInfo(step, 20, 1.0, 999.0), mask, scale)


def eraser(mask=None, site=SELF, **kw):
    e = AttentiveEraser(pixel_mask() if mask is None else mask, **kw)
    e.validate()
    e.check_sites([(site, 3)])
    assert e.applies(site)
    return e


def run(effect, call, kernel=sdpa_kernel):
    return EffectStack([effect]).run(call, kernel)


def plain(call):
    return sdpa_kernel(call.q, call.k, call.v, call.mask, call.scale)


def obj_tokens(effect, grid=GRID):
    return token_mask(effect.mask, grid)  # bool [B_mask, N_img]


# --- the official semantics, written independently: two softmaxes, blended by rows ------------------------
def official_blend(call, obj, lam, ss_on, mask_text_queries=True, rows=None):
    """AAS.py attn_batch: sim = q·kᵀ·scale; bias = finfo.min on object keys; sim_fg = λ·sim + bias,
    sim_bg = sim + bias; out = out_fg·m + out_bg·(1 − m) row-wise. Returns the redirected rows' outputs.
    obj: bool [R or 1, N_img]. Text keys are never biased; text queries get the bias iff mask_text_queries.
    An existing call mask is added to both (unscaled)."""
    t = call.tokens
    rows = call.rows_with("redirected") if rows is None else rows
    dt = call.q.dtype
    scale = call.default_scale()
    outs = []
    for r_i, b in enumerate(rows):
        m_img = obj[r_i if obj.shape[0] > 1 else 0]
        q, k, v = call.q[b], call.k[b], call.v[b]
        sim = (q @ k.transpose(-1, -2)) * scale  # [H, Nq, Nk]
        nq, nk = sim.shape[-2:]
        key_obj = torch.zeros(nk, dtype=torch.bool)
        key_obj[t.k_image] = m_img
        biased_rows = torch.zeros(nq, dtype=torch.bool)
        biased_rows[t.q_image] = True
        if t.q_text is not None and mask_text_queries:
            biased_rows[t.q_text] = True
        bias = torch.zeros(nq, nk, dtype=dt)
        bias[biased_rows[:, None] & key_obj[None, :]] = torch.finfo(dt).min
        extra = 0.0
        if call.mask is not None:
            cm = call.mask
            cm = cm[b] if cm.ndim == 4 and cm.shape[0] == call.batch and call.batch > 1 else cm
            cm = cm.reshape(cm.shape[-3:] if cm.ndim >= 3 else cm.shape)
            extra = torch.zeros(cm.shape, dtype=dt).masked_fill(~cm, float("-inf")) if cm.dtype == torch.bool else cm
        fg_rows = torch.zeros(nq, dtype=torch.bool)
        fg_rows[t.q_image] = m_img
        lam_eff = lam if ss_on else 1.0
        out_fg = torch.softmax(lam_eff * sim + bias + extra, -1) @ v
        out_bg = torch.softmax(sim + bias + extra, -1) @ v
        fg = fg_rows.to(dt)[None, :, None]
        outs.append(out_fg * fg + out_bg * (1 - fg))
    return torch.stack(outs)


class Probe(Effect):
    """Innermost ('kernel' stage) observer: records what reaches the host kernel and computes the
    probabilities explicitly."""

    stage = "kernel"
    name = "probe"

    def __init__(self):
        self.seen = []

    def __call__(self, call, attend):
        p = attention_probs(call.q, call.k, call.mask, call.scale)
        self.seen.append((call, p))
        return p @ call.v


# --- 1. kernel equivalence (A.5.3) ------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", ["gather", "bias"])
@pytest.mark.parametrize("step", [0, 15])  # SS on / off
@pytest.mark.parametrize("scale", [None, 0.2])
def test_kernel_equivalence_with_official_blend(dtype, kernel, step, scale):
    call = make_call(dtype=dtype, step=step, scale=scale)
    e = eraser(kernel=kernel, ss_scale=0.3, ss_steps=9)
    out = run(e, call)
    ref = official_blend(call, obj_tokens(e), 0.3, step <= 9)
    assert (out[1] - ref[0]).abs().max() <= TOL[dtype]
    assert torch.equal(out[0], sdpa_kernel(call.q[[0]], call.k[[0]], call.v[[0]], None, scale)[0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_and_bias_kernels_agree(dtype):
    call = make_call(b=3, roles=("redirected", "cond", "redirected"), dtype=dtype, seed=4)
    a = run(eraser(kernel="gather"), call)
    b = run(eraser(kernel="bias"), call)
    assert (a - b).abs().max() <= TOL[dtype]


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_form_agrees():
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except Exception as exc:  # pragma: no cover - old torch
        pytest.skip(f"no FlexAttention: {exc}")
    call = make_call(step=0)
    e = eraser(ss_scale=0.3)
    obj = obj_tokens(e)[0]
    keep = ~obj[None].expand(1, -1)
    row_scale = torch.where(obj, 0.3, 1.0)[None]

    def mask_mod(b, h, q_idx, kv_idx):
        return keep[b, kv_idx]

    def score_mod(score, b, h, q_idx, kv_idx):
        return score * row_scale[b, q_idx]

    q, k, v = (x[[1]] for x in (call.q, call.k, call.v))
    n = q.shape[-2]
    try:
        block = create_block_mask(mask_mod, 1, None, n, n, device="cpu")
        flex = flex_attention(q, k, v, score_mod=score_mod, block_mask=block)
    except Exception as exc:
        pytest.skip(f"FlexAttention not supported on CPU in torch {torch.__version__}: {type(exc).__name__}: {exc}")
    ours = run(e, call)[1]
    assert (flex[0] - ours).abs().max() <= 1e-6
    assert (flex[0] - official_blend(call, obj[None], 0.3, True)[0]).abs().max() <= 1e-6


# --- 2. zero attention mass on object keys (A.5.4) --------------------------------------------------------
@pytest.mark.parametrize("kernel", ["gather", "bias"])
@pytest.mark.parametrize("text,text_first,site", [(0, False, SELF), (5, False, SD3_JOINT), (5, True, FLUX_JOINT)])
def test_zero_mass_on_object_keys(kernel, text, text_first, site):
    call = make_call(text=text, site=site, text_first=text_first)
    e = eraser(kernel=kernel, site=site, layers=[LAYER])
    probe = Probe()
    out = EffectStack([e, probe]).run(call, sdpa_kernel)
    obj = obj_tokens(e)[0]
    red = [(c, p) for c, p in probe.seen if c.roles == ("redirected",)]
    assert len(red) == 1
    c, p = red[0]
    t = call.tokens
    if kernel == "bias":
        assert p.shape[-1] == call.kv_len
        assert (p[..., t.k_image][..., obj] == 0).all()
        assert (p[..., t.k_image][..., ~obj] > 0).all()
    else:  # the gathered keys are exactly the background image keys (+ all text keys)
        keep = torch.ones(call.kv_len, dtype=torch.bool)
        keep[t.k_image] = ~obj
        assert c.k.shape[-2] == int(keep.sum())
        assert torch.equal(c.k[0], call.k[1][..., keep, :])
        assert torch.equal(c.v[0], call.v[1][..., keep, :])
        # the layout handed down describes the gathered keys
        assert c.tokens.k_image.stop - c.tokens.k_image.start == int((~obj).sum())
        if text:
            assert c.tokens.k_text.stop - c.tokens.k_text.start == text
            assert torch.equal(c.k[0][..., c.tokens.k_text, :], call.k[1][..., t.k_text, :])
    assert torch.allclose(p.sum(-1), torch.ones((), dtype=p.dtype), atol=1e-6)
    assert torch.isfinite(out).all()


# --- 3. locality and skip guards (A.5.1, A.5.5, A.5.8) ----------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_plain_rows_bitwise(dtype):
    roles = ("uncond", "redirected", "cond", "redirected")
    call = make_call(b=4, roles=roles, dtype=dtype)
    out = run(eraser(), call)
    plain_rows = [0, 2]
    ref = sdpa_kernel(call.q[plain_rows], call.k[plain_rows], call.v[plain_rows])
    assert torch.equal(out[plain_rows], ref)


@pytest.mark.parametrize("kernel", ["gather", "bias"])
@pytest.mark.parametrize("case", ["empty_mask", "no_redirected", "roles_none", "full_cover", "before_start",
                                  "cross_len"])
def test_untouched_calls_are_bitwise_plain(kernel, case):
    mask = pixel_mask()
    roles, step, kw = ROLES, 0, {}
    if case == "empty_mask":
        mask = torch.zeros_like(mask)
    elif case == "no_redirected":
        roles = ("cond", "uncond")
    elif case == "roles_none":
        roles = None
    elif case == "full_cover":
        mask = torch.ones_like(mask)
    elif case == "before_start":
        step, kw = 2, {"start_step": 3}
    call = make_call(roles=roles, step=step)
    if case == "cross_len":
        call = call.replace(k=call.k[..., :-2, :], v=call.v[..., :-2, :])
    e = eraser(mask=mask, kernel=kernel, **kw)
    assert torch.equal(run(e, call), plain(call))


def test_full_cover_at_coarse_grid_only_skips_that_layer():
    """A mask touching every token of a coarse grid (max-pool) but not of a fine one: coarse layer skipped."""
    m = torch.zeros(1, 1, 32, 48)
    m[..., ::8, ::8] = 1.0  # one pixel in every 8×8 cell
    e = eraser(mask=m)
    coarse = make_call(grid=(1, 4, 6))
    assert token_mask(e.mask, (1, 4, 6)).all()
    assert torch.equal(run(e, coarse), plain(coarse))
    fine = make_call(grid=(1, 8, 12))
    assert not torch.equal(run(e, fine)[1], plain(fine)[1])


def test_start_step():
    e = eraser(start_step=3)
    for step in (0, 2):
        call = make_call(step=step)
        assert torch.equal(run(e, call), plain(call))
    call = make_call(step=3)
    ref = official_blend(call, obj_tokens(e), 0.3, True)
    assert (run(e, call)[1] - ref[0]).abs().max() <= 1e-6


# --- 4. similarity suppression (A.1.2) --------------------------------------------------------------------
@pytest.mark.parametrize("kernel", ["gather", "bias"])
def test_ss_schedule_and_rows(kernel):
    e = eraser(kernel=kernel, ss_scale=0.3, ss_steps=9)
    e_no_ss = eraser(kernel=kernel, ss_scale=1.0, ss_steps=9)
    obj = obj_tokens(e)[0]
    for step in (0, 9, 10, 30):
        call = make_call(step=step)
        out, out1 = run(e, call), run(e_no_ss, call)
        # background query rows do not depend on λ (bitwise)
        assert torch.equal(out[1][:, ~obj], out1[1][:, ~obj])
        if step <= 9:  # inclusive bound: steps 0..9 = 10 steps
            assert e.ss_active(call.step)
            assert (out[1][:, obj] - out1[1][:, obj]).abs().max() > 1e-3
        else:
            assert not e.ss_active(call.step)
            assert torch.equal(out, out1)
    assert not eraser(ss_steps=-1).ss_active(StepInfo(0))


def test_ss_scale_changes_only_temperature():
    """λ on object rows equals attending with q·λ (score_mod form) over the background keys."""
    call = make_call(dtype=torch.float64)
    e = eraser(ss_scale=0.5)
    obj = obj_tokens(e)[0]
    out = run(e, call)[1]
    q, k, v = call.q[1], call.k[1][:, ~obj], call.v[1][:, ~obj]
    ref = torch.softmax(0.5 * q[:, obj] @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, -1) @ v
    assert (out[:, obj] - ref).abs().max() <= 1e-12


# --- 5. joint layouts (A.4.3) -----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("text_first,site", [(False, SD3_JOINT), (True, FLUX_JOINT)])
@pytest.mark.parametrize("mask_text_queries", [True, False])
@pytest.mark.parametrize("kernel", ["gather", "bias"])
def test_joint_layouts(dtype, text_first, site, mask_text_queries, kernel):
    call = make_call(text=7, text_first=text_first, site=site, dtype=dtype, seed=2)
    e = eraser(site=site, kernel=kernel, mask_text_queries=mask_text_queries, layers=[LAYER])  # FLUX: doubles opt-in
    out = run(e, call)
    ref = official_blend(call, obj_tokens(e), 0.3, True, mask_text_queries=mask_text_queries)
    assert (out[1] - ref[0]).abs().max() <= TOL[dtype]
    t = call.tokens
    if not mask_text_queries:  # text queries see every key: plain attention for them
        full = sdpa_kernel(call.q[[1]], call.k[[1]], call.v[[1]])[0]
        assert (out[1][:, t.q_text] - full[:, t.q_text]).abs().max() <= TOL[dtype]
    else:
        full = sdpa_kernel(call.q[[1]], call.k[[1]], call.v[[1]])[0]
        assert (out[1][:, t.q_text] - full[:, t.q_text]).abs().max() > 1e-4
    assert torch.equal(out[0], sdpa_kernel(call.q[[0]], call.k[[0]], call.v[[0]])[0])


def test_joint_text_keys_stay_open():
    call = make_call(text=7, site=SD3_JOINT)
    e = eraser(site=SD3_JOINT, kernel="bias")
    probe = Probe()
    EffectStack([e, probe]).run(call, sdpa_kernel)
    _, p = [(c, p) for c, p in probe.seen if c.roles == ("redirected",)][0]
    assert (p[..., call.tokens.k_text] > 0).all()


# --- 6. mask preprocessing (A.1.5) ------------------------------------------------------------------------
def naive_token_mask(mask, h, w):
    """Token (r, c) covers pixels [floor(r·H/h), ceil((r+1)·H/h)) × [...]: object if any pixel is."""
    m = mask[0, 0] > 0.5
    H, W = m.shape
    out = torch.zeros(h, w, dtype=torch.bool)
    for r in range(h):
        for c in range(w):
            r0, r1 = (r * H) // h, -(-(r + 1) * H // h)
            c0, c1 = (c * W) // w, -(-(c + 1) * W // w)
            out[r, c] = m[r0:r1, c0:c1].any()
    return out.flatten()


@pytest.mark.parametrize("hw,grid", [((32, 48), (1, 4, 6)), ((37, 53), (1, 5, 7)), ((64, 64), (1, 3, 9)),
                                     ((30, 90), (1, 6, 4)), ((33, 47), (2, 4, 6))])
def test_token_mask_any_pixel_and_aspect(hw, grid):
    g = torch.Generator().manual_seed(hw[0])
    m = (torch.rand(1, 1, *hw, generator=g) > 0.97).float()
    tm = token_mask(m, grid)
    assert tm.dtype == torch.bool and tm.shape == (1, grid[0] * grid[1] * grid[2])
    one = naive_token_mask(m, grid[1], grid[2])
    assert torch.equal(tm[0], one.repeat(grid[0]))
    # a single object pixel marks exactly one token
    single = torch.zeros(1, 1, *hw)
    single[..., hw[0] // 2, hw[1] // 3] = 1
    assert token_mask(single, (1, grid[1], grid[2])).sum() >= 1


def blob_mask(h=64, w=96, seed=1):
    """A few filled discs (objects of realistic size, not isolated pixels)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    m = torch.zeros(h, w, dtype=torch.bool)
    for _ in range(3):
        cy, cx = torch.randint(0, h, (1,), generator=g).item(), torch.randint(0, w, (1,), generator=g).item()
        r = torch.randint(5, 12, (1,), generator=g).item()
        m |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    return m.float()[None, None]


def test_token_mask_monotone_under_dilation():
    m = blob_mask()
    prev = None
    for px in (0, 1, 2, 3, 5, 8, 15):
        d = dilate(m, px)
        assert (d >= m).all(), px
        for grid in ((1, 8, 12), (1, 16, 24), (1, 5, 7)):
            tm = token_mask(d, grid)
            assert (tm >= token_mask(m, grid)).all()
            if prev is not None:
                assert (tm >= token_mask(prev, grid)).all(), (px, grid)
        prev = d


@pytest.mark.parametrize("px", [2, 15])
def test_dilate_never_removes_thin_objects(px):
    dot = torch.zeros(1, 1, 64, 64)
    dot[..., 32, 32] = 1.0
    line = torch.zeros(1, 1, 128, 128)
    line[..., :, 60:63] = 1.0
    assert (dilate(dot, px) >= dot).all() and (dilate(line, px) >= line).all()
    assert int(dilate(line, px)[0, 0, 64].sum()) >= 3 + 2 * (px - 1)


@pytest.mark.parametrize("px", [2, 3, 5, 15])
def test_dilate_growth_on_straight_edge(px):
    m = torch.zeros(1, 1, 64, 128)
    m[..., :, :40] = 1.0
    d = dilate(m, px)
    growth = int(d[0, 0, 32].sum()) - 40
    assert abs(growth - px) <= 1, growth
    assert torch.equal(dilate(m, 0), m)
    assert set(d.unique().tolist()) <= {0.0, 1.0}


def test_as_mask_tensor_accepted_forms():
    from PIL import Image

    arr = np.zeros((20, 30), dtype=np.uint8)
    arr[5:10, 8:20] = 255
    want = torch.from_numpy(arr > 127).float()[None, None]
    forms = [
        Image.fromarray(arr),                           # PIL L
        Image.fromarray(arr).convert("RGB"),            # PIL RGB
        arr,                                            # (H, W) uint8 0/255
        arr > 0,                                        # (H, W) bool
        (arr > 0).astype(np.uint8),                     # (H, W) 0/1 ints
        arr.astype(np.float32) / 255.0,                 # (H, W) float
        np.repeat(arr[..., None], 3, -1),               # (H, W, 3)
        arr[..., None],                                 # (H, W, 1)
        torch.from_numpy(arr > 0),                      # bool tensor
        torch.from_numpy(arr / 255.0)[None],            # (1, H, W) float64
        torch.from_numpy(arr / 255.0)[None, None],      # (1, 1, H, W)
    ]
    for f in forms:
        t = as_mask_tensor(f)
        assert t.dtype == torch.float32 and t.shape == (1, 1, 20, 30), type(f)
        assert torch.equal(t, want), type(f)
    batch = as_mask_tensor(torch.stack([want[0], 1 - want[0]]))
    assert batch.shape == (2, 1, 20, 30)
    # anti-aliased edges: thresholded at 0.5
    soft = torch.tensor([[0.0, 0.49], [0.5, 1.0]])
    assert torch.equal(as_mask_tensor(soft)[0, 0], torch.tensor([[0.0, 0.0], [1.0, 1.0]]))


@pytest.mark.parametrize("bad,msg", [
    (None, "needs a mask"),
    ("mask.png", "PIL image, numpy array or torch tensor"),
    (np.array([["a", "b"], ["c", "d"]]), "boolean or numeric"),
    (torch.full((8, 8), float("nan")), "NaN"),
    (torch.full((8, 8), float("inf")), "NaN or infinite"),
    (torch.zeros(8, 8, dtype=torch.complex64), "real"),
    (np.zeros((8, 8), dtype=np.complex128), "boolean or numeric"),
    (torch.zeros(8), "shape"),
    (torch.zeros(2, 3, 8, 8), "shape"),
    (torch.zeros(1, 1, 1, 8, 8), "shape"),
    (torch.zeros(1, 1), "too small"),
])
def test_as_mask_tensor_rejects(bad, msg):
    with pytest.raises(ValueError, match=msg):
        as_mask_tensor(bad)


def test_as_mask_tensor_integer_arrays_and_tensors_agree():
    a = np.zeros((8, 8), dtype=np.int64)
    a[2:4, 2:4] = 100
    assert torch.equal(as_mask_tensor(a), as_mask_tensor(torch.from_numpy(a)))


def test_mask_count_mismatch_is_an_error():
    m = torch.cat([pixel_mask(box=(0, 10, 0, 16)), pixel_mask(box=(16, 32, 24, 48)), pixel_mask()])
    call = make_call(b=2, roles=("redirected", "redirected"))
    with pytest.raises(ValueError):
        run(eraser(mask=m), call)


# --- 7. default layers (A.1.6, A.5.9) ---------------------------------------------------------------------
def unet_sites(down, mid, up, comfy=False):
    """Self/cross sites for a UNet with `down`/`mid`/`up` transformer blocks, in execution order."""
    sites, layer = [], 0
    names = ("input_blocks", "middle_block", "output_blocks") if comfy else ("down_blocks", "mid_block", "up_blocks")
    for sec, count in zip(names, (down, mid, up)):
        for i in range(count):
            prefix = f"{sec}.{i // 2}.attentions.{i % 2}.transformer_blocks.0" if not comfy else f"{sec}.{i}.1.transformer_blocks.0"
            sites.append(Site("unet", "self", layer, prefix + ".attn1"))
            sites.append(Site("unet", "cross", layer, prefix + ".attn2"))
            layer += 1
    return sites


@pytest.mark.parametrize("comfy", [False, True])
@pytest.mark.parametrize("down,mid,up,want", [(6, 1, 9, range(7, 16)), (24, 10, 36, range(34, 70))])
def test_default_layers_unet(comfy, down, mid, up, want):
    sites = unet_sites(down, mid, up, comfy)
    self_sites = [s for s in sites if s.kind == "self"]
    assert default_layers(self_sites) == list(want)
    e = AttentiveEraser(pixel_mask())
    e.check_sites([(s, 5) for s in sites])
    assert sorted(s.layer for s in self_sites if e.applies(s)) == list(want)
    assert not any(e.applies(s) for s in sites if s.kind == "cross")


def test_default_layers_dits():
    flux = [Site("flux", "joint", i, f"transformer_blocks.{i}.attn") for i in range(3)]
    flux += [Site("flux", "single", 3 + i, f"single_transformer_blocks.{i}.attn") for i in range(4)]
    assert default_layers(flux) == [3, 4, 5, 6]
    sd3 = [Site("sd3", "joint", i, f"transformer_blocks.{i}.attn") for i in range(5)]
    assert default_layers(sd3) == [2, 3, 4]
    pix = [Site("pixart", "self", i, f"transformer_blocks.{i}.attn1") for i in range(4)]
    assert default_layers(pix) == [2, 3]


def test_explicit_layers_and_install_guard():
    sites = [(Site("pixart", "self", i, f"transformer_blocks.{i}.attn1"), 4) for i in range(6)]
    e = AttentiveEraser(pixel_mask(), layers="L1-2")
    with pytest.raises(ValueError, match="install"):
        e.applies(sites[0][0])
    e.check_sites(sites)
    assert [s.layer for s, _ in sites if e.applies(s)] == [1, 2]
    e = AttentiveEraser(pixel_mask(), layers=[0, 5])
    e.check_sites(sites)
    assert [s.layer for s, _ in sites if e.applies(s)] == [0, 5]
    with pytest.raises(ValueError):
        AttentiveEraser(pixel_mask(), layers="L9").check_sites(sites)
    with pytest.raises(ValueError, match="no self-attention"):
        AttentiveEraser(pixel_mask()).check_sites([(Site("pixart", "cross", 0, "x.attn2"), 4)])


@pytest.mark.parametrize("kw", [{"ss_scale": 0.0}, {"ss_scale": 1.5}, {"ss_scale": float("nan")},
                                {"ss_steps": -2}, {"start_step": -1}, {"kernel": "flash"}])
def test_validate_rejects(kw):
    with pytest.raises(ValueError):
        AttentiveEraser(pixel_mask(), **kw).validate()
    with pytest.raises(ValueError):
        AttentiveEraser(pixel_mask(), dilate_px=-1).validate()


# --- 8. per-row masks and existing call masks -------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", ["gather", "bias"])
def test_per_row_masks(dtype, kernel):
    m = torch.cat([pixel_mask(box=(0, 10, 0, 16)), pixel_mask(box=(16, 32, 24, 48))])
    roles = ("cond", "redirected", "uncond", "redirected")
    call = make_call(b=4, roles=roles, dtype=dtype)
    e = eraser(mask=m, kernel=kernel)
    obj = obj_tokens(e)
    assert not torch.equal(obj[0], obj[1])
    out = run(e, call)
    ref = official_blend(call, obj, 0.3, True)
    assert (out[[1, 3]] - ref).abs().max() <= TOL[dtype]
    # one row with an empty mask: that row is plain attention
    m2 = torch.cat([pixel_mask(), torch.zeros_like(pixel_mask())])
    out2 = run(eraser(mask=m2, kernel=kernel), call)
    assert (out2[3] - sdpa_kernel(call.q[[3]], call.k[[3]], call.v[[3]])[0]).abs().max() <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", ["gather", "bias"])
@pytest.mark.parametrize("kind", ["bool_keys", "bool_full", "additive_keys", "additive_full", "shared"])
def test_existing_call_mask_combined(dtype, kernel, kind):
    n = GRID[0] * GRID[1] * GRID[2]
    g = torch.Generator().manual_seed(7)
    keep = torch.rand(2, 1, 1, n, generator=g) > 0.25
    keep[..., 0] = True  # a background key (token 0 is outside the object box) stays visible
    full = torch.rand(2, 1, n, n, generator=g) > 0.25
    full[..., 0] = True
    if kind == "bool_keys":
        mask = keep
    elif kind == "bool_full":
        mask = full
    elif kind == "additive_keys":
        mask = (torch.randn(2, 1, 1, n, generator=g) * 0.5).to(dtype)
    elif kind == "additive_full":
        mask = torch.zeros(2, 1, n, n, dtype=dtype).masked_fill(~full, float("-inf"))
    else:
        mask = full[:1]  # broadcast over rows
    call = make_call(dtype=dtype, mask=mask, seed=3)
    e = eraser(kernel=kernel)
    assert not obj_tokens(e)[0][0]
    out = run(e, call)
    ref = official_blend(call, obj_tokens(e), 0.3, True)
    assert (out[1] - ref[0]).abs().max() <= TOL[dtype]
    m0 = mask[[0]] if mask.shape[0] == 2 else mask
    assert torch.equal(out[0], sdpa_kernel(call.q[[0]], call.k[[0]], call.v[[0]], m0)[0])


# --- 9. SARG (A.1.3, A.5.7) -------------------------------------------------------------------------------
def test_sarg_formula_and_endpoints():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64).unbind(0)
    assert torch.equal(sarg(a, b, 0.0), a)
    assert torch.allclose(sarg(a, b, 1.0), b, atol=1e-15)
    assert torch.allclose(sarg(a, b, 9.0), a + 9.0 * (b - a), atol=1e-14)
    assert torch.allclose(sarg(a, b, 9.0), -8.0 * a + 9.0 * b, atol=1e-13)


@pytest.mark.parametrize("s", [1.0, 3.0, 9.0])
def test_sarg_affine_across_prediction_spaces(s):
    g = torch.Generator().manual_seed(1)
    x, eps, eps_aas = torch.randn(3, 1, 4, 8, 8, generator=g, dtype=torch.float64).unbind(0)
    sigma = 2.5
    x0 = lambda e: x - sigma * e  # noqa: E731  (x0 = x − σε; flow: x0 = x − σ·v, same form)
    guided_eps = sarg(eps, eps_aas, s)
    guided_x0 = sarg(x0(eps), x0(eps_aas), s)
    assert torch.allclose(x0(guided_eps), guided_x0, atol=1e-12)
    # back to ε from x0 space
    assert torch.allclose((x - guided_x0) / sigma, guided_eps, atol=1e-12)
