"""Several runs per GPU: the plan for a calibration table, thread shares, the estimate's
arithmetic, the calibration cache, MPS detection, and a real (tiny, CPU) calibration."""
from __future__ import annotations

import json
import re

import pytest


from errors import UserError
from paper_tables import calibrate, pack_plan, packing
from train_utils import load_script
from paper_tables.gpu_slots import Slot



reproduce = load_script("reproduce")


class FakePool:
    """Stands in for calibrate.WorkerPool: rates from a table, every round recorded."""

    rounds: list = []
    specs: list = []
    table: dict = {}

    def __init__(self, spec, environ, gpu, n_train, classes, steps, warmup):
        FakePool.specs.append(spec)
        self.shape = (gpu, n_train, classes)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def round(self, k, threads, timeout_s):
        FakePool.rounds.append((k, threads, *self.shape))
        rate = FakePool.table[k]
        return (rate, "") if isinstance(rate, float) else (None, rate)


@pytest.fixture
def fake_pool(monkeypatch):
    monkeypatch.setattr(calibrate, "WorkerPool", FakePool)
    FakePool.rounds, FakePool.specs, FakePool.table = [], [], {}
    return FakePool


def _spec(**changes) -> calibrate.Spec:
    argv = ("--path_t", "unused.pth", "--model_s", "resnet8", "--distill", "kd", "--add", "kd", "-r", "0.1",
            "-a", "0.9", "--dataset", "digits", "--batch_size", "16")
    values = dict(teacher="resnet8", student="resnet8", method="kd+kd", dataset="digits", batch=16,
                  speed="fp32", device="cpu", device_name="test cpu", torch="t", mps=False, argv=argv)
    return calibrate.Spec(**{**values, **changes})


# --- the plan for a given calibration table ---------------------------------------------------

def test_the_fastest_plan_wins_and_near_ties_go_to_the_smaller_k():
    a = {1: 100.0, 2: 190.0, 4: 200.0, 8: 150.0}
    assert packing.choose_k([a], [1e6]) == 4  # 4 is 5 % faster than 2: outside the tolerance
    near = {1: 100.0, 2: 198.0, 4: 200.0}
    assert packing.choose_k([near], [1e6]) == 2  # 4 is 1 % faster: the smaller K
    # two pairs: the plan's time is the sum over pairs; only Ks measured for both count
    small, big = {1: 1000.0, 2: 3000.0, 4: 3100.0}, {1: 500.0, 2: 400.0}
    assert packing.choose_k([small, big], [1e6, 1e6]) == 2  # 333 + 2500 s at K=2 beat 1000 + 2000 s at K=1
    assert packing.choose_k([small, big], [1e6, 1e7]) == 1  # 1000 + 20000 s at K=1 beat 333 + 25000 s
    with pytest.raises(ValueError):
        packing.choose_k([{1: 1.0}, {2: 1.0}], [1.0, 1.0])


def test_thread_shares():
    assert packing.thread_share(16, 4) == 4 and packing.thread_share(16, 5) == 3
    assert packing.thread_share(2, 8) == 1  # never 0
    assert packing.thread_share(16, 2, user_limit="3") == 3 and packing.thread_share(16, 8, user_limit="3") == 2
    assert packing.thread_share(16, 2, user_limit="junk") == 8
    assert packing.candidate_ks(cpu=False, cores=2) == [1, 2, 4, 8, 16]
    assert packing.candidate_ks(cpu=True, cores=5) == [1, 2, 4] and packing.candidate_ks(cpu=True, cores=0) == [1]


@pytest.mark.parametrize("text, value", [("auto", "auto"), ("AUTO", "auto"), ("3", 3), (2, 2)])
def test_jobs_per_gpu_takes_a_number_or_auto(text, value):
    assert packing.parse_jobs_per_gpu(text) == value


@pytest.mark.parametrize("text", ["0", "-1", "two", "1.5"])
def test_bad_jobs_per_gpu_is_one_line(text):
    with pytest.raises(UserError, match="--jobs-per-gpu must be a positive integer or auto"):
        packing.parse_jobs_per_gpu(text)


# --- the estimate -----------------------------------------------------------------------------

def test_estimate_arithmetic():
    # 240 epochs of 782 steps of 64 images; 4 runs per GPU share an aggregate of 8,000 images/s
    images = packing.images_to_train(240, 50000, 64)
    assert images == 240 * 782 * 64
    rates = {1: 3000.0, 4: 8000.0}
    e = packing.estimate([packing.RunWork(images, rates)] * 6, k=4, slots=4)
    per_run_s = images / (8000.0 / 4)
    assert e.runs == 6 and e.wall_s == pytest.approx(2 * per_run_s)  # 6 runs on 4 slots: two rounds
    assert e.device_hours == pytest.approx(6 * images / 8000.0 / 3600)  # = total images / aggregate rate
    # a run on 8 GPUs (rates per GPU): 8 times the rate, the same GPU time
    wide = packing.estimate([packing.RunWork(images, rates, devices=8)], k=1, slots=1)
    assert wide.wall_s == pytest.approx(images / (3000.0 * 8))
    assert wide.device_hours == pytest.approx(images / 3000.0 / 3600)
    assert packing.images_to_train(-3, 100, 10) == 0.0


