"""RefAM heatmaps and masks: aggregate recorded text maps over noise levels, layers and words into one
heatmap at image size, then a mask by threshold (Otsu or mean + k·std, the connected component at the peak)
or by prompting a SAM/SAM2 predictor the caller supplies. Framework-free; no SAM dependency."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .refam import detect_sinks

MASK_MODES = ("threshold", "sam_point", "sam_box")
THRESHOLDS = ("otsu", "mean_std")
WORD_REDUCE = ("mean", "max")


@dataclass
class Heatmap:
    """heatmap [F, H, W] in [0, 1]; sinks: (key, layer) -> text positions dropped there; words: the words
    aggregated; word_maps: word -> [F, H, W] (each normalised), for display."""

    heatmap: torch.Tensor
    sinks: dict = field(default_factory=dict)
    words: list = field(default_factory=list)
    word_maps: dict = field(default_factory=dict)


def _minmax(x: torch.Tensor, dims) -> torch.Tensor:
    lo = x.amin(dim=dims, keepdim=True)
    hi = x.amax(dim=dims, keepdim=True)
    return (x - lo) / (hi - lo + 1e-8)


def aggregate(recorded: Mapping, columns: Sequence[int], words: Sequence[tuple[str, Sequence[int]]],
              size: tuple[int, int], *, gas_min_layer: int = 0, gas_mass: float = 0.2, gas_cv: float = 0.5,
              drop_sinks: bool = True, renormalize: bool = True, word_reduce: str = "mean",
              layer_weights: Optional[Mapping[int, float]] = None, blur: float = 0.0,
              keep_word_maps: bool = False) -> Heatmap:
    """H = Σ_key Σ_layer w_l Σ_word norm(M_word), upsampled to `size` = (H, W), blurred, min-max normalised.

    recorded: (key, layer) -> [N_columns, F, h, w] maps of ONE image (the recorder's, row selected);
    columns: the text positions those maps hold (in order); words: (word, its text positions) to aggregate.
    Sinks (mass > gas_mass and flat, layers >= gas_min_layer) are dropped when `drop_sinks`; rows are
    renormalised over the remaining columns (`renormalize`)."""
    if word_reduce not in WORD_REDUCE:
        raise ValueError(f"word_reduce must be one of {WORD_REDUCE}; got {word_reduce!r}")
    if not recorded:
        raise ValueError("no attention maps were recorded (no selected layer ran, or the rows had another role)")
    if not words:
        raise ValueError("the expression has no content words left to aggregate (every word is a stop word?)")
    col_of = {c: i for i, c in enumerate(columns)}
    H, W = size
    total, sinks, word_maps = None, {}, {}
    for (key, layer), maps in recorded.items():
        maps = maps.float()
        keep = torch.ones(maps.shape[0], dtype=torch.bool, device=maps.device)
        if drop_sinks and layer >= gas_min_layer:
            flat = maps.flatten(1).transpose(0, 1)  # [N_image, N_columns]
            found = detect_sinks(flat, gas_mass, gas_cv)
            if bool(found.any()):
                sinks[(key, layer)] = [columns[i] for i in found.nonzero()[:, 0].tolist()]
                keep &= ~found
        if renormalize:
            denom = (maps * keep[:, None, None, None]).sum(dim=0, keepdim=True).clamp_min(1e-12)
            maps = maps / denom
        layer_sum = None
        for word, positions in words:
            idx = [col_of[p] for p in positions if p in col_of and bool(keep[col_of[p]])]
            if not idx:
                continue
            pieces = maps[idx]
            m = pieces.mean(dim=0) if word_reduce == "mean" else pieces.amax(dim=0)
            m = _minmax(m, (0, 1, 2))
            layer_sum = m if layer_sum is None else layer_sum + m
            if keep_word_maps:
                up = F.interpolate(m[:, None], size=(H, W), mode="bilinear", align_corners=False)[:, 0]
                word_maps[word] = up if word not in word_maps else word_maps[word] + up
        if layer_sum is None:
            continue
        weight = 1.0 if layer_weights is None else float(layer_weights.get(layer, 0.0))
        up = F.interpolate(layer_sum[:, None], size=(H, W), mode="bilinear", align_corners=False)[:, 0]
        total = weight * up if total is None else total + weight * up
    if total is None:
        raise ValueError("none of the expression's content words has a recorded map (all dropped as sinks?)")
    if blur > 0:
        total = gaussian_blur(total, blur)
    heat = _minmax(total, (0, 1, 2))
    return Heatmap(heat, sinks, [w for w, _ in words], {w: _minmax(m, (0, 1, 2)) for w, m in word_maps.items()})


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of [F, H, W] with std `sigma` pixels (reflect padding).

    The kernel is cut at the image's size: reflect padding must stay under each side (a map read from a coarse
    grid, e.g. toy-sd's 3x3 mid block, asks for a blur of a whole image's width)."""
    if min(x.shape[-2:]) < 2:
        return x
    radius = min(max(1, int(3 * sigma + 0.5)), x.shape[-1] - 1, x.shape[-2] - 1)
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    y = x[:, None]
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), k.view(1, 1, -1, 1))
    return y[:, 0]


