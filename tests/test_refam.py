"""RefAM core, framework-free (specs/refam.md §A.6): map kernels against explicit softmax slices, the
read-only recorder, row-role selection, sink detection and suppression, token bookkeeping, aggregation,
geometry, masks and the SAM prompt logic."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from attnlab.models.offline_tokenizers import make_clip_tokenizer, make_t5_tokenizer
from attnlab.processors import refam as refam_mod
from attnlab.processors.call import AttentionCall, Site, TokenLayout
from attnlab.processors.effects import EffectStack
from attnlab.processors.refam import TextMaps, detect_sinks, text_maps
from attnlab.processors.refam_heatmap import (aggregate, connected_component, otsu, peak, sam_mask, threshold_mask)
from attnlab.processors.refam_run import RefAMOptions, Words
from attnlab.processors.refam_tokens import CATEGORIES, build_prompt, token_sets


def sdpa(q, k, v, mask, scale):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def joint_call(text_first: bool, b=2, h=3, nt=5, grid=(1, 3, 4), d=8, roles=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    ni = math.prod(grid)
    n = nt + ni
    q, k, v = (torch.randn(b, h, n, d, generator=g) for _ in range(3))
    text, image = (slice(0, nt), slice(nt, n)) if text_first else (slice(ni, n), slice(0, ni))
    layout = TokenLayout(q_image=image, k_image=image, q_text=text, k_text=text, grid=grid, text_first=text_first)
    return AttentionCall(q, k, v, Site("flux", "joint", 3, "x"), layout, roles)


def explicit(call: AttentionCall):
    return ((call.q.double() @ call.k.double().transpose(-1, -2)) * call.default_scale()).softmax(-1)


@pytest.mark.parametrize("text_first", [True, False])
def test_map_modes_equal_explicit_softmax_slices(text_first):
    call = joint_call(text_first)
    t, s = call.tokens, call.default_scale()
    q, k = call.q, call.k
    full = explicit(call)
    joint = text_maps(q[:, :, t.q_image], k[:, :, t.k_text], s, "img2txt_joint", k_all=k)
    assert (joint.double() - full[:, :, t.q_image, t.k_text].mean(1)).abs().max() < 1e-6
    t2i = text_maps(None, None, s, "txt2img_joint", k_all=k, q_txt=q[:, :, t.q_text], k_img=k[:, :, t.k_image])
    assert (t2i.double() - full[:, :, t.q_text, t.k_image].mean(1).transpose(1, 2)).abs().max() < 1e-6
    restricted = ((q[:, :, t.q_image].double() @ k[:, :, t.k_text].double().transpose(-1, -2)) * s).softmax(-1).mean(1)
    soft = text_maps(q[:, :, t.q_image], k[:, :, t.k_text], s)
    assert (soft.double() - restricted).abs().max() < 1e-6
    assert torch.allclose(soft.sum(-1), torch.ones(()), atol=1e-5)  # rows sum to 1 over the text tokens


def test_chunked_maps_equal_unchunked(monkeypatch):
    call = joint_call(True, grid=(1, 6, 7))
    t, s = call.tokens, call.default_scale()
    args = (call.q[:, :, t.q_image], call.k[:, :, t.k_text], s)
    whole = [text_maps(*args), text_maps(*args, "img2txt_joint", k_all=call.k)]
    monkeypatch.setattr(refam_mod, "_CHUNK_ELEMENTS", 40)  # a handful of queries per chunk
    chunked = [text_maps(*args), text_maps(*args, "img2txt_joint", k_all=call.k)]
    for a, b in zip(whole, chunked):
        assert torch.allclose(a, b, atol=1e-7)


@pytest.mark.parametrize("mode", ["img2txt_textsoftmax", "img2txt_joint", "txt2img_joint"])
def test_recorder_is_read_only_and_keeps_columns_and_cond_rows(mode):
    call = joint_call(False, roles=("uncond", "cond"))
    rec = TextMaps(map_mode=mode, columns=[1, 3])
    out = EffectStack([rec]).run(call, sdpa)
    assert torch.equal(out, sdpa(call.q, call.k, call.v, None, None))
    (key, layer), maps = next(iter(rec.maps.items()))
    assert layer == 3 and maps.shape == (1, 2, 1, 3, 4)  # one cond row, 2 columns, the grid
    solo = call.replace(q=call.q[1:], k=call.k[1:], v=call.v[1:], roles=("cond",))
    rec2 = TextMaps(map_mode=mode, columns=[1, 3])
    EffectStack([rec2]).run(solo, sdpa)
    assert torch.equal(next(iter(rec2.maps.values())), maps)
    none = TextMaps(map_mode=mode)
    EffectStack([none]).run(call.replace(roles=("uncond", "uncond")), sdpa)
    assert not none.maps


def test_recorder_layers_and_errors():
    rec = TextMaps(layers=[3])
    assert rec.applies(Site("flux", "single", 3)) and not rec.applies(Site("flux", "single", 4))
    assert not rec.applies(Site("unet", "self", 3))
    with pytest.raises(ValueError, match="map_mode"):
        TextMaps(map_mode="nope").validate()
    with pytest.raises(ValueError, match="gas_mode"):
        TextMaps(gas_mode="nope").validate()
    with pytest.raises(ValueError, match="layers \\[9\\]"):
        TextMaps(layers=[9]).check_sites([(Site("flux", "joint", 0), 2), (Site("flux", "single", 1), 2)])
    with pytest.raises(ValueError, match="joint attention"):
        TextMaps(map_mode="txt2img_joint").check_model("unet", (1, 8, 8))


def test_sink_detector_flags_a_flat_column_not_a_peaked_one_of_equal_mass():
    n = 64
    flat = torch.full((n,), 0.3)
    peaked = torch.zeros(n)
    peaked[:8] = 0.3 * n / 8
    rest = 1 - flat - peaked
    maps = torch.stack([flat, peaked, rest.clamp_min(0)], dim=-1)
    found = detect_sinks(maps, mass=0.2, cv=0.5)
    assert found[:2].tolist() == [True, False]


def test_suppress_with_zero_bias_is_stock_and_minus_inf_removes_the_sink():
    call = joint_call(True, b=2, roles=("uncond", "cond"))
    stock = sdpa(call.q, call.k, call.v, None, None)
    zero = TextMaps(gas_mode="suppress", bias=0.0, gas_mass=0.0, gas_cv=1e9)
    assert torch.equal(EffectStack([zero]).run(call, sdpa), stock)
    # every column is "flat and heavy" with these thresholds: restrict the candidates to text column 2
    rec = TextMaps(gas_mode="suppress", gas_mass=0.0, gas_cv=1e9, sink_candidates=[2])
    out = EffectStack([rec]).run(call, sdpa)
    maps = next(iter(rec.maps.values()))
    assert float(maps[:, 2].abs().max()) == 0.0  # no mass on the suppressed column
    assert rec.sinks[(None, 3)] == [2]
    t = call.tokens
    # the cond row's image queries attend without text column 2; its text queries and the uncond row are stock
    keep = torch.ones(call.kv_len, dtype=torch.bool)
    keep[t.k_text.start + 2] = False
    ref = sdpa(call.q[1:, :, t.q_image], call.k[1:, :, keep], call.v[1:, :, keep], None, None)
    assert torch.allclose(out[1:, :, t.q_image], ref, atol=1e-6)
    assert torch.equal(out[1:, :, t.q_text], stock[1:, :, t.q_text])
    assert torch.equal(out[:1], stock[:1])


# --- token bookkeeping ------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["clip", "t5"])
def tokenizer(request):
    return make_clip_tokenizer(77) if request.param == "clip" else make_t5_tokenizer(64)


def test_token_sets_are_disjoint_cover_and_put_magnets_before_eos(tokenizer):
    prompt = build_prompt("the small red circle left of a blue square", caption="a scene", caption_mode="caption+expr",
                          n_aux=2)
    sets = token_sets(tokenizer, prompt, 77 if len(tokenizer) > 400 else 64)
    assert set(sets.categories) <= set(CATEGORIES)
    by_cat = {c: set(sets.indices(c)) for c in CATEGORIES}
    union = set().union(*by_cat.values())
    assert union == set(range(len(sets))) and sum(len(v) for v in by_cat.values()) == len(sets)
    eos = sets.indices("eos")
    assert len(eos) == 1
    expr = sets.indices("content", "stop")
    magnets, aux, caption = sets.indices("magnet"), sets.indices("aux"), sets.indices("caption")
    assert magnets and aux and caption
    assert max(caption) < min(expr) and max(expr) < min(magnets) and max(magnets) < min(aux) and max(aux) < eos[0]
    assert all(i > eos[0] for i in sets.indices("pad"))
    words = [w for w, _ in sets.word_tokens("content")]
    assert words == ["small", "red", "circle", "left", "blue", "square"]  # spatial "left" stays content
    assert [w for w, _ in sets.word_tokens("stop")] == ["the", "of", "a"]
    assert sets.columns == sorted(set(expr) | set(magnets) | set(aux) | set(caption))


def test_prompt_errors_and_options(tokenizer):
    with pytest.raises(ValueError, match="expression is empty"):
        build_prompt("   ")
    with pytest.raises(ValueError, match="caption_mode"):
        build_prompt("x", caption_mode="both")
    long = build_prompt(" ".join(["circle"] * 60))
    with pytest.raises(ValueError, match="does not fit"):
        token_sets(tokenizer, long, 16)
    p = RefAMOptions(magnets=(), magnet_color=True).prompt("a dog")
    assert p.text == "a dog white"
    assert RefAMOptions(gas_mode="redirect", n_aux=3, magnets=()).prompt("dog").text == "dog . . ."
    with pytest.raises(ValueError, match="language"):
        RefAMOptions(language="de").validate()
    RefAMOptions(language="de", stopwords=["der", "die"], magnets=["und"]).validate()
    assert RefAMOptions(stopwords=["red"]).prompt("red dog").words[0].stop


# --- aggregation, geometry, masks -----------------------------------------------------------------

def test_word_map_is_the_mean_of_its_pieces_and_stop_words_are_filtered():
    g = torch.Generator().manual_seed(1)
    maps = torch.rand(4, 1, 3, 5, generator=g)  # 4 columns on a 3x5 grid
    two_pieces = aggregate({(0.5, 0): maps}, [10, 11, 12, 13], [("circle", [10, 11])], (6, 10), renormalize=False,
                           drop_sinks=False)
    merged = torch.stack([(maps[0] + maps[1]) / 2, maps[2], maps[3], maps[3]])
    one = aggregate({(0.5, 0): merged}, [20, 21, 22, 23], [("circle", [20])], (6, 10), renormalize=False, drop_sinks=False)
    assert torch.allclose(two_pieces.heatmap, one.heatmap, atol=1e-6)
    prompt = build_prompt("the red circle")
    sets = token_sets(make_t5_tokenizer(64), prompt, 64)
    assert [w for w, _ in Words.of(prompt, [sets]).content] == ["red", "circle"]
    assert [w for w, _ in Words.of(prompt, [sets], filter_stopwords=False).content] == ["the", "red", "circle"]


def test_pad_keys_do_not_change_the_heatmap_when_excluded():
    call = joint_call(True, b=1, nt=8, grid=(1, 4, 4))
    columns = [0, 1, 2]  # 3 word tokens; text positions 3..7 are EOS/pad
    heat = []
    for pad_scale in (1.0, 5.0):
        k = call.k.clone()
        k[:, :, 3:8] *= pad_scale
        rec = TextMaps(columns=columns)
        EffectStack([rec]).run(call.replace(k=k), sdpa)
        heat.append(aggregate({(0.5, 3): rec.maps[(None, 3)][0]}, columns, [("w", [1])], (8, 8), drop_sinks=False).heatmap)
        rec_raw = rec.maps[(None, 3)]
    assert torch.allclose(heat[0], heat[1], atol=1e-5)
    assert rec_raw.shape == (1, 3, 1, 4, 4)


@pytest.mark.parametrize("size,grid", [((64, 64), (4, 4)), ((768, 1344), (48, 84)), ((96, 48), (6, 3))])
def test_one_hot_token_lands_in_its_pixel_block(size, grid):
    H, W = size
    h, w = grid
    for r, c in [(0, 0), (h - 1, w - 1), (h // 2, w // 3)]:
        m = torch.zeros(1, 1, h, w)
        m[0, 0, r, c] = 1.0
        heat = aggregate({(0.5, 0): m}, [0], [("x", [0])], (H, W), renormalize=False).heatmap[0]
        pr, pc = peak(heat)
        assert r * H // h <= pr < (r + 1) * H // h and c * W // w <= pc < (c + 1) * W // w


def blob(H=64, W=80, center=(20, 50), radius=9.0):
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    d2 = (yy - center[0]) ** 2 + (xx - center[1]) ** 2
    return d2 <= radius**2, torch.exp(-d2 / (2 * radius**2))


@pytest.mark.parametrize("method", ["otsu", "mean_std"])
def test_threshold_mask_recovers_a_blob(method):
    truth, _ = blob()
    heat = truth.float() * 0.8 + 0.1 + 0.05 * torch.rand(truth.shape, generator=torch.Generator().manual_seed(0))
    mask = threshold_mask(heat, method)
    assert torch.equal(mask, truth)
    assert 0.1 < otsu(heat) < 0.9


def test_connected_component_keeps_the_peak_blob_only():
    a, ha = blob(center=(20, 20))
    b, hb = blob(center=(40, 60))
    heat = ha + 0.9 * hb
    mask = threshold_mask(heat, "otsu")
    everything = threshold_mask(heat, "otsu", component=False)
    assert bool((everything & b).any()) and not bool((mask & b).any())  # b's blob passes the threshold but is cut
    assert bool(mask[20, 20]) and bool((mask <= everything).all())
    assert not connected_component(a, (40, 60)).any()


class FakeSAM:
    """A SAM-like predictor: candidate masks are fixed; records the prompts it got."""

    def __init__(self, masks, scores):
        self.masks, self.scores, self.calls = masks, scores, []

    def set_image(self, image):
        self.image = image

    def predict(self, **prompt):
        self.calls.append(prompt)
        return np.stack([m.numpy() for m in self.masks]), np.array(self.scores), None


def test_sam_prompts_with_the_peak_and_picks_the_mask_with_most_heat():
    truth, heat = blob()
    wrong = torch.zeros_like(truth)
    wrong[:10, :10] = True
    sam = FakeSAM([wrong, truth, truth | wrong], [0.99, 0.5, 0.7])
    image = np.zeros((*truth.shape, 3), np.uint8)
    mask, info = sam_mask(sam, image, heat, "sam_point", points=1, negative=True)
    assert torch.equal(mask, truth) and info["chosen"] == 1
    coords, labels = sam.calls[0]["point_coords"], sam.calls[0]["point_labels"]
    assert tuple(coords[0]) == (50, 20) and labels.tolist() == [1, 0]  # (x, y) of the peak, then a negative
    mask, info = sam_mask(sam, image, heat, "sam_box")
    x0, y0, x1, y1 = info["box"]
    assert x0 <= 50 < x1 and y0 <= 20 < y1
    with pytest.raises(ValueError, match="set_image"):
        sam_mask(object(), image, heat)


def test_blur_wider_than_the_image_is_cut_at_its_size():
    # `attnlab refam --model toy-sd --layers 2` (a 3x3 grid upsampled to 48 px) asked for a 48-px reflect pad
    from attnlab.processors.refam_heatmap import gaussian_blur

    x = torch.zeros(1, 48, 48)
    x[0, 10, 30] = 1.0
    y = gaussian_blur(x, 16.0)
    assert y.shape == x.shape and torch.isfinite(y).all() and 0 < float(y.max()) < 1
    assert torch.equal(gaussian_blur(torch.ones(1, 1, 5), 2.0), torch.ones(1, 1, 5))  # nothing to reflect
    small = gaussian_blur(x, 0.5)  # an ordinary blur is unchanged by the cut
    radius = 2
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / 0.5) ** 2)
    k = k / k.sum()
    assert torch.allclose(small[0, 8:13, 28:33], torch.outer(k, k), atol=1e-7)
