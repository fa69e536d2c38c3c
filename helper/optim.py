"""The optimiser, the learning-rate schedule and gradient clipping, as recipe values.

Both entry scripts read the same flags: the CIFAR-100 and ResNet ImageNet recipes are SGD with
a step schedule set once per epoch (RepDistiller, torchdistill); the DeiT recipe (cls_KD) is
AdamW without weight decay on norms, biases and the ViT's tokens, a linear warm-up and a
cosine to a floor, both set every iteration, and gradient-norm clipping. Nothing here knows
which recipe is in use: the flags (or a table's recipe file) decide.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional

import torch
from torch import nn

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("step", "cosine")
WD_SKIP = ("none", "norm_bias_tokens")


def add_arguments(group: Any) -> None:
    """Adds the optimiser, schedule, clipping and label-smoothing flags to an argparse group."""
    group.add_argument("--opt", default="sgd", choices=OPTIMIZERS,
                       help="sgd: momentum SGD (--momentum); adamw: AdamW (--opt_betas, --opt_eps)")
    group.add_argument("--opt_betas", default="0.9,0.999", help="AdamW betas, two comma-separated numbers")
    group.add_argument("--opt_eps", type=float, default=1e-8, help="AdamW epsilon")
    group.add_argument("--wd_skip", default="none", choices=WD_SKIP,
                       help="norm_bias_tokens: no weight decay on 1-D parameters (norms, biases) and on "
                            "the network's no_weight_decay() tensors (a ViT's cls_token, pos_embed)")
    group.add_argument("--sched", default="step", choices=SCHEDULES,
                       help="step: x --lr_decay_rate after each of --lr_decay_epochs, set per epoch; "
                            "cosine: from the LR to --min_lr over the epochs after the warm-up, per iteration")
    group.add_argument("--warmup_epochs", type=int, default=0,
                       help="linear warm-up from --warmup_lr_factor x LR to the LR over this many epochs, "
                            "per iteration (0: none)")
    group.add_argument("--warmup_lr_factor", type=float, default=1e-3, help="LR factor the warm-up starts at")
    group.add_argument("--min_lr", type=float, default=1e-5, help="the LR the cosine schedule ends at")
    group.add_argument("--clip_grad", type=float, default=None,
                       help="clip the global gradient norm of the trained parameters to this value")
    group.add_argument("--smoothing", type=float, default=0.0, help="label smoothing of the CE term")


def parse_betas(text: str) -> tuple[float, float]:
    """``"0.9,0.999"`` -> ``(0.9, 0.999)``; raises ValueError unless two numbers in [0, 1)."""
    try:
        betas = tuple(float(t) for t in str(text).split(","))
    except ValueError:
        raise ValueError(f"--opt_betas must be two comma-separated numbers, got {text!r}") from None
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"--opt_betas must be two numbers in [0, 1), got {text!r}")
    return betas  # type: ignore[return-value]


def validate(flags: Mapping[str, Any]) -> None:
    """Checks the flags of :func:`add_arguments`; raises ValueError naming the flag."""
    parse_betas(flags.get("opt_betas", "0.9,0.999"))
    checks = [("opt_eps", 0.0, False), ("warmup_lr_factor", 0.0, False), ("min_lr", 0.0, True),
              ("smoothing", 0.0, True)]
    for name, low, inclusive in checks:
        value = flags.get(name)
        if value is None:
            continue
        if not math.isfinite(value) or value < low or (value == low and not inclusive):
            raise ValueError(f"--{name} must be a finite number {'>=' if inclusive else '>'} {low:g}, got {value}")
    if flags.get("smoothing", 0.0) >= 1.0:
        raise ValueError(f"--smoothing must be below 1, got {flags['smoothing']}")
    if flags.get("warmup_lr_factor", 1e-3) > 1.0:
        raise ValueError(f"--warmup_lr_factor must be at most 1, got {flags['warmup_lr_factor']}")
    if flags.get("warmup_epochs", 0) < 0:
        raise ValueError(f"--warmup_epochs must be 0 or more, got {flags['warmup_epochs']}")
    epochs = flags.get("epochs")
    if epochs is not None and flags.get("warmup_epochs", 0) >= epochs and flags.get("warmup_epochs", 0) > 0:
        raise ValueError(f"--warmup_epochs {flags['warmup_epochs']} must be below --epochs {epochs}")
    clip = flags.get("clip_grad")
    if clip is not None and (not math.isfinite(clip) or clip <= 0):
        raise ValueError(f"--clip_grad must be a positive number, got {clip}")


def no_decay_names(module: nn.Module) -> set[str]:
    """Full names of the parameters a network exempts from weight decay through its
    ``no_weight_decay()`` (timm's convention), searched in every submodule."""
    names: set[str] = set()
    for prefix, sub in module.named_modules():
        exempt = getattr(sub, "no_weight_decay", None)
        if callable(exempt):
            names |= {f"{prefix}.{n}" if prefix else n for n in exempt()}
    return names


def param_groups(named: Iterable[tuple[str, nn.Parameter]], weight_decay: float, skip: str,
                 exempt: set[str]) -> list[dict[str, Any]]:
    """Parameter groups: one with ``weight_decay``, and with ``skip == "norm_bias_tokens"`` one
    without it for 1-D tensors and the names in ``exempt`` (mmcls's ``norm_decay_mult 0``,
    ``bias_decay_mult 0`` and the token ``custom_keys``, timm's ``param_groups_weight_decay``)."""
    decay, plain = [], []
    for name, p in named:
        if not p.requires_grad:
            continue
        no_decay = skip == "norm_bias_tokens" and (p.ndim <= 1 or name in exempt
                                                   or name.split(".", 1)[-1] in exempt)
        (plain if no_decay else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if plain:
        groups.append({"params": plain, "weight_decay": 0.0})
    return groups


def build_optimizer(cfg: Any, named: list[tuple[str, nn.Parameter]], exempt: set[str]) -> torch.optim.Optimizer:
    """The run's optimiser over ``named`` parameters, at the run's initial learning rate.

    Args:
        cfg: the run configuration (``opt``, ``learning_rate``, ``momentum``, ``weight_decay``,
            ``opt_betas``, ``opt_eps``, ``wd_skip``; missing keys take the SGD recipe's values).
        named: ``(name, parameter)`` pairs the optimiser updates.
        exempt: parameter names without weight decay under ``--wd_skip norm_bias_tokens``.
    """
    groups = param_groups(named, cfg.weight_decay, cfg.get("wd_skip", "none"), exempt)
    if cfg.get("opt", "sgd") == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=parse_betas(cfg.get("opt_betas", "0.9,0.999")),
                                 eps=cfg.get("opt_eps", 1e-8))
    return torch.optim.SGD(groups, lr=cfg.learning_rate, momentum=cfg.momentum)


@dataclass(frozen=True)
class LRSchedule:
    """The learning rate at each step of a run.

    Attributes:
        base: the peak learning rate.
        kind: ``"step"`` (x ``rate`` after each passed milestone, per epoch) or ``"cosine"``.
        milestones: epochs after which the step schedule decays.
        rate: the step schedule's factor.
        epochs: the run's length in epochs.
        warmup_epochs: epochs of linear warm-up (per iteration), 0 for none.
        warmup_factor: the warm-up's starting factor of ``base``.
        min_lr: the cosine schedule's final learning rate.
    """

    base: float
    kind: str = "step"
    milestones: tuple[int, ...] = ()
    rate: float = 0.1
    epochs: int = 1
    warmup_epochs: int = 0
    warmup_factor: float = 1e-3
    min_lr: float = 0.0

    @classmethod
    def from_config(cls, cfg: Any) -> "LRSchedule":
        return cls(base=cfg.learning_rate, kind=cfg.get("sched", "step"),
                   milestones=tuple(cfg.lr_decay_epochs), rate=cfg.lr_decay_rate, epochs=cfg.get("epochs", 1),
                   warmup_epochs=cfg.get("warmup_epochs", 0), warmup_factor=cfg.get("warmup_lr_factor", 1e-3),
                   min_lr=cfg.get("min_lr", 0.0))

    @property
    def per_iteration(self) -> bool:
        """True when the rate changes within an epoch (cosine or a warm-up)."""
        return self.kind == "cosine" or self.warmup_epochs > 0

    def at(self, epoch: int, step: int = 0, steps_per_epoch: int = 1) -> float:
        """The learning rate of ``step`` (0-based) of the 1-based ``epoch``.

        Warm-up (mmengine's ``LinearLR`` by iteration): the factor rises linearly from
        ``warmup_factor`` to 1 over ``warmup_epochs`` epochs. Cosine (``CosineAnnealingLR`` by
        iteration): ``min_lr + (base - min_lr) * (1 + cos(pi * t / T)) / 2`` over the
        iterations after the warm-up.
        """
        t = (epoch - 1) * steps_per_epoch + step
        warm = self.warmup_epochs * steps_per_epoch
        if t < warm:
            return self.base * (self.warmup_factor + (1.0 - self.warmup_factor) * t / warm)
        if self.kind == "cosine":
            span = max((self.epochs - self.warmup_epochs) * steps_per_epoch, 1)
            return self.min_lr + (self.base - self.min_lr) * (1 + math.cos(math.pi * (t - warm) / span)) / 2
        passed = sum(1 for m in self.milestones if epoch > m)
        return self.base * self.rate ** passed


def clip_gradients(parameters: list[nn.Parameter], max_norm: Optional[float]) -> None:
    """Clips the global L2 norm of the gradients to ``max_norm`` (no-op when None). Stays on
    the device: the norm is never read by the host."""
    if max_norm is not None:
        torch.nn.utils.clip_grad_norm_(parameters, max_norm, foreach=True)


def smoothed_cross_entropy(logits: torch.Tensor, target: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Cross-entropy of ``logits [B, K]``, a 0-d batch mean.

    Args:
        target: int64 labels ``[B]``, smoothed by ``smoothing`` (0: plain CE); or the mixed
            soft targets ``[B, K]`` of mixup/CutMix, which carry their smoothing already (the
            loader folds ``--smoothing`` in, as timm's ``Mixup`` does): used as they are.
    """
    if target.ndim == 2:
        return torch.sum(-target * torch.log_softmax(logits, dim=1), dim=1).mean()
    return torch.nn.functional.cross_entropy(logits, target, label_smoothing=smoothing)


def description(cfg: Any) -> str:
    """One line naming the optimiser and schedule in use, for the run header."""
    opt = cfg.get("opt", "sgd")
    if opt == "adamw":
        head = f"AdamW(betas={cfg.get('opt_betas')}, eps={cfg.get('opt_eps'):g}, wd={cfg.weight_decay:g}"
    else:
        head = f"SGD(momentum={cfg.momentum:g}, wd={cfg.weight_decay:g}"
    head += ", no decay on norms/biases/tokens)" if cfg.get("wd_skip", "none") != "none" else ")"
    sched = cfg.get("sched", "step")
    if sched == "cosine":
        body = f"cosine to {cfg.get('min_lr'):g} per iteration"
    else:
        body = f"x{cfg.lr_decay_rate:g} after epochs {','.join(map(str, cfg.lr_decay_epochs)) or 'none'}"
    if cfg.get("warmup_epochs", 0):
        body = f"{cfg.warmup_epochs}-epoch linear warm-up from x{cfg.get('warmup_lr_factor'):g}, then " + body
    clip = f", grad-norm clip {cfg.clip_grad:g}" if cfg.get("clip_grad") else ""
    smooth = f", label smoothing {cfg.smoothing:g}" if cfg.get("smoothing") else ""
    return f"{head} lr {cfg.learning_rate:g}, {body}{clip}{smooth}"



def hard_labels(labels: torch.Tensor) -> torch.Tensor:
    """``[B]`` int64 labels; mixed ``[B, K]`` targets (mixup/CutMix) give their argmax, the
    label with the larger share, for the methods and the accuracy meter."""
    return labels.argmax(dim=1) if labels.ndim == 2 else labels