# --- masks ----------------------------------------------------------------------------------------


def peak(heat: torch.Tensor) -> tuple[int, int]:
    """(row, col) of the maximum of a [H, W] map."""
    i = int(heat.flatten().argmax())
    return i // heat.shape[-1], i % heat.shape[-1]


def otsu(heat: torch.Tensor, bins: int = 256) -> float:
    """Otsu's threshold of the values of `heat` (maximises the between-class variance)."""
    x = heat.flatten().float()
    lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
        return hi
    hist = torch.histc(x, bins=bins, min=lo, max=hi).double()
    centers = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
    centers = (centers[:-1] + centers[1:]) / 2
    w0 = hist.cumsum(0)
    w1 = hist.sum() - w0
    m0 = (hist * centers).cumsum(0) / w0.clamp_min(1e-12)
    m1 = ((hist * centers).sum() - (hist * centers).cumsum(0)) / w1.clamp_min(1e-12)
    between = w0 * w1 * (m0 - m1) ** 2
    i = int(between[:-1].argmax())
    return float((centers[i] + centers[i + 1]) / 2)


def connected_component(mask: torch.Tensor, seed: tuple[int, int]) -> torch.Tensor:
    """The 8-connected component of the bool [H, W] `mask` that contains `seed` (empty if seed is off)."""
    if not bool(mask[seed]):
        return torch.zeros_like(mask)
    allowed = mask[None, None].float()
    region = torch.zeros_like(allowed)
    region[0, 0, seed[0], seed[1]] = 1.0
    while True:
        grown = F.max_pool2d(region, 3, stride=1, padding=1) * allowed
        if torch.equal(grown, region):
            return region[0, 0].bool()
        region = grown


def threshold_mask(heat: torch.Tensor, method: str = "otsu", k: float = 1.0, component: bool = True) -> torch.Tensor:
    """Bool mask of a [H, W] heatmap: heat > τ (Otsu, or mean + k·std), keeping the component at the peak."""
    if method not in THRESHOLDS:
        raise ValueError(f"threshold must be one of {THRESHOLDS}; got {method!r}")
    tau = otsu(heat) if method == "otsu" else float(heat.mean() + k * heat.std(unbiased=False))
    mask = heat > tau
    if not bool(mask.any()):
        mask = heat >= heat.max()
    return connected_component(mask, peak(heat)) if component else mask


def local_maxima(heat: torch.Tensor, k: int, rel: float = 0.8, min_distance: int = 8) -> list[tuple[int, int]]:
    """Up to `k` peaks of [H, W] `heat` above rel·max, strongest first, at least `min_distance` px apart."""
    pooled = F.max_pool2d(heat[None, None], 2 * min_distance + 1, stride=1, padding=min_distance)[0, 0]
    cand = ((heat == pooled) & (heat >= rel * heat.max())).nonzero().tolist()
    cand.sort(key=lambda rc: -float(heat[rc[0], rc[1]]))
    return [tuple(rc) for rc in cand[:k]]


