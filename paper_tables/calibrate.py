"""A short calibration of packed runs, cached: aggregate throughput of K runs on one device.

For a run's configuration (teacher, student, method, per-process batch, data set, speed
flags) and each K, a round runs K processes of :mod:`paper_tables.calibrate_worker` on one
device (``CUDA_VISIBLE_DEVICES`` naming it, or the CPU), each with its share of the CPU
threads; they build the run's real training step, warm up, wait for each other, and time
``steps`` steps on synthetic batches at once (the processes stay up from round to round,
see :class:`WorkerPool`). The round's rate is the images of all K over
the span from the first start to the last end (images/s). Rounds go K = 1, 2, 4, ... and
stop at the first that fails (e.g. out of memory) or that is 10 % slower than the best so
far. Results are cached in ``<save_root>/calibration/<name>.json``, keyed by the device's
name, the torch version, MPS on or off and the configuration; a later plan reuses them and
measures only the Ks still missing.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping, Optional, Sequence

from errors import UserError
from paper_tables.paths import REPO
from paper_tables.packing import thread_share
from paper_tables.trial_progress import format_duration as _duration

DECLINE = 0.9  # a round this far below the best so far ends the calibration
# Training-set size and classes of each data set (the estimate's steps per epoch and the
# synthetic labels; digits: dataset/digits.py's 75 % split of scikit-learn's 1,797).
DATASET_SHAPES = {"cifar100": (50000, 100), "imagenet": (1281167, 1000), "digits": (1347, 10)}
DIST_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Spec:
    """What a calibration measures, and the key of its cache entry (all fields but argv).

    Attributes:
        teacher, student: architectures.
        method: ``--distill`` plus the weighted ``--add`` (``crd+wttm``).
        dataset: the data set whose shape the batches take.
        batch: the per-process batch (the run's global batch over its processes).
        speed: ``precision``, ``channels_last``, ``compile``, ``compile_mode`` as text.
        device: ``cuda`` or ``cpu``; device_name: the GPU's (or CPU's) name.
        torch: torch's version; mps: whether the MPS control daemon was running.
        argv: the run's ``train_student.py`` arguments (the worker appends its own).
    """

    teacher: str
    student: str
    method: str
    dataset: str
    batch: int
    speed: str
    device: str
    device_name: str
    torch: str
    mps: bool
    argv: tuple[str, ...] = field(compare=False, default=())

    def key(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "argv"}

    def file_name(self) -> str:
        digest = hashlib.sha256(json.dumps(self.key(), sort_keys=True).encode()).hexdigest()[:12]
        return f"{self.teacher}-{self.student}-{self.method.replace('+', '_')}-b{self.batch}-{digest}.json"


@dataclass
class Calibration:
    """Measured aggregate images/s by K, and the Ks not measured (K → why); ``steps`` and
    ``written``: the timed steps per process and the time of the last measurement (None when
    a cache file predates them)."""

    spec: Spec
    rates: dict[int, float]
    stopped: dict[int, str]
    path: str
    steps: Optional[int] = None
    written: Optional[str] = None

    def best_k(self) -> int:
        return max(self.rates, key=lambda k: self.rates[k])


def read_cache(folder: str, spec: Spec) -> Calibration:
    """The cached calibration of ``spec`` (empty when absent, unreadable or of another key)."""
    path = os.path.join(folder, spec.file_name())
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
        if data.get("key") == spec.key():
            return Calibration(spec, {int(k): float(v) for k, v in data["rates"].items()},
                               {int(k): str(v) for k, v in data.get("stopped", {}).items()}, path,
                               data.get("steps"), data.get("written"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return Calibration(spec, {}, {}, path)


def write_cache(cal: Calibration) -> None:
    """Writes the calibration atomically (temporary file, then rename)."""
    os.makedirs(os.path.dirname(cal.path), exist_ok=True)
    tmp = f"{cal.path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump({"key": cal.spec.key(), "rates": {str(k): v for k, v in sorted(cal.rates.items())},
                   "stopped": {str(k): v for k, v in sorted(cal.stopped.items())},
                   "steps": cal.steps, "written": cal.written or time.strftime("%Y-%m-%d %H:%M:%S")},
                  handle, indent=1)
    os.replace(tmp, cal.path)


def worker_env(environ: Mapping[str, str], gpu: Optional[str], threads: int) -> dict[str, str]:
    """A worker's environment: one device, its thread share, no inherited torchrun variables."""
    env = {k: v for k, v in environ.items() if k not in DIST_VARIABLES}
    env.update(CUDA_VISIBLE_DEVICES=gpu if gpu is not None else "", OMP_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads))
    return env


