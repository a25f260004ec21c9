"""Plain-data node specs: the single source for the V3 schemas, the example-workflow checks and the
API-prompt builder used in tests. Importing this module never imports ComfyUI."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from ..processors.params import integer, number

SOCKET_TYPES = ("MODEL", "LATENT", "CONDITIONING", "IMAGE", "MASK", "CLIP", "VAE", "SAM2MODEL")  # SAM2MODEL: SAM2 node packs
WIDGET_TYPES = ("FLOAT", "INT", "BOOLEAN", "COMBO", "STRING")


@dataclass(frozen=True)
class Param:
    id: str
    type: str
    default: Any = None
    min: Optional[float] = None
    max: Optional[float] = None
    step: Optional[float] = None
    options: Sequence[str] = ()
    tooltip: str = ""
    display_name: Optional[str] = None
    multiline: bool = False
    optional: bool = False

    @property
    def is_widget(self) -> bool:
        return self.type in WIDGET_TYPES

    def check(self, value) -> Any:
        """The value, validated (ComfyUI's server does not validate V3 combos); raises ValueError."""
        name = self.display_name or self.id
        if self.type == "COMBO":
            if value not in self.options:
                raise ValueError(f"{name} must be one of {list(self.options)}; got {value!r}")
        elif self.type == "FLOAT":
            return number(name, value, self.min, self.max)
        elif self.type == "INT":
            return integer(name, value, self.min, self.max)
        elif self.type == "BOOLEAN" and not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false; got {value!r}")
        elif self.type == "STRING" and not isinstance(value, str):
            raise ValueError(f"{name} must be text; got {value!r}")
        return value


@dataclass(frozen=True)
class Output:
    type: str
    name: str


@dataclass(frozen=True)
class NodeSpec:
    node_id: str
    display_name: str
    category: str
    description: str
    inputs: Sequence[Param]
    outputs: Sequence[Output]
    run: Callable = field(compare=False, default=None)  # run(**inputs) -> tuple of outputs

    @property
    def widgets(self) -> list[Param]:
        """Widget inputs in the order ComfyUI's frontend stores them in `widgets_values`."""
        return [p for p in self.inputs if p.is_widget]

    def checked(self, values: dict) -> dict:
        out = {}
        for p in self.inputs:
            if p.id in values:
                out[p.id] = p.check(values[p.id]) if p.is_widget else values[p.id]
            elif p.optional or p.default is not None:
                out[p.id] = p.default
            else:
                raise ValueError(f"{self.display_name}: missing input {p.id!r}")
        return out

    def execute(self, **values):
        return self.run(**self.checked(values))


CATEGORY = "attnlab"
