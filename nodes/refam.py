"""ComfyUI node "RefAM Segment": referring segmentation read from the model's image↔text attention
(RefAM, arXiv 2509.22650).

The node encodes the expression itself (CLIP input) because the appended attention magnets must be part of
the text before it is encoded, and because the stop-word bookkeeping needs the tokens. It runs ONE model call
per image at the chosen noise level through ComfyUI's own sampling path (cfg 1) with the map recorder
patched in, and returns the mask, the soft heatmap and an overlay.
"""

from __future__ import annotations

import re

import numpy as np
import torch

from ..processors.host_comfy import plan_for
from ..processors.host_comfy.model_plan import plan_sites
from ..processors.host_comfy.single_pass import forward_once
from ..processors.refam import GAS_MODES, MAP_MODES
from ..processors.refam_heatmap import MASK_MODES, THRESHOLDS
from ..processors.refam_run import RefAMOptions, Words, finish, recorder_for
from ..processors.refam_tokens import DEFAULT_MAGNETS, token_sets_from_pieces
from .host import patch
from .specs import CATEGORY, NodeSpec, Output, Param

#: ComfyUI tokenizer keys whose tokens form the model's text sequence, per family, in sequence order
TEXT_KEYS = {"flux": (("t5xxl",),), "unet": (("l", "g"),), "wan": (("umt5xxl", "t5xxl"),), "pixart": (("t5xxl",),),
             "sd3": (("l", "g"), ("t5xxl",))}


def parse_layers(text: str):
    """"" -> None (the family default); "10-56", "3, 5, 7-9" -> sorted layer indices."""
    text = text.strip()
    if not text:
        return None
    out = set()
    for part in re.split(r"[,\s]+", text):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise ValueError(f"RefAM layers: cannot read {part!r}; use numbers and ranges, e.g. '10-56' or '3, 5, 7-9'")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise ValueError(f"RefAM layers: range {part!r} runs backwards")
        out.update(range(lo, hi + 1))
    return sorted(out)


def _sd_tokenizer(clip, key: str):
    tok = clip.tokenizer
    for name in (key, f"clip_{key}"):
        sub = getattr(tok, name, None)
        if sub is not None and hasattr(sub, "tokenizer"):
            return sub
    raise ValueError(f"the CLIP's tokenizer has no {key!r} part")


def _segment(clip, key: str, batches, prompt, offset: int):
    """TokenSets of one tokenizer's part of the text sequence (all its 77/… token batches, in order)."""
    sd = _sd_tokenizer(clip, key)
    ids = [int(t[0]) for batch in batches for t in batch]
    pieces = sd.tokenizer.convert_ids_to_tokens(ids)
    start, end, pad = getattr(sd, "start_token", None), getattr(sd, "end_token", None), getattr(sd, "pad_token", None)
    specials, seen_end = [], False
    n = 0
    for batch in batches:
        seen_end = False
        for j, t in enumerate(batch):
            tid = int(t[0])
            if j == 0 and start is not None and tid == start:
                specials.append("bos")
            elif end is not None and tid == end and not seen_end:
                specials.append("eos")
                seen_end = True
            elif seen_end or (pad is not None and tid == pad and pad != start):
                specials.append("pad")
            else:
                specials.append(None)
            n += 1
    return token_sets_from_pieces(pieces, specials, prompt, offset)


