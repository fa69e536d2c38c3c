"""The stronger-teacher and DeiT tables, and the CIFAR-100 rows beyond the paper: the paper's
numbers, each cell's flags and sources, the dry runs of ``reproduce.py`` and
``summarize.py --paper``."""
from __future__ import annotations

import json
import shlex

import pytest

from paper_tables import recipes, recipes_imagenet
from paper_tables.cells import Cell
from train_utils import load_script

reproduce, summarize = load_script("reproduce"), load_script("summarize")
DEIT = "deit3_small_patch16_224:deit_tiny_patch16_224"
DEIT_PAPER = {"teacher": 82.76, "student": 74.42, "KD": 76.01, "ViTKD": 76.06, "NKD": 76.68, "WTTM": 77.03,
              "NKD+ViTKD": 77.78, "WTTM+ViTKD": 78.04}
DEIT_RECIPE = ("--dataset imagenet --epochs 300 --batch_size 1024 --opt adamw --learning_rate 0.001 "
               "--opt_betas 0.9,0.999 --opt_eps 1e-08 --weight_decay 0.05 --wd_skip norm_bias_tokens --sched cosine "
               "--warmup_epochs 20 --warmup_lr_factor 0.001 --min_lr 1e-05 --clip_grad 5 --smoothing 0.1 "
               "--aa rand-m9-mstd0.5-inc1 --reprob 0.25 --remode pixel --mixup 0 --cutmix 0 "
               "--train_interpolation bicubic --eval_interpolation bicubic --drop_path 0 --teacher_drop_path 0.05 "
               "--model_t deit3_small_patch16_224")
DEIT_METHODS = {
    "KD": "--distill kd --add kd -r 0.5 -a 0.5 -b 0 --kd_T 1",
    "ViTKD": "--distill vitkd -r 1 -a 0 -b 1 --vitkd_alpha 3e-05 --vitkd_beta 3e-06 --vitkd_lambda 0.5",
    "NKD": "--distill nkd -r 1 -a 0 -b 1 --nkd_T 1 --nkd_gamma 1",
    "WTTM": "--distill wttm -r 1 -a 0 -b 1.6 --ttm_l 0.8",
    "NKD+ViTKD": "--distill vitkd --add nkd -r 1 -a 1 -b 1 --nkd_T 1 --nkd_gamma 1 --vitkd_alpha 3e-05",
    "WTTM+ViTKD": "--distill vitkd --add wttm -r 1 -a 1.6 -b 1 --ttm_l 0.8 --vitkd_beta 3e-06",
}
STRONGER = {"resnet34": (73.31, 71.21, 72.07, 72.19), "resnet50": (76.13, 71.35, 72.12, 72.26),
            "resnet101": (77.37, 71.09, 72.08, 72.34), "resnet152": (78.31, 71.12, 72.24, 72.39)}


def _pairs(words: list[str]) -> dict[str, str]:
    """Flags → values; a bare switch maps to ''."""
    out, i = {}, 0
    while i < len(words):
        bare = i + 1 == len(words) or words[i + 1].startswith("-") and not words[i + 1][1:2].isdigit()
        out[words[i]] = "" if bare else words[i + 1]
        i += 1 if bare else 2
    return out


def _dry_run(capsys, *argv: str) -> tuple[list[list[str]], str]:
    assert reproduce.main(["--dry-run", *argv]) == 0
    captured = capsys.readouterr()
    return [shlex.split(line) for line in captured.out.splitlines() if line and not line.startswith("#")], \
        captured.out + captured.err


def _table(path: str) -> dict[tuple[str, str], Cell]:
    return {(c.pair, c.method): c for c in recipes_imagenet.load_imagenet_cells(path)}


