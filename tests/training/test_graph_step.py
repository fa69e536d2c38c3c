"""The CUDA-graph step's guards and bookkeeping, on the CPU.

No CUDA here: a stand-in graph API records the step at capture and re-runs it at replay,
writing into the captured outputs as a real graph does. That exercises everything the graph
step adds around torch's graphs (static inputs, warm-up from a snapshot restored in place,
recapture when the LR or a method's epoch dependence changes, the eager partial batch, the
eager-vs-replay check and its fallback), and the step must train exactly as the eager one.
"""
from __future__ import annotations

import contextlib
import json
import types
import warnings

import pytest
import torch

import models
from dataset.base import CIFAR100_MEAN, CIFAR100_STD, ImageDataset
from dataset.loader import DeviceLoader
from helper import distributed
from helper.graph_capture import CudaGraphs, StateSnapshot, max_relative_error
from helper.graph_step import GraphedStep, append_event, graph_plan, step_record
from helper.step import unpack
from helper.assemble import assemble_step
from helper.student import build_objective
from helper.student_flags import parse_config

ENV = distributed.DistEnv(0, 1, 0, torch.device("cpu"))


class FakeCuda:
    """torch.cuda's stream calls on the CPU: which stream is current, and how many were made."""

    def __init__(self) -> None:
        self.current, self.created = "default", 0

    def Stream(self):  # noqa: N802 (torch's name)
        self.created += 1
        return types.SimpleNamespace(name=f"side{self.created}", wait_stream=lambda other: None)

    def current_stream(self):
        return types.SimpleNamespace(name=self.current, wait_stream=lambda other: None)

    @contextlib.contextmanager
    def stream(self, stream):
        before, self.current = self.current, stream.name
        try:
            yield
        finally:
            self.current = before


class FakeGraph:
    """A graph that keeps the captured function and re-runs it into the captured outputs at
    replay, as a real graph writes into its static outputs; ``fail`` names a call that raises."""

    def __init__(self, api: "StandInGraphs") -> None:
        self.api, self.fn, self.out = api, None, None

    def capture_begin(self, capture_error_mode: str = "global") -> None:
        self.api.modes.append((capture_error_mode, self.api.cuda.current))
        self.api.maybe_fail("capture_begin")

    def capture_end(self) -> None:
        self.api.maybe_fail("capture_end")

    def replay(self) -> None:
        api = self.api
        api.replays += 1
        api.maybe_fail("replay" if api.replays == 1 else "later_replay")
        new = self.fn()
        self.out.loss.copy_(float("nan") if api.fail == "nan" else new.loss)
        self.out.correct.copy_(new.correct)
        for name, value in new.terms.items():
            self.out.terms[name].copy_(value)
        with torch.no_grad():
            for p in api.params:
                p.add_(api.perturb)

    def reset(self) -> None:
        self.api.released += 1


class StandInGraphs(CudaGraphs):
    """:class:`CudaGraphs` with its CUDA calls replaced: the real capture and stream logic
    runs, on :class:`FakeCuda` streams and :class:`FakeGraph` graphs."""

    def __init__(self, cuda: FakeCuda, fail: str = "", perturb: float = 0.0) -> None:
        super().__init__()
        self.cuda, self.fail, self.perturb = cuda, fail, perturb
        self.captures = self.replays = self.released = 0
        self.modes: list[tuple[str, str]] = []
        self.strict: list[bool] = []
        self.params: list[torch.Tensor] = []

    def maybe_fail(self, where: str) -> None:
        if self.fail == where:
            raise RuntimeError(f"stand-in failure at {where}")

    def new_graph(self):
        return FakeGraph(self)

    def prepare(self) -> None:
        pass

    @contextlib.contextmanager
    def sync_debug(self):
        self.strict.append(True)
        yield
        self.maybe_fail("warmup")  # after the step ran: what it changed must be undone

    def capture(self, graph, fn):
        graph.fn = fn
        graph.out = super().capture(graph, fn)
        self.captures += 1
        return graph.out


@pytest.fixture
def fake_cuda(monkeypatch):
    cuda = FakeCuda()
    for name in ("Stream", "current_stream", "stream"):
        monkeypatch.setattr(torch.cuda, name, getattr(cuda, name))
    return cuda


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


def assert_same_state(objective_a, step_a, objective_b, step_b) -> None:
    for (name, a), b in zip(objective_a.state_dict().items(), objective_b.state_dict().values()):
        assert torch.equal(a, b), name
    for a, b in zip(step_a.optimizer.state.values(), step_b.optimizer.state.values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])


