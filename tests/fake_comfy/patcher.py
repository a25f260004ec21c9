"""Fake of ComfyUI's ``ModelPatcher`` and ``comfy.patcher_extension`` (our own code).

Semantics reproduced from ComfyUI v0.3.64 (what a node pack can observe):

* ``ModelPatcher.model_options`` starts as ``{"transformer_options": {}}``; ``clone()`` shares the
  model, **deep-copies** ``model_options`` (functions/closures survive deepcopy as the same object,
  other objects are copied), copies wrapper/callback dict-of-lists, keeps attachments by reference
  (or ``attachment.on_model_patcher_clone()`` when defined) and runs ``ON_CLONE`` callbacks.
* wrappers live on the patcher (``patcher.wrappers[type][key] = [fn, ...]``) and are merged into
  ``model_options["transformer_options"]["wrappers"]`` only when sampling starts, so calling
  ``patcher.model.apply_model`` directly runs no patcher wrapper.
* a wrapper is ``fn(executor, *args, **kwargs)`` and continues with ``executor(*args, **kwargs)``;
  ``executor.class_obj`` is the object whose method is wrapped; the first wrapper is outermost.
* patch setters append to ``transformer_options["patches"][name]`` (lists compose); replace setters
  write ``transformer_options["patches_replace"][name][(block_name, number[, index])]`` on copies of
  the dicts they touch (last writer wins).
"""

from __future__ import annotations

import copy
import inspect
from typing import Any, Callable


class WrappersMP:
    OUTER_SAMPLE = "outer_sample"
    PREPARE_SAMPLING = "prepare_sampling"
    SAMPLER_SAMPLE = "sampler_sample"
    PREDICT_NOISE = "predict_noise"
    CALC_COND_BATCH = "calc_cond_batch"
    APPLY_MODEL = "apply_model"
    DIFFUSION_MODEL = "diffusion_model"

    @classmethod
    def init_wrappers(cls) -> dict:
        return {}


class CallbacksMP:
    ON_CLONE = "on_clone"
    ON_LOAD = "on_load_after"
    ON_DETACH = "on_detach_after"
    ON_CLEANUP = "on_cleanup"
    ON_PRE_RUN = "on_pre_run"
    ON_PREPARE_STATE = "on_prepare_state"
    ON_APPLY_HOOKS = "on_apply_hooks"
    ON_REGISTER_ALL_HOOK_PATCHES = "on_register_all_hook_patches"
    ON_INJECT_MODEL = "on_inject_model"
    ON_EJECT_MODEL = "on_eject_model"

    @classmethod
    def init_callbacks(cls) -> dict:
        return {}


# ----------------------------------------------------------------------------- dict helpers
def copy_nested_dicts(d: dict) -> dict:
    """Dicts copied recursively, lists copied shallowly, every other value shared."""
    out = dict(d)
    for key, value in d.items():
        if isinstance(value, dict):
            out[key] = copy_nested_dicts(value)
        elif isinstance(value, list):
            out[key] = list(value)
    return out


def merge_nested_dicts(dict1: dict, dict2: dict, copy_dict1: bool = True) -> dict:
    """Merge ``dict2`` into ``dict1``: nested dicts merged into copies, lists extended, rest replaced."""
    merged = copy_nested_dicts(dict1) if copy_dict1 else dict1
    for key, value in dict2.items():
        if isinstance(value, dict):
            current = merged.setdefault(key, {})
            merged[key] = merge_nested_dicts(value, current)
        elif isinstance(value, list):
            merged.setdefault(key, []).extend(value)
        else:
            merged[key] = value
    return merged


def create_model_options_clone(model_options: dict) -> dict:
    return copy_nested_dicts(model_options)


def _options_root(options: dict, is_model_options: bool) -> dict:
    return options.get("transformer_options", {}) if is_model_options else options


def get_all_wrappers(wrapper_type: str, transformer_options: dict, is_model_options: bool = False) -> list:
    found = []
    for fns in _options_root(transformer_options, is_model_options).get("wrappers", {}).get(wrapper_type, {}).values():
        found.extend(fns)
    return found


