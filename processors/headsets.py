"""Head sets: which (layer, head) pairs an effect touches, and the compact text syntax for them.

Layers are the global indices of `Site.layer` (docs/addressing.md): UNet transformer blocks in
execution order (down, mid, up), SD3/PixArt/Wan block index, FLUX double blocks 0..D-1 then single
blocks D..D+S-1 (FLUX.1: 0-18 and 19-56).

Text syntax (case-insensitive, whitespace ignored), entries separated by ``;``::

    L7:H3,H5; L9:*        heads 3 and 5 of layer 7, every head of layer 9
    L7-10                 every head of layers 7..10 (no ":" means all heads)
    L12:H0-5,H9           heads 0..5 and 9 of layer 12 ("H" is optional: L12:0-5,9)
    d2.1-3, m0, u0        UNet blocks, pamparamm's syntax: d/m/u = down/mid/up, then the index among
                          that section's attention blocks, then optionally ".transformer index (range)"
    m0:H1,H2              UNet block refs also take ":heads"

Matching is exact: layer 1 never matches layer 10. UNet block refs need the model's structure, so they
are resolved with `resolve(groups)` (hosts pass `unet_groups(sites)`).
"""

from __future__ import annotations

import numbers
import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Sequence, Union

from .params import InvalidParameter, ParameterTypeError, integer

ALL = "*"

_RANGE = r"\d+(?:-\d+)?"
_LAYER_REF = re.compile(rf"^l({_RANGE})$", re.IGNORECASE)
_UNET_REF = re.compile(rf"^([dmu])({_RANGE})(?:\.({_RANGE}))?$", re.IGNORECASE)
_HEAD = re.compile(rf"^h?({_RANGE})$", re.IGNORECASE)
_SYNTAX = "expected entries like 'L7:H3,H5; L9:*', 'L7-10' or UNet blocks 'd2.1-3, m0, u0'"


#: layer and head numbers beyond any model: a typo, refused instead of expanded into memory
MAX_INDEX = 10_000


def _span(text: str) -> range:
    lo, _, hi = text.partition("-")
    lo_i, hi_i = int(lo), int(hi) if hi else int(lo)
    if hi_i < lo_i:
        raise InvalidParameter(f"range {text!r} runs backwards")
    if hi_i > MAX_INDEX:
        raise InvalidParameter(f"range {text!r} goes beyond {MAX_INDEX}; layers and heads are small 0-based indices")
    return range(lo_i, hi_i + 1)


@dataclass(frozen=True)
class UnetRef:
    """An unresolved UNet block reference: section 'd'|'m'|'u', attention-block ordinal(s) inside it,
    transformer indices (None: all)."""

    section: str
    groups: tuple[int, ...]
    blocks: Optional[tuple[int, ...]]
    text: str


