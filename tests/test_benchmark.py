"""``scripts/benchmark.py`` (the ``scripts/bench`` package) in its ``--quick`` CPU configuration.

One quick run as a script (shared by the tests below) writes ``benchmark.json`` (valid, every
section filled, the ImageNet rows included) and ``benchmark.md`` (every section, the same
text it prints, labelled a smoke run); its step rows carry the command line and the
configuration ``helper.student.parse_config`` gives for it. Under a time budget the benchmark
lists what it skipped instead of running over. No speed is asserted.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

from train_utils import REPO, subprocess_env

from helper import distributed
from helper.speed import CompiledOrEager
from helper.student import parse_config
from scripts.bench import cli, plan, timing
from scripts.bench.targets import SMOKE

SECTIONS = ("# Benchmark on ", "## Targets", "## Data pipeline", "## CRD negatives",
            "## Training step", "## Whole epoch", "## ImageNet data pipeline", "## ImageNet training step")


def positive(stats: dict) -> bool:
    return all(math.isfinite(stats[k]) and stats[k] > 0 for k in ("median", "q1", "q3", "min", "max"))


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """``(completed process, benchmark.json, benchmark.md)`` of one ``--quick`` CPU run."""
    out = tmp_path_factory.mktemp("bench")
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "benchmark.py"), "--quick",
                           "--device", "cpu", "--out", str(out)], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done, json.loads((out / "benchmark.json").read_text()), (out / "benchmark.md").read_text()


def test_quick_run_writes_json_and_markdown(quick):
    done, result, markdown = quick
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

    for heading in SECTIONS:
        assert heading in markdown, heading
    assert markdown.strip() in done.stdout
    assert "| resnet8:resnet8 | crd | fp32 |" in markdown


def test_quick_report_says_smoke_run_and_judges_nothing(quick):
    _, result, markdown = quick
    assert result["smoke"] is True
    head, targets = markdown.split("## Targets", 1)
    assert SMOKE in head
    bullets = [line for line in targets.split("\n## ")[0].splitlines() if line.startswith("- ")]
    assert len(bullets) >= 6  # CIFAR loader, CRD, epoch, loader share, ImageNet loader, step, 100 epochs
    for line in bullets:
        assert line.endswith(f" — {SMOKE}"), line
        assert "met" not in line.replace("not a measurement", "") and "target" not in line, line


def test_quick_imagenet_rows(quick):
    _, result, markdown = quick
    section = result["imagenet"]
    files = section["files"]
    assert files["train_files"] == files["unique_files"] == 8 and 90 <= files["mean_kb"] <= 130  # ILSVRC-like
    workers, gpu = section["loader"]
    assert (workers["decode"], workers["workers"], workers["images"]) == ("workers", 1, 8)
    assert workers["images_per_s"] > 0 and positive(workers["s_per_pass"]) and workers["skipped"] == 0
    assert gpu["decode"] == "device" and gpu["unavailable"] == "unavailable: no CUDA/torchvision"

    (step,) = section["steps"]
    assert (step["pair"], step["setting"], step["batch"], step["image_size"], step["num_classes"]) == \
        ("resnet18:resnet18", "fp32", 2, 224, 1000)
    assert positive(step["ms_per_step"]) and step["ms_per_step"]["n"] == 2 and math.isfinite(step["loss"])
    # teacher forward + student forward/backward of two 224-pixel images: ~3.6 GFLOP per image pass
    assert 25e9 < step["flops_per_step"] < 33e9
    assert step["images_per_s"] == pytest.approx(2e3 / step["ms_per_step"]["median"])
    assert "| resnet18:resnet18 | fp32 |" in markdown and "unavailable: no CUDA/torchvision" in markdown


def test_step_rows_record_what_parse_config_gives(quick):
    _, result, _ = quick
    env = distributed.DistEnv(0, 1, 0, torch.device("cpu"))
    for row in (result["steps"][0], result["imagenet"]["steps"][0]):
        cfg = parse_config(row["argv"], env, row["pair"].split(":")[0])
        assert json.loads(json.dumps(dict(cfg), default=str)) == row["config"]
    imagenet = result["imagenet"]["steps"][0]["config"]
    assert (imagenet["distill"], imagenet["ttm_l"], imagenet["gamma"], imagenet["alpha"], imagenet["beta"],
            imagenet["batch_size"], imagenet["model_s"], imagenet["model_t"]) == \
        ("wttm", 0.8, 1.0, 0.0, 1.6, 2, "resnet18", "resnet18")


def test_time_budget_skips_by_name(tmp_path):
    result = cli.main(["--quick", "--device", "cpu", "--out", str(tmp_path), "--budget_s", "0.001",
                       "--settings", "fp32,fp32+cl", "--sections", "steps,epoch,imagenet"])
    assert result["steps"] == [] and result["epoch"] == [] and result["imagenet"]["steps"] == []
    assert result["loader"] == [] and result["crd"] == []
    assert result["skipped"] == ["imagenet loader (time budget)",
                                 "step resnet8:resnet8 crd fp32 (time budget)",
                                 "step resnet8:resnet8 crd fp32+cl (time budget)",
                                 "epoch fp32 (time budget)",
                                 "imagenet step resnet18:resnet18 wttm fp32 (time budget)"]
    assert json.loads((tmp_path / "benchmark.json").read_text())["skipped"] == result["skipped"]
    assert "## Skipped" in (tmp_path / "benchmark.md").read_text()


def test_imagenet_switch_selects_only_the_imagenet_rows(tmp_path):
    result = cli.main(["--quick", "--imagenet", "--device", "cpu", "--out", str(tmp_path), "--budget_s", "0.001"])
    assert result["sections"] == ["imagenet"]
    markdown = (tmp_path / "benchmark.md").read_text()
    assert "## ImageNet training step" in markdown and "## Data pipeline" not in markdown
    assert "--imagenet" in markdown.split("Command:", 1)[1].splitlines()[0]
    assert result["skipped"] == ["imagenet loader (time budget)",
                                 "imagenet step resnet18:resnet18 wttm fp32 (time budget)"]


def test_bad_section_or_setting_is_one_line(capsys, tmp_path):
    from scripts.benchmark import main
    for flags, words in ((["--sections", "data,bogus"], "unknown section(s) bogus"),
                         (["--imagenet_settings", "fp16"], "bad setting 'fp16'"),
                         (["--imagenet_workers", "2,x"], "--imagenet_workers")):
        with pytest.raises(SystemExit) as stop:
            main(["--quick", "--device", "cpu", "--out", str(tmp_path), *flags])
        assert stop.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and words in err and "\n" not in err
    assert not (tmp_path / "benchmark.json").exists()


def test_settings_and_priorities():
    for name in ("fp32", "bf16+cl", "fp32+compile", "bf16+cl+compile", "fp32+cudnn"):
        assert timing.Setting.parse(name).name == name
    setting = timing.Setting.parse("bf16+cl+compile")
    assert setting.flags() == ["--precision", "bf16", "--channels_last", "--compile"]
    for bad in ("fp16", "fp32+nhwc"):
        with pytest.raises(ValueError):
            timing.Setting.parse(bad)
    head, other = "resnet32x4:resnet8x4", "vgg13:vgg8"
    order = lambda pair, method, name: plan.priority(pair, method, timing.Setting.parse(name), head)  # noqa: E731
    # headline eager first, then what the epoch section needs, then the rest
    assert order(head, "crd", "bf16") < order(head, "wttm", "bf16+cl+compile") < order(other, "kd", "fp32")
    assert order(other, "kd", "fp32") < order(other, "kd", "bf16") < order(other, "kd", "fp32+compile")
    stats = timing.summarize([4.0, 1.0, 3.0, 2.0])
    assert (stats["median"], stats["min"], stats["max"], stats["q1"], stats["q3"]) == (2.5, 1.0, 4.0, 1.75, 3.25)


def test_compiled_property_reports_the_eager_fallback(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")
    monkeypatch.setattr(torch, "compile", lambda module, mode="default": broken)
    wrapped = CompiledOrEager(nn.Linear(2, 3))
    assert wrapped.compiled is True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = wrapped(torch.ones(1, 2))
    assert out.shape == (1, 3) and wrapped.compiled is False
    assert any("running eagerly" in str(w.message) for w in caught)
    with pytest.raises(AttributeError):
        wrapped.compiled = True
