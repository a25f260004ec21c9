"""One denoiser forward at a chosen noise level through ComfyUI's own sampling machinery (model loading,
condition processing, wrappers, our attention patches), for methods that read the model rather than sample
it (RefAM). The "sampler" is a function that calls the model once and returns its input."""

from __future__ import annotations

import types

import torch


def comfy_samplers() -> types.ModuleType:
    """`comfy.samplers` (tests substitute the fake's sampling module)."""
    import comfy.samplers  # noqa: PLC0415 - only inside ComfyUI

    return comfy.samplers


def is_flow(model_sampling) -> bool:
    """True for rectified-flow models (x = (1-σ)·x0 + σ·ε), False for ε/v models (x = x0 + σ·ε)."""
    probe = model_sampling.noise_scaling(torch.tensor([0.5]), torch.zeros(1, 1), torch.ones(1, 1))
    return abs(float(probe.flatten()[0]) - 0.5) < 1e-6


def sigma_for(model_sampling, noise: float) -> float:
    """The model's sigma for a noise level in (0, 1): flow models σ itself (the diffusers convention, no shift);
    ε/v models the sigma of timestep round(noise · 999)."""
    if is_flow(model_sampling):
        return float(noise)
    t = torch.tensor([round(float(noise) * 999)], dtype=torch.float32)
    return float(model_sampling.sigma(t).flatten()[0])


def _call_once(model, x, sigmas, extra_args=None, callback=None, disable=None, **_):
    model(x, sigmas[0] * x.new_ones([x.shape[0]]), **(extra_args or {}))
    return x


def forward_once(patched, latent: torch.Tensor, positive, noise_level: float, seed: int = 0) -> None:
    """Noise `latent` (a LATENT's samples) to `noise_level` with the noise of `seed` and run the model once on
    `positive` at cfg 1 (the negative is never evaluated)."""
    samplers = comfy_samplers()
    ms = patched.get_model_object("model_sampling")
    sigma = sigma_for(ms, noise_level)
    guider = samplers.CFGGuider(patched)
    guider.set_conds(positive, positive)
    guider.set_cfg(1.0)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(int(seed)), dtype=torch.float32)
    sigmas = torch.tensor([sigma, 0.0], dtype=torch.float32)
    guider.sample(noise, latent, samplers.KSAMPLER(_call_once), sigmas, seed=int(seed))
