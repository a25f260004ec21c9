"""Node specs and the V3 generator, without ComfyUI (a stub of `comfy_api.latest` records the schema)."""

import sys
import types

import pytest

from attnlab.nodes import NODE_SPECS
from attnlab.nodes.entropy import ENTROPY_SCALING


def test_specs_are_well_formed():
    ids = [s.node_id for s in NODE_SPECS]
    assert len(ids) == len(set(ids))
    for spec in NODE_SPECS:
        assert spec.description and spec.category == "attnlab" and spec.outputs
        for p in spec.widgets:
            if p.type in ("FLOAT", "INT"):
                assert p.min <= p.default <= p.max, p
            if p.type == "COMBO":
                assert p.default in p.options


@pytest.mark.parametrize("values,match", [
    (dict(token_count="pixels"), "token_count must be one of"),
    (dict(strength=5.0), r"strength must be in \[0.0, 4.0\]"),
    (dict(strength="1"), "strength must be a number"),
    (dict(train_height=512), "set both"),
    (dict(train_height=1.5, train_width=512), "integer"),
])
def test_bad_widget_values_are_rejected_before_patching(values, match):
    class Untouchable:
        def clone(self):
            raise AssertionError("the model must not be touched when inputs are invalid")

        model = None

    inputs = dict(model=Untouchable(), strength=1.0, train_height=0, train_width=0, token_count="joint")
    inputs.update(values)
    with pytest.raises(ValueError, match=match):
        ENTROPY_SCALING.execute(**inputs)


def _stub_comfy_api(monkeypatch):
    """Just enough of comfy_api.latest for nodes/v3.py: records what the schema asks for."""

    class Rec:
        def __init__(self, kind):
            self.kind = kind

        def Input(self, id, **kw):  # noqa: N802 - mirrors ComfyUI's API
            return ("in", self.kind, id, kw)

        def Output(self, **kw):  # noqa: N802
            return ("out", self.kind, kw)

    io = types.SimpleNamespace(
        ComfyNode=type("ComfyNode", (), {}),
        Schema=lambda **kw: kw,
        NodeOutput=lambda *a: a,
        **{k: Rec(k) for k in ("Float", "Int", "Boolean", "Combo", "String", "Model", "Latent", "Conditioning",
                               "Image", "Mask", "Clip", "Vae")},
    )
    latest = types.ModuleType("comfy_api.latest")
    latest.io = io
    latest.ComfyExtension = type("ComfyExtension", (), {})
    monkeypatch.setitem(sys.modules, "comfy_api", types.ModuleType("comfy_api"))
    monkeypatch.setitem(sys.modules, "comfy_api.latest", latest)
    monkeypatch.delitem(sys.modules, "attnlab.nodes.v3", raising=False)


def test_v3_generator_builds_schema_from_spec(monkeypatch):
    import asyncio
    import importlib

    _stub_comfy_api(monkeypatch)
    v3 = importlib.import_module("attnlab.nodes.v3")
    node = next(n for n in v3.NODES if n.__name__ == "AttnlabEntropyScaling")
    schema = node.define_schema()
    assert schema["node_id"] == "AttnlabEntropyScaling" and schema["display_name"] == "Entropy Scaling"
    kinds = [(i[1], i[2]) for i in schema["inputs"]]
    assert kinds == [("Model", "model"), ("Float", "strength"), ("Int", "train_height"), ("Int", "train_width"),
                     ("Combo", "token_count")]
    assert schema["inputs"][1][3]["max"] == 4.0 and schema["inputs"][4][3]["options"] == ["joint", "image"]
    assert schema["outputs"] == [("out", "Model", {"display_name": "model"})]
    import attnlab

    extension = asyncio.run(attnlab.comfy_entrypoint())
    assert node in asyncio.run(extension.get_node_list())
