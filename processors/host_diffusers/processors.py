"""attnlab attention processors for diffusers: the stock computation up to q/k/v, then the effect stack.

One class per attention family. Each reproduces its diffusers 0.42.1 counterpart op for op
(`AttnProcessor2_0`, `JointAttnProcessor2_0`, `FluxAttnProcessor`, `WanAttnProcessor`), so an empty
stack is bit-identical to stock; with effects, the q/k/v handed to the kernel become an
`AttentionCall` in the canonical ``[B, H, N, D]`` layout. FLUX and Wan keep `_attention_backend` and
`_parallel_config` so `set_attention_backend` keeps working.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry, dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb

from ..call import AttentionCall, RopeInfo, Site, TokenLayout, fold_scale_into_q, unet_level
from ..effects import EffectStack
from ..tracing import cached
from .model_info import Geometry
from .parallel import context_world, exchange_for
from .run_state import RunState


def sdpa(q, k, v, mask=None, scale=None):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False, scale=scale)


def _split_heads(attn, query, key, value, batch_size, norm_q, norm_k):
    """[B, N, H·D] projections -> [B, H, N, D] with optional QK-norm, exactly as the legacy processors do."""
    head_dim = key.shape[-1] // attn.heads
    query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    if norm_q is not None:
        query = norm_q(query)
    if norm_k is not None:
        key = norm_k(key)
    return query, key, value, head_dim


class _HostProcessor:
    """Shared part: the site, its effect stack, the run state and token-layout bookkeeping."""

    def __init__(self, site: Site, stack: EffectStack, state: RunState, original=None):
        self.site = site
        self.stack = stack
        self.active = bool(stack)  # a site without effects runs the stock code path
        self.state = state
        self._layouts: dict = {}
        # after `fuse_qkv_projections()` the stock processor is diffusers' Fused* variant: mirror that one
        self.fused = bool(getattr(original, "fused", False)) or type(original).__name__.startswith("Fused")

    @property
    def geometry(self) -> Geometry:
        return self.state.geometry

    def _image_layout(self, key: tuple, n_image: int, spans) -> TokenLayout:
        """Layout whose image span has `n_image` tokens, with this layer's grid and pixel scale; cached by
        `key` (the call's token counts) and the forward's geometry; `spans()` builds the token spans."""
        def build():
            grid, scale = self._grid_and_scale(n_image)
            return TokenLayout.at(grid, scale, self.geometry.native_size, **spans())

        return cached(self._layouts, key + (self.state.grid, self.state.latent), build)

    def _grid_and_scale(self, n_image: int):
        g, grid = self.geometry, self.state.grid
        if g.family != "unet":
            if grid is None or math.prod(grid) != n_image:
                return None, None
            return grid, g.token_scale
        found = unet_level(*self.state.latent[1:], n_image) if self.state.latent is not None else None
        if found is None:
            return None, None
        h, w, level = found
        px = g.vae_scale[1] * 2**level
        return (1, h, w), (1, px, px)

    def _call(self, q, k, v, mask, tokens, rope=None, shard=None) -> AttentionCall:
        roles, step = self.state.call_sources(q.shape[0])
        return AttentionCall(q, k, v, self.site, tokens, roles, step, mask, None, rope, shard)


class AttnlabAttnProcessor(_HostProcessor):
    """Legacy `Attention` (UNet self/cross, PixArt self/cross, SD3.5 attn2): mirrors `AttnProcessor2_0`."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        temb: Optional[torch.Tensor] = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        if self.fused:  # FusedAttnProcessor2_0
            if encoder_hidden_states is None:
                qkv = attn.to_qkv(hidden_states)
                query, key, value = torch.split(qkv, qkv.shape[-1] // 3, dim=-1)
            else:
                if attn.norm_cross:
                    encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
                query = attn.to_q(hidden_states)
                kv = attn.to_kv(encoder_hidden_states)
                key, value = torch.split(kv, kv.shape[-1] // 2, dim=-1)
        else:
            query = attn.to_q(hidden_states)
            if encoder_hidden_states is None:
                encoder_hidden_states = hidden_states
            elif attn.norm_cross:
                encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
            key = attn.to_k(encoder_hidden_states)
            value = attn.to_v(encoder_hidden_states)
        query, key, value, head_dim = _split_heads(attn, query, key, value, batch_size, attn.norm_q, attn.norm_k)

        if self.active:
            nq, nk = query.shape[2], key.shape[2]
            k_span = "k_text" if self.site.kind == "cross" else "k_image"
            tokens = self._image_layout((nq, nk), nq, lambda: {"q_image": slice(0, nq), k_span: slice(0, nk)})
            hidden_states = self.stack.run(self._call(query, key, value, attention_mask, tokens), sdpa)
        else:
            hidden_states = F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
            )

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        hidden_states = hidden_states / attn.rescale_output_factor
        return hidden_states


class AttnlabJointAttnProcessor(_HostProcessor):
    """SD3 joint attention (image first, then text): mirrors `JointAttnProcessor2_0`."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor = None,
        attention_mask: Optional[torch.Tensor] = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        batch_size = hidden_states.shape[0]

        if self.fused:  # FusedJointAttnProcessor2_0 (which applies no QK-norm, so neither do we here)
            qkv = attn.to_qkv(hidden_states)
            query, key, value, head_dim = _split_heads(attn, *torch.split(qkv, qkv.shape[-1] // 3, dim=-1), batch_size,
                                                       None, None)
        else:
            query, key, value, head_dim = _split_heads(
                attn, attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states), batch_size,
                attn.norm_q, attn.norm_k)

        n_image = query.shape[2]
        if encoder_hidden_states is not None:
            if self.fused:
                eqkv = attn.to_added_qkv(encoder_hidden_states)
                eq, ek, ev, _ = _split_heads(attn, *torch.split(eqkv, eqkv.shape[-1] // 3, dim=-1), batch_size,
                                             None, None)
            else:
                eq, ek, ev, _ = _split_heads(
                    attn, attn.add_q_proj(encoder_hidden_states), attn.add_k_proj(encoder_hidden_states),
                    attn.add_v_proj(encoder_hidden_states), batch_size, attn.norm_added_q, attn.norm_added_k)
            query = torch.cat([query, eq], dim=2)
            key = torch.cat([key, ek], dim=2)
            value = torch.cat([value, ev], dim=2)

        if self.active:
            n = query.shape[2]

            def spans():
                image, text = slice(0, n_image), (slice(n_image, n) if n > n_image else None)
                return dict(q_image=image, k_image=image, q_text=text, k_text=text)

            tokens = self._image_layout((n_image, n), n_image, spans)
            hidden_states = self.stack.run(self._call(query, key, value, None, tokens), sdpa)
        else:
            hidden_states = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = (
                hidden_states[:, : residual.shape[1]],
                hidden_states[:, residual.shape[1] :],
            )
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


def _backend_takes_scale(backend) -> bool:
    """Whether diffusers' dispatcher forwards `scale` to this backend (it silently drops unsupported args)."""
    try:
        name = _AttentionBackendRegistry.get_active_backend()[0] if backend is None else backend
        return cached(_TAKES_SCALE, name, lambda: "scale" in _AttentionBackendRegistry._supported_arg_names[
            AttentionBackendName(name)])
    except Exception:  # an unknown registry layout: fold the scale into q instead
        return False


_TAKES_SCALE: dict = {}


class _DispatchProcessor(_HostProcessor):
    """Processors that end in diffusers' attention dispatcher (layout ``[B, S, H, D]``)."""

    _attention_backend = None
    _parallel_config = None
    _exchange_for = None  # the `_parallel_config` that `_exchange_cached` was made for
    _exchange_cached = None

    def __init__(self, site, stack, state, original=None):
        super().__init__(site, stack, state, original)
        self._attention_backend = getattr(original, "_attention_backend", None)
        self._parallel_config = getattr(original, "_parallel_config", None)

    def _exchange(self, heads: int):
        """The context-parallel `Exchange` for this processor's current `_parallel_config` (None without)."""
        config = self._parallel_config
        if config is None:
            return None
        if self._exchange_for is not config:
            self._exchange_cached = exchange_for(config, heads, f" at {self.site.name}")
            self._exchange_for = config
        return self._exchange_cached

    def _dispatch(self, q, k, v, mask, parallel_config, scale=None):
        kwargs = {}
        if scale is not None:
            if _backend_takes_scale(self._attention_backend):
                kwargs["scale"] = scale
            else:
                q = fold_scale_into_q(q, scale)
        return dispatch_attention_fn(
            q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False,
            backend=self._attention_backend, parallel_config=parallel_config, **kwargs,
        )

    def _attend(self, query, key, value, mask, tokens, parallel_config, rope=None, text=0, kv_sliced=True):
        """Stock dispatch when the stack is empty; otherwise run the stack in the canonical layout.

        `tokens(n_q, n_k, n_text)` builds the layout from the call's whole-sequence counts; `text`: the text
        tokens at the start of this process's sequence (FLUX); `kv_sliced`: whether keys/values are sliced
        along the sequence like the queries under context parallelism (not Wan's text keys)."""
        if not self.active:
            return self._dispatch(query, key, value, mask, parallel_config)
        exchange = self._exchange(query.shape[2])
        if exchange is not None:
            return self._attend_exchanged(exchange, query, key, value, mask, tokens, rope, text, kv_sliced)

        qc, kc, vc = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)

        def kernel(q, k, v, m, scale):
            if q is qc and k is kc and v is vc:  # the model's own q/k/v (untouched: the stock call): no copies back
                return self._dispatch(query, key, value, m, parallel_config, scale).transpose(1, 2)
            out = self._dispatch(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), m, parallel_config, scale)
            return out.transpose(1, 2)

        call = self._call(qc, kc, vc, mask, tokens(query.shape[1], key.shape[1], text), rope)
        return self.stack.run(call, kernel).transpose(1, 2)

    def _attend_exchanged(self, exchange, query, key, value, mask, tokens, rope, text, kv_sliced):
        """Under context parallelism: the stack on the whole sequence with this process's heads (see `parallel`)."""
        if mask is not None:
            raise ValueError(f"attnlab effects at {self.site.name} cannot take an attention mask under context "
                             "parallelism")
        q = exchange.to_heads(query, text)
        k, v = (exchange.to_heads(x, text) if kv_sliced else exchange.own_heads(x) for x in (key, value))

        def kernel(q, k, v, m, scale):
            out = self._dispatch(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), m, None, scale)
            return out.transpose(1, 2)

        layout = tokens(q.shape[1], k.shape[1], text * exchange.world)
        call = self._call(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, layout,
                          exchange.rope(rope, text), exchange.shard)
        return exchange.to_sequence(self.stack.run(call, kernel).transpose(1, 2), text)


