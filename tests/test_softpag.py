"""SoftPAG / SoftUG / SoftSEG on synthetic attention calls: the invariants of
specs/softpag_headhunter.md §1.13 (off switch, endpoints, explicit-map equivalence, head and row
locality, linearity in u, joint semantics, token order), the explicit slow path, guidance arithmetic,
the guidance schedule, parameter validation and the head-set syntax."""

import pytest
import torch

from attnlab.processors import AttentionCall, EffectStack, Site, StepInfo, TokenLayout
from attnlab.processors.headsets import HeadSet, unet_groups
from attnlab.processors.reference import attention_probs, sdpa_kernel
from attnlab.processors.softpag import (
    GuidanceSchedule,
    SoftPAG,
    cond_correction,
    fisher_rao_path,
    perturbation_guidance,
)

LAYER = 3
SELF = Site("pixart", "self", LAYER, f"transformer_blocks.{LAYER}.attn1")
SD3_JOINT = Site("sd3", "joint", LAYER, f"transformer_blocks.{LAYER}.attn")
FLUX_JOINT = Site("flux", "joint", LAYER, f"transformer_blocks.{LAYER}.attn")
DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
ROLES4 = ("uncond", "perturbed", "cond", "perturbed")


def make_call(b=4, h=4, n=24, d=8, dtype=torch.float32, roles=ROLES4, site=SELF, tokens=None, scale=None,
              seed=0, mask=None, logit_gain=2.0):
    """Random q/k/v; `logit_gain` sharpens the maps so that targets really differ from plain attention."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n, d, generator=g, dtype=torch.float64).to(dtype) * logit_gain
    k = torch.randn(b, h, n, d, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(b, h, n, d, generator=g, dtype=torch.float64).to(dtype)
    if tokens is None:
        tokens = TokenLayout(q_image=slice(0, n), k_image=slice(0, n), grid=(1, 4, n // 4))
    return AttentionCall(q, k, v, site, tokens, roles, StepInfo(0, 10, 1.0, 999.0), mask, scale)


def run(effect, call):
    return EffectStack([effect]).run(call, sdpa_kernel)


def plain(call):
    return sdpa_kernel(call.q, call.k, call.v, call.mask, call.scale)


def sel(x, rows, heads):
    return x[torch.tensor(rows)[:, None], torch.tensor(heads)[None, :]]


def perturbed_rows(call):
    return [i for i, r in enumerate(call.roles) if r == "perturbed"]


# --- naive references (explicit maps, written independently of processors/softpag.py) --------------
def target_map(call, target):
    """The target attention map T for every row/head ([B, H, N, N], float64)."""
    q, k = call.q.double(), call.k.double()
    n = q.shape[-2]
    scale = call.scale if call.scale is not None else q.shape[-1] ** -0.5
    if target == "identity":
        return torch.eye(n, dtype=torch.float64).expand(q.shape[0], q.shape[1], n, n)
    if target == "uniform":
        return torch.full((q.shape[0], q.shape[1], n, n), 1.0 / n, dtype=torch.float64)
    if target == "mean_query":
        row = torch.softmax(q.mean(-2, keepdim=True) @ k.transpose(-1, -2) * scale, dim=-1)
        return row.expand(-1, -1, n, -1)
    if target == "max":
        logits = q @ k.transpose(-1, -2) * scale
        return torch.nn.functional.one_hot(logits.argmax(-1), n).double()
    raise AssertionError(target)


def slerp_sqrt(a, t, u):
    """Fisher–Rao geodesic via an orthonormal frame on the sphere of square-root maps."""
    sa, st = a.sqrt(), t.sqrt()
    cos = (sa * st).sum(-1, keepdim=True).clamp(-1, 1)
    theta = torch.arccos(cos)
    ortho = st - cos * sa
    norm = ortho.norm(dim=-1, keepdim=True)
    e = torch.where(norm > 1e-12, ortho / norm.clamp_min(1e-300), torch.zeros_like(ortho))
    return (torch.cos(u * theta) * sa + torch.sin(u * theta) * e) ** 2


def reference_output(call, rows, heads, u, target="identity", path="linear"):
    """((1-u)·A + u·T)·V on rows × heads (or the Fisher–Rao point), A·V elsewhere; float64 throughout."""
    q, k, v = call.q.double(), call.k.double(), call.v.double()
    a = attention_probs(q, k, None if call.mask is None else call.mask, call.scale)
    out = a @ v
    t = target_map(call, target)
    m = (1 - u) * a + u * t if path == "linear" else slerp_sqrt(a, t, u)
    mixed = m @ v
    r, h = torch.tensor(rows)[:, None], torch.tensor(heads)[None, :]
    out[r, h] = mixed[r, h]
    return out


# --- off switch and endpoints ----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("target", ["identity", "uniform", "mean_query"])
def test_off_switch_is_bit_exact(dtype, target):
    call = make_call(dtype=dtype)
    base = plain(call)
    assert torch.equal(run(SoftPAG({LAYER: "*"}, u=0.0, target=target), call), base)
    assert torch.equal(run(SoftPAG(HeadSet(), u=1.0, target=target), call), base)  # no heads: a no-op probe
    assert torch.equal(run(SoftPAG({LAYER + 1: "*"}, u=1.0, target=target), call), base)  # another layer
    no_ptb = call.replace(roles=("cond", "uncond", "cond", "uncond"))
    assert torch.equal(run(SoftPAG({LAYER: "*"}, u=1.0, target=target), no_ptb), plain(no_ptb))
    unknown = call.replace(roles=None)  # roles unknown: every row counts as "cond"
    assert torch.equal(run(SoftPAG({LAYER: "*"}, u=1.0, target=target), unknown), base)
    # and a real change happens with the same effect on perturbed rows (the test can fail)
    assert not torch.equal(run(SoftPAG({LAYER: "*"}, u=1.0, target=target), call), base)


def test_applies_only_where_it_can_act():
    e = SoftPAG({LAYER: [0]}, u=0.5)
    assert e.applies(SELF)
    assert not e.applies(Site("pixart", "cross", LAYER, "transformer_blocks.3.attn2"))
    assert not e.applies(Site("pixart", "self", LAYER + 1, "transformer_blocks.4.attn1"))
    assert not SoftPAG({LAYER: [0]}, u=0.0).applies(SELF)
    assert SoftPAG({LAYER: "*"}).applies(SD3_JOINT)
    assert SoftPAG({LAYER: "*"}).applies(Site("flux", "single", LAYER, "single_transformer_blocks.1.attn"))
    dual = Site("sd3", "self", LAYER, f"transformer_blocks.{LAYER}.attn2")
    assert not SoftPAG({LAYER: "*"}).applies(dual)
    assert SoftPAG({LAYER: "*"}, dual_attention=True).applies(dual)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_u1_identity_gives_v_bitwise_on_selected_heads(dtype):
    call = make_call(dtype=dtype)
    heads = [0, 2]
    out = run(SoftPAG({LAYER: heads}, u=1.0), call)
    rows = perturbed_rows(call)
    assert torch.equal(sel(out, rows, heads), sel(call.v, rows, heads))
    assert out.dtype == dtype


def test_endpoint_form_matters():
    """The spec's pitfall: O + u(V − O) is not V at u = 1, (1−u)O + uV is. Guards the chosen form."""
    call = make_call()
    o, v = plain(call), call.v
    assert not torch.equal(o + 1.0 * (v - o), v)
    assert torch.equal((1.0 - 1.0) * o + 1.0 * v, v)


