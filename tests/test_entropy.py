"""Entropy scaling: the spec's invariants (specs/entropy_scaling.md §9) on synthetic calls."""

import math

import pytest
import torch

from attnlab.processors import AttentionCall, EffectStack, EntropyScaling, Site, TokenLayout, entropy_lambda
from attnlab.processors.reference import attention_probs, sdpa_kernel

SELF = Site("unet", "self", 0, "down_blocks.0.attentions.0.transformer_blocks.0.attn1")
CROSS = Site("unet", "cross", 0, "down_blocks.0.attentions.0.transformer_blocks.0.attn2")


def unet_layout(level: int, size: int, native: int = 512, vae: int = 8) -> TokenLayout:
    """The layout the diffusers/ComfyUI hosts build for a UNet level (checked against the hosts elsewhere)."""
    px = vae * 2**level
    scale = (1, px, px)
    probe = TokenLayout(scale=scale)
    grid = probe.grid_for((1, size, size))
    n = math.prod(grid)
    return TokenLayout(q_image=slice(0, n), k_image=slice(0, n), grid=grid, scale=scale,
                       native_grid=probe.grid_for((1, native, native)))


def call_for(layout: TokenLayout, site=SELF, d=8, n_text=0):
    n = layout.image_tokens + n_text
    q = torch.randn(1, 2, n, d)
    return AttentionCall(q, torch.randn(1, 2, n, d), torch.randn(1, 2, n, d), site, layout)


@pytest.mark.parametrize(
    "t,n,expected",
    [
        (4096, 1024, 0.913), (4096, 9216, 1.048), (4096, 16384, 1.080),  # SD1.5 level 0
        (64, 16, 0.816), (64, 144, 1.093), (64, 256, 1.155),  # SD1.5 mid block
        (1024, 256, 0.894), (1024, 4096, 1.095),  # SDXL down-2 + mid
        (4096, 16384, 1.080), (4429, 16717, 1.076),  # SD3 image-only / joint at 2048²
        (4608, 16896, 1.074), (4608, 1536, 0.933),  # FLUX joint at 2048² / 512²
    ],
)
def test_lambda_table_of_the_spec(t, n, expected):
    assert entropy_lambda(n, t) == pytest.approx(expected, abs=5e-4)


def test_lambda_monotone_and_identity_at_t():
    lams = [entropy_lambda(n, 4096) for n in range(64, 20000, 97)]
    assert all(a < b for a, b in zip(lams, lams[1:]))
    assert entropy_lambda(4096, 4096) == 1.0
    assert entropy_lambda(1000, 4096) < 1 < entropy_lambda(5000, 4096)
    assert entropy_lambda(5000, 4096, strength=0.0) == 1.0
    assert entropy_lambda(5000, 4096, strength=2.0) == pytest.approx(entropy_lambda(5000, 4096) ** 2)


@pytest.mark.parametrize(
    "level,size,expected",
    [(0, 256, 0.913), (0, 768, 1.048), (0, 1024, 1.080), (3, 256, 0.816), (3, 768, 1.093), (3, 1024, 1.155)],
)
def test_per_level_T_from_sd15_geometry(level, size, expected):
    effect = EntropyScaling()
    assert effect.lam(call_for(unet_layout(level, size))) == pytest.approx(expected, abs=5e-4)


def test_native_size_is_bit_exact():
    call = call_for(unet_layout(1, 512))
    out = EffectStack([EntropyScaling()]).run(call, sdpa_kernel)
    assert torch.equal(out, sdpa_kernel(call.q, call.k, call.v))


def test_zero_strength_is_not_installed_and_cross_is_never_scaled():
    assert not EntropyScaling(strength=0.0).applies(SELF)
    assert not EntropyScaling().applies(CROSS)
    assert EntropyScaling().applies(Site("flux", "single", 20, "single_transformer_blocks.1.attn"))


def test_q_times_lambda_equals_scale_over_sqrt_d():
    call = call_for(unet_layout(0, 1024), d=16)
    lam = EntropyScaling().lam(call)
    via_q = EffectStack([EntropyScaling()]).run(call, sdpa_kernel)
    via_scale = sdpa_kernel(call.q, call.k, call.v, None, lam / math.sqrt(16))
    assert torch.allclose(via_q, via_scale, atol=1e-6)


def test_train_size_option_and_odd_aspect():
    layout = unet_layout(0, 512)
    t = TokenLayout(q_image=layout.q_image, k_image=layout.k_image, grid=(1, 64, 96), scale=(1, 8, 8),
                    native_grid=(1, 64, 64))
    call = AttentionCall(torch.randn(1, 1, 6144, 8), torch.randn(1, 1, 6144, 8), torch.randn(1, 1, 6144, 8), SELF, t)
    assert EntropyScaling().counts(call) == (6144, 4096)
    assert EntropyScaling(train_size=(512, 768)).counts(call) == (6144, 6144)  # 512x768 = this grid
    assert EntropyScaling(train_size=(520, 776)).counts(call) == (6144, 65 * 97)


def joint_layout(n_img_grid, native_grid, n_text, text_first=True):
    n_img = math.prod(n_img_grid)
    text = slice(0, n_text) if text_first else slice(n_img, n_img + n_text)
    image = slice(n_text, n_text + n_img) if text_first else slice(0, n_img)
    return TokenLayout(q_image=image, k_image=image, q_text=text, k_text=text, grid=n_img_grid,
                       scale=(1, 16, 16), native_grid=native_grid, text_first=text_first)


def test_joint_vs_image_token_counts():
    layout = joint_layout((1, 8, 8), (1, 4, 4), 10)
    call = call_for(layout, site=Site("flux", "joint", 0, "transformer_blocks.0.attn"), n_text=10)
    assert EntropyScaling().counts(call) == (74, 26)
    assert EntropyScaling(token_count="image").counts(call) == (64, 16)


@pytest.mark.parametrize("kwargs,match", [
    (dict(strength=-1), "strength"), (dict(strength=float("nan")), "strength"),
    (dict(token_count="text"), "token_count"), (dict(train_size=(0, 512)), "train_size"),
    (dict(train_size=(1, 2, 3, 4)), "train_size"),
])
def test_bad_parameters_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EntropyScaling(**kwargs)


def _entropy(p):
    return -(p * p.clamp_min(1e-30).log()).sum(-1).mean().item()


def test_entropy_moves_toward_training_value():
    """Spec §9.5 with peaked logits: at N != T the scaled row entropy is closer to its value at N = T."""
    g = torch.Generator().manual_seed(0)
    d, t = 16, 1024

    def entropy_at(n, lam):
        q = torch.randn(1, 1, 64, d, generator=g) * 2.0
        k = torch.randn(1, 1, n, d, generator=g) * 2.0
        return _entropy(attention_probs(q * lam, k))

    ref = entropy_at(t, 1.0)
    for n in (256, 4096):
        before = entropy_at(n, 1.0)
        after = entropy_at(n, entropy_lambda(n, t))
        assert abs(after - ref) < abs(before - ref)
