"""Train the small toy-world text-to-image models (issue 8) in standard diffusers formats.

    python -m attnlab.toyworld.train --arch sd --out models/toy/sd [--steps N] [--vae-steps N]
        [--batch B] [--seed S] [--device cpu|cuda] [--resume] [--threads 1] [--decoder-every 1] [--decoder-noise 0.15]
    python -m attnlab.toyworld.train --arch flux --out models/toy/flux --vae-from models/toy/sd

Everything is generated on the fly: training sample ``i`` is ``sample_scene(TRAIN_SEED_BASE + i,
n_objects=n_i)`` rendered at the model's size with ``caption(scene)`` as its prompt (``n_i`` drawn from
``N_OBJECTS_P`` by a generator seeded with the scene seed). Evaluation (``evaluate.py``) uses seeds below
``TRAIN_SEED_BASE``, so training and held-out scenes never share a seed.

Architecture (``--arch sd``), a ``StableDiffusionPipeline`` folder:

* ``tokenizer``: a word-level ``CLIPTokenizer`` over the toy grammar (:func:`make_toy_clip_tokenizer`):
  CLIP's 256 byte symbols plus BPE merges that build every grammar word into one token, so any text
  still tokenizes (unknown words fall back to pieces/bytes). ``model_max_length`` 32.
* ``text_encoder``: ``CLIPTextModel`` width 128, 3 layers, trained from scratch jointly with the UNet.
* ``vae``: ``AutoencoderKL`` with 3 blocks (4x downsampling), trained first
  (phase 1) on renders, 16 latent channels; ``scaling_factor`` = 1 / latent std, ``shift_factor`` = latent mean (the FLUX
  pipeline uses both, SD only the scale).
* ``unet``: ``UNet2DConditionModel`` (32, 64, 128) channels, cross-attention at the two finer levels,
  v-prediction, min-SNR-5 loss weighting, 10 % caption dropout for classifier-free guidance, EMA weights.
  With ``--decoder-every N`` the VAE decoder (only) keeps training during this phase (see train_denoiser).
* ``scheduler``: ``DPMSolverMultistepScheduler`` with the training betas (scaled_linear).

``--arch flux``: ``FluxTransformer2DModel`` (flow matching, guidance-distilled embedding fed with a
constant), CLIP (pooled) + T5 encoders, the same VAE (``--vae-from`` an SD folder, or trained here).

Training state (optimiser, EMA, step) is checkpointed to ``--state-dir`` (default ``<repo>/out/toy_train/
<arch>``, git-ignored) every ``--ckpt-every`` steps; ``--resume`` continues from it. The pipeline folder
in ``--out`` (fp16 safetensors) is rewritten at every checkpoint, so a stopped run still leaves weights.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .models import _training_info, load_toy_pipeline
from .scenes import (BACKGROUND_COLOURS, OBJECT_COLOURS, SHAPES, SIZES, STYLE_WORDS, caption, render_array,
                     sample_scene, without_background)

TRAIN_SEED_BASE = 1_000_000
N_OBJECTS = (1, 2, 3, 4)
N_OBJECTS_P = (0.35, 0.35, 0.15, 0.15)
CURRICULUM_P = (0.6, 0.4, 0.0, 0.0)  # --curriculum-steps: one- and two-object scenes first
IMAGE_SIZE = 48
VAE_FACTOR = 4  # pixels per latent cell (2 or 4)
LATENT_CHANNELS = 16  # 4x4x3 pixels -> 16 numbers: easy for a briefly trained VAE
VAE_KL_WEIGHT = 1e-6  # the recipe study's; latents are rescaled by their std anyway
TEXT_MAX_LENGTH = 32
CAPTION_DROPOUT = 0.1
VAE_SAMPLE_OFFSET = 100_000_000  # phase-1 samples: training indices from here on
REPO_ROOT = Path(__file__).resolve().parents[1]

# Every word the caption grammar and the referring expressions use.
GRAMMAR_WORDS = sorted(set(
    list(OBJECT_COLOURS) + list(BACKGROUND_COLOURS) + list(SHAPES) + list(SIZES) + list(STYLE_WORDS.values())
    + "a an the of left right above below and on background with dots to gradient object objects".split()
    + "leftmost rightmost topmost bottommost first second third fourth from top".split()
))


# ------------------------------------------------------------------------------------------ tokenizer

def _bpe_merges(words: list[str]) -> list[tuple[str, str]]:
    """Learn BPE merges on `words` (each once, CLIP-style "</w>" on the last symbol) until every word is
    one symbol. Ties break on the pair itself, so the result is deterministic."""
    seqs = [list(w[:-1]) + [w[-1] + "</w>"] for w in words]
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for s in seqs:
            for pair in zip(s, s[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        new = []
        for s in seqs:
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            new.append(out)
        seqs = new


def toy_clip_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    from ..models.offline_tokenizers import CLIP_BOS, CLIP_EOS, clip_vocab

    base = clip_vocab()
    vocab = {k: v for k, v in base.items() if k not in (CLIP_BOS, CLIP_EOS)}
    merges = _bpe_merges(GRAMMAR_WORDS)
    for a, b in merges:
        if a + b not in vocab:
            vocab[a + b] = len(vocab)
    vocab[CLIP_BOS] = len(vocab)
    vocab[CLIP_EOS] = len(vocab)
    return vocab, merges


def make_toy_clip_tokenizer(model_max_length: int = TEXT_MAX_LENGTH):
    """Word-level CLIPTokenizer for the toy grammar (every grammar word is one token); round-trips through
    save_pretrained / from_pretrained like any CLIP tokenizer."""
    from transformers import CLIPTokenizer

    from ..models.offline_tokenizers import CLIP_BOS, CLIP_EOS

    vocab, merges = toy_clip_vocab()
    return CLIPTokenizer(vocab=vocab, merges=[(a, b) for a, b in merges], unk_token=CLIP_EOS,
                         bos_token=CLIP_BOS, eos_token=CLIP_EOS, pad_token=CLIP_EOS,
                         model_max_length=int(model_max_length))


def toy_t5_vocab() -> list[tuple[str, float]]:
    """The package's in-memory T5 Unigram vocabulary plus one piece per grammar word ("▁circle"), scored
    above every other piece so that each grammar word is a single token (the generic vocabulary splits
    "circle" into four pieces, and most captions then overflow any short T5 length)."""
    from ..models.offline_tokenizers import t5_vocab

    base = t5_vocab()
    have = {p for p, _ in base}
    words = [("\u2581" + w, -1.0) for w in GRAMMAR_WORDS if "\u2581" + w not in have]
    return base[:3] + words + base[3:]


def make_toy_t5_tokenizer(model_max_length: int = TEXT_MAX_LENGTH):
    """T5Tokenizer (Unigram) over :func:`toy_t5_vocab`: any text tokenizes, grammar words are one token."""
    from ..models.offline_tokenizers import make_t5_tokenizer

    return make_t5_tokenizer(model_max_length, vocab=toy_t5_vocab())


def toy_clip_ids() -> dict[str, int]:
    from ..models.offline_tokenizers import CLIP_BOS, CLIP_EOS

    vocab, _ = toy_clip_vocab()
    return {"vocab_size": len(vocab), "bos_token_id": vocab[CLIP_BOS], "eos_token_id": vocab[CLIP_EOS],
            "pad_token_id": vocab[CLIP_EOS]}


# -------------------------------------------------------------------------------------------- configs

def vae_spec(size: int = IMAGE_SIZE, factor: int = VAE_FACTOR, latent_channels: int = LATENT_CHANNELS,
             tiny: bool = False) -> dict:
    """AutoencoderKL config: 32-group norms, >= 32-channel blocks and the mid-block attention, as ComfyUI's own
    VAE class builds them; one block per factor of 2 plus the first."""
    if factor not in (2, 4, 8):
        raise ValueError(f"vae factor must be 2, 4 or 8, got {factor!r}")
    n = int(math.log2(factor)) + 1
    blocks = [32] * n if tiny else [32] + [64] * (n - 1)
    return dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * n,
                up_block_types=["UpDecoderBlock2D"] * n, block_out_channels=blocks, layers_per_block=1,
                latent_channels=int(latent_channels), norm_num_groups=32, sample_size=size,
                scaling_factor=1.0, shift_factor=0.0)


@dataclass
class Recipe:
    """Everything a training run depends on (the defaults are the shipped models' recipe; docs/toyworld.md)."""
    size: int = IMAGE_SIZE
    vae_factor: int = VAE_FACTOR
    latent_channels: int = LATENT_CHANNELS
    vae_steps: int = 4500
    vae_batch: int = 16
    vae_lr: float = 1e-3
    vae_kl: float = VAE_KL_WEIGHT
    vae_object_weight: float = 10.0  # loss weight of object pixels (and their edge ring) in the VAE phase
    steps: int = 5200
    batch: int = 32
    lr: float = 1e-3
    object_weight: float = 1.0  # SD: denoiser loss weight of latent cells that hold an object (1 = off)
    unet_blocks: tuple = (32, 64, 128)
    flux_blocks: tuple = (2, 4)  # double, single
    text_width: int = 128
    caption_dropout: float = CAPTION_DROPOUT
    background_dropout: float = 0.0  # share of captions without their background clause (the model picks one)
    ema_decay: float = 0.999
    curriculum_steps: int = 1500  # the first N steps draw 1-2 object scenes only (CURRICULUM_P)
    zero_snr: bool = False  # SD: betas rescaled to zero terminal SNR (v-prediction)
    decoder_every: Optional[int] = 0  # > 0: keep sharpening the decoder during phase 2 (v1 did; None: 1 with our own VAE)
    decoder_noise: float = 0.15
    seed: int = 0
    threads: Optional[int] = 2
    workers: int = 0  # processes rendering training batches (a GPU run needs them; 0 on a 2-core CPU)

    def replace(self, **kw) -> "Recipe":
        unknown = set(kw) - {f.name for f in fields(self)}
        if unknown:
            raise TypeError(f"unknown recipe settings: {sorted(unknown)}")
        return dataclasses.replace(self, **kw)


RECIPE_HELP = {
    "size": "image side in pixels", "vae_factor": "pixels per latent cell (2, 4 or 8)",
    "latent_channels": "VAE latent channels", "vae_steps": "VAE steps (phase 1)", "vae_batch": "VAE batch",
    "vae_lr": "VAE learning rate", "vae_kl": "VAE KL weight",
    "vae_object_weight": "VAE loss weight on object pixels and their edge ring", "steps": "denoiser (+ text encoder) steps",
    "batch": "denoiser batch", "lr": "denoiser learning rate (warm-up 100, cosine to 10 %%)",
    "object_weight": "SD: denoiser loss weight on latent cells that hold object pixels (1 = off)",
    "unet_blocks": "UNet channels per level, multiples of 32 (e.g. 32,64,128)",
    "flux_blocks": "FLUX double,single block counts", "text_width": "text encoder width",
    "caption_dropout": "share of empty captions (for classifier-free guidance)",
    "background_dropout": "share of captions without their background clause (prompts that leave the style to "
                          "the model, as AlignedGen's targets do)", "ema_decay": "EMA decay",
    "curriculum_steps": "first N steps on one- and two-object scenes only", "zero_snr": "SD: zero terminal SNR betas",
    "decoder_every": "one VAE-decoder step every N denoiser steps (0: none)",
    "decoder_noise": "latent noise for the decoder steps", "seed": "random seed",
    "threads": "torch CPU threads (0 = torch default)", "workers": "processes rendering training batches",
}


def unet_spec(latent: int, latent_channels: int, blocks=(32, 64, 128), text_width: int = 128, tiny: bool = False) -> dict:
    """UNet2DConditionModel config in ComfyUI's terms: 32-group norms, one head width (32) on every level.
    Latents of 24 cells and more keep the finest level attention-free (as SDXL does), for speed."""
    blocks = (32, 32, 32) if tiny else tuple(int(b) for b in blocks)
    if any(b % 32 for b in blocks):
        raise ValueError(f"UNet blocks must be multiples of 32 (32-group norms), got {blocks}")
    if latent >= 24:
        down = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
        up = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    else:
        down = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
        up = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    return dict(sample_size=latent, in_channels=latent_channels, out_channels=latent_channels, block_out_channels=blocks,
                layers_per_block=1, down_block_types=down, up_block_types=up,
                attention_head_dim=tuple(b // 32 for b in blocks),  # = number of heads in UNet2DConditionModel
                cross_attention_dim=text_width, norm_num_groups=32)


def specs(arch: str, size: int = IMAGE_SIZE, tiny: bool = False, recipe: Optional[Recipe] = None) -> dict[str, dict]:
    """Config dicts per component. ``tiny=True`` shrinks everything for smoke tests."""
    if arch not in ("sd", "flux"):
        raise ValueError(f"arch must be 'sd' or 'flux', got {arch!r}")
    r = (recipe or Recipe()).replace(size=size)
    ids = toy_clip_ids()
    vae = vae_spec(size, r.vae_factor, r.latent_channels, tiny=tiny)
    width = 32 if tiny else r.text_width
    clip = dict(hidden_size=width, intermediate_size=2 * width, num_attention_heads=4,
                num_hidden_layers=1 if tiny else 3, max_position_embeddings=TEXT_MAX_LENGTH, hidden_act="quick_gelu",
                layer_norm_eps=1e-5, attention_dropout=0.0, dropout=0.0, **ids)
    latent = size // r.vae_factor
    if arch == "sd":
        unet = unet_spec(latent, r.latent_channels, r.unet_blocks, width, tiny)
        sched = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                     prediction_type="v_prediction", steps_offset=1, rescale_betas_zero_snr=bool(r.zero_snr))
        if r.zero_snr:
            sched["timestep_spacing"] = "trailing"
        return {"vae": vae, "text_encoder": clip, "unet": unet, "scheduler": sched}
    t5 = dict(d_model=width, d_ff=2 * width, d_kv=width // 4, num_heads=4, num_layers=1 if tiny else 3,
              relative_attention_num_buckets=8, dropout_rate=0.0)
    from ..models.offline_tokenizers import t5_token_ids
    t5.update(t5_token_ids(), vocab_size=len(toy_t5_vocab()))
    heads, head_dim = (2, 16) if tiny else (4, 32)
    double, single = (1, 1) if tiny else r.flux_blocks
    transformer = dict(patch_size=1, in_channels=4 * r.latent_channels, out_channels=None, num_layers=double,
                       num_single_layers=single, attention_head_dim=head_dim, num_attention_heads=heads,
                       joint_attention_dim=width, pooled_projection_dim=width, guidance_embeds=False,
                       axes_dims_rope=(4, 6, 6) if tiny else (8, 12, 12))
    sched = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
    return {"vae": vae, "text_encoder": clip, "text_encoder_2": t5, "transformer": transformer, "scheduler": sched}


# ----------------------------------------------------------------------------------------------- data

def scene_for_index(i: int, p=N_OBJECTS_P):
    seed = TRAIN_SEED_BASE + int(i)
    n = int(np.random.default_rng([seed, 7]).choice(N_OBJECTS, p=p))
    return sample_scene(seed, n_objects=n)


def batch_at(start: int, batch: int, size: int, p=N_OBJECTS_P) -> tuple[torch.Tensor, list[str]]:
    """Images in [-1, 1] (B, 3, size, size) and captions for training samples start..start+batch-1."""
    imgs, caps = [], []
    for i in range(start, start + batch):
        sc = scene_for_index(i, p)
        imgs.append(render_array(sc, size))
        caps.append(caption(sc))
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x, caps


class StepBatches(torch.utils.data.Dataset):
    """Batch ``step`` of a run as one item, so a DataLoader can render batches in worker processes (a GPU
    run outpaces one CPU core's numpy rendering); the order and content stay those of :func:`batch_at`."""

    def __init__(self, batch: int, size: int, offset: int = 0, curriculum_steps: int = 0):
        self.batch, self.size, self.offset, self.curriculum_steps = batch, size, offset, curriculum_steps

    def __len__(self) -> int:
        return 2**31 - 1

    def __getitem__(self, step: int):
        p = CURRICULUM_P if step < self.curriculum_steps else N_OBJECTS_P
        return batch_at(self.offset + step * self.batch, self.batch, self.size, p)


def step_batches(start: int, steps: int, data: StepBatches, workers: int = 0):
    """Yield (step, (images, captions)) for start..steps-1, rendered in ``workers`` processes (0: inline)."""
    if workers <= 0:
        for step in range(start, steps):
            yield step, data[step]
        return
    loader = torch.utils.data.DataLoader(data, batch_size=None, sampler=range(start, steps), num_workers=workers,
                                         prefetch_factor=4, persistent_workers=False)
    yield from zip(range(start, steps), loader)


# --------------------------------------------------------------------------------------------- models

def build_components(arch: str, size: int = IMAGE_SIZE, tiny: bool = False, seed: int = 0,
                     recipe: Optional[Recipe] = None) -> dict:
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    sp = specs(arch, size, tiny, recipe)
    torch.manual_seed(seed)
    out = {"vae": diffusers.AutoencoderKL(**sp["vae"]),
           "text_encoder": CLIPTextModel(CLIPTextConfig(**sp["text_encoder"])),
           "tokenizer": make_toy_clip_tokenizer()}
    if arch == "sd":
        out["unet"] = diffusers.UNet2DConditionModel(**sp["unet"])
        out["scheduler"] = diffusers.DPMSolverMultistepScheduler(**sp["scheduler"])
        out["train_scheduler"] = diffusers.DDPMScheduler(**sp["scheduler"])
    else:
        out["text_encoder_2"] = T5EncoderModel(T5Config(**sp["text_encoder_2"]))
        out["tokenizer_2"] = make_toy_t5_tokenizer(TEXT_MAX_LENGTH)
        out["transformer"] = diffusers.FluxTransformer2DModel(**sp["transformer"])
        out["scheduler"] = diffusers.FlowMatchEulerDiscreteScheduler(**sp["scheduler"])
    return out


def make_pipeline(arch: str, comps: dict):
    import diffusers

    if arch == "sd":
        pipe = diffusers.StableDiffusionPipeline(
            vae=comps["vae"], text_encoder=comps["text_encoder"], tokenizer=comps["tokenizer"], unet=comps["unet"],
            scheduler=comps["scheduler"], safety_checker=None, feature_extractor=None, image_encoder=None,
            requires_safety_checker=False)
    else:
        pipe = diffusers.FluxPipeline(
            scheduler=comps["scheduler"], vae=comps["vae"], text_encoder=comps["text_encoder"],
            tokenizer=comps["tokenizer"], text_encoder_2=comps["text_encoder_2"], tokenizer_2=comps["tokenizer_2"],
            transformer=comps["transformer"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_pipeline(arch: str, comps: dict, out: str | Path, meta: dict) -> None:
    """Write the diffusers folder with fp16 safetensors weights (copies; training modules stay fp32)."""
    out = Path(out)
    half = {k: (copy.deepcopy(v).to("cpu", torch.float16).eval() if isinstance(v, torch.nn.Module) else v)
            for k, v in comps.items() if k != "train_scheduler"}
    pipe = make_pipeline(arch, half)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(str(out), safe_serialization=True)
    (out / "training.json").write_text(json.dumps(meta, indent=2) + "\n")


# ------------------------------------------------------------------------------------------- training

def _lr_at(step: int, total: int, lr: float, warmup: int = 100) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, step: int, decay: float) -> None:
    d = min(decay, (1 + step) / (10 + step))
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.mul_(d).add_(pm.detach(), alpha=1 - d)


def _log(fh, msg: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    if fh is not None:
        fh.write(line + "\n")
        fh.flush()


_OBJECT_RGB = torch.tensor([OBJECT_COLOURS[c] for c in OBJECT_COLOURS], dtype=torch.float32) / 127.5 - 1.0


def object_weights(x: torch.Tensor, weight: float) -> torch.Tensor:
    """Per-pixel loss weights (B, 1, H, W): ``weight`` on object pixels and the pixel ring around them, 1
    elsewhere. Renders have exact palette colours, so object pixels are found by colour. Objects cover a few
    per cent of an image; unweighted, the decoder spends its capacity on background patterns and leaves
    shapes round."""
    if weight == 1.0:
        return torch.ones_like(x[:, :1])
    d = (x[:, None] - _OBJECT_RGB.to(x)[None, :, :, None, None]).abs().amax(dim=2)  # (B, colours, H, W)
    obj = (d.amin(dim=1, keepdim=True) < 0.02).float()
    ring = torch.nn.functional.max_pool2d(obj, 3, stride=1, padding=1)
    return 1.0 + (weight - 1.0) * ring


def latent_object_weights(x: torch.Tensor, weight: float, factor: int) -> torch.Tensor:
    """Per-latent-cell loss weights (B, 1, H/f, W/f): ``weight`` on cells that hold object pixels (or their edge
    ring), 1 elsewhere. The denoiser's plain loss is spent on the background patterns that fill the image, as
    the VAE's was: colours are learned, shapes stay round."""
    return torch.nn.functional.max_pool2d(object_weights(x, weight), factor)


def train_vae(vae, *, steps: int, batch: int, size: int, device: str, state_dir: Path, resume: bool, seed: int,
              lr: float = 1e-3, ckpt_every: int = 200, log=None, kl_weight: float = VAE_KL_WEIGHT,
              on_checkpoint=None, workers: int = 0, object_weight: float = 1.0) -> dict:
    """Phase 1: reconstruction (L1 + MSE) with a tiny KL term. Returns {"mean", "std"} of the latents.
    on_checkpoint(step, vae): called at every checkpoint (the recipe study scores the round trip there)."""
    path = state_dir / "vae.pt"
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    start = 0
    if resume and path.exists():
        st = torch.load(path, map_location="cpu", weights_only=False)
        vae.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        start = st["step"]
        _log(log, f"vae: resumed at step {start}")
    vae.to(device).train()
    gen = torch.Generator(device="cpu")
    t0 = time.time()
    for step, (x, _) in step_batches(start, steps, StepBatches(batch, size, VAE_SAMPLE_OFFSET), workers):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, steps, lr, warmup=50)
        x = x.to(device)
        gen.manual_seed(seed * 1_000_003 + step)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen).to(device)
        rec = vae.decode(z).sample
        kl = post.kl().mean() / x[0].numel()
        w = object_weights(x, object_weight)
        err = (rec - x).abs() + (rec - x) ** 2
        loss = (w * err).sum() / (w.sum() * x.shape[1]) + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 25 == 0 or step == steps - 1:
            _log(log, f"vae step {step} loss {loss.item():.4f} kl {kl.item():.3f} ({time.time() - t0:.0f}s)")
        if (step + 1) % ckpt_every == 0 or step == steps - 1:
            torch.save({"model": vae.state_dict(), "opt": opt.state_dict(), "step": step + 1}, path)
            if on_checkpoint is not None:
                vae.eval()
                with torch.no_grad():
                    on_checkpoint(step + 1, vae)
                vae.train()
    vae.eval()
    # Latent statistics over 512 held-in scenes (for scaling_factor / shift_factor).
    with torch.no_grad():
        zs = []
        for b in range(0, 512, 64):
            x, _ = batch_at(b, 64, size)
            zs.append(vae.encode(x.to(device)).latent_dist.mean.cpu())
        z = torch.cat(zs)
    stats = {"mean": float(z.mean()), "std": float(z.std())}
    _log(log, f"vae latents mean {stats['mean']:.4f} std {stats['std']:.4f}; train time {time.time() - t0:.0f}s")
    return stats


def _encode_text_sd(comps, caps: list[str], device: str) -> torch.Tensor:
    ids = comps["tokenizer"](caps, padding="max_length", max_length=comps["tokenizer"].model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(device)
    return comps["text_encoder"](ids)[0]


def train_denoiser(arch: str, comps: dict, recipe: Recipe, *, device: str, state_dir: Path, resume: bool, out: Path,
                   ckpt_every: int, meta: dict, log=None, decoder_lr: float = 3e-4, on_checkpoint=None,
                   deadline: Optional[float] = None) -> dict:
    """Phase 2: train the UNet (SD, v-prediction) or transformer (FLUX, flow matching) jointly with the
    text encoder(s), on latents of the frozen VAE encoder. on_checkpoint(step, out): called after each
    checkpoint has rewritten the pipeline folder (the recipe study scores it there).

    decoder_every > 0: every that many steps also take one reconstruction step on the VAE *decoder* only
    (half the batch). The encoder stays frozen, so the latents the denoiser learns do not move, while the
    briefly trained decoder keeps sharpening. decoder_noise: the decoder sees latents plus Gaussian noise of
    std U(0, decoder_noise) (in units of the scaled latent), so it tolerates the small errors of sampled latents."""
    r = recipe
    steps, batch, size, lr, seed = r.steps, r.batch, r.size, r.lr, r.seed
    decoder_every, decoder_noise = r.decoder_every or 0, r.decoder_noise
    vae = comps["vae"].to(device).eval().requires_grad_(False)
    dec_params = list(vae.decoder.parameters()) + (list(vae.post_quant_conv.parameters())
                                                   if vae.post_quant_conv is not None else [])
    dec_opt = torch.optim.AdamW(dec_params, lr=decoder_lr, weight_decay=0.0) if decoder_every > 0 else None
    den_name = "unet" if arch == "sd" else "transformer"
    trainable = [den_name, "text_encoder"] + (["text_encoder_2"] if arch == "flux" else [])
    mods = {k: comps[k].to(device).train() for k in trainable}
    ema = {k: copy.deepcopy(m).eval().requires_grad_(False) for k, m in mods.items()}
    params = [p for m in mods.values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    path = state_dir / f"{arch}_denoiser.pt"
    start, elapsed0 = 0, 0.0
    if resume and path.exists():
        st = torch.load(path, map_location="cpu", weights_only=False)
        for k in trainable:
            mods[k].load_state_dict(st["model"][k])
            ema[k].load_state_dict(st["ema"][k])
        opt.load_state_dict(st["opt"])
        if "vae" in st:
            vae.load_state_dict(st["vae"])
            if dec_opt is not None and st.get("dec_opt") is not None:
                dec_opt.load_state_dict(st["dec_opt"])
        start, elapsed0 = st["step"], st.get("elapsed", 0.0)
        _log(log, f"{arch}: resumed at step {start}")
    scale, shift = vae.config.scaling_factor, vae.config.shift_factor or 0.0
    gen = torch.Generator(device="cpu")
    t0 = time.time()
    loss_avg = dec_avg = None
    for step, (x, caps) in step_batches(start, steps, StepBatches(batch, size, 0, r.curriculum_steps), r.workers):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, steps, lr)
        gen.manual_seed(seed * 1_000_003 + step)
        drop = torch.rand(batch, generator=gen) < r.caption_dropout
        caps = ["" if d else c for d, c in zip(drop.tolist(), caps)]
        if r.background_dropout > 0:  # drawn only when on: older recipes keep their random stream
            bare = torch.rand(batch, generator=gen) < r.background_dropout
            caps = [without_background(c) if b else c for b, c in zip(bare.tolist(), caps)]
        with torch.no_grad():
            post = vae.encode(x.to(device)).latent_dist
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen).to(device)
        noise = torch.randn(z.shape, generator=gen).to(device)
        if arch == "sd":
            lat = z * scale
            sch = comps["train_scheduler"]
            t = torch.randint(0, sch.config.num_train_timesteps, (batch,), generator=gen).to(device)
            noisy = sch.add_noise(lat, noise, t)
            target = sch.get_velocity(lat, noise, t)
            pred = mods["unet"](noisy, t, _encode_text_sd({**comps, **mods}, caps, device)).sample
            ac = sch.alphas_cumprod.to(device)[t]
            snr = ac / (1 - ac)
            w = torch.clamp(snr, max=5.0) / (snr + 1)  # min-SNR-5 for v-prediction
            cells = latent_object_weights(x.to(device), r.object_weight, r.vae_factor)
            err = ((pred - target) ** 2 * cells).sum(dim=(1, 2, 3)) / (cells.sum(dim=(1, 2, 3)) * pred.shape[1])
            loss = (w * err).mean()
        else:
            loss = _flux_loss(comps, mods, z, noise, caps, gen, device, scale, shift, r.vae_factor)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        for k in trainable:
            _ema_update(ema[k], mods[k], step, r.ema_decay)
        if dec_opt is not None and step % decoder_every == 0:
            for g in dec_opt.param_groups:
                g["lr"] = _lr_at(step, steps, decoder_lr, warmup=0)
            xd = x[: max(1, batch // 2)].to(device)
            vae.decoder.train().requires_grad_(True)
            if vae.post_quant_conv is not None:
                vae.post_quant_conv.requires_grad_(True)
            zd = z[: xd.shape[0]]
            if decoder_noise > 0:
                amp = torch.rand(zd.shape[0], 1, 1, 1, generator=gen) * decoder_noise / scale
                zd = zd + (amp * torch.randn(zd.shape, generator=gen)).to(device)
            rec = vae.decode(zd).sample
            dec_loss = (rec - xd).abs().mean() + ((rec - xd) ** 2).mean()
            dec_opt.zero_grad(set_to_none=True)
            dec_loss.backward()
            torch.nn.utils.clip_grad_norm_(dec_params, 1.0)
            dec_opt.step()
            vae.eval().requires_grad_(False)
            dec_avg = dec_loss.item() if dec_avg is None else 0.95 * dec_avg + 0.05 * dec_loss.item()
        loss_avg = loss.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * loss.item()
        elapsed = elapsed0 + time.time() - t0
        out_of_time = deadline is not None and time.time() > deadline
        if step % 25 == 0 or step == steps - 1:
            dec = f" dec {dec_avg:.4f}" if dec_avg is not None else ""
            _log(log, f"{arch} step {step} loss {loss.item():.4f} avg {loss_avg:.4f} lr {opt.param_groups[0]['lr']:.2e}"
                      f"{dec} ({elapsed:.0f}s)")
        if (step + 1) % ckpt_every == 0 or step == steps - 1 or out_of_time:
            torch.save({"model": {k: m.state_dict() for k, m in mods.items()},
                        "ema": {k: m.state_dict() for k, m in ema.items()}, "opt": opt.state_dict(),
                        "step": step + 1, "elapsed": elapsed, "vae": vae.state_dict(),
                        "dec_opt": dec_opt.state_dict() if dec_opt is not None else None}, path)
            info = dict(meta, steps_done=step + 1, denoiser_wall_s=round(elapsed, 1), final_loss_avg=loss_avg)
            save_pipeline(arch, {**comps, **{k: ema[k] for k in trainable}}, out, info)
            _log(log, f"{arch}: checkpoint + pipeline saved at step {step + 1}")
            if on_checkpoint is not None:
                on_checkpoint(step + 1, out)
        if out_of_time:
            _log(log, f"{arch}: time limit reached at step {step + 1} of {steps}; weights saved")
            break
    return {"final_loss_avg": loss_avg, "elapsed": elapsed0 + time.time() - t0}


def _flux_loss(comps, mods, z, noise, caps, gen, device, scale, shift, factor):
    """Rectified-flow loss for FLUX: x_t = (1 - s) x0 + s noise, target noise - x0 (as FluxPipeline samples)."""
    from diffusers import FluxPipeline

    lat = (z - shift) * scale
    b, c, h, w = lat.shape
    s = torch.sigmoid(torch.randn(b, generator=gen)).to(device)  # logit-normal timesteps
    xt = (1 - s[:, None, None, None]) * lat + s[:, None, None, None] * noise
    target = noise - lat
    packed = FluxPipeline._pack_latents(xt, b, c, h, w)
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, device, lat.dtype)
    tok = comps["tokenizer"](caps, padding="max_length", max_length=comps["tokenizer"].model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(device)
    pooled = mods["text_encoder"](tok).pooler_output
    tok2 = comps["tokenizer_2"](caps, padding="max_length", max_length=TEXT_MAX_LENGTH, truncation=True,
                                return_tensors="pt").input_ids.to(device)
    t5 = mods["text_encoder_2"](tok2)[0]
    txt_ids = torch.zeros(t5.shape[1], 3, device=device, dtype=lat.dtype)
    pred = mods["transformer"](hidden_states=packed, timestep=s, guidance=None, pooled_projections=pooled,
                               encoder_hidden_states=t5, txt_ids=txt_ids, img_ids=img_ids).sample
    pred = FluxPipeline._unpack_latents(pred, h * factor, w * factor, factor)  # (height, width, vae_scale_factor)
    return ((pred - target) ** 2).mean()


def _load_folder(arch: str, folder: Path, comps: dict) -> None:
    """Replace the trainable components (and the VAE) by a saved pipeline folder's, in fp32: training goes on
    from shipped weights when the optimiser state is gone."""

    pipe = load_toy_pipeline(arch, path=folder, dtype=torch.float32)
    names = ("vae", "text_encoder") + (("unet",) if arch == "sd" else ("text_encoder_2", "transformer"))
    comps.update({name: getattr(pipe, name) for name in names})


def train(arch: str, out: str | Path, *, recipe: Optional[Recipe] = None, device: str = "cpu", resume: bool = False,
          state_dir: str | Path | None = None, vae_from: str | Path | None = None, init_from: str | Path | None = None,
          ckpt_every: int = 250, tiny: bool = False, log_file: str | Path | None = None, on_checkpoint=None,
          vae_on_checkpoint=None, max_minutes: Optional[float] = None, **settings) -> dict:
    """Train a toy model into the pipeline folder ``out``. ``settings`` override fields of ``recipe``
    (default :class:`Recipe`). vae_from: borrow a folder's VAE (frozen); init_from: start from a folder's
    weights (VAE, text encoders, denoiser; resumes training of shipped weights without optimiser state).
    max_minutes: stop the denoiser phase (weights saved) once this much wall time has passed since the start."""
    r = (recipe or Recipe()).replace(**settings)
    if r.threads:
        torch.set_num_threads(int(r.threads))
    out = Path(out)
    state_dir = Path(state_dir) if state_dir else REPO_ROOT / "out" / "toy_train" / arch
    state_dir.mkdir(parents=True, exist_ok=True)
    log = open(log_file, "a") if log_file else None
    t_start = time.time()
    deadline = t_start + 60 * max_minutes if max_minutes else None
    comps = build_components(arch, r.size, tiny, r.seed, r)
    if r.decoder_every is None:  # keep sharpening our own decoder; a borrowed VAE stays as it is
        r = r.replace(decoder_every=0 if vae_from else 1)
    meta = {"command": command_line(arch, out, r, device, vae_from, init_from), "arch": arch,
            **dataclasses.asdict(r), "device": device, "train_seed_base": TRAIN_SEED_BASE,
            "n_objects_p": dict(zip(map(str, N_OBJECTS), N_OBJECTS_P)),
            "curriculum_p": dict(zip(map(str, N_OBJECTS), CURRICULUM_P)), "torch": torch.__version__}
    stats_path = state_dir / "vae_stats.json"
    if init_from and not (resume and (state_dir / f"{arch}_denoiser.pt").exists()):
        _load_folder(arch, init_from, comps)
        meta["init_from"] = str(init_from)
        meta["vae_latent_stats"] = _training_info(Path(init_from)).get("vae_latent_stats")
        _log(log, f"weights loaded from {init_from}")
    elif vae_from:
        import diffusers
        comps["vae"] = diffusers.AutoencoderKL.from_pretrained(str(Path(vae_from) / "vae"), dtype=torch.float32)
        meta["vae_from"] = str(vae_from)
        meta["vae_latent_stats"] = _training_info(Path(vae_from)).get("vae_latent_stats")
        _log(log, f"vae loaded from {vae_from}")
    else:
        if resume and stats_path.exists():
            comps["vae"].load_state_dict(torch.load(state_dir / "vae.pt", map_location="cpu",
                                                    weights_only=False)["model"])
            stats = json.loads(stats_path.read_text())
            _log(log, "vae: phase 1 already done, loaded")
        else:
            t_vae = time.time()
            stats = train_vae(comps["vae"], steps=r.vae_steps, batch=r.vae_batch, size=r.size, device=device,
                              state_dir=state_dir, resume=resume, seed=r.seed, lr=r.vae_lr, kl_weight=r.vae_kl, log=log,
                              on_checkpoint=vae_on_checkpoint, workers=r.workers, object_weight=r.vae_object_weight)
            stats["wall_s"] = round(time.time() - t_vae, 1)
            stats_path.write_text(json.dumps(stats))
        comps["vae"].register_to_config(scaling_factor=1.0 / stats["std"], shift_factor=stats["mean"])
        meta["vae_latent_stats"] = stats
    comps["vae"] = comps["vae"].to("cpu").float()
    res = train_denoiser(arch, comps, r, device=device, state_dir=state_dir, resume=resume, out=out,
                         ckpt_every=ckpt_every, meta=meta, log=log, on_checkpoint=on_checkpoint, deadline=deadline)
    res["total_wall_s"] = time.time() - t_start
    _log(log, f"done: {res}")
    if log:
        log.close()
    return res


def command_line(arch: str, out, r: Recipe, device: str = "cpu", vae_from=None, init_from=None) -> str:
    """The train command that reproduces recipe ``r`` (every setting that differs from the defaults)."""
    cmd = f"python -m attnlab.toyworld.train --arch {arch} --out {out}"
    for f in fields(Recipe):
        v = getattr(r, f.name)
        if v != f.default:
            flag = "--" + f.name.replace("_", "-")
            if isinstance(v, bool):
                cmd += f" {flag}" if v else ""
            elif isinstance(v, tuple):
                cmd += f" {flag} {','.join(map(str, v))}"
            else:
                cmd += f" {flag} {v}"
    if device != "cpu":
        cmd += f" --device {device}"
    for name, v in (("--vae-from", vae_from), ("--init-from", init_from)):
        if v:
            cmd += f" {name} {v}"
    return cmd


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=("sd", "flux"), default="sd")
    p.add_argument("--out", required=True)
    for f in fields(Recipe):  # every recipe setting is a flag: --vae-factor 2, --unet-blocks 32,64,128, --zero-snr
        flag, h = "--" + f.name.replace("_", "-"), RECIPE_HELP[f.name] + " (default: %(default)s)"
        if f.type in (bool, "bool"):
            p.add_argument(flag, action="store_true", default=f.default, help=RECIPE_HELP[f.name])
        elif isinstance(f.default, tuple):
            p.add_argument(flag, type=lambda v: tuple(int(x) for x in v.split(",")), default=f.default, help=h)
        else:
            conv = float if isinstance(f.default, float) else int
            p.add_argument(flag, type=conv, default=f.default, help=h)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--state-dir", default=None)
    p.add_argument("--vae-from", default=None, help="reuse the VAE of a saved pipeline folder (e.g. models/toy/sd)")
    p.add_argument("--init-from", default=None, help="start from a saved pipeline folder's weights")
    p.add_argument("--ckpt-every", type=int, default=250)
    p.add_argument("--tiny", action="store_true", help="tiny components (smoke tests)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop (weights saved) after this much wall time")
    p.add_argument("--log-file", default=None)
    a = p.parse_args(argv)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but torch.cuda.is_available() is False")
    settings = {f.name: getattr(a, f.name) for f in fields(Recipe)}
    train(a.arch, a.out, device=a.device, resume=a.resume, state_dir=a.state_dir, vae_from=a.vae_from,
          init_from=a.init_from, ckpt_every=a.ckpt_every, tiny=a.tiny, log_file=a.log_file, max_minutes=a.max_minutes,
          **settings)


if __name__ == "__main__":
    main()
