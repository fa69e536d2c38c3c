"""What a CUDA-graph step needs from torch, behind a few calls, and the state it restores.

:class:`CudaGraphs` makes, captures, replays and frees graphs on one reused side stream. It
never leaves the thread on the capture stream: a capture that raises (an op that needs the
host under ``capture_error_mode="thread_local"``, an invalidated capture at ``capture_end``)
ends the capture, restores the caller's stream and lets the error through. Tests replace the
few methods that touch CUDA (:meth:`CudaGraphs.new_graph`, :meth:`CudaGraphs.stream`,
:meth:`CudaGraphs.sync_debug`, :meth:`CudaGraphs.prepare`) with CPU stand-ins, so the order
of these calls and the recovery from each failure run on the CPU too.

:class:`StateSnapshot` copies every tensor a step changes and restores them in place.
"""
from __future__ import annotations

import contextlib
import gc
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn


class CudaGraphs:
    """torch's CUDA graphs with one side stream for warm-up and capture."""

    def __init__(self) -> None:
        self._stream: Optional[Any] = None

    def new_graph(self) -> Any:
        return torch.cuda.CUDAGraph()

    def stream(self) -> contextlib.AbstractContextManager:
        """Runs the block on the side stream (created once, reused by every capture), ordered
        after the work already queued and before the work queued after it."""
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        return _on_stream(self._stream)

    def sync_debug(self) -> contextlib.AbstractContextManager:
        """Makes any op that waits for the device raise (the second warm-up step)."""
        return _sync_debug_error()

    def prepare(self) -> None:
        """Before a capture: drain the device and free cached blocks, as ``torch.cuda.graph``."""
        torch.cuda.synchronize()
        gc.collect()
        torch.cuda.empty_cache()

    @contextlib.contextmanager
    def warmup(self, strict: bool) -> Iterator[None]:
        """One warm-up step's context: the side stream, and with ``strict`` host waits refused."""
        with self.stream(), (self.sync_debug() if strict else contextlib.nullcontext()):
            yield

    def capture(self, graph: Any, fn: Callable[[], Any]) -> Any:
        """Records ``fn`` into ``graph``; its outputs become the graph's static outputs.

        ``thread_local``: only this thread's unsafe calls invalidate the capture, so a loader's
        pin-memory thread allocating host memory meanwhile does not.
        """
        self.prepare()
        with self.stream():
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                out = fn()
            except BaseException:
                with contextlib.suppress(Exception):  # the capture is lost either way
                    graph.capture_end()
                raise
            graph.capture_end()
        return out

    def replay(self, graph: Any) -> None:
        graph.replay()

    def release(self, graph: Any) -> None:
        """Frees a graph's memory pool before another capture."""
        reset = getattr(graph, "reset", None)
        if reset is not None:
            reset()


@contextlib.contextmanager
def _on_stream(stream: Any) -> Iterator[None]:
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # restores the caller's stream on the way out, error or not
        yield
    torch.cuda.current_stream().wait_stream(stream)


@contextlib.contextmanager
def _sync_debug_error() -> Iterator[None]:
    before = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(before)


class StateSnapshot:
    """Copies of every tensor a training step changes, restorable in place.

    In place matters: a captured graph reads and writes fixed addresses. Optimiser state that
    did not exist when the snapshot was taken (SGD's momentum buffers before the first step)
    is zeroed on restore, which for SGD without dampening is the same as absent.

    Attributes:
        saved: ``(tensor, copy)`` pairs: the modules' parameters, then their buffers, then
            the optimiser's state tensors.
        kinds: per pair, ``"param"``, ``"buffer"`` or ``"optim"`` (what the check compares).
    """

    def __init__(self, modules: list[nn.Module], optimizer: torch.optim.Optimizer) -> None:
        self.modules, self.optimizer = modules, optimizer
        for group in optimizer.param_groups:
            if group.get("dampening", 0) != 0 or group.get("nesterov", False):
                raise ValueError("StateSnapshot supports SGD without dampening or Nesterov only")
        tensors = self._tensors()
        self.saved = [(t, t.detach().clone()) for t, _ in tensors]
        self.kinds = [kind for _, kind in tensors]
        self.had_state = {id(p) for p in optimizer.state}

    def _tensors(self) -> list[tuple[torch.Tensor, str]]:
        seen: set[int] = set()
        out = []
        for kind, tensors in (("param", [p for m in self.modules for p in m.parameters()]),
                              ("buffer", [b for m in self.modules for b in m.buffers()]),
                              ("optim", [v for s in self.optimizer.state.values() for v in s.values()
                                         if isinstance(v, torch.Tensor)])):
            for t in tensors:
                if id(t) not in seen:
                    seen.add(id(t))
                    out.append((t, kind))
        return out

    def restore(self) -> None:
        with torch.no_grad():
            for tensor, copy in self.saved:
                tensor.copy_(copy)
            for p, state in self.optimizer.state.items():
                if id(p) not in self.had_state:
                    for value in state.values():
                        if isinstance(value, torch.Tensor):
                            value.zero_()

    def values(self, kinds: tuple[str, ...] = ("param", "buffer", "optim")) -> list[torch.Tensor]:
        """Copies of the current values of the snapshotted tensors of ``kinds``."""
        return [t.detach().clone() for (t, _), k in zip(self.saved, self.kinds) if k in kinds]


def max_relative_error(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Largest ``max|a - b| / max(max|a|, tiny)`` over pairs of floating tensors; ``inf`` when
    either side holds a NaN or an infinity (a replay that diverges is never "close")."""
    worst = 0.0
    for x, y in zip(a, b):
        if x.is_floating_point() and x.numel():
            x, y = x.float(), y.float()
            if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
                return float("inf")
            scale = max(float(x.abs().max()), 1e-12)
            worst = max(worst, float((x - y).abs().max()) / scale)
    return worst
