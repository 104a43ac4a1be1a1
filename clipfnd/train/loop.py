"""The training recipe, top to bottom: ``build_run`` -> resume -> epochs of optimiser steps
(logging, checkpoints, periodic evaluation) -> ``finish`` (final checkpoint, evaluation,
summary).

Launch it with ``clipfnd train CONFIG.yaml [key=value ...]`` (one process) or
``accelerate launch [flags] -m clipfnd train CONFIG.yaml ...`` (many). On a machine
without CUDA the processes form a real gloo group on the CPU.

Where the rest lives: building the run in ``build.py``; the step (forward, objective, finite
check, backward, commit) in ``step.py``; the loss of a batch in ``objective.py`` (methods and
detectors behind it); ``save`` and ``resume`` in ``save_resume.py``; the metrics line and its
window in ``metrics.py``; learning-rate schedules in ``schedule.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from clipfnd_eval.features import encode_dataset
from clipfnd_eval.layouts import open_dataset
from clipfnd_eval.processes import Processes
from clipfnd_eval.run import EvalModel, EvalOptions, run_eval
from data_pipelines.loader import EpochIterator, LoaderState

from .. import distributed
from ..checkpoints import find_latest
from ..config import Config, eval_tasks
from ..models.vision import Projections
from ..plots import PlotWriter
from . import save_resume as ckpt
from .build import Run, build_run
from .metrics import DataClock, LogWindow, MetricsWriter, log_record, now, per_second
from .schedule import optimizer_steps_in_epoch
from .step import FaultCounter, NonFiniteError, StepResult

__all__ = ["NonFiniteError", "Run", "build_run", "train"]

log = logging.getLogger("clipfnd.train")


@dataclass
class RunCounters:
    """Counters of a run, carried from step to step (and, through the checkpoint's
    ``counters``, from an interrupted attempt to its resume)."""

    step: int
    start_step: int
    faults: FaultCounter = field(default_factory=FaultCounter)
    window: LogWindow = field(default_factory=LogWindow)
    bad_samples: int = 0  # this process's, in finished epochs (rank 0: plus those resumed)
    duplicates: int = 0
    last_record: dict[str, Any] = field(default_factory=dict)
    last_eval: tuple[int, dict[str, float]] = (-1, {})  # (step, results) of the latest eval
    warned_data_wait: bool = False
    starved_windows: int = 0  # log windows in a row where the loader starved the step
    started: float = field(default_factory=time.perf_counter)
    elapsed_before: float = 0.0  # seconds the run trained before this attempt (resumed)

    @classmethod
    def resumed(cls, r: ckpt.Resumed, main: bool) -> RunCounters:
        c = r.counters
        run = cls(step=r.step, start_step=r.step)
        run.bad_samples = int(c.get("skipped_samples", 0)) if main else 0
        run.duplicates = int(c.get("duplicate_samples", 0))
        run.faults.total = int(c.get("nonfinite_steps_skipped", 0))
        run.elapsed_before = float(c.get("elapsed_seconds", 0.0))
        return run

    def elapsed(self) -> float:
        """Seconds spent training, over every attempt of the run."""
        return self.elapsed_before + time.perf_counter() - self.started


def train(cfg: Config) -> dict[str, Any]:
    """Run the recipe of ``cfg``: build, resume, train, finish. From the moment the run folder
    is claimed, rank 0 also writes every log line to ``RUN/train.log`` (and, when the run
    stops on an error, the error)."""
    s = build_run(cfg)
    run_log = RunLog(s.run_dir, enabled=s.accelerator.is_main_process)
    try:
        return _train(cfg, s)
    except BaseException as e:
        run_log.line(f"clipfnd: error: {e}" if str(e) else f"clipfnd: {type(e).__name__}")
        raise
    finally:
        run_log.close()


def _train(cfg: Config, s: Run) -> dict[str, Any]:
    resumed = ckpt.resume(
        cfg, s.accelerator, s.run_dir, s.stateful(), s.stream, s.fresh_hyperparameters
    )
    run = RunCounters.resumed(resumed, s.accelerator.is_main_process)
    metrics = MetricsWriter(
        s.run_dir, s.accelerator, fresh=run.step == 0, keep_until=run.step, clock=run.elapsed
    )
    plots = PlotWriter(s.run_dir, enabled=cfg.train.plots and s.accelerator.is_main_process)
    bar = tqdm(
        total=s.total_steps,
        initial=run.step,
        desc="train",
        unit="step",
        disable=not show_progress(cfg, s),
    )
    start_epoch = resumed.epoch
    epoch, it = start_epoch, None
    last_epoch = cfg.train.epochs if run.step < s.total_steps else start_epoch
    with logging_redirect_tqdm() if not bar.disable else contextlib.nullcontext():
        for epoch in range(start_epoch, last_epoch):
            state = resumed.loader if epoch == start_epoch else None
            started = start_epoch_hooks(cfg, s, epoch, fresh=state is None or state.batches == 0)
            if started:
                metrics.write({"step": run.step, "epoch": epoch, **started})
            it = s.stream.epoch(epoch, state)
            epoch_start, batches_before = time.perf_counter(), it.batches
            train_epoch(cfg, s, run, it, epoch, metrics, bar)
            report_bad_samples(s, run, it, epoch)
            record = epoch_data_record(cfg, s, run, it, epoch)
            samples = (it.batches - batches_before) * cfg.data.batch_size
            record["epoch_seconds"] = time.perf_counter() - epoch_start
            record["epoch_samples_per_sec"] = per_second(samples, record["epoch_seconds"])
            metrics.write(record)
            anchors = per_anchor_record(cfg, s)
            if anchors:
                metrics.write({"step": run.step, "epoch": epoch, **anchors})
            calibration = s.objective.detector.epoch_report()  # every rank: it resets counts
            if calibration and s.accelerator.is_main_process:
                log.warning("%s", calibration)
            if s.accelerator.is_main_process:
                log.info(
                    "epoch %d done: %d samples in %.1f s (%.1f samples/s), %d skipped as bad; "
                    "step %d of %d",
                    epoch,
                    samples,
                    record["epoch_seconds"],
                    record["epoch_samples_per_sec"],
                    record["data/skipped"],
                    run.step,
                    s.total_steps,
                )
            every = cfg.eval.every_epochs
            if every and (epoch + 1) % every == 0 and cfg.data.val and run.last_eval[0] != run.step:
                evaluate_now(cfg, s, run, epoch, metrics)
            plots.request()  # drawn in the background on rank 0
            if run.step >= s.total_steps:
                break
    bar.close()
    return finish(cfg, s, run, epoch, it, metrics, plots)


class RunLog:
    """``RUN/train.log``: the run's log lines as the console shows them (rank 0; progress bars
    never go there), appended to across resumes, with a line that marks each start."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.handler: logging.Handler | None = None
        if not enabled:
            return
        from data_pipelines.urls import RedactingFilter

        self.handler = logging.FileHandler(run_dir / "train.log", encoding="utf-8")
        self.handler.addFilter(RedactingFilter())  # no credential in a line written down
        console = next((h for h in logging.getLogger().handlers if h.formatter is not None), None)
        self.handler.setFormatter(
            console.formatter
            if console is not None
            else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        )
        logging.getLogger().addHandler(self.handler)
        self.line(f"=== {time.strftime('%Y-%m-%d %H:%M:%S %z')}: clipfnd train in {run_dir} ===")

    def line(self, text: str) -> None:
        """Write ``text`` to the file only (what the console shows by other means)."""
        if self.handler is not None:
            self.handler.stream.write(text.rstrip("\n") + "\n")
            self.handler.flush()

    def close(self) -> None:
        if self.handler is not None:
            logging.getLogger().removeHandler(self.handler)
            self.handler.close()
            self.handler = None


