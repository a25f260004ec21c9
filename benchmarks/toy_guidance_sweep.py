"""Sampling-guidance sweep for a toy SD model on VALIDATION prompts (seeds 500 000…, never the evaluation's).

    HF_HUB_OFFLINE=1 python benchmarks/toy_guidance_sweep.py [MODEL_DIR|sd] [N] [g4,g2,g4_first60,...]

Prints single-object colour + shape, two-object, background style and colour rate per configuration.
"first40" / "first60": classifier-free guidance only on the first 40 % / 60 % of the steps; "_s50": 50 steps;
"_trailing" / "_karras" / "_sde": the DPM-Solver++ scheduler with trailing timestep spacing, Karras sigmas or the
SDE variant (a configuration's "scheduler" entry overrides the shipped scheduler config for that row only).
"""
import sys

import torch

from attnlab.toyworld.evaluate import evaluate
from attnlab.toyworld.models import load_toy_pipeline, toy_call_kwargs


class GuidanceOnlyEarly:
    """Step-end callback: guidance g until the given fraction of the run is done, then (nearly) none."""

    def __init__(self, g: float, until: float):
        self.g, self.until = g, until

    def __call__(self, pipe, i, t, kwargs):
        pipe._guidance_scale = self.g if (i + 1) / pipe.num_timesteps < self.until else 1.0 + 1e-6
        return {}


CONFIGS = {
    "g4": dict(guidance_scale=4.0),
    "g2": dict(guidance_scale=2.0),
    "g4_first60": dict(guidance_scale=4.0, callback_on_step_end=GuidanceOnlyEarly(4.0, 0.6)),
    "g4_first40": dict(guidance_scale=4.0, callback_on_step_end=GuidanceOnlyEarly(4.0, 0.4)),
    "g6_first40": dict(guidance_scale=6.0, callback_on_step_end=GuidanceOnlyEarly(6.0, 0.4)),
    "g2.5": dict(guidance_scale=2.5),
    "g3": dict(guidance_scale=3.0),
    "g3.5": dict(guidance_scale=3.5),
    "g5": dict(guidance_scale=5.0),
    "g4_s50": dict(guidance_scale=4.0, num_inference_steps=50),
    "g4_trailing": dict(guidance_scale=4.0, scheduler=dict(timestep_spacing="trailing")),
    "g4_karras": dict(guidance_scale=4.0, scheduler=dict(use_karras_sigmas=True)),
    "g4_sde": dict(guidance_scale=4.0, scheduler=dict(algorithm_type="sde-dpmsolver++")),
}


def main(argv):
    torch.set_num_threads(1)
    path = argv[0] if argv and argv[0] != "sd" else None
    n = int(argv[1]) if len(argv) > 1 else 50
    names = argv[2].split(",") if len(argv) > 2 else list(CONFIGS)
    unknown = [name for name in names if name not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configuration(s) {unknown}; choose from {list(CONFIGS)}")
    pipe = load_toy_pipeline("sd", path=path)
    shipped_scheduler = pipe.scheduler
    for name in names:
        config = dict(CONFIGS[name])
        overrides = config.pop("scheduler", None)
        pipe.scheduler = (type(shipped_scheduler).from_config(shipped_scheduler.config, **overrides)
                          if overrides else shipped_scheduler)
        kw = toy_call_kwargs("sd", **config)
        r = evaluate(pipe, n=n, seed_base=500_000, call_kwargs=kw, log=lambda *a: None)["generated"]
        print(f"{name}: single {r['single_colour_shape']:.2f} two {r['two_object_both']:.2f} "
              f"background {r['background_style']:.2f} colour {r['single_colour_only']:.2f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