class HeadSet:
    """An immutable set of (layer, head) pairs; a layer maps to a frozenset of heads or to ALL."""

    __slots__ = ("_layers", "_unresolved")

    def __init__(self, layers: Mapping[int, Union[str, Iterable[int]]] = (), unresolved: Sequence[tuple[UnetRef, object]] = ()):
        table: dict[int, object] = {}
        for layer, heads in dict(layers).items():
            layer = int(layer)
            if layer < 0:
                raise ValueError(f"layer {layer} is negative; layers are 0-based global indices")
            table[layer] = _merge(table.get(layer), heads)
        self._layers = dict(sorted(table.items()))
        self._unresolved = tuple(unresolved)

    # --- construction -----------------------------------------------------------------------------
    @classmethod
    def parse(cls, text: str) -> "HeadSet":
        """Parse the text syntax (module docstring). An empty string is the empty set."""
        if not isinstance(text, str):
            raise TypeError(f"head set text must be a string, got {type(text).__name__}")
        layers: dict[int, object] = {}
        unresolved: list = []
        for entry in ("".join(e.split()) for e in text.split(";")):
            if not entry:
                continue
            refs, colon, heads_text = entry.partition(":")
            heads = _parse_heads(heads_text, entry) if colon else ALL
            for ref in refs.split(","):
                if not ref:
                    raise ValueError(f"head set entry {entry!r}: empty layer reference; {_SYNTAX}")
                m = _LAYER_REF.match(ref)
                if m:
                    for layer in _span(m.group(1)):
                        layers[layer] = _merge(layers.get(layer), heads)
                    continue
                m = _UNET_REF.match(ref)
                if m:
                    section, groups, blocks = m.group(1).lower(), tuple(_span(m.group(2))), m.group(3)
                    unresolved.append((UnetRef(section, groups, tuple(_span(blocks)) if blocks else None, ref.lower()), heads))
                    continue
                raise ValueError(f"head set entry {entry!r}: cannot read {ref!r}; {_SYNTAX}")
        return cls(layers, unresolved)

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[int, int]]) -> "HeadSet":
        layers: dict[int, set] = {}
        for layer, head in pairs:
            if int(head) < 0:
                raise ValueError(f"head {head} of layer {layer} is negative")
            layers.setdefault(int(layer), set()).add(int(head))
        return cls(layers)

    @classmethod
    def of(cls, value, name: str = "head set") -> "HeadSet":
        """Accept a HeadSet, its text, a {layer: heads or '*'} mapping, or (layer, head) pairs; anything else
        (a number, a flat list of numbers, a set of strings) is a ParameterTypeError that names `name`."""
        if isinstance(value, HeadSet):
            return value
        if value is None:
            return cls()
        if isinstance(value, str):
            return cls.parse(value)
        try:
            if isinstance(value, Mapping):
                layers = {integer(f"{name} layer", k, 0, MAX_INDEX): _heads_value(name, k, v) for k, v in value.items()}
                return cls(layers)
            if isinstance(value, (bytes, numbers.Number)) or not isinstance(value, Iterable):
                raise TypeError
            pairs = [tuple(p) if isinstance(p, (tuple, list)) and len(p) == 2 else None for p in value]
            if any(p is None for p in pairs):
                raise TypeError
            return cls.from_pairs((integer(f"{name} layer", a, 0, MAX_INDEX), integer(f"{name} head", b, 0, MAX_INDEX))
                                  for a, b in pairs)
        except TypeError:
            raise ParameterTypeError(
                f"{name} must be text like 'L7:H3,H5; L9:*', a {{layer: heads or '*'}} dict or (layer, head) pairs; "
                f"got {value!r} ({type(value).__name__})") from None

    # --- queries ------------------------------------------------------------------------------------
    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(self._layers)

    @property
    def resolved(self) -> bool:
        return not self._unresolved

    def __bool__(self) -> bool:
        return bool(self._layers) or bool(self._unresolved)

    def __contains__(self, layer: int) -> bool:
        return layer in self._layers

    def heads_at(self, layer: int, n_heads: int) -> tuple[int, ...]:
        """Selected heads of `layer` (empty if none), for a layer with `n_heads` heads."""
        heads = self._layers.get(layer)
        if heads is None:
            return ()
        if heads == ALL:
            return tuple(range(n_heads))
        return tuple(sorted(h for h in heads if h < n_heads))

    def pairs(self, heads_per_layer: Mapping[int, int]) -> list[tuple[int, int]]:
        """Every (layer, head) pair, with ALL expanded by `heads_per_layer`."""
        return [(layer, h) for layer in self._layers for h in self.heads_at(layer, heads_per_layer[layer])]

    def union(self, other: "HeadSet") -> "HeadSet":
        merged = dict(self._layers)
        for layer, heads in other._layers.items():
            merged[layer] = _merge(merged.get(layer), heads)
        return HeadSet(merged, self._unresolved + other._unresolved)

    def __eq__(self, other) -> bool:
        return isinstance(other, HeadSet) and self._layers == other._layers and self._unresolved == other._unresolved

    def __hash__(self) -> int:
        return hash((tuple(self._layers.items()), self._unresolved))

    def __str__(self) -> str:
        parts = []
        for layer, heads in self._layers.items():
            parts.append(f"L{layer}:*" if heads == ALL else f"L{layer}:" + ",".join(f"H{h}" for h in sorted(heads)))
        parts += [ref.text + ("" if heads == ALL else ":" + ",".join(f"H{h}" for h in sorted(heads)))
                  for ref, heads in self._unresolved]
        return "; ".join(parts)

    def __repr__(self) -> str:
        return f"HeadSet({str(self)!r})"

    # --- model binding --------------------------------------------------------------------------
    def resolve(self, groups: Sequence[tuple[str, int, int]]) -> "HeadSet":
        """Turn UNet block refs into global layers. `groups`: (section 'd'|'m'|'u', first global layer,
        transformer depth) of every UNet attention block in execution order (see `unet_groups`)."""
        if not self._unresolved:
            return self
        by_section: dict[str, list[tuple[int, int]]] = {"d": [], "m": [], "u": []}
        for section, first, depth in groups:
            by_section[section].append((first, depth))
        layers = dict(self._layers)
        for ref, heads in self._unresolved:
            options = by_section[ref.section]
            if not options:
                raise ValueError(f"{ref.text!r}: this model has no UNet blocks (UNet block refs work on SD1.5/SDXL only)"
                                 if not groups else f"{ref.text!r}: this UNet has no attention blocks in section {ref.section!r}")
            for g in ref.groups:
                if g >= len(options):
                    raise ValueError(f"{ref.text!r}: block index {g} is out of range; section {ref.section!r} has "
                                     f"attention blocks 0-{len(options) - 1}")
                first, depth = options[g]
                blocks = ref.blocks if ref.blocks is not None else range(depth)
                for b in blocks:
                    if b >= depth:
                        raise ValueError(f"{ref.text!r}: transformer index {b} is out of range; "
                                         f"{ref.section}{g} has transformer indices 0-{depth - 1}")
                    layers[first + b] = _merge(layers.get(first + b), heads)
        return HeadSet(layers)

    def check(self, heads_per_layer: Mapping[int, int], what: str = "this model", noun: str = "perturbable layers") -> None:
        """Raise ValueError naming the first layer or head that `what` does not have."""
        if self._unresolved:
            raise ValueError(f"UNet block refs {[r.text for r, _ in self._unresolved]} need a UNet model to resolve")
        if not heads_per_layer:
            raise ValueError(f"{what} has no attention layers this effect can perturb")
        valid = sorted(heads_per_layer)
        for layer, heads in self._layers.items():
            if layer not in heads_per_layer:
                raise ValueError(f"layer {layer} is out of range: {what} has {noun} {_ranges(valid)}")
            n = heads_per_layer[layer]
            if heads != ALL:
                bad = sorted(h for h in heads if h >= n)
                if bad:
                    raise ValueError(f"head {bad[0]} is out of range for layer {layer}: it has {n} heads (0-{n - 1})")


