"""Where a step's time goes: ``DataClock`` counts the wait for batches into the log window
(the epoch's first batch apart, as start-up), and the run warns once when loader workers
starve the model two log windows in a row."""

from __future__ import annotations

import logging
import time

from clipfnd.config import Config
from clipfnd.train.loop import data_starved, warn_data_wait
from clipfnd.train.metrics import DataClock, LogWindow


def _slow(waits):
    for w in waits:
        time.sleep(w)
        yield {"image": None}


def test_the_clock_counts_waits_into_the_current_window():
    windows = [LogWindow()]
    clock = DataClock(_slow([0.15, 0.05, 0.05, 0.0]), lambda: windows[-1])
    next(clock)
    assert windows[0].startup >= 0.15 and windows[0].data_wait < 0.05
    next(clock)
    windows.append(LogWindow())  # a log line: the next waits go to the new window
    next(clock), next(clock)
    assert 0.05 <= windows[0].data_wait < 0.15
    assert 0.05 <= windows[1].data_wait < 0.15 and windows[1].startup == 0.0
    assert sum(1 for _ in clock) == 0


def test_starved_past_a_quarter_with_workers_and_the_warning_names_the_keys(caplog):
    cfg = Config()
    assert cfg.data.num_workers > 0
    assert not data_starved(cfg, {"data_time": 0.2, "batch_time": 1.0})
    assert data_starved(cfg, {"data_time": 0.4, "batch_time": 1.0})
    cfg.data.num_workers = 0  # loading in the training process: a choice, not a fault
    assert not data_starved(cfg, {"data_time": 0.9, "batch_time": 1.0})
    with caplog.at_level(logging.WARNING):
        warn_data_wait(cfg, {"data_time": 0.4, "batch_time": 1.0})
    (rec,) = caplog.records
    assert "40%" in rec.getMessage() and "data.num_workers" in rec.getMessage()
