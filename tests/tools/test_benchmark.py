"""``scripts/benchmark.py`` (the ``scripts/bench`` package) in its ``--quick`` CPU configuration.

One quick run as a script (shared by the tests below) writes ``benchmark.json`` (valid, every
section filled: data, CRD, steps, epoch, the whole-table sections (epoch split, teacher cache,
packed runs, projected cost), ImageNet and DeiT) and ``benchmark.md`` (every section, the same
text it prints, labelled a smoke run); its step rows carry the command line and the
configuration ``helper.student_flags.parse_config`` gives for it. Under a time budget the
benchmark lists what it skipped instead of running over. The cost projection's arithmetic is
checked on a given table of rates. No speed is asserted.
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
from helper.student_flags import parse_config
from scripts.bench import cli, cost, deit, epoch, step, timing
from scripts.bench.report import SMOKE

SECTIONS = ("# Benchmark on ", "## Targets", "## Data pipeline", "## CRD negatives",
            "## Training step", "## Whole epoch", "## Epoch split", "## Teacher-output cache", "## Packed runs",
            "## Projected cost of Tables 1 and 2", "## ImageNet data pipeline", "## ImageNet training step",
            "## DeiT augmentation", "## DeiT training loader", "## DeiT-S → DeiT-Ti training step")


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
    assert epoch["setting"] == "fp32" and epoch["steps_per_epoch"] == 1
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
    # CIFAR loader, CRD, epoch, loader share; flagship (live, cache), packing, cache, tables; ImageNet loader
    # (workers, GPU), step, 100 epochs; DeiT augmentation, loader (workers, GPU), 300 epochs
    assert len(bullets) == 17
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
    assert "| resnet18:resnet18 | wttm | fp32 | 2 |" in markdown and "unavailable: no CUDA/torchvision" in markdown


def test_step_rows_record_what_parse_config_gives(quick):
    _, result, _ = quick
    env = distributed.DistEnv(0, 1, 0, torch.device("cpu"))
    for row in (result["steps"][0], result["imagenet"]["steps"][0], result["deit"]["steps"][0]):
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
                         (["--imagenet_workers", "2,x"], "--imagenet_workers"),
                         (["--packing_ks", "1,0"], "--packing_ks must be a comma list of positive integers"),
                         (["--settings", "fp32+compile+graph"], "bad setting 'fp32+compile+graph'"),
                         (["--deit_settings", "fp32+nhwc"], "bad setting 'fp32+nhwc'"),
                         (["--deit_methods", "vitkd+nkd,kd"], "unknown --deit_methods kd")):
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
    order = lambda pair, method, name: step.priority(pair, method, timing.Setting.parse(name), head)  # noqa: E731
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


def test_quick_whole_table_sections(quick):
    _, result, markdown = quick
    assert [r["setting"] for r in result["split"]] == ["fp32", "fp32+graph"]  # eager (the default) vs graphs
    for row in result["split"]:
        assert row["step_mode"].startswith("eager") and row["steps_per_epoch"] == 1 and row["epochs"] == 1
        assert ("--cuda_graphs" in row["argv"]) == row["setting"].endswith("+graph")  # the CPU stays eager
        assert 0 < row["in_step_s"] < row["epoch_s"] and row["loop_s"] > 0 and row["checkpoint_s"] > 0
        assert row["in_step_s"] + row["loop_s"] + row["checkpoint_s"] == pytest.approx(row["epoch_s"])
        assert row["full_epoch_s"] == pytest.approx(row["full_in_step_s"] + row["full_outside_s"])

    (cache,) = result["cache"]
    assert (cache["pair"], cache["method"], cache["build_views"], cache["batch"]) == ("resnet8:resnet8", "wttm", 162, 4)
    assert cache["speedup"] == pytest.approx(cache["live_ms"] / cache["cached_ms"]) and cache["build_views_per_s"] > 0
    assert cache["full_build_s"] == pytest.approx(50000 * 162 / cache["build_views_per_s"])

    (pack,) = result["packing"]  # one real calibration round (K = 2 starts a second process: tests/tables/test_packing.py)
    assert pack["ks"] == [1] and pack["stopped"] == {} and pack["pair"] == "resnet8:resnet8"
    ((k, rate, ratio),) = [(r["k"], r["images_per_s"], r["ratio"]) for r in pack["rounds"]]
    assert (k, ratio, pack["best_k"], pack["best_ratio"]) == (1, 1.0, 1, 1.0) and rate > 0
    assert pack["argv"][:4] == ["--path_t", "unused.pth", "--model_s", "resnet8"] and "wttm" in pack["argv"]

    costs = result["cost"]
    tables = costs["tables"]
    assert tables["runs"] == sum(c["runs"] for c in tables["cells"]) > 700 and tables["k"] == pack["best_k"]
    assert {c["source"] for c in tables["cells"]} <= {"resnet8:resnet8 crd", "resnet8:resnet8 wttm"}
    assert sorted(tables["teachers"]) == ["ResNet50", "resnet110", "resnet32x4", "resnet56", "vgg13", "wrn_40_2"]
    assert costs["flagship"]["live_min"] == pytest.approx(result["split"][0]["projected_240_s"] / 60)
    assert 0 < tables["device_hours"] and tables["live_alone_hours"] > 0
    assert "| fp32+graph | eager |" in markdown and "reused: resnet8:resnet8" in markdown


def test_cost_projection_arithmetic():
    cells = [cost.CellRuns(1, "t:s", "WTTM", 2, True), cost.CellRuns(1, "t:s", "CRD", 1, False),
             cost.CellRuns(2, "u:v", "KD", 1, True)]
    rates = cost.Rates({("t:s", "wttm"): 100.0, ("t:s", "crd"): 200.0}, outside_s=10.0,
                       packing={1: 1.0, 2: 1.5, 4: 1.6}, cache_ratio=0.5, build_views_per_s=1000.0, headline="t:s")
    out = cost.project(cells, rates, epochs=2, n_train=640, batch=64, views_per_image=10)
    # 10 steps per epoch: cached logit runs 2 x (10 x 0.1 s x 0.5 + 10) = 21 s, CRD 2 x (10 x 0.2 + 10) = 24 s
    assert [c["run_s"] for c in out["cells"]] == pytest.approx([21.0, 24.0, 21.0])
    assert [(c["source"], c["measured"], c["cached"]) for c in out["cells"]] == \
        [("t:s wttm", True, True), ("t:s crd", True, False), ("t:s wttm", False, True)]
    assert out["live_alone_hours"] == pytest.approx((2 * 22 + 24 + 22) / 3600)
    assert out["alone_hours"] == pytest.approx((2 * 21 + 24 + 21) / 3600)
    # K = 4 (1.6x; 1.5x at K = 2 is more than 3 % slower): each run takes 2.5x its time alone
    assert (out["k"], out["ratio"], out["runs"]) == (4, 1.6, 4)
    build = 2 * 640 * 10 / 1000.0  # teachers t and u, 6,400 views each
    assert out["build_s"] == pytest.approx(build) and out["teachers"] == ["t", "u"]
    assert out["device_hours"] == pytest.approx((87 * 2.5 / 4 + build) / 3600)
    assert out["wall_s"] == pytest.approx(24 * 2.5 + build)
    without = cost.project(cells, cost.Rates(rates.step_ms, headline="t:s"), epochs=2, n_train=640, batch=64)
    # no outside time, no cache, no packing: 2 x 10 steps x 0.1 s (WTTM, KD) or 0.2 s (CRD)
    assert (without["k"], without["build_s"], without["teachers"]) == (1, 0.0, [])
    assert without["device_hours"] == pytest.approx((2 * 2 + 4 + 2) / 3600) and without["wall_s"] == pytest.approx(10.0)


def test_rate_source_prefers_the_pair_then_its_networks():
    measured = {("a:s", "crd"): 1.0, ("b:y", "kd"): 1.0, ("h:z", "wttm"): 1.0, ("a:s", "kd"): 1.0}
    assert cost.rate_source("a:s", "CRD", measured, "h:z") == ("a:s", "crd")
    assert cost.rate_source("a:s", "WTTM+CRD", measured, "h:z") == ("a:s", "crd")
    assert cost.rate_source("a:s", "DIST", measured, "h:z") == ("a:s", "kd")  # a logit stand-in on the pair
    assert cost.rate_source("q:s", "KD", measured, "h:z") == ("a:s", "kd")  # same student
    assert cost.rate_source("b:q", "WTTM", measured, "h:z") == ("b:y", "kd")  # same teacher
    assert cost.rate_source("p:q", "WTTM", measured, "h:z") == ("h:z", "wttm")  # the headline
    with pytest.raises(ValueError):
        cost.rate_source("a:s", "KD", {}, "a:s")


def test_split_figures_and_full_epoch():
    figures = epoch.split_figures(12.0, [5.0, 5.0], [3.0, 5.0], 20)  # two epochs: wall 6 s each
    assert figures == pytest.approx({"epoch_s": 6.0, "in_step_s": 4.0, "loop_s": 1.0, "checkpoint_s": 1.0,
                                     "outside_s": 2.0, "in_step_share": 4 / 6, "ms_per_step": 400.0})
    row = {**figures, "train_images": 5000, "first_epoch_s": 9.0}
    full = epoch.full_epoch(row)
    assert full["full_in_step_s"] == pytest.approx(782 * 0.4)
    assert full["full_outside_s"] == pytest.approx(1.0 * 10 + 1.0)  # the loop scales with the images
    assert full["projected_240_s"] == pytest.approx(240 * (782 * 0.4 + 11.0) + 3.0)


def test_whole_table_sections_skip_under_the_budget(tmp_path):
    result = cli.main(["--quick", "--device", "cpu", "--out", str(tmp_path), "--budget_s", "0.001",
                       "--sections", "split,cache,packing,cost"])
    assert result["split"] == result["cache"] == result["packing"] == [] and result["cost"] is None
    assert result["skipped"] == ["epoch split fp32 (time budget)", "epoch split fp32+graph (time budget)",
                                 "teacher cache resnet8:resnet8 wttm (time budget)",
                                 "packing resnet8:resnet8 wttm (time budget)",
                                 "cost projection (no step time was measured)"]
    assert "Nothing to project" in (tmp_path / "benchmark.md").read_text()


def test_graph_setting_is_cuda_graphs_on():
    setting = timing.Setting.parse("bf16+cl+graph")
    assert setting.name == "bf16+cl+graph" and setting.flags()[-2:] == ["--cuda_graphs", "on"]
    assert "--cuda_graphs" not in timing.Setting.parse("fp32").flags()  # the plain point is the eager default
    assert timing.Setting.parse("fp32+eager").flags()[-2:] == ["--cuda_graphs", "off"]  # old command lines
    for bad in ("fp32+compile+graph", "fp32+cg+graph", "fp32+graph+eager", "fp32+cl+cl"):
        with pytest.raises(ValueError):
            timing.Setting.parse(bad)
    head = "resnet32x4:resnet8x4"
    graph = step.priority(head, "wttm", timing.Setting.parse("fp32+graph"), head)
    assert graph == step.priority(head, "wttm", timing.Setting.parse("bf16+cl+compile"), head) == 1
    assert step.priority("vgg13:vgg8", "kd", timing.Setting.parse("fp32+graph"), head) > \
        step.priority("vgg13:vgg8", "kd", timing.Setting.parse("fp32"), head)
    assert cli.GRAPHED == ("fp32+graph", "bf16+cl+graph") and not any("eager" in s for s in cli.PLAIN + cli.COMPILED)


def test_quick_deit_rows(quick):
    _, result, markdown = quick
    section = result["deit"]
    ours, ref = section["augment"]
    assert ours["pipeline"] == "ours: batched tensor ops on cpu" and ref["pipeline"].startswith("reference-style: PIL")
    assert (ours["images"], ref["images"], ref["workers"]) == (4, 4, 1)
    assert all(r["images_per_s"] > 0 and positive(r["s_per_pass"]) for r in section["augment"])
    workers, gpu = section["loader"]
    assert workers["pipeline"].endswith("+ RandAugment + erasing")
    assert (workers["images"], workers["skipped"]) == (8, 0)
    assert gpu["unavailable"] == "unavailable: no CUDA/torchvision"

    (row,) = section["steps"]
    assert (row["pair"], row["method"], row["setting"], row["batch"], row["image_size"]) == \
        (deit.DEIT_PAIR, "vitkd+nkd", "fp32", 2, 224)
    assert positive(row["ms_per_step"]) and math.isfinite(row["loss"])
    assert (row["config"]["distill"], row["config"]["add"], row["config"]["model_t"]) == \
        ("vitkd", "nkd", "deit_small_patch16_224")
    # DeiT-S forward (~4.6 GMAC) + DeiT-Ti forward/backward (3 x ~1.3 GMAC) per image, x2 FLOP/MAC, 2 images
    assert 30e9 < row["flops_per_step"] < 45e9
    assert row["projected_300_epochs_h"] == pytest.approx(300 * 1_281_167 / row["images_per_s"] / 3600)
    known, missing = deit.recipe_flags()
    assert row["argv"][4:4 + len(known)] == known and row["recipe_flags_unknown"] == missing
    assert "| vitkd+nkd | fp32 | 2 |" in markdown and "1252 steps of 1024" in markdown


def test_deit_section_skips_under_the_budget(tmp_path):
    result = cli.main(["--quick", "--device", "cpu", "--out", str(tmp_path), "--budget_s", "0.001",
                       "--sections", "deit", "--deit_methods", "wttm,vitkd+nkd", "--deit_settings", "fp32,bf16"])
    assert result["deit"] == {"augment": [], "loader": [], "steps": []} and result["errors"] == []
    assert result["skipped"] == ["deit augmentation (time budget)", "deit loader (time budget)"] + \
        [f"deit step {m} {s} (time budget)" for m in ("wttm", "vitkd+nkd") for s in ("fp32", "bf16")]
    assert "## DeiT-S → DeiT-Ti training step" in (tmp_path / "benchmark.md").read_text()