# --- map-free forms vs explicit maps ---------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("target", ["identity", "uniform", "mean_query"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_fused_matches_explicit_map_reference(dtype, target, seed):
    g = torch.Generator().manual_seed(100 + seed)
    u = float(torch.rand((), generator=g, dtype=torch.float64))
    n_heads = 4
    heads = sorted(torch.randperm(n_heads, generator=g)[: 1 + seed % n_heads].tolist())
    scale = [None, 0.2, 0.5][seed - 1]
    call = make_call(dtype=dtype, seed=seed, h=n_heads, scale=scale)
    out = run(SoftPAG({LAYER: heads}, u=u, target=target), call)
    ref = reference_output(call, perturbed_rows(call), heads, u, target)
    err = (out.double() - ref).abs().max().item()
    assert err <= TOL[dtype], (target, u, heads, err)
    assert out.dtype == dtype
    # not vacuous: the perturbation moved the selected heads far more than the tolerance
    assert (sel(out, perturbed_rows(call), heads) - sel(plain(call), perturbed_rows(call), heads)).abs().max() > 1e-2


def masked_reference(call, keep, rows, heads, u, target):
    q, k, v = call.q.double(), call.k.double(), call.v.double()
    a = attention_probs(q, k, keep)
    if target == "uniform":
        t = (keep.double() / keep.double().sum(-1, keepdim=True)).expand_as(a)
    else:
        t = attention_probs(q.mean(-2, keepdim=True), k, keep[:1]).expand_as(a)
    ref = a @ v
    mixed = ((1 - u) * a + u * t) @ v
    r, h = torch.tensor(rows)[:, None], torch.tensor(heads)[None, :]
    ref[r, h] = mixed[r, h]
    return ref


def padded_call(dtype):
    n = 24
    keep = torch.ones(n, n, dtype=torch.bool)
    keep[:, 18:] = False  # the last keys are padding
    return make_call(dtype=dtype, mask=keep), keep


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("target", ["uniform", "mean_query"])
def test_masked_calls_take_the_explicit_route_for_uniform_and_mean_query(dtype, target):
    """With a key mask the uniform / mean-query targets only cover the allowed keys."""
    call, keep = padded_call(dtype)
    rows = perturbed_rows(call)
    out = run(SoftPAG({LAYER: [1, 3]}, u=0.6, target=target), call)
    ref = masked_reference(call, keep, rows, [1, 3], 0.6, target)
    assert (out.double() - ref).abs().max() <= 1e-5
    # a target over all keys (padding included) would be far off
    unmasked = reference_output(call.replace(mask=None), rows, [1, 3], 0.6, target)
    assert (sel(out, rows, [1, 3]).double() - sel(unmasked, rows, [1, 3])).abs().max() > 1e-2


@pytest.mark.parametrize("target", ["uniform", "mean_query"])
def test_masked_explicit_route_keeps_fp64_precision(target):
    call, keep = padded_call(torch.float64)
    out = run(SoftPAG({LAYER: [1, 3]}, u=0.6, target=target), call)
    ref = masked_reference(call, keep, perturbed_rows(call), [1, 3], 0.6, target)
    assert (out - ref).abs().max() <= 1e-12


# --- explicit slow path: max target and Fisher–Rao -------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("target,path", [("max", "linear"), ("identity", "fisher_rao"),
                                         ("uniform", "fisher_rao"), ("max", "fisher_rao")])
