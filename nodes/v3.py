"""V3 (`comfy_api.latest`) node classes generated from the pack's NodeSpecs. Imported only by ComfyUI."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from . import NODE_SPECS
from .specs import NodeSpec, Param

_SOCKETS = {"MODEL": io.Model, "LATENT": io.Latent, "CONDITIONING": io.Conditioning, "IMAGE": io.Image,
            "MASK": io.Mask, "CLIP": io.Clip, "VAE": io.Vae, "SAM2MODEL": io.Custom("SAM2MODEL")}


def _input(p: Param):
    common = dict(display_name=p.display_name, optional=p.optional, tooltip=p.tooltip or None)
    if p.type == "FLOAT":
        return io.Float.Input(p.id, default=p.default, min=p.min, max=p.max, step=p.step, **common)
    if p.type == "INT":
        return io.Int.Input(p.id, default=p.default, min=p.min, max=p.max, step=p.step, **common)
    if p.type == "BOOLEAN":
        return io.Boolean.Input(p.id, default=p.default, **common)
    if p.type == "COMBO":
        return io.Combo.Input(p.id, options=list(p.options), default=p.default, **common)
    if p.type == "STRING":
        return io.String.Input(p.id, default=p.default, multiline=p.multiline, **common)
    return _SOCKETS[p.type].Input(p.id, **common)


def make_node(spec: NodeSpec) -> type:
    def define_schema(cls):
        return io.Schema(
            node_id=spec.node_id,
            display_name=spec.display_name,
            category=spec.category,
            description=spec.description,
            inputs=[_input(p) for p in spec.inputs],
            outputs=[_SOCKETS[o.type].Output(display_name=o.name) for o in spec.outputs],
        )

    def execute(cls, **inputs):
        return io.NodeOutput(*spec.execute(**inputs))

    return type(spec.node_id, (io.ComfyNode,), {
        "define_schema": classmethod(define_schema),
        "execute": classmethod(execute),
        "__doc__": spec.description,
    })


NODES = [make_node(spec) for spec in NODE_SPECS]


class AttnlabExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)
