"""Fake of ComfyUI's sampling plumbing (``comfy.sample`` / ``comfy.samplers``), our own code.

Reproduced (ComfyUI v0.3.64):

* per run: ``model_options`` is a nested-dict copy of ``patcher.model_options``; the patcher's
  wrappers/callbacks are merged into ``model_options["transformer_options"]["wrappers"|"callbacks"]``;
  ``transformer_options["sample_sigmas"]`` = the whole schedule incl. the final 0;
  wrapper points ``OUTER_SAMPLE``, ``SAMPLER_SAMPLE``, ``PREDICT_NOISE``, ``CALC_COND_BATCH``,
  ``APPLY_MODEL`` (in the model), ``DIFFUSION_MODEL`` (UNet, Flux, Wan only); callbacks
  ``ON_PRE_RUN``, ``ON_PREPARE_STATE``, ``ON_CLEANUP``;
* per model call: a fresh ``transformer_options`` = ``model_options["transformer_options"]`` merged into
  ``{}`` (dict values copied, lists extended, other values shared) plus ``cond_or_uncond`` (list of
  indices into ``conds``: 0 positive, 1 negative), ``uuids`` (one per chunk) and ``sigmas`` (one per
  latent row);
* batching: all concatenable conds in one call, **negative first** (``[1, 0]``); at cfg 1 only
  ``[0]`` unless ``disable_cfg1_optimization``; when ``model.memory_required(...) * 1.5`` exceeds the
  free memory the chunks run as separate calls ``[1]`` then ``[0]`` (``split_calls=True`` forces that);
* CFG: ``uncond + (cond - uncond) * cfg`` or ``sampler_cfg_function``; ``sampler_pre_cfg_function`` and
  ``sampler_post_cfg_function`` lists with ComfyUI's argument dict keys.

The sampler is plain Euler on a simple schedule (log-linear for EPS models, linear for flow models);
its sigma values differ from ComfyUI's "normal" scheduler by design.
"""

from __future__ import annotations

import math
import uuid

import torch

from .models import LATENT_SHAPE, conditioning, latent as empty_latent
from .patcher import (CallbacksMP, WrapperExecutor, WrappersMP, create_model_options_clone, get_all_wrappers,
                      merge_nested_dicts)

#: what the fake "device" reports as free memory (bytes) for the batching decision
FREE_MEMORY = 64 * 1024 ** 3


# ----------------------------------------------------------------------------- conds
def process_conds(model, cond_list, noise):
    """ComfyUI conditioning ``[[tensor, dict], ...]`` -> processed dicts carrying ``model_conds``."""
    if cond_list is None:
        return None
    out = []
    for tensor, extra in cond_list:
        entry = dict(extra)
        entry["cross_attn"] = tensor
        entry["model_conds"] = model.extra_conds(cross_attn=tensor, noise=noise, **extra)
        entry["uuid"] = uuid.uuid4()
        out.append(entry)
    return out


