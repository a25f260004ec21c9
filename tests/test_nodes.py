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
    (dict(strength=5.0), r"strength must be .*in \[0, 4\]"),
    (dict(strength="1"), "strength must be a finite number"),
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
        Custom=lambda io_type: Rec(f"Custom:{io_type}"),
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


@pytest.mark.parametrize("values,match", [
    (dict(scale=101.0), r"scale must be .*in \[0, 100\]"),
    (dict(u=-0.1), r"u must be .*in \[0, 1\]"),
    (dict(heads=3), "heads must be text"),
    (dict(preset="sd3-best"), "preset must be one of"),
    (dict(target="max"), "target must be one of"),
    (dict(joint="text"), "joint must be one of"),
    (dict(sigma_start=-2.0), r"sigma_start must be .*in \[-1, 10000\]"),
    (dict(adaptive_scale=2.0), r"adaptive_scale must be .*in \[0, 1\]"),
    (dict(heads="L1:Hx"), "SoftPAG heads 'L1:Hx': head set entry 'L1:Hx': cannot read head 'Hx'"),
    (dict(sigma_start=1.0, sigma_end=2.0), "sigma_end .* must be <= sigma_start"),
])
def test_bad_softpag_values_are_rejected_before_patching(values, match):
    from attnlab.nodes.softpag import SOFTPAG

    class Untouchable:
        def clone(self):
            raise AssertionError("the model must not be touched when inputs are invalid")

        model = None

    inputs = dict(model=Untouchable(), scale=3.0, u=1.0, heads="L0", preset="none", target="identity", joint="full",
                  sigma_start=-1.0, sigma_end=-1.0, adaptive_scale=0.0)
    inputs.update(values)
    with pytest.raises(ValueError, match=match):
        SOFTPAG.execute(**inputs)


def test_v3_generator_builds_the_softpag_schema(monkeypatch):
    import importlib

    from attnlab.processors.presets import list_presets

    _stub_comfy_api(monkeypatch)
    v3 = importlib.import_module("attnlab.nodes.v3")
    node = next(n for n in v3.NODES if n.__name__ == "AttnlabSoftPAG")
    schema = node.define_schema()
    assert schema["node_id"] == "AttnlabSoftPAG" and schema["category"] == "attnlab"
    kinds = [(i[1], i[2]) for i in schema["inputs"]]
    assert kinds == [("Model", "model"), ("Float", "scale"), ("Float", "u"), ("String", "heads"), ("Combo", "preset"),
                     ("Combo", "target"), ("Combo", "joint"), ("Float", "sigma_start"), ("Float", "sigma_end"),
                     ("Float", "adaptive_scale")]
    by_id = {i[2]: i[3] for i in schema["inputs"]}
    assert by_id["heads"]["multiline"] is True and by_id["heads"]["default"] == ""
    assert by_id["preset"]["options"] == ["none", *list_presets()] and by_id["preset"]["default"] == "none"
    assert by_id["target"]["options"] == ["identity", "uniform", "mean_query"]
    assert by_id["joint"]["options"] == ["full", "image"]
    assert by_id["sigma_start"]["min"] == -1.0 and by_id["sigma_start"]["default"] == -1.0
    assert schema["outputs"] == [("out", "Model", {"display_name": "model"})]


def test_v3_generator_builds_the_attentive_eraser_schema(monkeypatch):
    import importlib

    _stub_comfy_api(monkeypatch)
    v3 = importlib.import_module("attnlab.nodes.v3")
    node = next(n for n in v3.NODES if n.__name__ == "AttnlabAttentiveEraser")
    schema = node.define_schema()
    assert schema["node_id"] == "AttnlabAttentiveEraser" and schema["category"] == "attnlab"
    kinds = [(i[1], i[2]) for i in schema["inputs"]]
    assert kinds == [("Model", "model"), ("Mask", "mask"), ("Float", "scale"), ("Float", "ss_scale"),
                     ("Int", "ss_steps"), ("Float", "dilate_px"), ("String", "layers")]
    by_id = {i[2]: i[3] for i in schema["inputs"]}
    assert by_id["scale"]["default"] == 9.0 and by_id["scale"]["min"] == 0.0
    assert by_id["ss_scale"]["default"] == 0.3 and by_id["ss_steps"]["default"] == 9 and by_id["layers"]["default"] == ""
    assert schema["outputs"] == [("out", "Model", {"display_name": "model"})]


@pytest.mark.parametrize("values,match", [
    (dict(scale=101.0), r"scale must be .*in \[0, 100\]"),
    (dict(ss_scale=1.5), r"ss_scale must be .*in \[0.01, 1\]"),
    (dict(ss_steps=2.5), "ss_steps must be an integer"),
    (dict(layers=None), "layers must be text"),
    (dict(mask="mask.png"), "must be a ComfyUI MASK tensor"),
])
def test_bad_attentive_eraser_values_are_rejected_before_patching(values, match):
    import torch

    from attnlab.nodes.eraser import ATTENTIVE_ERASER

    class Untouchable:
        def clone(self):
            raise AssertionError("the model must not be touched when inputs are invalid")

        model = None

    inputs = dict(model=Untouchable(), mask=torch.ones(1, 8, 8), scale=9.0, ss_scale=0.3, ss_steps=9, dilate_px=0.0,
                  layers="")
    inputs.update(values)
    with pytest.raises(ValueError, match=match):
        ATTENTIVE_ERASER.execute(**inputs)


def test_v3_refam_node_declares_its_optional_sam2_socket(monkeypatch):
    import importlib

    _stub_comfy_api(monkeypatch)
    v3 = importlib.import_module("attnlab.nodes.v3")
    schema = next(n for n in v3.NODES if n.__name__ == "AttnlabRefAM").define_schema()
    sam = next(i for i in schema["inputs"] if i[2] == "sam2_model")
    assert sam[1] == "Custom:SAM2MODEL" and sam[3]["optional"] is True
    assert [o[1] for o in schema["outputs"]] == ["Mask", "Mask", "Image"]