def test_explicit_path_matches_naive_maps(dtype, target, path):
    heads = [0, 3]
    for u in (0.3, 0.75):
        call = make_call(dtype=dtype, seed=7)
        out = run(SoftPAG({LAYER: heads}, u=u, target=target, path=path), call)
        ref = reference_output(call, perturbed_rows(call), heads, u, target, path)
        tol = 1e-5 if dtype == torch.float32 else 1e-10  # arccos/sqrt near the poles loses a few digits
        assert (out.double() - ref).abs().max().item() <= tol, (target, path, u)
        assert (sel(out, perturbed_rows(call), heads) - sel(plain(call), perturbed_rows(call), heads)).abs().max() > 1e-2


@pytest.mark.parametrize("target", ["identity", "uniform", "max"])
def test_explicit_path_endpoints(target):
    call = make_call(dtype=torch.float64, seed=4)
    rows, heads = perturbed_rows(call), [1, 2]
    base = plain(call)
    # u = 0 is off: the effect returns the kernel's output untouched
    assert torch.equal(run(SoftPAG({LAYER: heads}, u=0.0, target=target, path="fisher_rao"), call), base)
    # u = 1 reaches the target itself
    out = run(SoftPAG({LAYER: heads}, u=1.0, target=target, path="fisher_rao"), call)
    full_target = target_map(call, target) @ call.v.double()
    assert (sel(out, rows, heads) - sel(full_target, rows, heads)).abs().max() <= 1e-9
    if target == "identity":
        assert (sel(out, rows, heads) - sel(call.v, rows, heads)).abs().max() <= 1e-9


def test_fisher_rao_rows_stay_distributions():
    g = torch.Generator().manual_seed(5)
    a = torch.softmax(torch.randn(3, 2, 16, 16, generator=g, dtype=torch.float64) * 3, dim=-1)
    targets = {
        "identity": torch.eye(16, dtype=torch.float64).expand_as(a),
        "uniform": torch.full_like(a, 1 / 16),
        "random": torch.softmax(torch.randn(a.shape, generator=g, dtype=torch.float64), dim=-1),
    }
    for name, t in targets.items():
        assert torch.allclose(fisher_rao_path(a, t, 0.0), a, atol=1e-12), name
        assert torch.allclose(fisher_rao_path(a, t, 1.0), t, atol=1e-9), name
        for u in (0.1, 0.5, 0.9):
            m = fisher_rao_path(a, t, u)
            assert (m >= 0).all(), name
            assert torch.allclose(m.sum(-1), torch.ones_like(m.sum(-1)), atol=1e-12), (name, u)
            assert torch.allclose(m, slerp_sqrt(a, t, u), atol=1e-10), (name, u)
    # equal rows: the path stays put (no 0/0)
    assert torch.allclose(fisher_rao_path(a, a, 0.4), a, atol=1e-12)
    # fp32 rows stay distributions too
    m = fisher_rao_path(a.float(), targets["identity"].float(), 0.5)
    assert torch.allclose(m.sum(-1), torch.ones_like(m.sum(-1)), atol=1e-5)


@pytest.mark.parametrize("target,path", [("max", "linear"), ("identity", "fisher_rao")])
def test_explicit_path_token_limit(target, path):
    call = make_call(n=24)
    effect = SoftPAG({LAYER: [0]}, u=0.5, target=target, path=path, max_explicit_tokens=16)
    assert effect.explicit
    with pytest.raises(ValueError, match="max_explicit_tokens=16"):
        run(effect, call)
    ok = SoftPAG({LAYER: [0]}, u=0.5, target=target, path=path, max_explicit_tokens=24)
    run(ok, call)  # at the limit is fine
    # the map-free forms have no limit
    assert not SoftPAG({LAYER: [0]}, u=0.5, max_explicit_tokens=16).explicit
    run(SoftPAG({LAYER: [0]}, u=0.5, max_explicit_tokens=16), call)


def test_explicit_path_chunks_queries(monkeypatch):
    """The slow path is query-chunked; tiny chunks give the same result as one chunk."""
    import attnlab.processors.softpag as sp

    call = make_call(dtype=torch.float64, n=24, seed=9)
    effect = SoftPAG({LAYER: [0, 1]}, u=0.6, target="max", path="fisher_rao")
    whole = run(effect, call)
    monkeypatch.setattr(sp, "_EXPLICIT_CHUNK_ELEMENTS", 24 * 4 * 3)  # 3 query rows per chunk (2 rows x 2 heads)
    chunked = run(effect, call)
    assert torch.allclose(whole, chunked, atol=1e-13)


