"""FreeSwim's dual path in ComfyUI: a ``model_function_wrapper`` (``ModelPatcher.set_model_unet_function_wrapper``)
that appends a full-attention twin for the rows whose cross-attention is overridden afresh at this step,
runs one batched ``apply_model`` and hands back only the window rows' prediction.

ComfyUI calls the wrapper from ``calc_cond_batch`` as ``wrapper(apply_model, {"input", "timestep", "c",
"cond_or_uncond"})`` for each batch of conds; the rows' roles come from ``cond_or_uncond`` (or from a
guidance pass's ``ROLE_KEY``), the step from ``sample_sigmas``. The per-row roles of the doubled batch go
to the APPLY_MODEL router through ``transformer_options[ROLE_KEY]`` as a tuple (one role per row). A
model_function_wrapper set before ours (another node's) is chained: ours runs outside it and hands it
the doubled batch.
"""

from __future__ import annotations

from typing import Callable, Optional

from ..rows import take_rows
from .context import ROLE_KEY, step_info


class DualPassWrapper:
    """The model_function_wrapper; `swim` is the FreeSwim effect patched onto the same model."""

    def __init__(self, swim, previous: Optional[Callable] = None):
        self.swim = swim
        self.previous = previous
        self.calls = 0
        self.full_rows = 0

    def __deepcopy__(self, memo):  # clones share the effect (and its cache) like the effect itself
        return self

    def __call__(self, apply_model, args: dict):
        x, t, c = args["input"], args["timestep"], dict(args["c"])
        cond_or_uncond = list(args.get("cond_or_uncond") or [0])
        batch = int(x.shape[0])
        options = dict(c.get("transformer_options") or {})
        forced = options.get(ROLE_KEY)
        chunk = max(1, batch // len(cond_or_uncond))
        if isinstance(forced, str) and forced:
            roles = (forced,) * batch
        else:
            roles = tuple("uncond" if u == 1 else "cond" for u in cond_or_uncond for _ in range(chunk))
            if len(roles) != batch:
                roles = ("cond",) * batch
        step = step_info(t, options.get("sample_sigmas"))
        dup, plan = self.swim.plan_rows(roles, step, tuple(x.shape[1:]))
        self.calls += 1
        self.full_rows += len(dup)
        index = list(range(batch)) + dup
        options[ROLE_KEY] = tuple(roles) + ("full",) * len(dup)
        c = {k: (v if k == "transformer_options" else take_rows(v, index, batch)) for k, v in c.items()} if dup else c
        c["transformer_options"] = options
        x2 = x[index] if dup else x
        t2 = take_rows(t, index, batch) if dup else t
        inner = {"input": x2, "timestep": t2, "c": c, "cond_or_uncond": cond_or_uncond}
        with self.swim.active(plan):
            if self.previous is not None:
                out = self.previous(apply_model, inner)
            else:
                out = apply_model(x2, t2, **c)
        return out[:batch] if dup else out


def install_dual_pass(patched, swim) -> DualPassWrapper:
    """Set a `DualPassWrapper` for `swim` on `patched` (a clone holding the effect), chained over an existing
    model_function_wrapper. Returns the wrapper."""
    previous = patched.model_options.get("model_function_wrapper")
    wrapper = DualPassWrapper(swim, previous)
    patched.set_model_unet_function_wrapper(wrapper)
    return wrapper
