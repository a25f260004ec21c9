"""Toy-world trained models (issue 8): shipped weights load offline and generate fast; the training code runs,
saves, resumes and reloads (tiny sizes); the word-level toy tokenizer round-trips.

The quality numbers themselves come from ``python -m attnlab.toyworld.evaluate`` (too slow for a unit test);
see docs/toyworld.md.
"""

import json
import time

import numpy as np
import pytest
import torch

from attnlab.toyworld import caption, sample_scene
from attnlab.toyworld.models import (available_toy_models, load_toy_pipeline, toy_call_kwargs, toy_image_size,
                                     toy_model_dir)
from attnlab.toyworld.train import GRAMMAR_WORDS, TEXT_MAX_LENGTH, make_toy_clip_tokenizer, make_toy_t5_tokenizer, train


def test_toy_tokenizer_words_are_single_tokens_and_round_trip(tmp_path):
    from transformers import CLIPTokenizer

    tok = make_toy_clip_tokenizer()
    for w in GRAMMAR_WORDS:
        assert len(tok(w).input_ids) == 3, w  # bos, word, eos
    tok.save_pretrained(tmp_path)
    back = CLIPTokenizer.from_pretrained(tmp_path)
    for s in range(50):
        c = caption(sample_scene(s))
        ids = tok(c).input_ids
        assert back(c).input_ids == ids
        assert len(ids) <= tok.model_max_length
    assert len(tok("a fluffy dog").input_ids) > 3  # unknown words still tokenize (byte fallback)


def test_toy_t5_tokenizer_keeps_whole_captions(tmp_path):
    """The FLUX toy model's T5 sees every caption whole: grammar words are one piece each (the generic
    in-memory vocabulary splits "circle" into four and most captions overflowed 32 tokens)."""
    from transformers import T5Tokenizer

    tok = make_toy_t5_tokenizer()
    for w in GRAMMAR_WORDS:
        assert len(tok(w).input_ids) == 2, w  # word, </s>
    tok.save_pretrained(tmp_path)
    back = T5Tokenizer.from_pretrained(tmp_path)
    longest = 0
    for s in range(300):
        c = caption(sample_scene(s, n_objects=4))
        ids = tok(c).input_ids
        assert back(c).input_ids == ids
        longest = max(longest, len(ids))
    assert longest <= TEXT_MAX_LENGTH
    assert len(tok("a fluffy dog").input_ids) > 3  # other text still tokenizes


def test_missing_weights_give_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="attnlab.toyworld.train"):
        load_toy_pipeline("sd", path=tmp_path / "nothing")
    with pytest.raises(ValueError, match="unknown toy model"):
        toy_model_dir("sdxl")
    assert toy_model_dir("toy-sd") == toy_model_dir("sd")


def test_sd_model_is_shipped():
    assert "sd" in available_toy_models(), f"no weights in {toy_model_dir('sd')}"


@pytest.mark.parametrize("name", ["sd", "flux"])
def test_shipped_model_loads_offline_and_generates_fast(name, monkeypatch):
    if name not in available_toy_models():
        pytest.skip(f"toy model {name!r} not shipped (no weights in {toy_model_dir(name)})")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.time()
    pipe = load_toy_pipeline(name)
    kw = toy_call_kwargs(name)
    img = pipe("a large red circle on a plain white background", generator=torch.Generator().manual_seed(0),
               **kw).images[0]
    elapsed = time.time() - t0
    side = toy_image_size(name)
    assert img.size == (side, side)
    arr = np.asarray(img)
    assert arr.std() > 1.0  # not a constant image
    assert elapsed < 10.0, f"load + generate took {elapsed:.1f} s"
    # Default call (no size given) gives the native size too.
    if name == "sd":
        assert pipe.unet.config.sample_size * pipe.vae_scale_factor == side
    total = sum(f.stat().st_size for f in toy_model_dir(name).rglob("*") if f.is_file())
    assert total < 40 * 2**20


@pytest.mark.parametrize("arch", ["sd", "flux"])
def test_training_smoke_saves_resumes_and_reloads(arch, tmp_path):
    out, state = tmp_path / "model", tmp_path / "state"
    kw = dict(vae_steps=3, vae_batch=4, batch=4, size=32, tiny=True, state_dir=state, ckpt_every=2, threads=1, lr=2e-3,
              background_dropout=0.5)
    t0 = time.time()
    r1 = train(arch, out, steps=4, **kw)
    assert (out / "model_index.json").is_file() and np.isfinite(r1["final_loss_avg"])
    info = json.loads((out / "training.json").read_text())
    assert info["steps_done"] == 4 and info["arch"] == arch
    r2 = train(arch, out, steps=6, resume=True, **kw)  # continues from the step-4 checkpoint
    assert json.loads((out / "training.json").read_text())["steps_done"] == 6
    assert np.isfinite(r2["final_loss_avg"])
    pipe = load_toy_pipeline(arch, path=out)
    extra = {"max_sequence_length": 32} if arch == "flux" else {}
    img = pipe("a small blue star on a plain gray background", height=32, width=32, num_inference_steps=2,
               generator=torch.Generator().manual_seed(0), **extra).images[0]
    assert img.size == (32, 32)
    assert time.time() - t0 < 20


