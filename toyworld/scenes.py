"""Scene generator for the toy world: sampling, rendering, ground truth, captions, referring expressions.

A `Scene` is resolution independent: object centres and sizes are fractions of the image side, so the
same scene renders at 64, 128 or 1024 pixels. Rendering rasterises each shape by testing pixel centres
(no anti-aliasing), so every object pixel carries its palette colour exactly; `parser.py` relies on that to
read scenes back. Everything is a pure function of the seed (a `numpy.random.Generator`), so a scene, its
caption and its image bytes are reproducible.

Only numpy and PIL are needed.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

# Saturated object colours; pairwise RGB distance >= 80 so the nearest palette colour is unambiguous.
OBJECT_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 30),
    "purple": (140, 50, 190),
    "orange": (245, 130, 20),
    "pink": (245, 110, 190),
    "cyan": (30, 200, 220),
}
# Muted background colours. Every straight RGB segment between two of them (a gradient) stays >= 80 away
# from every object colour, so background pixels are never mistaken for objects.
BACKGROUND_COLOURS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 240),
    "gray": (128, 128, 128),
    "black": (25, 25, 25),
    "beige": (220, 200, 160),
    "navy": (30, 35, 90),
    "brown": (100, 65, 40),
}
SHAPES = ("circle", "square", "triangle", "star")
# Size classes: the shape's "radius" (circumradius; half-side / 0.85 for squares) as a fraction of the side.
SIZES: dict[str, float] = {"small": 0.1, "medium": 0.145, "large": 0.2}
BACKGROUND_STYLES = ("flat", "stripes", "dots", "gradient", "checker")
ORIENTATIONS = ("horizontal", "vertical")
# Pattern periods as fractions of the image side (stripe pair, dot grid, checker cell).
PERIODS = (1 / 8, 1 / 6, 1 / 4)
MIN_SIZE = 32
MAX_OBJECTS = 4
SQUARE_HALF = 0.85  # half-side of a square relative to its size radius
STAR_INNER = 0.42  # inner/outer radius of the five-pointed star
MARGIN = 0.04  # minimum gap between objects and to the border, as a fraction of the side
STYLE_WORDS = {"flat": "plain", "stripes": "striped", "dots": "dotted", "gradient": "gradient",
               "checker": "checkered"}


@dataclass(frozen=True)
class SceneObject:
    """One object: attributes plus centre (cx, cy) as fractions of the image side (y grows downwards)."""

    shape: str
    colour: str
    size: str
    cx: float
    cy: float

    @property
    def radius(self) -> float:
        return SIZES[self.size]

    @property
    def rgb(self) -> tuple[int, int, int]:
        return OBJECT_COLOURS[self.colour]


@dataclass(frozen=True)
class Background:
    """Background style with 1 (flat) or 2 named colours.

    For dots, colours = (base, dot colour); for gradients, (start, end) along `orientation`
    (horizontal runs left to right, vertical top to bottom); stripes run along `orientation`.
    `period` is the pattern period as a fraction of the image side (unused for flat and gradient).
    """

    style: str
    colours: tuple[str, ...]
    orientation: str = "horizontal"
    period: float = 0.125


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    background: Background
    seed: int | None = field(default=None, compare=False)


def bounding_radius(obj: SceneObject) -> float:
    """Radius of a circle around the centre that contains the whole shape (used for non-overlap)."""
    return obj.radius * (SQUARE_HALF * math.sqrt(2) if obj.shape == "square" else 1.0)


def _check_size(size: int) -> int:
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool):
        raise ValueError(f"size must be an int, got {size!r}")
    if size < MIN_SIZE:
        raise ValueError(f"size must be >= {MIN_SIZE} pixels, got {size}")
    return int(size)


def _background_pairs() -> list[tuple[str, str]]:
    """Ordered colour pairs far enough apart (RGB distance >= 85) to read back as two colours."""
    names = list(BACKGROUND_COLOURS)
    pairs = []
    for a in names:
        for b in names:
            if a != b and np.linalg.norm(np.subtract(BACKGROUND_COLOURS[a], BACKGROUND_COLOURS[b])) >= 85:
                pairs.append((a, b))
    return pairs


def sample_background(rng: np.random.Generator, style: str | None = None) -> Background:
    style = style if style is not None else str(rng.choice(BACKGROUND_STYLES))
    if style not in BACKGROUND_STYLES:
        raise ValueError(f"background style must be one of {BACKGROUND_STYLES}, got {style!r}")
    orientation = str(rng.choice(ORIENTATIONS))
    period = float(PERIODS[int(rng.integers(len(PERIODS)))])
    if style == "flat":
        colours = (str(rng.choice(list(BACKGROUND_COLOURS))),)
    else:
        pairs = _background_pairs()
        colours = pairs[int(rng.integers(len(pairs)))]
    return Background(style, tuple(colours), orientation, period)


def sample_scene(seed: int, n_objects: int | None = None, size: int = 64, *, style: str | None = None,
                 distractor_prob: float = 0.35, max_tries: int = 200) -> Scene:
    """Sample a scene deterministically from `seed`.

    n_objects: 1..4, or None to draw it. size: the intended render size; it only validates (scenes are
    resolution independent). style: force a background style. distractor_prob: chance that a new object
    copies the colour or the shape of an earlier one, so referring expressions need more than one word.
    Objects never overlap: centres are rejection-sampled so bounding circles keep a MARGIN apart.
    """
    _check_size(size)
    if n_objects is not None and (not isinstance(n_objects, (int, np.integer)) or not 1 <= n_objects <= MAX_OBJECTS):
        raise ValueError(f"n_objects must be an int in 1..{MAX_OBJECTS} or None, got {n_objects!r}")
    if not 0.0 <= distractor_prob <= 1.0:
        raise ValueError(f"distractor_prob must be in [0, 1], got {distractor_prob}")
    rng = np.random.default_rng(seed)
    n = int(n_objects) if n_objects is not None else int(rng.integers(1, MAX_OBJECTS + 1))
    background = sample_background(rng, style)
    colours, shapes = list(OBJECT_COLOURS), list(SHAPES)
    for _ in range(max_tries):
        objects: list[SceneObject] = []
        for _ in range(n):
            shape, colour = str(rng.choice(shapes)), str(rng.choice(colours))
            if objects and rng.random() < distractor_prob:
                other = objects[int(rng.integers(len(objects)))]
                if rng.random() < 0.5:
                    colour = other.colour
                else:
                    shape = other.shape
            # Fewer large objects when crowded, so placement succeeds.
            size_names = list(SIZES) if n <= 2 else ["small", "medium"] * 2 + ["large"]
            size_name = str(rng.choice(size_names))
            probe = SceneObject(shape, colour, size_name, 0.5, 0.5)
            r = bounding_radius(probe)
            lo, hi = r + MARGIN, 1.0 - r - MARGIN
            for _ in range(100):
                cx, cy = rng.uniform(lo, hi, size=2)
                if all(math.hypot(cx - o.cx, cy - o.cy) >= r + bounding_radius(o) + MARGIN for o in objects):
                    objects.append(SceneObject(shape, colour, size_name, float(cx), float(cy)))
                    break
            else:
                break
        if len(objects) == n:
            scene = Scene(tuple(objects), background, seed)
            if _expressions(scene) is not None:  # every object can be referred to uniquely
                return scene
    raise RuntimeError(f"could not place {n} objects for seed {seed}")


# ----------------------------------------------------------------------------------------------- rendering

def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(size) + 0.5) / size
    return np.meshgrid(c, c)  # xs, ys in [0, 1]


def _polygon_mask(xs: np.ndarray, ys: np.ndarray, verts: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test for pixel centres."""
    inside = np.zeros(xs.shape, bool)
    n = len(verts)
    for i in range(n):
        (x0, y0), (x1, y1) = verts[i], verts[(i + 1) % n]
        if y0 == y1:
            continue
        crosses = (ys >= min(y0, y1)) & (ys < max(y0, y1))
        x_at = x0 + (ys - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (xs < x_at)
    return inside


def shape_vertices(obj: SceneObject) -> np.ndarray | None:
    """Polygon vertices (fractions of the side) for triangle and star, pointing up; None otherwise."""
    r = obj.radius
    if obj.shape == "triangle":
        angles = -math.pi / 2 + np.arange(3) * 2 * math.pi / 3
        radii = np.full(3, r)
    elif obj.shape == "star":
        angles = -math.pi / 2 + np.arange(10) * math.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, r * STAR_INNER)
    else:
        return None
    return np.stack([obj.cx + radii * np.cos(angles), obj.cy + radii * np.sin(angles)], axis=1)


