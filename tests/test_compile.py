"""torch.compile with attnlab installed (issue 16): no graph breaks (`torch._dynamo.explain` and
`fullgraph=True`), every frame compiled once over two runs, compiled output == eager output.

Compiles with the eager backend (`torch._dynamo.testing.CompileCounter`: traces like inductor would, then runs
the captured graph eagerly), so this stays a quick CPU test; inductor timings are in benchmarks/compile_bench.py.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo as dynamo
from torch._dynamo.testing import CompileCounter

import attnlab
from attnlab.models.tiny import FAMILIES, build_tiny_pipeline, default_size, output_tensor, tiny_call_kwargs
from attnlab.processors import EntropyScaling, Recorder

STEPS = 3
DENOISER = {"sd15": "unet", "sdxl": "unet"}


def denoiser_attr(family: str) -> str:
    return DENOISER.get(family, "transformer")


def call_kwargs(family: str) -> dict:
    """3 steps at 1.5x the native size (so entropy scaling really scales), latents out."""
    h, w = default_size(family)
    return tiny_call_kwargs(family, num_inference_steps=STEPS, output_type="latent",
                            height=h * 3 // 2 // 16 * 16, width=w * 3 // 2 // 16 * 16)


def native_options(family: str) -> dict:
    return {"native_size": (5, 128, 128)} if family == "wan" else {}


# --- the methods under test: name -> install(pipe, family) -> (object holding the denoiser, attribute, run) ---
def _session(effects):
    def install(pipe, family):
        attnlab.apply(pipe, effects(), **native_options(family))
        return pipe, denoiser_attr(family), lambda: output_tensor(pipe(**call_kwargs(family)))
    return install


def _softpag(pipe, family):
    sp = attnlab.SoftPAGPipeline(pipe, heads="L1:*", scale=2.0)
    return pipe, denoiser_attr(family), lambda: output_tensor(sp(**call_kwargs(family)))


def _eraser(pipe, family):
    from attnlab.pipelines.eraser import AttentiveEraserPipeline

    e = AttentiveEraserPipeline.from_pipe(pipe, sarg_scale=9.0, start_step=1)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(32, 32)
    mask[8:19, 10:21] = 1
    return e.inpaint, denoiser_attr(family), lambda: e(image, mask, num_inference_steps=STEPS, strength=1.0,
                                                        output_type="latent", generator=torch.Generator().manual_seed(1)).images


def _alignedgen(pipe, family):
    from attnlab.pipelines.alignedgen import AlignedGenPipeline

    ag = AlignedGenPipeline(pipe, steps=(0, 2), schedule="decrease")
    kw = {**call_kwargs(family), "prompt": ["a cat", "a dog"]}
    return pipe, denoiser_attr(family), lambda: output_tensor(ag(**{**kw, "generator": torch.Generator().manual_seed(0)}))


def _refam(pipe, family):
    from attnlab.pipelines.refam import RefAMPipeline
    from attnlab.toyworld.scenes import render, sample_scene

    seg = RefAMPipeline.from_pipe(pipe, sigmas=(0.3, 0.6))
    picture = render(sample_scene(3), 64)
    picture = [picture] * 5 if family == "wan" else picture
    return seg, "denoiser", lambda: seg(picture, "the small red circle", max_sequence_length=64).heatmap


def _freeswim(pipe, family):
    from attnlab.pipelines.freeswim import freeswim

    base = {"wan": (48, 48), "flux": (24, 24), "sd3": (32, 32), "sd15": (32, 32), "sdxl": (32, 32)}[family]
    swim = freeswim(pipe, base_size=base)
    swim.__enter__()  # left installed: the test's pipeline is thrown away
    kw = tiny_call_kwargs(family, num_inference_steps=STEPS, output_type="latent")
    return pipe, denoiser_attr(family), lambda: output_tensor(pipe(**{**kw, "generator": torch.Generator().manual_seed(0)}))


METHODS = {
    "host": _session(lambda: []),
    "noop": _session(lambda: [Recorder(summary=lambda call: None)]),
    "entropy": _session(lambda: [EntropyScaling()]),
    "softpag": _softpag,
    "eraser": _eraser,
    "alignedgen": _alignedgen,
    "refam": _refam,
    "freeswim": _freeswim,
}
#: every method on every family where it runs; the core ones on all six
CASES = ([(f, m) for m in ("host", "noop", "entropy", "softpag") for f in FAMILIES]
         + [(f, "eraser") for f in ("sd15", "sdxl", "sd3", "flux")]
         + [(f, "alignedgen") for f in ("sd15", "sd3", "flux", "wan")]
         + [(f, "refam") for f in ("sd15", "sd3", "flux", "wan")]
         + [(f, "freeswim") for f in ("sd15", "sd3", "flux", "wan")])
#: methods whose effects read the row roles: Wan runs cond and uncond as separate forwards (cache contexts),
#: which may then be two graphs (SoftPAG's extra pass follows the cond forward only); at most one per role set
READS_ROLES = {"softpag", "alignedgen", "freeswim"}


def graphs_per_run(family: str, method: str) -> int:
    return 2 if family == "wan" and method in READS_ROLES else 1


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    dynamo.reset()
    yield
    dynamo.reset()


@pytest.mark.parametrize("family,method", CASES)
def test_fullgraph_compiles_once_and_matches_eager(family, method):
    """fullgraph=True (so no graph break anywhere, run-state hooks included), each graph compiled in the first
    run only (no per-step recompiles, none in the second run), and compiled == eager."""
    pipe = build_tiny_pipeline(family)
    stock = None
    if method in ("host", "noop", "entropy", "softpag"):
        with torch.no_grad():
            stock = output_tensor(pipe(**call_kwargs(family)))
    holder, attr, run = METHODS[method](pipe, family)
    with torch.no_grad():
        eager = run()
        if stock is not None:
            assert torch.equal(eager, stock) == (method in ("host", "noop")), "the method should change the output"
        counter = CompileCounter()
        setattr(holder, attr, torch.compile(getattr(holder, attr), backend=counter, fullgraph=True))
        first = run()
        compiles = counter.frame_count
        second = run()
    assert 1 <= compiles <= graphs_per_run(family, method), f"{compiles} compiles in one {STEPS}-step run"
    assert counter.frame_count == compiles, "the second run recompiled"
    assert (first - eager).abs().max() <= 1e-5
    assert (second - eager).abs().max() <= 1e-5


@pytest.mark.parametrize("family,method", [(f, m) for f, m in CASES if f in ("sd15", "flux") and m != "noop"])
def test_no_graph_breaks_in_one_forward(family, method):
    """`torch._dynamo.explain` of the run's first denoiser forward, in the middle of a real run."""
    pipe = build_tiny_pipeline(family)
    holder, attr, run = METHODS[method](pipe, family)
    den = getattr(holder, attr)
    reports = []

    def explain_first(module, args, kwargs):
        handle.remove()
        reports.append(dynamo.explain(module)(*args, **kwargs))

    handle = den.register_forward_pre_hook(explain_first, with_kwargs=True)
    with torch.no_grad():
        run()
    (report,) = reports
    assert report.graph_break_count == 0, report.break_reasons
    assert report.graph_count == 1


