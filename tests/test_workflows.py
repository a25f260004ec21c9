"""Example workflows: only existing node types, valid widget values, well-typed links, convertible to API."""

import json

import pytest

from workflow_tools import load_workflows, node_defs, ui_to_api, validate_workflow

WORKFLOWS = load_workflows()


def test_every_node_spec_has_an_example_workflow():
    from attnlab.nodes import NODE_SPECS

    used = {n["type"] for wf in WORKFLOWS.values() for n in wf["nodes"]}
    assert {s.node_id for s in NODE_SPECS} <= used


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_workflow_is_valid(name):
    assert validate_workflow(WORKFLOWS[name]) == []


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_workflow_converts_to_an_api_prompt(name):
    prompt = ui_to_api(WORKFLOWS[name])
    defs = node_defs()
    for node_id, node in prompt.items():
        defn = defs[node["class_type"]]
        required = [k for k in defn["input_order"] if defn["inputs"][k]["section"] == "required"]
        assert set(required) <= set(node["inputs"]), (node_id, node["class_type"])
        for value in node["inputs"].values():
            if isinstance(value, list):
                assert value[0] in prompt
    json.dumps(prompt)


def test_validator_catches_mistakes():
    wf = json.loads(json.dumps(WORKFLOWS["entropy_scaling_sd15.json"]))
    node = next(n for n in wf["nodes"] if n["type"] == "AttnlabEntropyScaling")
    node["widgets_values"][0] = 9.0
    node["widgets_values"][3] = "pixels"
    wf["nodes"].append({"id": 99, "type": "NoSuchNode", "inputs": [], "widgets_values": []})
    errors = "\n".join(validate_workflow(wf))
    assert "outside [0.0, 4.0]" in errors and "'pixels' not in" in errors and "unknown type NoSuchNode" in errors


def test_softpag_workflows_name_heads_the_models_have():
    """The head sets typed into the SoftPAG examples parse, and fit the model the workflow loads (FLUX.1: 19 double +
    38 single blocks of 24 heads; SDXL: down attention blocks of depth 2, 2, 10, 10, mid 10, up 10, 10, 10, 2, 2, 2;
    10 heads at 640 channels, 20 at 1280)."""
    from attnlab.nodes.softpag import SOFTPAG
    from attnlab.processors.headsets import HeadSet

    slot = [p.id for p in SOFTPAG.widgets].index("heads")
    sdxl_groups = [("d", 0, 2), ("d", 2, 2), ("d", 4, 10), ("d", 14, 10), ("m", 24, 10)] + \
        [("u", 34 + 10 * i, 10) for i in range(3)] + [("u", 64 + 2 * i, 2) for i in range(3)]
    found = {}
    for name, wf in WORKFLOWS.items():
        for n in wf["nodes"]:
            if n["type"] == SOFTPAG.node_id:
                found[name] = HeadSet.parse(n["widgets_values"][slot])
    assert set(found) == {"softpag_sdxl.json", "softpag_flux.json"}
    found["softpag_flux.json"].check({layer: 24 for layer in range(57)}, "FLUX.1")
    sdxl_heads = {layer: 10 if layer < 4 or layer >= 64 else 20 for layer in range(70)}
    found["softpag_sdxl.json"].resolve(sdxl_groups).check(sdxl_heads, "SDXL")


@pytest.mark.parametrize("name,grow", [("attentive_eraser_sd15.json", 3), ("attentive_eraser_sdxl.json", 15)])
def test_attentive_eraser_workflows_are_the_papers_sip(name, grow):
    """SIP the ComfyUI way: the painted mask, grown, feeds both the node and SetLatentNoiseMask; the encoded image is
    resampled with DDIM (ddim_uniform, 50 steps, denoise 0.8) at cfg 1 with empty prompts; the node at its defaults."""
    from attnlab.nodes.eraser import ATTENTIVE_ERASER

    wf = WORKFLOWS[name]
    nodes = {n["id"]: n for n in wf["nodes"]}
    by_type = {}
    for n in wf["nodes"]:
        by_type.setdefault(n["type"], []).append(n)
    src = {(link[3], nodes[link[3]]["inputs"][link[4]]["name"]): nodes[link[1]]["type"] for link in wf["links"]}
    (ks,) = by_type["KSampler"]
    assert ks["widgets_values"][2:] == [50, 1.0, "ddim", "ddim_uniform", 0.8]
    assert all(n["widgets_values"] == [""] for n in by_type["CLIPTextEncode"])
    (eraser,) = by_type[ATTENTIVE_ERASER.node_id]
    assert eraser["widgets_values"] == [p.default for p in ATTENTIVE_ERASER.widgets]
    (grow_node,) = by_type["GrowMask"]
    assert grow_node["widgets_values"] == [grow, True]
    (noise_mask,) = by_type["SetLatentNoiseMask"]
    assert src[(ks["id"], "model")] == ATTENTIVE_ERASER.node_id
    assert src[(ks["id"], "latent_image")] == "SetLatentNoiseMask"
    assert src[(eraser["id"], "mask")] == src[(noise_mask["id"], "mask")] == "GrowMask"
    assert src[(noise_mask["id"], "samples")] == "VAEEncode" and src[(grow_node["id"], "mask")] == "LoadImage"