def show_progress(cfg: Config, s: Run) -> bool:
    """Progress bars on rank 0, and only on a terminal: redirected to a file, a bar's
    carriage-return updates would fill the log (the log lines say the same there)."""
    return bool(cfg.train.progress and s.accelerator.is_main_process and sys.stderr.isatty())


def start_epoch_hooks(cfg: Config, s: Run, epoch: int, fresh: bool) -> dict[str, float]:
    """The detector's epoch start (IFND clusters the training set here): the columns it hands
    back are written into the tables, and what it reports (e.g. the accepted share) becomes a
    metrics line of its own."""
    t0 = time.perf_counter()
    start = s.objective.detector.start_epoch(epoch, lambda: embed_training_set(cfg, s), fresh)
    start.write(s.tables)
    out = dict(start.metrics)
    if out:
        out["fnd/epoch_start_seconds"] = time.perf_counter() - t0
    return out


def train_epoch(
    cfg: Config,
    s: Run,
    run: RunCounters,
    it: EpochIterator,
    epoch: int,
    metrics: MetricsWriter,
    bar: tqdm,
) -> None:
    """Optimiser steps over whole windows of ``optim.accum_steps`` micro-batches of the epoch.
    Too many non-finite steps in a row stop the run: the loop keeps (or writes) a checkpoint
    of the last good weights and names it."""
    k = cfg.optim.accum_steps
    usable = optimizer_steps_in_epoch(s.stream, epoch, k) * k  # micro-batches this epoch uses
    batches = DataClock(iter(it), lambda: run.window)
    s.model.train()
    while it.batches + k <= usable and run.step < s.total_steps:
        logged = (run.step + 1) % cfg.train.log_every == 0 or run.step + 1 == s.total_steps
        r = s.optimizer_step(batches, epoch, logged)
        if r.status == "no_data":
            return
        if r.status == "skipped":
            run.faults.skip(run.step, epoch)
            if run.faults.in_a_row >= cfg.train.max_nonfinite_steps:
                # the weights are still those of the last good step: keep them if none is kept
                latest = find_latest(s.run_dir) or save_checkpoint(cfg, s, run, epoch, it)
                raise NonFiniteError(run.faults.message(cfg, run.step, latest))
            continue
        run.faults.ok()
        run.step += 1
        run.window.add(r)
        run.duplicates += sum(o.duplicates for o in r.outputs)
        bar.update(1)
        if r.events:  # e.g. the step masking started at: a line of its own, whatever log_every
            metrics.write({"step": run.step, "epoch": epoch, **r.events})
        after_step(cfg, s, run, it, epoch, r, metrics, bar)


