"""Scene parser: reads a toy-world image back into objects and background, and scores prompt adherence.

Made for these renders, and tolerant enough for model outputs that roughly follow them:

* objects: pixels within `tol` (RGB distance) of an object palette colour, then grown into the adjacent
  soft-edge pixels that are at least half that colour blended with a background colour (anti-aliasing,
  blur, VAE decoders), grouped into 4-connected components of one colour; tiny components are dropped.
* shape: solidity (area / convex-hull area) separates the star (~0.5) from convex shapes; the fill ratio
  of the bounding box then separates square (~1.0) from circle (~pi/4) and triangle (~0.5), and the
  share of area in the top half of the box (triangle ~0.25, circle ~0.5) backs up the last split.
* size: the bounding box's longer side divided by the shape's box-to-radius factor, nearest size class.
* background: a monotone colour ramp along one axis -> gradient; otherwise the remaining pixels are
  snapped to the background palette: one colour -> flat; two colours with uniform rows or columns ->
  stripes; else a minority colour covering < 35 % -> dots, otherwise checker.

Only numpy and PIL are needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from .scenes import (BACKGROUND_COLOURS, OBJECT_COLOURS, SIZES, Background, Scene, relation, relation_holds)

_OBJ_NAMES = list(OBJECT_COLOURS)
_OBJ_RGB = np.array([OBJECT_COLOURS[n] for n in _OBJ_NAMES], np.float64)
_BG_NAMES = list(BACKGROUND_COLOURS)
_BG_RGB = np.array([BACKGROUND_COLOURS[n] for n in _BG_NAMES], np.float64)
# Longer bounding-box side / radius, per shape (see scenes.shape_mask).
_BOX_FACTOR = {"circle": 2.0, "square": 1.7, "triangle": math.sqrt(3), "star": 2 * math.sin(math.radians(72))}


@dataclass
class ParsedObject:
    colour: str
    shape: str
    size: str
    cx: float  # bounding-box centre, fraction of the width
    cy: float
    area: int
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (end-exclusive)
    fill: float
    solidity: float


@dataclass
class ParsedScene:
    objects: list[ParsedObject]
    background: Background
    size: tuple[int, int]  # (width, height)
    features: dict = field(default_factory=dict)


def _to_array(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {arr.shape}")
    if arr.dtype != np.uint8:
        arr = np.clip(np.rint(arr.astype(np.float64) * (255 if arr.max() <= 1.0 else 1)), 0, 255)
    return arr.astype(np.float64)


def _nearest(pixels: np.ndarray, palette: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d = np.linalg.norm(pixels[..., None, :] - palette, axis=-1)
    idx = d.argmin(-1)
    return idx, np.take_along_axis(d, idx[..., None], -1)[..., 0]


def _components(labels: np.ndarray) -> np.ndarray:
    """4-connected components of equal non-negative labels; returns component ids (-1 for background)."""
    h, w = labels.shape
    fg = labels >= 0
    comp = np.where(fg, np.arange(h * w).reshape(h, w), h * w)
    big = h * w
    while True:
        prev = comp
        m = comp.copy()
        for src, dst, same in (
            ((slice(1, None), slice(None)), (slice(None, -1), slice(None)), labels[1:] == labels[:-1]),
            ((slice(None, -1), slice(None)), (slice(1, None), slice(None)), labels[1:] == labels[:-1]),
            ((slice(None), slice(1, None)), (slice(None), slice(None, -1)), labels[:, 1:] == labels[:, :-1]),
            ((slice(None), slice(None, -1)), (slice(None), slice(1, None)), labels[:, 1:] == labels[:, :-1]),
        ):
            m[dst] = np.minimum(m[dst], np.where(same, comp[src], big))
        comp = np.where(fg, m, big)
        # Pointer jumping: follow each pixel's label to the label of the pixel it names.
        flat = comp.ravel()
        ok = flat < big
        flat2 = flat.copy()
        flat2[ok] = np.minimum(flat[ok], comp.ravel()[flat[ok]])
        comp = flat2.reshape(h, w)
        if np.array_equal(comp, prev):
            break
    return np.where(fg, comp, -1)


def _hull_area(points) -> float:
    """Area of the convex hull of 2-D points (Andrew's monotone chain, plain floats for speed)."""
    pts = sorted(set(map(tuple, points)))
    if len(pts) < 3:
        return 0.0

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    def half(seq):
        out: list = []
        for p in seq:
            while len(out) >= 2 and cross(out[-2], out[-1], p) <= 0:
                out.pop()
            out.append(p)
        return out

    hull = half(pts)[:-1] + half(pts[::-1])[:-1]
    return 0.5 * abs(sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(hull, hull[1:] + hull[:1])))


