"""The CUDA-graph step's guards and bookkeeping, on the CPU.

No CUDA here: a stand-in graph API records the step at capture and re-runs it at replay,
writing into the captured outputs as a real graph does. That exercises everything the graph
step adds around torch's graphs (static inputs, warm-up from a snapshot restored in place,
recapture when the LR or a method's epoch dependence changes, the eager partial batch, the
eager-vs-replay check and its fallback), and the step must train exactly as the eager one.
"""
from __future__ import annotations

import types
import warnings

import pytest
import torch

import models
from dataset.base import CIFAR100_MEAN, CIFAR100_STD, ImageDataset
from dataset.loader import DeviceLoader
from helper import distributed
from helper.graph_step import GraphedStep, StateSnapshot, graph_plan
from helper.step import unpack
from helper.student import assemble_step, build_objective
from helper.student_flags import parse_config

ENV = distributed.DistEnv(0, 1, 0, torch.device("cpu"))


class RerunGraphs:
    """Capture keeps the function and its outputs; replay re-runs it into those outputs."""

    def __init__(self, perturb: float = 0.0) -> None:
        self.captures, self.replays, self.perturb = 0, 0, perturb
        self.params: list[torch.Tensor] = []

    def new_graph(self):
        return types.SimpleNamespace(fn=None, out=None)

    def capture(self, graph, fn):
        graph.fn, graph.out = fn, fn()
        self.captures += 1
        return graph.out

    def replay(self, graph) -> None:
        new = graph.fn()
        graph.out.loss.copy_(new.loss)
        graph.out.correct.copy_(new.correct)
        for name, value in new.terms.items():
            graph.out.terms[name].copy_(value)
        self.replays += 1
        with torch.no_grad():
            for p in self.params:
                p.add_(self.perturb)

    def side_stream(self):
        import contextlib
        return contextlib.nullcontext()


pytestmark = pytest.mark.usefixtures("one_thread")


def build(method: str, *extra: str):
    """Student step parts for resnet8 → resnet8 on 40 synthetic images (batches of 16, 16, 8)."""
    cfg = parse_config(["--path_t", "x", "--model_s", "resnet8", "--distill", method, "-b", "1",
                        "--seed", "1", "--cuda_graphs", "off", *extra], ENV, "resnet8")
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.arange(40) % 10
    data = ImageDataset("synthetic", images, labels, images[:8], labels[:8], 10, CIFAR100_MEAN, CIFAR100_STD)
    torch.manual_seed(0)
    teacher = models.create_model("resnet8", 10).eval().requires_grad_(False)
    objective = build_objective(cfg, ENV, data, teacher)
    step = assemble_step(cfg, ENV, objective, teacher, torch.contiguous_format)
    loader = DeviceLoader(images, labels, 16, CIFAR100_MEAN, CIFAR100_STD, train=True, seed=1)
    return objective, step, loader


def train(run, optimizer, loader, epochs: int, lrs: list[float]) -> list[float]:
    losses = []
    for epoch in range(1, epochs + 1):
        for group in optimizer.param_groups:
            group["lr"] = lrs[epoch - 1]
        for batch in loader:
            images, labels, index, views = unpack(batch)
            losses.append(float(run(images, labels, index, views, epoch).loss))
    return losses