def test_the_deit_dry_run_prints_the_six_runs_with_the_cls_kd_recipe(capsys, tmp_path):
    cmds, text = _dry_run(capsys, "--table", "deit", "--data_folder", "/data/ilsvrc", "--teacher_root", str(tmp_path),
                          "--gpus_per_run", "8", "--gpus", "cpu")
    from helper.student_flags import build_parser
    parser = build_parser()
    runs = {c[c.index("--run_name") + 1].split("/")[2]: c for c in cmds}
    assert sorted(runs) == sorted(m.replace("+", "_plus_") for m in DEIT_METHODS)
    for method, expected in DEIT_METHODS.items():
        cmd = runs[method.replace("+", "_plus_")]
        assert cmd[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "8"]
        argv = cmd[cmd.index("train_student.py") + 1:]
        flags = _pairs(argv)
        assert _pairs(expected.split()).items() <= flags.items(), method
        assert _pairs(DEIT_RECIPE.split()).items() <= flags.items(), method
        assert flags["--teacher_train_mode"] == "" and flags["--model_s"] == "deit_tiny_patch16_224"
        assert flags["--path_t"].endswith("deit3_small_patch16_224_imagenet/"
                                          "deit3-small-p16_in21k-pre_3rdparty_in1k_20221009-dcd90827.pth")
        values, _ = parser.parse(argv)  # every printed flag is one of train_student.py's
        assert values["teacher_train_mode"] is True and values["epochs"] == 300
    assert "--deit for the DeiT III-S teacher" in text
    assert "the paper lists no transformer gamma/beta" in text  # WTTM's values are marked ours


def test_the_deit_table_is_the_papers_and_every_value_is_sourced():
    cells = _table(recipes_imagenet.DEIT_JSON)
    assert {m: cells[(DEIT, m)].paper for m in DEIT_PAPER} == DEIT_PAPER
    assert {m for (_, m), c in cells.items() if c.default} == set(DEIT_METHODS)
    data = json.loads(open(recipes_imagenet.DEIT_JSON, encoding="utf-8").read())
    tags = data["source_tags"]
    specs = list(data["recipe"].values()) + [s for e in data["entries"] for s in e["hyperparameters"].values()]
    assert all(s["source"] in tags for s in specs)
    for tag in ("clskd-deit-config", "clskd-deit-base", "clskd-schedule", "clskd-data", "clskd-distiller"):
        assert "yzd-v/cls_KD branch 1.0 (1e5d48f36957ee460d39d7ebc592c6cc7f8f3d66)" in tags[tag]
    notes = " ".join(data["notes"])
    assert "never applies the student's batch augments" in notes and "never puts its teacher back into eval" in notes
    wttm = [e for e in data["entries"] if e["method"] in ("WTTM", "WTTM+ViTKD")]
    assert all(e["hyperparameters"]["ttm_l"]["source"] == "ttm-paper-table10" and "our choice" in e["note"]
               for e in wttm)


def test_the_stronger_teacher_table_shares_its_resnet34_runs(capsys, tmp_path):
    cells = _table(recipes_imagenet.TEACHERS_JSON)
    for teacher, (top1, kd, dist, wttm) in STRONGER.items():
        pair = f"{teacher}:resnet18"
        assert [cells[(pair, m)].paper for m in ("teacher", "KD", "DIST", "WTTM")] == [top1, kd, dist, wttm]
        flags = _pairs(cells[(pair, "WTTM")].flags())
        assert (flags["--ttm_l"], flags["-b"], flags["--batch_size"], flags["--epochs"]) == ("0.8", "1.6", "256", "100")
    cmds, text = _dry_run(capsys, "--table", "imagenet-teachers", "--data_folder", "d", "--teacher_root", str(tmp_path))
    names = [c[c.index("--run_name") + 1] for c in cmds]
    assert len(names) == 12 and sorted(n for n in names if "resnet34" in n) == \
        [f"imagenet/resnet34-resnet18/{m}/trial_1" for m in ("DIST", "KD", "WTTM")]
    assert "resnet101_imagenet/resnet101-63fe2227.pth" in text and "resnet152-394f9c45.pth" in text
    cmds, _ = _dry_run(capsys, "--table", "imagenet", "--table", "imagenet-teachers", "--data_folder", "d")
    names = [c[c.index("--run_name") + 1] for c in cmds]
    assert len(names) == len(set(names)) == 20 + 12 - 3  # the shared runs are planned once