def classify_shape(mask: np.ndarray) -> tuple[str, float, float]:
    """(shape, fill ratio of the bounding box, solidity) for one component mask."""
    rows, cols = np.nonzero(mask)
    area = len(rows)
    bw, bh = cols.max() - cols.min() + 1, rows.max() - rows.min() + 1
    fill = area / float(bw * bh)
    # Hull over the outer pixel corners of each row's extremes, so a convex pixel shape has solidity ~1.
    corners = []
    for y in np.unique(rows).tolist():
        xs = cols[rows == y]
        x0, x1 = int(xs.min()), int(xs.max()) + 1
        corners += [(x0, y), (x0, y + 1), (x1, y), (x1, y + 1)]
    hull = _hull_area(corners)
    solidity = area / hull if hull > 0 else 1.0
    # Upward triangles keep ~25 % of their area in the top half of the box; circles and squares 50 %.
    top = float((rows < rows.min() + bh / 2).sum()) / area
    if solidity < 0.78:
        shape = "star"
    elif fill > 0.9:
        shape = "square"
    elif fill < 0.62 or top < 0.4:
        shape = "triangle"
    else:
        shape = "circle"
    return shape, fill, solidity


def _size_class(shape: str, box_side: float, side: float) -> str:
    radius = box_side / side / _BOX_FACTOR[shape]
    return min(SIZES, key=lambda s: abs(math.log(radius / SIZES[s])))


def _ramp(profile: np.ndarray) -> tuple[float, float]:
    """(span, monotonicity) of a colour profile (n, 3): the distance between its ends, and the share of the
    step lengths along the end-to-end direction that go that way (1.0 for a clean ramp, ~0.5 for a pattern)."""
    ends = profile[-2:].mean(0) - profile[:2].mean(0)
    span = float(np.linalg.norm(ends))
    if span == 0 or len(profile) < 4:
        return span, 0.0
    steps = np.diff(profile @ (ends / span))
    total = np.abs(steps).sum()
    return span, float(np.clip(steps, 0, None).sum() / total) if total > 0 else 0.0


