"""Distillation methods: one file per ``--distill``/``--add`` name.

Importing the package imports every module in it, which registers each method's
:class:`~distiller_zoo.base.Distiller` in :data:`METHODS` and re-exports the names each
module lists in ``__all__`` (the reference loss classes: ``DistillKL``, ``CRDLoss``, ...).
Adding a method means adding one module here; nothing else changes.
"""
import importlib
import pkgutil

from .base import METHODS, Batch, Distiller, InitStage, MethodContext, Outputs, register

__all__ = ["METHODS", "Batch", "Distiller", "InitStage", "MethodContext", "Outputs", "register"]

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name.startswith("_") or _info.name == "base":
        continue
    _module = importlib.import_module(f"{__name__}.{_info.name}")
    for _name in getattr(_module, "__all__", []):
        globals()[_name] = getattr(_module, _name)
        __all__.append(_name)
