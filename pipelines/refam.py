"""RefAMPipeline: zero-shot referring segmentation with a stock diffusers pipeline (FLUX, SD3, SDXL/SD1.5,
Wan video; PixArt's T5 cross-attention works the same way).

    seg = RefAMPipeline.from_pipe(pipe)
    out = seg(image, "the red circle on the left")
    out.heatmap, out.mask, out.overlay

Per noise level σ: the image latent is forward-noised with one fixed noise draw and the denoiser runs ONCE
on it with the expression (+ magnets) as the prompt; the TextMaps recorder reads the image↔text attention
of the selected layers on the way. Nothing is sampled and no CFG pass is run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from ..processors.host_diffusers.model_info import attention_sites, family_of
from ..processors.host_diffusers.session import Session, denoiser_names
from ..processors.refam_run import RefAMOptions, RefAMResult, Words, finish, recorder_for
from ..processors.refam_tokens import token_sets
from ..processors.params import InvalidParameter, ParameterTypeError, int_list, integer, number
from ..processors.params import text as text_param
from .wrapper import PipelineWrapper, refuse_nesting

FAMILIES = ("flux", "sd3", "unet", "wan", "pixart")


def check_options(opts: RefAMOptions) -> None:
    """RefAMOptions.validate plus the numeric options a user passes most (checked with their names)."""
    if opts.layers is not None:
        int_list("layers", opts.layers, 0, 10_000)
    number("guidance", opts.guidance, 0.0, 100.0)
    integer("seed", opts.seed, 0, 2**63 - 1)
    opts.validate()


class RefAMPipeline(PipelineWrapper):
    def __init__(self, pipe, **options):
        names = denoiser_names(pipe)
        if not names:
            raise ValueError(f"{type(pipe).__name__} has no unet/transformer; RefAM needs a diffusers text-to-image "
                             "or text-to-video pipeline")
        refuse_nesting(self, pipe)
        self.pipe = pipe
        self.denoiser = getattr(pipe, names[0])
        self.family = family_of(self.denoiser)
        self.options = RefAMOptions().with_(**options)
        check_options(self.options)
        self.hooks = []
        self.last_timings: dict = {}

    def __repr__(self) -> str:
        return f"RefAMPipeline({type(self.pipe).__name__}, family={self.family})"

    # --- geometry -------------------------------------------------------------------------------
    @property
    def vae_scale(self) -> int:
        p = self.pipe
        return int(getattr(p, "vae_scale_factor_spatial", None) or getattr(p, "vae_scale_factor", 8))

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: VAE factor × patch (UNet: × its downsampling)."""
        cfg = self.denoiser.config
        if self.family == "unet":
            return self.vae_scale * 2 ** (len(cfg.down_block_types) - 1)
        if self.family == "flux":
            return self.vae_scale * 2
        if self.family == "wan":
            return self.vae_scale * int(cfg.patch_size[1])
        return self.vae_scale * int(cfg.patch_size)

    def _pixels(self, image, resize: bool):
        """[F, 3, H, W] in [-1, 1] (resized to the model's multiple if `resize`) and the given [F, H, W, 3] uint8 from a PIL image, an array, a tensor or a frame list."""
        frames = image if isinstance(image, (list, tuple)) else [image]
        arrays = []
        for f in frames:
            if torch.is_tensor(f):
                a = f.detach().cpu().float()
                a = a.permute(1, 2, 0) if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4) else a
                a = a.numpy()
                a = (a * 255.0) if a.max() <= 1.0 else a
            elif hasattr(f, "convert"):
                a = np.asarray(f.convert("RGB"))
            elif isinstance(f, np.ndarray):
                a = f
                if a.dtype.kind not in "buif":
                    raise ParameterTypeError(f"image must be a numeric array; got dtype {a.dtype}")
                a = (a * 255.0) if a.dtype != np.uint8 and a.size and a.max() <= 1.0 else a
            else:
                raise ParameterTypeError(f"image must be a PIL image, an H×W×3 array or a 3×H×W tensor (or a list of "
                                         f"frames); got {type(f).__name__}")
            if not np.isfinite(np.asarray(a, dtype=np.float64)).all():
                raise InvalidParameter("image contains NaN or infinite values")
            if a.ndim == 2:
                a = np.repeat(a[..., None], 3, axis=-1)
            if a.ndim != 3 or a.shape[-1] not in (3, 4):
                raise ValueError(f"RefAM image must be H×W×3 (RGB) or 3×H×W; got shape {tuple(a.shape)}")
            arrays.append(np.clip(a[..., :3], 0, 255).astype(np.uint8))
        sizes = {a.shape[:2] for a in arrays}
        if len(sizes) != 1:
            raise ValueError(f"all video frames must have one size; got {sorted(sizes)}")
        H, W = arrays[0].shape[:2]
        m = self.size_multiple
        if H % m or W % m:
            if not resize:
                fit = (max(m, round(H / m) * m), max(m, round(W / m) * m))
                raise ValueError(f"image size {W}×{H} is not a multiple of {m} ({self.family}: VAE factor × patch size); "
                                 f"resize it (e.g. to {fit[1]}×{fit[0]}) or pass resize=True")
            from PIL import Image

            Hn, Wn = max(m, round(H / m) * m), max(m, round(W / m) * m)
            model_in = np.stack([np.asarray(Image.fromarray(a).resize((Wn, Hn), Image.BICUBIC)) for a in arrays])
        else:
            model_in = np.stack(arrays)
        x = torch.from_numpy(model_in).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        return x, np.stack(arrays)  # results come back at the caller's size

    # --- one forward ----------------------------------------------------------------------------
    @torch.no_grad()
    def _latents(self, x: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        dev, dtype = vae.device, vae.dtype
        if self.family == "wan":
            z = vae.encode(x.permute(1, 0, 2, 3)[None].to(dev, dtype)).latent_dist.mode()
            mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(z)
            std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(z)
            return (z - mean) / std
        if x.shape[0] != 1:
            raise ValueError(f"{self.family} models segment one image; got {x.shape[0]} frames (videos need Wan)")
        z = vae.encode(x.to(dev, dtype)).latent_dist.mode()
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (z - shift) * vae.config.scaling_factor

    @torch.no_grad()
    def _text(self, prompt, opts: RefAMOptions, max_sequence_length: Optional[int]):
        """Forward keyword arguments for the prompt, and the token sets of the model's text span."""
        p, fam, dev = self.pipe, self.family, self.denoiser.device
        text, prompt = prompt.text, prompt
        if fam == "flux":
            L = max_sequence_length or 512
            pe, pooled, text_ids = p.encode_prompt(prompt=text, prompt_2=None, device=dev, max_sequence_length=L)
            sets = [token_sets(p.tokenizer_2, prompt, L)]
            return dict(encoder_hidden_states=pe, pooled_projections=pooled, txt_ids=text_ids), sets
        if fam == "sd3":
            L = max_sequence_length or 256
            pe, _, pooled, _ = p.encode_prompt(text, None, None, device=dev, do_classifier_free_guidance=False,
                                               max_sequence_length=L)
            n_clip = p.tokenizer_max_length
            sets = []
            if opts.text_segment in ("clip", "both"):
                sets.append(token_sets(p.tokenizer, prompt, n_clip))
            if opts.text_segment in ("t5", "both"):
                if getattr(p, "tokenizer_3", None) is None:
                    raise ValueError("text_segment 't5' needs SD3's T5 encoder; this pipeline has none (use 'clip')")
                sets.append(token_sets(p.tokenizer_3, prompt, L, offset=n_clip))
            return dict(encoder_hidden_states=pe, pooled_projections=pooled), sets
        if fam == "unet":
            n = p.tokenizer.model_max_length
            sets = [token_sets(p.tokenizer, prompt, n)]
            if hasattr(p, "text_encoder_2"):  # SDXL
                pe, _, pooled, _ = p.encode_prompt(text, device=dev, do_classifier_free_guidance=False)
                return dict(encoder_hidden_states=pe, added=pooled), sets
            pe, _ = p.encode_prompt(text, dev, 1, False)
            return dict(encoder_hidden_states=pe), sets
        if fam == "wan":
            L = max_sequence_length or 512
            pe, _ = p.encode_prompt(text, do_classifier_free_guidance=False, max_sequence_length=L, device=dev)
            return dict(encoder_hidden_states=pe), [token_sets(p.tokenizer, prompt, L)]
        if fam == "pixart":
            L = max_sequence_length or 300
            pe, mask, _, _ = p.encode_prompt(text, do_classifier_free_guidance=False, device=dev,
                                             max_sequence_length=L, clean_caption=False)
            return dict(encoder_hidden_states=pe, encoder_attention_mask=mask), [token_sets(p.tokenizer, prompt, L)]
        raise ValueError(f"RefAM does not support {fam} models")

    @torch.no_grad()
    def _forward(self, z0: torch.Tensor, noise: torch.Tensor, sigma: float, text: dict):
        """One denoiser forward on the latent noised to `sigma`; returns the denoiser's output (discarded by RefAM)."""
        den, fam = self.denoiser, self.family
        dtype = den.dtype
        if fam == "unet" or (fam == "pixart" and not hasattr(self.pipe.scheduler.config, "shift")):
            alphas = self.pipe.scheduler.alphas_cumprod
            t = int(round(sigma * (len(alphas) - 1)))
            a = float(alphas[t])
            zt = a ** 0.5 * z0 + (1 - a) ** 0.5 * noise
            timestep = torch.tensor([t], device=den.device)
        else:
            zt = (1 - sigma) * z0 + sigma * noise
            timestep = torch.tensor([sigma * 1000.0], device=den.device)
        zt = zt.to(dtype)
        if fam == "flux":
            b, c, h, w = zt.shape
            packed = self.pipe._pack_latents(zt, b, c, h, w)
            ids = self.pipe._prepare_latent_image_ids(b, h // 2, w // 2, den.device, dtype)
            guidance = torch.full([b], self.options.guidance, device=den.device) if den.config.guidance_embeds else None
            return den(hidden_states=packed, timestep=timestep / 1000.0, guidance=guidance, img_ids=ids, return_dict=False,
                **text)
        elif fam == "sd3":
            return den(hidden_states=zt, timestep=timestep, return_dict=False, **text)
        elif fam == "unet":
            kw = dict(text)
            pooled = kw.pop("added", None)
            if pooled is not None:
                h, w = zt.shape[-2] * self.vae_scale, zt.shape[-1] * self.vae_scale
                proj = self.pipe.text_encoder_2.config.projection_dim
                time_ids = self.pipe._get_add_time_ids((h, w), (0, 0), (h, w), dtype, text_encoder_projection_dim=proj)
                kw["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids.to(den.device)}
            return den(zt, timestep, return_dict=False, **kw)
        elif fam == "wan":
            return den(hidden_states=zt, timestep=timestep, return_dict=False, **text)
        else:  # pixart
            return den(zt, timestep=timestep, added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False,
                **text)

    # --- the call -------------------------------------------------------------------------------
    def prepare(self, image, expression: str, opts: RefAMOptions, resize: bool = False,
                max_sequence_length: Optional[int] = None, generator: Optional[torch.Generator] = None) -> Prepared:
        """Everything before the forwards: the prompt and its words, the image latent, the noise, the text
        inputs and the recorder. Raises ValueError for bad input before any model runs."""
        prompt = opts.prompt(text_param("expression", expression))
        if max_sequence_length is not None:
            integer("max_sequence_length", max_sequence_length, 1, 4096)
        if isinstance(image, (list, tuple)) and self.family != "wan":
            raise ValueError(f"a list of frames needs a video model (Wan); this is a {self.family} pipeline")
        x, uint8 = self._pixels(image, resize)
        st = int(getattr(self.pipe, "vae_scale_factor_temporal", 4))
        if self.family == "wan" and (len(uint8) - 1) % st:
            raise ValueError(f"Wan takes 1 + {st}·k frames (1, {1 + st}, {1 + 2 * st}, ...); got {len(uint8)}")
        text, segments = self._text(prompt, opts, max_sequence_length)
        words = Words.of(prompt, segments, opts.filter_stopwords)
        if not words.content:
            raise InvalidParameter(f"expression {expression!r} has no content word to segment (only stop words or "
                                   "magnets); name the object, e.g. 'the red circle'")
        sites = [(s.site.layer, s.site.kind) for s in attention_sites(self.denoiser)]
        doubles = len(getattr(self.denoiser, "transformer_blocks", [])) if self.family == "flux" else 0
        recorder = recorder_for(opts, words, self.family, sites, doubles)
        z0 = self._latents(x)
        gen = generator or torch.Generator().manual_seed(int(opts.seed))
        noise = torch.randn(z0.shape, generator=gen, dtype=torch.float32).to(z0.device, z0.dtype)
        frames = uint8[_latent_frame_starts(len(uint8), self.pipe)] if self.family == "wan" else uint8
        return Prepared(words, frames, z0, noise, text, recorder)

    def record(self, prep: Prepared, sigmas: Sequence[float]) -> None:
        """One forward per noise level with the recorder installed (all rows are the expression: role cond)."""
        with Session(self.denoiser, [prep.recorder], vae_scale=self.vae_scale) as session, session.roles_for("cond"):
            session.state.begin_run(prep.z0)
            for sigma in sigmas:
                prep.recorder.at(float(sigma))
                self._forward(prep.z0, prep.noise, float(sigma), prep.text)
            prep.recorder.flush()

    def __call__(self, image, expression: str, *, sam=None, resize: bool = False,
                 max_sequence_length: Optional[int] = None, generator: Optional[torch.Generator] = None,
                 **options) -> RefAMResult:
        """Segment the object `expression` refers to in `image` (PIL, H×W×3 array, 3×H×W tensor in [0, 1]; a list
        of 1 + 4k frames for Wan). Options override the pipeline's (see `RefAMOptions`). `sam`: a SAM/SAM2 image
        predictor for mask_mode "sam_point"/"sam_box"."""
        opts = self.options.with_(**options) if options else self.options
        check_options(opts)
        if opts.mask_mode != "threshold" and sam is None:
            raise ValueError(f"mask_mode {opts.mask_mode!r} needs a SAM/SAM2 image predictor (sam=...); use "
                             "mask_mode='threshold' without one")
        t0 = time.perf_counter()
        prep = self.prepare(image, expression, opts, resize, max_sequence_length, generator)
        t1 = time.perf_counter()
        self.record(prep, opts.sigmas)
        t2 = time.perf_counter()
        result = finish(prep.recorder, prep.words, opts, prep.frames, sam=sam)
        result.timings = {"encode_s": t1 - t0, "forward_s": t2 - t1, "total_s": time.perf_counter() - t0,
                          "forwards": len(opts.sigmas)}
        self.last_timings = result.timings
        return result


@dataclass
class Prepared:
    words: Words
    frames: np.ndarray  # [F, H, W, 3] uint8, one per latent frame
    z0: torch.Tensor
    noise: torch.Tensor
    text: dict
    recorder: object


def _latent_frame_starts(n_frames: int, pipe) -> list[int]:
    """The first real frame each latent frame of a causal video VAE covers (0, 1, 1+st, 1+2·st, ...)."""
    st = int(getattr(pipe, "vae_scale_factor_temporal", 4))
    return [0] + list(range(1, n_frames, st))


def refam(pipe, **options) -> RefAMPipeline:
    """`RefAMPipeline.from_pipe(pipe, **options)`."""
    return RefAMPipeline.from_pipe(pipe, **options)


def segment_frames(result: RefAMResult, n_frames: int, pipe) -> Sequence[torch.Tensor]:
    """Per real frame masks from a video result's per-latent-frame masks (each latent frame covers its frames)."""
    starts = _latent_frame_starts(n_frames, pipe)
    out = []
    for i in range(n_frames):
        f = max(j for j, s in enumerate(starts) if s <= i)
        out.append(result.mask[f])
    return out
