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


def sd15_entropy():
    g = Graph()
    ckpt = g.node("CheckpointLoaderSimple", ["v1-5-pruned-emaonly.safetensors"], (0, 120))
    ent = g.node("AttnlabEntropyScaling", [1.0, 0, 0, "joint"], (380, 0))
    pos = g.node("CLIPTextEncode", ["a cozy reading nook with a window seat, warm evening light, detailed"], (380, 200), "Positive")
    neg = g.node("CLIPTextEncode", ["blurry, lowres, watermark"], (380, 420), "Negative")
    lat = g.node("EmptyLatentImage", [1024, 1024, 1], (380, 640))
    ks = g.node("KSampler", [42, "fixed", 25, 7.0, "euler", "normal", 1.0], (760, 120))
    dec = g.node("VAEDecode", [], (1120, 120))
    save = g.node("SaveImage", ["attnlab_entropy_sd15"], (1340, 120))
    g.link(ckpt, 0, ent, "model"); g.link(ckpt, 1, pos, "clip"); g.link(ckpt, 1, neg, "clip")
    g.link(ent, 0, ks, "model"); g.link(pos, 0, ks, "positive"); g.link(neg, 0, ks, "negative")
    g.link(lat, 0, ks, "latent_image"); g.link(ks, 0, dec, "samples"); g.link(ckpt, 2, dec, "vae")
    g.link(dec, 0, save, "images")
    return g.dump("SD1.5 sampled at 1024x1024, twice its 512 training size, with entropy scaling. "
                  "Set strength to 0 to compare with the stock model.")


def flux_entropy():
    g = Graph()
    unet = g.node("UNETLoader", ["flux1-dev.safetensors", "default"], (0, 0))
    clip = g.node("DualCLIPLoader", ["clip_l.safetensors", "t5xxl_fp16.safetensors", "flux", "default"], (0, 160))
    vae = g.node("VAELoader", ["ae.safetensors"], (0, 360))
    ent = g.node("AttnlabEntropyScaling", [1.0, 0, 0, "joint"], (380, 0))
    pos = g.node("CLIPTextEncode", ["an aerial photograph of a winding river through autumn forest"], (380, 200), "Prompt")
    guide = g.node("FluxGuidance", [3.5], (760, 200))
    neg = g.node("ConditioningZeroOut", [], (760, 340))
    lat = g.node("EmptySD3LatentImage", [2048, 2048, 1], (380, 480))
    ks = g.node("KSampler", [42, "fixed", 20, 1.0, "euler", "simple", 1.0], (1100, 120))
    dec = g.node("VAEDecode", [], (1460, 120))
    save = g.node("SaveImage", ["attnlab_entropy_flux"], (1680, 120))
    g.link(unet, 0, ent, "model"); g.link(clip, 0, pos, "clip"); g.link(pos, 0, guide, "conditioning")
    g.link(pos, 0, neg, "conditioning"); g.link(ent, 0, ks, "model"); g.link(guide, 0, ks, "positive")
    g.link(neg, 0, ks, "negative"); g.link(lat, 0, ks, "latent_image"); g.link(ks, 0, dec, "samples")
    g.link(vae, 0, dec, "vae"); g.link(dec, 0, save, "images")
    return g.dump("FLUX.1-dev at 2048x2048 (4x its 1024 training area) with entropy scaling on every joint and "
                  "single block; cfg 1 with FluxGuidance as usual.")


WORKFLOWS = {"entropy_scaling_sd15.json": sd15_entropy, "entropy_scaling_flux.json": flux_entropy}

if __name__ == "__main__":
    out = ROOT / "workflows"
    out.mkdir(exist_ok=True)
    for name, build in WORKFLOWS.items():
        (out / name).write_text(json.dumps(build(), indent=1) + "\n")
        print("wrote", out / name)
