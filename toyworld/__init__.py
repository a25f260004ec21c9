"""Toy world: a synthetic scene generator and a parser that reads its images back.

The generator (`scenes`) makes deterministic scenes of 1-4 coloured shapes on patterned backgrounds, with
captions, ground-truth masks and referring expressions; the parser (`parser`) recovers objects and
background from an image and scores prompt adherence. Both need only numpy and PIL. They are the base
for the small offline models (`train`, `models`) and the benchmark harness (`bench`).
"""

from .parser import ParsedObject, ParsedScene, adherence, match_objects, parse
from .scenes import (BACKGROUND_COLOURS, BACKGROUND_STYLES, OBJECT_COLOURS, SHAPES, SIZES, Background, Scene,
                     SceneObject, caption, ground_truth, referring_expressions, relation, render, render_array,
                     resolve, sample_scene, without_background)

__all__ = [
    "BACKGROUND_COLOURS", "BACKGROUND_STYLES", "OBJECT_COLOURS", "SHAPES", "SIZES", "Background", "Scene",
    "SceneObject", "caption", "ground_truth", "referring_expressions", "relation", "render", "render_array",
    "resolve", "sample_scene", "without_background", "ParsedObject", "ParsedScene", "adherence", "match_objects", "parse",
]
