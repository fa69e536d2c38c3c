"""CPU stand-ins for CUDA graphs, so ``--cpu-smoke`` runs the acceptance's code paths.

:class:`RerunGraphs` is :class:`helper.graph_capture.CudaGraphs` with its CUDA calls
replaced: the capture logic itself runs; a "graph" keeps the captured function and re-runs it
into the captured outputs at replay, as a real graph writes its static outputs. Nothing here
measures anything: a smoke run checks that the sections run, not what a GPU does.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable

from helper.graph_capture import CudaGraphs


class _Graph:
    def __init__(self, api: "RerunGraphs") -> None:
        self.api, self.fn, self.out = api, None, None

    def capture_begin(self, capture_error_mode: str = "global") -> None:
        self.api.modes.append(capture_error_mode)

    def capture_end(self) -> None:
        pass

    def replay(self) -> None:
        new = self.fn()
        self.out.loss.copy_(new.loss)
        self.out.correct.copy_(new.correct)
        for name, value in new.terms.items():
            self.out.terms[name].copy_(value)

    def reset(self) -> None:
        self.api.released += 1


class RerunGraphs(CudaGraphs):
    """Graphs that re-run the step at replay; counts captures and freed graphs."""

    def __init__(self) -> None:
        super().__init__()
        self.captures = self.released = 0
        self.modes: list[str] = []

    def new_graph(self) -> Any:
        return _Graph(self)

    def stream(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def sync_debug(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def prepare(self) -> None:
        pass

    def capture(self, graph: Any, fn: Callable[[], Any]) -> Any:
        graph.fn = fn
        graph.out = super().capture(graph, fn)
        self.captures += 1
        return graph.out