# --- locality and linearity ------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("target", ["identity", "uniform", "mean_query"])
def test_head_locality_and_order(dtype, target):
    call = make_call(dtype=dtype, h=6)
    base = plain(call)
    rows = perturbed_rows(call)
    out = run(SoftPAG([(LAYER, 4), (LAYER, 1)], u=0.7, target=target), call)
    others = [0, 2, 3, 5]
    assert torch.equal(out[:, others], base[:, others])
    for h in (1, 4):
        assert not torch.equal(sel(out, rows, [h]), sel(base, rows, [h])), h
    for order in ([(LAYER, 1), (LAYER, 4)], f"L{LAYER}:H4,H1", f"L{LAYER}:H1;L{LAYER}:H4", {LAYER: (4, 1)}):
        assert torch.equal(run(SoftPAG(order, u=0.7, target=target), call), out), order


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("target", ["identity", "uniform", "mean_query"])
def test_row_locality(dtype, target):
    call = make_call(dtype=dtype, roles=("cond", "perturbed", "uncond", "perturbed"))
    base = plain(call)
    out = run(SoftPAG({LAYER: "*"}, u=0.5, target=target), call)
    assert torch.equal(out[[0, 2]], base[[0, 2]])
    assert not torch.equal(out[1], base[1]) and not torch.equal(out[3], base[3])
    # the perturbed row's result does not depend on its neighbours or its position in the batch
    single = call.replace(q=call.q[1:2], k=call.k[1:2], v=call.v[1:2], roles=("perturbed",))
    assert torch.allclose(run(SoftPAG({LAYER: "*"}, u=0.5, target=target), single), out[1:2],
                          atol=TOL[dtype], rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("target", ["identity", "uniform", "mean_query"])
def test_linear_in_u_also_after_an_affine_output_projection(dtype, target):
    call = make_call(dtype=dtype, h=4, d=8)
    heads = [0, 3]
    out = {u: run(SoftPAG({LAYER: heads}, u=u, target=target), call) for u in (0.0, 0.35, 1.0)}
    lin = 0.65 * out[0.0] + 0.35 * out[1.0]
    assert (out[0.35] - lin).abs().max() <= TOL[dtype]
    g = torch.Generator().manual_seed(11)
    to_out = torch.nn.Linear(32, 16).to(dtype)
    with torch.no_grad():
        to_out.weight.copy_(torch.randn(16, 32, generator=g, dtype=torch.float64).to(dtype))
        to_out.bias.copy_(torch.randn(16, generator=g, dtype=torch.float64).to(dtype))

        def project(x):  # [B, H, N, D] -> [B, N, H·D] -> to_out, as the hosts do
            return to_out(x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1))

        lin_proj = 0.65 * project(out[0.0]) + 0.35 * project(out[1.0])
        assert (project(out[0.35]) - lin_proj).abs().max() <= 10 * TOL[dtype]
    # the interpolation really moves between two different endpoints
    assert (out[1.0] - out[0.0]).abs().max() > 1e-2


# --- joint attention -------------------------------------------------------------------------------
N_IMG, N_TXT = 16, 6


def joint_layout(text_first: bool) -> TokenLayout:
    n = N_IMG + N_TXT
    if text_first:
        image, text = slice(N_TXT, n), slice(0, N_TXT)
    else:
        image, text = slice(0, N_IMG), slice(N_IMG, n)
    return TokenLayout(q_image=image, k_image=image, q_text=text, k_text=text, grid=(1, 4, 4), text_first=text_first)


def joint_call(text_first: bool, dtype=torch.float32, scale=None, seed=3):
    site = FLUX_JOINT if text_first else SD3_JOINT
    return make_call(n=N_IMG + N_TXT, dtype=dtype, site=site, tokens=joint_layout(text_first), scale=scale,
                     seed=seed)


def image_only_mask(layout: TokenLayout, n: int, dtype) -> torch.Tensor:
    """diffusers' PAGJointAttnProcessor2_0 mask: −inf on image×image except its diagonal, 0 elsewhere."""
    m = torch.zeros(n, n, dtype=dtype)
    img = torch.arange(n)[layout.q_image]
    m[img[:, None], img[None, :]] = float("-inf")
    m[img, img] = 0.0
    return m


