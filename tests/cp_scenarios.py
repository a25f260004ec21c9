"""What the context-parallel tests run on each process: every effect on tiny FLUX and Wan pipelines, once on a
single process (the reference) and once under context parallelism, with attnlab installed before or after
`enable_parallelism`. A scenario is ``scenario(pipe, family, ready) -> {name: tensor}``; it calls `ready()`
once its effects are installed and before the pipeline runs (the "before" order enables parallelism there).
"""

from __future__ import annotations

import contextlib
import copy

import torch

import attnlab
from attnlab.processors.alignedgen import AlignedGen
from attnlab.processors.effects import Recorder
from attnlab.processors.entropy import EntropyScaling
from attnlab.processors.eraser import AttentiveEraser
from attnlab.processors.freeswim import freeswim_effects
from attnlab.processors.host_diffusers.dual_pass import dual_pass
from attnlab.processors.refam import TextMaps
from attnlab.processors.softpag import SoftPAG

from cp_worker import call_kwargs, enable_cp, fresh_denoiser, max_error, native_lse, tiny_pipe

SMALL_BASE = {"wan": (48, 48), "flux": (24, 24)}
TRAIN_SIZE = {"wan": (5, 64, 64), "flux": (32, 32)}
ALL_LAYERS = {"wan": "0-1", "flux": "0-3"}


def run(pipe, family, **overrides) -> torch.Tensor:
    with torch.no_grad():
        out = pipe(**call_kwargs(family, **overrides))
    return out.frames if family == "wan" else out.images


def _mask() -> torch.Tensor:
    mask = torch.zeros(64, 64)
    mask[16:40, 8:36] = 1
    return mask


def stock(pipe, family, ready):
    ready()
    return {"out": run(pipe, family)}


def with_effects(make, roles=None, **call_overrides):
    """A scenario that installs `make(family)` with `attnlab.apply` (rows of role `roles` when given)."""
    def scenario(pipe, family, ready):
        with attnlab.apply(pipe, make(family)) as session:
            ready()
            with session.roles_for(roles) if roles else contextlib.nullcontext():
                return {"out": run(pipe, family, **call_overrides)}

    return scenario


def freeswim(pipe, family, ready):
    with dual_pass(pipe, freeswim_effects(base_size=SMALL_BASE[family], backend="chunked")) as (_, hooks):
        ready()
        out = run(pipe, family)
    assert hooks[0].full_rows > 0
    return {"out": out}


def refam(pipe, family, ready):
    rec = TextMaps()
    with attnlab.apply(pipe, [rec]):
        ready()
        out = run(pipe, family)
    assert rec.maps, "RefAM recorded no maps"
    return {"out": out, **{f"map {key}": m for key, m in rec.maps.items()}}


def refam_suppress(pipe, family, ready):
    rec = TextMaps(gas_mode="suppress", gas_mass=0.0, gas_cv=10.0)
    with attnlab.apply(pipe, [rec]):
        ready()
        out = run(pipe, family)
    return {"out": out, **{f"map {key}": m for key, m in rec.maps.items()},
            **{f"sinks {key}": torch.tensor(v, dtype=torch.float32) for key, v in rec.sinks.items()}}


def restore(pipe, family, ready):
    """A session removed after parallelism was enabled: the processors put back keep its configuration."""
    with attnlab.apply(pipe, [EntropyScaling(train_size=TRAIN_SIZE[family])]):
        ready()
    return {"out": run(pipe, family)}