class AttnlabFluxAttnProcessor(_DispatchProcessor):
    """FLUX double (text first, then image) and single (one fused stream) blocks: mirrors `FluxAttnProcessor`."""

    def __init__(self, site, stack, state, original=None, pos_embed=None):
        super().__init__(site, stack, state, original)
        self.pos_embed = pos_embed

    def _local_text(self, encoder_hidden_states) -> int:
        """Text tokens at the start of this call's sequence: the double blocks' own text stream; in the single
        blocks the forward's text length (the whole text, divided among the processes under context parallelism)."""
        if encoder_hidden_states is not None:
            return encoder_hidden_states.shape[1]
        n_text = self.state.text_len or 0
        return n_text // context_world(self._parallel_config)

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor = None,
        attention_mask: Optional[torch.Tensor] = None,
        image_rotary_emb: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        if attn.fused_projections:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
            eq = ek = ev = None
            if encoder_hidden_states is not None and hasattr(attn, "to_added_qkv"):
                eq, ek, ev = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
            eq = ek = ev = None
            if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
                eq = attn.add_q_proj(encoder_hidden_states)
                ek = attn.add_k_proj(encoder_hidden_states)
                ev = attn.add_v_proj(encoder_hidden_states)

        query = query.unflatten(-1, (-1, attn.head_dim))
        key = key.unflatten(-1, (-1, attn.head_dim))
        value = value.unflatten(-1, (-1, attn.head_dim))
        query = attn.norm_q(query)
        key = attn.norm_k(key)

        if attn.added_kv_proj_dim is not None:
            eq = attn.norm_added_q(eq.unflatten(-1, (-1, attn.head_dim)))
            ek = attn.norm_added_k(ek.unflatten(-1, (-1, attn.head_dim)))
            ev = ev.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([eq, query], dim=1)
            key = torch.cat([ek, key], dim=1)
            value = torch.cat([ev, value], dim=1)

        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        def tokens(n, n_k, n_text):
            def spans():
                text, image = slice(0, n_text), slice(n_text, n)
                return dict(q_image=image, k_image=image, q_text=text, k_text=text, text_first=True)

            return self._image_layout((n, n_text), n - n_text, spans)

        rope = None
        if image_rotary_emb is not None and self.active:
            rope = RopeInfo(image_rotary_emb[0], image_rotary_emb[1], _flux_rotate, self.pos_embed)
        hidden_states = self._attend(query, key, value, attention_mask, tokens, self._parallel_config, rope,
                                     self._local_text(encoder_hidden_states) if self.active else 0)
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
            )
            hidden_states = attn.to_out[0](hidden_states.contiguous())
            hidden_states = attn.to_out[1](hidden_states)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
            return hidden_states, encoder_hidden_states
        return hidden_states