@pytest.mark.parametrize("text_first", [False, True], ids=["sd3-image-first", "flux-text-first"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_joint_full_mode_text_rows_equal_v_text(text_first, dtype):
    call = joint_call(text_first, dtype)
    rows, heads = perturbed_rows(call), [0, 2]
    out = run(SoftPAG({LAYER: heads}, u=1.0, joint="full"), call)
    t, i = call.tokens.q_text, call.tokens.q_image
    assert torch.equal(sel(out, rows, heads)[..., t, :], sel(call.v, rows, heads)[..., t, :])
    assert torch.equal(sel(out, rows, heads)[..., i, :], sel(call.v, rows, heads)[..., i, :])
    assert torch.equal(out[:, [1, 3]], plain(call)[:, [1, 3]])


def image_mode_reference(call):
    """Naive masked-softmax attention with the image→image block replaced by the identity (float64)."""
    mask = image_only_mask(call.tokens, call.q_len, torch.float64)
    q, k, v = call.q.double(), call.k.double(), call.v.double()
    explicit = attention_probs(q, k, mask, call.scale) @ v
    # the same map through SDPA's masked path agrees (the reference is not wrong by construction)
    assert torch.allclose(sdpa_kernel(q, k, v, mask, call.scale), explicit, atol=1e-12)
    return explicit


@pytest.mark.parametrize("text_first", [False, True], ids=["sd3-image-first", "flux-text-first"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [None, 0.3])
def test_joint_image_mode(text_first, dtype, scale):
    call = joint_call(text_first, dtype, scale=scale)
    rows, heads = perturbed_rows(call), [1, 2]
    base = plain(call)
    t, i = call.tokens.q_text, call.tokens.q_image
    masked = image_mode_reference(call)
    for u in (1.0, 0.4):
        out = run(SoftPAG({LAYER: heads}, u=u, joint="image"), call)
        assert out.dtype == dtype
        # text rows keep their own attention, bitwise
        assert torch.equal(out[..., t, :], base[..., t, :])
        # image rows: image→image block is the identity, image→text stays open (the image path computes in
        # fp32 by design, so fp32 tolerance here; fp64 precision is checked separately)
        want = (1 - u) * base.double() + u * masked
        got = sel(out, rows, heads)[..., i, :].double()
        assert (got - sel(want, rows, heads)[..., i, :]).abs().max() <= 1e-5, u
        # untouched heads and rows stay bitwise
        assert torch.equal(out[:, [0, 3]], base[:, [0, 3]])
        assert torch.equal(out[[0, 2]], base[[0, 2]])
    # image rows do not become V, and differ from the full identity (Appendix A: ~0.78 on random data)
    full = run(SoftPAG({LAYER: heads}, u=1.0, joint="full"), call)
    img_only = run(SoftPAG({LAYER: heads}, u=1.0, joint="image"), call)
    assert (sel(full, rows, heads)[..., i, :] - sel(img_only, rows, heads)[..., i, :]).abs().mean() > 0.1
    assert not torch.allclose(sel(img_only, rows, heads)[..., i, :], sel(call.v, rows, heads)[..., i, :], atol=1e-2)


@pytest.mark.parametrize("text_first", [False, True], ids=["sd3-image-first", "flux-text-first"])
def test_joint_image_mode_keeps_fp64_precision(text_first):
    call = joint_call(text_first, torch.float64)
    rows, heads = perturbed_rows(call), [1, 2]
    out = run(SoftPAG({LAYER: heads}, u=1.0, joint="image"), call)
    i = call.tokens.q_image
    want = sel(image_mode_reference(call), rows, heads)[..., i, :]
    assert (sel(out, rows, heads)[..., i, :] - want).abs().max() <= 1e-12


def test_joint_image_mode_without_text_falls_back_to_full_identity():
    """A call whose layout has no text keys (e.g. SD3.5 attn2) has no image→text block: plain identity."""
    call = make_call()
    rows = perturbed_rows(call)
    out = run(SoftPAG({LAYER: [0]}, u=1.0, joint="image"), call)
    assert torch.equal(sel(out, rows, [0]), sel(call.v, rows, [0]))


@pytest.mark.parametrize("joint,target", [("full", "identity"), ("full", "uniform"), ("full", "mean_query"),
                                          ("image", "identity")])
def test_token_order_robustness(joint, target):
    dtype = torch.float64
    a = joint_call(False, dtype, seed=21)  # [img, txt]
    perm = torch.cat([torch.arange(N_IMG, N_IMG + N_TXT), torch.arange(N_IMG)])  # -> [txt, img]
    b = a.replace(q=a.q[..., perm, :], k=a.k[..., perm, :], v=a.v[..., perm, :], tokens=joint_layout(True),
                  site=FLUX_JOINT)
    effect = SoftPAG({LAYER: [0, 3]}, u=0.6, target=target, joint=joint)
    out_a = run(effect, a)
    out_b = run(effect, b)
    assert torch.allclose(out_b, out_a[..., perm, :], atol=1e-12, rtol=0)
    assert not torch.allclose(out_a, plain(a), atol=1e-3)


# --- guidance arithmetic ---------------------------------------------------------------------------
def preds(dtype, seed=0, shape=(2, 4, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for _ in range(3))


@pytest.mark.parametrize("dtype", DTYPES)
def test_perturbation_guidance_formulas(dtype):
    c, u_, p = preds(dtype)
    s, w = 4.5, 2.5
    with_cfg = perturbation_guidance(c, p, w, uncond=u_, cfg_scale=s)
    want = u_.double() + s * (c.double() - u_.double()) + w * (c.double() - p.double())
    assert (with_cfg.double() - want).abs().max() <= 10 * TOL[dtype]
    no_cfg = perturbation_guidance(c, p, w)
    assert (no_cfg.double() - (c.double() + w * (c.double() - p.double()))).abs().max() <= 10 * TOL[dtype]
    # the paper's Eq. 5 form (1+w)ε − wε_ptb is the same thing
    assert (no_cfg.double() - ((1 + w) * c.double() - w * p.double())).abs().max() <= 10 * TOL[dtype]
    # uncond given but no CFG scale -> no CFG
    assert torch.equal(perturbation_guidance(c, p, w, uncond=u_), no_cfg)
    # w = 0 (or no perturbed prediction) returns the CFG result bitwise
    cfg = u_ + s * (c - u_)
    assert torch.equal(perturbation_guidance(c, p, 0.0, uncond=u_, cfg_scale=s), cfg)
    assert torch.equal(perturbation_guidance(c, None, w, uncond=u_, cfg_scale=s), cfg)
    assert torch.equal(perturbation_guidance(c, p, 0.0), c)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("s,w", [(4.5, 2.5), (1.5, 8.0), (7.0, 0.5)])
def test_cond_correction_folded_through_cfg(dtype, s, w):
    c, u_, p = preds(dtype, seed=1)
    folded = cond_correction(c, p, w, s)
    through_cfg = u_ + s * (folded - u_)  # what the pipeline does afterwards
    want = perturbation_guidance(c, p, w, uncond=u_, cfg_scale=s)
    mag = max(1.0, want.abs().max().item())
    assert (through_cfg.double() - want.double()).abs().max() <= 10 * TOL[dtype] * mag
    # without CFG the correction is the whole guidance
    assert torch.allclose(cond_correction(c, p, w, None), perturbation_guidance(c, p, w), atol=10 * TOL[dtype])
    # w = 0 hands back the conditional prediction untouched
    assert torch.equal(cond_correction(c, p, 0.0, s), c)


# --- guidance schedule -----------------------------------------------------------------------------
def test_schedule_default_is_every_step_including_step_0():
    sched = GuidanceSchedule(scale=3.0)
    assert [sched.scale_at(StepInfo(i, 20)) for i in range(20)] == [3.0] * 20


def test_schedule_window_bounds_are_inclusive():
    sched = GuidanceSchedule(scale=2.0, start=0.2, end=0.5)
    active = [i for i in range(10) if sched.scale_at(StepInfo(i, 10)) > 0]
    assert active == [2, 3, 4, 5]  # progress 0.2 and 0.5 are both in
    assert sched.scale_at(StepInfo(1, 10)) == 0.0 and sched.scale_at(StepInfo(6, 10)) == 0.0
    only_first = GuidanceSchedule(scale=2.0, start=0.0, end=0.0)
    assert [i for i in range(10) if only_first.scale_at(StepInfo(i, 10)) > 0] == [0]
    # unknown progress does not switch guidance off
    assert sched.scale_at(StepInfo()) == 2.0
    assert sched.scale_at(StepInfo(index=3)) == 2.0


def test_schedule_sigma_window_inclusive():
    sched = GuidanceSchedule(scale=1.5, sigma_min=0.3, sigma_max=0.7)
    got = {s: sched.scale_at(StepInfo(sigma=s)) for s in (0.29, 0.3, 0.5, 0.7, 0.71)}
    assert got == {0.29: 0.0, 0.3: 1.5, 0.5: 1.5, 0.7: 1.5, 0.71: 0.0}
    assert sched.scale_at(StepInfo()) == 1.5  # sigma unknown
    lower_only = GuidanceSchedule(scale=1.5, sigma_min=0.3)
    assert lower_only.scale_at(StepInfo(sigma=100.0)) == 1.5 and lower_only.scale_at(StepInfo(sigma=0.1)) == 0.0
    both = GuidanceSchedule(scale=1.5, start=0.5, sigma_max=0.7)
    assert both.scale_at(StepInfo(0, 10, 0.5)) == 0.0  # step outside, sigma inside
    assert both.scale_at(StepInfo(6, 10, 0.9)) == 0.0  # step inside, sigma outside
    assert both.scale_at(StepInfo(6, 10, 0.5)) == 1.5


def test_schedule_adaptive_scale():
    sched = GuidanceSchedule(scale=3.0, adaptive=0.01)
    assert sched.scale_at(StepInfo(0, 10), 1000.0) == pytest.approx(3.0)
    assert sched.scale_at(StepInfo(0, 10), 900.0) == pytest.approx(2.0)
    assert sched.scale_at(StepInfo(0, 10), 500.0) == 0.0  # clamped at 0
    assert sched.scale_at(StepInfo(0, 10), None) == 3.0  # timestep unknown: plain scale
    assert GuidanceSchedule(scale=3.0).scale_at(StepInfo(0, 10), 500.0) == 3.0
    assert GuidanceSchedule(scale=0.0).scale_at(StepInfo(0, 10), 1000.0) == 0.0


@pytest.mark.parametrize("kwargs,name", [
    (dict(scale=-1.0), "scale"),
    (dict(scale=float("nan")), "scale"),
    (dict(scale=float("inf")), "scale"),
    (dict(start=0.6, end=0.4), "start"),
    (dict(start=-0.1), "start"),
    (dict(end=1.5), "end"),
    (dict(sigma_min=2.0, sigma_max=1.0), "sigma_min"),
    (dict(adaptive=-0.1), "adaptive"),
])
def test_schedule_validation_names_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name):
        GuidanceSchedule(**{"scale": 3.0, **kwargs}).validate()


# --- parameter validation --------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,name", [
    (dict(u=-0.1), "u must"),
    (dict(u=1.5), "u must"),
    (dict(u=float("nan")), "u must"),
    (dict(target="ones"), "target"),
    (dict(path="slerp"), "path"),
    (dict(joint="text"), "joint"),
    (dict(joint="image", target="uniform"), "joint"),
    (dict(joint="image", path="fisher_rao"), "joint"),
    (dict(max_explicit_tokens=0), "max_explicit_tokens"),
])
def test_bad_parameters_raise_value_error_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SoftPAG({0: "*"}, **kwargs).validate()


def test_good_parameters_validate():
    for target in ("identity", "uniform", "mean_query", "max"):
        for path in ("linear", "fisher_rao"):
            SoftPAG({0: "*"}, u=0.5, target=target, path=path).validate()
    SoftPAG({0: "*"}, u=0.0, joint="image").validate()
    SoftPAG({0: "*"}, u=1.0, joint="image").validate()


# --- head sets -------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,layer,n,heads", [
    ("L7:H3,H5; L9:*", 7, 24, (3, 5)),
    ("L7:H3,H5; L9:*", 9, 4, (0, 1, 2, 3)),
    ("L7-10", 8, 3, (0, 1, 2)),
    ("L12:H0-5,H9", 12, 24, (0, 1, 2, 3, 4, 5, 9)),
    ("L12:0-5,9", 12, 24, (0, 1, 2, 3, 4, 5, 9)),
    (" l 12 : h2 , H1 ", 12, 24, (1, 2)),
    ("L3:all", 3, 2, (0, 1)),
    ("L1,L4:H0", 4, 8, (0,)),
    ("L1:H0; L1:H3", 1, 8, (0, 3)),
    ("L1:H0; L1:*", 1, 3, (0, 1, 2)),
    ("L12:H0-5,H9", 12, 4, (0, 1, 2, 3)),  # heads_at clips to the layer's head count
])
def test_headset_syntax(text, layer, n, heads):
    hs = HeadSet.parse(text)
    assert hs.resolved
    assert hs.heads_at(layer, n) == heads
    assert HeadSet.parse(str(hs)) == hs  # round trip through the canonical text


