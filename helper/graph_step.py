"""The training step as one CUDA graph (``--cuda_graphs auto|on``): captured once, replayed
for every full batch.

A CIFAR step launches a few hundred small kernels; replaying them as one graph removes the
launch overhead that bounds it. The graph holds the whole step: the teacher forward, the
objective's forward and backward and the SGD update. The batch is copied into static input
tensors before each replay; a batch of another size (the last of an epoch) runs eagerly. The
default is ``--cuda_graphs off`` until ``scripts/gpu_acceptance.py`` has passed on a GPU
(docs/SPEED.md).

Correctness guards:
- a graph is captured only where it can be exact: CUDA, one process, no ``--compile``, every
  method ``graph_safe`` (:func:`graph_plan` says why not otherwise, once, as a warning);
  ``tests/methods/test_host_sync.py`` proves the graph-safe methods never wait on the host;
- it is captured at the loader's full batch size, and again whenever something baked into it
  changes: the learning rates, or what a method reads of the epoch (``graph_key``, DKD's
  warm-up factor); the old graph is freed first;
- warm-up steps run from a snapshot of every tensor a step changes (parameters, buffers,
  optimiser state), restored afterwards, so capturing never moves the run; the second runs
  with host waits refused (``torch.cuda.set_sync_debug_mode("error")``);
- after each capture, one eager step and one replay start from the same state and batch; the
  loss and the updated state must agree within :data:`TOLERANCES` of the run's precision and
  be finite;
- any failure (warm-up, capture, replay, check) restores the state, drops the graph and runs
  the rest of the run eagerly, with one warning and an event in the run's files
  (:attr:`GraphedStep.events`; ``graph_events.jsonl`` and ``summary.json``).
"""
from __future__ import annotations

import json
import warnings
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from helper.graph_capture import CudaGraphs, StateSnapshot, max_relative_error
from helper.step import StepOut, TrainStep, unpack

WARMUP_STEPS = 2
GRAPH_EVENTS = "graph_events.jsonl"  # in the run folder: one JSON line per fallback
# Relative tolerances of the capture check, per precision: fp32 compares the loss and every
# tensor the step changes; bf16 the loss and the weights after the update, looser, since
# nondeterministic bf16 kernels may flip an ulp (momentum would amplify it, so it is left out).
TOLERANCES = {"fp32": {"loss": 1e-4, "state": 1e-4, "kinds": ("param", "buffer", "optim")},
              "bf16": {"loss": 2e-2, "state": 1e-3, "kinds": ("param", "buffer")}}


