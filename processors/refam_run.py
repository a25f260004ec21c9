"""RefAM options and the host-independent steps around the forward passes: the prompt and its token sets,
the recorder to install, and heatmap → mask → overlay afterwards. Both hosts (the diffusers pipeline and the
ComfyUI node) only add "encode the image, run one forward per noise level"."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, Optional, Sequence

import numpy as np
import torch

from .refam import GAS_MODES, MAP_MODES, TextMaps, default_gas_min_layer, default_layers
from .refam_heatmap import MASK_MODES, THRESHOLDS, WORD_REDUCE, Heatmap, aggregate, overlay, sam_mask, threshold_mask
from .refam_tokens import CAPTION_MODES, LANGUAGES, MAGNET_COLOR, Prompt, TokenSets, build_prompt

TEXT_SEGMENTS = ("t5", "clip", "both")


@dataclass(frozen=True)
class RefAMOptions:
    """Every RefAM choice the paper leaves open is an option here; defaults follow specs/refam.md (see
    docs/refam.md for which are confirmed)."""

    sigmas: Sequence[float] = (0.5,)  # noise levels, one forward each, same noise
    seed: int = 0
    layers: Optional[Sequence[int]] = None  # None: the family default (FLUX: 10–56)
    map_mode: str = "img2txt_textsoftmax"
    caption: str = ""
    caption_mode: str = "expr"
    language: str = "en"
    magnets: Optional[Sequence[str]] = None  # None: the language's default list; () for none
    magnet_color: bool = False  # also append one colour word ("white")
    stopwords: Optional[Sequence[str]] = None  # None: the language's list
    filter_stopwords: bool = True  # False: stop words of the expression count as content
    text_segment: str = "t5"  # SD3: which copy of the prompt (its CLIP or T5 segment) to read
    gas_mode: str = "drop"
    gas_mass: float = 0.2
    gas_cv: float = 0.5
    gas_min_layer: Optional[int] = None  # None: FLUX the first single block, others half depth
    gas_bias: float = -math.inf  # suppress/redirect: logit bias on sink columns (β)
    n_aux: int = 4  # redirect: auxiliary "." tokens appended after the magnets
    renormalize: bool = True
    word_reduce: str = "mean"  # a word's map from its pieces
    blur: float = 1.0  # Gaussian blur of the heatmap, in tokens (0: none)
    mask_mode: str = "threshold"
    threshold: str = "otsu"
    k: float = 1.0  # threshold "mean_std": mean + k·std
    sam_points: int = 1
    sam_negative: bool = False
    guidance: float = 3.5  # FLUX guidance embedding

    def with_(self, **changes) -> "RefAMOptions":
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise TypeError(f"unknown RefAM option(s) {sorted(unknown)}; options: {[f.name for f in fields(self)]}")
        return replace(self, **changes)

    def validate(self) -> None:
        sig = [float(s) for s in self.sigmas]
        if not sig or any(not 0.0 < s < 1.0 for s in sig):
            raise ValueError(f"sigmas must be noise levels in (0, 1), at least one; got {list(self.sigmas)}")
        for name, value, allowed in (("map_mode", self.map_mode, MAP_MODES), ("gas_mode", self.gas_mode, GAS_MODES),
                                     ("caption_mode", self.caption_mode, CAPTION_MODES),
                                     ("text_segment", self.text_segment, TEXT_SEGMENTS),
                                     ("mask_mode", self.mask_mode, MASK_MODES), ("threshold", self.threshold, THRESHOLDS),
                                     ("word_reduce", self.word_reduce, WORD_REDUCE)):
            if value not in allowed:
                raise ValueError(f"RefAM {name} must be one of {list(allowed)}; got {value!r}")
        if self.language not in LANGUAGES and (self.stopwords is None or self.magnets is None):
            raise ValueError(f"language {self.language!r} has no built-in stop-word and magnet lists (built in: "
                             f"{sorted(LANGUAGES)}); pass stopwords=[...] and magnets=[...]")
        if not 0 <= self.gas_mass <= 1 or self.gas_cv < 0 or self.gas_bias > 0:
            raise ValueError("gas_mass in [0, 1], gas_cv >= 0 and gas_bias <= 0 expected; got "
                             f"{self.gas_mass}, {self.gas_cv}, {self.gas_bias}")
        if self.blur < 0 or self.n_aux < 0 or self.sam_points < 1:
            raise ValueError(f"blur >= 0, n_aux >= 0, sam_points >= 1 expected; got {self.blur}, {self.n_aux}, "
                             f"{self.sam_points}")

    def prompt(self, expression: str) -> Prompt:
        """The encoder prompt for `expression`: caption (if any), expression, magnets, aux tokens (redirect)."""
        stop, magnets = LANGUAGES.get(self.language, (None, None))
        magnets = list(magnets if self.magnets is None else self.magnets)
        if self.magnet_color:
            magnets.append(MAGNET_COLOR)
        stopwords = self.stopwords if self.stopwords is not None else stop
        n_aux = self.n_aux if self.gas_mode == "redirect" else 0
        return build_prompt(expression, self.caption, self.caption_mode, magnets, n_aux, stopwords=stopwords)


@dataclass
class Words:
    """The token sets of the model's text span (one per text segment read) and the words to aggregate."""

    prompt: Prompt
    segments: list  # [TokenSets]
    columns: list = field(default_factory=list)
    content: list = field(default_factory=list)  # (word, positions)
    magnets: list = field(default_factory=list)

    @classmethod
    def of(cls, prompt: Prompt, segments: Sequence[TokenSets], filter_stopwords: bool = True) -> "Words":
        columns = sorted({c for s in segments for c in s.columns})
        cats = ("content",) if filter_stopwords else ("content", "stop")
        content = [wp for s in segments for wp in s.word_tokens(*cats)]
        magnets = [wp for s in segments for wp in s.word_tokens("magnet")]
        return cls(prompt, list(segments), columns, content, magnets)

    def category_of(self, position: int) -> str:
        for s in self.segments:
            i = position - s.offset
            if 0 <= i < len(s):
                return s.categories[i]
        return "other"