def test_headset_layers_and_matching_is_exact():
    hs = HeadSet.parse("L7-10; L1")
    assert hs.layers == (1, 7, 8, 9, 10)
    one = HeadSet.parse("L1")
    assert 1 in one and 10 not in one and 11 not in one
    assert one.heads_at(10, 4) == () and one.heads_at(11, 4) == ()
    assert 1 not in HeadSet.parse("L10-19")
    assert HeadSet.parse("") == HeadSet() and not HeadSet.parse(" ; ")
    assert HeadSet.of(None) == HeadSet()
    assert HeadSet.of([(7, 3), (7, 5), (9, 0)]) == HeadSet.parse("L7:H5,H3; L9:H0")
    assert HeadSet.of({7: [3, 5]}) == HeadSet.parse("L7:H3,H5")
    assert HeadSet.of({7: "*"}) == HeadSet.parse("L7")
    hs = HeadSet.parse("L2:H1")
    assert HeadSet.of(hs) is hs
    assert HeadSet.parse("L2:H1").union(HeadSet.parse("L2:H3; L5")) == HeadSet.parse("L2:H1,H3; L5:*")
    assert HeadSet.parse("L2:H1,H3; L4").pairs({2: 8, 4: 2}) == [(2, 1), (2, 3), (4, 0), (4, 1)]


