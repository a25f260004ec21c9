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
