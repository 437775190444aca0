"""Stands in for torchvision in the SGLang test environment only.

SGLang imports its multimodal configs (and so torchvision) whenever its memory pools are imported. The only
torchvision wheels for torch 2.13 are CUDA builds that do not load beside the CPU torch, and no code path
that these tests run uses torchvision: every name here is a placeholder that refuses to be called.
"""

import importlib.abc
import importlib.machinery
import sys
import types

__version__ = "0.0.0+kvrack-test-placeholder"


class _AnyName(type):
    def __getattr__(cls, name: str) -> type:
        if name.startswith("__"):
            raise AttributeError(name)
        return cls


class _Missing(metaclass=_AnyName):
    def __init__(self, *args: object, **kwargs: object) -> None:
        raise RuntimeError("torchvision is not installed in this test environment")

    def __class_getitem__(cls, item: object) -> type:
        return cls


def _getattr(name: str) -> object:
    if name.startswith("__"):
        raise AttributeError(name)
    return _Missing


__getattr__ = _getattr


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Every ``torchvision.*`` submodule is an empty package of placeholders."""

    def find_spec(self, fullname: str, path: object, target: object = None) -> importlib.machinery.ModuleSpec | None:
        if fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__getattr__ = _getattr  # type: ignore[method-assign]
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        pass


sys.meta_path.insert(0, _Finder())