@pytest.mark.parametrize("text,fragment", [
    ("L7:H3,,H5", "cannot read head"),
    ("L7:", "cannot read head"),
    ("L7:Hx", "cannot read head"),
    ("X7", "cannot read 'x7'"),
    ("7", "cannot read '7'"),
    ("L-1", "cannot read"),
    ("L7,,L8", "empty layer reference"),
    ("L10-7", "runs backwards"),
    ("L7:H5-3", "runs backwards"),
    ("d2.x", "cannot read"),
])
def test_malformed_headsets_raise(text, fragment):
    with pytest.raises(ValueError, match="(?i)" + fragment):
        HeadSet.parse(text)


def test_headset_bad_values():
    with pytest.raises(ValueError, match="negative"):
        HeadSet.from_pairs([(1, -1)])
    with pytest.raises(ValueError, match="negative"):
        HeadSet({-2: "*"})
    with pytest.raises(TypeError):
        HeadSet.parse(7)


# SDXL-shaped UNet: (global layer, module path) of every attn1, as attention_sites numbers them.
SDXL_NAMES = [
    (0, "down_blocks.1.attentions.0.transformer_blocks.0.attn1"),
    (1, "down_blocks.2.attentions.0.transformer_blocks.0.attn1"),
    (2, "down_blocks.2.attentions.0.transformer_blocks.1.attn1"),
    (3, "mid_block.attentions.0.transformer_blocks.0.attn1"),
    (4, "mid_block.attentions.0.transformer_blocks.1.attn1"),
    (5, "up_blocks.0.attentions.0.transformer_blocks.0.attn1"),
    (6, "up_blocks.0.attentions.0.transformer_blocks.1.attn1"),
    (7, "up_blocks.0.attentions.1.transformer_blocks.0.attn1"),
    (8, "up_blocks.0.attentions.1.transformer_blocks.1.attn1"),
    (9, "up_blocks.1.attentions.0.transformer_blocks.0.attn1"),
    (10, "up_blocks.1.attentions.1.transformer_blocks.0.attn1"),
]


def test_unet_groups_from_diffusers_and_comfy_names():
    groups = unet_groups(SDXL_NAMES)
    assert groups == [("d", 0, 1), ("d", 1, 2), ("m", 3, 2), ("u", 5, 2), ("u", 7, 2), ("u", 9, 1), ("u", 10, 1)]
    comfy = [(0, "input_blocks.4.1.transformer_blocks.0.attn1"), (1, "input_blocks.7.1.transformer_blocks.0.attn1"),
             (2, "input_blocks.7.1.transformer_blocks.1.attn1"), (3, "middle_block.1.transformer_blocks.0.attn1"),
             (4, "output_blocks.0.1.transformer_blocks.0.attn1")]
    assert unet_groups(comfy) == [("d", 0, 1), ("d", 1, 2), ("m", 3, 1), ("u", 4, 1)]
    # cross-attention modules share the layer and do not add groups
    assert unet_groups(SDXL_NAMES + [(0, SDXL_NAMES[0][1][:-1] + "2")]) == groups


@pytest.mark.parametrize("text,layers", [
    ("d1.1", {2: "*"}),
    ("d1", {1: "*", 2: "*"}),
    ("m0", {3: "*", 4: "*"}),
    ("u0", {5: "*", 6: "*"}),
    ("u1-2", {7: "*", 8: "*", 9: "*"}),
    ("d0-1", {0: "*", 1: "*", 2: "*"}),
    ("d1.0-1, m0, u0", {1: "*", 2: "*", 3: "*", 4: "*", 5: "*", 6: "*"}),
    ("m0:H1,H2", {3: [1, 2], 4: [1, 2]}),
    ("M0:h1,h2", {3: [1, 2], 4: [1, 2]}),
    ("m0.1:H0; L0", {4: [0], 0: "*"}),
])
def test_unet_block_refs_resolve(text, layers):
    hs = HeadSet.parse(text)
    assert not hs.resolved
    resolved = hs.resolve(unet_groups(SDXL_NAMES))
    assert resolved.resolved
    assert resolved == HeadSet(layers)


def test_pamparamm_example_resolves_on_a_deep_unet():
    """pamparamm's own example 'd2.1-3, m0, u0': down block 2, transformer indices 1-3; mid 0; up 0."""
    groups = [("d", 0, 1), ("d", 1, 1), ("d", 2, 4), ("m", 6, 2), ("u", 8, 1), ("u", 9, 1)]
    assert HeadSet.parse("d2.1-3, m0, u0").resolve(groups) == HeadSet({3: "*", 4: "*", 5: "*", 6: "*", 7: "*", 8: "*"})
    assert HeadSet.parse("d2.1-3:H0").resolve(groups).heads_at(4, 8) == (0,)


