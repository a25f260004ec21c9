"""AlignedGen / StyleAligned (processors/alignedgen.py, pipelines/alignedgen.py; specs/alignedgen_stylealigned.md
B.5): the effect against an explicit-softmax reference written from the spec (AdaIN before RoPE, ShiftPE by
re-embedding the shifted ids, λ, constrain_first), the spec's invariants on synthetic calls, row groups from
roles, and the diffusers host on the tiny models of every family (off switch, removal, reference == solo,
gating counts, cfg 1, the style-image lock-step, bad input)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.models.transformers.transformer_flux import FluxPosEmbed
from torch.utils._python_dispatch import TorchDispatchMode

import attnlab
from attnlab.models.tiny import build_tiny_pipeline, output_tensor, tiny_call_kwargs
from attnlab.pipelines.alignedgen import AlignedGenPipeline, style_tensor
from attnlab.processors.alignedgen import AlignedGen, adain, comfy_rope_source, parse_layers
from attnlab.processors.call import AttentionCall, RopeInfo, Site, StepInfo, TokenLayout
from attnlab.processors.effects import EffectStack
from attnlab.processors.host_diffusers.processors import _flux_rotate, sdpa

H, D, T, ROWS, COLS = 2, 16, 4, 4, 5
N = T + ROWS * COLS
AXES = [4, 6, 6]
POS = FluxPosEmbed(theta=10000, axes_dim=AXES)
SITE = Site("flux", "single", 1, "single_transformer_blocks.0")
LAYOUT = TokenLayout(q_image=slice(T, N), k_image=slice(T, N), q_text=slice(0, T), k_text=slice(0, T),
                     grid=(1, ROWS, COLS), text_first=True)


def _ids(col_shift=0, index_shift=0):
    ids = torch.zeros(N, 3)
    r, c = torch.meshgrid(torch.arange(ROWS), torch.arange(COLS), indexing="ij")
    ids[T:, 0] = float(index_shift)
    ids[T:, 1] = r.flatten().float()
    ids[T:, 2] = c.flatten().float() + col_shift
    return ids


def _flux_call(B=3, seed=0, roles=None, step=None, dtype=torch.float64):
    """Raw (pre-RoPE) q/k/v and the AttentionCall the FLUX host would build from them."""
    g = torch.Generator().manual_seed(seed)
    raw_q, raw_k, v = (torch.randn(B, H, N, D, generator=g, dtype=dtype) for _ in range(3))
    raw_q = raw_q * 1.5 + 0.3  # non-trivial statistics
    cos, sin = POS(_ids())
    q, k = _flux_rotate(raw_q, cos, sin), _flux_rotate(raw_k, cos, sin)
    rope = RopeInfo(cos, sin, _flux_rotate, POS)
    call = AttentionCall(q, k, v, SITE, LAYOUT, roles, step or StepInfo(0, 4, 1.0, 1.0, 0), None, None, rope)
    return call, raw_q, raw_k


def _softmax_attn(q, k, v, logit_scale=None):
    logits = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if logit_scale is not None:
        logits = logits * logit_scale
    return logits.softmax(-1) @ v


def _naive(raw_q, raw_k, v, ref=0, lam=1.1, shift=COLS, adain_mode="qk"):
    """The spec's algorithm (B.1 steps 1-5) for one chunk, with explicit softmax and RoPE from the ids."""
    cos, sin = POS(_ids())
    scos, ssin = POS(_ids(col_shift=shift))
    img = slice(T, N)
    out = torch.empty_like(v)
    for b in range(v.shape[0]):
        q, k = raw_q[b:b + 1].clone(), raw_k[b:b + 1].clone()
        if b == ref:
            out[b] = _softmax_attn(_flux_rotate(q, cos, sin), _flux_rotate(k, cos, sin), v[b:b + 1])[0]
            continue
        if adain_mode in ("q", "qk"):
            q[:, :, img] = adain(q[:, :, img], raw_q[ref:ref + 1, :, img])
        if adain_mode == "qk":
            k[:, :, img] = adain(k[:, :, img], raw_k[ref:ref + 1, :, img])
        k_ref = _flux_rotate(raw_k[ref:ref + 1], scos, ssin)[:, :, img]  # the reference keys at (row, col + W)
        kk = torch.cat([_flux_rotate(k, cos, sin), lam * k_ref], 2)
        vv = torch.cat([v[b:b + 1], v[ref:ref + 1, :, img]], 2)
        out[b] = _softmax_attn(_flux_rotate(q, cos, sin), kk, vv)[0]
    return out