def sam_mask(predictor, image: np.ndarray, heat: torch.Tensor, mode: str = "sam_point", points: int = 1,
             negative: bool = False, threshold: str = "otsu", k: float = 1.0) -> tuple[torch.Tensor, dict]:
    """Mask from a SAM/SAM2 image predictor (duck-typed: `set_image(HxWx3 uint8)` and
    `predict(point_coords=, point_labels=, box=, multimask_output=True) -> (masks, scores, logits)`),
    prompted by the heatmap: the peak (+ further local maxima above 0.8·max) as positive points, optionally
    the minimum as a negative point ("sam_point"), or the box around the threshold mask ("sam_box").
    Of SAM's candidates the one with the highest mean heat wins, ties broken by SAM's score."""
    if mode not in ("sam_point", "sam_box"):
        raise ValueError(f"SAM mode must be 'sam_point' or 'sam_box'; got {mode!r}")
    if not (hasattr(predictor, "set_image") and hasattr(predictor, "predict")):
        raise ValueError(f"the SAM model must be an image predictor with set_image() and predict() (e.g. "
                         f"sam2.sam2_image_predictor.SAM2ImagePredictor); got {type(predictor).__name__}")
    predictor.set_image(image)
    prompt: dict = {"multimask_output": True}
    info: dict = {}
    if mode == "sam_point":
        pos = local_maxima(heat, max(1, int(points))) or [peak(heat)]
        coords = [(c, r) for r, c in pos]  # SAM takes (x, y)
        labels = [1] * len(coords)
        if negative:
            r, c = peak(-heat)
            coords.append((c, r))
            labels.append(0)
        prompt.update(point_coords=np.array(coords, dtype=np.float32), point_labels=np.array(labels, dtype=np.int32))
        info["points"] = coords
        info["labels"] = labels
    else:
        m = threshold_mask(heat, threshold, k)
        rows, cols = m.nonzero()[:, 0], m.nonzero()[:, 1]
        box = [int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1]
        prompt["box"] = np.array(box, dtype=np.float32)
        info["box"] = box
    masks, scores, _ = predictor.predict(**prompt)
    masks = torch.as_tensor(np.asarray(masks)).bool()
    if masks.ndim == 2:
        masks = masks[None]
    scores = torch.as_tensor(np.asarray(scores), dtype=torch.float64).flatten()
    if masks.shape[-2:] != heat.shape[-2:]:
        raise ValueError(f"SAM returned masks of size {tuple(masks.shape[-2:])} for an image of {tuple(heat.shape)}")
    heat64 = heat.double()
    mean_heat = torch.stack([heat64[m].mean() if bool(m.any()) else heat64.new_tensor(-1.0) for m in masks])
    best = max(range(len(masks)), key=lambda i: (round(float(mean_heat[i]), 6), float(scores[i]) if i < len(scores) else 0.0))
    info["scores"] = scores.tolist()
    info["chosen"] = best
    return masks[best], info


def iou(pred: torch.Tensor, truth: torch.Tensor) -> tuple[int, int]:
    """(intersection, union) pixel counts of two bool masks (for mIoU and oIoU)."""
    pred, truth = pred.bool(), truth.bool()
    return int((pred & truth).sum()), int((pred | truth).sum())


# --- display --------------------------------------------------------------------------------------

_COLORMAP = np.array([[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21],
                      [250, 193, 39], [252, 255, 164]], dtype=np.float32)  # inferno at 8 stops


def colorize(heat: torch.Tensor) -> np.ndarray:
    """[H, W] values in [0, 1] -> HxWx3 uint8 (inferno-like colour map)."""
    x = heat.clamp(0, 1).cpu().numpy() * (len(_COLORMAP) - 1)
    lo = np.floor(x).astype(int).clip(0, len(_COLORMAP) - 2)
    t = (x - lo)[..., None]
    return (_COLORMAP[lo] * (1 - t) + _COLORMAP[lo + 1] * t).round().astype(np.uint8)


def overlay(image: np.ndarray, heat: torch.Tensor, mask: Optional[torch.Tensor] = None, alpha: float = 0.5):
    """PIL image: `image` (HxWx3 uint8) blended with the coloured heatmap, the mask's outline in cyan."""
    from PIL import Image

    base = image.astype(np.float32)
    out = base * (1 - alpha) + colorize(heat).astype(np.float32) * alpha
    if mask is not None:
        m = mask.float()[None, None]
        edge = (F.max_pool2d(m, 3, 1, 1) - m)[0, 0].bool().cpu().numpy()
        out[edge] = (0, 255, 255)
    return Image.fromarray(out.round().clip(0, 255).astype(np.uint8))
