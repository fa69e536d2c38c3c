"""The student run's flags: the parser, their validation, the resolved configuration and the
default run name. Reads no file (the teacher's architecture is given), so the benchmark, the
table runner and the tests build configurations exactly as ``train_student.py`` does.
"""
from __future__ import annotations

import hashlib

from typing import Any, Mapping, Optional, Sequence

import torch

import models
from distiller_zoo import METHODS, Distiller
from errors import UserError
from helper import distributed, resume, teacher_cache
from helper.cli import OneLineParser
from helper.common_flags import add_common_arguments, derive_common
from helper.config import Config
from helper.distill import resolve_weights

# Short keys of run names: the seed's ``l`` for TTM's power; ``kdT``, not the seed's ``T``,
# which would read as the teacher (``T-<teacher>``).
NAME_KEYS = {"ttm_l": "l", "kd_T": "kdT"}
LEGACY_NAME_KEYS = {"ttm_l": "l", "kd_T": "T"}
MAX_NAME = 200  # bytes of a default run name (file names may have 255)
# Method flags always named when their method is in use (the seed's habit); others only when
# they differ from their default.
ALWAYS_NAMED = ("ttm_l", "kd_T")


def build_parser() -> OneLineParser:
    """Every flag of ``train_student.py``: the distillation group, each method's own flags
    (from the registry) and the flags shared with ``train_teacher.py``."""
    parser = OneLineParser(description="Distil a student from a teacher (loss = r·CE + a·ADD + b·MAIN).")
    group = parser.add_argument_group("distillation")
    group.add_argument("--path_t", required=True, help="teacher checkpoint (.pth)")
    group.add_argument("--model_t", default=None,
                       help="teacher architecture (default: the checkpoint's 'arch', else its folder name)")
    group.add_argument("--model_s", default="resnet8", help=f"student: {', '.join(models.model_names())}")
    group.add_argument("--distill", default="kd", type=str.lower, choices=METHODS.names(),
                       help="main method (weight -b; any letter case)")
    group.add_argument("--add", default="kd", type=str.lower,
                       choices=METHODS.names(logit_only=True) + ["none"],
                       help="added logit method (weight -a); the seed's KD term is --add kd")
    group.add_argument("-r", "--gamma", type=float, default=1.0, help="weight of cross-entropy")
    group.add_argument("-a", "--alpha", type=float, default=None, help="weight of --add (unset: 0)")
    group.add_argument("-b", "--beta", type=float, default=None,
                       help="weight of --distill (unset: the method's usual weight)")
    group.add_argument("--teacher_train_mode", action="store_true",
                       help="run the frozen teacher in train mode (dropout, drop path active), as "
                            "cls_KD's distiller does; it is still never trained")
    group.add_argument("--teacher_drop_path", type=float, default=0.0,
                       help="the teacher's stochastic depth (ViTs), active with --teacher_train_mode "
                            "(cls_KD's DeiT III-S teacher: 0.05)")
    group.add_argument("--teacher_cache", default="auto", choices=teacher_cache.MODES,
                       help="logit-only methods: look the teacher's logits up in the exact cache "
                            "under <save_root>/cache/ instead of running it. auto: when a valid "
                            "cache exists; build: build it first if needed; off: never")
    METHODS.add_arguments(parser)
    add_common_arguments(parser)
    return parser


def methods_in_use(cfg: Mapping[str, Any]) -> list[type[Distiller]]:
    """The method classes whose flags matter: ``--distill``, and ``--add`` unless its weight is 0."""
    used = [METHODS.get(cfg["distill"])]
    if cfg.get("add") and cfg["add"] != "none" and cfg.get("alpha"):
        used.append(METHODS.get(cfg["add"]))
    return used


def validate_flags(flags: Mapping[str, Any]) -> None:
    """Checks the distillation flags and the flags of the methods in use (no files are read).

    Raises:
        UserError: one line naming the flag.
    """
    for name in ("gamma", "alpha", "beta"):
        value = flags[name]
        if value is not None and not (torch.isfinite(torch.tensor(float(value))) and value >= 0):
            raise UserError(f"--{name} must be a finite non-negative number, got {value}")
    if flags["add"] == "none" and flags["alpha"]:
        raise UserError(f"-a {flags['alpha']} weights the --add loss, but --add is none")
    for model_flag in ("model_s", "model_t"):
        name = flags[model_flag]
        if name is not None and name not in models.model_dict:
            raise UserError(f"unknown {'student' if model_flag == 'model_s' else 'teacher'} model "
                            f"{name!r}; choose from {', '.join(models.model_names())}")
    try:  # every method flag's range, then the rules of the methods in use
        for _, cls in METHODS.items():
            for flag in cls.flags:
                flag.check(flags.get(flag.dest))
        for cls in methods_in_use({**flags, "alpha": flags["alpha"] if flags["add"] != "none" else 0}):
            cls.validate(flags)
    except ValueError as err:
        raise UserError(str(err)) from None


def resolve_config(flags: Mapping[str, Any], env: distributed.DistEnv, teacher_name: str,
                   drawn_seed: Optional[int] = None) -> Config:
    """The validated, complete configuration of a run with teacher architecture ``teacher_name``.

    Fills in what the flags leave open: the learning rate of light students, the seed (drawn
    on rank 0 and shared), the loss weights (unset ``-a`` is 0, unset ``-b`` the method's
    usual one) and pair-dependent method values (DKD's β). Reads no file.
    """
    validate_flags(flags)
    values = derive_common(flags, flags["model_s"], drawn_seed)
    values["seed"] = distributed.broadcast_object(values["seed"], env)
    values["world_size"] = env.world_size
    values["add"] = None if flags["add"] == "none" else flags["add"]
    values["model_t"] = teacher_name
    gamma, alpha, beta = resolve_weights(Config(values), teacher_name, flags["model_s"])
    values.update(gamma=gamma, alpha=alpha, beta=beta)
    for cls in methods_in_use(values):
        values.update(cls.resolve(values, teacher_name, flags["model_s"]))
    values["flags"] = dict(flags)
    return Config(values)


