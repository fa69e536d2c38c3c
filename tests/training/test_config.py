"""Flags → validated, read-only configuration (helper/cli.py, helper/common_flags.py,
helper/config.py): parsing, derived values, the learning-rate schedule and every validation
error."""
from __future__ import annotations

import json
import math

import pytest

from helper.common_flags import DEFAULT_LR, LIGHT_LR, default_learning_rate, derive_common, parse_decay_epochs
from helper.config import Config
from helper.logbook import write_json
from helper.optim import LRSchedule
from errors import UserError

from helper.teacher_run import build_parser


def derive(tmp_path, *flags: str, model: str = "resnet8") -> dict:
    values, _ = build_parser().parse(["--save_root", str(tmp_path / "save"), *flags])
    return derive_common(values, model)


# ---- --lr_decay_epochs ---------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("150,180,210", [150, 180, 210]),
    ("30", [30]),
    (" 1, 2 ,3 ", [1, 2, 3]),
    ("", []),
])
def test_parse_decay_epochs(text, expected):
    assert parse_decay_epochs(text) == expected


@pytest.mark.parametrize("text", ["a,b", "150;180", "1.5,2", "180,150", "0,10", "-5,10"])
def test_parse_decay_epochs_rejects_malformed(text):
    with pytest.raises(UserError, match="--lr_decay_epochs"):
        parse_decay_epochs(text)


# ---- learning rates ---------------------------------------------------------------------

@pytest.mark.parametrize("model, lr", [
    ("MobileNetV2", 0.01), ("ShuffleV1", 0.01), ("ShuffleV2", 0.01),
    ("resnet8", 0.05), ("resnet32x4", 0.05), ("wrn_40_2", 0.05), ("vgg13", 0.05), ("ResNet50", 0.05),
])
def test_default_learning_rate(model, lr):
    assert default_learning_rate(model) == lr
    assert (DEFAULT_LR, LIGHT_LR) == (0.05, 0.01)


@pytest.mark.parametrize("epoch, factor", [
    (1, 1.0), (150, 1.0), (151, 0.1), (180, 0.1), (181, 0.01), (210, 0.01), (211, 0.001), (240, 0.001),
])
def test_learning_rate_schedule_of_the_reference(epoch, factor):
    cfg = Config({"learning_rate": 0.05, "lr_decay_rate": 0.1, "lr_decay_epochs": [150, 180, 210]})
    assert LRSchedule.from_config(cfg).at(epoch) == pytest.approx(0.05 * factor, rel=1e-12)


def test_derived_learning_rate_defaults_and_overrides(tmp_path):
    assert derive(tmp_path, model="ShuffleV1")["learning_rate"] == 0.01
    assert derive(tmp_path, model="resnet8")["learning_rate"] == 0.05
    given = derive(tmp_path, "--learning_rate", "0.2", model="ShuffleV1")
    assert given["learning_rate"] == 0.2 and given["base_learning_rate"] == 0.2


@pytest.mark.parametrize("batch, expected", [(64, 0.05), (128, 0.1), (256, 0.2), (32, 0.025)])
def test_linear_lr_scaling(tmp_path, batch, expected):
    values = derive(tmp_path, "--lr_scale", "linear", "--batch_size", str(batch))
    assert values["learning_rate"] == pytest.approx(expected)
    assert values["base_learning_rate"] == 0.05  # the unscaled rate is kept (and in the run name)
    # without --lr_scale the batch size does not touch the learning rate
    assert derive(tmp_path, "--batch_size", str(batch))["learning_rate"] == 0.05


def test_schedule_uses_the_scaled_rate(tmp_path):
    cfg = Config(derive(tmp_path, "--lr_scale", "linear", "--batch_size", "128",
                        "--lr_decay_epochs", "2,4", "--lr_decay_rate", "0.5"))
    assert [LRSchedule.from_config(cfg).at(e) for e in (1, 2, 3, 4, 5)] == pytest.approx(
        [0.1, 0.1, 0.05, 0.05, 0.025])


# ---- seeds ----------------------------------------------------------------------------------

