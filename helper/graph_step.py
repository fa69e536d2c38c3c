"""The training step as one CUDA graph: captured once, replayed for every full batch.

A CIFAR step launches a few hundred small kernels; replaying them as one graph removes the
launch overhead that bounds it (docs/SPEED.md). The graph holds the whole step: the teacher
forward, the objective's forward and backward and the SGD update. The batch is copied into
static input tensors before each replay; the last, smaller batch of an epoch runs eagerly.

Correctness guards:
- a graph is captured only where it can be exact: CUDA, one process, no ``--compile``, every
  method ``graph_safe`` (:func:`graph_plan` says why not otherwise, once, as a warning);
- it is captured again whenever something baked into it changes: the learning rates, or what
  a method reads of the epoch (``graph_key``, DKD's warm-up factor);
- warm-up steps run from a snapshot of every tensor a step changes (parameters, buffers,
  optimiser state), which is restored afterwards, so capturing never moves the run;
- after each capture, one eager step and one replay start from the same state and batch; if
  the loss or any updated weight differs by more than 1e-4 relative, the run warns and stays
  eager from then on.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, Optional

import torch
from torch import nn

from helper.step import StepOut, TrainStep

WARMUP_STEPS = 2
CHECK_RTOL = 1e-4


def graph_plan(mode: str, device: torch.device, world_size: int, compiled: bool,
               *parts: Any) -> tuple[bool, str]:
    """Whether a run captures its step, and why (shown in the run's header).

    Args:
        mode: ``--cuda_graphs``: ``auto`` (capture where it is exact), ``on`` (the same, but
            the reason for staying eager is a warning), ``off``.
        device: the run's device.
        world_size: number of DDP ranks.
        compiled: whether ``--compile`` wraps the networks.
        parts: what the step calls (the unwrapped objective, the teacher callable); any with
            ``graph_safe`` False keeps the step eager.
    """
    if mode == "off":
        return False, "eager (--cuda_graphs off)"
    reasons = []
    if device.type != "cuda":
        reasons.append("CUDA graphs need a CUDA device")
    if world_size > 1:
        reasons.append("DDP steps stay eager")
    if compiled:
        reasons.append("--compile manages its own graphs")
    unsafe = [getattr(p, "graph_unsafe_reason", type(p).__name__) for p in parts
              if not getattr(p, "graph_safe", True)]
    if unsafe:
        reasons.append("not replayable from a graph: " + ", ".join(unsafe))
    if reasons:
        return False, "eager (" + "; ".join(reasons) + ")"
    return True, "CUDA graph (whole step, checked against an eager step at each capture)"


def report_step_mode(cfg: Any, env: Any, mode: str) -> None:
    """Prints how the step runs (rank 0). Where graphs are the default (CUDA) or asked for
    (``--cuda_graphs on``), an eager step also warns once, saying why."""
    if not env.is_main:
        return
    print(f"training step: {mode}", flush=True)
    expected = cfg.cuda_graphs == "on" or (cfg.cuda_graphs == "auto" and env.device.type == "cuda"
                                           and not cfg.compile)  # --compile is a choice of its own
    if expected and not mode.startswith("CUDA graph"):
        warnings.warn(f"the training step runs {mode}")


class StateSnapshot:
    """Copies of every tensor a training step changes, restorable in place.

    In place matters: a captured graph reads and writes fixed addresses. Optimiser state that
    did not exist when the snapshot was taken (SGD's momentum buffers before the first step)
    is zeroed on restore, which for SGD without dampening is the same as absent.
    """

    def __init__(self, modules: list[nn.Module], optimizer: torch.optim.Optimizer) -> None:
        self.modules, self.optimizer = modules, optimizer
        for group in optimizer.param_groups:
            if group.get("dampening", 0) != 0 or group.get("nesterov", False):
                raise ValueError("StateSnapshot supports SGD without dampening or Nesterov only")
        self.saved = [(t, t.detach().clone()) for t in self._tensors()]
        self.had_state = {id(p) for p in optimizer.state}

    def _tensors(self) -> list[torch.Tensor]:
        seen, out = set(), []
        for module in self.modules:
            for t in list(module.parameters()) + list(module.buffers()):
                if id(t) not in seen:
                    seen.add(id(t))
                    out.append(t)
        for state in self.optimizer.state.values():
            out += [v for v in state.values() if isinstance(v, torch.Tensor)]
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

    def values(self) -> list[torch.Tensor]:
        """The current values of the snapshotted tensors (copies)."""
        return [t.detach().clone() for t, _ in self.saved]


def max_relative_error(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Largest ``max|a - b| / max(max|a|, tiny)`` over pairs of floating tensors."""
    worst = 0.0
    for x, y in zip(a, b):
        if x.is_floating_point() and x.numel():
            scale = max(float(x.abs().max()), 1e-12)
            worst = max(worst, float((x - y).abs().max()) / scale)
    return worst


class GraphedStep:
    """A :class:`~helper.step.TrainStep` replayed from a CUDA graph for full batches.

    Args:
        eager: the eager step (what the graph records; also runs the partial batches).
        objective: the unwrapped objective (its ``graph_key(epoch)``, and the modules whose
            state the snapshots cover, with ``extra_modules``).
        extra_modules: other modules a step changes (none today; the teacher is frozen).
        graph_api: how graphs are made; :class:`CudaGraphs` by default. Tests pass a stand-in
            that records and re-runs the step, to exercise the bookkeeping on the CPU.
    """

    def __init__(self, eager: TrainStep, objective: nn.Module, extra_modules: tuple[nn.Module, ...] = (),
                 graph_api: Optional["CudaGraphs"] = None) -> None:
        self.eager, self.objective = eager, objective
        self.modules = [objective, *extra_modules]
        self.api = graph_api or CudaGraphs()
        self.graph: Any = None
        self.key: Any = None
        self.static: Optional[list[torch.Tensor]] = None
        self.out: Optional[StepOut] = None
        self.failed = False
        self.captures = 0

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor,
                 views: Optional[torch.Tensor], epoch: int) -> StepOut:
        inputs = [images, labels, index] + ([views] if views is not None else [])
        if self.failed or (self.static is not None and not self._fits(inputs)):
            return self.eager(images, labels, index, views, epoch)
        key = self._key(epoch)
        if self.graph is None or key != self.key or not self._fits(inputs):
            return self._capture_and_check(inputs, epoch, key)
        self._load(inputs)
        self.api.replay(self.graph)
        return self.out  # type: ignore[return-value]

    def _key(self, epoch: int) -> Any:
        lrs = tuple(float(g["lr"]) for g in self.eager.optimizer.param_groups)
        method_key = self.objective.graph_key(epoch) if hasattr(self.objective, "graph_key") else None
        return lrs, method_key

    def _fits(self, inputs: list[torch.Tensor]) -> bool:
        return self.static is not None and len(inputs) == len(self.static) and all(
            a.shape == b.shape and a.dtype == b.dtype for a, b in zip(inputs, self.static))

    def _load(self, inputs: list[torch.Tensor]) -> None:
        for static, value in zip(self.static, inputs):  # type: ignore[arg-type]
            static.copy_(value, non_blocking=True)

    def _run_static(self, epoch: int) -> StepOut:
        images, labels, index, *rest = self.static  # type: ignore[misc]
        return self.eager(images, labels, index, rest[0] if rest else None, epoch)

    def _capture_and_check(self, inputs: list[torch.Tensor], epoch: int, key: Any) -> StepOut:
        if self.static is None or not self._fits(inputs):
            self.static = [t.clone() for t in inputs]
        self._load(inputs)
        start = StateSnapshot(self.modules, self.eager.optimizer)
        with self.api.side_stream():
            for _ in range(WARMUP_STEPS):  # lazy state (momentum buffers), allocator, cuDNN plans
                self._run_static(epoch)
        start.restore()
        self.eager.optimizer.zero_grad(set_to_none=True)
        graph = self.api.new_graph()
        out = self.api.capture(graph, lambda: self._run_static(epoch))
        start.restore()  # a real capture runs nothing; stand-ins in tests do
        self.captures += 1

        # the same step twice from the same state: eagerly, then replayed
        reference = self.eager(*self._unstatic(), epoch)
        reference_loss, after_eager = reference.loss.detach().clone(), start.values()
        start.restore()
        self.api.replay(graph)
        error = max(max_relative_error([reference_loss], [out.loss]),
                    max_relative_error(after_eager, start.values()))
        if error > CHECK_RTOL or not torch.isfinite(out.loss):
            start.restore()
            self.failed, self.graph = True, None
            warnings.warn(f"the CUDA-graph step differs from the eager step by {error:.2e} "
                          f"(relative; allowed {CHECK_RTOL:g}); this run continues eagerly")
            return self.eager(*self._unstatic(), epoch)
        self.graph, self.key, self.out = graph, key, out
        return out

    def _unstatic(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        images, labels, index, *rest = self.static  # type: ignore[misc]
        return images, labels, index, (rest[0] if rest else None)


class CudaGraphs:
    """torch's CUDA graphs, behind the four calls :class:`GraphedStep` makes."""

    def new_graph(self) -> Any:
        return torch.cuda.CUDAGraph()

    def capture(self, graph: Any, fn: Callable[[], StepOut]) -> StepOut:
        """Records ``fn`` into ``graph``; its outputs become the graph's static outputs."""
        with torch.cuda.graph(graph):
            return fn()

    def replay(self, graph: Any) -> None:
        graph.replay()

    @contextlib.contextmanager
    def side_stream(self):
        """Runs the warm-up on a side stream, as capture requires."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            yield
        torch.cuda.current_stream().wait_stream(stream)
