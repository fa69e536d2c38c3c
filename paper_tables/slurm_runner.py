"""The table runner's SLURM mode: one submitit job per trial, on M nodes × G GPUs.

A job of one task runs ``train_student.py`` as it is; a job of several tasks (``--slurm_nodes
M --slurm_gpus G``: G tasks per node, one per GPU) runs one ``train_student.py`` process
per task, each joining the run through torch's env:// rendezvous with the variables
:func:`paper_tables.trial_lock.distributed_env` takes from submitit. ``--batch_size`` stays the
global batch. ``--slurm_cluster local`` runs the jobs as processes here (one node), to try
the submission path.
"""
from __future__ import annotations

import argparse
import os
import socket
import time
import uuid
from typing import Callable, Sequence

from errors import UserError
from paper_tables import trial_lock
from paper_tables.local_runner import report
from paper_tables.trial_plan import Trial


def slurm_job_function() -> Callable[..., dict]:
    """:func:`paper_tables.trial_lock.execute`, registered with submitit's pickler (cloudpickle) to
    travel by value, so that a job unpickles it without an import path to this repository."""
    import cloudpickle
    cloudpickle.register_pickle_by_value(trial_lock)
    return trial_lock.execute


def job_parameters(args: argparse.Namespace) -> dict:
    """submitit's parameters for one trial's job (tasks per node = GPUs per node)."""
    return dict(name="kd-reproduce", timeout_min=args.slurm_time, nodes=args.slurm_nodes,
                tasks_per_node=max(args.slurm_gpus, 1), gpus_per_node=args.slurm_gpus,
                cpus_per_task=args.slurm_cpus, mem_gb=args.slurm_mem_gb, slurm_partition=args.slurm_partition,
                slurm_array_parallelism=args.slurm_array_parallelism)


def run_slurm(trials: Sequence[Trial], args: argparse.Namespace) -> bool:
    """Submits one job per trial through submitit; waits only with --wait (or locally)."""
    try:
        import submitit
    except ImportError:
        raise UserError("--slurm needs submitit (pip install submitit)") from None
    executor = submitit.AutoExecutor(folder=os.path.join(args.save_root, "slurm", "%j"),
                                     cluster=args.slurm_cluster)
    params = job_parameters(args)
    try:
        executor.update_parameters(**params)
    except ValueError as err:  # e.g. several nodes on the local cluster
        raise UserError(f"submitit refuses the job shape: {err}") from None
    distributed = params["nodes"] * params["tasks_per_node"] > 1
    work = slurm_job_function()
    tokens = [uuid.uuid4().hex for _ in trials]
    with executor.batch():
        jobs = [executor.submit(work, t.cmd, t.run_dir, {}, tok, distributed) for t, tok in zip(trials, tokens)]
    for job, trial, tok in zip(jobs, trials, tokens):
        trial_lock.write_lock(trial.run_dir, {"token": tok, "slurm_job": job.job_id,
                                              "host": socket.gethostname(), "since": time.time()}, exclusive=True)
        shape = f" ({params['nodes']} node{'s' if params['nodes'] > 1 else ''} × {params['tasks_per_node']} " \
                f"task{'s' if params['tasks_per_node'] > 1 else ''})" if distributed else ""
        print(f"submitted {trial.run_name} as job {job.job_id}{shape}", flush=True)
    if not (args.wait or args.slurm_cluster == "local"):
        print(f"# {len(jobs)} jobs submitted; logs under {os.path.join(args.save_root, 'slurm')}. "
              f"Run this command again to resume trials that time out.")
        return True
    ok = True
    for i, (trial, job) in enumerate(zip(trials, jobs), 1):
        try:
            result = job.results()[0] if distributed else job.result()  # rank 0's
        except Exception as err:  # the job died outside train_student (node failure, time limit)
            result = {"ok": False, "error": str(err).strip().splitlines()[-1][:300]}
        ok &= report(i, len(jobs), trial, result)
    return ok