SCENARIOS = {
    "stock": stock,
    "noop": with_effects(lambda f: [Recorder(summary=lambda c: None)]),
    "entropy": with_effects(lambda f: [EntropyScaling(train_size=TRAIN_SIZE[f])]),
    "softpag_identity_u1": with_effects(lambda f: [SoftPAG(f"L{ALL_LAYERS[f]}:*")], roles="perturbed"),
    "softpag_identity": with_effects(lambda f: [SoftPAG("L0:*; L1:H1", u=0.5)], roles="perturbed"),
    "softpag_uniform": with_effects(lambda f: [SoftPAG("L0:H0; L1:*", u=0.7, target="uniform")], roles="perturbed"),
    "softpag_mean_query": with_effects(lambda f: [SoftPAG("L1:H1", u=0.6, target="mean_query")], roles="perturbed"),
    "softpag_max_fisher": with_effects(lambda f: [SoftPAG("L0:H1", u=0.4, target="max", path="fisher_rao")],
                                       roles="perturbed"),
    "softpag_joint_image": with_effects(lambda f: [SoftPAG("L0:*; L1:H1", joint="image")], roles="perturbed"),
    "eraser_gather": with_effects(lambda f: [AttentiveEraser(_mask(), layers="L" + ALL_LAYERS[f])], roles="redirected"),
    "eraser_bias": with_effects(lambda f: [AttentiveEraser(_mask(), layers="L" + ALL_LAYERS[f], kernel="bias")], roles="redirected"),
    "freeswim": freeswim,
    "alignedgen": with_effects(lambda f: [AlignedGen(layers=ALL_LAYERS[f])],
                               prompt=["a red cat on a chair", "a blue dog in a garden"]),
    "refam": refam,
    "refam_suppress": refam_suppress,
    "restore": restore,
}

#: scenarios that only make sense for one family
ONLY = {"softpag_joint_image": ("flux",)}


def names_for(family: str) -> list[str]:
    return [n for n in SCENARIOS if family in ONLY.get(n, (family,)) and n not in PIPELINES]


def compare(rank: int, world: int, family: str, mode: str, names, orders=("after", "before")) -> dict:
    """Max abs error of every scenario under context parallelism against the same scenario on one process."""
    torch.manual_seed(0)
    pipe = tiny_pipe(family)
    pristine = copy.deepcopy(pipe.transformer)
    errors, stock_out = {}, None
    with native_lse() if mode == "ring" else contextlib.nullcontext():
        for name in names:
            scenario = SCENARIOS[name]
            fresh_denoiser(pipe, pristine)
            reference = scenario(pipe, family, lambda: None)
            if name == "stock":
                stock_out = reference["out"]
            elif stock_out is not None:  # how much the effect changes the output (the check must prove something)
                same_shape = reference["out"].shape == stock_out.shape
                errors[(name, "effect")] = max_error(reference["out"], stock_out) if same_shape else float("inf")
            for order in orders:
                model = fresh_denoiser(pipe, pristine)
                enable = lambda: enable_cp(model, mode, world)  # noqa: E731
                if order == "after":
                    enable()
                    result = scenario(pipe, family, lambda: None)
                else:
                    result = scenario(pipe, family, enable)
                errors[(name, order)] = max_error(result, reference)
    return errors


def refusal(rank: int, world: int, order: str) -> str:
    """An unsupported context-parallel configuration (uneven split) with effects: the error every rank raises."""
    pipe = tiny_pipe("flux")
    enable = lambda: enable_cp(pipe.transformer, "ulysses", world, ulysses_anything=True)  # noqa: E731
    try:
        if order == "after":
            enable()
        with attnlab.apply(pipe, [EntropyScaling(train_size=TRAIN_SIZE["flux"])]):
            if order == "before":
                enable()
            run(pipe, "flux")
    except ValueError as exc:
        return str(exc)
    return "no error"


# --- the method pipelines, end to end ---------------------------------------------------------------------
def freeswim_pipeline(pipe, family, ready):
    from attnlab.pipelines.freeswim import FreeSwimPipeline

    swim = FreeSwimPipeline.from_pipe(pipe, base_size=SMALL_BASE[family], cache_steps=2)
    ready()
    kw = call_kwargs(family)
    for key in ("height", "width", "output_type", "num_inference_steps"):
        kw.pop(key)
    with torch.no_grad():
        out = swim(height=64, width=64, num_inference_steps=3, output_type="latent", **kw)
    assert swim.extra_passes > 0
    return {"out": out.frames if family == "wan" else out.images}


