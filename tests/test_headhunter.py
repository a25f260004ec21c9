"""HeadHunter search (spec softpag_headhunter.md §1.5): the greedy algorithm on synthetic scorers,
resumability, config checks, objectives, and the `attnlab headhunter` CLI on a tiny offline model."""

import json
import math

import pytest
import torch
from PIL import Image

from attnlab.cli import main
from attnlab.models.tiny import build_tiny_pipeline, default_size, tiny_call_kwargs
from attnlab.pipelines.headhunter import (PipelineScorer, candidate_heads, colorfulness, contrast, load_objective,
                                          run_headhunter, sharpness)
from attnlab.pipelines.softpag import SoftPAGPipeline
from attnlab.processors.headhunter import SearchConfigMismatch, head_key, load_state, search
from attnlab.processors.headsets import HeadSet
from attnlab.processors.presets import FORMAT, load_preset

CANDIDATES = [(layer, head) for layer in range(4) for head in range(4)]
# additive weights with a known order; the four best are (2,1) > (0,3) > (3,0) > (1,2)
WEIGHTS = {p: 0.01 * (i % 7) for i, p in enumerate(CANDIDATES)}
WEIGHTS.update({(2, 1): 5.0, (0, 3): 4.0, (3, 0): 3.0, (1, 2): 2.0})


class Additive:
    """score(S) = sum of the weights of S; counts calls and remembers every set it scored."""

    def __init__(self, fail_after=None):
        self.calls = []
        self.fail_after = fail_after

    def __call__(self, heads: HeadSet) -> float:
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        pairs = heads.pairs({layer: 4 for layer in heads.layers})
        self.calls.append(tuple(sorted(pairs)))
        return sum(WEIGHTS[p] for p in pairs)


_PIPES = {}


def _pipe(family):
    """One tiny pipeline per family for the tests that only read it (the scorer leaves it unpatched);
    uncalibrated attention, which builds much faster (calibration runs the pipeline)."""
    if family not in _PIPES:
        _PIPES[family] = build_tiny_pipeline(family, attention_logit_std=None)
    return _PIPES[family]


def pairs_of(heads: HeadSet):
    return sorted(heads.pairs({layer: 64 for layer in heads.layers}))


# ------------------------------------------------------------------------------------------- algorithm


def test_known_best_heads_selected_topk_and_rounds_respected():
    scorer = Additive()
    result = search(CANDIDATES, scorer, top_k=2, rounds=2, progress=False)
    assert result.order == [(2, 1), (0, 3), (3, 0), (1, 2)]
    assert pairs_of(result.selected) == sorted(result.order)
    assert [r["added"] for r in result.rounds] == [[[2, 1], [0, 3]], [[3, 0], [1, 2]]]
    assert len(scorer.calls) == 16 + 14  # every remaining candidate once per round
    # round 2 scores each candidate together with round 1's selection
    assert all({(2, 1), (0, 3)} <= set(c) and len(c) == 3 for c in scorer.calls[16:])
    assert result.rounds[1]["added_scores"][0] == pytest.approx(5.0 + 4.0 + 3.0)
    assert result.round_scores == [pytest.approx(5.0 + WEIGHTS[(0, 0)]), pytest.approx(12.0)]
    assert len(result.order) == len(set(result.order))


def test_greedy_uses_the_current_set_and_never_selects_twice():
    # (1, 1) is only good together with (0, 0): greedy finds it in round 2
    def score(heads):
        pairs = set(pairs_of(heads))
        value = 1.0 if (0, 0) in pairs else 0.0
        return value + (10.0 if {(0, 0), (1, 1)} <= pairs else 0.0) - 0.001 * len(pairs)

    result = search([(1, 1), (0, 0), (0, 1)], score, top_k=1, rounds=5, progress=False)
    assert result.order == [(0, 0), (1, 1), (0, 1)]
    assert len(result.rounds) == 3  # candidates ran out before round 5


