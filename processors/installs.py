"""One effect, one install: refusing effects that would apply twice on the same model (framework-free).

The same object listed twice, two effects of one kind in a list, or an effect of a kind an enclosing session
already installed (nested `attnlab.apply` blocks, `entropy_scaling()` inside itself) would scale, blend or share
the same attention twice without a word. Effects decide what counts as "the same kind" with
`conflicts_with(other)` (default: the same class; "observe"-stage recorders never conflict; SoftPAG only on overlapping layers).
"""

from __future__ import annotations

from typing import Iterable, Sequence

from .params import InvalidParameter


def conflicts(a, b) -> bool:
    if a is b:
        return True
    if getattr(a, "stage", None) == "observe":  # read-only recorders change nothing: any number may watch
        return False
    own = getattr(a, "conflicts_with", None)
    if own is not None:
        return bool(own(b))
    # attnlab's own effects of one class clash; a user's effect classes decide for themselves
    return type(a) is type(b) and type(a).__module__.startswith(__package__) and not getattr(a, "stackable", False)


def check_single_install(effects: Sequence, installed: Iterable = ()) -> None:
    """Raise InvalidParameter when an effect of `effects` conflicts with another of them or with one of
    `installed` (the effects already on the model)."""
    installed = list(installed)
    for i, e in enumerate(effects):
        name = type(e).__name__
        for other in installed:
            if conflicts(e, other):
                raise InvalidParameter(
                    f"{name} is already installed on this model (by an enclosing attnlab session, pipeline "
                    f"wrapper or `with` block: {other!r}); it would apply twice. Leave that block first, or change "
                    "its settings there")
        for other in effects[:i]:
            if conflicts(e, other):
                what = "the same effect object" if e is other else f"two {name} effects"
                raise InvalidParameter(f"effects lists {what} ({other!r} and {e!r}); it would apply twice. "
                                       "Use one, with all its settings")
