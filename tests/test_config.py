"""Flags → validated, read-only configuration (helper/config.py): parsing, derived values,
the learning-rate schedule and every validation error."""
from __future__ import annotations

import json
import math

import pytest

from helper.config import (DEFAULT_LR, LIGHT_LR, Config, default_learning_rate, derive_common,
                           learning_rate_at, parse_decay_epochs)
from errors import UserError

from helper.teacher_run import build_parser


def derive(tmp_path, *flags: str, model: str = "resnet8") -> dict:
    args = build_parser().parse_args(["--save_root", str(tmp_path / "save"), *flags])
    return derive_common(vars(args), model)


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
    assert learning_rate_at(cfg, epoch) == pytest.approx(0.05 * factor, rel=1e-12)


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
    assert [learning_rate_at(cfg, e) for e in (1, 2, 3, 4, 5)] == pytest.approx(
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
    loaded = json.loads(cfg.to_json())
    assert loaded == json.loads(json.dumps(dict(cfg)))
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
