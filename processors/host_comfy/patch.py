"""Node-facing entry point of the ComfyUI host: put effects on a *clone* of a ModelPatcher.

    patched = patch_model(model, [EntropyScaling(strength=1.0)])

The clone gets (once per lineage) an APPLY_MODEL wrapper, the `Router`, which on every model call
builds a `CallContext` and installs a `Dispatcher` as `optimized_attention_override`, chained over
whatever override is present at that moment (ComfyUI's own, another pack's, installed before or
after our node) and restored afterwards. Effects live in
``model_options["transformer_options"]["attnlab_effects"]``, so stacked attnlab nodes compose. UNets
also get attn1/attn2 marker patches that tell self- from cross-attention, and existing attn1/attn2
*replace* patches are chained through `ChainedReplace` (the override is not reached there).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

from ..effects import check_effects
from .context import CONTEXT_KEY, EFFECTS_KEY, OVERRIDE_KEY, CallContext, HostCache
from .dispatcher import ChainedReplace, Dispatcher
from .guidance import normal_pass_effects
from .model_plan import ModelPlan, plan_for, plan_sites

APPLY_MODEL = "apply_model"  # comfy.patcher_extension.WrappersMP.APPLY_MODEL
WRAPPER_KEY = "attnlab"


class Router:
    """APPLY_MODEL wrapper: ``fn(executor, x, t, c_concat, c_crossattn, control, transformer_options, **kw)``."""

    def __init__(self, plan: ModelPlan):
        self.plan = plan
        self.cache = HostCache()

    def __call__(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None,
                 *args, **kwargs):
        options = transformer_options if transformer_options is not None else {}
        effects = normal_pass_effects(options.get(EFFECTS_KEY) or (), options)
        if not effects:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, *args, **kwargs)
        self.cache.trim()
        ctx = CallContext(self.plan, effects, x, t, c_crossattn, options, self.cache)
        had_override, previous = OVERRIDE_KEY in options, options.get(OVERRIDE_KEY)
        options[OVERRIDE_KEY] = Dispatcher(ctx, previous)
        options[CONTEXT_KEY] = ctx
        try:
            return executor(x, t, c_concat, c_crossattn, control, options, *args, **kwargs)
        finally:
            if had_override:
                options[OVERRIDE_KEY] = previous
            else:
                options.pop(OVERRIDE_KEY, None)
            options.pop(CONTEXT_KEY, None)
            ctx.finish()


def _announce(kind: str):
    def marker(n, context, value, extra_options):
        ctx: Optional[CallContext] = extra_options.get(CONTEXT_KEY)
        if ctx is not None:
            ctx.announce(kind, extra_options)
        return n, context, value

    marker.__name__ = marker.__qualname__ = f"attnlab_mark_{kind}"
    return marker


mark_self = _announce("self")
mark_cross = _announce("cross")


def _unet_blocks(plan: ModelPlan, model) -> list[tuple[str, int, int]]:
    """ComfyUI replace keys (block name, block id, index inside the SpatialTransformer) of every UNet block."""
    keys = []
    dm = model.model.diffusion_model
    modules = dict(dm.named_modules())
    for name in plan.unet_names:
        parts = name.split(".")
        block = ("input", int(parts[1])) if parts[0] == "input_blocks" else (
            ("middle", 0) if parts[0] == "middle_block" else ("output", int(parts[1])))
        for i in range(len(modules[name].transformer_blocks)):
            keys.append((block[0], block[1], i))
    return keys


def check_patch(model, effects: Sequence, *, native_size=None) -> ModelPlan:
    """Everything `patch_model` checks before it clones, without patching: the model is supported, and the
    effects' parameters, stages, model fit and layers/heads (against the model's attention sites) are valid.
    Raises ValueError (`UnsupportedComfyModel` for models) naming the parameter and the accepted range."""
    plan = plan_for(model.model, native_size=native_size)
    check_effects(list(effects), plan.family, plan.token_scale, plan_sites(plan, model.model))
    return plan


def patch_model(model, effects: Sequence, *, native_size=None, override_supported: bool = True,
                attention: Optional[Callable] = None):
    """A clone of `model` (a ComfyUI ModelPatcher) with `effects` added; the caller's model is untouched.

    Everything is validated before the clone is made (`check_patch`: the model, the effects, and the
    layers/heads they address against the model's attention sites). `override_supported=False` (ComfyUI < 0.3.60)
    routes UNet attention through replace patches whose kernel is `attention` (ComfyUI's
    `optimized_attention`); DiTs then raise, as no other hook reaches their attention.
    """
    effects = list(effects)
    plan = check_patch(model, effects, native_size=native_size)
    if not override_supported and plan.family != "unet":
        raise RuntimeError("attnlab needs ComfyUI 0.3.60 or newer (optimized_attention_override) for DiT models")

    m = model.clone()
    options = m.model_options.setdefault("transformer_options", {})
    options[EFFECTS_KEY] = list(options.get(EFFECTS_KEY, [])) + effects
    if not m.get_wrappers(APPLY_MODEL, WRAPPER_KEY):
        m.add_wrapper_with_key(APPLY_MODEL, WRAPPER_KEY, Router(plan))
    if plan.family == "unet":
        patches = options.get("patches", {})
        if mark_self not in patches.get("attn1_patch", []):
            m.set_model_attn1_patch(mark_self)
        if mark_cross not in patches.get("attn2_patch", []):
            m.set_model_attn2_patch(mark_cross)
        replaces = options.get("patches_replace", {})
        setters = {"attn1": (m.set_model_attn1_replace, "self"), "attn2": (m.set_model_attn2_replace, "cross")}
        for slot, (setter, kind) in setters.items():
            for key, fn in list(replaces.get(slot, {}).items()):
                if not isinstance(fn, ChainedReplace):
                    setter(ChainedReplace(kind, previous=fn), *key)
            if not override_supported:
                existing = replaces.get(slot, {})
                for key in _unet_blocks(plan, m):
                    if key not in existing and key[:2] not in existing:
                        setter(ChainedReplace(kind, attention=attention), *key)
    return m