def test_decoder_tuning_moves_only_the_decoder(tmp_path):
    """toyworld.decoder_tune: the decoder learns from the denoiser's own latents; encoder, UNet and text encoder
    (the latent space and everything that reads it) stay bit-identical, and the copy loads and generates."""
    from safetensors.torch import load_file

    from attnlab.toyworld.decoder_tune import tune_decoder

    base = tmp_path / "model"
    train("sd", base, steps=2, vae_steps=2, vae_batch=4, batch=4, size=32, tiny=True, state_dir=tmp_path / "state",
          ckpt_every=2, threads=1)
    run = tune_decoder(base, tmp_path / "tuned", steps=2, batch=4, lr=1e-2, t_max=200, threads=1, log_every=100)
    assert np.isfinite(run["final_loss_avg"])

    def weights(folder, part):
        return load_file(str(next((folder / part).glob("*.safetensors"))))

    for part in ("unet", "text_encoder"):
        a, b = weights(base, part), weights(tmp_path / "tuned", part)
        assert all(torch.equal(a[k], b[k]) for k in a)
    a, b = weights(base, "vae"), weights(tmp_path / "tuned", "vae")
    assert all(torch.equal(a[k], b[k]) for k in a if not k.startswith(("decoder.", "post_quant_conv.")))
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("decoder."))
    info = json.loads((tmp_path / "tuned" / "training.json").read_text())
    assert info["decoder_tune"][-1]["steps"] == 2 and info["steps_done"] == 2
    img = load_toy_pipeline("sd", path=tmp_path / "tuned")("a small blue star on a plain gray background", height=32,
                                                            width=32, num_inference_steps=2).images[0]
    assert img.size == (32, 32)


@pytest.mark.skipif("sd" not in available_toy_models(), reason="models/toy/sd has no weights")
def test_evaluate_scores_generated_strict_vae_and_clean():
    from attnlab.toyworld.evaluate import evaluate, format_table

    pipe = load_toy_pipeline("sd")
    res = evaluate(pipe, n=2, batch=4, call_kwargs=toy_call_kwargs("sd", num_inference_steps=2), log=lambda *_: None)
    for key in ("generated", "generated_strict_edges", "vae_roundtrip", "clean_renders"):
        assert res[key]["n_single"] == 2 and res[key]["n_two"] == 2
    assert res["clean_renders"]["single_colour_shape"] == 1.0 and res["clean_renders"]["background_style"] == 1.0
    assert set(res["passes_bar"]) == {"single_colour_shape", "two_object_both", "two_object_relation_of_hits", "background_style"}
    assert set(res["passes_floor"]) == {"single_colour_shape", "two_object_both", "background_style"}
    assert "VAE" in format_table(res).splitlines()[0]


@pytest.mark.parametrize("arch", ["sd", "flux"])
def test_training_configs_fit_comfyui_model_classes(arch):
    """What the training builds can be built by ComfyUI's own classes (32-group norms, >= 32-channel VAE
    blocks with mid attention, one UNet head width, FLUX RoPE axes filling the head), so a loader can follow."""
    from attnlab.toyworld.models import comfy_incompatibilities
    from attnlab.toyworld.train import Recipe, specs

    assert comfy_incompatibilities(specs(arch)) == []
    assert comfy_incompatibilities(specs(arch, recipe=Recipe(vae_factor=2, latent_channels=4))) == []
    old = {"vae": {"norm_num_groups": 16, "block_out_channels": [16, 32, 64]},
           "unet": {"norm_num_groups": 8, "block_out_channels": [32, 64, 128], "attention_head_dim": [2, 4, 4]}}
    assert len(comfy_incompatibilities(old)) == 4  # the models shipped before toy world v2


