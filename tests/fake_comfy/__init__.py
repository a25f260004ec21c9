"""In-repo fake of ComfyUI's hook contract (our own MIT code; no ComfyUI code copied).

Import convention: ``tests/`` is on ``sys.path`` (pytest puts it there because ``tests/conftest.py``
lives in a directory without ``__init__.py``), so::

    from fake_comfy import ModelPatcher, WrappersMP, build_fake_model, conditioning, sample

The fake is pinned to golden traces recorded from a real ComfyUI (``tests/traces/*.json``,
``tests/test_comfy_contract.py``). ``build_tiny``/``conditioning``/``latent``/``sample_tiny``/
``calc_cond_batch``/``WrappersMP`` have the same names and signatures as in ``tests/real_comfy.py``,
so a test can be parametrised over both backends.
"""

from . import attention
from .attention import get_attention_function, register_attention_function, wrap_attn
from .models import (FAMILIES, LATENT_SHAPE, TEXT_LEN, build_fake_base_model, build_fake_model, conditioning,
                     init_weights, latent)
from .patcher import (CallbacksMP, ModelPatcher, WrapperExecutor, WrappersMP, copy_nested_dicts,
                      create_model_options_clone, merge_nested_dicts, set_model_options_patch_replace)
from .sampling import calc_cond_batch, sample, sample_tiny

#: same name as ``real_comfy.build_tiny``
build_tiny = build_fake_model

NAME = "fake"


def source_info() -> dict:
    return {"backend": "fake_comfy"}


__all__ = ["FAMILIES", "LATENT_SHAPE", "TEXT_LEN", "CallbacksMP", "ModelPatcher", "NAME", "WrapperExecutor",
           "WrappersMP", "attention", "build_fake_base_model", "build_fake_model", "build_tiny", "calc_cond_batch",
           "conditioning", "copy_nested_dicts", "create_model_options_clone", "get_attention_function",
           "init_weights", "latent", "merge_nested_dicts", "register_attention_function", "sample", "sample_tiny",
           "set_model_options_patch_replace", "source_info", "wrap_attn"]
