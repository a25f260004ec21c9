"""RefAM in ComfyUI (fake and real): the recorder is read-only, reads only the cond chunks under every
batching layout ([1, 0] batched, [0] at cfg 1, split calls), and the "RefAM Segment" node segments on
UNet, FLUX, SD3 and Wan models from a CLIP-like text encoder and a VAE (test doubles with ComfyUI's
tokenize / encode interface: ComfyUI's real encoders need multi-GB weights)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attnlab.models.offline_tokenizers import make_clip_tokenizer, make_t5_tokenizer
from attnlab.nodes import NODE_SPECS
from attnlab.nodes.refam import REFAM, parse_layers
from attnlab.processors.host_comfy import patch_model
from attnlab.processors.host_comfy import single_pass
from attnlab.processors.refam import TextMaps
from attnlab.toyworld.scenes import render, sample_scene
from comfy_pass_tools import parametrize_backends, tiny

EXPR = "the small red circle on the left"
PIXELS = {"sd15": 128, "sdxl": 128, "sd3": 128, "flux": 128, "wan_t2v": 64}


@pytest.fixture(autouse=True)
def fake_samplers(monkeypatch, request):
    backend = request.node.callspec.params.get("backend") if hasattr(request.node, "callspec") else None
    if backend is not None and getattr(backend, "NAME", "") == "fake":
        import fake_comfy.sampling as sampling

        monkeypatch.setattr(single_pass, "comfy_samplers", lambda: sampling)


@pytest.fixture(scope="module")
def cache():
    return {}


class Part:
    """One ComfyUI SDTokenizer-like part: word-by-word tokenization, start/end tokens, padding."""

    def __init__(self, hf, start, end, pad, min_length, tokens_start):
        self.tokenizer, self.start_token, self.end_token, self.pad_token = hf, start, end, pad
        self.min_length, self.tokens_start = min_length, tokens_start

    def tokenize(self, text):
        out = [] if self.start_token is None else [self.start_token]
        for word in text.split():
            out += self.tokenizer(word)["input_ids"][self.tokens_start:-1]
        out.append(self.end_token)
        out += [self.pad_token] * max(0, self.min_length - len(out))
        return [[(t, 1.0) for t in out]]


class FakeCLIP:
    """ComfyUI CLIP interface (tokenize -> {key: [[(id, weight)]]}, encode_from_tokens_scheduled, .tokenizer.<part>)
    over the pack's offline tokenizers; embeddings are a fixed random table of the model's context width."""

    def __init__(self, family, backend, t5_len=40):
        self.family, self.backend = family, backend
        clip = make_clip_tokenizer(77)
        t5 = make_t5_tokenizer(t5_len)
        clip_part = Part(clip, clip.bos_token_id, clip.eos_token_id, clip.eos_token_id, 77, 1)
        t5_part = Part(t5, None, t5.eos_token_id, t5.pad_token_id, t5_len, 0)
        parts = {"sd15": {"l": clip_part}, "sdxl": {"l": clip_part, "g": clip_part},
                 "sd3": {"l": clip_part, "g": clip_part, "t5xxl": t5_part}, "flux": {"l": clip_part, "t5xxl": t5_part},
                 "wan_t2v": {"umt5xxl": t5_part}}[family]
        self.tokenizer = type("Tok", (), {})()
        for key, part in parts.items():
            setattr(self.tokenizer, key if key in ("t5xxl", "umt5xxl") else f"clip_{key}", part)
        self.parts = parts
        self.table = torch.randn(600, 32, generator=torch.Generator().manual_seed(7))

    def tokenize(self, text):
        return {k: p.tokenize(text) for k, p in self.parts.items()}

    def encode_from_tokens_scheduled(self, tokens):
        keys = {"sd15": ["l"], "sdxl": ["l"], "sd3": ["l", "t5xxl"], "flux": ["t5xxl"], "wan_t2v": ["umt5xxl"]}[self.family]
        ids = [t[0] for k in keys for b in tokens[k] for t in b]
        emb = self.table[torch.tensor(ids)][None]
        positive, _ = self.backend.conditioning(self.family, text_len=len(ids))
        return [[emb, dict(positive[0][1])]]


class FakeVAE:
    """ComfyUI VAE interface: encode([B, H, W, 3] in [0, 1]) -> latent; Wan: [1, C, T, h, w] from 1 + 4k frames."""

    def __init__(self, family, channels):
        self.family, self.channels = family, channels
        self.proj = torch.randn(channels, 3, generator=torch.Generator().manual_seed(3))

    def encode(self, pixels):
        x = pixels.permute(0, 3, 1, 2) * 2 - 1
        z = F.avg_pool2d(torch.einsum("cd,bdhw->bchw", self.proj, x), 8)
        if self.family == "wan_t2v":
            keep = [0] + list(range(1, z.shape[0], 4))
            return z[keep].permute(1, 0, 2, 3)[None]
        return z


def pixels(family, seed=3):
    size = PIXELS[family]
    img = torch.from_numpy(np.asarray(render(sample_scene(seed), size), dtype=np.float32) / 255.0)[None]
    return img.repeat(5, 1, 1, 1) if family == "wan_t2v" else img


def run_node(backend, family, cache, **values):
    import fake_comfy.models as fm

    model = tiny(backend, family, cache)
    channels = fm.LATENT_SHAPE[family][0]
    inputs = dict(model=model, clip=FakeCLIP(family, backend), vae=FakeVAE(family, channels), image=pixels(family),
                  expression=EXPR)
    inputs.update(values)
    return REFAM.execute(**inputs)


@parametrize_backends
@pytest.mark.parametrize("family", ["sd15", "flux", "sd3", "wan_t2v"])
def test_node_segments_a_scene(backend, family, cache):
    mask, heat, overlay = run_node(backend, family, cache)
    n = 5 if family == "wan_t2v" else 1
    size = PIXELS[family]
    assert mask.shape == heat.shape == (n, size, size) and overlay.shape == (n, size, size, 3)
    assert set(mask.unique().tolist()) <= {0.0, 1.0} and 0 < float(mask.mean()) < 1
    assert float(heat.min()) == pytest.approx(0.0) and float(heat.max()) == pytest.approx(1.0)
    assert 0.0 <= float(overlay.min()) and float(overlay.max()) <= 1.0


def cond_maps(backend, family, cache, **layout):
    rec = TextMaps(role="cond")
    model = patch_model(tiny(backend, family, cache), [rec])
    rec.at("step")
    out = backend.sample_tiny(model, family, steps=1, seed=5, **layout)
    return rec, out


@parametrize_backends
@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_recorder_is_read_only_and_reads_only_cond_chunks_in_every_layout(backend, family, cache):
    solo, _ = cond_maps(backend, family, cache, cfg=1.0)
    assert solo.maps
    for layout in (dict(cfg=4.0), dict(cfg=4.0, split_calls=True)):
        stock = backend.sample_tiny(tiny(backend, family, cache), family, steps=1, seed=5, **layout)
        rec, out = cond_maps(backend, family, cache, **layout)
        assert torch.equal(out, stock), layout
        assert rec.maps.keys() == solo.maps.keys()
        for key, maps in rec.maps.items():
            assert maps.shape[0] == 1 and torch.allclose(maps, solo.maps[key], atol=1e-5), (layout, key)
    two, _ = cond_maps(backend, family, cache, cfg=4.0, batch=2)
    assert all(m.shape[0] == 2 for m in two.maps.values())


@parametrize_backends
def test_bad_input_gives_clear_errors(backend, cache):
    with pytest.raises(ValueError, match="expression is empty"):
        run_node(backend, "flux", cache, expression=" ")
    with pytest.raises(ValueError, match="not a multiple of 16"):
        run_node(backend, "flux", cache, image=torch.zeros(1, 120, 128, 3))
    with pytest.raises(ValueError, match="sam2_model"):
        run_node(backend, "flux", cache, mask_mode="sam_point")
    with pytest.raises(ValueError, match="layers \\[99\\]"):
        run_node(backend, "flux", cache, layers="99")
    with pytest.raises(ValueError, match="IMAGE"):
        run_node(backend, "flux", cache, image=torch.zeros(128, 128, 3))
    clip = FakeCLIP("sd15", backend)
    with pytest.raises(ValueError, match="t5xxl"):
        run_node(backend, "flux", cache, clip=clip)


def test_layer_text_and_registration():
    assert parse_layers("") is None and parse_layers("3, 5, 7-9") == [3, 5, 7, 8, 9]
    for bad in ("a", "9-3"):
        with pytest.raises(ValueError, match="RefAM layers"):
            parse_layers(bad)
    assert REFAM in NODE_SPECS
    assert {o.type for o in REFAM.outputs} == {"MASK", "IMAGE"}


@parametrize_backends
def test_sam2_input_prompts_from_the_heatmap(backend, cache):
    class Predictor:
        def set_image(self, img):
            self.shape = img.shape

        def predict(self, point_coords=None, point_labels=None, box=None, multimask_output=True):
            m = np.zeros((1,) + self.shape[:2], bool)
            x, y = point_coords[0].astype(int)
            m[0, max(0, y - 5):y + 5, max(0, x - 5):x + 5] = True
            self.point = (x, y)
            return m, np.array([0.9]), None

    sam = Predictor()
    mask, _, _ = run_node(backend, "sd15", cache, mask_mode="sam_point", sam2_model=sam)
    x, y = sam.point
    assert float(mask[0, y, x]) == 1.0 and float(mask.sum()) <= 100