def _run(effect, call, kernel=sdpa):
    return EffectStack([effect]).run(call, kernel)


# --- the effect against the spec ---------------------------------------------------------------------
@pytest.mark.parametrize("adain_mode", ["qk", "q", "none"])
def test_matches_spec_reference(adain_mode):
    call, raw_q, raw_k = _flux_call()
    out = _run(AlignedGen(adain=adain_mode), call)
    assert torch.allclose(out, _naive(raw_q, raw_k, call.v, adain_mode=adain_mode), atol=2e-6)
    # and it really differs from the other modes (the check can fail)
    other = "none" if adain_mode != "none" else "qk"
    assert not torch.allclose(out, _naive(raw_q, raw_k, call.v, adain_mode=other), atol=1e-4)


def test_shift_zero_is_naive_sharing_and_shift_matters():
    call, raw_q, raw_k = _flux_call()
    naive0 = _naive(raw_q, raw_k, call.v, shift=0)
    assert torch.allclose(_run(AlignedGen(shift=0), call), naive0, atol=2e-6)
    shifted = _run(AlignedGen(), call)
    assert not torch.allclose(shifted, naive0, atol=1e-4)
    # explicit +3 columns and the height axis
    assert torch.allclose(_run(AlignedGen(shift=3), call), _naive(raw_q, raw_k, call.v, shift=3), atol=2e-6)


def test_rotate_again_equals_rope_at_shifted_positions():
    for dtype, tol in ((torch.float32, 1e-6), (torch.float64, 1e-6)):  # FluxPosEmbed's tables are float32
        call, raw_q, raw_k = _flux_call(dtype=dtype)
        delta = torch.tensor([[0.0, 0.0, float(COLS)]])
        again = call.rope.shift(call.k, delta)
        direct = _flux_rotate(raw_k, *POS(_ids(col_shift=COLS)))
        # text tokens sit at 0 and move to (0, 0, W) too: compare every token
        direct_all = _flux_rotate(raw_k, *POS(_ids(col_shift=COLS) + torch.tensor([0, 0, 0.0]).where(
            torch.arange(N)[:, None] >= T, torch.tensor([0, 0, float(COLS)]))))
        assert (again[:, :, T:] - direct[:, :, T:]).abs().max() <= tol
        assert (again - direct_all).abs().max() <= tol
        # the joint shift of q and k leaves logits unchanged, a key-only shift does not
        q2 = call.rope.shift(call.q, delta)
        base = call.q @ call.k.transpose(-1, -2)
        assert (q2 @ again.transpose(-1, -2) - base).abs().max() < 1e-4
        assert (call.q @ again.transpose(-1, -2) - base).abs().max() > 1e-2


def test_comfy_rope_source_rotate_again():
    """ComfyUI FLUX: tables from the model's own EmbedND (rotation matrices) — rotate-again == shifted RoPE."""
    import fake_comfy.models as fm

    emb = fm.EmbedND(dim=D, theta=10000, axes_dim=AXES)
    raw = torch.randn(2, H, N, D)
    pe = emb(_ids()[None])
    rotated = fm.rotate(raw, pe)
    call = AttentionCall(rotated, rotated, raw, SITE, LAYOUT)
    rope = comfy_rope_source(emb)(call)
    assert (rope.rotate(raw, rope.cos, rope.sin) - rotated).abs().max() < 1e-6
    assert (rope.undo(rotated) - raw).abs().max() < 1e-5
    again = rope.shift(rotated, torch.tensor([[0.0, 0.0, float(COLS)]]))
    direct = fm.rotate(raw, emb(_ids(col_shift=COLS)[None]))
    assert (again[:, :, T:] - direct[:, :, T:]).abs().max() <= 1e-6
    # Wan: image-only self-attention, ids (frame, row, col)
    frames = 2
    n = frames * ROWS * COLS
    f, r, c = torch.meshgrid(torch.arange(frames), torch.arange(ROWS), torch.arange(COLS), indexing="ij")
    ids = torch.stack([f.flatten(), r.flatten(), c.flatten()], -1).float()
    raw = torch.randn(2, H, n, D)
    rotated = fm.rotate(raw, emb(ids[None]))
    layout = TokenLayout(q_image=slice(0, n), k_image=slice(0, n), grid=(frames, ROWS, COLS))
    rope = comfy_rope_source(emb)(AttentionCall(rotated, rotated, raw, Site("wan", "self", 0), layout))
    assert (rope.undo(rotated) - raw).abs().max() < 1e-5
    again = rope.shift(rotated, torch.tensor([[1.0, 0.0, 0.0]]))  # one frame later
    assert (again - fm.rotate(raw, emb((ids + torch.tensor([1.0, 0, 0]))[None]))).abs().max() <= 1e-6


