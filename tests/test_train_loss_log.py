"""The loss history is appended per step and read back up to a checkpoint's step."""

from __future__ import annotations

import logging

from train.loss_log import LOSS_LOG, LossLog, read_losses


def test_a_resumed_log_keeps_the_last_line_of_each_step_up_to_the_checkpoint(tmp_path, caplog):
    run = tmp_path / "run"
    run.mkdir()
    log = LossLog(str(run))  # a new run
    for step in range(1, 6):
        log.append(step, 1.0 / step)
    (run / "checkpoint-3").mkdir()
    with open(run / LOSS_LOG, "a") as handle:
        handle.write('{"step": 6, "lo')  # cut off by a crash while written
    with caplog.at_level(logging.WARNING, logger="train"):
        assert read_losses(str(run), 3) == [(1, 1.0), (2, 0.5), (3, 1 / 3)]  # steps 4-6 are trained again
    assert "line 6 is not a loss entry" in caplog.text

    resumed = LossLog(str(run), str(run / "checkpoint-3"))  # same directory: appends
    resumed.append(4, 0.1)
    assert read_losses(str(run), 4) == [(1, 1.0), (2, 0.5), (3, 1 / 3), (4, 0.1)]  # the new step 4 wins

    elsewhere = tmp_path / "other"
    elsewhere.mkdir()
    LossLog(str(elsewhere), str(run / "checkpoint-3"), read_losses(str(run), 3))  # another directory: carried
    assert read_losses(str(elsewhere), 3) == read_losses(str(run), 3)
    LossLog(str(run))  # a new run in the same directory starts afresh
    assert (run / LOSS_LOG).read_text() == ""


def test_losses_round_trip_exactly_and_gaps_are_warned(tmp_path, caplog):
    log = LossLog(str(tmp_path))
    values = [0.1 + 0.2, 1e-310, 123456.789e-3]
    for step, value in enumerate(values, start=2):  # step 1 is missing
        log.append(step, value)
    with caplog.at_level(logging.WARNING, logger="train"):
        assert [loss for _, loss in read_losses(str(tmp_path), 4)] == values  # bit for bit
    assert "3 of the 4 steps" in caplog.text
