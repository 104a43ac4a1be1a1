"""The run's metrics: ``RUN/metrics.jsonl`` (mirrored to the trackers), the window of steps
since the last log line, and the record written for a logged step."""

from __future__ import annotations

import datetime
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator

from .. import distributed

if TYPE_CHECKING:
    from .objective import Objective
    from .step import FaultCounter, StepResult


class MetricsWriter:
    """Appends JSON lines to ``RUN/metrics.jsonl`` and mirrors them to the trackers.

    A fresh run (``fresh``) starts the file anew: no lines of an earlier attempt stay in it.
    A resumed run (``keep_until``: the step it resumes from) keeps only the lines up to that
    step: the lines an interrupted attempt wrote after its checkpoint (and a line cut short
    by a kill) are dropped, so every step appears once.
    """

    def __init__(
        self,
        run_dir: Path,
        accelerator: Accelerator,
        fresh: bool = False,
        keep_until: int | None = None,
        clock: Callable[[], float] | None = None,
    ):
        self.path = run_dir / "metrics.jsonl"
        self.accelerator = accelerator
        self.clock = clock  # seconds the run has trained (over every attempt), for each line
        if not accelerator.is_main_process:
            return
        if fresh:
            self.path.write_text("")
        elif keep_until is not None and self.path.exists():
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if _step_of(line) is not None and _step_of(line) <= keep_until
            ]
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            tmp.replace(self.path)

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` with the wall-clock ``time`` (ISO 8601, local time with its UTC
        offset) and, given a clock, ``elapsed_seconds`` of training."""
        if not self.accelerator.is_main_process:
            return
        record = {**record, "time": now()}
        if self.clock is not None:
            record["elapsed_seconds"] = round(self.clock(), 3)
        with self.path.open("a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        self.accelerator.log(scalars, step=record.get("step"))


def now() -> str:
    """The wall-clock time as metrics lines and summaries give it: ISO 8601, to the second,
    local time with its UTC offset."""
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _step_of(line: str) -> int | None:
    """The ``step`` of a metrics line, or None for a line that is not whole JSON."""
    try:
        step = json.loads(line).get("step")
    except (json.JSONDecodeError, AttributeError):
        return None
    return step if isinstance(step, int) else None


class LogWindow:
    """Losses, detection counts and steps since the last log line, and the seconds the step
    waited for the loader in them (``DataClock``)."""

    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []
        self.detection: torch.Tensor | None = None
        self.steps = 0
        self.start = time.perf_counter()
        self.data_wait = 0.0  # waiting for a batch, after an epoch's first
        self.startup = 0.0  # waiting for an epoch's first batch (the workers' start-up)

    def add(self, r: StepResult) -> None:
        self.steps += 1
        self.losses.extend(r.losses)
        for o in r.outputs:
            if o.detection is not None:
                self.detection = (
                    o.detection if self.detection is None else self.detection + o.detection
                )


class DataClock:
    """An epoch's batches, with the time spent waiting for each added to the current log
    window (``window()``): open_clip's ``data_time``. The wait for the epoch's first batch
    (workers starting, shuffle buffers filling) is kept apart as start-up."""

    def __init__(self, batches: Iterator[dict], window: Callable[[], LogWindow]):
        self._batches = batches
        self._window = window
        self._first = True

    def __iter__(self) -> DataClock:
        return self

    def __next__(self) -> dict:
        t = time.perf_counter()
        try:
            return next(self._batches)
        finally:
            waited = time.perf_counter() - t
            if self._first:
                self._window().startup += waited
                self._first = False
            else:
                self._window().data_wait += waited


def log_record(
    *,
    accelerator: Accelerator,
    logit_scale: torch.Tensor,
    objective: Objective,
    tau_group: int | None,
    step: int,
    epoch: int,
    window: LogWindow,
    last: StepResult,
    samples_per_step: int,
    faults: FaultCounter,
    bad: int,
    duplicates: int,
) -> dict[str, Any]:
    """The metrics line of a logged step (collectives inside: every rank calls it).
    ``samples_per_step``: the global batch times the micro-batches of one optimiser step."""
    acc = accelerator
    loss_mean = (
        distributed.all_reduce_sum(torch.stack(window.losses).mean()).item() / acc.num_processes
    )
    wall = time.perf_counter() - window.start
    # seconds per step over the window, less the workers' start-up; the mean over processes
    waits = torch.tensor([window.data_wait, wall - window.startup], dtype=torch.float64)
    data_time, batch_time = (distributed.all_reduce_sum(waits) / acc.num_processes).tolist()
    record = {
        "step": step,
        "epoch": epoch,
        "loss": loss_mean,
        "lr": last.lrs[0],  # the learning rate this step ran with
        "logit_scale": distributed.temperature(logit_scale).detach().exp().item(),
        "samples_per_sec": per_second(window.steps * samples_per_step, wall),
        "data_time": data_time / window.steps,
        "batch_time": batch_time / window.steps,
        **last.outputs[-1].metrics,
    }
    if tau_group is not None:
        record["tau_lr"] = last.lrs[tau_group]
    if window.detection is not None:
        record.update(objective.summarise(distributed.all_reduce_sum(window.detection)))
    record.update(objective.detector_metrics())
    bad = distributed.all_reduce_sum(torch.tensor(bad)).item()
    if bad:
        record["data/skipped"] = bad
    if duplicates:
        record["data/duplicates_in_batch"] = duplicates
    if faults.total:
        record["train/nonfinite_skipped"] = faults.total
    return record


def per_second(samples: float, seconds: float) -> float:
    """Samples a second (the line's ``samples_per_sec``, the epoch's, the summary's)."""
    return samples / max(seconds, 1e-9)