def test_lambda_identities():
    call, raw_q, raw_k = _flux_call()
    # λ = 1: plain concatenation
    assert torch.allclose(_run(AlignedGen(scale=1.0), call), _naive(raw_q, raw_k, call.v, lam=1.0), atol=2e-6)
    # λ scales the shared block's logits: compare against explicit logit scaling
    eff = AlignedGen(scale=2.0, adain="none", shift=0)
    out = _run(eff, call)
    for b in (1, 2):
        kk = torch.cat([call.k[b], call.k[0, :, T:]], 1)
        vv = torch.cat([call.v[b], call.v[0, :, T:]], 1)
        scale = torch.ones(kk.shape[1], dtype=kk.dtype)
        scale[N:] = 2.0
        assert torch.allclose(out[b], _softmax_attn(call.q[b], kk, vv, logit_scale=scale), atol=2e-6)
    # a −∞ bias on the shared block is sharing off
    def blocked(q, k, v, mask, scale):
        bias = torch.zeros(1, 1, 1, k.shape[-2], dtype=q.dtype)
        bias[..., N:] = float("-inf")
        return sdpa(q, k, v, bias, scale)

    assert torch.allclose(_run(AlignedGen(adain="none"), call, blocked), sdpa(call.q, call.k, call.v), atol=1e-12)
    # λ = 0 does NOT switch sharing off (uniform mass on the reference tokens)
    assert not torch.allclose(_run(AlignedGen(scale=0.0, adain="none"), call), sdpa(call.q, call.k, call.v), atol=1e-4)


def test_decrease_schedule():
    e = AlignedGen(schedule="decrease")
    call, _, _ = _flux_call(step=StepInfo(3, 10, 0.5, 0.5, 0))
    assert e.lam(call) == pytest.approx(0.25)
    unet = call.replace(site=Site("unet", "self", 0), step=StepInfo(None, None, None, 800.0))
    assert e.lam(unet) == pytest.approx(0.64)
    assert AlignedGen().lam(call) == pytest.approx(1.1) and AlignedGen().lam(unet) == 1.0


def test_adain_statistics():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2, 50, 8, generator=g, dtype=torch.float64) * 3 + 1
    ref = torch.randn(1, 2, 40, 8, generator=g, dtype=torch.float64) * 0.5 - 2
    y = adain(x, ref)
    assert (y.mean(-2) - ref.mean(-2)).abs().max() < 1e-6
    assert (y.std(-2) - ref.std(-2)).abs().max() < 1e-3
    assert (adain(ref, ref) - ref).abs().max() < 1e-5
    # inside the effect: the targets' image q/k reaching the kernel carry the reference's pre-RoPE statistics
    call, raw_q, raw_k = _flux_call(dtype=torch.float64)
    seen = []

    def kernel(q, k, v, mask, scale):
        seen.append((q, k))
        return sdpa(q, k, v, mask, scale)

    _run(AlignedGen(), call, kernel)
    q_t, k_t = seen[0]  # the target call (rows 1, 2)
    img = slice(T, N)
    for x, raw in ((q_t, raw_q), (k_t[:, :, :N], raw_k)):
        pre = call.rope.undo(x[:, :, img], img)
        assert (pre.mean(-2) - raw[0:1, :, img].mean(-2)).abs().max() < 1e-6
        assert (pre.std(-2) - raw[0:1, :, img].std(-2)).abs().max() < 1e-3
        assert torch.allclose(x[:, :, :T], _flux_rotate(raw[1:], *POS(_ids()))[:, :, :T])  # text untouched


