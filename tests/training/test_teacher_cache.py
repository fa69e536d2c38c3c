"""The exact teacher-output cache: view ids, exactness, refusal of bad files, lock, runs.

A small teacher keeps the builds cheap: resnet8 over 8 digits images (1,296 views) for the
exactness checks and the end-to-end runs, and a one-conv network for the file checks.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import threading
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import helper.teacher_cache as tc
import helper.teacher_cache.build
import models
from dataset import load_digits32
from dataset.loader import DeviceLoader, view_images
from dataset.views import decode_views, encode_views, views_per_image
from helper.config import Config
from helper.distill import FrozenTeacher
from helper.distributed import DistEnv
from helper.student import build_objective
from helper.student_flags import parse_config
from helper.teacher_cache.build import build_cache
from helper.teacher_cache.store import CacheKey, build_lock, cache_paths, check_cache, open_table
from train_utils import read_metrics, run_student, shrink

CPU = DistEnv(0, 1, 0, torch.device("cpu"))
N_IMAGES = 8
ROWS = N_IMAGES * views_per_image(4)
REL = 1e-6
# Every logit method as --distill, and kd/wttm as --add next to another logit method.
LOGIT_CONFIGS = {
    "kd": ["--distill", "kd", "-r", "0.1", "-a", "0.9", "-b", "0"],
    "ttm": ["--distill", "ttm", "--ttm_l", "0.1", "-b", "45"],
    "wttm": ["--distill", "wttm", "--ttm_l", "0.1", "-b", "3"],
    "dist": ["--distill", "dist"],
    "dkd": ["--distill", "dkd"],
    "ttm+kd": ["--distill", "ttm", "--add", "kd", "-a", "0.9", "-b", "1"],
    "dkd+wttm": ["--distill", "dkd", "--add", "wttm", "-a", "1", "-b", "1"],
}


pytestmark = pytest.mark.usefixtures("one_thread")


class TinyTeacher(nn.Module):
    """One conv, pooled, one linear layer: a teacher whose builds take milliseconds."""

    def __init__(self, seed: int = 0, classes: int = 10) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean(dim=(2, 3)))


def digits(n: int = N_IMAGES):
    return shrink(load_digits32(), n, 8)


def key_for(data, teacher_sha: str = "a" * 64, **changes) -> CacheKey:
    key = CacheKey(teacher_sha256=teacher_sha, teacher_arch="tiny", dataset=data.name,
                   data_sha256="d" * 64, image_shape=tuple(data.train_images.shape),
                   num_classes=data.num_classes, pad=4, mean=tuple(data.mean), std=tuple(data.std),
                   precision="fp32", channels_last=False, device_type="cpu")
    return CacheKey(**{**key.__dict__, **changes})


# ---- view ids and the loader ------------------------------------------------------------

def test_view_ids_encode_the_documented_formula_and_round_trip():
    index, dx, dy = torch.tensor([0, 3, 7]), torch.tensor([0, 8, 5]), torch.tensor([8, 0, 2])
    flip = torch.tensor([True, False, True])
    views = encode_views(index, dx, dy, flip, 4)
    assert views.tolist() == [((i * 9 + y) * 9 + x) * 2 + f for i, x, y, f in
                              zip(index.tolist(), dx.tolist(), dy.tolist(), flip.long().tolist())]
    for got, want in zip(decode_views(views, 4), (index, dx, dy, flip)):
        assert torch.equal(got, want)
    zero = torch.tensor([0])
    assert views_per_image(4) == 162 and encode_views(torch.tensor([1]), zero, zero, zero, 4).item() == 162


def test_loader_reports_views_without_changing_its_batches():
    data = digits(24)
    def make(views: bool) -> DeviceLoader:
        return DeviceLoader(data.train_images, data.train_labels, 10, data.mean, data.std, train=True,
                            seed=5, report_views=views)

    plain, reporting, twin = make(False), make(True), make(False).reporting_views()
    for _ in range(2):  # two epochs: the views follow each epoch's draws
        for a, b, c in zip(plain, reporting, twin):
            assert len(a) == 3 and len(b) == 4 and len(c) == 4
            for x, y, z in zip(a, b, c):
                assert torch.equal(x, y) and torch.equal(x, z)
            images, _, index, views = b
            assert views.dtype == torch.int64 and torch.equal(decode_views(views, 4)[0], index)
            # the view ids name exactly the pixels the loader yielded
            assert torch.equal(view_images(data.train_images, views, data.mean, data.std), images)
    with pytest.raises(ValueError):
        DeviceLoader(data.test_images, data.test_labels, 4, data.mean, data.std, train=False, seed=0,
                     report_views=True)


# ---- exactness: every logit method, cached vs live ---------------------------------------

@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """resnet8 teacher (random init), 8 digits images, its cache built and opened."""
    torch.set_num_threads(1)
    data = digits()
    torch.manual_seed(0)
    teacher = models.create_model("resnet8", data.num_classes).eval().requires_grad_(False)
    root = tmp_path_factory.mktemp("cache")
    key = key_for(data, teacher_arch="resnet8")
    paths = cache_paths(str(root), key)
    stats = build_cache(paths, key, teacher, data.train_images, data.mean, data.std,
                        torch.contiguous_format, CPU)
    assert stats["views"] == ROWS and not stats["skipped"] and check_cache(paths, key, ROWS, 10) is None
    return data, teacher, tc.CachedTeacher(open_table(paths, ROWS, 10), CPU.device), root


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("config", list(LOGIT_CONFIGS))
def test_cached_teacher_gives_the_live_loss_and_gradients(built, config):
    data, teacher, cached, root = built
    argv = ["--path_t", "unused.pth", "--model_s", "resnet8", "--dataset", "digits", "--batch_size", "8",
            "--seed", "1", "--save_root", str(root), "--device", "cpu", *LOGIT_CONFIGS[config]]
    cfg = parse_config(argv, CPU, "resnet8")
    torch.manual_seed(0)
    live_obj = build_objective(cfg, CPU, data, teacher)
    assert live_obj.feature_kind is None
    cached_obj = copy.deepcopy(live_obj)
    loader = DeviceLoader(data.train_images, data.train_labels, 8, data.mean, data.std, train=True,
                          seed=3, report_views=True)
    images, labels, index, views = next(iter(loader))
    live = FrozenTeacher(teacher, None, contextlib.nullcontext)(images, views)
    looked_up = cached(images, views)
    assert looked_up.feats is None and looked_up.logits.dtype == torch.float32
    assert relative(looked_up.logits, live.logits) <= REL
    results = []
    for objective, t_out in ((live_obj, live), (cached_obj, looked_up)):
        out = objective(images, labels, index, 1, t_out)
        out["loss"].backward()
        results.append((out["loss"].detach(), [p.grad.clone() for p in objective.student.parameters()]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert abs(float(loss_a - loss_b)) <= REL * abs(float(loss_a)), (float(loss_a), float(loss_b))
    assert len(grads_a) == len(grads_b) > 0
    for g_a, g_b in zip(grads_a, grads_b):
        assert relative(g_b, g_a) <= REL


def plan_for(data, root: Path, mode: str, teacher_sha: str = "a" * 64, distill: str = "kd",
             feature_kind=None) -> tc.CachePlan:
    cfg = Config({"teacher_cache": mode, "teacher_sha256": teacher_sha, "model_t": "tiny",
                  "precision": "fp32", "channels_last": False, "save_root": str(root),
                  "distill": distill, "dataset": data.name})
    return tc.plan(cfg, CPU, data, feature_kind)


def build_via_plan(data, root: Path, teacher_sha: str = "a" * 64, seed: int = 0) -> tc.CachePlan:
    plan = plan_for(data, root, "build", teacher_sha)
    assert plan.use
    cached = tc.teacher_for_run(plan, CPU, data, TinyTeacher(seed), torch.contiguous_format)
    assert cached is not None and check_cache(plan.paths, plan.key, ROWS, 10) is None
    return plan


def test_corrupt_truncated_and_foreign_caches_are_refused_then_rebuilt(tmp_path):
    data = digits()
    assert plan_for(data, tmp_path, "auto").reason.startswith("no cache")
    plan = build_via_plan(data, tmp_path)
    assert plan.build and plan_for(data, tmp_path, "auto").use
    good = Path(plan.paths.data).read_bytes()
    assert not any(tmp_path.joinpath("cache").glob("*.tmp-*"))

    def damaged(how: str) -> None:
        blob = bytearray(good)
        if how == "flipped byte":
            blob[len(blob) // 2] ^= 0x10
        elif how == "truncated":
            blob = blob[:-4]
        Path(plan.paths.data).write_bytes(bytes(blob))

    other = build_via_plan(data, tmp_path, teacher_sha="b" * 64, seed=1)
    cases = {"flipped byte": "checksum", "truncated": "truncated"}
    for how, fragment in cases.items():
        damaged(how)
        auto = plan_for(data, tmp_path, "auto")  # a bad file is never used as it is: rebuilt
        assert auto.use and auto.build and fragment in auto.reason and "refused" in auto.reason, auto.reason
        rebuilt = build_via_plan(data, tmp_path)
        assert rebuilt.build and "refused" in rebuilt.reason
        assert Path(plan.paths.data).read_bytes() == good
    # another teacher's header in this cache's place
    Path(plan.paths.header).write_bytes(Path(other.paths.header).read_bytes())
    auto = plan_for(data, tmp_path, "auto")
    assert auto.build and "teacher_sha256" in auto.reason, auto.reason
    build_via_plan(data, tmp_path)
    assert Path(plan.paths.data).read_bytes() == good and plan_for(data, tmp_path, "auto").use


def test_key_separates_what_changes_the_logits(tmp_path):
    data = digits()
    base = key_for(data)
    names = {cache_paths(str(tmp_path), base).data}
    for change in ({"precision": "bf16"}, {"channels_last": True}, {"device_type": "cuda"},
                   {"data_sha256": "e" * 64}, {"teacher_sha256": "f" * 64}, {"num_classes": 100}):
        names.add(cache_paths(str(tmp_path), key_for(data, **change)).data)
    assert len(names) == 7


def test_a_build_waits_for_the_lock_and_reuses_a_cache_built_meanwhile(tmp_path):
    data = digits()
    plan = plan_for(data, tmp_path, "build")
    done, teacher = {}, TinyTeacher()

    def other_run():
        done["stats"] = build_cache(plan.paths, plan.key, teacher, data.train_images, data.mean,
                                    data.std, torch.contiguous_format, CPU)

    with build_lock(plan.paths):
        thread = threading.Thread(target=other_run)
        thread.start()
        time.sleep(0.5)
        assert thread.is_alive() and not os.path.exists(plan.paths.data)
    thread.join(timeout=60)
    assert not thread.is_alive() and not done["stats"]["skipped"]
    # a second build of the same key finds it valid under the lock and skips
    again = build_cache(plan.paths, plan.key, TinyTeacher(), data.train_images, data.mean, data.std,
                        torch.contiguous_format, CPU)
    assert again["skipped"]


# ---- whole runs ----------------------------------------------------------------------------

@pytest.fixture()
def teacher_file(tmp_path):
    torch.manual_seed(0)
    net = models.create_model("resnet8", 10)
    with torch.no_grad():  # confident logits that differ from view to view, as a trained teacher's
        net.fc.weight.mul_(100.0)
    path = tmp_path / "teacher.pth"
    torch.save({"model": net.state_dict(), "epoch": 1, "best_acc": 0.0, "arch": "resnet8"}, path)
    return str(path)


def run(teacher: str, root: Path, mode: str, trial: str, *method: str) -> dict:
    argv = ["--path_t", teacher, "--model_s", "resnet8", "--dataset", "digits", "--epochs", "1",
            "--batch_size", "4", "--seed", "1", "--save_root", str(root), "--device", "cpu",
            "--nce_k", "4", "--teacher_cache", mode, "--trial", trial,
            *(method or ("--distill", "wttm", "--ttm_l", "0.1", "-b", "3"))]
    run_dir = Path(run_student(argv, N_IMAGES, 8)).parent
    _, rows = read_metrics(run_dir / "metrics.csv")
    return {"row": rows[0], "config": json.loads((run_dir / "config.json").read_text())}


def test_digits_run_with_the_cache_matches_the_run_without(teacher_file, tmp_path, capsys):
    live = run(teacher_file, tmp_path, "off", "off")
    assert "teacher cache: not used (--teacher_cache off)" in capsys.readouterr().out
    assert not (tmp_path / "cache").exists()  # off never touches the cache folder
    built = run(teacher_file, tmp_path, "build", "build")
    out = capsys.readouterr().out
    assert "teacher cache: building, then used" in out and "teacher cache: built" in out
    reused = run(teacher_file, tmp_path, "auto", "auto")
    assert "teacher cache: used (" in capsys.readouterr().out
    for cached in (built, reused):
        assert cached["config"]["teacher_cache_use"]["used"] is True
        for column in ("train_loss", "loss_ce", "loss_main_wttm"):
            a, b = float(live["row"][column]), float(cached["row"][column])
            assert abs(a - b) <= 1e-3 * abs(a), (column, a, b)
    assert live["config"]["teacher_cache_use"] == {"mode": "off", "used": False, "built": False,
                                                   "reason": "--teacher_cache off", "file": None}
    assert built["config"]["teacher_cache_use"]["built"] is True


def test_feature_methods_keep_the_live_teacher_and_say_so(teacher_file, tmp_path, capsys):
    result = run(teacher_file, tmp_path, "build", "crd", "--distill", "crd")
    out = capsys.readouterr().out
    assert "teacher cache: not used (the methods in use read the teacher's feat features" in out
    assert result["config"]["teacher_cache_use"]["used"] is False
    assert not (tmp_path / "cache").exists()


def test_off_reads_nothing(teacher_file, tmp_path, monkeypatch):
    def touched(*args, **kwargs):
        raise AssertionError("--teacher_cache off looked at the cache")

    for name in ("images_sha256", "check_cache", "cache_paths", "build_cache"):
        monkeypatch.setattr(tc, name, touched)
    run(teacher_file, tmp_path, "off", "off")
    assert not (tmp_path / "cache").exists()


# ---- torchrun: each rank builds its share into the one file --------------------------------

class ThreadRanks:
    """Two threads standing in for two torchrun ranks: ``broadcast_object`` and ``barrier``
    of :mod:`helper.distributed` become thread barriers (the build's own code is unchanged)."""

    def __init__(self, world: int) -> None:
        self.gate, self.box = threading.Barrier(world, timeout=60), [None]

    def broadcast_object(self, obj, env):
        if env.rank == 0:
            self.box[0] = obj
        self.gate.wait()
        value = self.box[0]
        self.gate.wait()
        return value

    def barrier(self, env) -> None:
        self.gate.wait()


def test_ranks_build_their_shares_of_one_file(tmp_path, monkeypatch):
    import helper.distributed

    data = digits()
    key = key_for(data, teacher_sha="c" * 64)
    single, shared = cache_paths(str(tmp_path / "single"), key), cache_paths(str(tmp_path / "shared"), key)
    build_cache(single, key, TinyTeacher(), data.train_images, data.mean, data.std,
                torch.contiguous_format, CPU)
    ranks = ThreadRanks(2)
    monkeypatch.setattr(helper.distributed, "broadcast_object", ranks.broadcast_object)
    monkeypatch.setattr(helper.distributed, "barrier", ranks.barrier)
    results, written = {}, []
    real_sweep = helper.teacher_cache.build.sweep

    def sweep(*args):
        written.append((args[7], args[8]))  # (begin, end) view ids of one rank
        return real_sweep(*args)

    monkeypatch.setattr(helper.teacher_cache.build, "sweep", sweep)

    teachers = [TinyTeacher(), TinyTeacher()]  # built here: their init seeds the global RNG

    def rank(r: int) -> None:
        env = DistEnv(r, 2, r, torch.device("cpu"))
        results[r] = build_cache(shared, key, teachers[r], data.train_images, data.mean, data.std,
                                 torch.contiguous_format, env, batch=100)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert sorted(written) == [(0, ROWS // 2), (ROWS // 2, ROWS)]
    assert not results[0]["skipped"] and not results[1]["skipped"]
    assert check_cache(shared, key, ROWS, 10) is None
    assert Path(shared.data).read_bytes() == Path(single.data).read_bytes()
    assert json.loads(Path(shared.header).read_text())["world_size"] == 2