def save_checkpoint(
    cfg: Config, s: Run, run: RunCounters, epoch: int, it: EpochIterator | None
) -> Path | None:
    """A checkpoint of the run as it stands, with its counters (every process calls it)."""
    state = it.state() if it is not None else LoaderState(epoch=epoch)
    finished_bad = distributed.all_reduce_sum(torch.tensor(run.bad_samples)).item()
    counters = {
        "skipped_samples": int(finished_bad),
        "duplicate_samples": run.duplicates,
        "nonfinite_steps_skipped": run.faults.total,
        "elapsed_seconds": run.elapsed(),
    }
    return ckpt.save(cfg, s.accelerator, s.run_dir, s.stateful(), run.step, epoch, state, counters)


def after_step(
    cfg: Config,
    s: Run,
    run: RunCounters,
    it: EpochIterator,
    epoch: int,
    r: StepResult,
    metrics: MetricsWriter,
    bar: tqdm,
) -> None:
    """The log line, the checkpoint and the evaluation that fall due at ``run.step``."""
    step = run.step
    if step % cfg.train.log_every == 0 or step == s.total_steps:
        record = log_record(
            accelerator=s.accelerator,
            logit_scale=s.accelerator.unwrap_model(s.model).logit_scale,
            objective=s.objective,
            tau_group=s.tau_group,
            step=step,
            epoch=epoch,
            window=run.window,
            last=r,
            samples_per_step=cfg.data.batch_size * cfg.optim.accum_steps,
            faults=run.faults,
            bad=run.bad_samples + sum(it.bad.values()),
            duplicates=run.duplicates,
        )
        metrics.write(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}")
        if s.accelerator.is_main_process:
            log_progress(cfg, s, it, epoch, record)
            # once, and only when two windows in a row starve (not a start-up hiccup)
            run.starved_windows = run.starved_windows + 1 if data_starved(cfg, record) else 0
            if run.starved_windows == 2 and not run.warned_data_wait:
                warn_data_wait(cfg, record)
                run.warned_data_wait = True
        run.last_record, run.window = record, LogWindow()
    if (
        cfg.train.checkpoint_every
        and step % cfg.train.checkpoint_every == 0
        and step < s.total_steps
    ):
        save_checkpoint(cfg, s, run, epoch, it)
    if cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and cfg.data.val:
        evaluate_now(cfg, s, run, epoch, metrics)
    every = cfg.fnd.calibration_every
    if every and step % every == 0 and step < s.total_steps:
        anchors = per_anchor_record(cfg, s)
        if anchors:
            metrics.write({"step": step, "epoch": epoch, **anchors})


