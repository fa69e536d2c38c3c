"""Precision, memory format and compilation switches (defaults chosen by measurement).

See ``scripts/benchmark.py`` for the numbers behind the defaults.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable

import torch
from torch import nn

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


def autocast(device: torch.device, precision: str, cache: bool = True) -> contextlib.AbstractContextManager:
    """An autocast context for ``precision`` (a no-op for fp32); ``cache=False`` inside CUDA
    graph capture, which autocast's weight-cast cache does not survive."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=cache)


def memory_format(channels_last: bool) -> torch.memory_format:
    """``torch.channels_last`` when asked, else the default contiguous format."""
    return torch.channels_last if channels_last else torch.contiguous_format


class CompiledOrEager(nn.Module):
    """Calls a ``torch.compile``d module; on the first failure warns and runs eagerly.

    ``state_dict`` and attribute access go to the wrapped module's own keys via
    :attr:`module`, so checkpoints keep the reference key names.
    """

    def __init__(self, module: nn.Module, mode: str = "default") -> None:
        super().__init__()
        self.module = module
        self._compiled: Callable[..., Any] | None = torch.compile(module, mode=mode)

    @property
    def compiled(self) -> bool:
        """True while calls go to the compiled module; False once it failed and fell back."""
        return self._compiled is not None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._compiled is not None:
            try:
                return self._compiled(*args, **kwargs)
            except Exception as err:  # backend missing (no triton, no compiler): stay correct
                warnings.warn(f"torch.compile failed ({type(err).__name__}: {str(err)[:200]}); running eagerly")
                self._compiled = None
        return self.module(*args, **kwargs)


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


def maybe_compile(module: nn.Module, enabled: bool, mode: str = "default") -> nn.Module:
    """Returns ``module`` compiled (with an eager fallback) when ``enabled``, else itself.

    ``mode="reduce-overhead"`` adds CUDA graphs, which is what pays for these small CIFAR
    networks on a GPU (resnet32x4→resnet8x4 WTTM step 4.6 vs 11.0 ms eager on an H200, see
    docs/SPEED.md); the default mode alone did not.
    """
    if not enabled:
        return module
    return CompiledOrEager(module, mode)