def _regional_run(pipe, family, holder, attr, run):
    """compile_repeated_blocks (diffusers' regional compile) on the denoiser; (outputs of two runs, compiles in
    the first run, compiles in the second)."""
    dynamo.reset()
    counter = CompileCounter()
    getattr(holder, attr).compile_repeated_blocks(backend=counter, fullgraph=True)
    with torch.no_grad():
        first = run()
        compiles = counter.frame_count
        second = run()
    return first, second, compiles, counter.frame_count - compiles


@pytest.mark.parametrize("family,method", [(f, m) for f in ("sd15", "flux", "wan") for m in ("host", "entropy", "softpag")])
def test_compile_repeated_blocks(family, method):
    """Regional compile: the run-state hook stays eager, the blocks (with our processors) are compiled with
    fullgraph=True; no compiles in the second run, compiled == eager; the pass-through host compiles exactly as
    often as stock (block instances share one graph). Effects that differ per site (SoftPAG on one layer) or per
    level (entropy's λ on a UNet) add one graph per distinct site or level, never per step."""
    pipe = build_tiny_pipeline(family)
    holder, attr, run = METHODS[method](pipe, family)
    with torch.no_grad():
        eager = run()
    first, second, compiles, again = _regional_run(pipe, family, holder, attr, run)
    assert again == 0, "the second run recompiled"
    assert (first - eager).abs().max() <= 1e-5 and (second - eager).abs().max() <= 1e-5
    if method == "host":
        stock = build_tiny_pipeline(family)
        name = denoiser_attr(family)
        _, _, stock_compiles, _ = _regional_run(stock, family, stock, name,
                                                lambda: output_tensor(stock(**call_kwargs(family))))
        assert compiles == stock_compiles


# --- ComfyUI: TorchCompileModel stacked with our nodes ------------------------------------------------------------
from comfy_pass_tools import parametrize_backends, tiny  # noqa: E402

import real_comfy  # noqa: E402

COMFY_FAMILIES = ("sd15", "sdxl", "sd3", "flux", "wan_t2v")
COMFY_HEADS = {"sd15": "d1, m0:H1", "sdxl": "m0; u0", "sd3": "L1:H0", "flux": "L0:*; L3:H1", "wan_t2v": "L1:*"}