def _heads_value(name: str, layer, heads):
    """The heads of one layer in a {layer: heads} mapping: '*' or a non-empty collection of head numbers."""
    if heads == ALL:
        return ALL
    if isinstance(heads, (str, bytes, numbers.Number)) or not isinstance(heads, Iterable):
        raise TypeError
    heads = [integer(f"{name} head of layer {layer}", h, 0, MAX_INDEX) for h in heads]
    if not heads:
        raise InvalidParameter(f"{name} gives layer {layer} no heads ([]); list heads, use '*' for all, or leave the "
                               "layer out")
    return heads


def _merge(old, new):
    if new == ALL or old == ALL:
        return ALL
    new = frozenset(int(h) for h in new)
    if any(h < 0 for h in new):
        raise ValueError(f"heads must be non-negative, got {sorted(new)}")
    return new if old is None else frozenset(old) | new


def _parse_heads(text: str, entry: str):
    if text == "*" or text.lower() == "all":
        return ALL
    heads: set[int] = set()
    for part in text.split(","):
        m = _HEAD.match(part)
        if not m:
            raise ValueError(f"head set entry {entry!r}: cannot read head {part!r}; heads are '*' or a list like H3,H5,H8-11")
        heads.update(_span(m.group(1)))
    return frozenset(heads)


def _ranges(values: Sequence[int]) -> str:
    out, start, prev = [], None, None
    for v in values:
        if start is None:
            start = prev = v
        elif v == prev + 1:
            prev = v
        else:
            out.append(f"{start}-{prev}" if prev != start else str(start))
            start = prev = v
    if start is not None:
        out.append(f"{start}-{prev}" if prev != start else str(start))
    return ", ".join(out) or "none"


_SECTION_OF = {"down_blocks": "d", "input_blocks": "d", "mid_block": "m", "middle_block": "m",
               "up_blocks": "u", "output_blocks": "u"}


def unet_groups(layer_names: Iterable[tuple[int, str]]) -> list[tuple[str, int, int]]:
    """(section, first global layer, depth) per UNet attention block, from (layer, module path) pairs
    such as (4, 'down_blocks.1.attentions.0.transformer_blocks.1.attn1') (diffusers) or
    (4, 'input_blocks.4.1.transformer_blocks.1.attn1') (ComfyUI)."""
    groups: dict[str, list] = {}
    for layer, name in layer_names:
        prefix = name.split(".transformer_blocks.")[0]
        section = _SECTION_OF.get(prefix.split(".")[0])
        if section is None:
            continue
        g = groups.setdefault(prefix, [section, layer, layer])
        g[1], g[2] = min(g[1], layer), max(g[2], layer)
    ordered = sorted(groups.values(), key=lambda g: g[1])
    return [(s, lo, hi - lo + 1) for s, lo, hi in ordered]