def test_ties_keep_candidate_order_and_nan_ranks_last():
    values = {(0, 0): float("nan"), (0, 1): 1.0, (0, 2): 1.0, (0, 3): 0.5}

    def score(heads):
        return sum(values[p] for p in pairs_of(heads))

    result = search(list(values), score, top_k=3, rounds=1, progress=False)
    assert result.order == [(0, 1), (0, 2), (0, 3)]
    assert result.rounds[0]["scores"][head_key((0, 0))] is None


def test_topk_larger_than_pool_takes_all():
    result = search([(0, 0), (0, 1)], Additive(), top_k=5, rounds=3, progress=False)
    assert sorted(result.order) == [(0, 0), (0, 1)] and len(result.rounds) == 1


@pytest.mark.parametrize("kwargs, match", [
    (dict(top_k=0), "top_k must be an integer >= 1"),
    (dict(top_k=1.5), "top_k must be an integer >= 1"),
    (dict(rounds=0), "rounds must be an integer >= 1"),
    (dict(candidates=[]), "no candidate heads"),
    (dict(candidates=[(0, -1)]), "negative"),
])
def test_bad_search_arguments(kwargs, match):
    args = dict(candidates=CANDIDATES, score=Additive(), top_k=2, rounds=1, progress=False)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        search(**args)


# ------------------------------------------------------------------------------------------ resumability


@pytest.mark.parametrize("fail_after", [5, 16, 20])
def test_resume_skips_scored_candidates_and_gives_the_same_result(tmp_path, fail_after):
    reference = search(CANDIDATES, Additive(), top_k=2, rounds=2, progress=False)
    state = tmp_path / "state.json"
    first = Additive(fail_after=fail_after)
    with pytest.raises(KeyboardInterrupt):
        search(CANDIDATES, first, top_k=2, rounds=2, state_path=state, config={"objective": "x"}, progress=False)
    saved = load_state(state)
    scored = sum(len(r["scores"]) for r in saved["rounds"]) + len((saved["current"] or {}).get("scores", {}))
    assert scored == fail_after
    second = Additive()
    result = search(CANDIDATES, second, top_k=2, rounds=2, state_path=state, config={"objective": "x"}, progress=False)
    assert len(second.calls) == 30 - fail_after  # nothing scored twice
    assert not set(first.calls) & set(second.calls)
    assert result.order == reference.order
    assert [(r["added"], r["scores"]) for r in result.rounds] == [(r["added"], r["scores"]) for r in reference.rounds]
    assert result.resumed_scores == (fail_after if fail_after < 16 else fail_after - 16)
    # a finished search reruns without scoring anything
    third = Additive()
    again = search(CANDIDATES, third, top_k=2, rounds=2, state_path=state, config={"objective": "x"}, progress=False)
    assert third.calls == [] and again.order == reference.order
    assert load_state(state)["done"] is True


def test_validation_runs_once_per_round_and_resumes(tmp_path):
    seen = []

    def validate(heads, index):
        seen.append((index, str(heads)))
        if index == 2 and len(seen) == 3:
            raise KeyboardInterrupt
        return {"score": float(index)}

    state = tmp_path / "state.json"
    with pytest.raises(KeyboardInterrupt):
        search(CANDIDATES, Additive(), top_k=1, rounds=2, state_path=state, validate=validate, progress=False)
    scorer = Additive()
    result = search(CANDIDATES, scorer, top_k=1, rounds=2, state_path=state, validate=validate, progress=False)
    assert scorer.calls == []  # both rounds were already scored; only the last validation was missing
    assert seen == [(0, ""), (1, "L2:H1"), (2, "L0:H3; L2:H1"), (2, "L0:H3; L2:H1")]
    assert [v["score"] for v in result.validation] == [0.0, 1.0, 2.0]


