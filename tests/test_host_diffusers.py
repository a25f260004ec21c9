"""The diffusers host on tiny offline pipelines of every family: bit-exact pass-through, exact removal,
run state from the pipeline, layouts, backends, bad input."""

import pytest
import torch

import attnlab
from attnlab.models.tiny import FAMILIES, build_tiny_pipeline, denoiser_of, run_tiny_pipeline, tiny_call_kwargs
from attnlab.processors import Effect, EntropyScaling, Recorder
from attnlab.processors.host_diffusers import Session, UnsupportedModelError, apply, attention_sites
from attnlab.processors.reference import reference_attention


@pytest.fixture(scope="module", params=FAMILIES)
def pipe(request):
    return build_tiny_pipeline(request.param)


@pytest.fixture(scope="module")
def stock(pipe):
    return run_tiny_pipeline(pipe, output_type="latent")




class ExplicitMath(Effect):
    stage = "kernel"

    def __call__(self, call, attend):
        return reference_attention(call.q, call.k, call.v, call.mask, call.scale)


def native_options(pipe):
    """Wan has no native size in its config (the family default is 81x480x832); the tiny one runs at 5x128x128."""
    return {"native_size": (5, 128, 128)} if attention_sites(denoiser_of(pipe))[0].site.family == "wan" else {}


def processors_of(pipe):
    return {name: proc for name, proc in denoiser_of(pipe).attn_processors.items()}


def test_pass_through_is_bit_exact_and_removal_restores(pipe, stock):
    before = processors_of(pipe)
    with apply(pipe, []) as session:
        empty = run_tiny_pipeline(pipe, output_type="latent")
        assert len(session.sites) == len(before) and not session.skipped
    observer = Recorder()
    with apply(pipe, [observer]):
        observed = run_tiny_pipeline(pipe, output_type="latent")
    after = processors_of(pipe)
    assert torch.equal(empty, stock)
    assert torch.equal(observed, stock)
    assert observer.calls, "the stack never ran"
    assert all(after[k] is before[k] for k in before)
    assert not hasattr(denoiser_of(pipe), "_attnlab_run_state")
    assert torch.equal(run_tiny_pipeline(pipe, output_type="latent"), stock)


def test_explicit_math_kernel_matches_stock(pipe, stock):
    with apply(pipe, [ExplicitMath()]):
        out = run_tiny_pipeline(pipe, output_type="latent")
    scale = stock.abs().max().item()
    assert (out - stock).abs().max().item() <= 1e-5 * max(1.0, scale)


def test_exception_inside_block_restores(pipe, stock):
    before = processors_of(pipe)
    with pytest.raises(RuntimeError, match="boom"):
        with apply(pipe, [EntropyScaling(strength=2.0)]):
            raise RuntimeError("boom")
    assert all(processors_of(pipe)[k] is before[k] for k in before)
    assert torch.equal(run_tiny_pipeline(pipe, output_type="latent"), stock)


