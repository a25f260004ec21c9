"""Shared by the tests of guidance-pass nodes (SoftPAG, Attentive Eraser) on the fake and the real ComfyUI:
the backend parametrisation (the `backend` fixture is registered for all tests through conftest's
`pytest_plugins`), the tiny-model cache lookup and a log of calc_cond_batch calls."""

import pytest

import fake_comfy
import real_comfy
from attnlab.processors.effects import Effect
from attnlab.processors.host_comfy import ROLE_KEY
from attnlab.processors.host_comfy import guidance as guidance_module

REAL = pytest.mark.skipif(not real_comfy.comfy_available(), reason="needs COMFYUI_DIR with ComfyUI importable")


def backends():
    return [pytest.param(fake_comfy, id="fake"),
            pytest.param(real_comfy, id="real", marks=[pytest.mark.comfyui, REAL])]


@pytest.fixture
def backend(request, monkeypatch):
    """The backend; the fake's calc_cond_batch stands in for `comfy.samplers.calc_cond_batch` (the real
    backend uses the guidance module's own lazy import of ComfyUI)."""
    b = request.param
    if b is fake_comfy:
        monkeypatch.setattr(guidance_module, "comfy_calc_cond_batch", lambda: fake_comfy.calc_cond_batch)
    return b


def parametrize_backends(fn):
    return pytest.mark.parametrize("backend", backends(), indirect=True)(fn)


def tiny(backend, family, cache):
    """The tiny model of `family`, built once per backend (tests only patch clones of it)."""
    key = (backend.NAME, family)
    if key not in cache:
        cache[key] = backend.build_tiny(family)
    return cache[key]


def record_batches(patcher, backend, outputs=False):
    """Log of every calc_cond_batch call on `patcher`: (number of conds, uncond present, role, sigma[, outputs])."""
    log = []

    def wrapper(executor, model, conds, x_in, timestep, model_options):
        out = executor(model, conds, x_in, timestep, model_options)
        role = model_options.get("transformer_options", {}).get(ROLE_KEY)
        entry = (len(conds), len(conds) > 1 and conds[1] is not None, role, float(timestep.flatten()[0]))
        log.append(entry + ((list(out),) if outputs else ()))
        return out

    patcher.add_wrapper_with_key(backend.WrappersMP.CALC_COND_BATCH, "attnlab_test", wrapper)
    return log


def guided_passes(patched, backend, family, role, steps, cfg):
    """Sample with the guidance node(s) on `patched`; returns (outputs of ComfyUI's own cond/uncond calls,
    outputs of the extra passes with `role`, what a later post-CFG function receives as "denoised"), per step."""
    log = record_batches(patched, backend, outputs=True)
    results = []

    def after(args):  # a later post-CFG function sees our result as "denoised"
        results.append(args["denoised"])
        return args["denoised"]

    patched.set_model_sampler_post_cfg_function(after)
    backend.sample_tiny(patched, family, steps=steps, cfg=cfg)
    normal = [o for *_, r, _, o in log if r is None]
    extra = [o for *_, r, _, o in log if r == role]
    return normal, extra, results


class Probe(Effect):
    """Records (call, output of the stages below) per call, at `stage` ("observe": after every other effect;
    "kernel": what the stages above hand down). Shared by the clones ComfyUI deep-copies."""

    name = "probe"

    def __init__(self, stage):
        self.stage = stage
        self.calls = []

    def __call__(self, call, attend):
        out = attend(call.q, call.k, call.v)
        self.calls.append((call, out))
        return out

    def __deepcopy__(self, memo):
        return self