def log_progress(
    cfg: Config, s: Run, it: EpochIterator, epoch: int, record: dict[str, Any]
) -> None:
    """(Main process.) The log line of a logged step."""
    B = cfg.data.batch_size * cfg.optim.accum_steps
    planned = optimizer_steps_in_epoch(s.stream, epoch, cfg.optim.accum_steps) * B
    seen = it.batches * cfg.data.batch_size
    log.info(
        "epoch %d [%d/%d samples, %.0f%%] step %d/%d: loss %.4f, lr %.3g, %.1f samples/s",
        epoch,
        seen,
        planned,
        100.0 * seen / max(planned, 1),
        record["step"],
        s.total_steps,
        record["loss"],
        record["lr"],
        record["samples_per_sec"],
    )


DATA_WAIT_SHARE = 0.25  # of the step's time, beyond which the loader is said to starve it


def data_starved(cfg: Config, record: dict[str, Any]) -> bool:
    """The step waited on loader workers more than a quarter of its time over the logged
    window (with ``data.num_workers=0`` loading in the training process is a choice, and
    ``data_time`` shows its cost)."""
    waited = record["data_time"] > DATA_WAIT_SHARE * record["batch_time"]
    return cfg.data.num_workers > 0 and waited


def warn_data_wait(cfg: Config, record: dict[str, Any]) -> None:
    """(Main process.) The warning of a starved step, with the keys that help."""
    share = record["data_time"] / max(record["batch_time"], 1e-9)
    log.warning(
        "the model waited for data %.0f%% of the time over the last %d step(s) (data_time "
        "%.3f s of batch_time %.3f s a step): the loader does not keep up. Raise "
        "data.num_workers (now %d; this machine has %d CPU cores), check that /dev/shm and "
        "the shards' disk or network are not the limit, or lower data.shuffle_buffer if the "
        "wait is the buffer filling. benchmarks/loader.py measures the loader alone.",
        100 * share,
        cfg.train.log_every,
        record["data_time"],
        record["batch_time"],
        cfg.data.num_workers,
        os.cpu_count() or 1,
    )


def evaluate_now(
    cfg: Config, s: Run, run: RunCounters, epoch: int, metrics: MetricsWriter
) -> dict[str, float]:
    """Evaluate the model as it is at ``run.step``, keep the results as the latest and write
    their metrics line (``val/`` keys)."""
    results = evaluate(cfg, s, run.step, epoch)
    run.last_eval = (run.step, results)
    metrics.write({"step": run.step, "epoch": epoch, **{f"val/{k}": v for k, v in results.items()}})
    return results


def report_bad_samples(s: Run, run: RunCounters, it: EpochIterator, epoch: int) -> None:
    """Each process reports the bad samples of the shards it read in ``epoch``."""
    run.bad_samples += sum(it.bad.values())
    if it.bad:
        per_shard = {f"{Path(sh).name}: {why}": n for (sh, why), n in sorted(it.bad.items())}
        log.warning(
            "epoch %d: process %d skipped %d bad samples: %s",
            epoch,
            s.accelerator.process_index,
            sum(it.bad.values()),
            per_shard,
        )


