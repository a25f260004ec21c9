"""RefAM (arXiv 2509.22650): referring segmentation read from a DiT's image↔text attention.

`TextMaps` is a read-only "observe" effect: on selected layers it computes, for the rows of one role
(default "cond"), a per-text-token spatial map from the call's own q and k, reduced over heads as it goes,
in fp32, query-chunked so the full probability matrix never exists. The call itself is passed down
unchanged, so the model's output stays bit-identical (`gas_mode` "drop"). In "suppress"/"redirect" mode it
also detects global attention sinks in each deep layer's own map and removes them from that layer's
image-query attention (a key-column bias), which changes the forward from that layer on.

Map modes (which softmax the map is a slice of):
  img2txt_textsoftmax  softmax over the text keys only, per image query (default; UNet cross-attention style)
  img2txt_joint        the exact image→text slice of the joint softmax: exp(s·q·k − LSE over all keys)
  txt2img_joint        text queries over image keys, exp(s·q_t·k_i − LSE_t) (joint-attention models only)
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .call import AttentionCall, Site
from .effects import Attend, Effect
from .tracing import cached, compiling

MAP_MODES = ("img2txt_textsoftmax", "img2txt_joint", "txt2img_joint")
GAS_MODES = ("drop", "suppress", "redirect")
TEXT_KINDS = ("joint", "single", "cross")
_CHUNK_ELEMENTS = 1 << 24  # logits per chunk (64 MiB fp32)


def default_layers(family: str, layers: Sequence[tuple[int, str]]) -> list[int]:
    """Default layer set: FLUX the last 47/57 of the blocks (FLUX.1: 10–56 in processor order, the spec's
    default); other DiTs the deeper three quarters; UNets every cross-attention layer."""
    text_layers = sorted({layer for layer, kind in layers if kind in TEXT_KINDS})
    if family in ("unet", "pixart", "wan") or not text_layers:
        return text_layers
    n = max(text_layers) + 1
    first = round(n * (10 / 57 if family == "flux" else 0.25))
    return [layer for layer in text_layers if layer >= first]


def default_gas_min_layer(family: str, n_layers: int, double_blocks: int = 0) -> int:
    """GAS appear in deep layers: FLUX from the first single-stream block (19), others from half depth."""
    if family == "flux" and double_blocks:
        return int(double_blocks)
    return n_layers // 2


def detect_sinks(maps: torch.Tensor, mass: float = 0.2, cv: float = 0.5) -> torch.Tensor:
    """Global attention sinks among a layer's text columns. `maps`: [..., N_image, N_text] text-restricted
    head-mean attention (rows sum to ≤ 1). A column is a sink when it takes more than `mass` of the attention
    on average AND its spatial map is flat (coefficient of variation below `cv`). Returns a bool [..., N_text]."""
    mean = maps.mean(dim=-2)
    std = maps.std(dim=-2, unbiased=False)
    return (mean > mass) & (std < cv * mean)


def _chunks(n_q: int, per_query: int):
    step = max(1, _CHUNK_ELEMENTS // max(1, per_query))
    return [(s, min(n_q, s + step)) for s in range(0, n_q, step)]


def text_maps(q_img: torch.Tensor, k_txt: torch.Tensor, scale: float, mode: str = "img2txt_textsoftmax",
              k_all: Optional[torch.Tensor] = None, q_txt: Optional[torch.Tensor] = None,
              k_img: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Head-mean image×text attention map [B, N_image, N_text] in fp32, query-chunked (never [N, N]).

    q_img [B,H,Ni,D], k_txt [B,H,Nt,D]. `k_all` (all keys) for img2txt_joint; `q_txt`, `k_img`, `k_all` for
    txt2img_joint. `bias` [B, Nt] is added to the text logits (sink suppression) in the text-softmax mode."""
    if mode == "img2txt_textsoftmax":
        kt = k_txt.float().transpose(-1, -2)
        out = []
        for s, e in _chunks(q_img.shape[2], q_img.shape[1] * k_txt.shape[2]):
            logits = (q_img[:, :, s:e].float() @ kt) * scale
            if bias is not None:
                logits = logits + bias[:, None, None, :]
            out.append(logits.softmax(dim=-1).mean(dim=1))
        return torch.cat(out, dim=1)
    if mode == "img2txt_joint":
        return _joint_slice(q_img, k_all, k_txt, scale)
    if mode == "txt2img_joint":
        return _joint_slice(q_txt, k_all, k_img, scale).transpose(1, 2)
    raise ValueError(f"map_mode must be one of {MAP_MODES}; got {mode!r}")