def _flux_rotate(x, cos, sin):
    return apply_rotary_emb(x, (cos, sin), sequence_dim=2)


def _wan_rotate(x, cos, sin):
    """Wan's interleaved rotation; cos/sin broadcast against x's last two dims (tokens, head dim)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = cos[..., 0::2]
    sin = sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class AttnlabWanAttnProcessor(_DispatchProcessor):
    """Wan self- and cross-attention (with the I2V image-context branch): mirrors `WanAttnProcessor`.

    The I2V image-context attention (CLIP image tokens) runs on the plain kernel; effects see the
    text cross-attention only.
    """

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        rotary_emb: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    ) -> torch.Tensor:
        encoder_hidden_states_img = None
        if attn.add_k_proj is not None:
            image_context_length = encoder_hidden_states.shape[1] - 512  # as stock: text context is 512 tokens
            encoder_hidden_states_img = encoder_hidden_states[:, :image_context_length]
            encoder_hidden_states = encoder_hidden_states[:, image_context_length:]

        source = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if attn.fused_projections:
            if not attn.is_cross_attention:
                query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
            else:
                query = attn.to_q(hidden_states)
                key, value = attn.to_kv(source).chunk(2, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(source), attn.to_v(source)

        query = attn.norm_q(query)
        key = attn.norm_k(key)
        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))

        if rotary_emb is not None:
            query = _wan_rotate(query, *rotary_emb)
            key = _wan_rotate(key, *rotary_emb)

        hidden_states_img = None
        if encoder_hidden_states_img is not None:
            if attn.fused_projections:
                key_img, value_img = attn.to_added_kv(encoder_hidden_states_img).chunk(2, dim=-1)
            else:
                key_img = attn.add_k_proj(encoder_hidden_states_img)
                value_img = attn.add_v_proj(encoder_hidden_states_img)
            key_img = attn.norm_added_k(key_img)
            key_img = key_img.unflatten(2, (attn.heads, -1))
            value_img = value_img.unflatten(2, (attn.heads, -1))
            hidden_states_img = self._dispatch(query, key_img, value_img, None, None)
            hidden_states_img = hidden_states_img.flatten(2, 3)
            hidden_states_img = hidden_states_img.type_as(query)

        cross = encoder_hidden_states is not None

        def tokens(nq, nk, _):
            k_span = "k_text" if cross else "k_image"
            return self._image_layout((nq, nk), nq, lambda: {"q_image": slice(0, nq), k_span: slice(0, nk)})

        rope = None
        if rotary_emb is not None and self.active:
            cos, sin = (t.reshape(t.shape[-3], t.shape[-1]) for t in rotary_emb)
            rope = RopeInfo(cos, sin, _wan_rotate)
        parallel_config = self._parallel_config if not cross else None
        hidden_states = self._attend(query, key, value, attention_mask, tokens, parallel_config, rope,
                                     kv_sliced=not cross)
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.type_as(query)
        if hidden_states_img is not None:
            hidden_states = hidden_states + hidden_states_img
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        return hidden_states


PROCESSOR_FOR_KIND = {
    ("unet", "self"): AttnlabAttnProcessor,
    ("unet", "cross"): AttnlabAttnProcessor,
    ("pixart", "self"): AttnlabAttnProcessor,
    ("pixart", "cross"): AttnlabAttnProcessor,
    ("sd3", "joint"): AttnlabJointAttnProcessor,
    ("sd3", "self"): AttnlabAttnProcessor,
    ("flux", "joint"): AttnlabFluxAttnProcessor,
    ("flux", "single"): AttnlabFluxAttnProcessor,
    ("wan", "self"): AttnlabWanAttnProcessor,
    ("wan", "cross"): AttnlabWanAttnProcessor,
}

# The stock processor classes each of ours reproduces; anything else on a module is left alone.
STOCK_PROCESSORS = {
    AttnlabAttnProcessor: ("AttnProcessor2_0", "FusedAttnProcessor2_0"),
    AttnlabJointAttnProcessor: ("JointAttnProcessor2_0", "FusedJointAttnProcessor2_0"),
    AttnlabFluxAttnProcessor: ("FluxAttnProcessor",),
    AttnlabWanAttnProcessor: ("WanAttnProcessor",),
}