def test_seed_is_drawn_and_flagged_when_not_given(tmp_path):
    drawn = [derive(tmp_path) for _ in range(3)]
    for values in drawn:
        assert isinstance(values["seed"], int) and 1 <= values["seed"] < 2**31
        assert values["seed_drawn"] is True
    assert len({v["seed"] for v in drawn}) > 1  # drawn afresh, not a constant
    zero = derive(tmp_path, "--seed", "0")  # the seed code's 'unseeded'
    assert zero["seed"] != 0 and zero["seed_drawn"] is True
    given = derive(tmp_path, "--seed", "123")
    assert given["seed"] == 123 and given["seed_drawn"] is False


# ---- validation ---------------------------------------------------------------------------

@pytest.mark.parametrize("flags, message", [
    (["--epochs", "0"], "--epochs must be positive"),
    (["--epochs", "-3"], "--epochs must be positive"),
    (["--batch_size", "0"], "--batch_size must be positive"),
    (["--batch_size", "-1"], "--batch_size must be positive"),
    (["--learning_rate", "nan"], "--learning_rate must be a finite positive"),
    (["--learning_rate", "inf"], "--learning_rate must be a finite positive"),
    (["--learning_rate", "0"], "--learning_rate must be a finite positive"),
    (["--learning_rate", "-0.1"], "--learning_rate must be a finite positive"),
    (["--lr_decay_rate", "nan"], "--lr_decay_rate"),
    (["--momentum", "-0.9"], "--momentum"),
    (["--momentum", "2"], r"--momentum must be in \[0, 1\), got 2.0"),  # accepted once: loss 9032
    (["--momentum", "1"], r"--momentum must be in \[0, 1\)"),
    (["--lr_decay_rate", "0"], "--lr_decay_rate"),
    (["--weight_decay=-1e-4"], "--weight_decay must be a finite non-negative"),
    (["--seed=-3"], r"--seed must be an integer in \[0, 2\*\*63\)"),
    (["--seed", str(2**64)], "--seed"),
    (["--weight_decay", "nan"], "--weight_decay"),
    (["--save_freq", "0"], "--save_freq"),
    (["--print_freq", "-1"], "--print_freq"),
    (["--lr_decay_epochs", "a,b"], "--lr_decay_epochs"),
    (["--run_name", "/abs/path"], "--run_name"),
    (["--run_name", "../escape"], "--run_name"),
])
def test_derive_rejects_bad_values(tmp_path, flags, message):
    with pytest.raises(UserError, match=message):
        derive(tmp_path, *flags)


def test_zero_weight_decay_and_momentum_are_allowed(tmp_path):
    values = derive(tmp_path, "--weight_decay", "0", "--momentum", "0")
    assert values["weight_decay"] == 0 and values["momentum"] == 0
    values = derive(tmp_path, "--momentum", "0.99", "--lr_decay_rate", "2", "--seed", "0")
    assert values["momentum"] == 0.99 and values["lr_decay_rate"] == 2 and values["seed_drawn"]