def shape_mask(obj: SceneObject, size: int) -> np.ndarray:
    """Boolean (size, size) mask of the full (unoccluded) shape."""
    size = _check_size(size)
    xs, ys = _pixel_grid(size)
    if obj.shape == "circle":
        return (xs - obj.cx) ** 2 + (ys - obj.cy) ** 2 <= obj.radius ** 2
    if obj.shape == "square":
        h = obj.radius * SQUARE_HALF
        return (np.abs(xs - obj.cx) <= h) & (np.abs(ys - obj.cy) <= h)
    verts = shape_vertices(obj)
    if verts is None:
        raise ValueError(f"unknown shape {obj.shape!r}")
    return _polygon_mask(xs, ys, verts)


def render_background(background: Background, size: int) -> np.ndarray:
    """(size, size, 3) uint8 background."""
    size = _check_size(size)
    rgb = [np.array(BACKGROUND_COLOURS[c], np.float64) for c in background.colours]
    xs, ys = _pixel_grid(size)
    along = xs if background.orientation == "horizontal" else ys
    out = np.empty((size, size, 3), np.float64)
    style, p = background.style, background.period
    if style == "flat":
        out[:] = rgb[0]
        return out.astype(np.uint8)
    if style == "gradient":
        t = along[..., None]
        return np.rint(rgb[0] * (1 - t) + rgb[1] * t).astype(np.uint8)
    if style == "stripes":
        # Horizontal stripes: bands stacked vertically (each row uniform).
        across = ys if background.orientation == "horizontal" else xs
        second = np.floor(across / (p / 2)).astype(int) % 2 == 1
    elif style == "checker":
        second = (np.floor(xs / p).astype(int) + np.floor(ys / p).astype(int)) % 2 == 1
    elif style == "dots":
        dx = (xs % p) - p / 2
        dy = (ys % p) - p / 2
        second = dx ** 2 + dy ** 2 <= (0.22 * p) ** 2
    else:
        raise ValueError(f"unknown background style {style!r}")
    out[:] = rgb[0]
    out[second] = rgb[1]
    return out.astype(np.uint8)