def _parse_background(rgb: np.ndarray, bg: np.ndarray, exact_tol: float = 20.0) -> tuple[Background, dict]:
    """Style and colours from the non-object pixels `bg` (boolean mask)."""
    idx, dist = _nearest(rgb, _BG_RGB)
    pix = bg.sum()
    exact = (dist <= exact_tol) & bg
    feats = {"exact_frac": float(exact.sum() / max(pix, 1))}
    colsum = np.where(bg[..., None], rgb, 0)
    n_cols, n_rows = bg.sum(0), bg.sum(1)
    col_mean = (colsum.sum(0) / np.maximum(n_cols, 1)[:, None])[n_cols > 0]
    row_mean = (colsum.sum(1) / np.maximum(n_rows, 1)[:, None])[n_rows > 0]
    (span_x, mono_x), (span_y, mono_y) = _ramp(col_mean), _ramp(row_mean)
    feats.update(span_x=span_x, span_y=span_y, mono_x=mono_x, mono_y=mono_y)
    # A gradient is a monotone ramp between two palette colours (the closest pair, black-navy, is 66 apart).
    # Blurred stripes or checkers also have few exact pixels, but their profiles go back and forth.
    ramp_x, ramp_y = span_x * (mono_x >= 0.85), span_y * (mono_y >= 0.85)
    if max(ramp_x, ramp_y) >= 40:
        orient, ends = (("horizontal", (col_mean[0], col_mean[-1])) if ramp_x >= ramp_y
                        else ("vertical", (row_mean[0], row_mean[-1])))
        names = tuple(_BG_NAMES[int(_nearest(e, _BG_RGB)[0])] for e in ends)
        return Background("gradient", names, orient), feats
    counts = np.bincount(idx[exact], minlength=len(_BG_NAMES))
    order = np.argsort(-counts, kind="stable")
    frac = counts[order] / max(counts.sum(), 1)
    feats["colour_fracs"] = {_BG_NAMES[i]: float(f) for i, f in zip(order, frac) if f > 0}
    if frac[1] < 0.03:
        return Background("flat", (_BG_NAMES[order[0]],)), feats
    a, b = order[0], order[1]
    lab = np.where(exact & (idx == a), 0, np.where(exact & (idx == b), 1, -1))

    def uniform(lines: np.ndarray) -> float:
        ok = [len(np.unique(line[line >= 0])) <= 1 for line in lines if (line >= 0).sum() >= 2]
        return float(np.mean(ok)) if ok else 0.0

    feats["row_uniform"], feats["col_uniform"] = uniform(lab), uniform(lab.T)
    if max(feats["row_uniform"], feats["col_uniform"]) >= 0.9:
        orient = "horizontal" if feats["row_uniform"] >= feats["col_uniform"] else "vertical"
        return Background("stripes", (_BG_NAMES[a], _BG_NAMES[b]), orient), feats
    if frac[1] < 0.35:
        return Background("dots", (_BG_NAMES[a], _BG_NAMES[b])), feats
    return Background("checker", (_BG_NAMES[a], _BG_NAMES[b])), feats


def _grow_edges(rgb: np.ndarray, labels: np.ndarray, *, alpha_min: float = 0.5, max_residual: float = 30.0,
                rounds: int = 3) -> np.ndarray:
    """Extend object labels into adjacent soft-edge pixels.

    A soft-edge pixel p is a blend a*c + (1 - a)*b of an object colour c and a background colour b: it
    joins the object next to it when a >= alpha_min (it is at least half object) and p lies within
    max_residual of the c-b line, for the background palette colour b that fits best. Growth is by
    4-neighbour dilation from the strict pixels, `rounds` pixels at most, so it only follows edges.
    """
    out = labels.copy()
    rel = rgb[..., None, :] - _BG_RGB                             # (h, w, n_bg, 3)
    for ci in np.unique(labels[labels >= 0]):
        d = _OBJ_RGB[ci] - _BG_RGB                               # (n_bg, 3)
        alpha = (rel * d).sum(-1) / (d * d).sum(-1)
        residual = np.linalg.norm(rel - alpha[..., None] * d, axis=-1)
        best = residual.argmin(-1)[..., None]
        a = np.take_along_axis(alpha, best, -1)[..., 0]
        r = np.take_along_axis(residual, best, -1)[..., 0]
        cand = (labels < 0) & (a >= alpha_min) & (a <= 1.25) & (r <= max_residual)
        cur = labels == ci
        for _ in range(rounds):
            grown = cur.copy()
            grown[1:] |= cur[:-1]
            grown[:-1] |= cur[1:]
            grown[:, 1:] |= cur[:, :-1]
            grown[:, :-1] |= cur[:, 1:]
            new = grown & cand & (out < 0)
            if not new.any():
                break
            out[new] = ci
            cur |= new
    return out


