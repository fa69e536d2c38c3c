"""The ImageNet table as data: the paper's numbers, each cell's flags and sources, the dry run
of ``reproduce.py --table imagenet``, and ``summarize.py`` beside the paper's ImageNet table."""
from __future__ import annotations

import csv
import json
import shlex

import pytest


from paper_tables import recipes_imagenet
from paper_tables.cells import Cell
from train_utils import load_script



reproduce, summarize = load_script("reproduce"), load_script("summarize")
R34, R50 = "resnet34:resnet18", "resnet50:mobilenet_v1"
PAPER = {  # the official README's ImageNet table: teacher, student, then its twelve columns
    R34: [73.31, 69.76, 70.66, 71.17, 71.73, 71.61, 71.68, 71.70, 72.07, 71.98, 71.96, 71.51, 72.17, 72.19],
    R50: [76.16, 68.87, 70.50, 71.37, 72.49, 72.56, None, 72.05, 73.24, 72.77, 72.58, None, 73.02, 73.09],
}
ROWS = ["teacher", "student", "KD", "CRD", "SRRL", "ReviewKD", "ITRD", "DKD", "DIST", "KD++", "NKD", "CTKD",
        "KD-Zero", "WTTM"]
RUNS = ["KD", "CRD", "SRRL", "ReviewKD", "ITRD", "DKD", "DIST", "KD++", "NKD", "CTKD", "WTTM"]
RECIPE = ("--dataset imagenet --batch_size 256 --epochs 100 --learning_rate 0.1 --lr_decay_epochs 30,60,90 "
          "--lr_decay_rate 0.1 --weight_decay 0.0001 --momentum 0.9")


def _cells() -> dict[tuple[str, str], Cell]:
    return {(c.pair, c.method): c for c in recipes_imagenet.load_imagenet_cells()}


def _pairs(flags: list[str]) -> dict[str, str]:
    assert len(flags) % 2 == 0
    return dict(zip(flags[::2], flags[1::2]))


def test_the_table_is_the_papers():
    cells = _cells()
    assert len(cells) == 28 and all(c.table == "imagenet" and c.dataset == "imagenet" for c in cells.values())
    for pair, values in PAPER.items():
        assert [cells[(pair, row)].paper for row in ROWS] == values
    assert {m for (p, m), c in cells.items() if c.default} == set(RUNS)
    for method in ("ITRD", "CTKD"):  # n/a in the paper: opt-in
        assert not cells[(R50, method)].default and "no paper value" in cells[(R50, method)].note
    for pair in (R34, R50):  # no public code: the paper's value only
        zero = cells[(pair, "KD-Zero")]
        assert not zero.runnable and "no public code" in zero.note and "README only" in zero.note
    assert all(c.runs == 1 for c in cells.values())
    assert [c.column for c in (cells[(R34, "KD")], cells[(R50, "KD")])] == [1, 2]