class WorkerPool:
    """Calibration workers that stay up between rounds: round r with K uses workers 0..K-1.

    Rounds go up in K, so every live worker takes part in every round after its first (no
    idle process holds the device) and K = 1, 2, ..., 16 start 16 processes, not 31. Each
    round's ``go_<r>`` file carries the round's thread share, which the workers apply.
    """

    def __init__(self, spec: Spec, environ: Mapping[str, str], gpu: Optional[str], n_train: int,
                 classes: int, steps: int, warmup: int) -> None:
        self.environ, self.gpu = environ, gpu
        self.progress: Callable[[str], None] = lambda line: None  # see calibrate()
        self.progress_s, self.steps, self.k = 30.0, steps, 0
        self.label = f"{spec.teacher}:{spec.student} {spec.method}"
        self.tmp = tempfile.TemporaryDirectory(prefix="calibration-")
        self.folder = self.tmp.name
        self.spec_path = os.path.join(self.folder, "spec.json")
        with open(self.spec_path, "w", encoding="utf-8") as handle:
            json.dump({"teacher": spec.teacher, "argv": list(spec.argv), "device": spec.device,
                       "batch": spec.batch, "n_train": n_train, "classes": classes,
                       "steps": steps, "warmup": warmup}, handle)
        self.procs: list[subprocess.Popen] = []
        self.logs: list = []
        self.rounds = 0

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def round(self, k: int, threads: int, timeout_s: float) -> tuple[Optional[float], str]:
        """Times ``k`` workers at once: ``(images/s summed over them, '')`` or ``(None, why)``."""
        r, self.rounds = self.rounds, self.rounds + 1
        while len(self.procs) < k:
            i = len(self.procs)
            self.logs.append(open(os.path.join(self.folder, f"stderr_{i}.txt"), "w"))
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "paper_tables.calibrate_worker", "--spec", self.spec_path, "--index", str(i),
                 "--first_round", str(r)], cwd=REPO, env=worker_env(self.environ, self.gpu, threads),
                stdout=subprocess.DEVNULL, stderr=self.logs[i]))
        live = self.procs[:k]
        ready = [os.path.join(self.folder, f"ready_{i}_{r}") for i in range(k)]
        self.k = k
        why = self._wait(live, ready, timeout_s)
        if why:
            return None, why
        with open(os.path.join(self.folder, f"go_{r}.tmp"), "w") as handle:
            handle.write(str(threads))
        os.replace(os.path.join(self.folder, f"go_{r}.tmp"), os.path.join(self.folder, f"go_{r}"))
        done = [os.path.join(self.folder, f"result_{i}_{r}.json") for i in range(k)]
        why = self._wait(live, done, timeout_s)
        if why:
            return None, why
        results = []
        for path in done:
            with open(path, encoding="utf-8") as handle:
                results.append(json.load(handle))
        span = max(x["end"] for x in results) - min(x["start"] for x in results)
        return sum(x["images"] for x in results) / max(span, 1e-9), ""

    def _wait(self, procs: Sequence[subprocess.Popen], paths: Sequence[str], timeout_s: float) -> str:
        """'' once every path exists; else why not (a worker died, or the time ran out)."""
        start = time.time()
        deadline, shown = start + timeout_s, start
        while not all(os.path.exists(p) for p in paths):
            failed = [i for i, p in enumerate(procs) if p.poll() is not None]
            if failed:
                return _last_line(os.path.join(self.folder, f"stderr_{failed[0]}.txt"))
            if time.time() > deadline:
                return f"the round took longer than {timeout_s:.0f} s"
            if self.progress_s > 0 and time.time() - shown >= self.progress_s:
                shown = time.time()
                self.progress(self._where(shown - start))
            time.sleep(0.02)
        return ""

    def _where(self, waited: float) -> str:
        """A progress line: what the first worker of the round is doing, and what is left."""
        try:
            with open(os.path.join(self.folder, "progress_0.json"), encoding="utf-8") as handle:
                p = json.load(handle)
        except (OSError, ValueError):
            return f"# calibration {self.label}: K={self.k}: starting its processes ({_duration(waited)} into the round)"
        line = f"# calibration {self.label}: K={self.k}: {p['phase']}"
        if p.get("of"):
            line += f" step {p['step']}/{p['of']}"
        per_step = p.get("per_step")
        if per_step:
            left = (p["of"] - p["step"]) + (self.steps if p["phase"] == "warm-up" else 0)
            line += f", {per_step:.2g} s a step: about {_duration(left * per_step)} left in this round"
        return line + f" ({_duration(waited)} into the round)"
    def close(self) -> None:
        """Tells the workers to stop, then ends any that did not (only ours, by handle)."""
        open(os.path.join(self.folder, "stop"), "w").close()
        deadline = time.time() + 10
        for proc in self.procs:
            try:
                proc.wait(timeout=max(deadline - time.time(), 0.1))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for log in self.logs:
            log.close()
        self.tmp.cleanup()