def comfy_token_sets(clip, tokens: dict, family: str, text_segment: str, prompt) -> list:
    """Token sets of the model's text sequence from ComfyUI's `clip.tokenize(...)` output."""
    groups = TEXT_KEYS.get(family)
    if groups is None:
        raise ValueError(f"RefAM does not know where the text tokens sit in {family} models")
    sets, offset = [], 0
    for i, group in enumerate(groups):
        key = next((k for k in group if k in tokens), None)
        if key is None:
            if family == "sd3" and i == 1 and text_segment == "clip":
                break
            raise ValueError(f"the CLIP gives tokens {sorted(tokens)}, none of {list(group)} that a {family} model "
                             "reads; connect the text encoder that matches the model")
        batches = tokens[key]
        n = sum(len(b) for b in batches)
        wanted = family != "sd3" or (text_segment in ("clip", "both") if i == 0 else text_segment in ("t5", "both"))
        if wanted:
            sets.append(_segment(clip, key, batches, prompt, offset))
        offset += n
    if not sets:
        raise ValueError(f"text_segment {text_segment!r} selects no tokens of this CLIP")
    return sets


def sam_predictor(sam2_model):
    """An image predictor from a SAM2 node pack's model: a predictor object itself, or a dict holding the SAM2
    model under "model" (as ComfyUI-segment-anything-2 passes it), wrapped in that package's SAM2ImagePredictor."""
    if sam2_model is None or (hasattr(sam2_model, "set_image") and hasattr(sam2_model, "predict")):
        return sam2_model
    model = sam2_model.get("model") if isinstance(sam2_model, dict) else getattr(sam2_model, "model", None)
    if model is None:
        raise ValueError(f"sam2_model: expected a SAM2 image predictor or a dict with the SAM2 model under 'model'; "
                         f"got {type(sam2_model).__name__}")
    import importlib  # noqa: PLC0415

    module = type(model).__module__
    roots = [module.split(".modeling")[0], "sam2"] if ".modeling" in module else ["sam2"]
    for root in roots:
        try:
            return importlib.import_module(f"{root}.sam2_image_predictor").SAM2ImagePredictor(model)
        except (ImportError, AttributeError):
            continue
    raise ValueError("sam2_model: could not find SAM2ImagePredictor next to the model's code; install the sam2 package")


def _check_image(image) -> None:
    if not torch.is_tensor(image) or image.ndim != 4 or image.shape[-1] not in (3, 4):
        raise ValueError(f"image must be a ComfyUI IMAGE [batch, height, width, 3]; got shape "
                         f"{tuple(getattr(image, 'shape', ()))}")


def _image_batches(image: torch.Tensor, family: str):
    pixels = image[..., :3].float().clamp(0, 1)
    return [pixels] if family == "wan" else [pixels[i:i + 1] for i in range(pixels.shape[0])]


def refam_segment(model, clip, vae, image, expression: str, caption: str, noise: float, layers: str, map_mode: str,
                  gas_mode: str, magnets: str, mask_mode: str, threshold: str, seed: int, sam2_model=None):
    opts = RefAMOptions(sigmas=(float(noise),), seed=int(seed), layers=parse_layers(layers), map_mode=map_mode,
                        caption=caption, caption_mode="caption+expr" if caption.strip() else "expr",
                        magnets=tuple(magnets.split()), gas_mode=gas_mode, mask_mode=mask_mode, threshold=threshold)
    opts.validate()
    if mask_mode != "threshold" and sam2_model is None:
        raise ValueError(f"RefAM mask_mode {mask_mode!r} needs a sam2_model input (from a SAM2 node pack); use "
                         "'threshold' without one")
    _check_image(image)
    predictor = sam_predictor(sam2_model)
    plan = plan_for(model.model)
    px = plan.token_scale
    H, W = int(image.shape[1]), int(image.shape[2])
    if H % px[1] or W % px[2]:
        raise ValueError(f"image size {W}×{H} is not a multiple of {px[1]} ({plan.family}: VAE factor × patch size); "
                         "resize or crop it first (e.g. ImageScale)")
    prompt = opts.prompt(expression)
    tokens = clip.tokenize(prompt.text)
    words = Words.of(prompt, comfy_token_sets(clip, tokens, plan.family, opts.text_segment, prompt),
                     opts.filter_stopwords)
    sites = plan_sites(plan, model.model)
    recorder = recorder_for(opts, words, plan.family, [(s.layer, s.kind) for s, _ in sites], plan.double_blocks)
    patched = patch(model, [recorder])
    positive = clip.encode_from_tokens_scheduled(tokens)
    masks, heats, overlays = [], [], []
    for pixels in _image_batches(image, plan.family):
        recorder.clear()
        recorder.at(float(noise))
        forward_once(patched, vae.encode(pixels), positive, float(noise), int(seed))
        uint8 = (pixels * 255).round().to(torch.uint8).cpu().numpy()
        frames = uint8
        if plan.family == "wan":
            st = plan.vae_scale[0]
            starts = [0] + list(range(1, len(uint8), st))
            frames = uint8[starts]
        res = finish(recorder, words, opts, frames, sam=predictor)
        mask, heat = res.mask, res.heatmap
        over = res.overlay if isinstance(res.overlay, list) else [res.overlay]
        if plan.family == "wan":  # back to one per input frame: each latent frame covers its frames
            index = [max(j for j, s in enumerate(starts) if s <= i) for i in range(len(uint8))]
            mask, heat, over = mask[index], heat[index], [over[j] for j in index]
        masks.append(mask.reshape(-1, H, W).float())
        heats.append(heat.reshape(-1, H, W).float())
        overlays += [torch.from_numpy(np.asarray(o, dtype=np.float32) / 255.0) for o in over]
    return torch.cat(masks), torch.cat(heats), torch.stack(overlays)


