"""Example-workflow tooling (our own code): node definitions, UI(0.4) workflow building/validation, UI -> API.

Node definitions come from the pack's NodeSpecs and, for core nodes, from tests/data/comfy_core_nodes.json
(recorded from a real ComfyUI's /object_info).
"""

from __future__ import annotations

import json
from pathlib import Path

from attnlab.nodes import NODE_SPECS

ROOT = Path(__file__).resolve().parent.parent
CORE = json.loads((Path(__file__).parent / "data" / "comfy_core_nodes.json").read_text())["nodes"]
WIDGET_TYPES = ("INT", "FLOAT", "BOOLEAN", "STRING", "COMBO")
SEED_NAMES = ("seed", "noise_seed")
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")
FILE_COMBOS = ("ckpt_name", "unet_name", "vae_name", "clip_name", "clip_name1", "clip_name2", "clip_name3")


def node_defs() -> dict:
    defs = {k: v for k, v in CORE.items()}
    for spec in NODE_SPECS:
        inputs = {}
        for p in spec.inputs:
            entry = {"type": p.type, "section": "optional" if p.optional else "required"}
            for key in ("default", "min", "max", "step"):
                if getattr(p, key) is not None:
                    entry[key] = getattr(p, key)
            if p.type == "COMBO":
                entry["options"] = list(p.options)
            inputs[p.id] = entry
        defs[spec.node_id] = {"input_order": [p.id for p in spec.inputs], "inputs": inputs,
                              "output": [o.type for o in spec.outputs], "output_name": [o.name for o in spec.outputs]}
    return defs


def widget_slots(defn: dict) -> list[tuple[str, dict]]:
    """(input name, input def) per `widgets_values` slot, incl. the frontend's hidden control slots."""
    slots = []
    for name in defn["input_order"]:
        inp = defn["inputs"][name]
        if inp["type"] not in WIDGET_TYPES:
            continue
        slots.append((name, inp))
        if inp.get("image_upload"):  # the frontend's upload button stores its own value ("image") after the combo
            slots.append((None, {"type": "UPLOAD"}))
        if inp["type"] == "INT" and (inp.get("control_after_generate") or name in SEED_NAMES):
            slots.append((None, {"type": "CONTROL"}))
    return slots


def check_value(name: str, inp: dict, value) -> list[str]:
    t = inp["type"]
    if t == "UPLOAD":
        return [] if value == "image" else [f"upload widget value {value!r}, expected 'image'"]
    if t == "CONTROL":
        return [] if value in CONTROL_VALUES else [f"control value {value!r}"]
    if t == "COMBO":
        options = inp.get("options") or []
        if name in FILE_COMBOS:  # lists the files of the recording server; any file name is valid
            return [] if isinstance(value, str) and value else [f"{name}: expected a file name, got {value!r}"]
        return [] if value in options else [f"{name}: {value!r} not in {options}"]
    if t in ("INT", "FLOAT"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (t == "INT" and int(value) != value):
            return [f"{name}: {value!r} is not a valid {t}"]
        lo, hi = inp.get("min"), inp.get("max")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            return [f"{name}: {value} outside [{lo}, {hi}]"]
        return []
    if t == "BOOLEAN":
        return [] if isinstance(value, bool) else [f"{name}: {value!r} is not a boolean"]
    return [] if isinstance(value, str) else [f"{name}: {value!r} is not a string"]


def validate_workflow(wf: dict) -> list[str]:
    """Problems with a UI-format workflow: unknown node types, widget values, links and their types."""
    defs = node_defs()
    errors = []
    if wf.get("version") != 0.4:
        errors.append(f"version {wf.get('version')!r}, expected 0.4")
    nodes = {n["id"]: n for n in wf["nodes"]}
    for n in wf["nodes"]:
        defn = defs.get(n["type"])
        if defn is None:
            errors.append(f"node {n['id']}: unknown type {n['type']}")
            continue
        slots = widget_slots(defn)
        values = n.get("widgets_values", [])
        if len(values) != len(slots):
            errors.append(f"node {n['id']} {n['type']}: {len(values)} widget values, expected {len(slots)}")
        for (name, inp), value in zip(slots, values):
            errors += [f"node {n['id']} {n['type']}: {e}" for e in check_value(name, inp, value)]
        sockets = [k for k in defn["input_order"] if defn["inputs"][k]["type"] not in WIDGET_TYPES]
        for k in sockets:
            if defn["inputs"][k]["section"] == "required" and not any(i["name"] == k and i.get("link") is not None
                                                                         for i in n.get("inputs", [])):
                errors.append(f"node {n['id']} {n['type']}: required input {k} is not connected")
    for link in wf["links"]:
        lid, src, src_slot, dst, dst_slot, typ = link
        if src not in nodes or dst not in nodes:
            errors.append(f"link {lid}: dangling")
            continue
        out_type = defs[nodes[src]["type"]]["output"][src_slot]
        dst_input = nodes[dst]["inputs"][dst_slot]
        want = defs[nodes[dst]["type"]]["inputs"][dst_input["name"]]["type"]
        if not (out_type == typ == want):
            errors.append(f"link {lid}: {out_type} -> {dst_input['name']} ({want}), declared {typ}")
    return errors


def ui_to_api(wf: dict) -> dict:
    """The frontend's graphToPrompt, for the subset our workflows use (no groups, no bypass)."""
    defs = node_defs()
    links = {link[0]: link for link in wf["links"]}
    prompt = {}
    for n in wf["nodes"]:
        if n.get("mode", 0) in (2, 4):
            continue
        defn = defs[n["type"]]
        inputs = {}
        for (name, _), value in zip(widget_slots(defn), n.get("widgets_values", [])):
            if name is not None:
                inputs[name] = value
        for inp in n.get("inputs", []):
            if inp.get("link") is not None:
                _, src, slot, _, _, _ = links[inp["link"]]
                inputs[inp["name"]] = [str(src), slot]
        prompt[str(n["id"])] = {"class_type": n["type"], "inputs": inputs, "_meta": {"title": n.get("title", n["type"])}}
    return prompt


def load_workflows() -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted((ROOT / "workflows").glob("*.json"))}