def test_a_shared_run_with_other_flags_is_refused(tmp_path, monkeypatch):
    data = json.loads(open(recipes_imagenet.TEACHERS_JSON, encoding="utf-8").read())
    kd = next(e for e in data["entries"] if e["method"] == "KD" and e.get("same_run_as"))
    kd["hyperparameters"]["kd_T"]["value"] = 4.0
    path = tmp_path / "teachers.json"
    path.write_text(json.dumps(data))
    monkeypatch.setattr(recipes_imagenet, "TABLE_FILES", (recipes_imagenet.IMAGENET_JSON, str(path)))
    recipes_imagenet.load_imagenet_tables.cache_clear()
    try:
        with pytest.raises(ValueError, match="shares the runs of imagenet, whose cell runs other flags"):
            recipes_imagenet.load_imagenet_tables()
    finally:
        recipes_imagenet.load_imagenet_tables.cache_clear()


@pytest.mark.parametrize("method, pairs, expected", [
    ("ReviewKD", {"resnet56:resnet20": "0.6", "resnet110:resnet32": "1", "resnet32x4:ShuffleV2": "8",
                  "wrn_40_2:wrn_16_2": "5"}, "--distill reviewkd -r 1 -a 0 --reviewkd_warmup 20"),
    ("KD++", {"resnet32x4:resnet8x4": "3.5", "ResNet50:MobileNetV2": "3"}, "--distill kdpp -b 1 --kdpp_T 4"),
    ("CTKD", {"vgg13:vgg8": None, "resnet110:resnet20": None},
     "--distill kd --add kd -r 0.1 -a 0.9 -b 0 --kd_T 4 --ctkd global --ctkd_cosine_epochs 10"),
])
def test_cifar_rows_beyond_the_paper_run_only_when_named(capsys, method, pairs, expected):
    cmds, text = _dry_run(capsys, "--table", "1", "--table", "2", "--method", method, "--trials", "1")
    runs = {c[c.index("--path_t") + 1].split("/")[-2].replace("_vanilla", "") + ":" + c[c.index("--model_s") + 1]: c
            for c in cmds}
    assert set(pairs) <= set(runs) and "beyond the paper" in text
    for pair, weight in pairs.items():
        flags = _pairs(runs[pair])
        assert _pairs(expected.split()).items() <= flags.items()
        assert weight is None or flags["-b" if method == "ReviewKD" else "--kdpp_kd"] == weight
    cells = [c for c in recipes.all_cells() if c.method == method and isinstance(c.table, int)]
    assert cells and not any(c.default or c.paper is not None for c in cells)
    default, _ = _dry_run(capsys, "--table", "1")
    assert not any(method.replace("+", "_plus_") in " ".join(c) for c in default)


def test_methods_takes_a_list_and_nkd_on_cifar_says_why(capsys):
    cmds, _ = _dry_run(capsys, "--table", "1", "--methods", "ReviewKD,KD++", "--methods", "CTKD", "--trials", "1")
    assert {c[c.index("--run_name") + 1].split("/")[2] for c in cmds} == {"ReviewKD", "KD_plus_plus", "CTKD"}
    with pytest.raises(SystemExit) as err:
        reproduce.main(["--dry-run", "--table", "1", "--method", "NKD"])
    assert err.value.code == 2 and "mmcls's CIFAR ResNet-34 -> ResNet-18" in capsys.readouterr().err


def test_summarize_paper_prints_every_column_with_its_source(capsys):
    assert summarize.main(["--paper", "--table", "imagenet", "--table", "deit", "--table", "imagenet-teachers"]) == 0
    out = capsys.readouterr().out
    rows: dict[str, list[str]] = {}
    for line in out.splitlines():  # a method's first line is its grid row; its source lines follow later
        if line.split():
            rows.setdefault(line.split()[0], line.split()[1:])
    assert rows["SRRL"] == ["71.73", "72.49", "runs"] and rows["CTKD"] == ["71.51", "n/a", "runs"]
    assert rows["KD-Zero"] == ["72.17", "73.02", "reported", "only"]
    assert rows["WTTM+ViTKD"] == ["78.04", "runs"]
    for source in ("NKD (resnet50→mobilenet_v1): paper's value from the NKD paper", "KD_SRRL",
                   "KD-Zero has no public code", "hunto/DIST_KD README", "cls_KD 1.0's distiller never applies"):
        assert source in out
    assert summarize.main(["--paper", "--table", "imagenet_teachers"]) == 0
    dist = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("DIST "))
    assert dist.split()[1:] == ["72.07", "72.12", "72.08", "72.24", "runs"]