def test_failure_midway_through_install_leaves_nothing_patched(pipe, monkeypatch):
    before = processors_of(pipe)
    specs = attention_sites(denoiser_of(pipe))
    victim = specs[len(specs) // 2].module
    monkeypatch.setattr(victim, "set_processor", lambda p: (_ for _ in ()).throw(RuntimeError("midway")))
    with pytest.raises(RuntimeError, match="midway"):
        apply(pipe, [Recorder()])
    monkeypatch.undo()
    assert all(processors_of(pipe)[k] is before[k] for k in before)
    assert not hasattr(denoiser_of(pipe), "_attnlab_run_state")


def test_run_state_steps_and_roles_come_from_the_pipeline(pipe):
    observer = Recorder()
    family = attention_sites(denoiser_of(pipe))[0].site.family
    with apply(pipe, [observer]):
        run_tiny_pipeline(pipe, num_inference_steps=3, output_type="latent")
    first_layer = [c for c in observer.calls if c.site == observer.calls[0].site]
    steps = [c.step.index for c in first_layer]
    roles = [c.roles for c in first_layer]
    assert all(c.step.count == 3 for c in first_layer)
    assert all(c.step.sigma is not None and c.step.sigma >= 0 for c in first_layer)
    if family in ("unet", "sd3", "pixart"):  # CFG batched as cat([uncond, cond])
        assert steps == [0, 1, 2]
        assert roles == [("uncond", "cond")] * 3
    elif family == "flux":  # guidance-distilled: one cond forward per step
        assert steps == [0, 1, 2] and roles == [("cond",)] * 3
    else:  # Wan: cond and uncond as separate forwards, named by the pipeline's cache context
        assert steps == [0, 0, 1, 1, 2, 2]
        assert roles == [("cond",), ("uncond",)] * 3
    sigmas = [c.step.sigma for c in first_layer]
    assert sigmas == sorted(sigmas, reverse=True)


def test_explicit_roles_override(pipe):
    session = apply(pipe, [observer := Recorder()])
    try:
        family = session.state.geometry.family
        if family in ("flux", "wan"):
            pytest.skip("separate-forward pipelines: roles come from the cache context")
        with session.roles_for(["perturbed", "cond"]):
            run_tiny_pipeline(pipe, output_type="latent")
        assert {c.roles for c in observer.calls} == {("perturbed", "cond")}
        with pytest.raises(ValueError, match="unknown row roles"):
            with session.roles_for(["cond", "sideways"]):
                pass
    finally:
        session.remove()


def test_layouts_match_the_latent_geometry(pipe):
    observer = Recorder()
    with apply(pipe, [observer], **native_options(pipe)):
        run_tiny_pipeline(pipe, output_type="latent")
    for call in observer.calls:
        t = call.tokens
        if call.site.kind == "cross":
            assert t.k_text is not None and t.k_text.stop == call.kv_len
        assert t.grid is not None, call.site
        n_img = t.q_image.stop - t.q_image.start
        assert n_img == t.image_tokens
        assert t.native_grid == t.grid  # tiny pipelines run at their native size by default
        if call.site.kind in ("joint", "single"):
            assert t.q_text.stop - t.q_text.start + n_img == call.q_len
            assert t.text_first == (call.site.family == "flux")
        if call.rope is not None:
            assert call.rope.cos.shape[-2] == call.q_len


def test_entropy_native_size_is_bit_exact_and_other_sizes_change_output(pipe, stock):
    with apply(pipe, [EntropyScaling()], **native_options(pipe)):
        same = run_tiny_pipeline(pipe, output_type="latent")
    assert torch.equal(same, stock)
    with apply(pipe, [EntropyScaling(train_size=32)]):
        changed = run_tiny_pipeline(pipe, output_type="latent")
    assert not torch.equal(changed, stock)


def test_entropy_leaves_cross_attention_modules_untouched(pipe):
    denoiser = denoiser_of(pipe)
    cross = [s for s in attention_sites(denoiser) if s.site.kind == "cross"]
    if not cross:
        pytest.skip("no cross-attention in this family")
    module = cross[0].module
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 16, module.to_q.in_features, generator=g)
    context = torch.randn(2, 7, module.to_k.in_features, generator=g)
    stock_out = module(hidden, encoder_hidden_states=context)
    with apply(pipe, [EntropyScaling(train_size=32, strength=3.0)]) as session:
        assert not module.processor.stack
        assert torch.equal(module(hidden, encoder_hidden_states=context), stock_out)
        assert session.sites


def test_layer_indices_are_global_and_in_execution_order(pipe):
    specs = attention_sites(denoiser_of(pipe))
    family = specs[0].site.family
    layers = [s.site.layer for s in specs]
    assert layers == sorted(layers)
    if family == "unet":
        names = [s.name for s in specs if s.site.kind == "self"]
        sections = [n.split(".")[0] for n in names]
        assert sections == sorted(sections, key=("down_blocks", "mid_block", "up_blocks").index)
        assert [s.site.layer for s in specs if s.site.kind == "self"] == list(range(len(names)))
    if family == "flux":
        denoiser = denoiser_of(pipe)
        depth = len(denoiser.transformer_blocks)
        singles = [s for s in specs if s.site.kind == "single"]
        assert [s.site.layer for s in singles] == list(range(depth, depth + len(denoiser.single_transformer_blocks)))
        assert singles[0].name == "single_transformer_blocks.0.attn"


