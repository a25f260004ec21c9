"""Writes the example workflows in workflows/ (ComfyUI UI format 0.4) from compact graph descriptions.

    python scripts/make_workflows.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from workflow_tools import WIDGET_TYPES, node_defs  # noqa: E402

DEFS = node_defs()


class Graph:
    def __init__(self):
        self.nodes, self.links = [], []

    def node(self, type_, widgets=(), pos=(0, 0), title=None):
        defn = DEFS[type_]
        sockets = [k for k in defn["input_order"] if defn["inputs"][k]["type"] not in WIDGET_TYPES]
        node = {
            "id": len(self.nodes) + 1, "type": type_, "pos": list(pos), "size": [320, 60 + 26 * len(defn["input_order"])],
            "flags": {}, "order": len(self.nodes), "mode": 0,
            "inputs": [{"name": k, "type": defn["inputs"][k]["type"], "link": None} for k in sockets],
            "outputs": [{"name": name, "type": t, "links": [], "slot_index": i}
                        for i, (t, name) in enumerate(zip(defn["output"], defn["output_name"]))],
            "properties": {"Node name for S&R": type_},
            "widgets_values": list(widgets),
        }
        if title:
            node["title"] = title
        self.nodes.append(node)
        return node["id"]

    def link(self, src, slot, dst, input_name):
        lid = len(self.links) + 1
        src_node, dst_node = self.nodes[src - 1], self.nodes[dst - 1]
        typ = src_node["outputs"][slot]["type"]
        idx = next(i for i, inp in enumerate(dst_node["inputs"]) if inp["name"] == input_name)
        dst_node["inputs"][idx]["link"] = lid
        src_node["outputs"][slot]["links"].append(lid)
        self.links.append([lid, src, slot, dst, idx, typ])

    def dump(self, note):
        return {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
                "links": self.links, "groups": [], "config": {},
                "extra": {"attnlab_note": note, "ds": {"scale": 0.8, "offset": [0, 0]}}, "version": 0.4}


NEGATIVE = "blurry, lowres, watermark"


def checkpoint_graph(ckpt: str, patch: tuple[str, list], prompt: str, size: int, steps: int, cfg: float,
                     save: str, note: str):
    """SD1.5/SDXL-style graph: checkpoint -> attnlab node -> KSampler with a positive and a negative prompt."""
    g = Graph()
    model = g.node("CheckpointLoaderSimple", [ckpt], (0, 120))
    node = g.node(patch[0], patch[1], (380, 0))
    pos = g.node("CLIPTextEncode", [prompt], (380, 380), "Positive")
    neg = g.node("CLIPTextEncode", [NEGATIVE], (380, 600), "Negative")
    lat = g.node("EmptyLatentImage", [size, size, 1], (380, 820))
    ks = g.node("KSampler", [42, "fixed", steps, cfg, "euler", "normal", 1.0], (760, 120))
    dec = g.node("VAEDecode", [], (1120, 120))
    out = g.node("SaveImage", [save], (1340, 120))
    g.link(model, 0, node, "model"); g.link(model, 1, pos, "clip"); g.link(model, 1, neg, "clip")
    g.link(node, 0, ks, "model"); g.link(pos, 0, ks, "positive"); g.link(neg, 0, ks, "negative")
    g.link(lat, 0, ks, "latent_image"); g.link(ks, 0, dec, "samples"); g.link(model, 2, dec, "vae")
    g.link(dec, 0, out, "images")
    return g.dump(note)


def flux_graph(patch: tuple[str, list], prompt: str, size: int, save: str, note: str):
    """FLUX.1-dev graph: UNET/CLIP/VAE loaders -> attnlab node -> KSampler at cfg 1 with FluxGuidance 3.5."""
    g = Graph()
    unet = g.node("UNETLoader", ["flux1-dev.safetensors", "default"], (0, 0))
    clip = g.node("DualCLIPLoader", ["clip_l.safetensors", "t5xxl_fp16.safetensors", "flux", "default"], (0, 160))
    vae = g.node("VAELoader", ["ae.safetensors"], (0, 360))
    node = g.node(patch[0], patch[1], (380, 0))
    pos = g.node("CLIPTextEncode", [prompt], (380, 380), "Prompt")
    guide = g.node("FluxGuidance", [3.5], (760, 380))
    neg = g.node("ConditioningZeroOut", [], (760, 520))
    lat = g.node("EmptySD3LatentImage", [size, size, 1], (380, 600))
    ks = g.node("KSampler", [42, "fixed", 20, 1.0, "euler", "simple", 1.0], (1100, 120))
    dec = g.node("VAEDecode", [], (1460, 120))
    out = g.node("SaveImage", [save], (1680, 120))
    g.link(unet, 0, node, "model"); g.link(clip, 0, pos, "clip"); g.link(pos, 0, guide, "conditioning")
    g.link(pos, 0, neg, "conditioning"); g.link(node, 0, ks, "model"); g.link(guide, 0, ks, "positive")
    g.link(neg, 0, ks, "negative"); g.link(lat, 0, ks, "latent_image"); g.link(ks, 0, dec, "samples")
    g.link(vae, 0, dec, "vae"); g.link(dec, 0, out, "images")
    return g.dump(note)


def sip_graph(ckpt: str, patch: tuple[str, list], grow_px: int, save: str, note: str):
    """Attentive Eraser's stochastic inpainting (SIP) the ComfyUI way: LoadImage (paint the object in the Mask
    Editor) -> GrowMask -> the attnlab node and SetLatentNoiseMask; VAEEncode -> KSampler (ddim, ddim_uniform,
    50 steps, denoise 0.8, cfg 1, empty prompts)."""
    g = Graph()
    model = g.node("CheckpointLoaderSimple", [ckpt], (0, 120))
    image = g.node("LoadImage", ["example.png", "image"], (0, 420), "Image (paint the object in the Mask Editor)")
    grow = g.node("GrowMask", [grow_px, True], (380, 700))
    node = g.node(patch[0], patch[1], (760, 0))
    pos = g.node("CLIPTextEncode", [""], (380, 260), "Positive (empty)")
    neg = g.node("CLIPTextEncode", [""], (380, 480), "Negative (empty)")
    enc = g.node("VAEEncode", [], (760, 560))
    noise_mask = g.node("SetLatentNoiseMask", [], (760, 700))
    ks = g.node("KSampler", [42, "fixed", 50, 1.0, "ddim", "ddim_uniform", 0.8], (1140, 120))
    dec = g.node("VAEDecode", [], (1500, 120))
    out = g.node("SaveImage", [save], (1720, 120))
    g.link(model, 0, node, "model"); g.link(model, 1, pos, "clip"); g.link(model, 1, neg, "clip")
    g.link(image, 1, grow, "mask"); g.link(grow, 0, node, "mask")
    g.link(image, 0, enc, "pixels"); g.link(model, 2, enc, "vae")
    g.link(enc, 0, noise_mask, "samples"); g.link(grow, 0, noise_mask, "mask")
    g.link(node, 0, ks, "model"); g.link(pos, 0, ks, "positive"); g.link(neg, 0, ks, "negative")
    g.link(noise_mask, 0, ks, "latent_image"); g.link(ks, 0, dec, "samples"); g.link(model, 2, dec, "vae")
    g.link(dec, 0, out, "images")
    return g.dump(note)


ERASER_NOTE = (
    "Object removal with Attentive Eraser (AAS + SARG, arXiv 2412.12974), stochastic inpainting as in the paper: "
    "right-click the Load Image node, Open in MaskEditor and paint over the object (painted = removed; GrowMask "
    "widens it by {grow} px for both the redirection and the repainted region). The image is encoded, noised to "
    "denoise 0.8 of a 50-step DDIM schedule and resampled inside the mask only; each step runs one extra pass in "
    "which self-attention of the up-block layers ignores the object, and SARG pushes toward it (scale 9). "
    "cfg 1 and empty prompts as in the official code. Set scale to 0 to compare with plain inpainting.")


def sd15_eraser():
    return sip_graph(
        "v1-5-pruned-emaonly.safetensors", ("AttnlabAttentiveEraser", [9.0, 0.3, 9, 0.0, ""]), 3,
        "attnlab_eraser_sd15", "SD1.5 at 512x512 (the official model is SD2.1-base, same layers). " +
        ERASER_NOTE.format(grow=3))


def sdxl_eraser():
    return sip_graph(
        "sd_xl_base_1.0.safetensors", ("AttnlabAttentiveEraser", [9.0, 0.3, 9, 0.0, ""]), 15,
        "attnlab_eraser_sdxl", "SDXL base at 1024x1024 (official: up-block layers 34-69, the default). " +
        ERASER_NOTE.format(grow=15))

def sd15_entropy():
    return checkpoint_graph(
        "v1-5-pruned-emaonly.safetensors", ("AttnlabEntropyScaling", [1.0, 0, 0, "joint"]),
        "a cozy reading nook with a window seat, warm evening light, detailed", 1024, 25, 7.0, "attnlab_entropy_sd15",
        "SD1.5 sampled at 1024x1024, twice its 512 training size, with entropy scaling. "
        "Set strength to 0 to compare with the stock model.")


def flux_entropy():
    return flux_graph(
        ("AttnlabEntropyScaling", [1.0, 0, 0, "joint"]),
        "an aerial photograph of a winding river through autumn forest", 2048, "attnlab_entropy_flux",
        "FLUX.1-dev at 2048x2048 (4x its 1024 training area) with entropy scaling on every joint and "
        "single block; cfg 1 with FluxGuidance as usual.")


def sdxl_softpag():
    return checkpoint_graph(
        "sd_xl_base_1.0.safetensors", ("AttnlabSoftPAG", [3.0, 1.0, "m0", "none", "identity", "full", -1.0, -1.0, 0.0]),
        "a red fox curled up in fresh snow at dawn, soft light, detailed fur", 1024, 25, 4.0, "attnlab_softpag_sdxl",
        "SDXL with perturbation guidance on the self-attention of the middle block ('m0': all ten "
        "transformer blocks, every head; u = 1 is PAG), CFG 4 + guidance 3 as the PAG authors recommend. "
        "Select heads ('m0:H0-9'), lower u for SoftPAG, or set scale to 0 to compare with the stock model.")


def flux_softpag():
    return flux_graph(
        ("AttnlabSoftPAG", [8.0, 1.0, "L38:H18", "none", "identity", "full", -1.0, -1.0, 0.0]),
        "a lighthouse on a rocky coast, waves, late afternoon", 1024, "attnlab_softpag_flux",
        "FLUX.1-dev with head-level perturbation guidance on one head, L38:H18 (layers: double blocks 0-18, "
        "then single blocks 19-56), w = 8 as HeadHunter uses for FLUX; HeadHunter shows this head for a "
        "'golden hour' look (their FLUX layer numbering is unconfirmed). cfg 1 with FluxGuidance as usual: "
        "the guidance adds w·(cond − perturbed) to the conditional prediction, one extra pass per step.")


ALIGN_WIDGETS = ["qk", 0.0, "fix", "width", "", 0, -1, True]  # AttnlabAlignedGen defaults


def aligned_graph(flux: bool, style: bool, prompt: str, save: str, note: str):
    """A batch of 4 with AlignedGen Batch Align (and, with `style`, a LoadImage style reference as row 0)."""
    g = Graph()
    if flux:
        model = g.node("UNETLoader", ["flux1-dev.safetensors", "default"], (0, 0))
        clip = g.node("DualCLIPLoader", ["clip_l.safetensors", "t5xxl_fp16.safetensors", "flux", "default"], (0, 160))
        vae = g.node("VAELoader", ["ae.safetensors"], (0, 360))
        model_slot, clip_slot, vae_slot, clip_node, vae_node = 0, 0, 0, clip, vae
        lat = g.node("EmptySD3LatentImage", [1024, 1024, 4], (380, 600))
    else:
        model = g.node("CheckpointLoaderSimple", ["sd_xl_base_1.0.safetensors"], (0, 120))
        model_slot, clip_slot, vae_slot, clip_node, vae_node = 0, 1, 2, model, model
        lat = g.node("EmptyLatentImage", [1024, 1024, 4], (380, 600))
    align = g.node("AttnlabAlignedGen", ALIGN_WIDGETS, (380, 0))
    pos = g.node("CLIPTextEncode", [prompt], (380, 360), "Prompt")
    if flux:
        guide = g.node("FluxGuidance", [3.5], (760, 360))
        neg = g.node("ConditioningZeroOut", [], (760, 500))
        ks = g.node("KSampler", [42, "fixed", 30, 1.0, "euler", "simple", 1.0], (1140, 120))
    else:
        neg = g.node("CLIPTextEncode", [NEGATIVE], (380, 460), "Negative")
        ks = g.node("KSampler", [42, "fixed", 50, 5.0, "ddim", "ddim_uniform", 1.0], (1140, 120))
    dec = g.node("VAEDecode", [], (1500, 120))
    out = g.node("SaveImage", [save], (1720, 120))
    g.link(model, model_slot, align, "model"); g.link(clip_node, clip_slot, pos, "clip")
    if flux:
        g.link(pos, 0, guide, "conditioning"); g.link(pos, 0, neg, "conditioning"); g.link(guide, 0, ks, "positive")
    else:
        g.link(clip_node, clip_slot, neg, "clip"); g.link(pos, 0, ks, "positive")
    g.link(neg, 0, ks, "negative")
    if style:
        image = g.node("LoadImage", ["example.png", "image"], (0, 700), "Style image (load your own)")
        ref = g.node("AttnlabAlignedGenReference", [0], (760, 0))
        g.link(align, 0, ref, "model"); g.link(vae_node, vae_slot, ref, "vae"); g.link(image, 0, ref, "image")
        g.link(lat, 0, ref, "latent"); g.link(ref, 0, ks, "model"); g.link(ref, 1, ks, "latent_image")
    else:
        g.link(align, 0, ks, "model"); g.link(lat, 0, ks, "latent_image")
    g.link(ks, 0, dec, "samples"); g.link(vae_node, vae_slot, dec, "vae"); g.link(dec, 0, out, "images")
    return g.dump(note)


ALIGN_NOTE = (
    "Style-aligned batch ({method}): a batch of 4 from one prompt; the first image is the style reference and "
    "the other three attend to its image keys/values in {where} (AdaIN on queries/keys{shift}, key scale λ "
    "{lam}). The reference is exactly what the first latent gives alone. Set enabled to false to compare with "
    "the plain batch; raise scale for more consistency, lower it for more prompt fidelity.")
STYLE_NOTE = (
    " With a style image: AlignedGen Style Reference encodes the loaded image and runs it in lock-step as the "
    "first row (its latent noised to each step's sigma), so the saved batch has 5 images, the first being the "
    "reference.")


def flux_alignedgen():
    return aligned_graph(True, False, "a cat, a dog, a fox and an owl, flat vector illustration, pastel colors",
                         "attnlab_alignedgen_flux", ALIGN_NOTE.format(
                             method="AlignedGen on FLUX.1-dev", where="the single-stream blocks 19-56",
                             shift=", ShiftPE: the reference placed one image to the right", lam="1.1"))


def sdxl_alignedgen():
    return aligned_graph(False, False, "a toy robot, macro photo, 3d game asset", "attnlab_alignedgen_sdxl",
                         ALIGN_NOTE.format(method="StyleAligned on SDXL", where="every self-attention layer",
                                           shift="", lam="1.0"))


def flux_alignedgen_style():
    return aligned_graph(True, True, "a lighthouse on a cliff", "attnlab_alignedgen_style_flux", ALIGN_NOTE.format(
        method="AlignedGen on FLUX.1-dev", where="the single-stream blocks 19-56",
        shift=", ShiftPE", lam="1.1") + STYLE_NOTE)


def sdxl_alignedgen_style():
    return aligned_graph(False, True, "a lighthouse on a cliff", "attnlab_alignedgen_style_sdxl", ALIGN_NOTE.format(
        method="StyleAligned on SDXL", where="every self-attention layer", shift="", lam="1.0") + STYLE_NOTE)


WORKFLOWS = {"entropy_scaling_sd15.json": sd15_entropy, "entropy_scaling_flux.json": flux_entropy,
             "softpag_sdxl.json": sdxl_softpag, "softpag_flux.json": flux_softpag,
             "attentive_eraser_sd15.json": sd15_eraser, "attentive_eraser_sdxl.json": sdxl_eraser,
             "alignedgen_flux.json": flux_alignedgen, "alignedgen_sdxl.json": sdxl_alignedgen,
             "alignedgen_style_flux.json": flux_alignedgen_style, "alignedgen_style_sdxl.json": sdxl_alignedgen_style}

FREESWIM_NOTE = (
    "FreeSwim two-stage high-resolution video (arXiv 2511.14712) on Wan 2.1 T2V 1.3B: stage 1 samples 81 frames "
    "at the native 832×480 with the stock model; the frames are decoded, upscaled bilinearly to 1920×1088 "
    "(multiples of 16) and encoded again; stage 2 resamples them with denoise 0.7 and shift 9 (ModelSamplingSD3) "
    "on the FreeSwim model: every image token's self-attention sees a 31×53-token window (the native grid, shifted "
    "inward at the borders, all frames), and a full-attention branch run alongside supplies the text "
    "cross-attention. cache_steps 2-5 recomputes that branch only every k steps (faster); 1 = every step. Bypass "
    "the FreeSwim node to compare with plain SDEdit upscaling.")


def wan_freeswim():
    g = Graph()
    unet = g.node("UNETLoader", ["wan2.1_t2v_1.3B_fp16.safetensors", "default"], (0, 0))
    clip = g.node("CLIPLoader", ["umt5_xxl_fp8_e4m3fn_scaled.safetensors", "wan", "default"], (0, 160))
    vae = g.node("VAELoader", ["wan_2.1_vae.safetensors"], (0, 340))
    pos = g.node("CLIPTextEncode", ["a corgi surfing a wave at sunset, cinematic"], (380, 260), "Positive")
    neg = g.node("CLIPTextEncode", ["blurry, lowres, watermark, repeating patterns, duplicated subjects"],
                 (380, 480), "Negative")
    lat = g.node("EmptyHunyuanLatentVideo", [832, 480, 81, 1], (380, 700))
    ks1 = g.node("KSampler", [42, "fixed", 30, 5.0, "uni_pc", "simple", 1.0], (760, 0), "Stage 1 (native size)")
    dec1 = g.node("VAEDecode", [], (1120, 0))
    up = g.node("ImageScale", ["bilinear", 1920, 1088, "disabled"], (1340, 0), "Upscale to the target")
    enc = g.node("VAEEncode", [], (1700, 0))
    swim = g.node("AttnlabFreeSwim", [1.0, 0, 0, 1, True, 1.0, "auto", "text_stream"], (760, 420))
    shift = g.node("ModelSamplingSD3", [9.0], (1120, 420))
    ks2 = g.node("KSampler", [42, "fixed", 50, 5.0, "uni_pc", "simple", 0.7], (1700, 300), "Stage 2 (FreeSwim)")
    dec2 = g.node("VAEDecode", [], (2060, 300))
    out = g.node("SaveAnimatedWEBP", ["attnlab_freeswim_wan", 15.0, False, 90, "default"], (2280, 300))
    g.link(clip, 0, pos, "clip"); g.link(clip, 0, neg, "clip")
    g.link(unet, 0, ks1, "model"); g.link(pos, 0, ks1, "positive"); g.link(neg, 0, ks1, "negative")
    g.link(lat, 0, ks1, "latent_image"); g.link(ks1, 0, dec1, "samples"); g.link(vae, 0, dec1, "vae")
    g.link(dec1, 0, up, "image"); g.link(up, 0, enc, "pixels"); g.link(vae, 0, enc, "vae")
    g.link(unet, 0, swim, "model"); g.link(swim, 0, shift, "model"); g.link(shift, 0, ks2, "model")
    g.link(pos, 0, ks2, "positive"); g.link(neg, 0, ks2, "negative"); g.link(enc, 0, ks2, "latent_image")
    g.link(ks2, 0, dec2, "samples"); g.link(vae, 0, dec2, "vae"); g.link(dec2, 0, out, "images")
    return g.dump(FREESWIM_NOTE)


WORKFLOWS["freeswim_wan.json"] = wan_freeswim

REFAM_NOTE = (
    "Zero-shot referring segmentation with RefAM (arXiv 2509.22650) on FLUX.1-dev: load an image, type what to "
    "segment. The node appends stop-word 'attention magnets' to the expression, encodes it with the CLIP input, "
    "noises the image to 0.5 and runs the model once; the image-to-text attention of blocks 10-56 (without stop "
    "words, magnets and global attention sinks) is the heatmap, its Otsu threshold at the peak the mask. "
    "ImageScale makes the sides multiples of 16. For SAM2 masks connect a SAM2 model from a SAM2 node pack to "
    "sam2_model and choose mask_mode sam_point.")


def flux_refam():
    from attnlab.nodes.refam import REFAM

    g = Graph()
    unet = g.node("UNETLoader", ["flux1-dev.safetensors", "default"], (0, 0))
    clip = g.node("DualCLIPLoader", ["clip_l.safetensors", "t5xxl_fp16.safetensors", "flux", "default"], (0, 160))
    vae = g.node("VAELoader", ["ae.safetensors"], (0, 360))
    image = g.node("LoadImage", ["example.png", "image"], (0, 500), "Image")
    scale = g.node("ImageScale", ["lanczos", 1024, 1024, "center"], (380, 500))
    widgets = [v for p in REFAM.widgets for v in ([p.default, "fixed"] if p.id == "seed" else [p.default])]
    node = g.node(REFAM.node_id, widgets, (760, 0))
    overlay = g.node("SaveImage", ["refam_overlay"], (1180, 0))
    to_image = g.node("MaskToImage", [], (1180, 300))
    mask = g.node("SaveImage", ["refam_mask"], (1460, 300))
    heat_image = g.node("MaskToImage", [], (1180, 520))
    heat = g.node("PreviewImage", [], (1460, 520), "Heatmap")
    g.link(unet, 0, node, "model"); g.link(clip, 0, node, "clip"); g.link(vae, 0, node, "vae")
    g.link(image, 0, scale, "image"); g.link(scale, 0, node, "image")
    g.link(node, 2, overlay, "images"); g.link(node, 0, to_image, "mask"); g.link(to_image, 0, mask, "images")
    g.link(node, 1, heat_image, "mask"); g.link(heat_image, 0, heat, "images")
    return g.dump(REFAM_NOTE)


WORKFLOWS["refam_flux.json"] = flux_refam

if __name__ == "__main__":
    out = ROOT / "workflows"
    out.mkdir(exist_ok=True)
    for name, build in WORKFLOWS.items():
        (out / name).write_text(json.dumps(build(), indent=1) + "\n")
        print("wrote", out / name)