def softpag_pipeline(pipe, family, ready):
    from attnlab.pipelines.softpag import SoftPAGPipeline

    pag = SoftPAGPipeline.from_pipe(pipe, heads="L0:*; L1:H1", scale=2.0, u=0.8)
    ready()
    with torch.no_grad():
        out = pag(**call_kwargs(family))
    return {"out": out.frames if family == "wan" else out.images}


def alignedgen_pipeline(pipe, family, ready):
    from attnlab.pipelines.alignedgen import AlignedGenPipeline

    aligned = AlignedGenPipeline.from_pipe(pipe, layers=ALL_LAYERS[family])
    ready()
    kw = call_kwargs(family)
    kw.pop("prompt")
    prompts = ["a red cat on a chair", "a blue dog in a garden"]
    with torch.no_grad():
        out = aligned(prompts, **kw)
        plain = pipe(**call_kwargs(family, prompt=prompts))
    out, plain = (o.frames if family == "wan" else o.images for o in (out, plain))
    assert max_error(out[1:], plain[1:]) > 1e-4, "the shared attention does not change the second image"
    return {"out": out}


def eraser_pipeline(pipe, family, ready):
    from attnlab.pipelines.eraser import AttentiveEraserPipeline

    eraser = AttentiveEraserPipeline.from_pipe(pipe, sarg_scale=3.0, ss_steps=1, layers="L" + ALL_LAYERS[family])
    ready()
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = eraser(image, _mask(), prompt="a photo of a garden", num_inference_steps=3, output_type="latent",
                     generator=torch.Generator().manual_seed(0), max_sequence_length=call_kwargs(family)[
                         "max_sequence_length"])
    assert eraser.hooks, "the SARG pass was not installed"
    return {"out": out.images}


SCENARIOS.update(freeswim_pipeline=freeswim_pipeline, softpag_pipeline=softpag_pipeline,
                 alignedgen_pipeline=alignedgen_pipeline, eraser_pipeline=eraser_pipeline)
PIPELINES = ("freeswim_pipeline", "softpag_pipeline", "alignedgen_pipeline", "eraser_pipeline")
ONLY["eraser_pipeline"] = ("flux",)  # the Eraser runs on SD/SDXL/SD3/FLUX inpaint pipelines, not Wan


def pipelines_for(family: str) -> list[str]:
    return [n for n in PIPELINES if family in ONLY.get(n, (family,))]


# --- HeadHunter across processes ----------------------------------------------------------------------------
HH_CANDIDATES = [(layer, head) for layer in range(3) for head in range(4)]


def additive(heads) -> float:
    """A separable score with a known best order (as tests/test_headhunter.py's)."""
    return sum((layer + 1) * 0.1 + head * 0.01 for layer, head in heads.pairs({0: 4, 1: 4, 2: 4}))


def headhunter_search(rank: int, world: int, state_path: str, fail_on=None) -> dict:
    """The search shared by the processes; `fail_on` (a head key) makes the process scoring it raise."""
    from attnlab.pipelines.headhunter import join_processes
    from attnlab.processors.headhunter import head_key, search

    scored = []

    def score(heads):
        pairs = heads.pairs({0: 4, 1: 4, 2: 4})
        scored.append(pairs)
        if fail_on is not None and len(pairs) == 1 and head_key(pairs[0]) == fail_on:
            raise ValueError("stopped")
        return additive(heads)

    try:
        result = search(HH_CANDIDATES, score, 2, 2, state_path=state_path, config={"objective": "additive"},
                        progress=False, workers=join_processes())
    except (ValueError, RuntimeError) as exc:
        return {"error": type(exc).__name__, "scored": scored}
    return {"order": result.order, "scored": scored, "resumed": result.resumed_scores}


def headhunter_pipeline(rank: int, world: int, out_dir: str) -> dict:
    from attnlab.pipelines.headhunter import join_processes, run_headhunter

    pipe = tiny_pipe("flux")
    result, files = run_headhunter(pipe, ["a red apple"], [0, 1], "contrast", out_dir, top_k=1, rounds=2, steps=1,
                                   layers=[1], progress=False, validation=True, workers=join_processes())
    return {"order": result.order, "preset": str(files["preset"]), "evaluated": result.evaluated}
