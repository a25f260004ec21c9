"""Test-only ComfyUI pack (our own code): tiny seeded models and conditionings, so example workflows can run
in a real ComfyUI server without model files. Loaded only by tests/test_comfy_server.py."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__)))))  # tests/

import real_comfy  # noqa: E402
from comfy_api.latest import ComfyExtension, io  # noqa: E402

FAMILIES = ["sd15", "sdxl", "sd3", "flux", "wan_t2v"]


class TinyModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="AttnlabTestTinyModel", category="attnlab/testing",
                         inputs=[io.Combo.Input("family", options=FAMILIES, default="sd15"),
                                 io.Int.Input("seed", default=0, min=0, max=2**31)],
                         outputs=[io.Model.Output()])

    @classmethod
    def execute(cls, family, seed):
        return io.NodeOutput(real_comfy.build_tiny(family, seed))


class TinyConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="AttnlabTestTinyConditioning", category="attnlab/testing",
                         inputs=[io.Combo.Input("family", options=FAMILIES, default="sd15"),
                                 io.Int.Input("seed", default=0, min=0, max=2**31),
                                 io.Boolean.Input("negative", default=False)],
                         outputs=[io.Conditioning.Output()])

    @classmethod
    def execute(cls, family, seed, negative):
        return io.NodeOutput(real_comfy.conditioning(family, seed=seed)[1 if negative else 0])


class TestPack(ComfyExtension):
    async def get_node_list(self):
        return [TinyModel, TinyConditioning]


async def comfy_entrypoint():
    return TestPack()
