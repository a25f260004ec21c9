"""ComfyUI nodes, one module per method, generated as V3 nodes from the plain-data specs in `specs.py`.

Only `nodes/v3.py` imports ComfyUI (`comfy_api`), and only when ComfyUI loads the pack.
"""

from .alignedgen import ALIGNEDGEN_BATCH, ALIGNEDGEN_REFERENCE
from .entropy import ENTROPY_SCALING
from .eraser import ATTENTIVE_ERASER
from .freeswim import FREESWIM
from .refam import REFAM
from .softpag import SOFTPAG

NODE_SPECS = (ENTROPY_SCALING, SOFTPAG, ATTENTIVE_ERASER, REFAM, FREESWIM, ALIGNEDGEN_BATCH, ALIGNEDGEN_REFERENCE)

__all__ = ["NODE_SPECS"]