def test_reference_independent_targets_equivariant():
    call, _, _ = _flux_call(B=4)
    e = AlignedGen()
    out = _run(e, call)
    assert torch.equal(out[0], sdpa(call.q[:1], call.k[:1], call.v[:1])[0])  # constrain_first
    # perturb target 3: targets 1, 2 and the reference unchanged
    q, k, v = call.q.clone(), call.k.clone(), call.v.clone()
    q[3], k[3], v[3] = q[3] * 2 + 1, -k[3], v[3] + 5
    out2 = _run(e, call.replace(q=q, k=k, v=v))
    assert torch.allclose(out2[:3], out[:3], atol=1e-12) and not torch.allclose(out2[3], out[3])
    # permuting targets permutes outputs
    perm = [0, 3, 1, 2]
    out3 = _run(e, call.replace(q=call.q[perm], k=call.k[perm], v=call.v[perm]))
    assert torch.allclose(out3, out[perm], atol=1e-12)
    # the reference itself matters for the targets
    out4 = _run(e, call.replace(v=torch.cat([call.v[:1] + 1, call.v[1:]])))
    assert not torch.allclose(out4[1:], out[1:], atol=1e-4)


def test_no_dense_mask_two_kernel_calls():
    call, _, _ = _flux_call(B=3, dtype=torch.float32)
    seen = []

    def kernel(q, k, v, mask, scale):
        seen.append((q.shape, k.shape, mask))
        return sdpa(q, k, v, mask, scale)

    with Shapes() as allocs:
        _run(AlignedGen(), call, kernel)
    n_ext = N + ROWS * COLS
    assert [s[2] for s in seen] == [None, None]
    assert sorted((s[0][0], s[1][2]) for s in seen) == [(1, N), (2, n_ext)]
    assert not [s for s in allocs.shapes if len(s) >= 2 and s[-2:] == (N, n_ext)]  # no (…, L, L+N) tensor


