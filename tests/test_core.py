"""The framework-free core: reference attention, the effect stack, call bookkeeping, RoPE helpers."""

import pytest
import torch

from attnlab.processors import KEEP, STAGES, AttentionCall, Effect, EffectStack, Site, TokenLayout
from attnlab.processors.call import RopeInfo
from attnlab.processors.reference import attention_probs, reference_attention, sdpa_kernel

SITE = Site("flux", "joint", 3, "transformer_blocks.3.attn")


def qkv(b=2, h=3, n=17, m=None, d=8, dtype=torch.float32):
    m = n if m is None else m
    g = torch.Generator().manual_seed(1)
    return (torch.randn(b, h, n, d, generator=g, dtype=dtype), torch.randn(b, h, m, d, generator=g, dtype=dtype),
            torch.randn(b, h, m, d, generator=g, dtype=dtype))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_reference_matches_sdpa(dtype, tol):
    q, k, v = qkv(m=11, dtype=dtype)
    bias = torch.randn(2, 1, 17, 11, dtype=dtype)
    keep = torch.rand(2, 3, 17, 11) > 0.3
    keep[..., 0] = True
    for mask in (None, bias, keep):
        for scale in (None, 0.7):
            ref = reference_attention(q, k, v, mask, scale)
            assert torch.allclose(ref, sdpa_kernel(q, k, v, mask, scale), atol=tol, rtol=0)


def test_probs_rows_sum_to_one():
    q, k, _ = qkv(dtype=torch.float64)
    assert torch.allclose(attention_probs(q, k).sum(-1), torch.ones(2, 3, 17, dtype=torch.float64))


class Record(Effect):
    stage = "observe"

    def __init__(self, log, tag, stage="observe"):
        self.log, self.tag, self.stage = log, tag, stage

    def __call__(self, call, attend):
        self.log.append((self.tag, call.q.clone()))
        return attend(call.q, call.k, call.v)


class ScaleQ(Effect):
    stage = "scale"

    def __init__(self, f):
        self.f = f

    def __call__(self, call, attend):
        return attend(call.q * self.f, call.k, call.v)


class DropMask(Effect):
    stage = "mask"

    def __call__(self, call, attend):
        return attend(call.q, call.k, call.v, mask=None)


class Blend(Effect):
    stage = "blend"

    def __call__(self, call, attend):
        return 0.5 * attend(call.q, call.k, call.v) + 0.5 * call.v


def test_empty_stack_is_the_kernel_bit_exact():
    q, k, v = qkv()
    call = AttentionCall(q, k, v, SITE)
    assert torch.equal(EffectStack([]).run(call, sdpa_kernel), sdpa_kernel(q, k, v))


def test_stack_orders_by_stage_and_inner_effects_see_outer_changes():
    log = []
    effects = [ScaleQ(2.0), Record(log, "kernel-side", stage="kernel"), Record(log, "observer")]
    stack = EffectStack(effects)
    assert [e.stage for e in stack.effects] == ["observe", "scale", "kernel"]
    q, k, v = qkv()
    out = stack.run(AttentionCall(q, k, v, SITE), sdpa_kernel)
    assert [t for t, _ in log] == ["observer", "kernel-side"]
    assert torch.equal(log[0][1], q) and torch.equal(log[1][1], q * 2.0)
    assert torch.equal(out, sdpa_kernel(q * 2.0, k, v))


def test_blend_then_scale_composes_like_the_formula():
    q, k, v = qkv()
    out = EffectStack([ScaleQ(1.5), Blend()]).run(AttentionCall(q, k, v, SITE), sdpa_kernel)
    assert torch.allclose(out, 0.5 * reference_attention(q * 1.5, k, v) + 0.5 * v, atol=1e-6)


def test_attend_keeps_mask_and_scale_unless_told():
    q, k, v = qkv()
    mask = torch.zeros(2, 1, 17, 17)
    mask[..., :5] = float("-inf")
    call = AttentionCall(q, k, v, SITE, mask=mask, scale=0.3)
    kept = EffectStack([ScaleQ(1.0)]).run(call, sdpa_kernel)
    assert torch.equal(kept, sdpa_kernel(q, k, v, mask, 0.3))
    dropped = EffectStack([DropMask()]).run(call, sdpa_kernel)
    assert torch.equal(dropped, sdpa_kernel(q, k, v, None, 0.3))
    assert repr(KEEP) == "KEEP"


def test_unknown_stage_is_rejected():
    bad = ScaleQ(1.0)
    bad.stage = "sometime"
    with pytest.raises(ValueError, match="stage"):
        EffectStack([bad])
    assert STAGES[0] == "observe" and STAGES[-1] == "kernel"


def test_for_site_filters_with_applies():
    class SelfOnly(ScaleQ):
        def applies(self, site):
            return site.kind != "cross"

    e = SelfOnly(2.0)
    assert len(EffectStack.for_site([e], SITE)) == 1
    assert not EffectStack.for_site([e], Site("unet", "cross", 0, "x.attn2"))


def test_rows_with_roles():
    q, k, v = qkv(b=4)
    call = AttentionCall(q, k, v, SITE, roles=("uncond", "uncond", "cond", "cond"))
    assert call.rows_with("cond") == [2, 3]
    assert AttentionCall(q, k, v, SITE).rows_with("cond") == [0, 1, 2, 3]


def test_token_layout_grid_for():
    t = TokenLayout(grid=(1, 32, 48), scale=(1, 16, 16))
    assert t.grid_for((1, 512, 768)) == (1, 32, 48)
    assert t.grid_for((1, 520, 760)) == (1, 33, 48)  # rounds up like padded patchifiers
    wan = TokenLayout(grid=(21, 30, 52), scale=(4, 16, 16))
    assert wan.grid_for((81, 480, 832)) == (21, 30, 52)
    with pytest.raises(ValueError):
        TokenLayout().grid_for((1, 64, 64))


def _flux_rope(ids):
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    return FluxPosEmbed(theta=10000, axes_dim=[2, 2, 4])(ids)


def _rotate(x, cos, sin):
    from diffusers.models.embeddings import apply_rotary_emb

    return apply_rotary_emb(x, (cos, sin), sequence_dim=2)


def test_rope_shift_equals_rope_at_shifted_positions_and_undo_inverts():
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(5.0), indexing="ij"), -1).reshape(-1, 3)
    cos, sin = _flux_rope(ids)
    rope = RopeInfo(cos.float(), sin.float(), _rotate, _flux_rope)
    x = torch.randn(2, 3, ids.shape[0], 8)
    rotated = _rotate(x, cos.float(), sin.float())
    delta = torch.zeros_like(ids)
    delta[:, 2] = 5  # +W columns, the ShiftPE default
    shifted = rope.shift(rotated, delta)
    cos2, sin2 = _flux_rope(ids + delta)
    assert (shifted - _rotate(x, cos2.float(), sin2.float())).abs().max() <= 1e-6
    assert torch.allclose(rope.undo(rotated), x, atol=1e-5)


def test_unet_level_rounds_up_like_stride_two_convolutions():
    from attnlab.processors.call import unet_level

    assert unet_level(64, 64, 4096) == (64, 64, 0)
    assert unet_level(64, 64, 64) == (8, 8, 3)
    assert unet_level(64, 96, 384) == (16, 24, 2)
    assert unet_level(15, 17, 8 * 9) == (8, 9, 1)  # odd latents: ceil at every level
    assert unet_level(64, 64, 1000) is None