@pytest.mark.parametrize("pair, method, expected", [
    (R34, "KD", "--distill kd --add kd -r 0.5 -a 0.5 -b 0 --kd_T 1"),
    (R50, "KD", "--distill kd --add kd -r 0.5 -a 0.5 -b 0 --kd_T 1"),
    (R34, "WTTM", "--distill wttm -r 1 -a 0 -b 1.6 --ttm_l 0.8"),
    (R50, "WTTM", "--distill wttm -r 1 -a 0 -b 3.5 --ttm_l 0.7"),
    (R34, "DKD", "--distill dkd -r 1 -a 0 -b 1 --dkd_alpha 1 --dkd_beta 0.5 --dkd_T 1 --dkd_warmup 1"),
    (R50, "DKD", "--dkd_beta 2 --dkd_T 1 --dkd_warmup 1"),
    (R34, "DIST", "--distill dist -r 1 -a 0 -b 2 --dist_beta 1 --dist_gamma 1 --dist_tau 1"),
    (R50, "DIST", "--distill dist -r 1 -a 0 -b 2 --dist_beta 1 --dist_gamma 1 --dist_tau 1"),
    (R50, "CRD", "--distill crd -r 1 -a 0 -b 0.8 --feat_dim 128 --mode exact --nce_k 16384 --nce_t 0.07 --nce_m 0.5"),
    (R34, "ITRD", "--distill itrd -r 1 -a 0 -b 1 --lambda_corr 2 --lambda_mutual 1 --alpha_it 1.01"),
    (R34, "student", "--distill kd -r 1 -a 0 -b 0"),
    (R34, "SRRL", "--distill srrl -r 1 -a 0 -b 1 --srrl_w 1"),
    (R50, "SRRL", "--distill srrl -r 1 -a 0 -b 1 --srrl_w 1"),
    (R34, "ReviewKD", "--distill reviewkd -r 1 -a 0 -b 1 --reviewkd_warmup 1"),
    (R50, "ReviewKD", "--distill reviewkd -r 1 -a 0 -b 8 --reviewkd_warmup 1"),
    (R34, "KD++", "--distill kdpp -r 1 -a 0 -b 1 --kdpp_kd 2.5 --kdpp_nd 1 --kdpp_T 1 --kdpp_warmup 5"),
    (R50, "KD++", "--distill kdpp -r 1 -a 0 -b 1 --kdpp_kd 4 --kdpp_nd 1 --kdpp_T 1 --kdpp_warmup 5"),
    (R34, "NKD", "--distill nkd -r 1 -a 0 -b 1 --nkd_T 1 --nkd_gamma 1.5"),
    (R50, "NKD", "--distill nkd -r 1 -a 0 -b 1 --nkd_T 1 --nkd_gamma 1.5 --clip_grad 5"),
    (R34, "CTKD", "--distill dkd -r 1 -a 0 -b 1 --ctkd global --ctkd_t_start 1 --ctkd_t_end 20 "
                  "--ctkd_cosine_epochs 5 --dkd_alpha 1 --dkd_beta 1 --dkd_warmup 0"),
])
def test_cell_flags_are_the_sources_values_under_one_recipe(pair, method, expected):
    cell = _cells()[(pair, method)]
    flags = _pairs(cell.flags())
    assert _pairs(expected.split()).items() <= flags.items()
    assert _pairs(RECIPE.split()).items() <= flags.items()
    assert flags["--model_t"] == pair.split(":")[0]  # torchvision's files carry no architecture
    if method in ("KD", "student"):
        assert ("--add" in flags) == (method == "KD")
    assert ("--clip_grad" in flags) == ((pair, method) == (R50, "NKD"))  # only cls_KD's MobileNet config clips


def test_every_value_names_a_known_source_and_every_key_is_a_flag(tmp_path):
    with open(recipes_imagenet.IMAGENET_JSON, encoding="utf-8") as handle:
        data = json.load(handle)
    tags = set(data["source_tags"])
    specs = list(data["recipe"].values()) + [s for e in data["entries"] for s in e["hyperparameters"].values()]
    assert len(specs) > 140 and all(s["source"] in tags for s in specs)
    assert {e["top1_source"] for e in data["entries"]} <= tags
    for change, message in ((lambda d: d["entries"][2]["hyperparameters"]["kd_T"].update(source="blog"),
                             "cites unknown source 'blog'"),
                            (lambda d: d["recipe"].update(warmup_lr={"value": 0.1, "source": "ours"}),
                             "not train_student.py flags")):
        broken = json.loads(json.dumps(data))
        change(broken)
        path = tmp_path / "broken.json"
        path.write_text(json.dumps(broken))
        with pytest.raises(ValueError, match=message):
            recipes_imagenet.load_imagenet_cells(str(path))


def test_every_imagenet_command_is_one_train_student_accepts():
    from helper.student_flags import build_parser
    parser = build_parser()
    for cell in recipes_imagenet.load_imagenet_cells():
        if cell.runnable:
            args = parser.parse_args(["--path_t", "t.pth", "--model_s", cell.student, *cell.flags()])
            assert args.dataset == "imagenet" and args.epochs == 100 and args.batch_size == 256


def _dry_run(capsys, *argv: str) -> tuple[list[list[str]], str]:
    assert reproduce.main(["--dry-run", *argv]) == 0
    captured = capsys.readouterr()
    return [shlex.split(line) for line in captured.out.splitlines() if line and not line.startswith("#")], \
        captured.out + captured.err


