"""Checking public parameters before any work, with one message shape for every entry point.

    scale = number("scale", scale, low=0, high=100)       # -> float, finite, in [0, 100]
    steps = integer("num_inference_steps", steps, low=1, high=1000)
    size = pixel_size("native_size", size)                # -> (height, width), positive ints

Every check names the parameter, the value it got and what is valid, e.g.
``scale must be a finite number in [0, 100]; got nan``, and raises `InvalidParameter` (a ValueError), or
`ParameterTypeError` (also a TypeError) when the value is of the wrong kind. Strings are never read as numbers:
``"64"`` is an error, not 64 (nor the digits 6 and 4). Booleans are not numbers either.
"""

from __future__ import annotations

import math
import numbers
from typing import Iterable, Optional, Sequence

#: the largest image side in pixels any entry point accepts (a sane bound, not a model limit)
MAX_PIXELS = 16384


class InvalidParameter(ValueError):
    """A public parameter with a value outside its valid range."""


class ParameterTypeError(InvalidParameter, TypeError):
    """A public parameter of the wrong kind (a string where a number belongs, a dict for a list, ...)."""


def interval(low=None, high=None, low_open: bool = False, high_open: bool = False) -> str:
    """The valid range as text: "[0, 1]", "(0, 16]", ">= 1", "< 5", or "" when unbounded."""
    if low is not None and high is not None:
        return f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high:g}"
    return ""


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) or _is_scalar_array(value)


def _is_scalar_array(value) -> bool:
    """A 0-d numpy / torch value (what a slider or a tensor reduction hands over)."""
    return (getattr(value, "ndim", None) == 0 and hasattr(value, "item") and not isinstance(value, (str, bytes))
            and getattr(getattr(value, "dtype", None), "is_complex", False) is False
            and str(getattr(value, "dtype", "")) not in ("bool", "torch.bool"))


def number(name: str, value, low=None, high=None, *, low_open: bool = False, high_open: bool = False) -> float:
    """`value` as a finite float in the given range."""
    span = interval(low, high, low_open, high_open)
    want = f"a finite number{' ' + ('in ' + span if span[0] in '[(' else span) if span else ''}"
    if not _is_number(value):
        raise ParameterTypeError(f"{name} must be {want}; got {value!r} ({type(value).__name__})")
    x = float(value.item() if _is_scalar_array(value) else value)
    if not math.isfinite(x) or (low is not None and (x < low or (low_open and x == low))) or (
            high is not None and (x > high or (high_open and x == high))):
        raise InvalidParameter(f"{name} must be {want}; got {x:g}")
    return x


def integer(name: str, value, low=None, high=None) -> int:
    """`value` as an int in [low, high]; floats are accepted only when whole (9.0, not 9.5)."""
    span = interval(low, high)
    want = f"an integer{' ' + ('in ' + span if span[0] == '[' else span) if span else ''}"
    if not _is_number(value):
        raise ParameterTypeError(f"{name} must be {want}; got {value!r} ({type(value).__name__})")
    x = value.item() if _is_scalar_array(value) else value
    if isinstance(x, float) and (not math.isfinite(x) or x != int(x)):
        raise InvalidParameter(f"{name} must be {want}; got {x:g}")
    x = int(x)
    if (low is not None and x < low) or (high is not None and x > high):
        raise InvalidParameter(f"{name} must be {want}; got {x}")
    return x


def boolean(name: str, value) -> bool:
    """`value` as a bool: True/False (numpy / torch booleans too); 0 and 1 are accepted, nothing else."""
    if isinstance(value, bool):
        return value
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0 and str(value.dtype) in ("bool", "torch.bool"):
        return bool(value.item())
    if isinstance(value, numbers.Integral) and value in (0, 1):
        return bool(value)
    raise ParameterTypeError(f"{name} must be True or False; got {value!r} ({type(value).__name__})")


def choice(name: str, value, options: Sequence):
    """`value` if it is one of `options` (compared as given; strings are not case-folded)."""
    if not isinstance(value, (str, int, float, type(None))) or value not in tuple(options):
        raise InvalidParameter(f"{name} must be one of {', '.join(repr(o) for o in options)}; got {value!r}")
    return value


def text(name: str, value, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise ParameterTypeError(f"{name} must be a string; got {value!r} ({type(value).__name__})")
    if not allow_empty and not value.strip():
        raise InvalidParameter(f"{name} is empty")
    return value


def pixel_size(name: str, value, *, dims: Iterable[int] = (2, 3), low: int = 1, high: int = MAX_PIXELS) -> tuple:
    """An image size in pixels: an int (square), (height, width) or, where `dims` allows, (frames, height,
    width); every entry a whole number in [low, high]."""
    dims = tuple(dims)
    shapes = " or ".join({1: "an int", 2: "(height, width)", 3: "(frames, height, width)"}[d] for d in (1, *dims))
    if _is_number(value):
        value = (value, value)
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) not in dims:
        raise ParameterTypeError(f"{name} must be {shapes} in pixels; got {value!r}")
    return tuple(integer(f"{name}[{i}]", v, low, high) for i, v in enumerate(value))


def real_pair(name: str, value, low=None, high=None) -> tuple[float, float]:
    """(start, end) with low <= start <= end <= high."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise ParameterTypeError(f"{name} must be a pair (start, end); got {value!r}")
    start, end = (number(f"{name}[{i}]", v, low, high) for i, v in enumerate(value))
    if start > end:
        raise InvalidParameter(f"{name} must have start <= end; got {tuple(value)!r}")
    return start, end


def int_list(name: str, value, low: Optional[int] = None, high: Optional[int] = None) -> list[int]:
    """A non-empty list (or tuple / set / range) of integers."""
    if isinstance(value, (str, bytes, dict)) or not isinstance(value, Iterable):
        raise ParameterTypeError(f"{name} must be a list of integers; got {value!r} ({type(value).__name__})")
    items = [integer(f"{name} entry", v, low, high) for v in value]
    if not items:
        raise InvalidParameter(f"{name} is empty: name at least one entry, or pass None for the default")
    return items


def prompts(name: str, value, *, allow_none: bool = True):
    """A prompt: a string (empty is allowed: the unconditional prompt) or a non-empty list of strings."""
    if value is None and allow_none:
        return value
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        if not value:
            raise InvalidParameter(f"{name} is an empty list; pass a string or at least one prompt")
        for v in value:
            if not isinstance(v, str):
                raise ParameterTypeError(f"every entry of {name} must be a string; got {v!r} ({type(v).__name__})")
        return value
    raise ParameterTypeError(f"{name} must be a string or a list of strings; got {value!r} ({type(value).__name__})")


def effect_list(name: str, value, effect_type) -> list:
    """A list of effects (a lone effect is a mistake worth naming: `effects=[EntropyScaling()]`)."""
    if isinstance(value, effect_type):
        raise ParameterTypeError(f"{name} must be a list of effects; got one {type(value).__name__}: pass "
                                 f"{name}=[{type(value).__name__}(...)]")
    if isinstance(value, (str, bytes, dict)) or not isinstance(value, Iterable):
        raise ParameterTypeError(f"{name} must be a list of effects; got {value!r} ({type(value).__name__})")
    items = list(value)
    for e in items:
        if not (isinstance(e, effect_type) or callable(e) and hasattr(e, "stage") and hasattr(e, "applies")):
            raise ParameterTypeError(f"every entry of {name} must be an attnlab effect; got {e!r} ({type(e).__name__})")
    return items