class Shapes(TorchDispatchMode):
    """Records the shape of every tensor any op returns."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if torch.is_tensor(t):
                self.shapes.append(tuple(t.shape))
        return out


def dense_masks(shapes, n_img):
    """Shapes (…, L, L + N) with N = n_img: what a dense constrain_first mask (or score map) would have."""
    return [s for s in shapes if len(s) >= 3 and s[-2] >= n_img and s[-1] - s[-2] == n_img]


def test_no_dense_mask_in_a_flux_pipeline():
    pipe = _pipe("flux")
    e = AlignedGen()
    with attnlab.apply(pipe, [e]), Shapes() as mode:
        _latents(pipe, "flux", num_inference_steps=1)
    n_img = 256  # the tiny FLUX at its default size: 16×16 image tokens
    assert e.calls > 0 and not dense_masks(mode.shapes, n_img)
    assert any(len(s) == 4 and s[-2] > n_img + 1 and s[-2] - n_img > 0 for s in mode.shapes)  # extended keys seen
    with Shapes() as control:  # the detector does see the official code's dense mask
        torch.zeros(3, 2, 20 + n_img, 20 + 2 * n_img).masked_fill_(torch.ones(1, dtype=torch.bool), 0.0)
    assert dense_masks(control.shapes, n_img)


def test_groups_from_roles():
    e = AlignedGen()
    call, _, _ = _flux_call(B=4, roles=("uncond", "uncond", "cond", "cond"))
    assert e.groups(call) == [(0, [1]), (2, [3])]
    c = call.replace(roles=("cond", "cond", "uncond", "uncond"))  # ComfyUI [0, 1]
    assert e.groups(c) == [(0, [1]), (2, [3])]
    c = call.replace(roles=("reference", "target", "target", "perturbed"))
    assert e.groups(c) == [(0, [1, 2])]
    c = call.replace(roles=("cond",) * 4)
    assert AlignedGen(chunk=2).groups(c) == [(0, [1]), (2, [3])]
    assert AlignedGen(reference=1).groups(c) == [(1, [0, 2, 3])]
    c = call.replace(roles=("perturbed",) * 4)
    assert e.groups(c) == []
    # each CFG chunk shares from its own reference: equals running the chunks separately
    out = _run(e, call)
    a = _run(e, call.replace(q=call.q[:2], k=call.k[:2], v=call.v[:2], roles=("uncond",) * 2))
    b = _run(e, call.replace(q=call.q[2:], k=call.k[2:], v=call.v[2:], roles=("cond",) * 2))
    assert torch.allclose(out, torch.cat([a, b]), atol=1e-12)
    # a batch of one is left alone (bit-identical)
    one = call.replace(q=call.q[:1], k=call.k[:1], v=call.v[:1], roles=("cond",))
    assert torch.equal(_run(e, one), sdpa(one.q, one.k, one.v))


def test_gating_and_off():
    call, _, _ = _flux_call()
    stock = sdpa(call.q, call.k, call.v)
    for e in (AlignedGen(enabled=False), AlignedGen(steps=(1, 3))):
        assert torch.equal(_run(e, call), stock)
        assert e.calls == 0
    e = AlignedGen(steps=(0, 1))
    _run(e, call)
    assert e.calls == 1
    assert AlignedGen().applies(SITE) and not AlignedGen().applies(Site("flux", "joint", 0))
    assert AlignedGen(layers="0-1").applies(Site("flux", "joint", 0))
    assert not AlignedGen().applies(Site("unet", "cross", 0)) and AlignedGen().applies(Site("unet", "self", 3))
    assert AlignedGen().applies(Site("sd3", "joint", 0)) and AlignedGen().applies(Site("wan", "self", 0))
    assert parse_layers("19-21, 30") == {19, 20, 21, 30}


def test_video_reference_frames():
    g = torch.Generator().manual_seed(0)
    frames, rows, cols = 3, 2, 2
    n = frames * rows * cols
    q, k, v = (torch.randn(2, H, n, D, generator=g) for _ in range(3))
    layout = TokenLayout(q_image=slice(0, n), k_image=slice(0, n), grid=(frames, rows, cols))
    call = AttentionCall(q, k, v, Site("wan", "self", 0), layout, ("cond", "cond"))
    lens = {}
    for rf in ("all", "first", 2):
        def kernel(q_, k_, v_, mask, scale, rf=rf):
            lens.setdefault(rf, []).append(k_.shape[2])
            return sdpa(q_, k_, v_, mask, scale)
        _run(AlignedGen(ref_frames=rf, adain="none"), call, kernel)
    assert max(lens["all"]) == 2 * n and max(lens["first"]) == n + rows * cols and max(lens[2]) == n + 2 * rows * cols


def test_bad_parameters():
    for kw, word in ((dict(adain="k"), "adain"), (dict(schedule="cosine"), "schedule"), (dict(scale=-1), "scale"),
                     (dict(shift="left"), "shift"), (dict(shift_axis="depth"), "shift_axis"),
                     (dict(steps=(3, 1)), "steps"), (dict(ref_frames=0), "ref_frames"), (dict(chunk=1), "chunk"),
                     (dict(layers="a-b"), "layers")):
        with pytest.raises(ValueError, match=word):
            AlignedGen(**kw)


def test_style_tensor_inputs():
    from PIL import Image

    rgb = Image.fromarray((np.random.RandomState(0).rand(20, 30, 3) * 255).astype(np.uint8))
    assert style_tensor(rgb, 16, 16).shape == (1, 3, 16, 16)
    assert style_tensor(rgb.convert("L"), 16, 24).shape == (1, 3, 16, 24)
    assert style_tensor(rgb.convert("RGBA"), 16, 16).shape == (1, 3, 16, 16)
    assert style_tensor(torch.rand(1, 20, 30, 3), 8, 8).shape == (1, 3, 8, 8)  # ComfyUI IMAGE
    with pytest.raises(ValueError, match="mode"):
        style_tensor(Image.new("I;16", (20, 20)), 16, 16)
    with pytest.raises(ValueError, match="too small"):
        style_tensor(torch.rand(3, 4, 4), 16, 16)
    with pytest.raises(ValueError, match="one image"):
        style_tensor(torch.rand(2, 3, 16, 16), 16, 16)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        style_tensor(torch.rand(3, 16, 16) * 5, 16, 16)
    with pytest.raises(ValueError, match="channels"):
        style_tensor(torch.rand(5, 16, 16), 16, 16)


# --- the diffusers host on the tiny models ---------------------------------------------------------------
PROMPTS = ["a cat", "a dog on a hill", "a red car"]
_PIPES: dict = {}


def _pipe(fam):
    if fam not in _PIPES:
        _PIPES[fam] = build_tiny_pipeline(fam)
    return _PIPES[fam]


def _latents(pipe, fam, prompts=PROMPTS, **kw):
    args = tiny_call_kwargs(fam, output_type="latent", prompt=prompts, **kw)
    with torch.no_grad():
        return output_tensor(pipe(**args))


@pytest.mark.parametrize("fam", ["flux", "sdxl", "sd15", "sd3", "pixart", "wan"])
def test_diffusers_off_removal_reference_solo(fam):
    pipe = _pipe(fam)
    before = dict(getattr(pipe, "transformer", None).attn_processors if fam not in ("sdxl", "sd15")
                  else pipe.unet.attn_processors)
    stock = _latents(pipe, fam, num_inference_steps=1)
    with attnlab.apply(pipe, [AlignedGen(enabled=False)]):
        assert torch.equal(_latents(pipe, fam, num_inference_steps=1), stock)  # off == stock, bit for bit
    e = AlignedGen()
    with attnlab.apply(pipe, [e]):
        shared = _latents(pipe, fam, num_inference_steps=1)
    after = dict(getattr(pipe, "transformer", None).attn_processors if fam not in ("sdxl", "sd15")
                 else pipe.unet.attn_processors)
    assert all(after[k] is before[k] for k in before)
    assert torch.equal(_latents(pipe, fam, num_inference_steps=1), stock)  # removal restores stock
    assert e.calls > 0
    solo = _latents(pipe, fam, prompts=PROMPTS[:1], num_inference_steps=1)
    assert torch.allclose(shared[0], solo[0], atol=1e-4)  # the reference row == a solo run of its prompt
    assert torch.allclose(shared[0], stock[0], atol=1e-5)
    assert (shared[1:] - stock[1:]).abs().amax() > 1e-4  # targets do change (numerical noise is ~1e-6)


def test_diffusers_gating_counts():
    pipe = _pipe("flux")
    e = AlignedGen(steps=(0, 1))
    with attnlab.apply(pipe, [e]):
        _latents(pipe, "flux", num_inference_steps=3)
    singles = pipe.transformer.config.num_single_layers
    assert e.calls == singles * 1 * 1
    e = AlignedGen(layers=[0, 1 + pipe.transformer.config.num_layers - 1])  # a double and a single block
    with attnlab.apply(pipe, [e]):
        _latents(pipe, "flux", num_inference_steps=2)
    assert e.calls == 2 * 2
    pipe = _pipe("sdxl")
    n_self = sum(1 for k in pipe.unet.attn_processors if k.endswith("attn1.processor"))
    for guidance, chunks in ((5.0, 2), (1.0, 1)):
        e = AlignedGen()
        with attnlab.apply(pipe, [e]):
            out = _latents(pipe, "sdxl", guidance_scale=guidance, num_inference_steps=2)
        assert e.calls == n_self * 2 * chunks
        if guidance == 1.0:  # cfg 1: one chunk, the reference row still equals its solo run
            solo = _latents(pipe, "sdxl", prompts=PROMPTS[:1], guidance_scale=1.0, num_inference_steps=2)
            assert torch.allclose(out[0], solo[0], atol=1e-4)


def test_diffusers_explicit_roles_and_separate_chunks():
    """Hosts may mark the reference explicitly ("reference"/"target"); CFG chunks run as separate forwards give
    the same result as the batched [uncond, cond] forward."""
    pipe = _pipe("sd15")
    captured = []
    hook = pipe.unet.register_forward_pre_hook(lambda m, a, k: captured.append((a, k)), with_kwargs=True)
    try:
        _latents(pipe, "sd15", prompts=PROMPTS[:2], num_inference_steps=1)
    finally:
        hook.remove()
    args, kwargs = captured[0]
    x, t = args[0], args[1]
    ehs = kwargs["encoder_hidden_states"]
    e = AlignedGen()
    with attnlab.apply(pipe, [e]) as session, torch.no_grad():
        with session.roles_for(("uncond", "uncond", "cond", "cond")):
            batched = pipe.unet(x, t, encoder_hidden_states=ehs).sample
        with session.roles_for("uncond"):
            u = pipe.unet(x[:2], t, encoder_hidden_states=ehs[:2]).sample
        with session.roles_for("cond"):
            c = pipe.unet(x[2:], t, encoder_hidden_states=ehs[2:]).sample
        with session.roles_for(("reference", "target", "reference", "target")):
            explicit = pipe.unet(x, t, encoder_hidden_states=ehs).sample
    e1 = AlignedGen(reference=1)  # the reference is row 1 of each chunk
    with attnlab.apply(pipe, [e1]) as session, torch.no_grad():
        with session.roles_for(("uncond", "uncond", "cond", "cond")):
            swapped = pipe.unet(x[[1, 0, 3, 2]], t, encoder_hidden_states=ehs[[1, 0, 3, 2]]).sample
    assert torch.allclose(batched, torch.cat([u, c]), atol=1e-5)
    assert torch.allclose(explicit, batched, atol=1e-6)
    assert torch.allclose(swapped[[1, 0, 3, 2]], batched, atol=1e-5)


def test_flux_true_cfg_separate_forwards():
    """FLUX true CFG runs the negative prompt as a separate forward (roles "uncond" via the cache context): each
    forward is its own chunk, the reference row still equals a solo run, and sharing happens in both."""
    pipe = _pipe("flux")
    kw = dict(true_cfg_scale=2.0, negative_prompt=["blurry"] * 3, num_inference_steps=2)
    e = AlignedGen()
    with attnlab.apply(pipe, [e]):
        out = _latents(pipe, "flux", **kw)
    solo = _latents(pipe, "flux", prompts=PROMPTS[:1], **dict(kw, negative_prompt=["blurry"]))
    assert torch.allclose(out[0], solo[0], atol=1e-4)
    assert e.calls == pipe.transformer.config.num_single_layers * 2 * 2  # layers × steps × (cond + uncond forward)


def test_composes_with_effects_below():
    """Effects below the share stage see the targets' call: extended keys, the targets' roles, their own rows."""
    from attnlab.processors.effects import Effect

    class Probe(Effect):
        stage = "mask"

        def __init__(self):
            self.seen = []

        def __call__(self, call, attend):
            self.seen.append((call.batch, call.kv_len, call.roles))
            return attend(call.q, call.k, call.v)

    call, _, _ = _flux_call(B=4, roles=("uncond", "uncond", "cond", "cond"))
    probe = Probe()
    out = EffectStack([AlignedGen(), probe]).run(call, sdpa)
    n_ext = N + ROWS * COLS
    assert sorted(probe.seen) == sorted([(1, n_ext, ("uncond",)), (1, n_ext, ("cond",)), (2, N, ("uncond", "cond"))])
    assert torch.allclose(out, _run(AlignedGen(), call), atol=0)


def test_wan_reference_frames_in_pipeline():
    pipe = _pipe("wan")
    stock = _latents(pipe, "wan", prompts=PROMPTS[:2])
    outs = {}
    for rf in ("all", "first"):
        with attnlab.apply(pipe, [AlignedGen(ref_frames=rf)]):
            outs[rf] = _latents(pipe, "wan", prompts=PROMPTS[:2])
        assert torch.allclose(outs[rf][0], stock[0], atol=1e-5)
    assert (outs["all"][1] - outs["first"][1]).abs().max() > 1e-5  # the shared frames matter


def test_pipeline_batch_and_errors():
    pipe = _pipe("flux")
    ag = AlignedGenPipeline(pipe)
    kw = tiny_call_kwargs("flux", output_type="latent")
    kw.pop("prompt")
    with torch.no_grad():
        out = output_tensor(ag(PROMPTS, **kw))
        kw["generator"] = torch.Generator().manual_seed(0)
        with ag.enabled():
            same = output_tensor(pipe(prompt=PROMPTS, **kw))
    assert torch.allclose(out, same, atol=1e-6) and out.shape[0] == 3
    with pytest.raises(ValueError, match="at least 2"):
        ag(["only one"], **kw)
    with pytest.raises(ValueError, match="layers"):
        AlignedGenPipeline(pipe, layers=[999])
    with pytest.raises(ValueError, match="adain"):
        AlignedGenPipeline(pipe, adain="v")
    assert all(type(p).__name__ == "FluxAttnProcessor" for p in pipe.transformer.attn_processors.values())


@pytest.mark.parametrize("fam", ["flux", "sdxl"])
def test_style_image_lockstep(fam):
    from PIL import Image

    pipe = _pipe(fam)
    ag = AlignedGenPipeline(pipe)
    img = Image.fromarray((np.random.RandomState(0).rand(40, 50, 3) * 255).astype(np.uint8))
    den = pipe.transformer if fam == "flux" else pipe.unet
    seen = []
    hook = den.register_forward_hook(  # a post-forward hook sees the inputs as the pre-hooks left them
        lambda m, a, k, o: seen.append(((k.get("hidden_states") if fam == "flux" else a[0]).clone(),
                                     float((k.get("timestep") if fam == "flux" else a[1]).flatten()[0]))),
        with_kwargs=True)
    kw = tiny_call_kwargs(fam, output_type="latent")
    kw.pop("prompt")
    try:
        with torch.no_grad():
            out = output_tensor(ag(PROMPTS[:2], style_image=img, style_prompt="a painting", return_reference=True,
                                   **kw))
    finally:
        hook.remove()
    assert out.shape[0] == 3 and ag.lockstep.forwards == len(seen) == 2
    h, w = kw["height"], kw["width"]
    z = ag.encode_style(img, h, w).float()
    eps = torch.randn(z.shape, generator=torch.Generator().manual_seed(0))
    if fam == "flux":
        z, eps = (pipe._pack_latents(x, 1, x.shape[1], x.shape[2], x.shape[3]) for x in (z, eps))
    rows = 3
    for x, t in seen:  # every forward saw the style latent noised to that forward's level, in every chunk
        if fam == "flux":
            expect = (1 - t) * z[0] + t * eps[0]
        else:
            a = float(pipe.scheduler.alphas_cumprod[int(round(t))])
            expect = a ** 0.5 * z[0] + (1 - a) ** 0.5 * eps[0]
        for r in range(0, x.shape[0], rows):
            assert torch.allclose(x[r], expect, atol=1e-5)
        assert not torch.allclose(x[1], expect, atol=1e-2)
    # the targets depend on the style image; the reference row is dropped by default
    kw["generator"] = torch.Generator().manual_seed(0)
    with torch.no_grad():
        dropped = output_tensor(ag(PROMPTS[:2], style_image=img.transpose(Image.FLIP_LEFT_RIGHT), **kw))
    assert dropped.shape[0] == 2 and (dropped - out[1:]).abs().max() > 1e-4
    with pytest.raises(ValueError, match="num_images_per_prompt"):
        ag(PROMPTS[:2], style_image=img, num_images_per_prompt=2, **kw)
    with pytest.raises(ValueError, match="mode"):
        ag(PROMPTS[:2], style_image=Image.new("I;16", (16, 16)), **kw)


def test_style_image_ddim_inversion():
    """inversion="ddim" (UNets): the reference row follows the DDIM inversion trajectory of the style image."""
    from PIL import Image

    pipe = _pipe("sdxl")
    ag = AlignedGenPipeline(pipe)
    img = Image.fromarray((np.random.RandomState(1).rand(64, 64, 3) * 255).astype(np.uint8))
    seen = []
    hook = pipe.unet.register_forward_hook(lambda m, a, k, o: seen.append((a[0].clone(), float(a[1]))),
                                           with_kwargs=True)
    kw = tiny_call_kwargs("sdxl", output_type="latent", num_inference_steps=3)
    kw.pop("prompt")
    try:
        with torch.no_grad():
            out = output_tensor(ag(PROMPTS[:2], style_image=img, style_prompt="a painting", inversion="ddim", **kw))
    finally:
        hook.remove()
    traj = ag.last_trajectory
    assert out.shape[0] == 2 and len(traj) == 3
    sampled = seen[-3:]  # the inversion's own forwards come first (batch 1)
    assert all(x.shape[0] == 6 for x, _ in sampled)
    for x, t in sampled:
        assert torch.allclose(x[0], traj[t][0], atol=1e-5) and torch.allclose(x[3], traj[t][0], atol=1e-5)
    # the inversion trajectory is not the forward-noised latent
    z = ag.encode_style(img, kw["height"], kw["width"]).float()
    eps = torch.randn(z.shape, generator=torch.Generator().manual_seed(0))
    t = sampled[-1][1]
    a = ag._alpha(t)
    assert not torch.allclose(traj[t], a ** 0.5 * z + (1 - a) ** 0.5 * eps, atol=1e-3)
    with pytest.raises(ValueError, match="inversion"):
        AlignedGenPipeline(_pipe("flux"))(PROMPTS[:2], style_image=img, inversion="ddim")
    with pytest.raises(ValueError, match="inversion"):
        ag(PROMPTS[:2], style_image=img, inversion="exact")

