"""attnlab under diffusers' context parallelism: two processes on loopback (gloo, CPU), tiny FLUX and Wan.

Every effect, Ulysses and ring, installed before and after `enable_parallelism`, against the same effect on one
process (fp32, ≤ 1e-5); the method pipelines end to end; an unsupported configuration refused on every rank;
processors restored with the model's current backend and parallel configuration. Scenarios and the process
launcher live in cp_scenarios.py / cp_worker.py (with the two CPU shims diffusers 0.42.1 needs).
"""

from __future__ import annotations

import pytest
import torch

import attnlab
from attnlab.models.tiny import build_tiny_pipeline
from attnlab.processors.entropy import EntropyScaling

from cp_scenarios import compare, names_for, pipelines_for, refusal
from cp_worker import launch

pytestmark = [pytest.mark.cp,
              pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                 reason="needs torch.distributed with gloo")]

TOLERANCE = 1e-5
#: scenarios that leave the output as stock (read-only, or nothing installed at run time)
UNCHANGED = {"noop", "refam", "restore"}


def _check(results, names, orders=("after", "before")):
    for rank, errors in enumerate(results):
        for name in names:
            for order in orders:
                assert errors[(name, order)] <= TOLERANCE, (rank, name, order, errors[(name, order)])
            effect = errors.get((name, "effect"))
            if effect is not None and name not in UNCHANGED:
                assert effect > 1e-4, f"{name} does not change the output on this tiny model; the check proves nothing"


@pytest.mark.parametrize("mode", ["ulysses", "ring"])
@pytest.mark.parametrize("family", ["flux", "wan"])
def test_every_effect_exact_under_context_parallelism(family, mode):
    names = names_for(family)
    _check(launch(compare, 2, family, mode, names), names)


@pytest.mark.parametrize("mode", ["ulysses", "ring"])
@pytest.mark.parametrize("family", ["flux", "wan"])
def test_method_pipelines_under_context_parallelism(family, mode):
    names = ["stock", *pipelines_for(family)]
    _check(launch(compare, 2, family, mode, names, ("after",)), names, ("after",))


@pytest.mark.parametrize("order", ["after", "before"])
def test_unsupported_split_refused_on_every_rank(order):
    messages = launch(refusal, 2, order, timeout=120)
    assert all("even context-parallel split" in m for m in messages), messages


def test_backend_set_during_a_session_survives_its_removal():
    pipe = build_tiny_pipeline("flux")
    model = pipe.transformer
    with attnlab.apply(pipe, [EntropyScaling(train_size=(32, 32))]):
        model.set_attention_backend("_native_math")
    for module in model.modules():
        processor = getattr(module, "processor", None)
        if processor is not None and hasattr(processor, "_attention_backend"):
            assert type(processor).__name__ == "FluxAttnProcessor"
            assert str(getattr(processor._attention_backend, "value", processor._attention_backend)) == "_native_math"


# --- HeadHunter across processes ------------------------------------------------------------------------
def test_headhunter_search_shared_by_processes_matches_one_process_and_resumes(tmp_path):
    from attnlab.processors.headhunter import load_state, search

    from cp_scenarios import HH_CANDIDATES, additive, headhunter_search

    reference = search(HH_CANDIDATES, additive, 2, 2, progress=False)
    state = tmp_path / "state.json"
    stopped = launch(headhunter_search, 2, str(state), "L1:H1", timeout=120)
    assert all(r.get("error") for r in stopped)  # one process failed: all of them stop, none hangs
    saved = load_state(state)
    done_before = len(saved["current"]["scores"])
    assert 0 < done_before < len(HH_CANDIDATES)
    resumed = launch(headhunter_search, 2, str(state), timeout=120)
    assert [tuple(p) for p in resumed[0]["order"]] == reference.order == [tuple(p) for p in resumed[1]["order"]]
    assert resumed[0]["resumed"] == done_before
    calls = len(resumed[0]["scored"]) + len(resumed[1]["scored"])
    assert calls == len(HH_CANDIDATES) - done_before + len(HH_CANDIDATES) - 2  # nothing scored twice
    assert load_state(state)["done"] is True


def test_headhunter_pipeline_across_processes_writes_one_result(tmp_path):
    from cp_scenarios import headhunter_pipeline

    results = launch(headhunter_pipeline, 2, str(tmp_path / "hh"), timeout=180)
    assert results[0]["order"] == results[1]["order"] and len(results[0]["order"]) == 2
    assert (tmp_path / "hh" / "headset.json").is_file() and (tmp_path / "hh" / "state.json").is_file()
    assert (tmp_path / "hh" / "validation.png").is_file()


def test_headhunter_cli_under_torchrun(tmp_path):
    """The command docs/scale_out.md gives: `torchrun --nproc_per_node=2 -m attnlab.cli headhunter ...` (gloo on CPU)."""
    import json
    import os
    import shutil
    import subprocess
    import sys

    from cp_worker import free_port

    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    if torchrun is None:
        pytest.skip("torchrun is not installed beside this Python")
    out = tmp_path / "hh"
    cmd = [torchrun, "--nproc_per_node=2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "-m", "attnlab.cli", "headhunter", "--model", "tiny-flux", "--steps", "2", "--rounds", "1", "--top-k", "1",
           "--max-candidates", "4", "--threads", "1", "--out", str(out), "--quiet", "--no-validation"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    state = json.loads((out / "state.json").read_text())
    assert state["done"] is True and len(state["rounds"][0]["scores"]) == 4  # every candidate scored once, one file
    assert (out / "headset.json").is_file()