# --- the cache ----------------------------------------------------------------------------------

def test_the_cache_is_keyed_by_device_torch_and_configuration(tmp_path, monkeypatch, fake_pool):
    fake_pool.table = {1: 100.0, 2: 190.0, 4: 200.0, 8: 150.0, 16: 140.0}
    rounds = fake_pool.rounds
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    spec, folder = _spec(), str(tmp_path / "calibration")
    cal = calibrate.calibrate(spec, [1, 2, 4, 8, 16], folder, None, cores=8, log=lambda line: None)
    assert cal.rates == {1: 100.0, 2: 190.0, 4: 200.0, 8: 150.0}  # 8 is 25 % below 4: 16 is not tried
    assert 16 in cal.stopped and "below the best" in cal.stopped[16]
    # each round's processes share the 8 cores; the digits shape comes from the spec's data set
    assert rounds == [(1, 8, None, 1347, 10), (2, 4, None, 1347, 10), (4, 2, None, 1347, 10), (8, 1, None, 1347, 10)]
    saved = json.loads((tmp_path / "calibration" / spec.file_name()).read_text())
    assert saved["key"]["device_name"] == "test cpu" and saved["rates"]["4"] == 200.0
    rounds.clear()
    again = calibrate.calibrate(spec, [1, 2, 4, 8, 16], folder, None, cores=8, log=lambda line: None)
    assert again.rates == cal.rates and rounds == []  # all from the cache, nothing measured
    for other in (_spec(device_name="another cpu"), _spec(torch="u"), _spec(batch=32), _spec(method="wttm")):
        assert calibrate.read_cache(folder, other).rates == {}
    calibrate.calibrate(_spec(torch="u"), [1], folder, "3", cores=8, log=lambda line: None)
    assert rounds == [(1, 8, "3", 1347, 10)]
    rounds.clear()
    calibrate.calibrate(spec, [1, 2], folder, None, cores=8, recalibrate=True, log=lambda line: None)
    assert [r[0] for r in rounds] == [1, 2]


def test_a_failing_round_ends_the_calibration_and_a_failing_first_round_is_an_error(tmp_path, fake_pool):
    fake_pool.table = {1: 100.0, 2: 200.0, 4: "torch.OutOfMemoryError: CUDA out of memory", 8: 400.0}
    cal = calibrate.calibrate(_spec(), [1, 2, 4, 8], str(tmp_path), "0", cores=4, log=lambda line: None)
    assert cal.rates == {1: 100.0, 2: 200.0} and "out of memory" in cal.stopped[4]
    assert [r[0] for r in fake_pool.rounds] == [1, 2, 4]
    fake_pool.rounds.clear()
    cal = calibrate.calibrate(_spec(), [1, 2, 4, 8], str(tmp_path), "0", cores=4, log=lambda line: None)
    assert fake_pool.rounds == [] and 8 not in cal.rates  # the cache remembers where it stopped
    fake_pool.table = {1: "RuntimeError: boom"}
    with pytest.raises(UserError, match="failed with K=1: RuntimeError: boom"):
        calibrate.calibrate(_spec(batch=8), [1, 2], str(tmp_path), None, cores=4, log=lambda line: None)


def test_a_dry_run_reads_the_cache_and_measures_nothing(tmp_path, fake_pool):
    assert calibrate.calibrate(_spec(), [1, 2], str(tmp_path), None, 2, measure=False).rates == {}
    assert fake_pool.rounds == []


# --- reproduce.py --jobs-per-gpu auto --estimate ------------------------------------------------

def test_reproduce_packs_by_the_calibration_and_estimates_the_plan(tmp_path, monkeypatch, capsys, fake_pool):
    fake_pool.table = {1: 100.0, 2: 190.0, 4: 200.0, 8: 150.0}
    monkeypatch.setattr(packing, "available_cores", lambda: 16)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    argv = ["--estimate", "--gpus", "cpu", "--jobs-per-gpu", "auto", "--pair", "resnet56:resnet20", "--method", "KD",
            "--method", "WTTM", "--trials", "2", "--save_root", str(tmp_path),
            "--", "--dataset", "digits", "--epochs", "3", "--batch_size", "64", "--model_s", "resnet8"]
    assert reproduce.main(argv) == 0
    out = capsys.readouterr().out
    # one calibration for the pair (its first method, KD), Ks 1..8 (8 declined), none for WTTM
    assert [(s.teacher, s.student, s.method, s.batch, s.dataset) for s in fake_pool.specs] == [
        ("resnet56", "resnet8", "kd+kd", 64, "digits")]
    assert [r[:2] for r in fake_pool.rounds] == [(1, 16), (2, 8), (4, 4), (8, 2)]
    assert "# packing: 4 runs per CPU (chosen by calibration); 4 CPU threads per process" in out
    # 4 runs × 3 epochs × 22 steps × 64 images at 200/4 images/s each, all at once on 4 slots
    per_run_s = 3 * 22 * 64 / 50.0
    wall = re.search(r"# estimate: 4 runs, ([\d.]+) CPU-hours, wall (\S+) on 1 CPU slot × 4", out)
    assert wall and wall.group(2) == "1m24s" and round(per_run_s) == 84
    assert float(wall.group(1)) == pytest.approx(4 * per_run_s / 4 / 3600, abs=0.01)
    assert not (tmp_path / "student_model").exists()  # an estimate runs nothing
    fake_pool.rounds.clear()
    assert reproduce.main(argv) == 0 and fake_pool.rounds == []  # the second time from the cache
    assert "images/s K=1: 100, K=2: 190, K=4: 200, K=8: 150" in capsys.readouterr().out