@pytest.mark.parametrize("method", ["wttm", "dkd", "hint"])
def test_the_graphed_step_trains_exactly_as_the_eager_step(method):
    extra = ["--dkd_warmup", "2"] if method == "dkd" else []
    objective_a, step_a, loader_a = build(method, *extra)
    objective_b, step_b, loader_b = build(method, *extra)
    api = RerunGraphs()
    graphed = GraphedStep(step_b.run, objective_b, graph_api=api)
    lrs = [0.05, 0.05, 0.005, 0.005]
    eager_losses = train(step_a.run, step_a.optimizer, loader_a, 4, lrs)
    graph_losses = train(graphed, step_b.optimizer, loader_b, 4, lrs)
    assert graph_losses == eager_losses  # bit for bit: warm-ups and checks leave no trace
    for (name, a), b in zip(objective_a.state_dict().items(), objective_b.state_dict().values()):
        assert torch.equal(a, b), name
    for a, b in zip(step_a.optimizer.state.values(), step_b.optimizer.state.values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    # captured again only when something baked in changed: the LR at epoch 3, and for DKD the
    # warm-up factor of epochs 1 and 2 (1/2, then 1 from epoch 2 on)
    assert graphed.captures == {"wttm": 2, "hint": 2, "dkd": 3}[method]
    assert api.replays == 4 * 2  # every full batch replays once (at a capture: the checked replay)


def test_a_replay_that_disagrees_with_the_eager_step_falls_back_to_eager():
    objective_a, step_a, loader_a = build("wttm")
    objective_b, step_b, loader_b = build("wttm")
    api = RerunGraphs(perturb=1e-2)
    api.params = list(objective_b.student.parameters())
    graphed = GraphedStep(step_b.run, objective_b, graph_api=api)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graph_losses = train(graphed, step_b.optimizer, loader_b, 2, [0.05, 0.05])
    assert graphed.failed and any("continues eagerly" in str(w.message) for w in caught)
    assert graph_losses == train(step_a.run, step_a.optimizer, loader_a, 2, [0.05, 0.05])
    for a, b in zip(objective_a.state_dict().values(), objective_b.state_dict().values()):
        assert torch.equal(a, b)


def test_snapshot_restores_in_place_and_zeroes_new_momentum():
    model = models.create_model("resnet8", 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    snapshot = StateSnapshot([model], optimizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pointers = [p.data_ptr() for p in model.parameters()]
    model.train()(torch.randn(4, 3, 32, 32)).sum().backward()
    optimizer.step()
    snapshot.restore()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # BN statistics too
    assert [p.data_ptr() for p in model.parameters()] == pointers
    assert all(not s["momentum_buffer"].any() for s in optimizer.state.values())
    with pytest.raises(ValueError, match="dampening"):
        StateSnapshot([model], torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, dampening=0.1))


def test_graph_plan_says_why_a_step_stays_eager():
    objective_crd, *_ = build("crd", "--nce_k", "8")
    objective_wttm, *_ = build("wttm")
    cuda = torch.device("cuda", 0)
    assert graph_plan("auto", cuda, 1, False, objective_wttm)[0]
    cases = [(("auto", torch.device("cpu"), 1, False, objective_wttm), "need a CUDA device"),
             (("auto", cuda, 2, False, objective_wttm), "DDP"),
             (("auto", cuda, 1, True, objective_wttm), "--compile"),
             (("auto", cuda, 1, False, objective_crd), "--distill/--add crd"),
             (("off", cuda, 1, False, objective_wttm), "--cuda_graphs off")]
    for args, reason in cases:
        on, mode = graph_plan(*args)
        assert not on and mode.startswith("eager") and reason in mode, mode


def test_the_step_mode_is_reported_and_an_unexpected_eager_step_warns(capsys):
    from helper.graph_step import report_step_mode

    cpu = types.SimpleNamespace(is_main=True, device=torch.device("cpu"))
    cuda = types.SimpleNamespace(is_main=True, device=torch.device("cuda", 0))
    eager = "eager (not replayable from a graph: --distill/--add crd)"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report_step_mode(types.SimpleNamespace(cuda_graphs="auto", compile=False), cpu, "eager (CUDA graphs need a CUDA device)")
        report_step_mode(types.SimpleNamespace(cuda_graphs="off", compile=False), cuda, "eager (--cuda_graphs off)")
        assert not caught  # the CPU is eager by design; off is what was asked
        report_step_mode(types.SimpleNamespace(cuda_graphs="auto", compile=False), cuda, eager)
        report_step_mode(types.SimpleNamespace(cuda_graphs="on", compile=False), cpu, "eager (CUDA graphs need a CUDA device)")
    assert len(caught) == 2 and "crd" in str(caught[0].message)
    assert capsys.readouterr().out.count("training step: ") == 4