def test_config_mismatch_is_an_error_unless_restart(tmp_path):
    state = tmp_path / "state.json"
    search(CANDIDATES, Additive(), top_k=2, rounds=1, state_path=state, config={"u": 1.0}, progress=False)
    with pytest.raises(SearchConfigMismatch, match=r"differs in: top_k.*--restart"):
        search(CANDIDATES, Additive(), top_k=3, rounds=1, state_path=state, config={"u": 1.0}, progress=False)
    with pytest.raises(SearchConfigMismatch, match=r"differs in: u"):
        search(CANDIDATES, Additive(), top_k=2, rounds=1, state_path=state, config={"u": 0.5}, progress=False)
    scorer = Additive()
    result = search(CANDIDATES, scorer, top_k=3, rounds=1, state_path=state, config={"u": 1.0}, restart=True,
                    progress=False)
    assert len(scorer.calls) == 16 and len(result.order) == 3
    state.write_text("{not json")
    with pytest.raises(ValueError, match="not a valid HeadHunter state file"):
        search(CANDIDATES, Additive(), top_k=3, rounds=1, state_path=state, progress=False)


# ------------------------------------------------------------------------------------------- objectives


def test_builtin_objectives():
    flat = Image.new("RGB", (32, 32), (128, 128, 128))
    checker = Image.fromarray(((torch.arange(32)[:, None] + torch.arange(32)[None]) % 2 * 255).to(torch.uint8).numpy()).convert("RGB")
    red = Image.new("RGB", (32, 32), (255, 0, 0))
    assert sharpness(flat) == 0.0 and sharpness(checker) > 1000.0
    assert colorfulness(flat) == 0.0 and colorfulness(red) > colorfulness(checker)
    assert contrast(flat) == 0.0 and contrast(checker) == pytest.approx(0.5, abs=1e-6)
    for name in ("sharpness", "colorfulness", "contrast"):
        assert math.isfinite(load_objective(name)(checker, "any prompt"))


def test_objective_from_module_and_file(tmp_path, monkeypatch):
    (tmp_path / "my_objectives.py").write_text(
        "import numpy as np\n"
        "def brightness(image, prompt):\n    return float(np.asarray(image.convert('L')).mean())\n"
        "class Box:\n    @staticmethod\n    def width(image, prompt):\n        return float(image.width)\n"
        "NOT_CALLABLE = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    white = Image.new("RGB", (8, 8), "white")
    assert load_objective("my_objectives:brightness")(white, "p") == 255
    assert load_objective("my_objectives:Box.width")(white, "p") == 8.0
    assert load_objective(f"{tmp_path / 'my_objectives.py'}:brightness")(white, "p") == 255
    with pytest.raises(ValueError, match="has no attribute 'nope'"):
        load_objective("my_objectives:nope")
    with pytest.raises(ValueError, match="not callable"):
        load_objective("my_objectives:NOT_CALLABLE")
    with pytest.raises(ValueError, match="cannot import module"):
        load_objective("no_such_module_xyz:f")


@pytest.mark.parametrize("spec", ["nonsense", "", "clip:/no/such/dir"])
def test_unknown_objective_is_a_clear_error(spec):
    with pytest.raises(ValueError, match="sharpness|objective|not a local directory"):
        load_objective(spec)


def test_clip_objective_with_a_tiny_random_clip(tmp_path):
    import importlib.util

    stub = importlib.util.find_spec("torchvision")
    if stub is not None and "comfy_stubs" in (stub.origin or ""):
        pytest.skip("torchvision is the test-only stub here (real-ComfyUI run); CLIP preprocessing needs the real one")
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from attnlab.models.offline_tokenizers import clip_token_ids, make_clip_tokenizer

    small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(text_config=dict(small, max_position_embeddings=77, **clip_token_ids()),
                        vision_config=dict(small, image_size=32, patch_size=8), projection_dim=8)
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=make_clip_tokenizer(77))
    model.save_pretrained(tmp_path / "clip")
    processor.save_pretrained(tmp_path / "clip")
    objective = load_objective(f"clip:{tmp_path / 'clip'}")
    image = Image.new("RGB", (48, 40), (200, 30, 30))
    value = objective(image, "a red square")
    inputs = processor(text=["a red square"], images=[image], return_tensors="pt", padding="max_length", max_length=77)
    with torch.no_grad():
        expected = model(**inputs).logits_per_image[0, 0].item()
    assert value == pytest.approx(expected, rel=1e-4, abs=1e-4)
    assert objective(image, "a blue circle") != value


