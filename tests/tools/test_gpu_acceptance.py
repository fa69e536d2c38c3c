"""``scripts/gpu_acceptance.py --cpu-smoke``: the acceptance script's code paths on the CPU.

The smoke run replaces CUDA graphs with stand-ins that re-run the step; it checks that every
section runs and reports, not what a GPU does. The fast test runs the sections that exercise
the graph step, the runs and the decoders; every section together is opt-in
(``KD_SLOW_TESTS=1``, about 30 s alone on 2 cores).
"""
from __future__ import annotations

import os

import pytest

from scripts.acceptance import sections
from scripts.acceptance.report import Section
from train_utils import load_script

pytestmark = pytest.mark.usefixtures("one_thread")
slow = pytest.mark.skipif(not os.environ.get("KD_SLOW_TESTS"), reason="set KD_SLOW_TESTS=1")


def run(tmp_path, *extra: str) -> tuple[int, str]:
    code = load_script("gpu_acceptance").main(["--cpu-smoke", "--out", str(tmp_path), *extra])
    return code, (tmp_path / "gpu_acceptance.md").read_text()


def test_smoke_sections_pass_and_report(tmp_path):
    code, text = run(tmp_path, "--sections", "environment,cache,recapture,digits,decode")
    assert code == 0, text
    assert "**0 failed section(s)**" in text and "CPU smoke run" in text
    assert text.count("| PASS |") == 5
    # the digits runs recorded their step mode in summary.json, and no graph event
    assert "step_mode `eager (CUDA graphs need a CUDA device)`" in text and "graph events []" in text
    assert "Adobe RGB (APP14 transform 0) | PIL | 0 |" in text  # an RGB-coded JPEG never goes to nvJPEG


def test_the_exit_status_counts_failed_sections(tmp_path, monkeypatch):
    def broken(ctx):
        raise RuntimeError("stand-in failure")

    def failing(ctx):
        return Section("failing", False, lines=["a check failed"])
    monkeypatch.setattr(sections, "SECTIONS", [("environment", sections.environment), ("broken", broken),
                                               ("failing", failing)])
    script = load_script("gpu_acceptance")
    monkeypatch.setattr(script, "SECTIONS", sections.SECTIONS)
    code = script.main(["--cpu-smoke", "--out", str(tmp_path), "--sections", "environment,broken,failing"])
    text = (tmp_path / "gpu_acceptance.md").read_text()
    assert code == 2 and "**2 failed section(s)**: broken, failing" in text
    assert "raised RuntimeError: stand-in failure" in text


@slow
def test_every_section_runs_in_the_smoke(tmp_path):
    code, text = run(tmp_path)
    assert code == 0, text
    assert text.count("| PASS |") == len(sections.SECTIONS)