def test_estimate_and_packing_refuse_slurm(capsys):
    with pytest.raises(SystemExit) as err:
        reproduce.main(["--slurm", "--jobs-per-gpu", "auto", "--dry-run"])
    assert err.value.code == 2 and "a SLURM job's shape is --slurm_nodes × --slurm_gpus" in capsys.readouterr().err


# --- MPS ----------------------------------------------------------------------------------------

def test_mps_is_seen_through_its_pipe_and_never_required(tmp_path, monkeypatch):
    monkeypatch.setattr(packing.shutil, "which", lambda name: None)
    assert packing.mps_status({"CUDA_MPS_PIPE_DIRECTORY": str(tmp_path)}) is None
    (tmp_path / "control").write_text("")
    assert packing.mps_status({"CUDA_MPS_PIPE_DIRECTORY": str(tmp_path)}) == f"MPS control daemon at {tmp_path}"
    tool = tmp_path / "bin" / "nvidia-cuda-mps-control"
    tool.parent.mkdir()
    tool.write_text("#!/bin/sh\ncat > /dev/null\nexit 0\n")
    tool.chmod(0o755)
    monkeypatch.setattr(packing.shutil, "which", lambda name: str(tool))
    assert "answers" in packing.mps_status({"CUDA_MPS_PIPE_DIRECTORY": str(tmp_path / "none")})
    tool.write_text("#!/bin/sh\ncat > /dev/null\nexit 1\n")
    assert packing.mps_status({"CUDA_MPS_PIPE_DIRECTORY": str(tmp_path / "none")}) is None


# --- a real calibration: tiny pair, CPU, K = 1 and 2 ---------------------------------------------

def test_a_real_tiny_calibration_on_the_cpu(tmp_path, monkeypatch):
    lines = []
    cal = calibrate.calibrate(_spec(), [1, 2], str(tmp_path), None, cores=2, steps=3, warmup=1,
                              log=lines.append, timeout_s=600)
    assert set(cal.rates) == {1, 2} and min(cal.rates.values()) > 0, (cal.stopped, lines)
    assert lines[0].startswith("# calibration resnet8:resnet8 kd+kd (batch 16): K=1: ")
    monkeypatch.setattr(calibrate, "WorkerPool", lambda *a: pytest.fail("measured again"))
    assert calibrate.calibrate(_spec(), [1, 2], str(tmp_path), None, cores=2).rates == cal.rates
    assert pack_plan.cpu_name()


def test_a_dry_run_with_auto_measures_nothing_and_says_so(tmp_path, fake_pool, capsys):
    argv = ["--dry-run", "--gpus", "cpu", "--jobs-per-gpu", "auto", "--pair", "resnet56:resnet20", "--method", "KD",
            "--trials", "1", "--save_root", str(tmp_path), "--", "--dataset", "digits"]
    assert reproduce.main(argv) == 0
    out = capsys.readouterr().out
    assert fake_pool.rounds == [] and "# packing: 1 run per CPU (auto: no calibration cached yet)" in out
    assert "none cached" in out and "train_student.py" in out


def test_the_plan_lines_name_the_gpu_packing_and_mps():
    spec = _spec(device="cuda", device_name="NVIDIA H200")
    cal = calibrate.Calibration(spec, {1: 1000.0, 4: 3000.0}, {}, "x.json")
    gpus = [Slot((0,)), Slot((1,))]
    plan = pack_plan.PackingPlan(4, True, [(cal, [])], packing.Estimate(12.5, 7200.0, 10), "MPS control daemon at /p")
    lines = pack_plan.describe(plan, gpus, threads=2)
    assert "images/s K=1: 1,000, K=4: 3,000" in lines[0] and "on NVIDIA H200" in lines[0]
    assert lines[1] == ("# packing: 4 runs per GPU (chosen by calibration); 2 CPU threads per process; "
                        "MPS: MPS control daemon at /p")
    assert lines[2].startswith("# estimate: 10 runs, 12.5 GPU-hours, wall 2h00m on 2 GPU slots × 4")
    plan.mps = None
    assert "MPS: not running (optional; start it with nvidia-cuda-mps-control -d)" in pack_plan.describe(plan, gpus, 2)[1]
