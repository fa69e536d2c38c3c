"""Graph vs eager twins: the same run twice from the same seed, once replayed from CUDA graphs.

Each twin trains three short epochs on synthetic images through :class:`DeviceLoader` (a
partial last batch, an LR drop before epoch 3, DKD's warm-up over epochs 1–2), then the two
runs' per-step losses and final state (parameters, buffers, momentum) are compared; a pass
needs zero fallbacks, at least one capture and agreement within the precision's tolerance.
On the CPU (``--cpu-smoke``) the graph side replays through :class:`RerunGraphs`.
"""
from __future__ import annotations

import time
from typing import Any, Sequence

import torch

from dataset.base import CIFAR100_MEAN, CIFAR100_STD
from dataset.loader import DeviceLoader
from helper.graph_capture import max_relative_error
from helper.graph_step import TOLERANCES, GraphedStep
from helper.step import unpack
from helper.host_sync import Built, Case, build_case
from scripts.acceptance.standins import RerunGraphs

EPOCHS = 3


def loader(device: torch.device, batch: int, n: int, views: bool, cl: bool) -> DeviceLoader:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g).to(device)
    return DeviceLoader(images, (torch.arange(n) % 10).to(device), batch, CIFAR100_MEAN, CIFAR100_STD,
                        train=True, seed=1, report_views=views,
                        memory_format=torch.channels_last if cl else torch.contiguous_format)


def graphed_step(built: Built, device: torch.device, batch: int) -> GraphedStep:
    """The run's own CUDA-graph step on CUDA; on the CPU its eager step behind the stand-in."""
    if isinstance(built.step.run, GraphedStep):
        return built.step.run
    if device.type == "cuda":
        raise RuntimeError(f"the plan keeps {built.case.name} eager: {built.step.mode}")
    return GraphedStep(built.step.run, built.objective, graph_api=RerunGraphs(), batch_size=batch)


def train(built: Built, run: Any, data: DeviceLoader, lrs: Sequence[float]) -> list[torch.Tensor]:
    losses = []
    built.objective.train()
    for epoch, lr in enumerate(lrs, start=1):
        for group in built.step.optimizer.param_groups:
            group["lr"] = lr
        for batch in data:
            losses.append(run(*unpack(batch), epoch).loss.detach().clone())
    return losses


def state_of(built: Built) -> list[torch.Tensor]:
    momentum = [s["momentum_buffer"] for s in built.step.optimizer.state.values() if "momentum_buffer" in s]
    return [t.detach().clone() for t in built.objective.state_dict().values()] + [m.clone() for m in momentum]


def twin(case: Case, device: torch.device, save_root: str, batch: int, n: int,
         extra: Sequence[str] = (), cache_rows: int = 0, precision: str = "fp32") -> dict[str, Any]:
    """One method's twin; a row for the report (``ok`` says whether it passed)."""
    start = time.perf_counter()
    flags = [*extra] + (["--dkd_warmup", "2"] if "dkd" in case.name.split("+") else [])
    cl = "--channels_last" in flags

    def build(graphs: str) -> Built:
        cached = _cached(device, cache_rows) if cache_rows else None
        return build_case(case, device, save_root, batch, [*flags, "--cuda_graphs", graphs], cached)
    eager, graphed = build("off"), build("on")
    lr = eager.step.optimizer.param_groups[0]["lr"]
    lrs = [lr, lr, lr * 0.1]
    run = graphed_step(graphed, device, batch)
    eager_losses = train(eager, eager.step.run, loader(device, batch, n, cache_rows > 0, cl), lrs)
    graph_losses = train(graphed, run, loader(device, batch, n, cache_rows > 0, cl), lrs)
    tol = TOLERANCES[precision]
    loss_err = max_relative_error(eager_losses, graph_losses)
    state_err = max_relative_error(state_of(eager), state_of(graphed))
    ok = (not run.events and run.captures >= 1 and loss_err <= tol["loss"] and state_err <= tol["state"])
    return {"case": case.name, "pair": "→".join(eager.pair), "precision": precision, "captures": run.captures,
            "fallbacks": len(run.events), "loss_rel_err": loss_err, "state_rel_err": state_err,
            "allowed": f"{tol['loss']:g} / {tol['state']:g}", "ok": ok, "seconds": time.perf_counter() - start,
            "note": run.events[0]["reason"] if run.events else ""}


def _cached(device: torch.device, rows: int) -> Any:
    from helper.teacher_cache import CachedTeacher
    g = torch.Generator().manual_seed(5)
    return CachedTeacher(torch.randn(rows, 10, generator=g), device)


def recaptures(device: torch.device, save_root: str, batch: int, n: int, count: int = 9) -> dict[str, Any]:
    """``count`` recaptures (one LR change each) of one step; device memory after each."""
    built = build_case(Case("wttm"), device, save_root, batch, ["--cuda_graphs", "on"])
    run = graphed_step(built, device, batch)
    data = loader(device, batch, n, False, False)
    images, labels, index, views = unpack(next(iter(data)))
    memory = []
    for i in range(count):
        for group in built.step.optimizer.param_groups:
            group["lr"] = 0.05 / (i + 1)
        run(images, labels, index, views, 1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            memory.append(torch.cuda.memory_reserved(device) / 2**20)
    released = getattr(run.api, "released", None)
    grew = memory[-1] - memory[1] if len(memory) > 1 else 0.0
    # after the second capture the pool should be steady: each capture frees the one before
    ok = run.captures == count and not run.events and grew <= max(64.0, 0.1 * memory[1] if memory else 0)
    return {"captures": run.captures, "fallbacks": len(run.events), "freed_graphs": released,
            "reserved_MiB": [round(m, 1) for m in memory], "growth_after_2nd_MiB": grew, "ok": ok}


def screen(cases: list[Case], device: torch.device, save_root: str, batch: int) -> list[dict[str, Any]]:
    """The host-sync screen on ``device``: one step per case under :class:`RefuseHostSync`."""
    from helper.host_sync import screen_step
    rows = []
    for case in cases:
        row: dict[str, Any] = {"case": case.name}
        try:
            built = build_case(case, device, save_root, batch)
        except Exception as err:
            rows.append({**row, "graph_safe": "?", "result": f"cannot build: {err}", "ok": False})
            continue
        safe = built.objective.graph_safe
        try:
            screen_step(built)
            result, ok = "no host wait", True
        except Exception as err:
            result, ok = f"{type(err).__name__}: {str(err)[:120]}", not safe
        rows.append({**row, "pair": "→".join(built.pair), "graph_safe": safe, "result": result, "ok": ok})
    return rows