@pytest.mark.parametrize("text,groups,fragment", [
    ("d5", "sdxl", "block index 5 is out of range; section 'd' has attention blocks 0-1"),
    ("u1.2", "sdxl", "transformer index 2 is out of range; u1 has transformer indices 0-1"),
    ("m0", "no-mid", "no attention blocks in section 'm'"),
    ("d0", "dit", "no UNet blocks"),
])
def test_unet_block_ref_errors(text, groups, fragment):
    g = {"sdxl": unet_groups(SDXL_NAMES), "no-mid": [("d", 0, 1), ("u", 1, 1)], "dit": []}[groups]
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        HeadSet.parse(text).resolve(g)


def test_headset_check_messages():
    hs = HeadSet.parse("L1:H2; L3")
    hs.check({0: 4, 1: 4, 2: 4, 3: 4})
    with pytest.raises(ValueError, match=r"layer 3 is out of range: this model has perturbable layers 0-2"):
        hs.check({0: 4, 1: 4, 2: 4})
    with pytest.raises(ValueError, match=r"head 2 is out of range for layer 1: it has 2 heads \(0-1\)"):
        hs.check({1: 2, 3: 4})
    with pytest.raises(ValueError, match=r"layers 0-1, 3"):
        HeadSet.parse("L2").check({0: 2, 1: 2, 3: 2})
    with pytest.raises(ValueError, match="need a UNet"):
        HeadSet.parse("m0").check({0: 2})
    with pytest.raises(ValueError, match="no attention layers"):
        hs.check({})


def _sites(family, kinds_heads):
    return [(Site(family, kind, layer, name), n) for layer, kind, name, n in kinds_heads]


def test_effect_check_sites_resolves_unet_refs_and_checks_ranges():
    sites = [(Site("unet", kind, layer, name[:-1] + ("1" if kind == "self" else "2")), 8)
             for layer, name in SDXL_NAMES for kind in ("self", "cross")]
    e = SoftPAG("m0:H1; L9", u=0.5)
    with pytest.raises(ValueError, match="UNet block refs"):
        e.resolved_heads  # noqa: B018 - not bound to a model yet
    e.check_sites(sites)
    assert e.resolved_heads == HeadSet({3: [1], 4: [1], 9: "*"})
    assert e.applies(Site("unet", "self", 4, SDXL_NAMES[4][1])) and not e.applies(Site("unet", "self", 5, "x"))
    with pytest.raises(ValueError, match="head 8 is out of range for layer 3"):
        SoftPAG("m0:H8").check_sites(sites)
    with pytest.raises(ValueError, match="layer 11 is out of range"):
        SoftPAG("L11").check_sites(sites)
    # a DiT: UNet block refs are refused with a clear message, layers are checked
    dit = _sites("sd3", [(i, "joint", f"transformer_blocks.{i}.attn", 4) for i in range(3)])
    with pytest.raises(ValueError, match="UNet block refs work on SD1.5/SDXL only"):
        SoftPAG("m0").check_sites(dit)
    with pytest.raises(ValueError, match=r"layer 3 is out of range: this sd3 model has perturbable layers 0-2"):
        SoftPAG("L3").check_sites(dit)
    with pytest.raises(ValueError, match=r"head 4 is out of range for layer 0: it has 4 heads \(0-3\)"):
        SoftPAG("L0:H4").check_sites(dit)
    SoftPAG("L2:H3").check_sites(dit)
    # cross-attention layers are not perturbable: a PixArt with cross only at layer 1 refuses layer 1
    pix = _sites("pixart", [(0, "self", "transformer_blocks.0.attn1", 4), (1, "cross", "transformer_blocks.1.attn2", 4)])
    with pytest.raises(ValueError, match="layer 1 is out of range"):
        SoftPAG("L1").check_sites(pix)


def test_effect_bound_to_one_unet():
    small = [(Site("unet", "self", i, SDXL_NAMES[i][1]), 8) for i in range(5)]
    big = [(Site("unet", "self", i, name), 8) for i, name in SDXL_NAMES]
    e = SoftPAG("m0", u=0.5)
    e.check_sites(big)
    e.check_sites(big)  # the same model again is fine
    with pytest.raises(ValueError, match="another UNet"):
        e.check_sites(small[:4] + [(Site("unet", "self", 4, "mid_block.attentions.0.transformer_blocks.0.attn1"), 8)])


def test_effect_is_shared_not_copied():
    import copy

    e = SoftPAG("L1", u=0.5)
    assert copy.deepcopy(e) is e
    assert "L1:*" in repr(e)


def test_math_identities_of_the_spec_hold_for_the_map_free_targets():
    """Sanity of the references themselves: uniform target output is mean over keys of V; mean-query
    target rows are all the same distribution."""
    call = make_call(dtype=torch.float64)
    t_uni = target_map(call, "uniform") @ call.v.double()
    assert torch.allclose(t_uni, call.v.double().mean(-2, keepdim=True).expand_as(t_uni), atol=1e-13)
    t_mq = target_map(call, "mean_query")
    assert torch.allclose(t_mq.sum(-1), torch.ones(t_mq.shape[:-1], dtype=torch.float64))
    assert torch.equal(t_mq[..., 0, :], t_mq[..., -1, :])