@pytest.mark.parametrize("method", ["wttm", "dkd", "hint"])
def test_the_graphed_step_trains_exactly_as_the_eager_step(method, fake_cuda):
    extra = ["--dkd_warmup", "2"] if method == "dkd" else []
    objective_a, step_a, loader_a = build(method, *extra)
    objective_b, step_b, loader_b = build(method, *extra)
    api = StandInGraphs(fake_cuda)
    graphed = GraphedStep(step_b.run, objective_b, graph_api=api, batch_size=16)
    lrs = [0.05, 0.05, 0.005, 0.005]
    eager_losses = train(step_a.run, step_a.optimizer, loader_a, 4, lrs)
    graph_losses = train(graphed, step_b.optimizer, loader_b, 4, lrs)
    assert graph_losses == eager_losses  # bit for bit: warm-ups and checks leave no trace
    assert_same_state(objective_a, step_a, objective_b, step_b)
    # captured again only when something baked in changed: the LR at epoch 3, and for DKD the
    # warm-up factor of epochs 1 and 2 (1/2, then 1 from epoch 2 on)
    assert graphed.captures == api.captures == {"wttm": 2, "hint": 2, "dkd": 3}[method]
    assert api.replays == 4 * 2  # every full batch replays once (at a capture: the checked replay)
    assert api.released == graphed.captures - 1  # each old graph freed before the next capture
    assert fake_cuda.created == 1 and fake_cuda.current == "default"  # one side stream, left again
    assert api.modes == [("thread_local", "side1")] * graphed.captures
    assert api.strict == [True] * graphed.captures  # the second warm-up of each capture refuses syncs
    assert not graphed.events and step_record(graphed, "CUDA graph (planned)")["step_mode"] == "CUDA graph (planned)"


@pytest.mark.parametrize("fail, stage", [("warmup", "warm-up"), ("capture_begin", "capture"),
                                         ("capture_end", "capture"), ("replay", "check"),
                                         ("later_replay", "replay"), ("nan", "check"),
                                         ("mismatch", "check")])
def test_every_failed_capture_falls_back_to_the_eager_run(fail, stage, fake_cuda, tmp_path):
    objective_a, step_a, loader_a = build("wttm")
    objective_b, step_b, loader_b = build("wttm")
    api = StandInGraphs(fake_cuda, fail=fail, perturb=1e-2 if fail == "mismatch" else 0.0)
    api.params = list(objective_b.student.parameters())
    events_file = tmp_path / "graph_events.jsonl"
    graphed = GraphedStep(step_b.run, objective_b, graph_api=api, batch_size=16,
                          on_event=append_event(str(events_file)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graph_losses = train(graphed, step_b.optimizer, loader_b, 1, [0.05])
    # the run is the eager run, bit for bit: the failed attempt left no trace
    assert graph_losses == train(step_a.run, step_a.optimizer, loader_a, 1, [0.05])
    assert_same_state(objective_a, step_a, objective_b, step_b)
    assert fake_cuda.current == "default"  # never left on the capture stream
    assert graphed.failed and graphed.graph is None
    assert len([w for w in caught if "continues eagerly" in str(w.message)]) == 1  # one warning
    [event] = graphed.events
    assert event["stage"] == stage and event["epoch"] == 1 and event["reason"]
    assert [json.loads(line) for line in events_file.read_text().splitlines()] == [event]
    record = step_record(graphed, "CUDA graph")
    assert record["graph_events"] == [event] and record["step_mode"].startswith(f"eager (the CUDA graph fell back at epoch 1, {stage}")
    if fail == "nan":
        assert "not finite" in event["reason"]


def test_a_short_first_batch_does_not_condemn_the_full_ones(fake_cuda):
    objective, step, _ = build("wttm")
    g = torch.Generator().manual_seed(2)
    images = torch.randn(40, 3, 32, 32, generator=g)
    labels, index = torch.arange(40) % 10, torch.arange(40)
    sizes = [8, 16, 16, 16]
    # replays: one checked replay per capture, then one per later full batch
    for given, captured_at, replays in ((16, [16], 3), (None, [8, 16], 4)):
        api = StandInGraphs(fake_cuda)
        graphed = GraphedStep(step.run, objective, graph_api=api, batch_size=given)
        seen = []
        for n in sizes:
            before = api.captures
            graphed(images[:n], labels[:n], index[:n], None, 1)
            if api.captures > before:
                seen.append(n)
        assert seen == captured_at and api.replays == replays and not graphed.failed


def test_the_check_fails_on_non_finite_values():
    finite = [torch.ones(3)]
    assert max_relative_error(finite, [torch.tensor([1.0, float("nan"), 1.0])]) == float("inf")
    assert max_relative_error([torch.tensor([float("inf")])], [torch.tensor([float("inf")])]) == float("inf")
    assert max_relative_error(finite, [torch.full((3,), 1.00001)]) == pytest.approx(1e-5, rel=1e-2)


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


def test_the_recipe_can_keep_the_step_eager_and_says_why():
    """AdamW and a per-iteration schedule are named in the plan's reason (helper.assemble)."""
    cuda = torch.device("cuda", 0)
    on, mode = graph_plan("auto", cuda, 1, False, recipe=["--opt adamw", "a per-iteration LR schedule"])
    assert not on and "the recipe: --opt adamw, a per-iteration LR schedule" in mode
    assert graph_plan("auto", cuda, 1, False)[0]