def get_wrappers_with_key(wrapper_type: str, key: str, transformer_options: dict, is_model_options: bool = False) -> list:
    return list(_options_root(transformer_options, is_model_options).get("wrappers", {}).get(wrapper_type, {}).get(key, []))


def add_wrapper_with_key(wrapper_type: str, key: str, wrapper: Callable, transformer_options: dict,
                         is_model_options: bool = False) -> None:
    if is_model_options:
        transformer_options = transformer_options.setdefault("transformer_options", {})
    transformer_options.setdefault("wrappers", {}).setdefault(wrapper_type, {}).setdefault(key, []).append(wrapper)


def get_all_callbacks(call_type: str, transformer_options: dict, is_model_options: bool = False) -> list:
    found = []
    for fns in _options_root(transformer_options, is_model_options).get("callbacks", {}).get(call_type, {}).values():
        found.extend(fns)
    return found


class WrapperExecutor:
    """Runs ``wrappers[idx](self, *args, **kwargs)``; calling the executor runs the next one."""

    def __init__(self, original: Callable, class_obj: Any, wrappers: list, idx: int):
        self.original = original
        self.class_obj = class_obj
        self.wrappers = list(wrappers)
        self.idx = idx
        self.is_last = idx == len(self.wrappers)

    def __call__(self, *args, **kwargs):
        if self.idx + 1 > len(self.wrappers):
            raise RuntimeError("wrapper chain exhausted")
        return WrapperExecutor(self.original, self.class_obj, self.wrappers, self.idx + 1).execute(*args, **kwargs)

    def execute(self, *args, **kwargs):
        if self.is_last:
            return self.original(*args, **kwargs)
        return self.wrappers[self.idx](self, *args, **kwargs)

    @classmethod
    def new_executor(cls, original: Callable, wrappers: list, idx: int = 0) -> "WrapperExecutor":
        return cls(original, None, wrappers, idx)

    @classmethod
    def new_class_executor(cls, original: Callable, class_obj: Any, wrappers: list, idx: int = 0) -> "WrapperExecutor":
        return cls(original, class_obj, wrappers, idx)


def set_model_options_patch_replace(model_options: dict, patch: Callable, name: str, block_name: str, number: int,
                                    transformer_index: int | None = None) -> dict:
    to = dict(model_options["transformer_options"])
    to["patches_replace"] = dict(to.get("patches_replace", {}))
    to["patches_replace"][name] = dict(to["patches_replace"].get(name, {}))
    key = (block_name, number) if transformer_index is None else (block_name, number, transformer_index)
    to["patches_replace"][name][key] = patch
    model_options["transformer_options"] = to
    return model_options


def set_model_options_post_cfg_function(model_options: dict, fn: Callable, disable_cfg1_optimization: bool = False) -> dict:
    model_options["sampler_post_cfg_function"] = model_options.get("sampler_post_cfg_function", []) + [fn]
    if disable_cfg1_optimization:
        model_options["disable_cfg1_optimization"] = True
    return model_options


def set_model_options_pre_cfg_function(model_options: dict, fn: Callable, disable_cfg1_optimization: bool = False) -> dict:
    model_options["sampler_pre_cfg_function"] = model_options.get("sampler_pre_cfg_function", []) + [fn]
    if disable_cfg1_optimization:
        model_options["disable_cfg1_optimization"] = True
    return model_options


