"""FreeSwim's inward (clamped-centre) sliding window over the image token grid, and its kernels.

The window of a query at grid position (t, y, x) of a (T, H, W) token grid is every key of every frame
whose row lies in ``[sy, sy + Kh)`` and whose column lies in ``[sx, sx + Kw)``, where

    K = min(2d + 1, size)         sy = clamp(y − d_h, 0, H − Kh)         sx = clamp(x − d_w, 0, W − Kw)

i.e. a (2d_h+1) × (2d_w+1) window centred on the query, shifted *inward* at the borders instead of cut
off (FreeSwim's b/u/l/r shifts; NATTEN's clamped-centre neighbourhood with a full temporal kernel). Every
image query therefore sees exactly T·Kh·Kw image keys; an axis whose window is at least the grid is
attended fully, so a window covering the grid is plain attention. Text tokens of joint attention (FLUX
text-first, SD3 image-first) attend to everything and are attended by everything.

Backends (all exact, same result up to float rounding):

    chunked   query tiles (all frames × th × tw), each against the union rectangle of its windows (plus
              the text keys) with a (tile × rect) boolean mask: memory bounded by tile × window, never N×N.
              Runs through any ``kernel(q, k, v, mask, scale)`` (the host's attention), so CPU/MPS work.
    flex      PyTorch FlexAttention over *tile-major* token order (image tokens permuted into th × tw tiles
              per frame, padded, permuted back), block masks cached per (grid, window, tile, text, device);
              compiled on CUDA. Imported lazily, only when used.
    dense     an explicit N×N boolean mask: a reference for tests only (refuses large N).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "chunked", "flex", "dense")
#: the dense reference refuses sequences longer than this (it builds an N×N mask)
DENSE_LIMIT = 8192


@dataclass(frozen=True)
class WindowSpec:
    """Where the image tokens sit in the (self/joint) sequence and how large their window is.

    grid: (T, H, W) image token grid, raster order, frame-major (w fastest).
    half: (d_h, d_w) half-widths; the window is (2d_h+1) × (2d_w+1), clamped to the grid.
    image: slice of the image tokens in the sequence; text: slice of the text tokens (joint attention) or None.
    """

    grid: tuple[int, int, int]
    half: tuple[int, int]
    image: slice
    text: Optional[slice] = None
    inward: bool = True  # False: the naive truncated window (FreeSwim's "w/o inward" ablation)

    @property
    def kernel(self) -> tuple[int, int]:
        """(Kh, Kw): the window's rows and columns after clamping to the grid."""
        return (min(2 * self.half[0] + 1, self.grid[1]), min(2 * self.half[1] + 1, self.grid[2]))

    @property
    def covers_grid(self) -> bool:
        """True when every query's window is the whole grid: window attention is plain attention."""
        if not self.inward:
            return self.half[0] >= self.grid[1] - 1 and self.half[1] >= self.grid[2] - 1
        return self.kernel == (self.grid[1], self.grid[2])

    @property
    def image_tokens(self) -> int:
        return math.prod(self.grid)

    @property
    def text_tokens(self) -> int:
        return 0 if self.text is None else self.text.stop - self.text.start

    def keys_per_query(self) -> int:
        """Image keys every image query sees: T·Kh·Kw (plus all text keys in joint attention); inward windows only."""
        if not self.inward:
            raise ValueError("a truncated window has fewer keys at the borders: no single count")
        kh, kw = self.kernel
        return self.grid[0] * kh * kw