def parse_config(argv: Sequence[str], env: distributed.DistEnv, teacher_name: str) -> Config:
    """``resolve_config`` of a command line, for a teacher of architecture ``teacher_name``
    that is not read from ``--path_t`` (the benchmark and the tests build their own)."""
    return resolve_config(build_parser().parse(argv)[0], env, teacher_name)


def default_run_name(cfg: Mapping[str, Any]) -> str:
    """The run folder name: shell-safe without quoting, one spelling per flag.

    ``S-<student>_T-<teacher>_<data>_<distill>[+<add>]_r<r>_a<a>_b<b>`` then, for the methods
    in use, ``l<ttm_l>`` / ``kdT<kd_T>`` and any of their flags off its default, then every
    other training flag off its default (``batchsize128``), ``seed<n>`` when the seed was
    given, and ``trial<t>`` last. A token is the flag without underscores (``nce_k`` →
    ``ncek``) followed by its value: a number directly, in its shortest exact form (``1``,
    ``0.1``, ``5e-05``); a word after a hyphen (``precision-bf16``); an option that is on,
    alone (``syncbn``). Values keep only ``A-Z a-z 0-9 . + -`` (``150,180`` → ``150-180``).
    ``--epochs`` is left out: a run may be resumed to more. A name longer than
    :data:`MAX_NAME` bytes (a long recipe, such as the DeiT table's) keeps its first part and
    replaces the rest by ``h<12 hex digits of its SHA-256>``, so it stays a valid file name
    and still differs whenever a flag does; the trial stays last.
    """
    name = _run_name(cfg, _token, ("S-", "T-"), "trial")
    if len(name.encode()) <= MAX_NAME:
        return name
    head, _, trial = name.rpartition("_")
    digest = hashlib.sha256(head.encode()).hexdigest()[:12]
    keep = MAX_NAME - len(trial) - len(digest) - 3
    return f"{head.encode()[:keep].decode(errors='ignore').rstrip('_')}_h{digest}_{trial}"


def legacy_run_name(cfg: Mapping[str, Any]) -> str:
    """The default run name before shell-safe names (``S:resnet8_T:resnet32x4_…_r:1.0_…_l:1_0``):
    what ``--resume`` looks for when the current name's folder holds no run."""
    return _run_name(cfg, _legacy_token, ("S:", "T:"), "")


def _run_name(cfg: Mapping[str, Any], token: Any, models_prefix: tuple[str, str], trial: str) -> str:
    method = cfg["distill"] + (f"+{cfg['add']}" if cfg.get("add") and cfg.get("alpha") else "")
    student, teacher = models_prefix
    parts = [f"{student}{cfg['model_s']}", f"{teacher}{cfg['model_t']}", cfg["dataset"], method,
             *(token(key, cfg[dest], weight=True) for key, dest in (("r", "gamma"), ("a", "alpha"), ("b", "beta")))]
    defaults = {a.dest: a.default for a in build_parser().flags}
    flags = cfg.get("flags", cfg)
    in_use = [f.dest for cls in methods_in_use(cfg) for f in cls.flags]
    for dest in dict.fromkeys(in_use):
        if dest in ALWAYS_NAMED or flags.get(dest) != defaults.get(dest):
            parts.append(token(dest, flags.get(dest)))
    method_dests = {f.dest for _, cls in METHODS.items() for f in cls.flags}
    skip = (method_dests | resume.FREE_TO_CHANGE
            | {"model_s", "model_t", "dataset", "distill", "add", "gamma", "alpha", "beta",
               "epochs", "seed", "trial"})
    for dest, default in defaults.items():
        if dest not in skip and dest != "help" and flags.get(dest, default) != default:
            parts.append(token(dest, flags[dest]))
    if flags.get("seed"):
        parts.append(token("seed", flags["seed"]))
    parts.append(token(trial, str(cfg["trial"])) if trial else str(cfg["trial"]))
    return "_".join(parts)


def _number(value: float) -> str:
    """Shortest exact spelling: ``1.0`` → ``1``, ``0.1`` → ``0.1``, ``5e-05`` stays."""
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def _word(text: str) -> str:
    """``text`` with every character outside ``A-Z a-z 0-9 . + -`` replaced by ``-``."""
    return "".join(c if c.isascii() and (c.isalnum() or c in ".+-") else "-" for c in text)


def _token(dest: str, value: Any, weight: bool = False) -> str:
    key = NAME_KEYS.get(dest, dest.replace("_", ""))
    if isinstance(value, bool):
        return key if value else f"no{key}"
    if isinstance(value, (int, float)):
        text = _number(value)
    else:
        text = _word(str(value))
    joined = text[:1].isdigit() and not key[-1:].isdigit()
    return f"{key}{text}" if joined else f"{key}-{text}"


def _legacy_token(dest: str, value: Any, weight: bool = False) -> str:
    if weight:  # the seed's spelling: the float as Python prints it
        return f"{dest}:{value}"
    return f"{LEGACY_NAME_KEYS.get(dest, dest)}:{_legacy_short(value)}"


def _legacy_short(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value).replace("/", "-").replace(",", "-")


def unused_flags(cfg: Mapping[str, Any]) -> set[str]:
    """Method flags that do not act on the run ``cfg`` describes (its methods do not read them)."""
    every = {f.dest for _, cls in METHODS.items() for f in cls.flags}
    return every - {f.dest for cls in methods_in_use(cfg) for f in cls.flags}