# ------------------------------------------------------------------------------------- diffusers side


def test_candidates_of_tiny_models():
    pipe = _pipe("sd3")
    assert candidate_heads(pipe) == [(layer, h) for layer in range(3) for h in range(4)]
    assert candidate_heads(pipe, layers=[2]) == [(2, h) for h in range(4)]
    assert candidate_heads(pipe, layers=[1, 2], max_candidates=5) == [(1, 0), (1, 1), (1, 2), (1, 3), (2, 0)]
    with pytest.raises(ValueError, match="layers: 7 is out of range.*0-2"):
        candidate_heads(pipe, layers=[7])
    flux = _pipe("flux")  # double blocks 0-1 and single blocks 2-3
    assert sorted({layer for layer, _ in candidate_heads(flux)}) == [0, 1, 2, 3]


@pytest.mark.parametrize("family", ["sd15", "flux", "wan"])
def test_scorer_runs_every_kind_of_pipeline(family):
    pipe = _pipe(family)
    fixed = {k: v for k, v in tiny_call_kwargs(family).items() if k in ("max_sequence_length",)}
    scorer = PipelineScorer(pipe, ["a cat"], [0], "contrast", steps=1, frames=5, size=default_size(family),
                            call_kwargs=fixed)
    heads = HeadSet.from_pairs([candidate_heads(pipe)[0]])
    base, guided = scorer(HeadSet()), scorer(heads)
    assert math.isfinite(base) and math.isfinite(guided) and base != guided
    assert scorer.generations == 2
    kwargs = scorer.call_arguments("a cat", 0)
    assert ("guidance_scale" not in kwargs) if family == "flux" else kwargs["guidance_scale"] == 0.0