def epoch_data_record(
    cfg: Config, s: Run, run: RunCounters, it: EpochIterator, epoch: int
) -> dict[str, Any]:
    """What became of the epoch's samples, over all processes: used in batches, skipped as bad
    (a shard that cannot be read counts once per read error), and not used (unreadable parts
    of shards, the last partial batch, micro-batches that fill no optimiser step, and samples
    left out to keep processes equal). Logged as a warning when more were lost than the
    epoch's plan leaves out; an epoch that ``train.max_steps`` cut short says so in a line of
    its own instead."""
    used = it.batches * s.stream.local_batch_size
    totals = distributed.all_reduce_sum(
        torch.tensor([used, sum(it.bad.values())], dtype=torch.float64)
    ).tolist()
    used, skipped = int(totals[0]), int(totals[1])
    record = {"step": run.step, "epoch": epoch, "data/used": used, "data/skipped": skipped}
    if not cfg.data.resampled:
        not_used = s.stream.num_samples - used - skipped
        record["data/not_used"] = not_used
        k = cfg.optim.accum_steps
        usable = optimizer_steps_in_epoch(s.stream, epoch, k) * k
        planned = s.stream.num_samples - usable * cfg.data.batch_size
        cut = run.step >= s.total_steps and it.batches < usable
        if s.accelerator.is_main_process and cut:
            log.info(
                "epoch %d: the run reached its last step (%d; train.max_steps=%s) after %d of "
                "the epoch's %d batches; %d samples were not used",
                epoch,
                s.total_steps,
                cfg.train.max_steps,
                it.batches,
                usable,
                not_used,
            )
        if s.accelerator.is_main_process and (skipped or (not cut and not_used > planned)):
            log.warning(
                "epoch %d: %d of %d samples used, %d skipped as bad, %d not used (the plan "
                "leaves out %d: the last partial batch, micro-batches that fill no optimiser "
                "step, and uneven shards across processes)",
                epoch,
                used,
                s.stream.num_samples,
                skipped,
                not_used,
                planned,
            )
    return record


def finish(
    cfg: Config,
    s: Run,
    run: RunCounters,
    epoch: int,
    it: EpochIterator | None,
    metrics: MetricsWriter,
    plots: PlotWriter | None = None,
) -> dict[str, Any]:
    """The final checkpoint and evaluation, the final plots, and ``RUN/summary.json``."""
    acc = s.accelerator
    train_time = time.perf_counter() - run.started
    final = (
        save_checkpoint(cfg, s, run, epoch, it)
        if run.step > run.start_step
        else find_latest(s.run_dir)
    )
    results: dict[str, float] = {}
    if cfg.eval.at_end and cfg.data.val:
        fresh = run.last_eval[0] == run.step
        results = run.last_eval[1] if fresh else evaluate_now(cfg, s, run, epoch, metrics)
    if plots is not None:
        plots.close()
    B = cfg.data.batch_size
    summary = {
        "run_dir": str(s.run_dir),
        "checkpoint": str(final) if final else None,
        "steps": run.step,
        "epochs": epoch + 1,
        "processes": acc.num_processes,
        "global_batch_size": B,
        "samples_per_sec": per_second(
            (run.step - run.start_step) * B * cfg.optim.accum_steps, train_time
        ),
        "loss": run.last_record.get("loss"),
        "skipped_samples": int(distributed.all_reduce_sum(torch.tensor(run.bad_samples)).item()),
        "nonfinite_steps_skipped": run.faults.total,
        "duplicate_samples": run.duplicates,
        "fnd_mask_start_step": s.objective.detector.masked_from,
        "eval": results,
        "time": now(),
        "elapsed_seconds": run.elapsed(),
    }
    if acc.is_main_process:
        ckpt.write_json(s.run_dir / "summary.json", summary)
    acc.end_training()
    if s.lock is not None:
        s.lock.release()
    return summary


def evaluate(cfg: Config, s: Run, step: int, epoch: int) -> dict[str, float]:
    """``eval.tasks`` on ``data.val`` with the model as it is now, on every process (each
    encodes a slice; the metrics are those of the whole split). Keys: retrieval's are bare
    (``i2t_R@1``, ...), the others get a ``TASK/`` prefix (``zeroshot/top1``, ``knn/top1``,
    ``linear-probe/top1``). kNN and the linear probe fit on ``data.train``'s images."""
    acc = s.accelerator
    model = acc.unwrap_model(s.model)
    live = EvalModel(
        dataclasses.replace(s.bundle, model=model),
        {"run_dir": str(s.run_dir), "step": step, "epoch": epoch, "model_name": cfg.model.name},
    )
    processes = Processes(acc.process_index, acc.num_processes, acc.device)
    results: dict[str, float] = {}
    for task in eval_tasks(cfg):
        opts = EvalOptions(
            task=task,
            data=cfg.data.val,
            train_data=cfg.data.train if task in ("knn", "linear-probe") else None,
            classnames=cfg.eval.classnames if task == "zeroshot" else None,
            batch_size=cfg.eval.batch_size,
            num_workers=cfg.eval.num_workers,
            progress=show_progress(cfg, s),
        )
        out = run_eval(live, opts, processes)
        prefix = "" if task == "retrieval" else f"{task}/"
        results.update({f"{prefix}{k}": v for k, v in out.get("metrics", {}).items()})
    model.train()
    return distributed.broadcast_object(results)