def test_the_dry_run_has_the_default_cells_with_imagenet_teachers_and_data(capsys, tmp_path):
    cmds, text = _dry_run(capsys, "--table", "imagenet", "--data_folder", "/data/ilsvrc",
                          "--teacher_root", str(tmp_path), "--save_root", str(tmp_path / "rep"))
    runs = {c[c.index("--run_name") + 1]: c for c in cmds}
    slug = {"KD++": "KD_plus_plus"}
    assert sorted(runs) == sorted(f"imagenet/{p.replace(':', '-')}/{slug.get(m, m)}/trial_1" for p, m in
                                  [(R34, m) for m in RUNS] +
                                  [(R50, m) for m in RUNS if m not in ("ITRD", "CTKD")])
    wttm = runs["imagenet/resnet34-resnet18/WTTM/trial_1"]
    assert wttm[wttm.index("--path_t") + 1] == str(tmp_path / "resnet34_imagenet" / "resnet34-b627a593.pth")
    assert wttm[wttm.index("--data_folder") + 1] == "/data/ilsvrc" and wttm[1].endswith("train_student.py")
    assert "missing teacher checkpoint(s)" in text and "resnet50-0676ba61.pth" in text
    assert "our choice" in text  # DKD's batch and ITRD's weights are marked
    for note in ("KD_SRRL trains with batch 512 and lr 0.2", "Nesterov", "mmcls's teachers (73.62 / 76.55)",
                 "CTKD trained 120 epochs with its own ResNet-34 teacher (73.96); we run it with torchvision's "
                 "teacher and the table's 100 epochs"):
        assert note in text
    parser = __import__("helper.student_flags", fromlist=["build_parser"]).build_parser()
    for cmd in runs.values():  # every printed command is one train_student.py accepts
        parser.parse(cmd[2:])
    for name in ("imagenet/resnet34-resnet18/DIST/trial_1", "imagenet/resnet50-mobilenet_v1/DIST/trial_1"):
        dist = runs[name]  # resnet_dist.yaml: ori_loss_weight 1, kd_loss_weight 2
        assert " ".join(dist).count(" -r 1 -a 0 -b 2 ") == 1 and dist[dist.index("--dist_tau") + 1] == "1"
    cmds, text = _dry_run(capsys, "--pair", R34, "--method", "WTTM", "--trials", "2")  # --pair finds its table
    assert len(cmds) == 2 and "give --data_folder DIR" in text


def test_a_run_on_several_gpus_goes_through_torchrun(capsys):
    cmds, text = _dry_run(capsys, "--pair", R34, "--method", "WTTM", "--gpus", "cpu", "--gpus_per_run", "2",
                          "--data_folder", "d")
    assert cmds[0][1:7] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            "train_student.py"] and "the CPU (2 processes) ×1 (--device cpu, torchrun)" in text


def test_rows_that_cannot_run_say_why(capsys):
    for argv, message in ((["--table", "imagenet", "--method", "KD-Zero"], "is reported only: KD-Zero has no public code"),
                          (["--pair", "resnet34:resnet50"], "unknown pair"),
                          (["--table", "imagenet", "--method", "teacher"], "not a distillation run")):
        with pytest.raises(SystemExit) as err:
            reproduce.main(["--dry-run", *argv])
        assert err.value.code == 2 and message in capsys.readouterr().err
    for method in ("ITRD", "CTKD"):
        cmds, _ = _dry_run(capsys, "--table", "imagenet", "--method", method, "--data_folder", "d")
        assert len(cmds) == 2  # the opt-in n/a cell on ResNet-50 → MobileNetV1 comes when named


def _trial(root, cell_dir: str, k: int, accs: list[float]) -> None:
    folder = root / "student_model" / cell_dir / f"trial_{k}"
    folder.mkdir(parents=True)
    rows = ["epoch,test_acc"] + [f"{e},{a}" for e, a in enumerate(accs, 1)]
    (folder / "metrics.csv").write_text("\n".join(rows) + "\n")
    (folder / "config.json").write_text(json.dumps({"dataset": "imagenet", "epochs": len(accs)}))
    (folder / "summary.json").write_text(json.dumps({"finished": True, "best_acc": max(accs),
                                                     "last_acc": accs[-1], "epochs": len(accs)}))