def graph_plan(mode: str, device: torch.device, world_size: int, compiled: bool,
               *parts: Any, recipe: Sequence[str] = ()) -> tuple[bool, str]:
    """Whether a run captures its step, and why (shown in the run's header).

    Args:
        mode: ``--cuda_graphs``: ``auto`` (capture where it is exact), ``on`` (the same, but
            the reason for staying eager is a warning), ``off``.
        device: the run's device.
        world_size: number of DDP ranks.
        compiled: whether ``--compile`` wraps the networks.
        parts: what the step calls (the unwrapped objective, the teacher callable); any with
            ``graph_safe`` False keeps the step eager.
        recipe: recipe choices a graph cannot replay (``--opt adamw``, a per-iteration LR).
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
    if recipe:
        reasons.append("the recipe: " + ", ".join(recipe))
    if reasons:
        return False, "eager (" + "; ".join(reasons) + ")"
    return True, "CUDA graph (whole step, checked against an eager step at each capture)"


def report_step_mode(cfg: Any, env: Any, mode: str) -> None:
    """Prints how the step runs (rank 0). Where graphs were asked for (``--cuda_graphs on``,
    or ``auto`` on CUDA without ``--compile``), an eager step also warns once, saying why."""
    if not env.is_main:
        return
    print(f"training step: {mode}", flush=True)
    expected = cfg.cuda_graphs == "on" or (cfg.cuda_graphs == "auto" and env.device.type == "cuda"
                                           and not cfg.compile)  # --compile is a choice of its own
    if expected and not mode.startswith("CUDA graph"):
        warnings.warn(f"the training step runs {mode}")


def append_event(path: str) -> Callable[[dict[str, Any]], None]:
    """A recorder that appends each graph event to ``path`` as one JSON line, as it happens
    (a run that dies later still leaves the record)."""
    def record(event: dict[str, Any]) -> None:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(event) + "\n")
    return record


def step_record(step: Any, planned: str) -> dict[str, Any]:
    """What ``summary.json`` says of a run's training step: the mode it ran (the plan, or
    the fallback after a failed capture), the captures made and every graph event."""
    mode = step.mode if getattr(step, "failed", False) else planned
    return {"step_mode": mode, "graph_captures": getattr(step, "captures", 0),
            "graph_events": list(getattr(step, "events", []))}


class GraphedStep:
    """A :class:`~helper.step.TrainStep` replayed from a CUDA graph for full batches.

    Args:
        eager: the eager step (what the graph records; also runs the other batches).
        objective: the unwrapped objective (its ``graph_key(epoch)``; the snapshots cover its
            state: the teacher is frozen and outside it).
        graph_api: how graphs are made; :class:`~helper.graph_capture.CudaGraphs` by default.
            Tests pass stand-ins that re-run the step or raise, to exercise this on the CPU.
        batch_size: the loader's full batch; only batches of this size are captured and
            replayed (None: the largest seen so far).
        on_event: called with each event (a fallback) as it happens, e.g. :func:`append_event`.
    """

    def __init__(self, eager: TrainStep, objective: nn.Module,
                 graph_api: Optional[CudaGraphs] = None, batch_size: Optional[int] = None,
                 on_event: Optional[Callable[[dict[str, Any]], None]] = None) -> None:
        self.eager, self.objective = eager, objective
        self.modules = [objective]
        self.api = graph_api or CudaGraphs()
        self.batch_size, self.batch_size_given, self.on_event = batch_size, batch_size is not None, on_event
        self.tolerance = TOLERANCES.get(eager.precision, TOLERANCES["bf16"])
        self.graph: Any = None
        self.key: Any = None
        self.static: Optional[list[torch.Tensor]] = None
        self.out: Optional[StepOut] = None
        self.failed = False
        self.captures = 0
        self.events: list[dict[str, Any]] = []

    @property
    def mode(self) -> str:
        """How the step runs now: ``CUDA graph``, or eager after a fallback and why."""
        if self.failed:
            last = self.events[-1]
            return f"eager (the CUDA graph fell back at epoch {last['epoch']}, {last['stage']}: {last['reason']})"
        return "CUDA graph"

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor,
                 views: Optional[torch.Tensor], epoch: int) -> StepOut:
        inputs = [images, labels, index] + ([views] if views is not None else [])
        if self.failed or not self._full(images.shape[0]):
            return self.eager(images, labels, index, views, epoch)
        key = self._key(epoch)
        if self.graph is None or key != self.key or not self._fits(inputs):
            return self._capture_and_check(inputs, epoch, key)
        self._load(inputs)
        try:
            self.api.replay(self.graph)
        except Exception as err:  # a replay that fails leaves the step undone: run it eagerly
            return self._fall_back("replay", err, epoch, None, inputs)
        return self.out  # type: ignore[return-value]

    def _full(self, n: int) -> bool:
        """Whether a batch of ``n`` samples is the captured size: the loader's full batch when
        known, else the largest seen so far (a short first batch does not fix the size)."""
        if not self.batch_size_given and n > (self.batch_size or 0):
            self.batch_size = n
        return n == self.batch_size

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
        return self.eager(*self._unstatic(), epoch)

    def _unstatic(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        return unpack(tuple(self.static))  # type: ignore[arg-type]

    def _drop_graph(self) -> None:
        graph, self.graph, self.out, self.key = self.graph, None, None, None
        if graph is not None:
            self.api.release(graph)

    def _capture_and_check(self, inputs: list[torch.Tensor], epoch: int, key: Any) -> StepOut:
        self._drop_graph()  # its memory pool is freed before the next one is made
        if not self._fits(inputs):
            self.static = [t.clone() for t in inputs]
        self._load(inputs)
        start = StateSnapshot(self.modules, self.eager.optimizer)
        stage = "warm-up"
        try:
            for i in range(WARMUP_STEPS):  # lazy state (momentum buffers), allocator, cuDNN plans
                with self.api.warmup(strict=i == WARMUP_STEPS - 1):
                    self._run_static(epoch)
            start.restore()
            self.eager.optimizer.zero_grad(set_to_none=True)
            stage = "capture"
            graph = self.api.new_graph()
            self.graph = graph
            out = self.api.capture(graph, lambda: self._run_static(epoch))
            start.restore()  # a real capture runs nothing; stand-ins in tests do
            self.captures += 1
            stage = "check"
            self._check(graph, out, start, epoch)
        except Exception as err:
            return self._fall_back(stage, err, epoch, start, inputs)
        self.key, self.out = key, out
        return out

    def _check(self, graph: Any, out: StepOut, start: StateSnapshot, epoch: int) -> None:
        """The same step twice from the same state: eagerly, then replayed; raises
        :class:`CaptureMismatch` unless both agree within the tolerance and are finite."""
        kinds = self.tolerance["kinds"]
        reference = self._run_static(epoch)
        reference_loss, after_eager = reference.loss.detach().clone(), start.values(kinds)
        start.restore()
        self.api.replay(graph)
        loss_error = max_relative_error([reference_loss], [out.loss])
        state_error = max_relative_error(after_eager, start.values(kinds))
        if loss_error > self.tolerance["loss"] or state_error > self.tolerance["state"]:
            raise CaptureMismatch(
                f"the replay differs from the eager step (loss {loss_error:.2e}, state {state_error:.2e} "
                f"relative; allowed {self.tolerance['loss']:g}, {self.tolerance['state']:g}"
                f"{'; not finite' if float('inf') in (loss_error, state_error) else ''})")

    def _fall_back(self, stage: str, err: BaseException, epoch: int, start: Optional[StateSnapshot],
                   inputs: list[torch.Tensor]) -> StepOut:
        """Undoes whatever the failed attempt changed, drops the graph, records why, and runs
        this batch (and every later one) eagerly."""
        if start is not None:
            start.restore()
        self.eager.optimizer.zero_grad(set_to_none=True)
        with_graph = self.graph is not None
        self._drop_graph()
        self.static, self.failed = None, True
        reason = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
        event = {"event": "cuda_graph_fallback", "epoch": epoch, "stage": stage, "reason": reason,
                 "captures": self.captures, "graph_dropped": with_graph}
        self.events.append(event)
        if self.on_event is not None:
            self.on_event(event)
        warnings.warn(f"the CUDA-graph step failed at {stage} (epoch {epoch}; {reason}); "
                      f"this run continues eagerly")
        return self.eager(*unpack(tuple(inputs)), epoch)


class CaptureMismatch(RuntimeError):
    """A captured step's replay disagreed with the eager step (or was not finite)."""