def render_array(scene: Scene, size: int = 64) -> np.ndarray:
    """(size, size, 3) uint8 render; objects painted in order (later ones on top)."""
    img = render_background(scene.background, size)
    for obj in scene.objects:
        img[shape_mask(obj, size)] = obj.rgb
    return img


def render(scene: Scene, size: int = 64) -> Image.Image:
    """Render the scene as an RGB PIL image without anti-aliasing (object colours are exact)."""
    return Image.fromarray(render_array(scene, size), "RGB")


def ground_truth(scene: Scene, size: int = 64) -> list[dict]:
    """Per object: visible boolean mask (later objects occlude earlier ones), box, attributes.

    box = (x0, y0, x1, y1) in pixels, end-exclusive, of the visible mask (None if fully hidden).
    """
    full = [shape_mask(o, size) for o in scene.objects]
    covered = np.zeros((size, size), bool)
    visible: list[np.ndarray] = [np.zeros(0)] * len(full)
    for i in range(len(full) - 1, -1, -1):
        visible[i] = full[i] & ~covered
        covered |= full[i]
    out = []
    for obj, mask in zip(scene.objects, visible):
        rows, cols = np.nonzero(mask)
        box = (int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1) if len(rows) else None
        out.append({"mask": mask, "box": box, "shape": obj.shape, "colour": obj.colour, "size": obj.size,
                    "rgb": obj.rgb, "centre": (obj.cx, obj.cy), "area": int(mask.sum())})
    return out


# -------------------------------------------------------------------------------------------- language