def torch_compile_model(backend, model, compiler, fullgraph=True):
    """ComfyUI's TorchCompileModel node on a clone of `model`: `set_torch_compile_wrapper` (real ComfyUI), or
    for the fake the same APPLY_MODEL wrapper that swaps `diffusion_model` for its compiled self."""
    m = model.clone()
    if backend is real_comfy:
        from comfy_api.torch_helpers import set_torch_compile_wrapper

        set_torch_compile_wrapper(model=m, backend=compiler, fullgraph=fullgraph)
        return m
    compiled = torch.compile(m.get_model_object("diffusion_model"), backend=compiler, fullgraph=fullgraph)

    def wrapper(executor, *args, **kwargs):
        original = executor.class_obj.diffusion_model
        executor.class_obj.diffusion_model = compiled
        try:
            return executor(*args, **kwargs)
        finally:
            executor.class_obj.diffusion_model = original

    m.add_wrapper_with_key(backend.WrappersMP.APPLY_MODEL, "torch.compile", wrapper)
    return m


def pytorch_attention(backend, model):
    """A clone whose attention is ComfyUI's "pytorch" backend (SDPA), as on a GPU install, chained below our
    override as a foreign override: ComfyUI's CPU default (sub-quadratic attention) asks psutil for free memory
    on every call, which no torch.compile graph can hold, with or without attnlab."""
    attention = (real_comfy.import_comfy().attention if backend is real_comfy else backend.attention)
    pytorch = attention.get_attention_function("pytorch")
    m = model.clone()
    options = m.model_options.setdefault("transformer_options", {})
    options["optimized_attention_override"] = lambda func, *args, **kwargs: pytorch(*args, **kwargs)
    return m


def comfy_method(method, model, family):
    if method == "softpag":
        from attnlab.nodes.softpag import SOFTPAG

        return SOFTPAG.execute(model=model, heads=COMFY_HEADS[family], scale=3.0, u=1.0, preset="none",
                               target="identity", joint="full", sigma_start=-1.0, sigma_end=-1.0,
                               adaptive_scale=0.0)[0]
    from attnlab.processors.host_comfy import patch_model

    return patch_model(model, {"noop": [Recorder(summary=lambda call: None)], "entropy": [EntropyScaling()]}[method])


@parametrize_backends
@pytest.mark.parametrize("method", ["noop", "entropy", "softpag"])
@pytest.mark.parametrize("family", COMFY_FAMILIES)
def test_comfy_torch_compile_model_with_our_nodes(backend, family, method):
    """TorchCompileModel after our node: fullgraph, compiled in the first run only (SoftPAG's extra pass has a
    batch of its own: one more graph), compiled == eager."""
    model = comfy_method(method, pytorch_attention(backend, tiny(backend, family, {})), family)
    with torch.no_grad():
        eager = backend.sample_tiny(model, family, steps=STEPS)
        counter = CompileCounter()
        compiled = torch_compile_model(backend, model, counter)
        first = backend.sample_tiny(compiled, family, steps=STEPS)
        compiles = counter.frame_count
        second = backend.sample_tiny(compiled, family, steps=STEPS)
    assert 1 <= compiles <= (2 if method == "softpag" else 1), f"{compiles} compiles in one run"
    assert counter.frame_count == compiles, "the second run recompiled"
    assert (first - eager).abs().max() <= 1e-5 and (second - eager).abs().max() <= 1e-5


@parametrize_backends
def test_comfy_our_node_after_torch_compile_model(backend):
    """The other order: TorchCompileModel first, then our node on its output."""
    model = pytorch_attention(backend, tiny(backend, "sd15", {}))
    counter = CompileCounter()
    compiled = comfy_method("entropy", torch_compile_model(backend, model, counter), "sd15")
    with torch.no_grad():
        eager = backend.sample_tiny(comfy_method("entropy", model, "sd15"), "sd15", steps=STEPS)
        first = backend.sample_tiny(compiled, "sd15", steps=STEPS)
        second = backend.sample_tiny(compiled, "sd15", steps=STEPS)
    assert counter.frame_count == 1
    assert (first - eager).abs().max() <= 1e-5 and (second - eager).abs().max() <= 1e-5


@pytest.mark.comfyui
@pytest.mark.skipif(not real_comfy.comfy_available(), reason="needs COMFYUI_DIR with ComfyUI importable")
def test_comfy_node_defaults_on_the_cpu_attention():
    """The node as users run it on CPU (fullgraph off, ComfyUI's sub-quadratic attention, which breaks the graph
    by itself): runs, equals eager, and the second run compiles nothing."""
    model = comfy_method("entropy", tiny(real_comfy, "sd15", {}), "sd15")
    counter = CompileCounter()
    compiled = torch_compile_model(real_comfy, model, counter, fullgraph=False)
    with torch.no_grad():
        eager = real_comfy.sample_tiny(model, "sd15", steps=STEPS)
        first = real_comfy.sample_tiny(compiled, "sd15", steps=STEPS)
        compiles = counter.frame_count
        second = real_comfy.sample_tiny(compiled, "sd15", steps=STEPS)
    assert counter.frame_count == compiles
    assert (first - eager).abs().max() <= 1e-5 and (second - eager).abs().max() <= 1e-5