def test_run_headhunter_with_a_module_objective(tmp_path, monkeypatch):
    (tmp_path / "obj_mod.py").write_text("import numpy as np\ndef mean_red(image, prompt):\n"
                                         "    return float(np.asarray(image.convert('RGB'))[..., 0].mean())\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    pipe = build_tiny_pipeline("pixart")
    fixed = {k: v for k, v in tiny_call_kwargs("pixart").items()
             if k in ("max_sequence_length", "use_resolution_binning", "clean_caption")}
    result, files = run_headhunter(pipe, ["a red apple"], [0, 1], "obj_mod:mean_red", tmp_path / "out", top_k=1,
                                   rounds=2, steps=1, layers=[1], progress=False, call_kwargs=fixed, validation=False)
    assert len(result.order) == 2 and {layer for layer, _ in result.order} == {1}
    preset = load_preset(files["preset"])
    assert preset["search"]["config"]["objective"] == "obj_mod:mean_red"
    assert preset["search"]["config"]["candidates"] == "L1:H0,H1,H2,H3"
    with pytest.raises(ValueError, match="prompts"):
        run_headhunter(pipe, [], [0], "contrast", tmp_path / "o2")
    with pytest.raises(ValueError, match="top_k"):
        run_headhunter(pipe, ["x"], [0], "contrast", tmp_path / "o3", top_k=0)
    with pytest.raises(ValueError, match="u must be in"):
        run_headhunter(pipe, ["x"], [0], "contrast", tmp_path / "o4", u=0.0)


# -------------------------------------------------------------------------------------------------- CLI


def _cli(tmp_path, *extra):
    return ["headhunter", "--model", "tiny:sd3", "--objective", "sharpness", "--prompts", "a red cube",
            "--prompts", str(tmp_path / "prompts.txt"), "--seeds", "0", "--steps", "1", "--top-k", "2",
            "--rounds", "2", "--layers", "1-2", "--out", str(tmp_path / "hh"), "--quiet", *extra]


def test_cli_end_to_end_writes_a_loadable_preset(tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text("# style prompts\na blue bird\n\n")
    assert main(_cli(tmp_path)) == 0
    report = json.loads(capsys.readouterr().out.split("\nwrote ")[0])
    out = tmp_path / "hh"
    preset = load_preset(out / "headset.json")
    assert preset["format"] == FORMAT and preset["family"] == "sd3" and preset["u"] == 1.0 and preset["scale"] == 3.0
    selected = HeadSet.parse(preset["heads"])
    assert len(pairs_of(selected)) == 4 and str(selected) == report["heads"]
    search_record = preset["search"]
    assert search_record["config"]["prompts"] == ["a red cube", "a blue bird"]
    assert search_record["config"]["candidates"] == "L1:H0,H1,H2,H3; L2:H0,H1,H2,H3"
    assert [len(r["scores"]) for r in search_record["rounds"]] == [8, 6]
    assert search_record["cost"]["generations"] == 2 * (8 + 6) + 2 * 3  # scoring + validation
    assert [v["label"] for v in search_record["validation"]] == ["baseline", "round1", "round2"]
    for v in search_record["validation"]:
        assert all((out / f).is_file() for f in v["files"]) and len(v["files"]) == 2
    assert (out / "validation.png").is_file() and (out / "state.json").is_file()

    # the preset drives SoftPAG on a fresh copy of the model
    pipe = build_tiny_pipeline("sd3")
    pag = SoftPAGPipeline.from_pipe(pipe, preset=out / "headset.json")
    kwargs = tiny_call_kwargs("sd3", guidance_scale=0.0)
    with torch.no_grad():
        guided = pag(**kwargs).images
        plain = pipe(**tiny_call_kwargs("sd3", guidance_scale=0.0)).images
    assert pag.extra_passes == kwargs["num_inference_steps"] and not torch.equal(guided, plain)

    # rerun: resumes from the finished state, nothing generated
    assert main(_cli(tmp_path)) == 0
    assert json.loads(capsys.readouterr().out.split("\nwrote ")[0])["generations"] == 0
    # another config on the same folder: clear error, then --restart
    assert main(_cli(tmp_path, "--u", "0.5")) == 2
    assert "differs in: u" in capsys.readouterr().err
    assert main(_cli(tmp_path, "--u", "0.5", "--rounds", "1", "--max-candidates", "2", "--no-validation",
                     "--restart")) == 0
    assert load_preset(out / "headset.json")["u"] == 0.5


@pytest.mark.parametrize("extra, message", [
    (["--objective", "nonsense"], "--objective: unknown objective 'nonsense'"),
    (["--prompts", ""], "--prompts: empty prompt"),
    (["--prompts", "EMPTYFILE"], "the file has no prompts"),
    (["--top-k", "0"], "argument --top-k: must be an integer in [1, 10000]; got 0"),
    (["--rounds", "0"], "argument --rounds: must be an integer in [1, 10000]; got 0"),
    (["--scale", "0"], "argument --scale: must be a finite number in (0, 100]; got 0"),
    (["--layers", "9"], "layers: 9 is out of range"),
    (["--seeds", "x"], "expected integers"),
    (["--threads", "0"], "argument --threads: must be an integer in [1, 1024]; got 0"),
    (["--model", "tiny:nope"], "unknown tiny model; choose one of tiny:sd15"),
])
def test_cli_bad_inputs(tmp_path, capsys, extra, message):
    (tmp_path / "prompts.txt").write_text("a blue bird\n")
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    extra = [str(tmp_path / "empty.txt") if e == "EMPTYFILE" else e for e in extra]
    try:
        code = main(_cli(tmp_path, *extra))
    except SystemExit as e:  # argparse's own errors
        code = e.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "hh" / "headset.json").exists()