def test_recipe_study_runs_score_checkpoints_and_plot(tmp_path):
    """The recipe study (toyworld.recipe): a VAE run and a denoiser run on it, each scored on validation
    scenes at every checkpoint, and their learning curves plotted (tiny sizes)."""
    from attnlab.toyworld import recipe

    kw = dict(study_dir=tmp_path, tiny=True)
    v = recipe.run_vae("v", factor=2, latent_channels=4, steps=2, batch=2, lr=1e-3, kl_weight=1e-6, size=32,
                       threads=1, eval_every=2, n_val=2, object_weight=10.0, **kw)
    assert [r["step"] for r in v["curve"]] == [2] and 0 <= v["curve"][0]["objects_medium_large"] <= 1
    folder = recipe.save_vae_folder("v", tmp_path / "vae_v", factor=2, latent_channels=4, size=32, **kw)
    assert json.loads((folder / "training.json").read_text())["vae_latent_stats"]["std"] > 0
    d = recipe.run_denoiser("d", "sd", vae_from=str(folder), n_val=1, eval_every=2, steps=2, batch=2, size=32,
                            vae_factor=2, latent_channels=4, threads=1, **kw)
    assert [r["step"] for r in d["curve"]] == [2] and 0 <= d["curve"][0]["background_style"] <= 1
    recipe.plot([str(tmp_path / "v.json")], str(tmp_path / "v.png"), ("objects_medium_large",))
    recipe.plot([str(tmp_path / "d.json")], str(tmp_path / "d.png"), ("single_colour_shape", "background_style"))
    assert (tmp_path / "v.png").stat().st_size > 1000 and (tmp_path / "d.png").stat().st_size > 1000


# The shipped SD model's level on a fixed prompt set (evaluation seeds 0..QUALITY_N-1, one- and two-object, the
# default sampling settings, guidance 2.5): measured 15/16 single-object, 16/16 colour, 12/16 two-object, 27/32
# background style for the v9 model of 2026-12-06 (docs/toyworld.md; v8 drew 15/16 two-object scenes here). The floors
# sit one prompt under that, so the test fails when a change to the model, the pipeline code or the parser loses
# more. NOT issue 15's floor (80 / 50 / 90 % on 200 held-out prompts), which the model does not reach yet; raise
# these with every better model.
QUALITY_N = 16
QUALITY_FLOOR = {"single_colour_shape": 14 / 16, "single_colour_only": 15 / 16, "two_object_both": 11 / 16,
                 "background_style": 26 / 32}


@pytest.mark.skipif("sd" not in available_toy_models(), reason="models/toy/sd has no weights")
def test_shipped_sd_model_keeps_its_prompt_adherence():
    from attnlab.toyworld.evaluate import evaluate

    t0 = time.time()
    pipe = load_toy_pipeline("sd")
    res = evaluate(pipe, n=QUALITY_N, batch=2 * QUALITY_N, call_kwargs=toy_call_kwargs("sd"), log=lambda *_: None)
    got = res["generated"]
    for key, floor in QUALITY_FLOOR.items():
        assert got[key] >= floor, f"{key}: {got[key]:.3f} < {floor} on the fixed prompt set"
    assert res["vae_roundtrip"]["background_style"] >= 0.9 and res["vae_roundtrip"]["single_colour_only"] >= 0.95
    assert time.time() - t0 < 30


@pytest.mark.skipif("sd" not in available_toy_models(), reason="models/toy/sd has no weights")
def test_shape_diagnosis_probes_run_and_report_consistent_numbers():
    from attnlab.toyworld.diagnose import WORD_ROLES, _word_roles, cross_attention_shares, sdedit, shape_words
    from attnlab.toyworld.scenes import SHAPES

    scene = sample_scene(500_000, n_objects=1)
    obj = scene.objects[0]
    tokens = [f"{w}</w>" for w in caption(scene).split()] + ["<|endoftext|>"]
    roles = _word_roles(tokens, obj)
    assert roles.count("shape") == 1 and roles.count("colour") == 1 and roles[-1] == "end token"
    assert roles[tokens.index(f"{obj.shape}</w>")] == "shape" and "background words" in roles

    pipe = load_toy_pipeline("sd")
    scenes = [sample_scene(500_000 + i, n_objects=1) for i in range(2)]
    kw = toy_call_kwargs("sd", num_inference_steps=4)
    words = shape_words(pipe, scenes, kw, log=lambda *_: None)
    assert sum(sum(row.values()) for row in words["confusion"].values()) == 4 * len(scenes)
    assert set(words["confusion"]) == set(SHAPES) and 0 <= words["shape_read_as_prompted"] <= 1
    assert words["pixel_change_shape_word"] > 0 and words["pixel_change_other_scene"] > 0
    edits = sdedit(pipe, scenes, kw, strengths=(0.5,), log=lambda *_: None)
    assert set(edits) == {"0.5"} and 0 <= edits["0.5"] <= 1
    shares = cross_attention_shares(pipe, scenes)
    assert 5 <= len(shares) <= 7 and all(name.endswith("attn2") for name in shares)  # 3x3 grids may hold no object cell
    for per_role in shares.values():  # the text softmax sums to one over the caption's words and the padding
        assert set(per_role) == set(WORD_ROLES) and 0.95 <= sum(per_role.values()) <= 1.0 + 1e-5