def _repeat_batch(t, batch):
    if t.shape[0] == batch:
        return t
    reps = -(-batch // t.shape[0])
    return t.repeat(reps, *([1] * (t.ndim - 1)))[:batch]


def _can_concat(a: dict, b: dict) -> bool:
    ca, cb = a["model_conds"], b["model_conds"]
    if ca.keys() != cb.keys():
        return False
    for k in ca:
        x, y = ca[k], cb[k]
        if isinstance(x, list):
            if len(x) != len(y) or any(u.shape != w.shape for u, w in zip(x, y)):
                return False
        elif x.shape != y.shape:
            if k != "c_crossattn" or x.shape[2:] != y.shape[2:]:
                return False
            lcm = math.lcm(x.shape[1], y.shape[1])
            if lcm // min(x.shape[1], y.shape[1]) > 4:
                return False
    return True


def cond_cat(model_conds: list, batch: int) -> dict:
    """Concatenate per-chunk model conds (each repeated to the latent batch)."""
    out = {}
    for k in model_conds[0]:
        vals = [mc[k] for mc in model_conds]
        if isinstance(vals[0], list):
            out[k] = [torch.cat([_repeat_batch(v[i], batch) for v in vals]) for i in range(len(vals[0]))]
            continue
        if k == "c_crossattn":
            lcm = math.lcm(*[v.shape[1] for v in vals])
            vals = [v.repeat(1, lcm // v.shape[1], 1) for v in vals]
        out[k] = torch.cat([_repeat_batch(v, batch) for v in vals])
    return out


# ----------------------------------------------------------------------------- model calls
def calc_cond_batch(model, conds, x_in, timestep, model_options):
    """``comfy.samplers.calc_cond_batch``: one denoised tensor per entry of ``conds`` (None -> zeros)."""
    return WrapperExecutor.new_executor(
        _calc_cond_batch, get_all_wrappers(WrappersMP.CALC_COND_BATCH, model_options, is_model_options=True)
    ).execute(model, conds, x_in, timestep, model_options)


def _calc_cond_batch(model, conds, x_in, timestep, model_options):
    out_conds = [torch.zeros_like(x_in) for _ in conds]
    out_counts = [torch.ones_like(x_in) * 1e-37 for _ in conds]
    to_run = [(entry, i) for i, cond in enumerate(conds) if cond is not None for entry in cond]
    patcher = getattr(model, "current_patcher", None)
    if patcher is not None:
        patcher.prepare_state(timestep)
    while to_run:
        first = to_run[0][0]
        candidates = [j for j in range(len(to_run)) if _can_concat(to_run[j][0], first)]
        candidates.reverse()
        to_batch = candidates[:1]
        for i in range(1, len(candidates) + 1):
            amount = candidates[:len(candidates) // i]
            input_shape = [len(amount) * x_in.shape[0]] + list(x_in.shape[1:])
            cond_shapes = {}
            for j in amount:
                for k, v in to_run[j][0]["model_conds"].items():
                    cond_shapes.setdefault(k, []).append(tuple(getattr(v, "shape", ())))
            if model.memory_required(input_shape, cond_shapes=cond_shapes) * 1.5 < FREE_MEMORY:
                to_batch = amount
                break
        chunks = [to_run.pop(j) for j in to_batch]
        cond_or_uncond = [i for _, i in chunks]
        uuids = [entry["uuid"] for entry, _ in chunks]
        n = len(chunks)
        input_x = torch.cat([x_in] * n)
        c = cond_cat([entry["model_conds"] for entry, _ in chunks], x_in.shape[0])
        timestep_ = torch.cat([timestep] * n)
        transformer_options = merge_nested_dicts({}, model_options.get("transformer_options", {}), copy_dict1=False)
        transformer_options["cond_or_uncond"] = cond_or_uncond[:]
        transformer_options["uuids"] = uuids[:]
        transformer_options["sigmas"] = timestep
        c["transformer_options"] = transformer_options
        if "model_function_wrapper" in model_options:
            output = model_options["model_function_wrapper"](
                model.apply_model, {"input": input_x, "timestep": timestep_, "c": c, "cond_or_uncond": cond_or_uncond})
        else:
            output = model.apply_model(input_x, timestep_, **c)
        for o, part in enumerate(output.chunk(n)):
            out_conds[cond_or_uncond[o]] += part
            out_counts[cond_or_uncond[o]] += 1.0
    return [o / c for o, c in zip(out_conds, out_counts)]


def cfg_function(model, cond_pred, uncond_pred, cond_scale, x, timestep, model_options={}, cond=None, uncond=None):
    if "sampler_cfg_function" in model_options:
        args = {"cond": x - cond_pred, "uncond": x - uncond_pred, "cond_scale": cond_scale, "timestep": timestep,
                "input": x, "sigma": timestep, "cond_denoised": cond_pred, "uncond_denoised": uncond_pred,
                "model": model, "model_options": model_options, "input_cond": cond, "input_uncond": uncond}
        result = x - model_options["sampler_cfg_function"](args)
    else:
        result = uncond_pred + (cond_pred - uncond_pred) * cond_scale
    for fn in model_options.get("sampler_post_cfg_function", []):
        args = {"denoised": result, "cond": cond, "uncond": uncond, "cond_scale": cond_scale, "model": model,
                "uncond_denoised": uncond_pred, "cond_denoised": cond_pred, "sigma": timestep,
                "model_options": model_options, "input": x}
        result = fn(args)
    return result


def sampling_function(model, x, timestep, uncond, cond, cond_scale, model_options={}, seed=None):
    if math.isclose(cond_scale, 1.0) and not model_options.get("disable_cfg1_optimization", False):
        uncond_ = None
    else:
        uncond_ = uncond
    conds = [cond, uncond_]
    if "sampler_calc_cond_batch_function" in model_options:
        out = model_options["sampler_calc_cond_batch_function"](
            {"conds": conds, "input": x, "sigma": timestep, "model": model, "model_options": model_options})
    else:
        out = calc_cond_batch(model, conds, x, timestep, model_options)
    for fn in model_options.get("sampler_pre_cfg_function", []):
        out = fn({"conds": conds, "conds_out": out, "cond_scale": cond_scale, "timestep": timestep, "input": x,
                  "sigma": timestep, "model": model, "model_options": model_options})
    return cfg_function(model, out[0], out[1], cond_scale, x, timestep, model_options=model_options, cond=cond,
                        uncond=uncond_)


# ----------------------------------------------------------------------------- guider / sampler
class KSAMPLER:
    """Euler (ComfyUI's sampler objects are ``KSAMPLER`` instances); given a ``sampler_function`` it calls that
    instead, like ComfyUI's ``KSAMPLER(sampler_function)``: ``fn(model, x, sigmas, extra_args=, callback=, disable=)``."""

    def __init__(self, sampler_function=None, extra_options=None, inpaint_options=None):
        self.sampler_function = sampler_function
        self.extra_options = extra_options or {}

    def sample(self, guider, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        ms = guider.inner_model.model_sampling
        x = ms.noise_scaling(sigmas[0], noise, latent_image if latent_image is not None else torch.zeros_like(noise))
        if self.sampler_function is not None:
            return self.sampler_function(guider, x, sigmas, extra_args=extra_args, callback=callback,
                                         disable=disable_pbar, **self.extra_options)
        s_in = x.new_ones([x.shape[0]])
        for i in range(len(sigmas) - 1):
            denoised = guider(x, sigmas[i] * s_in, **extra_args)
            if callback is not None:
                callback(i, denoised, x, len(sigmas) - 1)
            d = (x - denoised) / sigmas[i]
            x = x + d * (sigmas[i + 1] - sigmas[i])
        return x


def prepare_sampling(model, noise_shape, conds, model_options=None):
    """``comfy.sampler_helpers.prepare_sampling``: the ``PREPARE_SAMPLING`` wrapper point."""
    return WrapperExecutor.new_executor(
        _prepare_sampling, get_all_wrappers(WrappersMP.PREPARE_SAMPLING, model_options or {}, is_model_options=True)
    ).execute(model, noise_shape, conds, model_options=model_options)


def _prepare_sampling(model, noise_shape, conds, model_options=None):
    return model.model, conds, []


class CFGGuider:
    def __init__(self, model_patcher):
        self.model_patcher = model_patcher
        self.model_options = model_patcher.model_options
        self.original_conds = {}
        self.conds = {}
        self.cfg = 1.0
        self.inner_model = model_patcher.model

    def set_conds(self, positive, negative):
        self.original_conds = {"positive": positive, "negative": negative}

    def set_cfg(self, cfg):
        self.cfg = cfg

    def __call__(self, *args, **kwargs):
        return self.outer_predict_noise(*args, **kwargs)

    def outer_predict_noise(self, x, timestep, model_options={}, seed=None):
        return WrapperExecutor.new_class_executor(
            self.predict_noise, self, get_all_wrappers(WrappersMP.PREDICT_NOISE, self.model_options, is_model_options=True)
        ).execute(x, timestep, model_options, seed)

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        return sampling_function(self.inner_model, x, timestep, self.conds.get("negative"), self.conds.get("positive"),
                                 self.cfg, model_options=model_options, seed=seed)

    def inner_sample(self, noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar, seed):
        if latent_image is not None and torch.count_nonzero(latent_image) > 0:
            latent_image = self.inner_model.process_latent_in(latent_image)
        self.conds = {k: process_conds(self.inner_model, v, noise) for k, v in self.original_conds.items()}
        extra_model_options = create_model_options_clone(self.model_options)
        extra_model_options.setdefault("transformer_options", {})["sample_sigmas"] = sigmas
        extra_args = {"model_options": extra_model_options, "seed": seed}
        samples = WrapperExecutor.new_class_executor(
            sampler.sample, sampler,
            get_all_wrappers(WrappersMP.SAMPLER_SAMPLE, extra_model_options, is_model_options=True)
        ).execute(self, sigmas, extra_args, callback, noise, latent_image, denoise_mask, disable_pbar)
        return self.inner_model.process_latent_out(samples.to(torch.float32))

    def outer_sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None,
                     disable_pbar=False, seed=None):
        converted = {k: [dict(d, cross_attn=t) for t, d in v] for k, v in self.original_conds.items() if v is not None}
        self.inner_model, _, self.loaded_models = prepare_sampling(self.model_patcher, noise.shape, converted,
                                                                   self.model_options)
        self.model_patcher.pre_run()
        try:
            return self.inner_sample(noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar, seed)
        finally:
            self.model_patcher.cleanup()

    def sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None, disable_pbar=True,
               seed=None):
        orig = self.model_options
        try:
            self.model_options = create_model_options_clone(self.model_options)
            to = self.model_options.setdefault("transformer_options", {})
            merge_nested_dicts(to.setdefault("wrappers", {}), self.model_patcher.wrappers, copy_dict1=False)
            merge_nested_dicts(to.setdefault("callbacks", {}), self.model_patcher.callbacks, copy_dict1=False)
            to_load = self.model_options.setdefault("to_load_options", {})
            for name in ("wrappers", "callbacks"):
                merge_nested_dicts(to_load.setdefault(name, {}), to[name], copy_dict1=False)
            return WrapperExecutor.new_class_executor(
                self.outer_sample, self,
                get_all_wrappers(WrappersMP.OUTER_SAMPLE, self.model_options, is_model_options=True)
            ).execute(noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar, seed)
        finally:
            self.model_options = orig


def prepare_noise(latent_image: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(latent_image.shape, generator=g, dtype=torch.float32)


def sample(patcher, latent, steps, cfg, positive, negative, seed=0, split_calls=False,
           disable_cfg1_optimization=False, callback=None):
    """Euler-sample ``latent`` (B, C, ...) with ComfyUI's batching/hook semantics; returns the latent.

    ``split_calls=True`` reproduces ComfyUI's memory-pressure path (separate ``[1]`` and ``[0]`` calls)
    the way the real-ComfyUI recorder forces it: ``model.memory_required`` reports a huge number.
    """
    model = patcher.model
    guider = CFGGuider(patcher)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    if disable_cfg1_optimization:
        guider.model_options = create_model_options_clone(patcher.model_options)
        guider.model_options["disable_cfg1_optimization"] = True
    sigmas = model.model_sampling.schedule(steps)
    noise = prepare_noise(latent, seed)
    if split_calls:
        model.memory_required = lambda *a, **k: 1e30
    try:
        return guider.sample(noise, latent, KSAMPLER(), sigmas, seed=seed)
    finally:
        if split_calls:
            del model.memory_required


def sample_tiny(patcher, family, steps=2, cfg=4.0, batch=1, split_calls=False, positive=None, negative=None,
                seed=0, disable_cfg1_optimization=False, latent=None):
    """Same signature as ``tests/real_comfy.sample_tiny``: sample the recorded-size latent of ``family``."""
    if positive is None or negative is None:
        p, n = conditioning(family, seed=seed)
        positive = p if positive is None else positive
        negative = n if negative is None else negative
    lat = empty_latent(family, batch) if latent is None else latent
    return sample(patcher, lat, steps, cfg, positive, negative, seed=seed, split_calls=split_calls,
                  disable_cfg1_optimization=disable_cfg1_optimization)


__all__ = ["CFGGuider", "KSAMPLER", "prepare_sampling", "CallbacksMP", "FREE_MEMORY", "LATENT_SHAPE", "calc_cond_batch", "cfg_function",
           "cond_cat", "prepare_noise", "process_conds", "sample", "sample_tiny", "sampling_function"]