def _last_line(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as handle:
        lines = [line.strip() for line in handle if line.strip()]
    return (lines[-1] if lines else "the worker failed without a message")[:300]


def calibrate(spec: Spec, ks: Sequence[int], folder: str, gpu: Optional[str], cores: int,
              steps: int = 30, warmup: int = 5, recalibrate: bool = False, timeout_s: float = 900.0,
              log: Callable[[str], None] = print, environ: Optional[Mapping[str, str]] = None,
              measure: bool = True, progress: Callable[[str], None] = lambda line: None,
              progress_s: float = 30.0) -> Calibration:
    """The aggregate rates of ``spec`` for ``ks``, from the cache or measured (and cached).

    Args:
        ks: the Ks wanted (processes per round), ascending.
        folder: the cache folder (``<save_root>/calibration``).
        gpu: the ``CUDA_VISIBLE_DEVICES`` entry of the device to use; None for the CPU.
        cores: CPU cores shared by a round's workers.
        measure: False reads the cache only (a dry run starts no process).
        progress: hears what is about to be measured and how long a round may take, a line
            every ``progress_s`` seconds while a round runs, and which cached rates are reused.

    Raises:
        UserError: K = 1 itself cannot run (the run would not run either).
    """
    if spec.dataset not in DATASET_SHAPES:
        raise UserError(f"cannot calibrate --dataset {spec.dataset}: its shape is not known "
                        f"({', '.join(DATASET_SHAPES)})")
    n_train, classes = DATASET_SHAPES[spec.dataset]
    environ = os.environ if environ is None else environ
    cal = Calibration(spec, {}, {}, read_cache(folder, spec).path) if recalibrate else read_cache(folder, spec)
    cached = sorted(k for k in ks if k in cal.rates)
    if cached:
        how = f"{cal.steps} timed steps per process" if cal.steps else "an unrecorded number of timed steps"
        progress(f"# calibration {spec.teacher}:{spec.student} {spec.method}: reusing the cached rates of "
                 f"K={', '.join(map(str, cached))}, measured {cal.written or 'earlier'} from {how} "
                 f"({cal.path}; --recalibrate measures again)")
    if not measure:
        return cal
    todo = [k for k in ks if k not in cal.rates]
    if todo and not any(stop <= todo[0] for stop in cal.stopped):
        progress(f"# calibration {spec.teacher}:{spec.student} {spec.method}: measuring the training step "
                 f"(batch {spec.batch} per process, {spec.device_name}) with K={', '.join(map(str, todo))} "
                 f"process(es) at once: each builds the run's step, warms up {warmup} steps and times {steps} "
                 f"on synthetic batches; a round ends after {timeout_s:.0f} s at most, and rounds stop at "
                 "the first that is slower")
        with WorkerPool(spec, environ, gpu, n_train, classes, steps, warmup) as pool:
            pool.progress, pool.progress_s = progress, progress_s
            _measure(cal, pool, ks, cores, environ.get("OMP_NUM_THREADS"), timeout_s, log)
        cal.steps, cal.written = steps, None
    write_cache(cal)
    return cal


def _measure(cal: Calibration, pool: WorkerPool, ks: Sequence[int], cores: int, user_threads: Optional[str],
             timeout_s: float, log: Callable[[str], None]) -> None:
    """Rounds for the Ks of ``ks`` not cached, up to the first failure or decline."""
    spec = cal.spec
    for k in ks:
        if any(stop <= k for stop in cal.stopped):
            break
        rate, why = (cal.rates[k], "") if k in cal.rates else \
            pool.round(k, thread_share(cores, k, user_threads), timeout_s)
        if rate is None:
            cal.stopped[k] = why
            log(f"# calibration {spec.teacher}:{spec.student} {spec.method}: K={k} failed: {why}")
            if k == min(ks) and not cal.rates:
                write_cache(cal)
                raise UserError(f"calibration of {spec.teacher}:{spec.student} {spec.method} failed with "
                                f"K={k}: {why}")
            return
        best = max((v for key, v in cal.rates.items() if key < k), default=0.0)
        if k not in cal.rates:
            cal.rates[k] = rate
            log(f"# calibration {spec.teacher}:{spec.student} {spec.method} (batch {spec.batch}): "
                f"K={k}: {rate:,.0f} images/s")
        if rate < DECLINE * best:
            later = next((x for x in ks if x > k), k + 1)
            cal.stopped[later] = f"K={k} was already {100 * (1 - rate / best):.0f} % below the best"
            return