REFAM = NodeSpec(
    node_id="AttnlabRefAM",
    display_name="RefAM Segment",
    category=CATEGORY,
    description=("Zero-shot referring segmentation (RefAM, arXiv 2509.22650): one model call on the noised image with "
                 "the expression plus appended stop-word 'attention magnets' as the prompt; the image→text attention of "
                 "the deeper layers, without stop words, magnets and global attention sinks, is the heatmap. Mask by "
                 "Otsu threshold, or by SAM2 point/box prompts from a SAM2 node pack. Same options as the diffusers "
                 "RefAMPipeline; see docs/refam.md."),
    inputs=(
        Param("model", "MODEL"),
        Param("clip", "CLIP", tooltip="the text encoder that matches the model (the node encodes the expression + magnets)"),
        Param("vae", "VAE"),
        Param("image", "IMAGE", tooltip="sides must be multiples of the model's pixels per token (16 for FLUX/SD3/Wan)"),
        Param("expression", "STRING", default="the red circle on the left", tooltip="what to segment"),
        Param("caption", "STRING", default="", tooltip="optional scene caption put before the expression"),
        Param("noise", "FLOAT", default=0.5, min=0.01, max=0.99, step=0.01,
              tooltip="noise level of the single forward (σ for flow models; timestep/1000 for SD)"),
        Param("layers", "STRING", default="", tooltip="layers to read, e.g. '10-56'; empty = default (FLUX 10–56)"),
        Param("map_mode", "COMBO", default="img2txt_textsoftmax", options=MAP_MODES),
        Param("gas_mode", "COMBO", default="drop", options=GAS_MODES,
              tooltip="global attention sinks: drop from the maps (read-only), suppress in the forward, or redirect "
                      "to appended '.' tokens"),
        Param("magnets", "STRING", default=" ".join(DEFAULT_MAGNETS),
              tooltip="stop words appended to the expression (space-separated); empty for none"),
        Param("mask_mode", "COMBO", default="threshold", options=MASK_MODES),
        Param("threshold", "COMBO", default="otsu", options=THRESHOLDS),
        Param("seed", "INT", default=0, min=0, max=2**32 - 1, step=1),
        Param("sam2_model", "SAM2MODEL", optional=True, tooltip="optional, from a SAM2 node pack, for the sam_* modes"),
    ),
    outputs=(Output("MASK", "mask"), Output("MASK", "heatmap"), Output("IMAGE", "overlay")),
    run=refam_segment,
)
