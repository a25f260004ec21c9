"""Test-only torchvision stub for running ComfyUI (and diffusers/transformers) on CPU without torchvision.

Why: the only torchvision wheels available do not load beside the torch 2.13.0 CPU wheel, and
installing torchvision would replace torch with a multi-GB CUDA build.

Who imports it at module level:
  * ComfyUI: comfy/ldm/cosmos/model.py, comfy/ldm/cosmos/predict2.py (`from torchvision import transforms`),
    comfy/ldm/cascade/{stage_c_coder,controlnet}.py (`import torchvision`),
    comfy/ldm/ace/vae/music_dcae_pipeline.py (`import torchvision.transforms as transforms`).
    None of these paths run for SD1.5/SDXL/SD3/Flux/Wan/PixArt.
  * transformers / diffusers: once `importlib.util.find_spec("torchvision")` succeeds (it does for this
    directory) they treat torchvision as installed and import names from it at module import time
    (transformers image_utils: transforms.InterpolationMode, transforms.functional.pil_to_tensor,
    transforms.v2.functional; diffusers loaders: `from torchvision import io` ...).

How: this package installs a meta-path finder that serves *any* `torchvision.<sub>` module as a stub.
Every attribute of a stub module is a stub class: importing, subclassing and isinstance work,
instantiating/calling raises NotImplementedError. `transforms.InterpolationMode` is a real Enum.
"""
import enum
import importlib.abc
import importlib.machinery
import sys
import types

__version__ = "0.0.0+attnlab.stub"


class _StubMeta(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _stub_class(f"{cls.__qualname__}.{name}")


def _stub_class(qualname):
    def __init__(self, *args, **kwargs):
        raise NotImplementedError(f"{qualname} is not available: torchvision is a test-only stub here")
    return _StubMeta(qualname.rsplit(".", 1)[-1], (), {"__init__": __init__, "__qualname__": qualname,
                                                        "__module__": qualname.rsplit(".", 1)[0]})


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        if name == "InterpolationMode":
            return InterpolationMode
        full = f"{self.__name__}.{name}"
        if full in sys.modules:
            return sys.modules[full]
        val = _stub_class(full)
        setattr(self, name, val)
        return val


class _Loader(importlib.abc.Loader):
    def create_module(self, spec):
        mod = _StubModule(spec.name, "torchvision stub (test only)")
        mod.__path__ = []  # behave like a package so nested submodules resolve too
        return mod

    def exec_module(self, module):
        parent, _, child = module.__name__.rpartition(".")
        if parent in sys.modules:
            setattr(sys.modules[parent], child, module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, _Loader(), is_package=True)
        return None


if not any(isinstance(f, _Finder) for f in sys.meta_path):
    sys.meta_path.append(_Finder())


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    import importlib
    try:
        return importlib.import_module(f"torchvision.{name}")
    except ImportError:
        raise AttributeError(name)
