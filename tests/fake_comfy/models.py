"""Tiny fake denoisers with ComfyUI's call pattern into attention (our own code, MIT).

Each fake reproduces, for the tiny configs used to record ``tests/traces`` from a real ComfyUI
v0.3.64, what a node pack can observe: module/class/attribute names, the number and order of
attention calls per forward, the q/k/v layouts, ``heads`` positional vs keyword, skip flags, mask
passing, token order, the ``transformer_options`` keys and formats, the UNet attention patch and
replace points and the DiT ``patches_replace["dit"]`` block hooks. The maths is a real (small,
seeded) computation whose output depends on every attention call, but it is not ComfyUI's numerics.

Families (same names as ``tests/real_comfy.py``): ``sd15``, ``sdxl``, ``sd3``, ``sd3_x`` (MMDiT-X
self-attention in block 0 + RMS qk-norm, SD3.5-M style), ``flux``, ``wan_t2v``, ``wan_i2v``.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import types

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import attention as _attention
from .patcher import ModelPatcher, WrapperExecutor, WrappersMP, get_all_wrappers

FAMILIES = ("sd15", "sdxl", "sd3", "sd3_x", "flux", "wan_t2v", "wan_i2v")

#: text tokens per conditioning, latent shape per sample, as in the recorded scenarios
TEXT_LEN = {"sd15": 7, "sdxl": 7, "sd3": 6, "sd3_x": 6, "flux": 5, "wan_t2v": 8, "wan_i2v": 8}
LATENT_SHAPE = {"sd15": (4, 16, 16), "sdxl": (4, 16, 16), "sd3": (16, 16, 16), "sd3_x": (16, 16, 16),
                "flux": (16, 16, 16), "wan_t2v": (16, 2, 8, 8), "wan_i2v": (16, 2, 8, 8)}
CLIP_VISION_TOKENS = 257


# ============================================================================= shared pieces
def sinusoid(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class RMSNorm(nn.Module):
    """RMS norm with a ``weight`` (MMDiT, Wan) or ``scale`` (Flux) parameter."""

    def __init__(self, dim: int, eps: float = 1e-6, param: str = "weight"):
        super().__init__()
        self.eps = eps
        self._param = param
        setattr(self, param, nn.Parameter(torch.ones(dim)))

    def forward(self, x):
        w = getattr(self, self._param)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * w


def is_norm(m: nn.Module) -> bool:
    return isinstance(m, (nn.LayerNorm, nn.GroupNorm)) or "norm" in type(m).__name__.lower()


@torch.no_grad()
def init_weights(module: nn.Module, seed: int = 0) -> None:
    """Every parameter from one seeded generator: ``randn * fan_in**-0.5`` (1-D: ``0.02``);
    norm modules (by type or class name) get weight/scale 1 and bias 0."""
    g = torch.Generator().manual_seed(seed)
    for mod in module.modules():
        norm = is_norm(mod)
        for name, p in mod.named_parameters(recurse=False):
            if norm and p.ndim == 1:
                p.fill_(0.0 if name == "bias" else 1.0)
            else:
                fan_in = max(1, math.prod(p.shape[1:])) if p.ndim >= 2 else 1
                std = fan_in ** -0.5 if p.ndim >= 2 else 0.02
                p.copy_(torch.randn(p.shape, generator=g) * std)
    for name, b in module.named_buffers():
        if name.endswith("pos_embed") and b.is_floating_point():
            b.copy_(torch.randn(b.shape, generator=g) * 0.02)


def rope_table(pos: torch.Tensor, dim: int, theta: float) -> torch.Tensor:
    """Rotation matrices ``[[cos, -sin], [sin, cos]]`` per position and frequency: ``(..., dim/2, 2, 2)``."""
    exponent = torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim
    omega = (1.0 / theta ** exponent).float()
    ang = pos.float()[..., None] * omega
    c, s = torch.cos(ang), torch.sin(ang)
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


def rotate(x: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
    """Apply a rope table to the last dim of ``x`` (pairs of channels)."""
    xp = x.float().reshape(*x.shape[:-1], -1, 1, 2)
    out = pe[..., 0] * xp[..., 0] + pe[..., 1] * xp[..., 1]
    return out.reshape(x.shape).type_as(x)


class EmbedND(nn.Module):
    """Multi-axis rope: ``ids (B, L, n_axes)`` -> ``(B, 1, L, sum(axes_dim)/2, 2, 2)``."""

    def __init__(self, dim: int, theta: float, axes_dim: list):
        super().__init__()
        self.dim = dim
        self.theta = theta
        self.axes_dim = list(axes_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        parts = [rope_table(ids[..., i], self.axes_dim[i], self.theta) for i in range(ids.shape[-1])]
        return torch.cat(parts, dim=-3).unsqueeze(1)


def _dit_replace(transformer_options: dict, key):
    return transformer_options.get("patches_replace", {}).get("dit", {}).get(key)


# ============================================================================= SD1.5 / SDXL UNet
class TimestepEmbedSequential(nn.Sequential):
    pass


class ResBlock(nn.Module):
    def __init__(self, channels: int, emb_channels: int, out_channels: int):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(8, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(nn.GroupNorm(8, out_channels), nn.SiLU(), nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x, emb):
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, output_shape=None):
        size = tuple(output_shape[2:]) if output_shape is not None else tuple(s * 2 for s in x.shape[2:])
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class CrossAttention(nn.Module):
    def __init__(self, query_dim, context_dim=None, heads=8, dim_head=64, attn_precision=None, attn_fn=None):
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.dim_head = dim_head
        self.attn_precision = attn_precision
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))
        self._attn = attn_fn

    def forward(self, x, context=None, value=None, mask=None, transformer_options={}):
        q = self.to_q(x)
        context = x if context is None else context
        k = self.to_k(context)
        v = self.to_v(value if value is not None else context)
        if mask is None:
            out = self._attn(q, k, v, self.heads, attn_precision=self.attn_precision,
                             transformer_options=transformer_options)
        else:  # masked path passes the mask as the 5th positional argument
            out = self._attn(q, k, v, self.heads, mask, attn_precision=self.attn_precision,
                             transformer_options=transformer_options)
        return self.to_out(out)


class FeedForward(nn.Module):
    def __init__(self, dim, mult=2):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim * mult), nn.GELU(), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim, n_heads, d_head, context_dim, attn_precision=None, attn_fn=None):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, n_heads, d_head, attn_precision, attn_fn)
        self.attn2 = CrossAttention(dim, context_dim, n_heads, d_head, attn_precision, attn_fn)
        self.ff = FeedForward(dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.n_heads = n_heads
        self.d_head = d_head
        self.attn_precision = attn_precision
        self.disable_self_attn = False

    @staticmethod
    def _replace_for(replaces: dict, block, block_index):
        if block is None:
            return None
        full = (block[0], block[1], block_index)
        if full in replaces:
            return replaces[full]
        return replaces.get(block)

    def _attend(self, which, attn, n, context, patches, replaces, extra_options, transformer_options):
        """One attention site: ``<which>_patch`` list, then the replace or the module, then output patches."""
        value = None
        if f"{which}_patch" in patches:
            if context is None:
                context = n
            value = context
            for p in patches[f"{which}_patch"]:
                n, context, value = p(n, context, value, extra_options)
        replace = self._replace_for(replaces.get(which, {}), transformer_options.get("block"),
                                    transformer_options.get("block_index", 0))
        if replace is not None:
            if context is None:
                context = n
            if value is None:
                value = context
            q = attn.to_q(n)
            k = attn.to_k(context)
            v = attn.to_v(value)
            n = attn.to_out(replace(q, k, v, extra_options))
        else:
            n = attn(n, context=context, value=value, transformer_options=transformer_options)
        for p in patches.get(f"{which}_output_patch", []):
            n = p(n, extra_options)
        return n

    def forward(self, x, context=None, transformer_options={}):
        patches = transformer_options.get("patches", {})
        replaces = transformer_options.get("patches_replace", {})
        extra_options = {k: v for k, v in transformer_options.items() if k not in ("patches", "patches_replace")}
        extra_options["n_heads"] = self.n_heads
        extra_options["dim_head"] = self.d_head
        extra_options["attn_precision"] = self.attn_precision

        n = self._attend("attn1", self.attn1, self.norm1(x), None, patches, replaces, extra_options,
                         transformer_options)
        x = x + n
        for p in patches.get("middle_patch", []):
            x = p(x, extra_options)
        n = self._attend("attn2", self.attn2, self.norm2(x), context, patches, replaces, extra_options,
                         transformer_options)
        x = x + n
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    def __init__(self, in_channels, n_heads, d_head, depth=1, context_dim=None, use_linear=False, attn_fn=None):
        super().__init__()
        inner = n_heads * d_head
        self.in_channels = in_channels
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(8, in_channels)
        self.proj_in = nn.Linear(in_channels, inner) if use_linear else nn.Conv2d(in_channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner, n_heads, d_head, context_dim, attn_fn=attn_fn) for _ in range(depth)])
        self.proj_out = nn.Linear(inner, in_channels) if use_linear else nn.Conv2d(inner, in_channels, 1)

    def forward(self, x, context=None, transformer_options={}):
        b, c, h, w = x.shape
        transformer_options["activations_shape"] = list(x.shape)
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = x.movedim(1, 3).flatten(1, 2)
        if self.use_linear:
            x = self.proj_in(x)
        for i, block in enumerate(self.transformer_blocks):
            transformer_options["block_index"] = i
            x = block(x, context=context, transformer_options=transformer_options)
        if self.use_linear:
            x = self.proj_out(x)
        x = x.reshape(b, h, w, -1).movedim(3, 1)
        if not self.use_linear:
            x = self.proj_out(x)
        return x + x_in


def _run_sequential(seq, x, emb, context, transformer_options, output_shape=None):
    for layer in seq:
        if isinstance(layer, ResBlock):
            x = layer(x, emb)
        elif isinstance(layer, SpatialTransformer):
            x = layer(x, context, transformer_options)
            if "transformer_index" in transformer_options:
                transformer_options["transformer_index"] += 1
        elif isinstance(layer, Upsample):
            x = layer(x, output_shape=output_shape)
        else:
            x = layer(x)
    return x


class UNetModel(nn.Module):
    """Tiny UNet with ComfyUI's ``openaimodel.UNetModel`` block layout for channel_mult (1, 2) and
    one res block per level: input blocks 1 and 3, the middle block and all four output blocks hold
    one ``SpatialTransformer`` (7 per forward, 2 attention calls each)."""

    def __init__(self, model_channels=32, channel_mult=(1, 2), in_channels=4, out_channels=4, context_dim=32,
                 num_heads=-1, num_head_channels=-1, use_linear_in_transformer=False, adm_in_channels=None,
                 attn_fn=None):
        super().__init__()
        assert tuple(channel_mult) == (1, 2), "the fake UNet mirrors the tiny (1, 2) layout only"
        self.dtype = torch.float32
        self.model_channels = model_channels
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.context_dim = context_dim
        self.num_classes = "sequential" if adm_in_channels else None
        emb_dim = model_channels * 4
        c1, c2 = model_channels * channel_mult[0], model_channels * channel_mult[1]

        def st(ch):
            heads = ch // num_head_channels if num_head_channels != -1 else num_heads
            return SpatialTransformer(ch, heads, ch // heads, 1, context_dim, use_linear_in_transformer, attn_fn)

        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if adm_in_channels:
            self.label_emb = nn.Sequential(nn.Sequential(nn.Linear(adm_in_channels, emb_dim), nn.SiLU(),
                                                         nn.Linear(emb_dim, emb_dim)))
        S = TimestepEmbedSequential
        self.input_blocks = nn.ModuleList([
            S(nn.Conv2d(in_channels, c1, 3, padding=1)),
            S(ResBlock(c1, emb_dim, c1), st(c1)),
            S(Downsample(c1)),
            S(ResBlock(c1, emb_dim, c2), st(c2)),
        ])
        self.middle_block = S(ResBlock(c2, emb_dim, c2), st(c2), ResBlock(c2, emb_dim, c2))
        self.output_blocks = nn.ModuleList([
            S(ResBlock(c2 + c2, emb_dim, c2), st(c2)),
            S(ResBlock(c2 + c1, emb_dim, c2), st(c2), Upsample(c2)),
            S(ResBlock(c2 + c1, emb_dim, c1), st(c1)),
            S(ResBlock(c1 + c1, emb_dim, c1), st(c1)),
        ])
        self.out = nn.Sequential(nn.GroupNorm(8, c1), nn.SiLU(), nn.Conv2d(c1, out_channels, 3, padding=1))

    def forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options={}, **kwargs):
        return WrapperExecutor.new_class_executor(
            self._forward, self, get_all_wrappers(WrappersMP.DIFFUSION_MODEL, transformer_options)
        ).execute(x, timesteps, context, y, control, transformer_options, **kwargs)

    def _forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options={}, **kwargs):
        transformer_options["original_shape"] = list(x.shape)
        transformer_options["transformer_index"] = 0
        patches = transformer_options.get("patches", {})
        assert (y is not None) == (self.num_classes is not None), "y iff the model is class-conditional"
        emb = self.time_embed(sinusoid(timesteps, self.model_channels).to(x.dtype))
        for p in patches.get("emb_patch", []):
            emb = p(emb, self.model_channels, transformer_options)
        if self.num_classes is not None:
            emb = emb + self.label_emb(y)
        hs = []
        h = x
        for i, module in enumerate(self.input_blocks):
            transformer_options["block"] = ("input", i)
            h = _run_sequential(module, h, emb, context, transformer_options)
            for p in patches.get("input_block_patch", []):
                h = p(h, transformer_options)
            hs.append(h)
            for p in patches.get("input_block_patch_after_skip", []):
                h = p(h, transformer_options)
        transformer_options["block"] = ("middle", 0)
        h = _run_sequential(self.middle_block, h, emb, context, transformer_options)
        for i, module in enumerate(self.output_blocks):
            transformer_options["block"] = ("output", i)
            hsp = hs.pop()
            for p in patches.get("output_block_patch", []):
                h, hsp = p(h, hsp, transformer_options)
            h = torch.cat([h, hsp], dim=1)
            output_shape = hs[-1].shape if hs else None
            h = _run_sequential(module, h, emb, context, transformer_options, output_shape)
        return self.out(h.type(x.dtype))


# ============================================================================= SD3 MMDiT
def _modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class SelfAttention(nn.Module):
    """MMDiT attention half: ``pre_attention`` gives q, k ``(B, L, H*D)`` (after ln_q/ln_k) and v
    ``(B, L, H, D)`` (never flattened, as in ComfyUI)."""

    def __init__(self, dim, num_heads, qkv_bias=True, pre_only=False, qk_norm=None):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.pre_only = pre_only
        if not pre_only:
            self.proj = nn.Linear(dim, dim)
        if qk_norm == "rms":
            self.ln_q = RMSNorm(self.head_dim)
            self.ln_k = RMSNorm(self.head_dim)
        else:
            self.ln_q = nn.Identity()
            self.ln_k = nn.Identity()

    def pre_attention(self, x):
        b, l, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, l, 3, self.num_heads, self.head_dim).movedim(2, 0)
        return self.ln_q(q).reshape(b, l, -1), self.ln_k(k).reshape(b, l, -1), v

    def post_attention(self, x):
        return self.proj(x)


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class DismantledBlock(nn.Module):
    def __init__(self, dim, num_heads, pre_only=False, qk_norm=None, x_block_self_attn=False):
        super().__init__()
        self.pre_only = pre_only
        self.x_block_self_attn = bool(x_block_self_attn)
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(dim, num_heads, pre_only=pre_only, qk_norm=qk_norm)
        if self.x_block_self_attn:
            self.attn2 = SelfAttention(dim, num_heads, qk_norm=qk_norm)
        if not pre_only:
            self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.mlp = Mlp(dim, dim * 4)
        n_mods = 9 if self.x_block_self_attn else (6 if not pre_only else 2)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, n_mods * dim))

    def pre_attention(self, x, c):
        mods = self.adaLN_modulation(c).chunk(2 if self.pre_only else 6, dim=1)
        qkv = self.attn.pre_attention(_modulate(self.norm1(x), mods[0], mods[1]))
        return qkv, (None if self.pre_only else (x,) + tuple(mods[2:6]))

    def pre_attention_x(self, x, c):
        m = self.adaLN_modulation(c).chunk(9, dim=1)
        h = self.norm1(x)
        qkv = self.attn.pre_attention(_modulate(h, m[0], m[1]))
        qkv2 = self.attn2.pre_attention(_modulate(h, m[6], m[7]))
        return qkv, qkv2, (x, m[2], m[3], m[4], m[5], m[8])

    def post_attention(self, attn, x, gate_msa, shift_mlp, scale_mlp, gate_mlp):
        x = x + gate_msa.unsqueeze(1) * self.attn.post_attention(attn)
        return x + gate_mlp.unsqueeze(1) * self.mlp(_modulate(self.norm2(x), shift_mlp, scale_mlp))

    def post_attention_x(self, attn, attn2, x, gate_msa, shift_mlp, scale_mlp, gate_mlp, gate_msa2):
        x = x + gate_msa.unsqueeze(1) * self.attn.post_attention(attn) \
            + gate_msa2.unsqueeze(1) * self.attn2.post_attention(attn2)
        return x + gate_mlp.unsqueeze(1) * self.mlp(_modulate(self.norm2(x), shift_mlp, scale_mlp))


class JointBlock(nn.Module):
    def __init__(self, dim, num_heads, pre_only, qk_norm=None, x_block_self_attn=False, attn_fn=None):
        super().__init__()
        self.context_block = DismantledBlock(dim, num_heads, pre_only=pre_only, qk_norm=qk_norm)
        self.x_block = DismantledBlock(dim, num_heads, qk_norm=qk_norm, x_block_self_attn=x_block_self_attn)
        self._attn = attn_fn

    def forward(self, context, x, c, transformer_options={}, **kwargs):
        cb, xb = self.context_block, self.x_block
        ctx_qkv, ctx_inter = cb.pre_attention(context, c)
        if xb.x_block_self_attn:
            x_qkv, x_qkv2, x_inter = xb.pre_attention_x(x, c)
        else:
            x_qkv, x_inter = xb.pre_attention(x, c)
        q, k, v = (torch.cat((ctx_qkv[i], x_qkv[i]), dim=1) for i in range(3))  # text first
        attn = self._attn(q, k, v, heads=xb.attn.num_heads, transformer_options=transformer_options)
        n_ctx = ctx_qkv[0].shape[1]
        ctx_attn, x_attn = attn[:, :n_ctx], attn[:, n_ctx:]
        context = None if cb.pre_only else cb.post_attention(ctx_attn, *ctx_inter)
        if xb.x_block_self_attn:
            attn2 = self._attn(x_qkv2[0], x_qkv2[1], x_qkv2[2], heads=xb.attn2.num_heads,
                               transformer_options=transformer_options)
            x = xb.post_attention_x(x_attn, attn2, *x_inter)
        else:
            x = xb.post_attention(x_attn, *x_inter)
        return context, x


class PatchEmbed(nn.Module):
    def __init__(self, patch_size, in_chans, embed_dim):
        super().__init__()
        self.patch_size = (patch_size, patch_size)
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class MMDiT(nn.Module):
    def __init__(self, in_channels=16, out_channels=16, patch_size=2, depth=2, adm_in_channels=32,
                 context_in=32, pos_embed_max_size=16, qk_norm=None, x_block_self_attn_layers=(),
                 register_length=0, attn_fn=None):
        super().__init__()
        self.dtype = torch.float32
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.patch_size = patch_size
        self.depth = depth
        self.hidden_size = 64 * depth
        self.num_heads = depth
        self.register_length = register_length
        self.pos_embed_max_size = pos_embed_max_size
        self.x_block_self_attn_layers = list(x_block_self_attn_layers)
        hs = self.hidden_size
        self.x_embedder = PatchEmbed(patch_size, in_channels, hs)
        self.register_buffer("pos_embed", torch.zeros(1, pos_embed_max_size ** 2, hs))
        self.t_embedder = nn.Sequential(nn.Linear(256, hs), nn.SiLU(), nn.Linear(hs, hs))
        self.y_embedder = nn.Sequential(nn.Linear(adm_in_channels, hs), nn.SiLU(), nn.Linear(hs, hs))
        self.context_embedder = nn.Linear(context_in, hs)
        if register_length > 0:
            self.register = nn.Parameter(torch.zeros(1, register_length, hs))
        self.joint_blocks = nn.ModuleList([
            JointBlock(hs, self.num_heads, pre_only=(i == depth - 1), qk_norm=qk_norm,
                       x_block_self_attn=(i in self.x_block_self_attn_layers), attn_fn=attn_fn)
            for i in range(depth)])
        self.final_norm = nn.LayerNorm(hs, elementwise_affine=False, eps=1e-6)
        self.final_adaLN = nn.Sequential(nn.SiLU(), nn.Linear(hs, 2 * hs))
        self.final_linear = nn.Linear(hs, patch_size * patch_size * out_channels)

    def cropped_pos_embed(self, h, w):
        m = self.pos_embed_max_size
        top, left = (m - h) // 2, (m - w) // 2
        grid = self.pos_embed.reshape(1, m, m, -1)[:, top:top + h, left:left + w]
        return grid.reshape(1, h * w, -1)

    def forward_core_with_concat(self, x, c_mod, context=None, control=None, transformer_options={}):
        if self.register_length > 0:
            context = torch.cat((self.register.expand(x.shape[0], -1, -1), context), 1)
        for i, block in enumerate(self.joint_blocks):
            replace = _dit_replace(transformer_options, ("double_block", i))
            if replace is not None:
                def original(args, block=block):
                    txt, img = block(args["txt"], args["img"], c=args["vec"], transformer_options=args["transformer_options"])
                    return {"txt": txt, "img": img}
                out = replace({"img": x, "txt": context, "vec": c_mod, "transformer_options": transformer_options},
                              {"original_block": original})
                context, x = out["txt"], out["img"]
            else:
                context, x = block(context, x, c=c_mod, transformer_options=transformer_options)
        shift, scale = self.final_adaLN(c_mod).chunk(2, dim=1)
        return self.final_linear(_modulate(self.final_norm(x), shift, scale))

    def forward(self, x, t, y=None, context=None, control=None, transformer_options={}):
        b, _, h, w = x.shape
        p = self.patch_size
        gh, gw = (h + 1) // p, (w + 1) // p
        tokens = self.x_embedder(x) + self.cropped_pos_embed(gh, gw)
        c = self.t_embedder(sinusoid(t, 256).to(x.dtype))
        if y is not None:
            c = c + self.y_embedder(y)
        if context is not None:
            context = self.context_embedder(context)
        out = self.forward_core_with_concat(tokens, c, context, control, transformer_options)
        out = out.reshape(b, gh, gw, p, p, self.out_channels).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(b, self.out_channels, gh * p, gw * p)[:, :, :h, :w]


class OpenAISignatureMMDITWrapper(MMDiT):
    """No ``DIFFUSION_MODEL`` wrapper support, as in ComfyUI."""

    def forward(self, x, timesteps, context=None, y=None, control=None, transformer_options={}, **kwargs):
        return super().forward(x, timesteps, context=context, y=y, control=control,
                               transformer_options=transformer_options)


# ============================================================================= Flux
class QKNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.query_norm = RMSNorm(dim, param="scale")
        self.key_norm = RMSNorm(dim, param="scale")

    def forward(self, q, k, v):
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class FluxSelfAttention(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias=False):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)


FluxSelfAttention.__name__ = FluxSelfAttention.__qualname__ = "SelfAttention"


@dataclasses.dataclass
class ModulationOut:  # a dataclass, as ComfyUI's, so torch.compile traces the fake model too
    shift: torch.Tensor
    scale: torch.Tensor
    gate: torch.Tensor


class Modulation(nn.Module):
    def __init__(self, dim, double):
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim)

    def forward(self, vec):
        out = self.lin(F.silu(vec))[:, None].chunk(self.multiplier, dim=-1)
        mk = lambda i: ModulationOut(out[i], out[i + 1], out[i + 2])  # noqa: E731
        return mk(0), (mk(3) if self.multiplier == 6 else None)


def flux_attention(q, k, v, pe, mask=None, transformer_options={}, attn_fn=None):
    """RoPE on q/k, then the backend with ``heads`` positional, ``skip_reshape=True``, ``mask=`` keyword."""
    if pe is not None:
        q, k = rotate(q, pe), rotate(k, pe)
    return attn_fn(q, k, v, q.shape[1], skip_reshape=True, mask=mask, transformer_options=transformer_options)


def _heads_split(qkv, num_heads):
    b, l, _ = qkv.shape
    return qkv.reshape(b, l, 3, num_heads, -1).permute(2, 0, 3, 1, 4)


class DoubleStreamBlock(nn.Module):
    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, qkv_bias=False, attn_fn=None):
        super().__init__()
        mlp = int(hidden_size * mlp_ratio)
        self.num_heads = num_heads
        self.hidden_size = hidden_size
        self.flipped_img_txt = False
        for side in ("img", "txt"):
            setattr(self, f"{side}_mod", Modulation(hidden_size, True))
            setattr(self, f"{side}_norm1", nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6))
            setattr(self, f"{side}_attn", FluxSelfAttention(hidden_size, num_heads, qkv_bias))
            setattr(self, f"{side}_norm2", nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6))
            setattr(self, f"{side}_mlp", nn.Sequential(nn.Linear(hidden_size, mlp), nn.GELU(approximate="tanh"),
                                                       nn.Linear(mlp, hidden_size)))
        self._attn = attn_fn

    def _pre(self, side, x, mod):
        a = getattr(self, f"{side}_attn")
        h = (1 + mod.scale) * getattr(self, f"{side}_norm1")(x) + mod.shift
        q, k, v = _heads_split(a.qkv(h), self.num_heads)
        q, k = a.norm(q, k, v)
        return q, k, v

    def _post(self, side, x, attn, mod1, mod2):
        x = x + mod1.gate * getattr(self, f"{side}_attn").proj(attn)
        h = (1 + mod2.scale) * getattr(self, f"{side}_norm2")(x) + mod2.shift
        return x + mod2.gate * getattr(self, f"{side}_mlp")(h)

    def forward(self, img, txt, vec, pe, attn_mask=None, transformer_options={}):
        img_mod1, img_mod2 = self.img_mod(vec)
        txt_mod1, txt_mod2 = self.txt_mod(vec)
        iq, ik, iv = self._pre("img", img, img_mod1)
        tq, tk, tv = self._pre("txt", txt, txt_mod1)
        attn = flux_attention(torch.cat((tq, iq), dim=2), torch.cat((tk, ik), dim=2), torch.cat((tv, iv), dim=2),
                              pe=pe, mask=attn_mask, transformer_options=transformer_options, attn_fn=self._attn)
        txt_attn, img_attn = attn[:, :txt.shape[1]], attn[:, txt.shape[1]:]
        img = self._post("img", img, img_attn, img_mod1, img_mod2)
        txt = self._post("txt", txt, txt_attn, txt_mod1, txt_mod2)
        return img, txt


class SingleStreamBlock(nn.Module):
    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, attn_fn=None):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.linear1 = nn.Linear(hidden_size, hidden_size * 3 + self.mlp_hidden_dim)
        self.linear2 = nn.Linear(hidden_size + self.mlp_hidden_dim, hidden_size)
        self.norm = QKNorm(hidden_size // num_heads)
        self.pre_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(hidden_size, False)
        self._attn = attn_fn

    def forward(self, x, vec, pe, attn_mask=None, transformer_options={}):
        mod, _ = self.modulation(vec)
        h = (1 + mod.scale) * self.pre_norm(x) + mod.shift
        qkv, mlp = torch.split(self.linear1(h), [3 * self.hidden_size, self.mlp_hidden_dim], dim=-1)
        q, k, v = _heads_split(qkv, self.num_heads)
        q, k = self.norm(q, k, v)
        attn = flux_attention(q, k, v, pe=pe, mask=attn_mask, transformer_options=transformer_options,
                              attn_fn=self._attn)
        return x + mod.gate * self.linear2(torch.cat((attn, self.mlp_act(mlp)), 2))


@dataclasses.dataclass
class FluxParams:
    in_channels: int
    out_channels: int
    vec_in_dim: int
    context_in_dim: int
    hidden_size: int
    mlp_ratio: float
    num_heads: int
    depth: int
    depth_single_blocks: int
    axes_dim: list
    theta: int
    patch_size: int
    qkv_bias: bool
    guidance_embed: bool


class FluxDiT(nn.Module):
    """Fake of ``comfy.ldm.flux.model.Flux`` (class name ``Flux``)."""

    def __init__(self, in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=32, hidden_size=64,
                 mlp_ratio=4.0, num_heads=2, depth=2, depth_single_blocks=2, axes_dim=(8, 12, 12), theta=10000,
                 patch_size=2, qkv_bias=True, guidance_embed=True, attn_fn=None):
        super().__init__()
        self.dtype = torch.float32
        self.params = FluxParams(in_channels=in_channels, out_channels=out_channels, vec_in_dim=vec_in_dim,
                                 context_in_dim=context_in_dim, hidden_size=hidden_size, mlp_ratio=mlp_ratio,
                                 num_heads=num_heads, depth=depth, depth_single_blocks=depth_single_blocks,
                                 axes_dim=list(axes_dim), theta=theta, patch_size=patch_size, qkv_bias=qkv_bias,
                                 guidance_embed=guidance_embed)
        self.patch_size = patch_size
        self.in_channels = in_channels * patch_size ** 2
        self.out_channels = out_channels * patch_size ** 2
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.pe_embedder = EmbedND(dim=hidden_size // num_heads, theta=theta, axes_dim=list(axes_dim))
        self.img_in = nn.Linear(self.in_channels, hidden_size)
        self.time_in = nn.Sequential(nn.Linear(256, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        self.vector_in = nn.Sequential(nn.Linear(vec_in_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        self.guidance_in = (nn.Sequential(nn.Linear(256, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
                            if guidance_embed else nn.Identity())
        self.txt_in = nn.Linear(context_in_dim, hidden_size)
        self.double_blocks = nn.ModuleList([DoubleStreamBlock(hidden_size, num_heads, mlp_ratio, qkv_bias, attn_fn)
                                            for _ in range(depth)])
        self.single_blocks = nn.ModuleList([SingleStreamBlock(hidden_size, num_heads, mlp_ratio, attn_fn)
                                            for _ in range(depth_single_blocks)])
        self.final_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.final_adaLN = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.final_linear = nn.Linear(hidden_size, self.out_channels)

    def forward_orig(self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None, control=None,
                     transformer_options={}, attn_mask=None):
        patches = transformer_options.get("patches", {})
        if y is None:
            y = torch.zeros((img.shape[0], self.params.vec_in_dim), dtype=img.dtype)
        img = self.img_in(img)
        vec = self.time_in(sinusoid(timesteps * 1000.0, 256).to(img.dtype))
        if self.params.guidance_embed and guidance is not None:
            vec = vec + self.guidance_in(sinusoid(guidance * 1000.0, 256).to(img.dtype))
        vec = vec + self.vector_in(y[:, :self.params.vec_in_dim])
        txt = self.txt_in(txt)
        for p in patches.get("post_input", []):
            out = p({"img": img, "txt": txt, "img_ids": img_ids, "txt_ids": txt_ids})
            img, txt, img_ids, txt_ids = out["img"], out["txt"], out["img_ids"], out["txt_ids"]
        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1)) if img_ids is not None else None

        for i, block in enumerate(self.double_blocks):
            replace = _dit_replace(transformer_options, ("double_block", i))
            if replace is not None:
                def original(args, block=block):
                    o_img, o_txt = block(img=args["img"], txt=args["txt"], vec=args["vec"], pe=args["pe"],
                                         attn_mask=args.get("attn_mask"),
                                         transformer_options=args.get("transformer_options"))
                    return {"img": o_img, "txt": o_txt}
                out = replace({"img": img, "txt": txt, "vec": vec, "pe": pe, "attn_mask": attn_mask,
                               "transformer_options": transformer_options}, {"original_block": original})
                img, txt = out["img"], out["txt"]
            else:
                img, txt = block(img=img, txt=txt, vec=vec, pe=pe, attn_mask=attn_mask,
                                 transformer_options=transformer_options)

        img = torch.cat((txt, img), 1)  # text first
        for i, block in enumerate(self.single_blocks):
            replace = _dit_replace(transformer_options, ("single_block", i))
            if replace is not None:
                def original(args, block=block):
                    return {"img": block(args["img"], vec=args["vec"], pe=args["pe"], attn_mask=args.get("attn_mask"),
                                         transformer_options=args.get("transformer_options"))}
                img = replace({"img": img, "vec": vec, "pe": pe, "attn_mask": attn_mask,
                               "transformer_options": transformer_options}, {"original_block": original})["img"]
            else:
                img = block(img, vec=vec, pe=pe, attn_mask=attn_mask, transformer_options=transformer_options)
        img = img[:, txt.shape[1]:]
        shift, scale = self.final_adaLN(vec).chunk(2, dim=1)
        return self.final_linear(_modulate(self.final_norm(img), shift, scale))

    def process_img(self, x, index=0, h_offset=0, w_offset=0):
        b, c, h, w = x.shape
        p = self.patch_size
        x = F.pad(x, (0, (-w) % p, 0, (-h) % p))
        hl, wl = x.shape[2] // p, x.shape[3] // p
        img = x.reshape(b, c, hl, p, wl, p).permute(0, 2, 4, 1, 3, 5).reshape(b, hl * wl, c * p * p)
        ids = torch.zeros(hl, wl, 3, dtype=x.dtype)
        ids[..., 0] = index
        ids[..., 1] = torch.arange(hl, dtype=x.dtype)[:, None] + (h_offset + p // 2) // p
        ids[..., 2] = torch.arange(wl, dtype=x.dtype)[None, :] + (w_offset + p // 2) // p
        return img, ids.reshape(1, hl * wl, 3).expand(b, -1, -1)

    def forward(self, x, timestep, context, y=None, guidance=None, ref_latents=None, control=None,
                transformer_options={}, **kwargs):
        return WrapperExecutor.new_class_executor(
            self._forward, self, get_all_wrappers(WrappersMP.DIFFUSION_MODEL, transformer_options)
        ).execute(x, timestep, context, y, guidance, ref_latents, control, transformer_options, **kwargs)

    def _forward(self, x, timestep, context, y=None, guidance=None, ref_latents=None, control=None,
                 transformer_options={}, **kwargs):
        b, c, h, w = x.shape
        p = self.patch_size
        img, img_ids = self.process_img(x)
        n_img = img.shape[1]
        if ref_latents is not None:  # Kontext: reference tokens appended after the image tokens
            hh = ww = 0
            for ref in ref_latents:
                h_off = w_off = 0
                if ref.shape[-2] + hh > ref.shape[-1] + ww:
                    w_off = ww
                else:
                    h_off = hh
                hh, ww = max(hh, ref.shape[-2] + h_off), max(ww, ref.shape[-1] + w_off)
                r_img, r_ids = self.process_img(ref, index=1, h_offset=h_off, w_offset=w_off)
                img = torch.cat([img, r_img], dim=1)
                img_ids = torch.cat([img_ids, r_ids], dim=1)
        txt_ids = torch.zeros((b, context.shape[1], 3), dtype=x.dtype)
        out = self.forward_orig(img, img_ids, context, txt_ids, timestep, y, guidance, control, transformer_options,
                                attn_mask=kwargs.get("attention_mask", None))[:, :n_img]
        hl, wl = (h + (-h) % p) // p, (w + (-w) % p) // p
        out = out.reshape(b, hl, wl, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, hl * p, wl * p)
        return out[:, :, :h, :w]


FluxDiT.__name__ = FluxDiT.__qualname__ = "Flux"


# ============================================================================= Wan 2.1
class WanSelfAttention(nn.Module):
    def __init__(self, dim, num_heads, qk_norm=True, eps=1e-6, attn_fn=None):
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self._attn = attn_fn

    def forward(self, x, freqs, transformer_options={}):
        b, s, n, d = x.shape[0], x.shape[1], self.num_heads, self.head_dim
        q = rotate(self.norm_q(self.q(x)).view(b, s, n, d), freqs)  # RoPE before the backend
        k = rotate(self.norm_k(self.k(x)).view(b, s, n, d), freqs)
        out = self._attn(q.view(b, s, n * d), k.view(b, s, n * d), self.v(x).view(b, s, n * d),
                         heads=self.num_heads, transformer_options=transformer_options)
        return self.o(out)


class WanT2VCrossAttention(WanSelfAttention):
    def forward(self, x, context, transformer_options={}, **kwargs):
        q = self.norm_q(self.q(x))
        k = self.norm_k(self.k(context))
        out = self._attn(q, k, self.v(context), heads=self.num_heads, transformer_options=transformer_options)
        return self.o(out)


class WanI2VCrossAttention(WanSelfAttention):
    def __init__(self, dim, num_heads, qk_norm=True, eps=1e-6, attn_fn=None):
        super().__init__(dim, num_heads, qk_norm, eps, attn_fn)
        self.k_img = nn.Linear(dim, dim)
        self.v_img = nn.Linear(dim, dim)
        self.norm_k_img = RMSNorm(dim, eps) if qk_norm else nn.Identity()

    def forward(self, x, context, context_img_len, transformer_options={}):
        ctx_img, ctx = context[:, :context_img_len], context[:, context_img_len:]
        q = self.norm_q(self.q(x))
        img_x = self._attn(q, self.norm_k_img(self.k_img(ctx_img)), self.v_img(ctx_img), heads=self.num_heads,
                           transformer_options=transformer_options)  # CLIP-image tokens first
        x = self._attn(q, self.norm_k(self.k(ctx)), self.v(ctx), heads=self.num_heads,
                       transformer_options=transformer_options)
        return self.o(x + img_x)


class WanAttentionBlock(nn.Module):
    def __init__(self, cross_attn_type, dim, ffn_dim, num_heads, qk_norm=True, cross_attn_norm=True, eps=1e-6,
                 attn_fn=None):
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim, eps, elementwise_affine=False)
        self.self_attn = WanSelfAttention(dim, num_heads, qk_norm, eps, attn_fn)
        self.norm3 = nn.LayerNorm(dim, eps, elementwise_affine=True) if cross_attn_norm else nn.Identity()
        cls = WanT2VCrossAttention if cross_attn_type == "t2v_cross_attn" else WanI2VCrossAttention
        self.cross_attn = cls(dim, num_heads, qk_norm, eps, attn_fn)
        self.norm2 = nn.LayerNorm(dim, eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))
        self.modulation = nn.Parameter(torch.zeros(1, 6, dim))

    def forward(self, x, e, freqs, context, context_img_len=CLIP_VISION_TOKENS, transformer_options={}):
        e = (self.modulation.unsqueeze(0) + e).unbind(2)  # e: (B, 1, 6, dim) -> 6 x (B, 1, dim)
        y = self.self_attn(self.norm1(x) * (1 + e[1]) + e[0], freqs, transformer_options=transformer_options)
        x = x + y * e[2]
        x = x + self.cross_attn(self.norm3(x), context, context_img_len=context_img_len,
                                transformer_options=transformer_options)
        y = self.ffn(self.norm2(x) * (1 + e[4]) + e[3])
        return x + y * e[5]


class Head(nn.Module):
    def __init__(self, dim, out_dim, patch_size, eps=1e-6):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps, elementwise_affine=False)
        self.head = nn.Linear(dim, math.prod(patch_size) * out_dim)
        self.modulation = nn.Parameter(torch.zeros(1, 2, dim))

    def forward(self, x, e):
        e = (self.modulation.unsqueeze(0) + e.unsqueeze(2)).unbind(2)
        return self.head(self.norm(x) * (1 + e[1]) + e[0])


class MLPProj(nn.Module):
    def __init__(self, in_dim, out_dim):
        super().__init__()
        self.proj = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, in_dim), nn.GELU(),
                                  nn.Linear(in_dim, out_dim), nn.LayerNorm(out_dim))

    def forward(self, image_embeds):
        return self.proj(image_embeds)


class WanModel(nn.Module):
    def __init__(self, model_type="t2v", patch_size=(1, 2, 2), text_len=8, in_dim=16, dim=32, ffn_dim=64,
                 freq_dim=32, text_dim=32, out_dim=16, num_heads=2, num_layers=2, qk_norm=True,
                 cross_attn_norm=True, eps=1e-6, attn_fn=None):
        super().__init__()
        assert model_type in ("t2v", "i2v")
        self.dtype = torch.float32
        self.model_type = model_type
        self.patch_size = tuple(patch_size)
        self.text_len = text_len
        self.in_dim = in_dim
        self.dim = dim
        self.ffn_dim = ffn_dim
        self.freq_dim = freq_dim
        self.text_dim = text_dim
        self.out_dim = out_dim
        self.num_heads = num_heads
        self.num_layers = num_layers
        self.patch_embedding = nn.Conv3d(in_dim, dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim * 6))
        kind = "t2v_cross_attn" if model_type == "t2v" else "i2v_cross_attn"
        self.blocks = nn.ModuleList([WanAttentionBlock(kind, dim, ffn_dim, num_heads, qk_norm, cross_attn_norm, eps,
                                                       attn_fn) for _ in range(num_layers)])
        self.head = Head(dim, out_dim, self.patch_size, eps)
        d = dim // num_heads
        self.rope_embedder = EmbedND(dim=d, theta=10000.0, axes_dim=[d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6)])
        self.img_emb = MLPProj(1280, dim) if model_type == "i2v" else None

    def rope_encode(self, t, h, w):
        pt, ph, pw = self.patch_size
        tl, hl, wl = (t + pt // 2) // pt, (h + ph // 2) // ph, (w + pw // 2) // pw
        ids = torch.zeros(tl, hl, wl, 3)
        ids[..., 0] = torch.arange(tl, dtype=torch.float32)[:, None, None]
        ids[..., 1] = torch.arange(hl, dtype=torch.float32)[None, :, None]
        ids[..., 2] = torch.arange(wl, dtype=torch.float32)[None, None, :]
        return self.rope_embedder(ids.reshape(1, -1, 3)).movedim(1, 2)  # (1, L, 1, D/2, 2, 2)

    def forward_orig(self, x, t, context, clip_fea=None, freqs=None, transformer_options={}, **kwargs):
        x = self.patch_embedding(x.float()).to(x.dtype)
        grid = x.shape[2:]
        x = x.flatten(2).transpose(1, 2)  # t-major raster tokens
        e = self.time_embedding(sinusoid(t.flatten(), self.freq_dim).to(x.dtype)).reshape(t.shape[0], -1, self.dim)
        e0 = self.time_projection(e).unflatten(2, (6, self.dim))
        context = self.text_embedding(context)
        context_img_len = None
        if clip_fea is not None:
            if self.img_emb is not None:
                context = torch.cat([self.img_emb(clip_fea), context], dim=1)
            context_img_len = clip_fea.shape[-2]
        for i, block in enumerate(self.blocks):
            replace = _dit_replace(transformer_options, ("double_block", i))
            if replace is not None:
                def original(args, block=block):
                    return {"img": block(args["img"], context=args["txt"], e=args["vec"], freqs=args["pe"],
                                         context_img_len=context_img_len,
                                         transformer_options=args["transformer_options"])}
                x = replace({"img": x, "txt": context, "vec": e0, "pe": freqs,
                             "transformer_options": transformer_options}, {"original_block": original})["img"]
            else:
                x = block(x, e=e0, freqs=freqs, context=context, context_img_len=context_img_len,
                          transformer_options=transformer_options)
        x = self.head(x, e)
        b = x.shape[0]
        pt, ph, pw = self.patch_size
        x = x.reshape(b, *grid, pt, ph, pw, self.out_dim).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(b, self.out_dim, grid[0] * pt, grid[1] * ph, grid[2] * pw)

    def forward(self, x, timestep, context, clip_fea=None, time_dim_concat=None, transformer_options={}, **kwargs):
        return WrapperExecutor.new_class_executor(
            self._forward, self, get_all_wrappers(WrappersMP.DIFFUSION_MODEL, transformer_options)
        ).execute(x, timestep, context, clip_fea, time_dim_concat, transformer_options, **kwargs)

    def _forward(self, x, timestep, context, clip_fea=None, time_dim_concat=None, transformer_options={}, **kwargs):
        b, c, t, h, w = x.shape
        pt, ph, pw = self.patch_size
        x = F.pad(x, (0, (-w) % pw, 0, (-h) % ph, 0, (-t) % pt))
        freqs = self.rope_encode(t, h, w)
        return self.forward_orig(x, timestep, context, clip_fea=clip_fea, freqs=freqs,
                                 transformer_options=transformer_options, **kwargs)[:, :, :t, :h, :w]


# ============================================================================= BaseModel side
class ModelType(enum.Enum):
    EPS = 1
    FLOW = 6
    FLUX = 8


class latent_formats:  # namespace mirroring ``comfy.latent_formats`` class names
    class LatentFormat:
        latent_channels = 4
        latent_dimensions = 2
        scale_factor = 1.0
        shift_factor = 0.0

        def process_in(self, latent):
            return (latent - self.shift_factor) * self.scale_factor

        def process_out(self, latent):
            return latent / self.scale_factor + self.shift_factor

    class SD15(LatentFormat):
        scale_factor = 0.18215

    class SDXL(LatentFormat):
        scale_factor = 0.13025

    class SD3(LatentFormat):
        latent_channels = 16
        scale_factor = 1.5305
        shift_factor = 0.0609

    class Flux(SD3):
        scale_factor = 0.3611
        shift_factor = 0.1159

    class Wan21(LatentFormat):
        latent_channels = 16
        latent_dimensions = 3


class ModelSamplingDiscrete:
    """EPS: ``x_in = x / sqrt(sigma^2 + 1)``, ``denoised = x - out * sigma``."""

    sigma_min = 0.0292
    sigma_max = 14.6146

    def timestep(self, sigma):
        s = torch.as_tensor(sigma).float().clamp(self.sigma_min, self.sigma_max)
        frac = (s.log() - math.log(self.sigma_min)) / (math.log(self.sigma_max) - math.log(self.sigma_min))
        return frac * 999.0

    def sigma(self, timestep):
        frac = torch.as_tensor(timestep).float() / 999.0
        return torch.exp(math.log(self.sigma_min) + frac * (math.log(self.sigma_max) - math.log(self.sigma_min)))

    def percent_to_sigma(self, percent):
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        return float(self.sigma(torch.tensor((1.0 - percent) * 999.0)))

    def schedule(self, steps):
        s = torch.exp(torch.linspace(math.log(self.sigma_max), math.log(self.sigma_min), steps))
        return torch.cat([s, s.new_zeros(1)])

    def calculate_input(self, sigma, x):
        return x / (sigma.view(sigma.shape[:1] + (1,) * (x.ndim - 1)) ** 2 + 1) ** 0.5

    def calculate_denoised(self, sigma, model_output, model_input):
        return model_input - model_output * sigma.view(sigma.shape[:1] + (1,) * (model_output.ndim - 1))

    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        return latent_image + noise * sigma

    def inverse_noise_scaling(self, sigma, latent):
        return latent


class ModelSamplingDiscreteFlow(ModelSamplingDiscrete):
    """Flow matching: ``x_in = x``, ``denoised = x - out * sigma``, ``t = sigma * multiplier``."""

    sigma_min = 0.001
    sigma_max = 1.0

    def __init__(self, multiplier=1000.0):
        self.multiplier = multiplier

    def timestep(self, sigma):
        return torch.as_tensor(sigma).float() * self.multiplier

    def sigma(self, timestep):
        return torch.as_tensor(timestep).float() / self.multiplier

    def percent_to_sigma(self, percent):
        if percent <= 0.0:
            return 1.0
        if percent >= 1.0:
            return 0.0
        return 1.0 - percent

    def schedule(self, steps):
        return torch.linspace(1.0, 0.0, steps + 1)

    def calculate_input(self, sigma, x):
        return x

    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        return sigma * noise + (1.0 - sigma) * latent_image


class ModelSamplingFlux(ModelSamplingDiscreteFlow):
    def __init__(self):
        super().__init__(multiplier=1.0)


class supported_models:  # namespace mirroring ``comfy.supported_models`` class names
    class BASE:
        unet_config: dict = {}
        latent_format = latent_formats.LatentFormat
        memory_usage_factor = 2.0

        def __init__(self, unet_config):
            self.unet_config = dict(unet_config)
            self.latent_format = self.latent_format()

    class SD15(BASE):
        latent_format = latent_formats.SD15

    class SDXL(BASE):
        latent_format = latent_formats.SDXL

    class SD3(BASE):
        latent_format = latent_formats.SD3

    class Flux(BASE):
        latent_format = latent_formats.Flux

    class WAN21_T2V(BASE):
        latent_format = latent_formats.Wan21

    class WAN21_I2V(WAN21_T2V):
        pass


class model_base:  # namespace mirroring ``comfy.model_base`` class names
    class BaseModel(nn.Module):
        def __init__(self, model_config, diffusion_model, model_type=ModelType.EPS, model_sampling=None):
            super().__init__()
            self.model_config = model_config
            self.latent_format = model_config.latent_format
            self.diffusion_model = diffusion_model
            self.model_type = model_type
            self.model_sampling = model_sampling or ModelSamplingDiscrete()
            self.device = torch.device("cpu")
            self.current_patcher = None
            self.memory_usage_factor = model_config.memory_usage_factor
            self.concat_keys = ()

        # ---- conditioning
        def extra_conds(self, **kwargs):
            out = {}
            if kwargs.get("cross_attn") is not None:
                out["c_crossattn"] = kwargs["cross_attn"]
            return out

        # ---- the APPLY_MODEL entry point
        def apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
            return WrapperExecutor.new_class_executor(
                self._apply_model, self, get_all_wrappers(WrappersMP.APPLY_MODEL, transformer_options)
            ).execute(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

        def _apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
            sigma = t
            xc = self.model_sampling.calculate_input(sigma, x)
            if c_concat is not None:
                xc = torch.cat([xc, c_concat.to(xc)], dim=1)
            timestep = self.model_sampling.timestep(sigma).float()
            out = self.diffusion_model(xc, timestep, context=c_crossattn, control=control,
                                       transformer_options=transformer_options, **kwargs).float()
            return self.model_sampling.calculate_denoised(sigma, out, x)

        # ---- misc BaseModel API
        def memory_required(self, input_shape, cond_shapes={}):
            area = input_shape[0] * math.prod(input_shape[2:])
            return area * 4 * self.memory_usage_factor * 1024

        def process_latent_in(self, latent):
            return self.latent_format.process_in(latent)

        def process_latent_out(self, latent):
            return self.latent_format.process_out(latent)

        def get_dtype(self):
            return torch.float32

    class SDXL(BaseModel):
        def extra_conds(self, **kwargs):
            out = super().extra_conds(**kwargs)
            pooled = kwargs.get("pooled_output")
            if pooled is None:
                pooled = torch.zeros(1, 1280)
            w, h = kwargs.get("width", 768), kwargs.get("height", 768)
            sizes = [h, w, kwargs.get("crop_h", 0), kwargs.get("crop_w", 0),
                     kwargs.get("target_height", h), kwargs.get("target_width", w)]
            flat = torch.cat([sinusoid(torch.tensor([float(s)]), 256) for s in sizes], dim=1)
            out["y"] = torch.cat([pooled, flat.repeat(pooled.shape[0], 1)], dim=1)
            return out

    class SD3(BaseModel):
        def extra_conds(self, **kwargs):
            out = super().extra_conds(**kwargs)
            if kwargs.get("pooled_output") is not None:
                out["y"] = kwargs["pooled_output"]
            return out

    class Flux(BaseModel):
        def extra_conds(self, **kwargs):
            out = super().extra_conds(**kwargs)
            if kwargs.get("attention_mask") is not None:
                out["attention_mask"] = kwargs["attention_mask"]
            if kwargs.get("reference_latents") is not None:
                out["ref_latents"] = [self.process_latent_in(r) for r in kwargs["reference_latents"]]
            if kwargs.get("pooled_output") is not None:
                out["y"] = kwargs["pooled_output"]
            guidance = kwargs.get("guidance", 3.5)
            if guidance is not None:
                out["guidance"] = torch.tensor([float(guidance)])
            return out

    class WAN21(BaseModel):
        def extra_conds(self, **kwargs):
            out = super().extra_conds(**kwargs)
            noise = kwargs.get("noise")
            extra = self.diffusion_model.patch_embedding.weight.shape[1] - (noise.shape[1] if noise is not None else 0)
            if noise is not None and extra > 0:
                shape = list(noise.shape)
                shape[1] = extra - 4
                image = kwargs.get("concat_latent_image")
                image = torch.zeros(shape) if image is None else self.process_latent_in(image)[:1]
                mask = torch.zeros(1, 4, *noise.shape[2:])
                out["c_concat"] = torch.cat([mask, image[:1]], dim=1)
            cvo = kwargs.get("clip_vision_output")
            if cvo is not None:
                out["clip_fea"] = cvo.penultimate_hidden_states
            return out


for _ns in (latent_formats, supported_models, model_base):
    for _v in vars(_ns).values():
        if isinstance(_v, type):
            _v.__module__ = __name__


# ============================================================================= builders
def _unet_config(family):
    return {"model_channels": 32, "channel_mult": [1, 2], "num_res_blocks": [1, 1], "transformer_depth": [1, 1],
            "transformer_depth_output": [1, 1, 1, 1], "transformer_depth_middle": 1, "context_dim": 32,
            "in_channels": 4, "out_channels": 4, "use_linear_in_transformer": family == "sdxl",
            "num_heads": 2 if family == "sd15" else -1, "num_head_channels": -1 if family == "sd15" else 16,
            "adm_in_channels": 2816 if family == "sdxl" else None}


def build_fake_base_model(family: str, seed: int = 0, attention_backend: str = "sub_quad"):
    """The BaseModel-like object (``patcher.model``) for a family, weights from ``seed``."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    attn_fn = _attention.get_attention_function(attention_backend)
    if family in ("sd15", "sdxl"):
        uc = _unet_config(family)
        dm = UNetModel(uc["model_channels"], uc["channel_mult"], uc["in_channels"], uc["out_channels"],
                       uc["context_dim"], uc["num_heads"], uc["num_head_channels"], uc["use_linear_in_transformer"],
                       uc["adm_in_channels"], attn_fn=attn_fn)
        if family == "sd15":
            model = model_base.BaseModel(supported_models.SD15(uc), dm, ModelType.EPS, ModelSamplingDiscrete())
        else:
            model = model_base.SDXL(supported_models.SDXL(uc), dm, ModelType.EPS, ModelSamplingDiscrete())
    elif family in ("sd3", "sd3_x"):
        x = family == "sd3_x"
        uc = {"in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 2, "pos_embed_max_size": 16,
              "num_patches": 256, "adm_in_channels": 32, "qk_norm": "rms" if x else None,
              "x_block_self_attn_layers": [0] if x else [], "x_block_self_attn": x}
        dm = OpenAISignatureMMDITWrapper(16, 16, 2, 2, 32, 32, 16, uc["qk_norm"], uc["x_block_self_attn_layers"],
                                         attn_fn=attn_fn)
        model = model_base.SD3(supported_models.SD3(uc), dm, ModelType.FLOW, ModelSamplingDiscreteFlow(1000.0))
    elif family == "flux":
        uc = {"image_model": "flux", "guidance_embed": True, "in_channels": 16, "out_channels": 16,
              "vec_in_dim": 32, "context_in_dim": 32, "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 2,
              "depth": 2, "depth_single_blocks": 2, "axes_dim": [8, 12, 12], "theta": 10000, "patch_size": 2,
              "qkv_bias": True}
        dm = FluxDiT(attn_fn=attn_fn, **{k: v for k, v in uc.items() if k != "image_model"})
        model = model_base.Flux(supported_models.Flux(uc), dm, ModelType.FLUX, ModelSamplingFlux())
    else:
        i2v = family == "wan_i2v"
        uc = {"image_model": "wan2.1", "model_type": "i2v" if i2v else "t2v", "patch_size": (1, 2, 2),
              "text_len": 8, "in_dim": 36 if i2v else 16, "dim": 32, "ffn_dim": 64, "freq_dim": 32, "text_dim": 32,
              "out_dim": 16, "num_heads": 2, "num_layers": 2, "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6}
        dm = WanModel(attn_fn=attn_fn, **{k: v for k, v in uc.items() if k != "image_model"})
        cfg = supported_models.WAN21_I2V(uc) if i2v else supported_models.WAN21_T2V(uc)
        model = model_base.WAN21(cfg, dm, ModelType.FLOW, ModelSamplingDiscreteFlow(1000.0))
    init_weights(model.diffusion_model, seed)
    model.eval()
    return model


def build_fake_model(family: str, seed: int = 0, attention_backend: str = "sub_quad") -> ModelPatcher:
    """A :class:`ModelPatcher` around a tiny fake model of ``family``.

    ``attention_backend`` is the registry name the model's attention calls are bound to (ComfyUI
    binds its CPU default, ``attention_sub_quad``, at import time; the override sees it as ``func``).
    """
    return ModelPatcher(build_fake_base_model(family, seed, attention_backend))


def latent(family: str, batch: int = 1) -> torch.Tensor:
    """An empty latent of the recorded size for ``family``."""
    return torch.zeros(batch, *LATENT_SHAPE[family])


def conditioning(family: str, seed: int = 0, uniform_text: bool = False, text_len: int | None = None):
    """``(positive, negative)`` in ComfyUI's list-of-``[tensor, dict]`` form for ``family``.

    ``uniform_text=True`` repeats one random row over all text tokens (and CLIP-vision tokens), so
    text rows stay identical through the network; the trace recorder uses that to see token order.
    """
    g = torch.Generator().manual_seed(seed)
    n = text_len or TEXT_LEN[family]

    def text():
        if uniform_text:
            return torch.randn(1, 1, 32, generator=g).expand(1, n, 32).clone()
        return torch.randn(1, n, 32, generator=g)

    def extras():
        if family == "sdxl":
            return {"pooled_output": torch.randn(1, 1280, generator=g), "width": 128, "height": 128}
        if family in ("sd3", "sd3_x"):
            return {"pooled_output": torch.randn(1, 32, generator=g)}
        if family == "flux":
            return {"pooled_output": torch.randn(1, 32, generator=g), "guidance": 3.5}
        if family == "wan_i2v":
            if uniform_text:
                h = torch.randn(1, 1, 1280, generator=g).expand(1, CLIP_VISION_TOKENS, 1280).clone()
            else:
                h = torch.randn(1, CLIP_VISION_TOKENS, 1280, generator=g)
            return {"clip_vision_output": types.SimpleNamespace(penultimate_hidden_states=h)}
        return {}

    return [[text(), extras()]], [[text(), extras()]]