def test_nested_sessions_compose_and_remove_lifo(pipe, stock):
    outer_obs, inner_obs = Recorder(), Recorder()
    outer = apply(pipe, [outer_obs])
    inner = apply(pipe, [inner_obs])
    try:
        run_tiny_pipeline(pipe, output_type="latent")
        assert outer_obs.calls and len(inner_obs.calls) == len(outer_obs.calls)
        with pytest.raises(RuntimeError, match="LIFO"):
            outer.remove()
    finally:
        inner.remove()
        outer.remove()
    assert torch.equal(run_tiny_pipeline(pipe, output_type="latent"), stock)


def test_unsupported_model_raises_before_patching():
    with pytest.raises(UnsupportedModelError, match="supported"):
        apply(torch.nn.Linear(2, 2), [EntropyScaling()])
    with pytest.raises(UnsupportedModelError, match="unet/transformer"):
        apply(object(), [EntropyScaling()])


def test_bad_effect_raises_before_patching(pipe):
    before = processors_of(pipe)
    bad = Recorder()
    bad.stage = "whenever"
    with pytest.raises(ValueError, match="stage"):
        apply(pipe, [bad])
    assert all(processors_of(pipe)[k] is before[k] for k in before)


def test_bad_training_size_raises_before_patching(pipe):
    before = processors_of(pipe)
    with pytest.raises(ValueError, match="token grid"):
        apply(pipe, [EntropyScaling(train_size=(1000, 1001))])
    assert all(processors_of(pipe)[k] is before[k] for k in before)
    assert not hasattr(denoiser_of(pipe), "_attnlab_run_state")


def test_nested_session_cannot_change_the_geometry(pipe):
    outer = apply(pipe, [], native_size=(1, 256, 256))
    try:
        with pytest.raises(ValueError, match="native_size"):
            apply(pipe, [], native_size=(1, 512, 512))
        apply(pipe, []).remove()  # same (default) options are fine
    finally:
        outer.remove()


def test_public_api_is_lazy_and_complete():
    assert attnlab.apply is apply and attnlab.Session is Session


@pytest.mark.parametrize("family", ["flux", "wan"])
def test_set_attention_backend_still_reaches_our_processors(family):
    pipe = build_tiny_pipeline(family)
    denoiser = denoiser_of(pipe)
    stock = run_tiny_pipeline(pipe, output_type="latent")
    with apply(pipe, [Recorder()]):
        denoiser.set_attention_backend("_native_math")
        procs = [m.processor for m in denoiser.modules() if hasattr(m, "set_processor")]
        assert {str(p._attention_backend) for p in procs} == {"AttentionBackendName._NATIVE_MATH"}
        out = run_tiny_pipeline(pipe, output_type="latent")
    assert (out - stock).abs().max() < 1e-4


@pytest.mark.parametrize("family", ["sd15", "wan"])
def test_executed_steps_count_from_each_runs_first_step(family):
    """StepInfo.executed counts a run's own steps from 0: over two txt2img runs (Wan: from the cache context,
    SD: from the scheduler), and in an img2img run that starts part-way into its schedule."""
    pipe = build_tiny_pipeline(family)
    rec = Recorder(summary=lambda c: (c.step.index, c.step.first, c.step.executed))
    with attnlab.apply(pipe, [rec]):
        for _ in range(2):
            with torch.no_grad():
                pipe(**tiny_call_kwargs(family, num_inference_steps=3))
    assert sorted(set(rec.calls)) == [(0, 0, 0), (1, 0, 1), (2, 0, 2)]
    if family != "sd15":
        return
    from diffusers import StableDiffusionImg2ImgPipeline

    i2i = StableDiffusionImg2ImgPipeline.from_pipe(pipe)
    rec.calls.clear()
    kw = tiny_call_kwargs(family, num_inference_steps=4)
    image = torch.rand(1, 3, kw["height"], kw["width"], generator=torch.Generator().manual_seed(0))
    with attnlab.apply(i2i, [rec]), torch.no_grad():
        i2i(prompt=kw["prompt"], image=image, strength=0.5, num_inference_steps=4, output_type="pt",
            generator=torch.Generator().manual_seed(0))
    assert sorted(set(rec.calls)) == [(2, 2, 0), (3, 2, 1)]
