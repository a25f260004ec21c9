"""Offline tiny pipelines (models/tiny.py) and in-memory tokenizers (models/offline_tokenizers.py)."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _import_models():
    """``attnlab.models`` when the package is installed; else load ``models/`` from this checkout
    under a private name (without running the repository's top-level ``__init__``)."""
    try:
        tiny = importlib.import_module("attnlab.models.tiny")
        tok = importlib.import_module("attnlab.models.offline_tokenizers")
        return tiny, tok
    except ImportError:
        pass
    name = "_attnlab_models_under_test"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, ROOT / "models" / "__init__.py", submodule_search_locations=[str(ROOT / "models")]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return importlib.import_module(f"{name}.tiny"), importlib.import_module(f"{name}.offline_tokenizers")


tiny, toks = _import_models()
FAMILIES = tiny.FAMILIES

_CACHE: dict = {}


def _pipe(family: str, seed: int = 0):
    """Shared seed-0 pipelines (tests below never modify them)."""
    key = (family, seed)
    if key not in _CACHE:
        _CACHE[key] = tiny.build_tiny_pipeline(family, seed=seed)
    return _CACHE[key]


def _run(pipe, **kw) -> torch.Tensor:
    return tiny.run_tiny_pipeline(pipe, **kw)


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted while building/running a tiny pipeline")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# ------------------------------------------------------------------------------------------ tokenizers


def test_clip_tokenizer_byte_level_every_string(tmp_path):
    tok = toks.make_clip_tokenizer()
    assert len(tok) == 514
    assert tok.model_max_length == 77
    assert tok.pad_token_id == tok.eos_token_id == 513 and tok.bos_token_id == 512
    assert tok.unk_token_id == tok.eos_token_id
    ids = toks.clip_token_ids()
    assert ids == {"vocab_size": 514, "bos_token_id": 512, "eos_token_id": 513, "pad_token_id": 513}

    texts = ["A photo of a CAT!", "café 猫 🐱 — naïve", "", "x" * 200, "tab\tnew\nline  spaces"]
    for text in texts:
        enc = tok(text, padding="max_length", max_length=77, truncation=True).input_ids
        assert len(enc) == 77 and enc[0] == 512
        body = [i for i in enc[1:] if i != 513]
        assert all(0 <= i < 512 for i in body), text  # no unknowns: every byte has a symbol
    assert tok.decode(tok("a photo of a cat").input_ids, skip_special_tokens=True) == "a photo of a cat"

    tok.save_pretrained(tmp_path / "clip")
    from transformers import AutoTokenizer, CLIPTokenizer

    for cls in (CLIPTokenizer, AutoTokenizer):
        back = cls.from_pretrained(tmp_path / "clip", local_files_only=True)
        assert back.model_max_length == 77 and back.pad_token_id == 513
        for text in texts:
            assert back(text).input_ids == tok(text).input_ids


def test_t5_tokenizer_specials_determinism_round_trip(tmp_path):
    tok = toks.make_t5_tokenizer(model_max_length=32)
    assert tok.convert_ids_to_tokens([0, 1, 2]) == ["<pad>", "</s>", "<unk>"]
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert len(tok) == toks.t5_token_ids()["vocab_size"]
    assert not [t for t in tok.get_vocab() if "extra_id" in t]

    text = "a photo of a cat sitting on a red chair, Zebra 42!"
    ids = tok(text).input_ids
    assert ids[-1] == 1 and 2 not in ids  # eos appended, ASCII never unknown
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert toks.make_t5_tokenizer()(text).input_ids == ids  # same ids on every build

    tok.save_pretrained(tmp_path / "t5")
    from transformers import AutoTokenizer, T5Tokenizer

    for cls in (T5Tokenizer, AutoTokenizer):
        back = cls.from_pretrained(tmp_path / "t5", local_files_only=True)
        assert back(text).input_ids == ids and len(back) == len(tok)


def test_t5_vocab_identical_across_processes():
    here = hashlib.sha1(repr(toks.t5_vocab()).encode()).hexdigest()
    code = (
        "import hashlib, importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('ot', {str(ROOT / 'models' / 'offline_tokenizers.py')!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "print(hashlib.sha1(repr(m.t5_vocab()).encode()).hexdigest())\n"
    )
    env = dict(os.environ, TOKENIZERS_PARALLELISM="true")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == here


# ------------------------------------------------------------------------------------------ pipelines


EXPECTED = {
    # family: (pipeline class, {kind: count})
    "sd15": ("StableDiffusionPipeline", {"self": 7, "cross": 7}),
    "sdxl": ("StableDiffusionXLPipeline", {"self": 11, "cross": 11}),
    "sd3": ("StableDiffusion3Pipeline", {"joint": 3}),
    "flux": ("FluxPipeline", {"joint": 2, "single": 2}),
    "pixart": ("PixArtSigmaPipeline", {"self": 2, "cross": 2}),
    "wan": ("WanPipeline", {"self": 2, "cross": 2}),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_builds_offline_and_runs(family, no_network):
    pipe = _pipe(family)
    cls_name, counts = EXPECTED[family]
    assert type(pipe).__name__ == cls_name
    assert tiny.family_of(pipe) == family

    summary = tiny.attention_summary(pipe)
    for kind in ("self", "cross", "joint", "single"):
        assert summary[kind] == counts.get(kind, 0), (kind, summary)
    assert min(summary["heads"]) >= 2
    for comp in pipe.components.values():
        if isinstance(comp, torch.nn.Module):
            assert not any(m.training for m in comp.modules())

    out = _run(pipe)
    h, w = tiny.default_size(family)
    if family == "wan":
        assert out.shape == (1, tiny.tiny_call_kwargs("wan")["num_frames"], 3, h, w)
    else:
        assert out.shape == (1, 3, h, w)
    assert torch.isfinite(out).all()
    assert out.min() >= 0 and out.max() <= 1
    assert out.std() > 0.02  # non-constant
    latent = _run(pipe, output_type="latent")
    assert torch.isfinite(latent).all() and latent.std() > 0.1


def test_unet_attention_levels():
    for family in ("sd15", "sdxl"):
        mods = tiny.attention_modules(_pipe(family))
        levels = {name.split(".attentions")[0] for name in mods}
        assert "mid_block" in levels
        assert len({lvl for lvl in levels if lvl.startswith("down_blocks")}) >= 2
        kinds = {kind for kind, _ in mods.values()}
        assert kinds == {"self", "cross"}
    unet = _pipe("sdxl").unet
    assert unet.add_embedding.linear_1.in_features == unet.config.projection_class_embeddings_input_dim


def _capture_token_counts(pipe):
    """Run once and record (query tokens, key/text tokens) per attention module."""
    seen: dict[str, tuple[int, int | None]] = {}
    handles = []
    for name, (kind, module) in tiny.attention_modules(pipe).items():

        def hook(mod, args, kwargs, name=name):
            hs = args[0] if args else kwargs["hidden_states"]
            enc = args[1] if len(args) > 1 else kwargs.get("encoder_hidden_states")
            seen.setdefault(name, (hs.shape[1], None if enc is None else enc.shape[1]))

        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        _run(pipe, output_type="latent", num_inference_steps=1)
    finally:
        for h in handles:
            h.remove()
    return seen


@pytest.mark.parametrize("family", FAMILIES)
def test_native_and_text_token_counts(family):
    pipe = _pipe(family)
    kinds = {name: kind for name, (kind, _) in tiny.attention_modules(pipe).items()}
    seen = _capture_token_counts(pipe)
    assert set(seen) == set(kinds)
    image_q = {seen[n][0] for n, k in kinds.items() if k in ("self", "joint")}
    assert max(image_q) == tiny.native_tokens(family)
    if family in ("sd15", "sdxl"):
        assert image_q == set(tiny.native_token_levels(family).values())
    text_k = {seen[n][1] for n, k in kinds.items() if k in ("cross", "joint")}
    assert text_k == {tiny.text_tokens(family)}
    if family == "flux":  # single blocks see the fused [text, image] sequence
        single_q = {seen[n][0] for n, k in kinds.items() if k == "single"}
        assert single_q == {tiny.text_tokens("flux") + tiny.native_tokens("flux")}


@pytest.mark.parametrize("family", FAMILIES)
def test_same_seed_bit_identical_different_seed_differs(family):
    rng_before = torch.get_rng_state()
    pipe_a = _pipe(family)
    pipe_b = tiny.build_tiny_pipeline(family, seed=0)
    assert torch.equal(rng_before, torch.get_rng_state())  # caller's RNG untouched
    for name, comp in pipe_a.components.items():
        if isinstance(comp, torch.nn.Module):
            sa, sb = comp.state_dict(), pipe_b.components[name].state_dict()
            assert sa.keys() == sb.keys()
            assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    out_a = _run(pipe_a, output_type="latent")
    assert torch.equal(out_a, _run(pipe_b, output_type="latent"))
    assert torch.equal(out_a, _run(pipe_a, output_type="latent"))  # reruns are bit-identical

    pipe_c = tiny.build_tiny_pipeline(family, seed=1)
    out_c = _run(pipe_c, output_type="latent")
    assert (out_a - out_c).abs().max() > 1e-3


class _UniformAttention(TorchFunctionMode):
    """Replace every torch SDPA call by a uniform average over the keys."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q = args[0] if len(args) > 0 else kwargs["query"]
            v = args[2] if len(args) > 2 else kwargs["value"]
            return v.mean(dim=-2, keepdim=True).expand(*q.shape[:-1], v.shape[-1]).contiguous()
        return func(*args, **kwargs)


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_pattern_reaches_output(family):
    """Changing only the denoiser's attention weights changes the result noticeably (no zero-init
    output layers hiding attention)."""
    pipe = _pipe(family)
    den = tiny.denoiser_of(pipe)
    assert den._attnlab_reinitialised == ()  # diffusers 0.42.1 zero-initialises none of these
    ref = _run(pipe, output_type="latent")
    mode = _UniformAttention()

    def enter(module, args):
        mode.__enter__()  # (returning the mode would replace the forward's args)

    def leave(module, args, output):
        mode.__exit__(None, None, None)

    pre = den.register_forward_pre_hook(enter)
    post = den.register_forward_hook(leave)
    try:
        changed = _run(pipe, output_type="latent")
    finally:
        pre.remove()
        post.remove()
    rel = float((changed - ref).norm() / ref.norm())
    print(f"{family}: relative latent change with uniform attention {rel:.4f}")
    assert rel > 1e-2, rel
    assert torch.equal(ref, _run(pipe, output_type="latent"))


def test_attention_calibration():
    pipe = _pipe("pixart")
    den = tiny.denoiser_of(pipe)
    assert set(den._attnlab_qk_gains) == set(tiny.attention_modules(pipe))
    assert all(g > 1 for g in den._attnlab_qk_gains.values())  # raw init is too flat
    # Calibrating an already calibrated model is (numerically) a no-op.
    fresh = tiny.build_tiny_pipeline("pixart")
    again = tiny.calibrate_attention(fresh)
    assert all(abs(g - 1) < 1e-3 for g in again.values()), again
    raw = tiny.build_tiny_pipeline("pixart", attention_logit_std=None)
    assert tiny.denoiser_of(raw)._attnlab_qk_gains == {}
    assert (_run(raw, output_type="latent") - _run(pipe, output_type="latent")).abs().max() > 1e-3


def test_reinit_zero_weights_helper():
    lin = torch.nn.Linear(4, 3)
    torch.nn.init.zeros_(lin.weight)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), lin)
    kept = model[0].weight.clone()
    assert tiny.reinit_zero_weights(model, seed=0) == ["1"]
    assert lin.weight.abs().sum() > 0 and torch.equal(model[0].weight, kept)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trip(family, tmp_path, no_network):
    import diffusers

    pipe = _pipe(family)
    pipe.save_pretrained(tmp_path)
    loaded = diffusers.DiffusionPipeline.from_pretrained(tmp_path, local_files_only=True)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded) is type(pipe)
    a = _run(pipe, output_type="latent")
    b = _run(loaded, output_type="latent")
    # Same weights; loaded tensors' memory layout can change BLAS paths (~1e-6).
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_overrides_and_errors():
    pipe = tiny.build_tiny_pipeline("pixart", transformer={"num_layers": 3})
    assert tiny.attention_summary(pipe)["self"] == 3
    with pytest.raises(ValueError, match="family"):
        tiny.build_tiny_pipeline("sd2")
    with pytest.raises(TypeError, match="override"):
        tiny.build_tiny_pipeline("flux", unet={})
    with pytest.raises(ValueError, match="mid"):
        tiny.build_tiny_pipeline("wan", size="mid")
    kw = tiny.tiny_call_kwargs("flux", num_inference_steps=3)
    assert kw["num_inference_steps"] == 3 and kw["guidance_scale"] == 3.5 and kw["output_type"] == "pt"


@pytest.mark.parametrize("family", tiny.MID_FAMILIES)
def test_mid_size_models(family):
    pipe = tiny.build_mid_pipeline(family)
    params = sum(p.numel() for p in tiny.denoiser_of(pipe).parameters())
    assert 1_000_000 < params < 20_000_000
    assert tiny.native_tokens(family, size="mid") == 1024
    out = tiny.run_tiny_pipeline(pipe, size="mid")
    assert out.shape[-2:] == tiny.default_size(family, size="mid")
    assert torch.isfinite(out).all() and out.std() > 0.02