def recorder_for(options: RefAMOptions, words: Words, family: str, layer_kinds: Sequence[tuple[int, str]],
                 double_blocks: int = 0) -> TextMaps:
    """The TextMaps effect for these options on a model with these (layer, kind) attention sites."""
    layers = list(options.layers) if options.layers is not None else default_layers(family, layer_kinds)
    n_layers = max((layer for layer, _ in layer_kinds), default=-1) + 1
    gas_min = options.gas_min_layer if options.gas_min_layer is not None else \
        default_gas_min_layer(family, n_layers, double_blocks)
    rec = TextMaps(layers=layers, map_mode=options.map_mode, columns=words.columns, gas_mode=options.gas_mode,
                   gas_min_layer=gas_min, gas_mass=options.gas_mass, gas_cv=options.gas_cv, bias=options.gas_bias)
    rec.validate()
    return rec


@dataclass
class RefAMResult:
    """heatmap: [H, W] (images) or [F, H, W] (videos, per latent frame) in [0, 1]; mask: bool, same shape;
    overlay: PIL image (list for videos); points: SAM prompts used; sinks: (σ, layer) -> dropped text positions;
    words: the content words aggregated; prompt: the text the encoder saw; timings in seconds."""

    heatmap: torch.Tensor
    mask: torch.Tensor
    overlay: Any
    prompt: str
    words: list
    sinks: dict
    points: list = field(default_factory=list)
    word_maps: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)


def finish(recorder: TextMaps, words: Words, options: RefAMOptions, images: np.ndarray, row: int = 0,
           sam=None, grid_hw: Optional[tuple[int, int]] = None) -> RefAMResult:
    """Recorded maps → heatmap at image size → mask → overlay. `images`: [F, H, W, 3] uint8 (F = 1 for an
    image; for videos one image per latent frame). `grid_hw`: the token grid, to express the blur in pixels."""
    n_frames, H, W = images.shape[:3]
    recorder.flush()
    recorded = {key: maps[row] for key, maps in recorder.maps.items()}
    blur_px = 0.0
    if options.blur > 0:
        some = next(iter(recorded.values()))
        blur_px = options.blur * H / (grid_hw[0] if grid_hw else some.shape[-2])
    heat: Heatmap = aggregate(
        recorded, words.columns, words.content, (H, W), gas_min_layer=recorder.gas_min_layer, gas_mass=options.gas_mass,
        gas_cv=options.gas_cv, drop_sinks=options.gas_mode == "drop", renormalize=options.renormalize,
        word_reduce=options.word_reduce, blur=blur_px, keep_word_maps=True)
    sinks = dict(heat.sinks)
    sinks.update({k: v for k, v in recorder.sinks.items() if v})
    hm = heat.heatmap
    if hm.shape[0] != n_frames:
        raise ValueError(f"the maps cover {hm.shape[0]} frame(s) but {n_frames} image(s) were given")
    masks, points, overlays = [], [], []
    for f in range(n_frames):
        if options.mask_mode == "threshold":
            m = threshold_mask(hm[f], options.threshold, options.k)
        else:
            if sam is None:
                raise ValueError(f"mask_mode {options.mask_mode!r} needs a SAM/SAM2 image predictor (pass sam=...); "
                                 "use mask_mode='threshold' without one")
            m, info = sam_mask(sam, images[f], hm[f], options.mask_mode, options.sam_points, options.sam_negative,
                               options.threshold, options.k)
            points.append(info)
        masks.append(m.cpu())
        overlays.append(overlay(images[f], hm[f].cpu(), m.cpu()))
    mask = torch.stack(masks)
    single = n_frames == 1
    return RefAMResult(hm[0].cpu() if single else hm.cpu(), mask[0] if single else mask,
                       overlays[0] if single else overlays, words.prompt.text, heat.words, sinks, points,
                       {w: (m[0] if single else m).cpu() for w, m in heat.word_maps.items()})