def test_the_report_sits_beside_the_papers_imagenet_table(tmp_path, capsys):
    _trial(tmp_path, "imagenet/resnet34-resnet18/WTTM", 1, [60.0, 72.5, 72.25])
    _trial(tmp_path, "imagenet/resnet50-mobilenet_v1/KD", 1, [70.0])
    assert summarize.main(["--save_root", str(tmp_path), "--table", "imagenet", "--no_plots"]) == 0
    out = capsys.readouterr().out
    assert "ImageNet (ILSVRC-2012) (test top-1 %, ImageNet val)" in out
    lines = out.splitlines()
    rows = {line.split()[0]: line for line in lines if line.split() and line.split()[0] in ROWS}
    assert "73.31" in rows["teacher"] and "76.16" in rows["teacher"]
    assert "72.50 ± - (+0.31)" in rows["WTTM"]  # best of one trial, against the paper's 72.19
    assert rows["KD-Zero"].split()[1:] == ["reported", "72.17", "73.02"]
    assert "KD-Zero: reported only: KD-Zero has no public code" in out
    # every column of the paper is shown, run or not: its paper line carries the paper's values
    for method in ("SRRL", "KD++", "NKD", "CTKD"):
        i = next(k for k, line in enumerate(lines) if line.split()[:1] == [method])
        paper = next(line for line in lines[i:] if line.split()[:1] == ["paper"])
        expected = ["n/a" if PAPER[p][ROWS.index(method)] is None else f"{PAPER[p][ROWS.index(method)]:.2f}"
                    for p in (R34, R50)]
        assert [v for v in paper.split()[1:] if v not in ("†", "‡")] == expected  # † our choice, ‡ none
    assert "paper's NKD, ImageNet: the NKD paper (Yang et al., ICCV 2023) run with cls_KD and mmcls's teachers" in out
    # where each shown cell's paper number came from, and the batch said plainly
    assert "paper's WTTM, ImageNet: the TTM paper's own run with torchdistill" in out  # both columns
    assert "paper's KD, ImageNet (resnet50→mobilenet_v1): the ReviewKD paper's table" in out
    assert "Our ImageNet batch is 256 in total" in out
    with open(tmp_path / "report" / "report.csv") as handle:
        report = {(r["student"], r["method"]): r for r in csv.DictReader(handle)}
    assert report[("resnet18", "WTTM")]["table"] == "imagenet" and float(report[("resnet18", "WTTM")]["paper"]) == 72.19
    assert float(report[("mobilenet_v1", "KD")]["diff_last"]) == pytest.approx(70.0 - 70.50)


def test_the_runner_knows_train_student_defaults_per_data_set():
    from helper.common_flags import recipe_of
    from paper_tables.trial_plan import run_values
    for dataset in ("cifar100", "digits", "imagenet"):
        values = run_values(["--dataset", dataset])
        assert (values.epochs, values.batch_size) == (recipe_of(dataset)["epochs"], recipe_of(dataset)["batch_size"])
    assert run_values(["--epochs", "3", "--dataset", "imagenet", "--epochs", "5"]).epochs == 5  # the last wins


def test_every_cell_says_where_the_papers_number_came_from():
    cells = _cells()
    assert all(c.origin for c in cells.values())
    assert "CRD paper" in cells[(R34, "KD")].origin and "71.37" in cells[(R34, "KD")].origin
    assert "CRD paper" in cells[(R34, "CRD")].origin
    for pair in (R34, R50):
        assert "batch 512, lr 0.2" in cells[(pair, "DKD")].origin
        assert "256" in cells[(pair, "ReviewKD")].origin and "lr 0.1" in cells[(pair, "ReviewKD")].origin
        assert "batch 512, lr 0.2" in cells[(pair, "SRRL")].origin and "Nesterov" in cells[(pair, "KD++")].origin
        assert "mmcls's teachers" in cells[(pair, "NKD")].origin
    assert "70.13" in cells[(R50, "DIST")].origin and "-b 2" in cells[(R50, "DIST")].origin
    with open(recipes_imagenet.IMAGENET_JSON, encoding="utf-8") as handle:
        data = json.load(handle)
    notes = " ".join(data["notes"])
    assert "256 in total" in notes and "per process" in notes
    assert "mmcls" in notes and "73.62 / 76.55" in notes and "120 epochs" in notes
    assert "mdistiller's ImageNet sampler" in notes and "without replacement" in notes
    for cell in [c for c in cells.values() if c.method == "DIST"]:
        sources = {spec["source"] for e in data["entries"] if (e["teacher"], e["method"]) == (cell.teacher, "DIST")
                   for spec in e["hyperparameters"].values()}
        assert sources == {"dist-imagenet-config", "dist-official"}