def _joint_slice(q: torch.Tensor, k_all: torch.Tensor, k_sub: torch.Tensor, scale: float) -> torch.Tensor:
    """Head-mean exp(s·q·k_sub − LSE over all keys) [B, N_q, N_sub]: a slice of the joint softmax, chunked."""
    ka = k_all.float().transpose(-1, -2)
    ks = k_sub.float().transpose(-1, -2)
    out = []
    for s, e in _chunks(q.shape[2], k_all.shape[1] * k_all.shape[2]):
        qc = q[:, :, s:e].float()
        lse = ((qc @ ka) * scale).logsumexp(dim=-1, keepdim=True)
        out.append(((qc @ ks) * scale - lse).exp().mean(dim=1))
    return torch.cat(out, dim=1)


class TextMaps(Effect):
    """Records per-text-token spatial maps on `layers` (None: every text-attention layer) for the rows whose
    role is `role`. Maps land in `self.maps[(key, layer)]` as [rows, N_columns, frames, grid_h, grid_w]
    fp32, where `key` is whatever the caller set with `at(key)` (e.g. the noise level) and `columns` are
    the kept text positions (None: all text tokens).

    gas_mode "drop" is read-only. "suppress"/"redirect": in layers >= `gas_min_layer`, sink columns detected
    in the layer's own text-restricted map get `bias` (−inf: removed) on their logits for the image queries
    of the recorded rows; the recorded map is the one after suppression."""

    stage = "observe"
    name = "refam"

    def __init__(self, layers: Optional[Sequence[int]] = None, map_mode: str = "img2txt_textsoftmax",
                 role: str = "cond", columns: Optional[Sequence[int]] = None, gas_mode: str = "drop",
                 gas_min_layer: int = 0, gas_mass: float = 0.2, gas_cv: float = 0.5, bias: float = -math.inf,
                 sink_candidates: Optional[Sequence[int]] = None, device: Optional[str] = None):
        self.layers = None if layers is None else frozenset(int(x) for x in layers)
        self.map_mode, self.role, self.gas_mode = map_mode, role, gas_mode
        self.columns = None if columns is None else tuple(int(c) for c in columns)
        self.gas_min_layer, self.gas_mass, self.gas_cv, self.bias = int(gas_min_layer), gas_mass, gas_cv, float(bias)
        self.sink_candidates = None if sink_candidates is None else tuple(int(c) for c in sink_candidates)
        self.device = device
        self.key = None
        self.maps: dict = {}
        self._pending: dict = {}  # layer -> maps recorded by a compiled forward, filed under `key` by `flush`
        self.sinks: dict = {}  # (key, layer) -> sorted text positions suppressed there
        self._col_index: dict = {}

    # --- set-up checks ---------------------------------------------------------------------------
    def validate(self) -> None:
        if self.map_mode not in MAP_MODES:
            raise ValueError(f"map_mode must be one of {MAP_MODES}; got {self.map_mode!r}")
        if self.gas_mode not in GAS_MODES:
            raise ValueError(f"gas_mode must be one of {GAS_MODES}; got {self.gas_mode!r}")
        if not 0.0 <= self.gas_mass <= 1.0 or self.gas_cv < 0:
            raise ValueError(f"gas thresholds: mass in [0, 1] and cv >= 0; got {self.gas_mass}, {self.gas_cv}")
        if self.bias > 0:
            raise ValueError(f"sink bias must be <= 0 (a logit penalty; -inf removes the column); got {self.bias}")

    def check_model(self, family: str, token_scale) -> None:
        if self.map_mode == "txt2img_joint" and family not in ("flux", "sd3"):
            raise ValueError(f"map_mode 'txt2img_joint' needs joint attention (FLUX, SD3); {family} models attend "
                             "to text through cross-attention: use 'img2txt_textsoftmax'")

    def check_sites(self, sites) -> None:
        have = sorted({s.layer for s, _ in sites if s.kind in TEXT_KINDS})
        if self.layers is not None:
            bad = sorted(self.layers - set(have))
            if bad:
                raise ValueError(f"RefAM layers {bad} have no image↔text attention in this model; text-attention "
                                 f"layers are {_ranges(have)}")

    def applies(self, site: Site) -> bool:
        return site.kind in TEXT_KINDS and (self.layers is None or site.layer in self.layers)

    # --- recording -------------------------------------------------------------------------------
    def at(self, key) -> "TextMaps":
        """Label the maps recorded from now on (e.g. with the noise level of the next forward)."""
        self.flush()
        self.key = key
        return self

    def flush(self) -> None:
        """File the maps of compiled forwards under the key they ran with. A compiled graph stores them per
        layer only: a key that changes every forward would be a guard that recompiles every forward."""
        for layer, maps in self._pending.items():
            self.maps[(self.key, layer)] = maps
        self._pending.clear()

    def clear(self) -> None:
        self.maps.clear()
        self.sinks.clear()
        self._pending.clear()

    def _columns(self, n_text: int, device) -> Optional[torch.Tensor]:
        if self.columns is None:
            return None

        def build():
            bad = [c for c in self.columns if not 0 <= c < n_text]
            if bad:
                raise ValueError(f"RefAM columns {bad[:5]} are outside this model's {n_text} text tokens")
            return torch.tensor(self.columns, device=device)

        return cached(self._col_index, (n_text, device), build)

    def __call__(self, call: AttentionCall, attend: Attend) -> torch.Tensor:
        t = call.tokens
        if t.q_image is None or t.k_text is None or t.grid is None:
            return attend(call.q, call.k, call.v)
        rows = call.rows_with(self.role)
        if not rows:
            return attend(call.q, call.k, call.v)
        scale = call.default_scale()
        r = torch.tensor(rows, device=call.q.device) if len(rows) < call.batch else None
        pick = (lambda x: x) if r is None else (lambda x: x.index_select(0, r))
        q, k = pick(call.q), pick(call.k)
        q_img, k_txt = q[:, :, t.q_image], k[:, :, t.k_text]
        suppress = self.gas_mode != "drop" and call.site.layer >= self.gas_min_layer
        with torch.no_grad():
            if suppress:
                bias = self._sink_bias(call, q_img, k_txt, scale)
                maps = self._select(call.mean_over_heads(text_maps(q_img, k_txt, scale, "img2txt_textsoftmax", bias=bias)))
            else:
                bias = None
                maps = call.mean_over_heads(self._maps(call, q, k, scale))
                if not (self.map_mode == "img2txt_textsoftmax" or call.tokens.k_image is None):
                    maps = self._select(maps)
            self._store(call, maps)
        out = attend(call.q, call.k, call.v)
        if bias is not None and bool(torch.isfinite(bias).logical_not().any() or bias.ne(0).any()):
            out = self._suppressed(call, attend, out, rows, bias)
        return out

    def _maps(self, call, q, k, scale):
        """[rows, N_image, N_columns]. The text softmax runs over the kept columns only (every head renormalised
        over the prompt's words, so BOS/EOS/padding keys have no influence); the joint slices keep their values."""
        t = call.tokens
        if self.map_mode == "img2txt_textsoftmax" or t.k_image is None:
            k_txt = k[:, :, t.k_text]
            cols = self._columns(k_txt.shape[2], k.device)
            if cols is not None:
                k_txt = k_txt.index_select(2, cols)
            return text_maps(q[:, :, t.q_image], k_txt, scale, "img2txt_textsoftmax")
        if self.map_mode == "img2txt_joint":
            return text_maps(q[:, :, t.q_image], k[:, :, t.k_text], scale, "img2txt_joint", k_all=k)
        if t.q_text is None:
            raise ValueError(f"map_mode 'txt2img_joint' needs text queries; layer {call.site.layer} has none")
        return text_maps(None, None, scale, "txt2img_joint", k_all=k, q_txt=q[:, :, t.q_text], k_img=k[:, :, t.k_image])

    def _sink_bias(self, call, q_img, k_txt, scale) -> torch.Tensor:
        layer = call.site.layer
        maps = call.mean_over_heads(text_maps(q_img, k_txt, scale, "img2txt_textsoftmax"))
        sinks = detect_sinks(maps, self.gas_mass, self.gas_cv)  # [rows, Nt]
        if self.sink_candidates is not None:
            allowed = torch.zeros_like(sinks)
            allowed[:, [c for c in self.sink_candidates if c < sinks.shape[-1]]] = True
            sinks &= allowed
        found = sorted({int(c) for c in sinks.nonzero()[:, 1].tolist()})
        self.sinks[(self.key, layer)] = found
        return torch.where(sinks, torch.full_like(maps[:, 0], self.bias), torch.zeros_like(maps[:, 0]))

    def _suppressed(self, call, attend, out, rows, bias):
        """Image queries of the recorded rows attend again with the sink bias on their text key columns."""
        t = call.tokens
        r = torch.tensor(rows, device=call.q.device)
        col_bias = torch.zeros(len(rows), call.kv_len, device=call.q.device, dtype=torch.float32)
        col_bias[:, t.k_text] = bias
        mask = col_bias.to(call.q.dtype if call.q.is_floating_point() else torch.float32)[:, None, None, :]
        if call.mask is not None:
            mask = mask + call.mask.index_select(0, r) if call.mask.shape[0] == call.batch else mask + call.mask
        n_img = t.q_image.stop - t.q_image.start
        layout = type(t)(q_image=slice(0, n_img), k_image=t.k_image, k_text=t.k_text, grid=t.grid, scale=t.scale,
                         native_grid=t.native_grid, text_first=t.text_first, text_segments=t.text_segments)
        roles = None if call.roles is None else tuple(call.roles[i] for i in rows)
        sub = attend(call.q.index_select(0, r)[:, :, t.q_image], call.k.index_select(0, r), call.v.index_select(0, r),
                     mask=mask, tokens=layout, roles=roles)
        rows_out = out.index_select(0, r)
        rows_out[:, :, t.q_image] = sub
        return out.index_copy(0, r, rows_out)

    def _select(self, maps: torch.Tensor) -> torch.Tensor:
        cols = self._columns(maps.shape[-1], maps.device)
        return maps if cols is None else maps.index_select(-1, cols)

    def _store(self, call, maps: torch.Tensor) -> None:
        f, h, w = call.tokens.grid
        maps = maps.reshape(maps.shape[0], f, h, w, maps.shape[-1]).permute(0, 4, 1, 2, 3).contiguous()
        if self.device is not None:
            maps = maps.to(self.device)
        if compiling():
            self._pending[call.site.layer] = maps
        else:
            self.maps[(self.key, call.site.layer)] = maps


def _ranges(values: Sequence[int]) -> str:
    if not values:
        return "none"
    out, start, prev = [], values[0], values[0]
    for v in list(values[1:]) + [None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        out.append(f"{start}" if start == prev else f"{start}–{prev}")
        if v is not None:
            start = prev = v
    return ", ".join(out)