_BANKS: dict[str, list] = {}  # data.train -> the calibration bank's samples (read once)


def per_anchor_record(cfg: Config, s: Run) -> dict[str, float]:
    """GloFND's per-anchor calibration now (docs/methods.md, "Per-anchor calibration"): the
    first ``fnd.calibration_bank`` readable training samples encoded un-augmented by the model
    as it is, and ``fnd.calibration_anchors`` of them (fixed by the seed; those whose threshold
    has been set) measured against all of them. Every process computes the same numbers (the
    same bank, the same weights; under FSDP every rank takes part in each forward)."""
    det = s.objective.detector
    if det.name != "glofnd" or not cfg.fnd.calibration_bank or not cfg.fnd.calibration_anchors:
        return {}
    from .sharded import is_sharded

    if is_sharded(s.accelerator):  # the towers' forward outside a step: not under FSDP yet
        if not getattr(s, "_said_no_calibration", False) and s.accelerator.is_main_process:
            log.info("GloFND per anchor: not measured under FSDP (fnd.calibration_bank)")
        s._said_no_calibration = True
        return {}
    from clipfnd_eval.samples import collect, encode

    from ..fnd.per_anchor import columns_of, from_tables

    t0 = time.perf_counter()
    key = f"{cfg.data.train}:{cfg.fnd.calibration_bank}"
    if key not in _BANKS:
        ds = open_dataset(cfg.data.train, default_split="train")
        bank = collect(ds, cfg.fnd.calibration_bank, cfg.mode == "clip", warn=False)[0]
        # samples with a row in the tables (a bad index is the loader's to report)
        _BANKS[key] = [x for x in bank if 0 <= x.index < s.tables.num_rows]
    acc = s.accelerator
    model = acc.unwrap_model(s.model)
    bundle = dataclasses.replace(s.bundle, model=model)
    feats, kept, _ = encode(
        bundle, cfg.mode, _BANKS[key], cfg.eval.batch_size, acc.device, False, warn=False
    )
    model.train()
    if len(kept) < 2:
        return {}
    index = torch.tensor([x.index for x in kept], device=acc.device)
    g = torch.Generator().manual_seed(cfg.seed)
    pick = torch.randperm(len(kept), generator=g)[: cfg.fnd.calibration_anchors].sort().values
    out = from_tables(feats, columns_of(cfg.mode), index, pick, s.tables, det.offsets, det.alpha)
    if out and acc.is_main_process:
        log.info(
            "GloFND per anchor: %s within 0.5-2 x fnd.alpha of their own negatives (one global "
            "threshold flagging as many: %s; %d-sample bank, %.1f s)",
            ", ".join(
                f"{out[f'fnd/anchors_{t}_within']:.0%} of {t} anchors"
                for t in columns_of(cfg.mode)
                if f"fnd/anchors_{t}_within" in out
            ),
            ", ".join(
                f"{out[f'fnd/anchors_{t}_within_global']:.0%}"
                for t in columns_of(cfg.mode)
                if f"fnd/anchors_{t}_within" in out
            ),
            len(kept),
            time.perf_counter() - t0,
        )
    return out


def embed_training_set(cfg: Config, s: Run) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dataset index [N'], normalised projections [N', d])`` of every readable training
    image, un-augmented; every process encodes a slice and all get the whole (what IFND
    clusters). On the accelerator's device."""
    acc = s.accelerator
    model = acc.unwrap_model(s.model)
    ds = open_dataset(cfg.data.train)
    feats = encode_dataset(
        Projections(model),
        ds,
        s.bundle.preprocess_val,
        None,
        processes=Processes(acc.process_index, acc.num_processes, acc.device),
        batch_size=cfg.eval.batch_size,
        num_workers=cfg.eval.num_workers,
        progress=show_progress(cfg, s),
        desc=f"IFND: embedding {ds.num_items} training images",
    )
    model.train()
    return feats.index.to(acc.device), feats.image.to(acc.device)
