"""SoftPAGGuider inside diffusers' modular SD3 pipeline (tiny offline components)."""

import pytest
import torch

from attnlab.models.tiny import build_tiny_pipeline
from attnlab.processors.host_diffusers.processors import _HostProcessor

modular = pytest.importorskip("diffusers.modular_pipelines")
from diffusers.guiders import ClassifierFreeGuidance  # noqa: E402

from attnlab.pipelines.softpag_guider import SoftPAGGuider  # noqa: E402


@pytest.fixture(scope="module")
def rig():
    pipe = build_tiny_pipeline("sd3")
    mp = modular.StableDiffusion3AutoBlocks().init_pipeline()
    comps = {k: v for k, v in pipe.components.items() if v is not None and k not in ("image_encoder", "feature_extractor")}
    record = []

    def hook(module, args, kwargs, output):
        uses_ours = any(isinstance(m.processor, _HostProcessor) for m in module.modules() if hasattr(m, "processor"))
        record.append({"text": kwargs["encoder_hidden_states"].clone(), "out": output[0].clone(), "ours": uses_ours})

    pipe.transformer.register_forward_hook(hook, with_kwargs=True)

    def run(guider, steps=2):
        mp.update_components(guider=guider, **comps)
        record.clear()
        latents = mp(prompt="a cat on a chair", negative_prompt="blurry", num_inference_steps=steps, height=64, width=64,
                     generator=torch.Generator().manual_seed(0), output="latents", max_sequence_length=32)
        return latents, list(record)

    return pipe, run


def test_scale_zero_is_plain_cfg_bit_for_bit(rig):
    _, run = rig
    cfg, calls_cfg = run(ClassifierFreeGuidance(guidance_scale=4.0))
    off, calls_off = run(SoftPAGGuider(guidance_scale=4.0, perturbed_guidance_scale=0.0, heads="L1:*"))
    assert torch.equal(cfg, off)
    assert len(calls_cfg) == len(calls_off) == 4
    assert not any(c["ours"] for c in calls_off)


def test_one_perturbed_conditional_pass_per_step_from_step_zero(rig):
    pipe, run = rig
    stock = {n: type(m.processor) for n, m in pipe.transformer.named_modules() if hasattr(m, "processor")}
    latents, calls = run(SoftPAGGuider(guidance_scale=4.0, perturbed_guidance_scale=2.0, heads="L1:H0,H2", u=0.7))
    assert len(calls) == 6  # (cond, uncond, perturbed) x 2 steps: step 0 included (stock guider skips it)
    assert [c["ours"] for c in calls] == [False, False, True] * 2
    for step in range(2):
        cond, uncond, ptb = calls[3 * step: 3 * step + 3]
        assert torch.equal(ptb["text"], cond["text"]) and not torch.equal(uncond["text"], cond["text"])
        assert not torch.equal(ptb["out"], cond["out"])
    assert {n: type(m.processor) for n, m in pipe.transformer.named_modules() if hasattr(m, "processor")} == stock
    assert torch.isfinite(latents).all()


def test_without_cfg_the_perturbed_pass_is_conditional(rig):
    _, run = rig
    _, calls = run(SoftPAGGuider(guidance_scale=1.0, perturbed_guidance_scale=2.0, heads="L1:*"))
    assert [c["ours"] for c in calls] == [False, True] * 2
    assert torch.equal(calls[0]["text"], calls[1]["text"])


def test_window_is_inclusive_and_bounds_the_passes(rig):
    _, run = rig
    _, calls = run(SoftPAGGuider(guidance_scale=4.0, perturbed_guidance_scale=2.0, heads="L1:*",
                                 perturbed_guidance_start=0.0, perturbed_guidance_stop=0.0), steps=3)
    assert [c["ours"] for c in calls] == [False, False, True, False, False, False, False]


def test_combination_formula():
    g = SoftPAGGuider(guidance_scale=4.0, perturbed_guidance_scale=2.5, heads="L0:*")
    g.set_state(step=0, num_inference_steps=10, timestep=torch.tensor(999))
    c, u, p = (torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    assert torch.equal(g.forward(c, u, p).pred, u + 4.0 * (c - u) + 2.5 * (c - p))
    g1 = SoftPAGGuider(guidance_scale=1.0, perturbed_guidance_scale=2.5, heads="L0:*")
    g1.set_state(step=0, num_inference_steps=10, timestep=torch.tensor(999))
    assert torch.equal(g1.forward(c, None, p).pred, c + 2.5 * (c - p))


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="heads"):
        SoftPAGGuider(heads="")
    with pytest.raises(ValueError, match="u must be"):
        SoftPAGGuider(heads="L0:*", u=1.5)
    with pytest.raises(ValueError, match="cannot read"):
        SoftPAGGuider(heads="L0:Q1")


def test_out_of_range_layer_raises_before_the_pass_patches_anything(rig):
    pipe, run = rig
    with pytest.raises(ValueError, match="layer 9 is out of range"):
        run(SoftPAGGuider(guidance_scale=4.0, perturbed_guidance_scale=2.0, heads="L9:*"))
    assert not any(isinstance(m.processor, _HostProcessor) for m in pipe.transformer.modules() if hasattr(m, "processor"))