def parse(image, *, tol: float = 40.0, min_area_frac: float = 0.002, soft_edges: bool = True) -> ParsedScene:
    """Read objects and background from an RGB image (PIL image or (H, W, 3) array).

    soft_edges=False keeps objects to the pixels within `tol` of their colour (the parser before soft-edge
    growth; clean renders parse the same either way)."""
    rgb = _to_array(image)
    h, w, _ = rgb.shape
    if min(h, w) < 16:
        raise ValueError(f"image too small to parse: {w}x{h}")
    idx, dist = _nearest(rgb, _OBJ_RGB)
    labels = np.where(dist <= tol, idx, -1)
    if soft_edges:
        labels = _grow_edges(rgb, labels)
    comp = _components(labels)
    objects = []
    min_area = max(4, int(min_area_frac * h * w))
    ids, counts = np.unique(comp[comp >= 0], return_counts=True)
    for cid, area in zip(ids, counts):
        if area < min_area:
            continue
        mask = comp == cid
        rows, cols = np.nonzero(mask)
        box = (int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1)
        shape, fill, solidity = classify_shape(mask)
        side = max(box[2] - box[0], box[3] - box[1])
        colour = _OBJ_NAMES[int(labels[rows[0], cols[0]])]
        objects.append(ParsedObject(colour, shape, _size_class(shape, side, max(h, w)),
                                    (box[0] + box[2]) / 2 / w, (box[1] + box[3]) / 2 / h, int(area), box,
                                    float(fill), float(solidity)))
    objects.sort(key=lambda o: (o.cy, o.cx))
    background, feats = _parse_background(rgb, labels < 0)
    return ParsedScene(objects, background, (w, h), feats)


def match_objects(parsed: ParsedScene, scene: Scene, *, shape: bool = True) -> list[int | None]:
    """Greedy one-to-one match: for each scene object, the nearest unused parsed object of the same
    colour and shape (index into parsed.objects), or None. shape=False matches on colour alone."""
    used: set[int] = set()
    out: list[int | None] = []
    for o in scene.objects:
        cands = [j for j, p in enumerate(parsed.objects)
                 if j not in used and p.colour == o.colour and (p.shape == o.shape or not shape)]
        if not cands:
            out.append(None)
            continue
        j = min(cands, key=lambda j: math.hypot(parsed.objects[j].cx - o.cx, parsed.objects[j].cy - o.cy))
        used.add(j)
        out.append(j)
    return out


def adherence(parsed: ParsedScene, scene: Scene) -> dict:
    """Score a parsed image against the scene it was meant to show.

    objects: per scene object, whether an object of that colour and shape is present (one-to-one);
    colours: the same on colour alone (whatever its shape);
    sizes: per object, whether the matched object has the right size class (None if unmatched);
    relation: whether objects 0 and 1 satisfy the caption's relation (None with < 2 objects, False if
    either is missing); background_style / background_colours: style match and colour-set match.
    """
    matches = match_objects(parsed, scene)
    objects = [m is not None for m in matches]
    sizes = [None if m is None else parsed.objects[m].size == o.size for m, o in zip(matches, scene.objects)]
    rel_ok = None
    if len(scene.objects) >= 2:
        a, b = scene.objects[0], scene.objects[1]
        rel = relation((a.cx, a.cy), (b.cx, b.cy))
        if matches[0] is None or matches[1] is None:
            rel_ok = False
        else:
            pa, pb = parsed.objects[matches[0]], parsed.objects[matches[1]]
            rel_ok = relation_holds(rel, (pa.cx, pa.cy), (pb.cx, pb.cy))
    return {
        "objects": objects,
        "object_rate": sum(objects) / len(objects),
        "colours": [m is not None for m in match_objects(parsed, scene, shape=False)],
        "all_objects": all(objects),
        "sizes": sizes,
        "count_match": len(parsed.objects) == len(scene.objects),
        "relation": rel_ok,
        "background_style": parsed.background.style == scene.background.style,
        "background_colours": set(parsed.background.colours) == set(scene.background.colours),
    }
