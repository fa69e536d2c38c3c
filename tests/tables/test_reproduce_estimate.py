"""``reproduce.py --estimate`` says what it measures before it starts, shows progress while a
calibration round runs, and says when it reuses a cached calibration and from how many steps.

A real calibration on the CPU with tiny step counts (digits, batch 16, 2 timed steps)."""
from __future__ import annotations

import re


from train_utils import load_script

reproduce = load_script("reproduce")


def test_estimate_says_what_it_measures_shows_progress_and_reuses_the_cache(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    argv = ["--estimate", "--gpus", "cpu", "--pair", "resnet56:resnet20", "--method", "KD", "--trials", "1",
            "--save_root", str(tmp_path), "--calibration_steps", "2", "--calibration_progress_s", "0.05",
            "--", "--dataset", "digits", "--epochs", "1", "--batch_size", "16", "--model_s", "resnet8"]
    assert reproduce.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    said = [i for i, line in enumerate(lines) if line.startswith("# estimate: the plan's device-hours")]
    measuring = [i for i, line in enumerate(lines) if "measuring the training step" in line]
    progress = [line for line in lines if re.search(r"K=1: (starting|building the step|warm-up|timed)", line)]
    result = [i for i, line in enumerate(lines) if re.search(r"K=1: [\d,]+ images/s", line)]
    assert said and measuring and result and said[0] < measuring[0] < result[0], lines
    assert "warms up 5 steps and times 2" in lines[measuring[0]] and "900 s at most" in lines[measuring[0]]
    assert progress, lines  # at least one line while the round ran
    assert any(line.startswith("# estimate: 1 run,") for line in lines)
    assert not (tmp_path / "student_model").exists()
    assert reproduce.main(argv) == 0  # the second time from the cache, and it says so
    out = capsys.readouterr().out
    assert "measuring the training step" not in out
    assert re.search(r"reusing the cached rates of K=1, measured \d{4}-\d\d-\d\d [\d:]+ from 2 timed steps "
                     r"per process \(.*calibration.*\.json; --recalibrate measures again\)", out), out


def test_a_negative_progress_interval_is_refused(capsys):
    import pytest

    with pytest.raises(SystemExit) as err:
        reproduce.main(["--estimate", "--calibration_progress_s", "-1"])
    assert err.value.code == 2 and "--calibration_progress_s must be >= 0" in capsys.readouterr().err