def test_unwritable_save_root(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    args = build_parser().parse_args(["--save_root", str(blocker / "save")])
    with pytest.raises(UserError, match="cannot create save folder"):
        derive_common(vars(args), "resnet8")


def test_parser_errors_are_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--epochs", "three"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "--epochs" in err[0]


# ---- the frozen configuration ---------------------------------------------------------

def test_config_is_read_only():
    cfg = Config({"epochs": 3, "lr_decay_epochs": [1, 2]})
    assert cfg.epochs == 3 and cfg["epochs"] == 3 and dict(cfg) == {"epochs": 3, "lr_decay_epochs": [1, 2]}
    with pytest.raises(AttributeError, match="read-only"):
        cfg.epochs = 4
    with pytest.raises(AttributeError, match="read-only"):
        cfg.new_field = 1
    with pytest.raises(TypeError):
        cfg["epochs"] = 4  # type: ignore[index]
    with pytest.raises(AttributeError, match="no field 'missing'"):
        _ = cfg.missing
    assert cfg.epochs == 3


def test_config_does_not_share_the_callers_dict():
    values = {"epochs": 3}
    cfg = Config(values)
    values["epochs"] = 99
    assert cfg.epochs == 3


def test_config_replace_returns_a_new_config():
    cfg = Config({"epochs": 3, "seed": 1})
    other = cfg.replace(epochs=5)
    assert other.epochs == 5 and other.seed == 1
    assert cfg.epochs == 3


def test_config_json_round_trip(tmp_path):
    cfg = Config(derive(tmp_path, "--seed", "5", "--lr_decay_epochs", "3,6"))
    write_json(str(tmp_path / "config.json"), dict(cfg))
    loaded = json.loads((tmp_path / "config.json").read_text(encoding="utf-8"))
    assert loaded["seed"] == 5 and loaded["lr_decay_epochs"] == [3, 6]
    assert math.isclose(loaded["learning_rate"], 0.05)


def test_each_data_set_starts_from_its_reference_recipe(tmp_path):
    cifar = derive(tmp_path)
    assert (cifar["epochs"], cifar["batch_size"], cifar["learning_rate"], cifar["lr_decay_epochs"],
            cifar["weight_decay"]) == (240, 64, 0.05, [150, 180, 210], 5e-4)
    imagenet = derive(tmp_path, "--dataset", "imagenet", model="resnet18")
    assert (imagenet["epochs"], imagenet["batch_size"], imagenet["learning_rate"], imagenet["lr_decay_epochs"],
            imagenet["weight_decay"]) == (100, 256, 0.1, [30, 60, 90], 1e-4)
    # the linear scaling rule is relative to the recipe's own batch
    assert derive(tmp_path, "--dataset", "imagenet", "--batch_size", "512", "--lr_scale", "linear",
                  model="resnet18")["learning_rate"] == pytest.approx(0.2)
    assert derive(tmp_path, "--batch_size", "128", "--lr_scale", "linear")["learning_rate"] == pytest.approx(0.1)
    # given flags win over the recipe
    assert derive(tmp_path, "--dataset", "imagenet", "--epochs", "3", model="resnet18")["epochs"] == 3


# ---- the objective line -----------------------------------------------------------------

def _student_cfg(*flags: str):
    import torch

    from helper import distributed
    from helper.student_flags import parse_config

    env = distributed.DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    return parse_config(["--path_t", "t.pth", "--model_s", "resnet8x4", *flags], env, "resnet32x4")


def _objective(cfg) -> str:
    from distiller_zoo import METHODS
    from helper.distill import describe_objective

    return describe_objective(cfg.gamma, cfg.alpha, cfg.beta, cfg.distill, cfg.add if cfg.alpha else None,
                              METHODS.get(cfg.distill).main_is_zero, cfg)


def test_objective_line_names_every_hyper_parameter_of_the_terms_in_use():
    wttm = _student_cfg("--distill", "wttm", "--ttm_l", "0.1", "-r", "1", "-a", "0", "-b", "3")
    assert _objective(wttm) == "loss = 1·CE + 3·wttm(ttm_l=0.1)"  # was '3·wttm', without its γ
    dkd = _objective(_student_cfg("--distill", "dkd", "--dkd_warmup", "5"))
    # β resolved for the pair (8 for resnet32x4 → resnet8x4), and the warm-up
    assert "1·dkd(dkd_alpha=1, dkd_beta=8, dkd_T=4, dkd_warmup=5" in dkd
    seed_kd = _objective(_student_cfg("--distill", "kd", "-r", "0.1", "-a", "0.9", "-b", "0", "--kd_T", "3"))
    assert seed_kd.startswith("loss = 0.1·CE + 0.9·kd(add, kd_T=3") and "0·kd (a literal 0" in seed_kd
    # a term of weight 0 lists nothing: its flags act on nothing
    assert _objective(_student_cfg("--distill", "wttm", "-b", "0")) == "loss = 1·CE + 0·wttm"


def test_objective_line_lists_each_methods_flags_from_its_flags_tuple():
    """No per-method list: whatever a method declares in ``flags`` shows with its value."""
    from distiller_zoo import METHODS

    for name, cls in METHODS.items():
        if cls.main_is_zero:
            continue
        cfg = _student_cfg("--distill", name, "-b", "2", "-a", "0")
        line = _objective(cfg)
        assert f"2·{name}" in line, line
        for flag in cls.flags:
            value = cfg[flag.dest]
            if value is not None:
                shown = f"{value:g}" if isinstance(value, float) else str(value)
                assert f"{flag.dest}={shown}" in line, (name, flag.dest, line)