def relation(a: tuple[float, float], b: tuple[float, float]) -> str:
    """Spatial word for centre a relative to centre b along the dominant axis."""
    dx, dy = a[0] - b[0], a[1] - b[1]
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def relation_holds(rel: str, a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Loose check used for scoring: 'left of' only needs a.x < b.x, and so on."""
    checks = {"left of": a[0] < b[0], "right of": a[0] > b[0], "above": a[1] < b[1], "below": a[1] > b[1]}
    if rel not in checks:
        raise ValueError(f"unknown relation {rel!r}")
    return bool(checks[rel])


def describe_object(obj: SceneObject) -> str:
    return f"a {obj.size} {obj.colour} {obj.shape}"


def describe_background(bg: Background) -> str:
    if bg.style == "flat":
        return f"a plain {bg.colours[0]} background"
    if bg.style == "dots":
        return f"a {bg.colours[0]} background with {bg.colours[1]} dots"
    if bg.style == "gradient":
        return f"a {bg.colours[0]} to {bg.colours[1]} gradient background"
    return f"a {STYLE_WORDS[bg.style]} {bg.colours[0]} and {bg.colours[1]} background"


def caption(scene: Scene) -> str:
    """Caption from a small grammar.

    1 object:  "<obj> on <bg>";  2+: "<obj0> <relation> <obj1>[ and <obj2>...] on <bg>", where the
    relation is that of object 0 to object 1 (from their centres). <obj> = "a <size> <colour> <shape>".
    """
    objs = scene.objects
    text = describe_object(objs[0])
    if len(objs) >= 2:
        rel = relation((objs[0].cx, objs[0].cy), (objs[1].cx, objs[1].cy))
        text += f" {rel} {describe_object(objs[1])}"
        for o in objs[2:]:
            text += f" and {describe_object(o)}"
    return f"{text} on {describe_background(scene.background)}"


def without_background(text: str) -> str:
    """A caption without its " on <background>" clause: the objects only, the background left to the model."""
    return text.rsplit(" on ", 1)[0]


_SUPERLATIVES = {"leftmost": (0, min), "rightmost": (0, max), "topmost": (1, min), "bottommost": (1, max)}
_ORDINALS = ("first", "second", "third", "fourth")
_GAP = 0.04  # spatial words are only used when the winner leads by at least this much


def _filter(scene: Scene, expr: dict) -> list[int]:
    return [i for i, o in enumerate(scene.objects)
            if all(expr.get(k) in (None, getattr(o, k)) for k in ("colour", "shape", "size"))]


def resolve(expr: dict, scene: Scene) -> list[int]:
    """Indices of the objects an expression picks out, from the scene's attributes alone."""
    cands = _filter(scene, expr)
    spatial = expr.get("spatial")
    if spatial is None or not cands:
        return cands
    if spatial in _SUPERLATIVES:
        axis, pick = _SUPERLATIVES[spatial]
        coords = [(scene.objects[i].cx, scene.objects[i].cy)[axis] for i in cands]
        best = pick(coords)
        return [i for i, c in zip(cands, coords) if abs(c - best) < _GAP]
    if spatial.startswith("ordinal:"):  # "ordinal:<x|y>:<k>", counted from the left / the top
        _, axis, k = spatial.split(":")
        k = int(k)
        key = (lambda i: scene.objects[i].cx) if axis == "x" else (lambda i: scene.objects[i].cy)
        order = sorted(cands, key=key)
        xs = [key(i) for i in order]
        if k >= len(order) or any(abs(a - b) < _GAP for a, b in itertools.pairwise(xs)):
            return []
        return [order[k]]
    raise ValueError(f"unknown spatial word {spatial!r}")


def _expr_text(expr: dict) -> str:
    words = [w for w in (expr.get("size"), expr.get("colour")) if w]
    noun = expr.get("shape") or "object"
    spatial = expr.get("spatial")
    if spatial is None:
        return "the " + " ".join(words + [noun])
    if spatial in _SUPERLATIVES:
        return "the " + " ".join([spatial] + words + [noun])
    _, axis, k = spatial.split(":")
    side = "left" if axis == "x" else "top"
    return "the " + " ".join([_ORDINALS[int(k)]] + words + [noun]) + f" from the {side}"


def referring_expressions(scene: Scene) -> list[dict]:
    """One uniquely identifying expression per object, simplest first.

    Tries attribute sets (shape; colour; colour+shape; size+shape; size+colour+shape), then spatial
    superlatives (leftmost/rightmost/topmost/bottommost) over colour+shape and the full description,
    then ordinals ("the second ... from the left" / "from the top"). Each result: {"target", "text",
    "colour", "shape", "size", "spatial"}; `resolve` checks it picks out exactly the target. Scenes from
    `sample_scene` always admit one; a hand-made scene that does not raises ValueError.
    """
    exprs = _expressions(scene)
    if exprs is None:
        raise ValueError("scene has objects that no expression can tell apart (identical and aligned)")
    return exprs


def _expressions(scene: Scene) -> list[dict] | None:
    """Expressions for all objects, or None if some object has none."""
    attr_sets = [("shape",), ("colour",), ("colour", "shape"), ("size", "shape"), ("size", "colour", "shape")]
    out = []
    for i, obj in enumerate(scene.objects):
        found = None
        candidates = []
        for keys in attr_sets:
            candidates.append({k: getattr(obj, k) for k in keys})
        full = {"size": obj.size, "colour": obj.colour, "shape": obj.shape}
        for base in ({"colour": obj.colour, "shape": obj.shape}, full):
            for word in _SUPERLATIVES:
                candidates.append({**base, "spatial": word})
        for axis in "xy":
            for k in range(len(scene.objects)):
                candidates.append({**full, "spatial": f"ordinal:{axis}:{k}"})
        for cand in candidates:
            if resolve(cand, scene) == [i]:
                found = cand
                break
        if found is None:
            return None
        expr = {"target": i, "colour": None, "shape": None, "size": None, "spatial": None, **found}
        expr["text"] = _expr_text(expr)
        out.append(expr)
    return out
