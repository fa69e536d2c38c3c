"""helper/resume.py on its own: what --resume merges, what it lets change, and the one line
that refuses a change."""
from __future__ import annotations

import json

import pytest

from errors import UserError
from helper.resume import merged_flags, reconcile, refuse_changes, saved_config

OPTIONS = {"epochs": "--epochs", "ttm_l": "--ttm_l", "print_freq": "--print_freq", "gamma": "-r"}


def test_merge_takes_saved_values_for_flags_not_given():
    saved = {"flags": {"ttm_l": 0.2, "epochs": 240, "print_freq": 100}}
    merged = merged_flags({"ttm_l": 0.1, "epochs": 300, "print_freq": 10, "opt": "sgd"}, {"epochs"}, saved)
    assert merged == {"ttm_l": 0.2, "epochs": 300, "print_freq": 100, "opt": "sgd"}  # new flags: today's default


def test_only_output_speed_and_more_epochs_may_change(tmp_path):
    saved = {"ttm_l": 0.2, "epochs": 240, "print_freq": 100, "gamma": 1.0}
    refuse_changes(saved, {**saved, "epochs": 300, "print_freq": 1}, {"epochs", "print_freq"}, OPTIONS, "run")
    with pytest.raises(UserError) as err:
        refuse_changes(saved, {**saved, "ttm_l": 0.3, "epochs": 200}, {"ttm_l", "epochs"}, OPTIONS, "run")
    line = str(err.value)
    assert "--ttm_l 0.2 → 0.3" in line and "--epochs 240 → 200 (it may only grow)" in line and "\n" not in line


def test_reconcile_without_a_saved_run_keeps_the_config(tmp_path):
    cfg = {"resume": True, "ttm_l": 0.1}
    assert reconcile(cfg, {}, set(), str(tmp_path), lambda f, s: None, OPTIONS) is cfg


def test_an_unreadable_config_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot read"):
        saved_config(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps([1, 2]))
    with pytest.raises(UserError, match="not a JSON object"):
        saved_config(str(tmp_path))