# ----------------------------------------------------------------------------- ModelPatcher
class ModelPatcher:
    """The parts of ``comfy.model_patcher.ModelPatcher`` a node pack touches."""

    def __init__(self, model, load_device=None, offload_device=None, size: int = 0, weight_inplace_update: bool = False):
        self.model = model
        self.load_device = load_device if load_device is not None else "cpu"
        self.offload_device = offload_device if offload_device is not None else "cpu"
        self.size = size
        self.weight_inplace_update = weight_inplace_update
        self.patches: dict = {}
        self.object_patches: dict = {}
        self.model_options: dict = {"transformer_options": {}}
        self.attachments: dict = {}
        self.additional_models: dict = {}
        self.callbacks: dict = CallbacksMP.init_callbacks()
        self.wrappers: dict = WrappersMP.init_wrappers()
        self.injections: dict = {}
        self.parent = None
        if not hasattr(model, "current_patcher"):
            try:
                model.current_patcher = None
            except AttributeError:
                pass

    # ---- cloning
    def clone(self) -> "ModelPatcher":
        n = self.__class__(self.model, self.load_device, self.offload_device, self.size, self.weight_inplace_update)
        n.patches = {k: list(v) for k, v in self.patches.items()}
        n.object_patches = dict(self.object_patches)
        n.model_options = copy.deepcopy(self.model_options)
        n.parent = self
        n.attachments = {}
        for k, a in self.attachments.items():
            n.attachments[k] = a.on_model_patcher_clone() if hasattr(a, "on_model_patcher_clone") else a
        n.additional_models = {k: [m.clone() for m in v] for k, v in self.additional_models.items()}
        n.callbacks = {t: {k: list(v) for k, v in d.items()} for t, d in self.callbacks.items()}
        n.wrappers = {t: {k: list(v) for k, v in d.items()} for t, d in self.wrappers.items()}
        n.injections = {k: list(v) for k, v in self.injections.items()}
        for cb in self.get_all_callbacks(CallbacksMP.ON_CLONE):
            cb(self, n)
        return n

    def is_clone(self, other) -> bool:
        return getattr(other, "model", None) is self.model

    def get_model_object(self, name: str):
        if name in self.object_patches:
            return self.object_patches[name]
        obj = self.model
        for part in name.split("."):
            obj = obj[int(part)] if part.isdigit() and hasattr(obj, "__getitem__") else getattr(obj, part)
        return obj

    def model_dtype(self):
        return getattr(self.model, "dtype", None)

    def memory_required(self, input_shape):
        return self.model.memory_required(input_shape=input_shape)

    # ---- sampler-level functions
    def set_model_sampler_cfg_function(self, sampler_cfg_function: Callable, disable_cfg1_optimization: bool = False):
        if len(inspect.signature(sampler_cfg_function).parameters) == 3:
            self.model_options["sampler_cfg_function"] = (
                lambda args: sampler_cfg_function(args["cond"], args["uncond"], args["cond_scale"]))
        else:
            self.model_options["sampler_cfg_function"] = sampler_cfg_function
        if disable_cfg1_optimization:
            self.model_options["disable_cfg1_optimization"] = True

    def set_model_sampler_post_cfg_function(self, post_cfg_function: Callable, disable_cfg1_optimization: bool = False):
        self.model_options = set_model_options_post_cfg_function(self.model_options, post_cfg_function,
                                                                 disable_cfg1_optimization)

    def set_model_sampler_pre_cfg_function(self, pre_cfg_function: Callable, disable_cfg1_optimization: bool = False):
        self.model_options = set_model_options_pre_cfg_function(self.model_options, pre_cfg_function,
                                                                disable_cfg1_optimization)

    def set_model_sampler_calc_cond_batch_function(self, fn: Callable):
        self.model_options["sampler_calc_cond_batch_function"] = fn

    def set_model_unet_function_wrapper(self, unet_wrapper_function: Callable):
        self.model_options["model_function_wrapper"] = unet_wrapper_function

    # ---- transformer patches
    def set_model_patch(self, patch: Callable, name: str):
        to = self.model_options["transformer_options"]
        to.setdefault("patches", {})
        to["patches"][name] = to["patches"].get(name, []) + [patch]

    def set_model_patch_replace(self, patch: Callable, name: str, block_name: str, number: int,
                                transformer_index: int | None = None):
        self.model_options = set_model_options_patch_replace(self.model_options, patch, name, block_name, number,
                                                             transformer_index=transformer_index)

    def set_model_attn1_patch(self, patch):
        self.set_model_patch(patch, "attn1_patch")

    def set_model_attn2_patch(self, patch):
        self.set_model_patch(patch, "attn2_patch")

    def set_model_attn1_replace(self, patch, block_name, number, transformer_index=None):
        self.set_model_patch_replace(patch, "attn1", block_name, number, transformer_index)

    def set_model_attn2_replace(self, patch, block_name, number, transformer_index=None):
        self.set_model_patch_replace(patch, "attn2", block_name, number, transformer_index)

    def set_model_attn1_output_patch(self, patch):
        self.set_model_patch(patch, "attn1_output_patch")

    def set_model_attn2_output_patch(self, patch):
        self.set_model_patch(patch, "attn2_output_patch")

    def set_model_input_block_patch(self, patch):
        self.set_model_patch(patch, "input_block_patch")

    def set_model_input_block_patch_after_skip(self, patch):
        self.set_model_patch(patch, "input_block_patch_after_skip")

    def set_model_output_block_patch(self, patch):
        self.set_model_patch(patch, "output_block_patch")

    def set_model_emb_patch(self, patch):
        self.set_model_patch(patch, "emb_patch")

    def set_model_double_block_patch(self, patch):
        self.set_model_patch(patch, "double_block")

    def set_model_post_input_patch(self, patch):
        self.set_model_patch(patch, "post_input")

    def add_object_patch(self, name: str, obj):
        """Recorded only: the fake never swaps module attributes."""
        self.object_patches[name] = obj

    # ---- wrappers / callbacks
    def add_wrapper(self, wrapper_type: str, wrapper: Callable):
        self.add_wrapper_with_key(wrapper_type, None, wrapper)

    def add_wrapper_with_key(self, wrapper_type: str, key, wrapper: Callable):
        self.wrappers.setdefault(wrapper_type, {}).setdefault(key, []).append(wrapper)

    def remove_wrappers_with_key(self, wrapper_type: str, key):
        self.wrappers.get(wrapper_type, {}).pop(key, None)

    def get_wrappers(self, wrapper_type: str, key):
        return self.wrappers.get(wrapper_type, {}).get(key, [])

    def get_all_wrappers(self, wrapper_type: str) -> list:
        found = []
        for fns in self.wrappers.get(wrapper_type, {}).values():
            found.extend(fns)
        return found

    def add_callback(self, call_type: str, callback: Callable):
        self.add_callback_with_key(call_type, None, callback)

    def add_callback_with_key(self, call_type: str, key, callback: Callable):
        self.callbacks.setdefault(call_type, {}).setdefault(key, []).append(callback)

    def remove_callbacks_with_key(self, call_type: str, key):
        self.callbacks.get(call_type, {}).pop(key, None)

    def get_callbacks(self, call_type: str, key):
        return self.callbacks.get(call_type, {}).get(key, [])

    def get_all_callbacks(self, call_type: str) -> list:
        found = []
        for fns in self.callbacks.get(call_type, {}).values():
            found.extend(fns)
        return found

    # ---- attachments / injections / additional models
    def set_attachments(self, key: str, attachment):
        self.attachments[key] = attachment

    def remove_attachments(self, key: str):
        self.attachments.pop(key, None)

    def get_attachment(self, key: str):
        return self.attachments.get(key, None)

    def set_injections(self, key: str, injections: list):
        self.injections[key] = injections

    def remove_injections(self, key: str):
        self.injections.pop(key, None)

    def set_additional_models(self, key: str, models: list):
        self.additional_models[key] = models

    def get_additional_models_with_key(self, key: str) -> list:
        return self.additional_models.get(key, [])

    # ---- run lifecycle (called by the fake sampler)
    def pre_run(self):
        self.model.current_patcher = self
        for cb in self.get_all_callbacks(CallbacksMP.ON_PRE_RUN):
            cb(self)

    def prepare_state(self, timestep):
        for cb in self.get_all_callbacks(CallbacksMP.ON_PREPARE_STATE):
            cb(self, timestep)

    def cleanup(self):
        self.model.current_patcher = None
        for cb in self.get_all_callbacks(CallbacksMP.ON_CLEANUP):
            cb(self)
