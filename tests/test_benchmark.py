"""``scripts/benchmark.py`` in its ``--quick`` CPU configuration.

It runs as a script, writes ``benchmark.json`` (valid, every section filled) and
``benchmark.md`` (every section, the same text it prints), and under a time budget it lists
what it skipped instead of running over. No speed is asserted.
"""
from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import pytest

from train_utils import REPO, subprocess_env

SECTIONS = ("# Benchmark on ", "## Targets", "## Data pipeline", "## CRD negatives",
            "## Training step", "## Whole epoch")


def load_benchmark():
    """``scripts/benchmark.py`` as a module (it is a script, not a package member)."""
    if "benchmark" not in sys.modules:
        spec = importlib.util.spec_from_file_location("benchmark", REPO / "scripts" / "benchmark.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["benchmark"] = module  # dataclasses look their module up while being built
        spec.loader.exec_module(module)
    return sys.modules["benchmark"]


def positive(stats: dict) -> bool:
    return all(math.isfinite(stats[k]) and stats[k] > 0 for k in ("median", "q1", "q3", "min", "max"))


def test_quick_run_writes_json_and_markdown(tmp_path):
    out = tmp_path / "bench"
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "benchmark.py"), "--quick",
                           "--device", "cpu", "--out", str(out)], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((out / "benchmark.json").read_text())
    assert result["errors"] == [] and result["skipped"] == []
    header = result["header"]
    assert header["device_type"] == "cpu" and header["torch"] and header["threads"] >= 1

    pipelines = [r["pipeline"] for r in result["loader"]]
    assert pipelines[:2] == ["ours: DeviceLoader", "ours: DeviceLoader, channels_last"]
    assert pipelines[2].startswith("reference-style")
    assert all(r["images_per_s"] > 0 and positive(r["s_per_pass"]) for r in result["loader"])

    assert [r["sampler"].split(":")[0] for r in result["crd"]] == ["ours", "reference"]
    assert all(positive(r["ms"]) and r["batch"] == 64 for r in result["crd"])

    (step,) = result["steps"]
    assert (step["pair"], step["method"], step["setting"], step["compile"]) == ("resnet8:resnet8", "crd", "fp32", "off")
    assert positive(step["ms_per_step"]) and step["ms_per_step"]["n"] == 2
    assert math.isfinite(step["loss"]) and step["flops_per_step"] > 0

    (epoch,) = result["epoch"]
    assert epoch["setting"] == "fp32" and epoch["steps_per_epoch"] == 2
    assert positive(epoch["epoch_s"]) and epoch["projected_240_s"] > epoch["full_epoch_s"] > 0

    markdown = (out / "benchmark.md").read_text()
    for heading in SECTIONS:
        assert heading in markdown, heading
    assert markdown.strip() in done.stdout
    assert "| resnet8:resnet8 | crd | fp32 |" in markdown


def test_time_budget_skips_by_name(tmp_path):
    bench = load_benchmark()
    result = bench.main(["--quick", "--device", "cpu", "--out", str(tmp_path), "--budget_s", "0.001",
                         "--settings", "fp32,fp32+cl"])
    assert result["steps"] == [] and result["epoch"] == []
    assert result["skipped"] == ["step resnet8:resnet8 crd fp32 (time budget)",
                                 "step resnet8:resnet8 crd fp32+cl (time budget)",
                                 "epoch fp32 (time budget)"]
    assert json.loads((tmp_path / "benchmark.json").read_text())["skipped"] == result["skipped"]
    assert "## Skipped" in (tmp_path / "benchmark.md").read_text()


def test_settings_and_priorities():
    bench = load_benchmark()
    for name in ("fp32", "bf16+cl", "fp32+compile", "bf16+cl+compile", "fp32+cudnn"):
        assert bench.Setting.parse(name).name == name
    setting = bench.Setting.parse("bf16+cl+compile")
    assert setting.flags() == ["--precision", "bf16", "--channels_last", "--compile"]
    for bad in ("fp16", "fp32+nhwc"):
        with pytest.raises(ValueError):
            bench.Setting.parse(bad)
    head, other = "resnet32x4:resnet8x4", "vgg13:vgg8"
    order = lambda pair, method, name: bench.priority(pair, method, bench.Setting.parse(name), head)  # noqa: E731
    # headline eager first, then what the epoch section needs, then the rest
    assert order(head, "crd", "bf16") < order(head, "wttm", "bf16+cl+compile") < order(other, "kd", "fp32")
    assert order(other, "kd", "fp32") < order(other, "kd", "bf16") < order(other, "kd", "fp32+compile")
    stats = bench.summarize([4.0, 1.0, 3.0, 2.0])
    assert (stats["median"], stats["min"], stats["max"], stats["q1"], stats["q3"]) == (2.5, 1.0, 4.0, 1.75, 3.25)