def half_widths(base_hw: tuple[int, int], window_scale: float = 1.0) -> tuple[int, int]:
    """(d_h, d_w) for a base (native) token grid of h0 × w0: ``⌊h0·s⌋ // 2``, ``⌊w0·s⌋ // 2`` (FreeSwim's
    ``base//16//2``; 30×52 → (15, 26) → a 31×53 window)."""
    return (int(math.floor(base_hw[0] * window_scale + 1e-9)) // 2, int(math.floor(base_hw[1] * window_scale + 1e-9)) // 2)


def window_starts(size: int, half: int, device=None) -> tuple[torch.Tensor, int]:
    """(start of each position's window along one axis, window length K = min(2·half+1, size))."""
    k = min(2 * half + 1, size)
    starts = (torch.arange(size, device=device) - half).clamp(0, size - k)
    return starts, k


def axis_bounds(size: int, half: int, inward: bool = True, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi) of each position's window along one axis, keys in [lo, hi): inward = shifted to K = min(2·half+1,
    size) keys everywhere; truncated = [q − half, q + half] cut at the borders. Both are non-decreasing in q."""
    if inward:
        lo, k = window_starts(size, half, device)
        return lo, lo + k
    q = torch.arange(size, device=device)
    return (q - half).clamp_min(0), (q + half + 1).clamp_max(size)


def decode_raster(index: torch.Tensor, grid: tuple[int, int, int]):
    """(t, y, x) of raster (t-major, then rows, then columns) image token indices."""
    _, h, w = grid
    return index // (h * w), (index % (h * w)) // w, index % w


def image_mask(grid: tuple[int, int, int], half: tuple[int, int], device=None, inward: bool = True) -> torch.Tensor:
    """The (T·H·W)² boolean window mask over image tokens in raster order (tests and docs only)."""
    t, h, w = grid
    ly, hy = axis_bounds(h, half[0], inward, device)
    lx, hx = axis_bounds(w, half[1], inward, device)
    ys = torch.arange(h, device=device)
    xs = torch.arange(w, device=device)
    row = (ys[None, :] >= ly[:, None]) & (ys[None, :] < hy[:, None])  # [query y, key y]
    col = (xs[None, :] >= lx[:, None]) & (xs[None, :] < hx[:, None])
    frame = row[:, None, :, None] & col[None, :, None, :]  # [qy, qx, ky, kx]
    frame = frame.reshape(h * w, h * w)
    return frame.repeat(t, t)  # every frame sees every frame


def sequence_mask(spec: WindowSpec, n: int, device=None) -> torch.Tensor:
    """The N×N boolean mask of a whole self/joint sequence of length `n` (tests only): text rows and
    columns all True, image×image the window."""
    m = torch.ones(n, n, dtype=torch.bool, device=device)
    img = spec.image
    m[img, img] = image_mask(spec.grid, spec.half, device, spec.inward)
    return m


def sdpa_kernel(q, k, v, mask=None, scale=None):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[float]], torch.Tensor]


def _check(q, k, spec: WindowSpec) -> None:
    n = spec.image_tokens + spec.text_tokens
    if q.shape[-2] != n or k.shape[-2] != n:
        raise ValueError(f"window attention needs a self/joint sequence of {n} tokens (grid {spec.grid} + "
                         f"{spec.text_tokens} text); got {q.shape[-2]} queries and {k.shape[-2]} keys")
    if spec.image.stop - spec.image.start != spec.image_tokens:
        raise ValueError(f"image span {spec.image} does not hold the {spec.image_tokens} tokens of grid {spec.grid}")


def dense_window_attention(q, k, v, spec: WindowSpec, scale: Optional[float] = None, kernel: Kernel = sdpa_kernel,
                           limit: int = DENSE_LIMIT) -> torch.Tensor:
    """Reference: one SDPA with the explicit N×N mask. Refuses N > `limit`."""
    _check(q, k, spec)
    n = q.shape[-2]
    if n > limit:
        raise ValueError(f"the dense window reference builds an N×N mask and refuses N = {n} > {limit}; "
                         "use backend='chunked' (CPU) or 'flex' (CUDA)")
    return kernel(q, k, v, sequence_mask(spec, n, q.device)[None, None], scale)


def default_tile(spec: WindowSpec) -> tuple[int, int]:
    """Query tile (rows, cols): half the window (a tile's key rectangle is ≤ 1.5× the window per axis), at
    least 8 (small windows: fewer, larger kernel calls; the rectangle stays ≤ 8 + K per axis)."""
    kh, kw = spec.kernel
    return (max(8, -(-kh // 2)), max(8, -(-kw // 2)))


def _bounds(size: int, half: int, inward: bool) -> tuple[list[int], list[int]]:
    """`axis_bounds` as Python ints: the tiling below is plain Python on the grid, so a compiled graph has
    no tensor value to read (it would be a graph break) and keeps only the masks, as constants."""
    if inward:
        k = min(2 * half + 1, size)
        lo = [min(max(q - half, 0), size - k) for q in range(size)]
        return lo, [s + k for s in lo]
    return [max(q - half, 0) for q in range(size)], [min(q + half + 1, size) for q in range(size)]


def window_tiles(spec: WindowSpec, th: int, tw: int):
    """Query tiles of the grid and the key rectangle their windows cover: yields (y0, y1, x0, x1, r0, r1, c0, c1,
    mask) with `mask` [(y1−y0)·(x1−x0), (r1−r0)·(c1−c0)] bool (query position may see key position), one frame;
    `mask` is None where every query of the tile sees the whole rectangle."""
    _, h, w = spec.grid
    ly, hy = _bounds(h, spec.half[0], spec.inward)
    lx, hx = _bounds(w, spec.half[1], spec.inward)

    def axis_mask(lo, hi, a0, a1, b0, b1):
        keys = torch.arange(b0, b1)
        return ((keys[None, :] >= torch.tensor(lo[a0:a1])[:, None]) & (keys[None, :] < torch.tensor(hi[a0:a1])[:, None]),
                all(lo[a] == b0 and hi[a] == b1 for a in range(a0, a1)))

    for y0 in range(0, h, th):
        y1 = min(y0 + th, h)
        r0, r1 = ly[y0], hy[y1 - 1]
        mh, full_h = axis_mask(ly, hy, y0, y1, r0, r1)
        for x0 in range(0, w, tw):
            x1 = min(x0 + tw, w)
            c0, c1 = lx[x0], hx[x1 - 1]
            mw, full_w = axis_mask(lx, hx, x0, x1, c0, c1)
            mask = None
            if not (full_h and full_w):
                mask = (mh[:, None, :, None] & mw[None, :, None, :]).reshape((y1 - y0) * (x1 - x0),
                                                                             (r1 - r0) * (c1 - c0))
            yield y0, y1, x0, x1, r0, r1, c0, c1, mask


def chunked_window_attention(q, k, v, spec: WindowSpec, scale: Optional[float] = None, kernel: Kernel = sdpa_kernel,
                             tile: Optional[tuple[int, int]] = None, text_queries: bool = True) -> torch.Tensor:
    """Exact window attention, query tile by query tile. Each tile (all frames × th × tw positions) attends
    to the union rectangle of its windows over all frames (and all text keys) with a (tile × rect) mask;
    text queries attend to everything (``text_queries=False``: only the image-query rows are computed and
    returned). Peak extra memory ~ T²·th·tw·(th+Kh)·(tw+Kw), independent of N."""
    _check(q, k, spec)
    if spec.covers_grid and text_queries:
        return kernel(q, k, v, None, scale)
    b, nh, _, dim = q.shape
    t, h, w = spec.grid
    th, tw = tile or default_tile(spec)
    th, tw = max(1, min(th, h)), max(1, min(tw, w))
    img = spec.image
    qg = q[:, :, img].reshape(b, nh, t, h, w, dim)
    kg = k[:, :, img].reshape(b, nh, t, h, w, dim)
    vg = v[:, :, img].reshape(b, nh, t, h, w, dim)
    kt = vt = None
    if spec.text is not None and spec.text_tokens:
        kt, vt = k[:, :, spec.text], v[:, :, spec.text]
    out_img = None
    for y0, y1, x0, x1, r0, r1, c0, c1, m2 in window_tiles(spec, th, tw):
        qt = qg[:, :, :, y0:y1, x0:x1].reshape(b, nh, -1, dim)
        kr = kg[:, :, :, r0:r1, c0:c1].reshape(b, nh, -1, dim)
        vr = vg[:, :, :, r0:r1, c0:c1].reshape(b, nh, -1, dim)
        mask = None if m2 is None else m2.repeat(t, t).to(q.device)
        if kt is not None:
            kr, vr = torch.cat([kt, kr], dim=2), torch.cat([vt, vr], dim=2)
            if mask is not None:
                mask = torch.cat([torch.ones(mask.shape[0], kt.shape[2], dtype=torch.bool, device=q.device), mask], 1)
        out = kernel(qt, kr, vr, None if mask is None else mask[None, None], scale)
        if out_img is None:
            out_img = torch.empty((b, nh, t, h, w, out.shape[-1]), dtype=out.dtype, device=out.device)
        out_img[:, :, :, y0:y1, x0:x1] = out.reshape(b, nh, t, y1 - y0, x1 - x0, -1)
    out_img = out_img.reshape(b, nh, t * h * w, -1)
    if kt is None or not text_queries:
        return out_img
    out_txt = kernel(q[:, :, spec.text], k, v, None, scale)
    parts = [(img.start, out_img), (spec.text.start, out_txt)]
    parts.sort(key=lambda p: p[0])
    return torch.cat([p[1] for p in parts], dim=2)


def lse_window_partials(q, k, v, spec: WindowSpec, scale: float, tile: Optional[tuple[int, int]] = None):
    """(output, log-sum-exp) of the image queries over their windowed *image* keys only (no text keys), in fp32,
    tile by tile with an explicit (tile × rect) softmax: the image partial of FreeSwim's MMDiT option (b)."""
    b, nh, _, dim = q.shape
    t, h, w = spec.grid
    th, tw = tile or default_tile(spec)
    th, tw = max(1, min(th, h)), max(1, min(tw, w))
    img = spec.image
    qg = q[:, :, img].float().reshape(b, nh, t, h, w, dim)
    kg = k[:, :, img].float().reshape(b, nh, t, h, w, dim)
    vg = v[:, :, img].float().reshape(b, nh, t, h, w, -1)
    out = torch.empty(b, nh, t, h, w, vg.shape[-1], device=q.device)
    lse = torch.empty(b, nh, t, h, w, device=q.device)
    for y0, y1, x0, x1, r0, r1, c0, c1, m2 in window_tiles(spec, th, tw):
        mask = None if m2 is None else m2.repeat(t, t).to(q.device)
        qt = qg[:, :, :, y0:y1, x0:x1].reshape(b, nh, -1, dim)
        kr = kg[:, :, :, r0:r1, c0:c1].reshape(b, nh, -1, dim)
        vr = vg[:, :, :, r0:r1, c0:c1].reshape(b, nh, -1, vg.shape[-1])
        logits = qt @ kr.transpose(-1, -2) * scale
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        l = torch.logsumexp(logits, dim=-1)
        o = torch.exp(logits - l[..., None]) @ vr
        out[:, :, :, y0:y1, x0:x1] = o.reshape(b, nh, t, y1 - y0, x1 - x0, -1)
        lse[:, :, :, y0:y1, x0:x1] = l.reshape(b, nh, t, y1 - y0, x1 - x0)
    return out.reshape(b, nh, t * h * w, -1), lse.reshape(b, nh, t * h * w)


# --- FlexAttention over tile-major token order -----------------------------------------------------------
def tiled_order(grid: tuple[int, int, int], tile: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
    """Raster index of every position of the tile-major order (t, tile row, tile col, row in tile, col in
    tile), with H and W padded up to tile multiples; padded positions are -1. Returns (index, (Hp, Wp))."""
    t, h, w = grid
    th, tw = tile
    hp, wp = -(-h // th) * th, -(-w // tw) * tw
    tt, ty, tx, iy, ix = torch.meshgrid(torch.arange(t), torch.arange(hp // th), torch.arange(wp // tw),
                                        torch.arange(th), torch.arange(tw), indexing="ij")
    y, x = ty * th + iy, tx * tw + ix
    index = torch.where((y < h) & (x < w), tt * h * w + y * w + x, torch.full_like(y, -1))
    return index.reshape(-1), (hp, wp)


def decode_tiled(index: torch.Tensor, grid: tuple[int, int, int], tile: tuple[int, int]):
    """(t, y, x) of positions in the tile-major order of `tiled_order` (padded positions decode to y ≥ H or x ≥ W)."""
    _, h, w = grid
    th, tw = tile
    hp, wp = -(-h // th) * th, -(-w // tw) * tw
    per_frame = hp * wp
    r = index % per_frame
    tile_i, inner = r // (th * tw), r % (th * tw)
    tiles_x = wp // tw
    return index // per_frame, (tile_i // tiles_x) * th + inner // tw, (tile_i % tiles_x) * tw + inner % tw


def _mask_mod(grid, half, tile, n_text, inward: bool = True):
    _, h, w = grid
    kh, kw = min(2 * half[0] + 1, h), min(2 * half[1] + 1, w)

    def mask_mod(b, hd, q_idx, kv_idx):
        qi, ki = q_idx - n_text, kv_idx - n_text
        _, qy, qx = decode_tiled(qi.clamp_min(0), grid, tile)
        _, ky, kx = decode_tiled(ki.clamp_min(0), grid, tile)
        if inward:
            ly = (qy - half[0]).clamp(0, h - kh)
            lx = (qx - half[1]).clamp(0, w - kw)
            hy, hx = ly + kh, lx + kw
        else:
            ly, hy = (qy - half[0]).clamp_min(0), (qy + half[0] + 1).clamp_max(h)
            lx, hx = (qx - half[1]).clamp_min(0), (qx + half[1] + 1).clamp_max(w)
        win = (ky >= ly) & (ky < hy) & (kx >= lx) & (kx < hx)
        key_real = (ky < h) & (kx < w)
        return (ki < 0) | ((qi < 0) & key_real) | (win & key_real)

    return mask_mod


class FlexWindow:
    """FlexAttention backend: block masks cached per (grid, window, tile, text length, device), the
    compiled kernel built once (CUDA) or eager (CPU, tests only: eager flex is O(N²) memory)."""

    def __init__(self, tile: tuple[int, int] = (8, 16), compile: Optional[bool] = None, max_masks: int = 16):
        self.tile = tuple(tile)
        self.compile = compile
        self.max_masks = max_masks
        self._masks: dict = {}
        self._orders: dict = {}
        self._fn = {}
        self._lock = threading.Lock()

    @staticmethod
    def available() -> bool:
        try:
            from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
        except Exception:
            return False
        return True

    def _function(self, device: torch.device):
        compiled = self.compile if self.compile is not None else device.type == "cuda"
        fn = self._fn.get(compiled)
        if fn is None:
            from torch.nn.attention.flex_attention import flex_attention

            fn = torch.compile(flex_attention, dynamic=False) if compiled else flex_attention
            self._fn[compiled] = fn
        return fn

    def order(self, grid, device):
        key = (grid, self.tile, str(device))
        hit = self._orders.get(key)
        if hit is None:
            index, _ = tiled_order(grid, self.tile)
            index = index.to(device)
            real = (index >= 0).nonzero().squeeze(1)
            hit = self._orders[key] = (index, real)
        return hit

    def block_mask(self, spec: WindowSpec, length: int, device):
        key = (spec.grid, spec.half, spec.inward, self.tile, spec.text_tokens, length, str(device))
        with self._lock:
            bm = self._masks.get(key)
            if bm is None:
                from torch.nn.attention.flex_attention import create_block_mask

                if len(self._masks) >= self.max_masks:
                    self._masks.clear()
                mod = _mask_mod(spec.grid, spec.half, self.tile, spec.text_tokens, spec.inward)
                bm = create_block_mask(mod, B=None, H=None, Q_LEN=length, KV_LEN=length, device=device,
                                       _compile=device.type == "cuda")
                self._masks[key] = bm
        return bm

    def __call__(self, q, k, v, spec: WindowSpec, scale: Optional[float] = None) -> torch.Tensor:
        _check(q, k, spec)
        index, real = self.order(spec.grid, q.device)
        gather = index.clamp_min(0)

        def arrange(x):
            img = x[:, :, spec.image].index_select(2, gather)
            img = img * (index >= 0).to(img.dtype)[:, None]  # padded positions: zeros (masked as keys anyway)
            if spec.text is None or not spec.text_tokens:
                return img
            return torch.cat([x[:, :, spec.text], img], dim=2)

        qf, kf, vf = arrange(q), arrange(k), arrange(v)
        length = qf.shape[2]
        out = self._function(q.device)(qf, kf, vf, block_mask=self.block_mask(spec, length, q.device), scale=scale)
        n_text = spec.text_tokens
        out_img = torch.empty(q.shape[0], q.shape[1], spec.image_tokens, out.shape[-1], dtype=out.dtype, device=out.device)
        out_img[:, :, index[real]] = out[:, :, n_text + real]
        if not n_text:
            return out_img
        parts = sorted([(spec.image.start, out_img), (spec.text.start, out[:, :, :n_text])], key=lambda p: p[0])
        return torch.cat([p[1] for p in parts], dim=2)


def block_density(grid, half, tile, n_text: int = 0, block: int = 128) -> float:
    """Fraction of the (block × block) tiles of the flex mask holding any allowed pair, in tile-major order
    (`tile`) or raster order (tile None). A cost proxy, computed on CPU one query block at a time."""
    tile = tuple(tile) if tile is not None else (1, grid[2])
    index, _ = tiled_order(grid, tile)
    n = n_text + index.numel()
    mod = _mask_mod(grid, half, tile, n_text)
    keys = torch.arange(n)
    nb = -(-n // block)
    hits = 0
    for i in range(nb):
        rows = keys[i * block:(i + 1) * block]
        cols = mod(None, None, rows[:, None], keys[None, :]).any(0)
        cols = F.pad(cols, (0, nb * block - n))
        hits += int(cols.reshape(nb, block).any(1).sum())
    return hits / (nb * nb)
