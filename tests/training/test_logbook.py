"""helper/logbook.py on its own: metrics.csv columns and rewriting, the seed's text log, the
rows a resumed run keeps, and TensorBoard failing without stopping the CSV."""
from __future__ import annotations

import warnings

from helper.logbook import Logbook, read_metrics

ROW = {"epoch": 1, "lr": 0.05, "train_loss": 2.5, "train_acc": 10.0, "test_acc": 12.5,
       "test_acc5": 40.0, "test_loss": 2.4, "seconds": 1.0}


def test_rows_columns_and_text_log(tmp_path):
    book = Logbook(str(tmp_path), str(tmp_path / "log.txt"))
    book.log_epoch({**ROW, "loss_ce": 2.5})
    book.log_epoch({**ROW, "epoch": 2, "test_acc": 11.0, "loss_ce": 2.0, "loss_main_kd": 0.5})
    book.close()
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[:8] == list(ROW) and header[8:] == ["loss_ce", "loss_main_kd"]  # extra terms after, sorted
    rows = read_metrics(str(tmp_path / "metrics.csv"))
    assert [r["epoch"] for r in rows] == [1, 2] and "loss_main_kd" not in rows[0]
    assert rows[1]["loss_main_kd"] == 0.5
    assert (tmp_path / "log.txt").read_text() == "12.50\n11.00\nbest: 12.50\n"


def test_a_resumed_book_drops_the_epochs_it_will_write_again(tmp_path):
    book = Logbook(str(tmp_path))
    for epoch in (1, 2, 3):
        book.log_epoch({**ROW, "epoch": epoch})
    resumed = Logbook(str(tmp_path), start_epoch=3)  # the run resumes after epoch 2
    assert [r["epoch"] for r in resumed.rows] == [1, 2]
    resumed.log_epoch({**ROW, "epoch": 3, "test_acc": 50.0})
    assert [r["test_acc"] for r in read_metrics(str(tmp_path / "metrics.csv"))] == [12.5, 12.5, 50.0]


def test_a_broken_tensorboard_warns_once_and_the_csv_goes_on(tmp_path, monkeypatch):
    import torch.utils.tensorboard as tb

    def broken(*args, **kwargs):
        raise RuntimeError("no events today")

    monkeypatch.setattr(tb, "SummaryWriter", broken)
    book = Logbook(str(tmp_path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        book.log_epoch(ROW)
        book.log_epoch({**ROW, "epoch": 2})
    assert sum("TensorBoard logging disabled" in str(w.message) for w in caught) == 1
    assert len(read_metrics(str(tmp_path / "metrics.csv"))) == 2
