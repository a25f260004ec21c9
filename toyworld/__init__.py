"""Toy world: a synthetic scene generator and a parser that reads its images back.

The generator (`scenes`) makes deterministic scenes of 1-4 coloured shapes on patterned backgrounds, with
captions, ground-truth masks and referring expressions; the parser (`parser`) recovers objects and
background from an image and scores prompt adherence. Both need only numpy and PIL. They are the base
for the small offline models and the benchmark harness of issue 8 (not here yet).
"""

from .parser import ParsedObject, ParsedScene, adherence, match_objects, parse
from .scenes import (BACKGROUND_COLOURS, BACKGROUND_STYLES, OBJECT_COLOURS, SHAPES, SIZES, Background, Scene,
                     SceneObject, caption, ground_truth, referring_expressions, relation, render, render_array,
                     resolve, sample_scene)

__all__ = [
    "BACKGROUND_COLOURS", "BACKGROUND_STYLES", "OBJECT_COLOURS", "SHAPES", "SIZES", "Background", "Scene",
    "SceneObject", "caption", "ground_truth", "referring_expressions", "relation", "render", "render_array",
    "resolve", "sample_scene", "ParsedObject", "ParsedScene", "adherence", "match_objects", "parse",
]
