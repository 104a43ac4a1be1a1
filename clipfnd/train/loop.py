"""The training recipe, top to bottom: ``setup`` -> ``train`` (epochs of ``optimizer_step``,
logging, checkpoints, periodic evaluation) -> ``finish`` (final checkpoint, evaluation,
summary).

Launch it with ``clipfnd train CONFIG.yaml [key=value ...]`` (one process) or
``accelerate launch [flags] -m clipfnd train CONFIG.yaml ...`` (many). On a machine
without CUDA the processes form a real gloo group on the CPU.

Where the rest lives: the step (forward, objective, finite check, backward, commit) in
``step.py``; the loss of a batch in ``objective.py`` (methods and detectors behind it);
checkpoints, ``save`` and ``resume`` in ``checkpoint.py``; the metrics line and its window in
``metrics.py``; learning-rate schedules in ``schedule.py``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from clipfnd_eval.features import encode_dataset
from clipfnd_eval.layouts import open_dataset
from clipfnd_eval.processes import Processes
from clipfnd_eval.run import EvalModel, EvalOptions, run_eval
from data_pipelines import DataError, load_shard_set
from data_pipelines.loader import EpochIterator, LoaderState, ShardStream

from .. import distributed
from ..checkpoints import checkpoint_dir, find_latest, list_checkpoints
from ..config import Config, ConfigError, eval_tasks, report_to, to_dict, to_yaml
from ..errors import UserError
from ..methods import Method
from ..models import check_model_name, create_clip, lock_towers, set_grad_checkpointing
from ..models.factory import SCHEMAS
from ..models.vision import Projections, vision_from_config
from ..plots import PlotWriter
from ..state import ShardedTables, StateTables
from . import checkpoint as ckpt
from .lock import RunLock, RunLocked
from .metrics import LogWindow, MetricsWriter, log_record, now
from .objective import OBJECTIVES, Objective
from .schedule import build_scheduler, optimizer_steps_in_epoch
from .step import FaultCounter, NonFiniteError, StepResult, optimizer_step

__all__ = [
    "NonFiniteError",
    "Setup",
    "StepResult",
    "optimizer_step",
    "optimizer_steps_in_epoch",
    "setup",
    "train",
]

log = logging.getLogger("clipfnd.train")


def param_groups(model: torch.nn.Module, cfg: Config, method: Method) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices only (not norms, biases, logit_scale); a method
    that learns its temperature apart (``own_temperature_group``) gets a group for it."""
    decay, no_decay, temperature = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith("logit_scale"):
            (temperature if method.own_temperature_group else no_decay).append(p)
        elif p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if temperature:
        groups.append({"params": temperature, "weight_decay": 0.0, "lr": method.temperature_lr})
    return groups


def build_optimizer(groups: list[dict[str, Any]], cfg: Config) -> torch.optim.Optimizer:
    """``optim.name``: AdamW (CLIP's), SGD with momentum, or LARS (SimCLR's, from timm: torch
    has none). Weight decay is per group (``param_groups``); LARS adapts the step of every
    parameter with weight decay, as SimCLR excludes norms and biases from both."""
    o = cfg.optim
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=False)
    from timm.optim import Lars

    # timm's defaults: no trust clipping, no adaptation where weight_decay == 0 (norms, biases)
    return Lars(groups, lr=o.lr, momentum=o.momentum)


@dataclass
class Setup:
    accelerator: Accelerator
    run_dir: Path
    model: torch.nn.Module
    bundle: Any
    stream: ShardStream
    tables: StateTables
    objective: Objective
    optimizer: torch.optim.Optimizer
    scheduler: Any
    total_steps: int
    tau_group: int | None = None  # the temperature's own parameter group, if the method has one
    lock: RunLock | None = None  # the run folder's lock (main process)
    # every parameter group's hyperparameters as this run's config built them (a resume
    # applies those that changed: ``checkpoint.apply_changed_settings``)
    fresh_hyperparameters: list[dict[str, Any]] = field(default_factory=list)


def _check_run_dir(cfg: Config, run_dir: Path, accelerator: Accelerator) -> None:
    existing = list_checkpoints(run_dir) if run_dir.is_dir() else []
    if not existing or cfg.resume is not None:
        return
    if not cfg.overwrite:
        raise ConfigError(
            f"output_dir={str(run_dir)!r} already holds checkpoints of a run "
            f"({existing[-1].name}); pass resume=latest to continue it, overwrite=true to start "
            "over there, or choose another output_dir"
        )
    if accelerator.is_main_process:
        shutil.rmtree(checkpoint_dir(run_dir))
    accelerator.wait_for_everyone()


def main_process_first(accelerator: Accelerator, build, what: str, user_input: bool = True):
    """``build()`` on process 0 first (a pretrained download lands in the cache once), then on
    the others. A failure on any process is raised on every process as one ``UserError``
    naming the process and the cause, so that none waits alone in a collective (Accelerate's
    ``main_process_first`` would leave the others waiting at its barrier for a process 0 that
    raised). ``what`` names the thing built; ``user_input``: whatever fails in it comes from
    the user's files (a model config of theirs), else the traceback of an error that is not a
    ``UserError`` is logged too (a bug)."""
    out, error = None, None
    if accelerator.is_main_process:
        out, error = _attempt(build, what, user_input)
    error = distributed.broadcast_object(error)
    if error is not None:
        raise UserError(f"rank 0: {error}" if accelerator.num_processes > 1 else error)
    if not accelerator.is_main_process:
        out, error = _attempt(build, what, user_input)
    failures = distributed.failures(error)
    if failures:
        raise UserError("; ".join(failures))
    return out


def _attempt(build, what: str, user_input: bool) -> tuple[Any, str | None]:
    try:
        return build(), None
    except UserError as e:
        return None, str(e)
    except Exception as e:
        if not user_input:
            log.exception("building %s failed", what)
        first = (str(e).strip().splitlines() or [""])[0][:300]
        return None, f"cannot build {what}: {type(e).__name__}: {first}"


def trackers(cfg: Config) -> list:
    """Accelerate's trackers for ``train.report_to``: TensorBoard logs in ``RUN/tensorboard``;
    a wandb run named after the run folder, its files in ``RUN/wandb`` (project
    ``$WANDB_PROJECT``, default clipfnd; ``WANDB_MODE=offline`` needs no network)."""
    from accelerate.tracking import TensorBoardTracker, WandBTracker

    run_dir = Path(cfg.output_dir)
    out: list = []
    for name in report_to(cfg):
        if name == "tensorboard":
            out.append(TensorBoardTracker("tensorboard", run_dir))
        elif name == "wandb":
            out.append(
                WandBTracker(
                    os.environ.get("WANDB_PROJECT", "clipfnd"),
                    dir=str(run_dir),
                    name=run_dir.resolve().name,
                    config=to_dict(cfg),
                )
            )
    return out


def check_eval_data(cfg: Config) -> None:
    """``data.val`` opens as an evaluation dataset (the layout is recognised, a manifest's
    shards exist): checked at start-up rather than found missing after training."""
    if not cfg.data.val:
        return
    try:
        open_dataset(cfg.data.val)
    except (FileNotFoundError, DataError, UserError) as e:
        raise ConfigError(f"data.val={cfg.data.val!r}: {e}") from e


def setup(cfg: Config) -> Setup:
    """Build everything a run needs. Whatever can fail on the user's input (model name, data,
    batch size, detector needs) is checked before the output folder is created, so a run that
    cannot start leaves nothing behind."""
    use_cpu = not torch.cuda.is_available()
    if cfg.train.mixed_precision == "fp16" and use_cpu:
        raise ConfigError("train.mixed_precision=fp16 needs CUDA; use bf16 or no on the CPU")
    if cfg.mode == "clip":
        check_model_name(cfg.model.name)
    elif cfg.model.pretrained is not None:
        raise ConfigError(
            "model.pretrained loads CLIP weights (mode clip); vision-only runs start from random "
            "initialisation"
        )
    accelerator = Accelerator(
        cpu=use_cpu,
        mixed_precision=cfg.train.mixed_precision,
        log_with=trackers(cfg) or None,
        project_dir=cfg.output_dir,
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and accelerator.num_processes != launched:
        raise RuntimeError(
            f"launched as {launched} processes but Accelerate formed a group of "
            f"{accelerator.num_processes}: on a machine without GPUs use "
            "`accelerate launch --multi_gpu --num_processes N ...` (clipfnd then runs them on the CPU)"
        )
    world = accelerator.num_processes
    if cfg.data.batch_size % world:
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size} (the global batch, all processes together; "
            f"open_clip's --batch-size is per GPU) does not divide by {world} processes"
        )
    set_seed(cfg.seed)

    shard_set = load_shard_set(cfg.data.train)
    check_eval_data(cfg)
    if cfg.mode == "clip":
        bundle = main_process_first(
            accelerator,
            lambda: create_clip(
                cfg.model.name,
                pretrained=cfg.model.pretrained,
                init_logit_scale=cfg.model.init_logit_scale,
            ),
            f"model {cfg.model.name}",
            user_input=cfg.model.name.startswith(SCHEMAS) or cfg.model.pretrained is not None,
        )
    else:
        bundle = vision_from_config(to_dict(cfg))
    model = bundle.model
    if cfg.model.lock_image or cfg.model.lock_text:
        m = cfg.model
        lock_towers(
            model,
            lock_image=m.lock_image,
            image_unlocked_groups=m.lock_image_unlocked_groups,
            image_freeze_bn_stats=m.lock_image_freeze_bn_stats,
            lock_text=m.lock_text,
            text_unlocked_layers=m.lock_text_unlocked_layers,
            text_freeze_layer_norm=m.lock_text_freeze_layer_norm,
        )
    if cfg.train.grad_checkpointing:
        set_grad_checkpointing(model, cfg.model.name)
    if cfg.train.compile:
        model.compile(backend=cfg.train.compile_backend)  # forward only; same state-dict keys
    table_device = "cpu" if cfg.fnd.state_on_cpu else accelerator.device
    if cfg.fnd.state == "sharded":
        tables: StateTables = ShardedTables(
            shard_set.num_samples,
            table_device,
            rank=accelerator.process_index,
            world=accelerator.num_processes,
        )
    else:
        tables = StateTables(shard_set.num_samples, table_device)
    objective = OBJECTIVES[cfg.mode](cfg, tables, has_labels=shard_set.num_labels > 0)
    method = objective.method
    method.init_temperature(model)

    stream = ShardStream(
        shard_set,
        global_batch_size=cfg.data.batch_size,
        rank=accelerator.process_index,
        world=world,
        image_transform=bundle.preprocess_train,
        tokenize=bundle.tokenizer,
        num_workers=cfg.data.num_workers,
        seed=cfg.seed,
        shuffle_buffer=cfg.data.shuffle_buffer,
        chunk_size=cfg.data.chunk_size,
        on_error=cfg.data.on_error,
        resampled=cfg.data.resampled,
        samples_per_epoch=cfg.data.samples_per_epoch,
    )
    groups = param_groups(model, cfg, method)
    optimizer = build_optimizer(groups, cfg)
    k = cfg.optim.accum_steps
    steps_all = sum(optimizer_steps_in_epoch(stream, e, k) for e in range(cfg.train.epochs))
    total_steps = min(steps_all, cfg.train.max_steps or steps_all)
    if total_steps < 1:
        raise ConfigError(
            f"the run has no optimiser step: {steps_all} steps in {cfg.train.epochs} epoch(s) "
            f"with data.batch_size={cfg.data.batch_size} and optim.accum_steps={k}"
        )
    objective.detector.plan(total_steps, optimizer_steps_in_epoch(stream, 0, k))
    tau_group = len(groups) - 1 if method.own_temperature_group else None
    scheduler = build_scheduler(
        optimizer,
        kind=cfg.optim.schedule,
        warmup=cfg.optim.warmup_steps,
        total=total_steps,
        tau_group=tau_group,
        tau_schedule=method.temperature_schedule,
    )
    fresh = [
        {k: copy.deepcopy(v) for k, v in g.items() if k != "params"} for g in optimizer.param_groups
    ]

    # Everything the user could have got wrong has been checked: now the run folder.
    run_dir = Path(cfg.output_dir)
    lock, refused = RunLock(run_dir), None
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            lock.acquire()  # held until the process ends (or finish() releases it)
        except RunLocked as e:
            refused = str(e)
    refused = distributed.broadcast_object(refused)
    if refused is not None:
        raise RunLocked(refused)
    _check_run_dir(cfg, run_dir, accelerator)

    model, optimizer = accelerator.prepare(model, optimizer)
    # The scheduler is stepped by hand once per optimiser step (Accelerate would step it once
    # per process); it and the tables are checkpointed by clipfnd itself (JSON, safetensors),
    # not registered with Accelerate, which would pickle them.
    if accelerator.is_main_process:
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
        dropped = stream.dropped_in_epoch(0)
        if dropped:
            log.info(
                "epoch 0 leaves out %d of %d samples (the last partial global batch and "
                "uneven shards across processes)",
                dropped,
                shard_set.num_samples,
            )
        unused = stream.steps_per_epoch(0) % k
        if unused:
            log.info(
                "optim.accum_steps=%d: the last %d micro-batch(es) of epoch 0 fill no "
                "optimiser step and are not used",
                k,
                unused,
            )
    if report_to(cfg):
        accelerator.init_trackers("tensorboard")  # each tracker was named when built
    return Setup(
        accelerator,
        run_dir,
        model,
        bundle,
        stream,
        tables,
        objective,
        optimizer,
        scheduler,
        total_steps,
        tau_group,
        lock,
        fresh,
    )


def evaluate(cfg: Config, s: Setup, step: int, epoch: int) -> dict[str, float]:
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
            batch_size=cfg.eval.batch_size,
            num_workers=cfg.eval.num_workers,
            progress=show_progress(cfg, s),
        )
        out = run_eval(live, opts, processes)
        prefix = "" if task == "retrieval" else f"{task}/"
        results.update({f"{prefix}{k}": v for k, v in out.get("metrics", {}).items()})
    model.train()
    return distributed.broadcast_object(results)


def embed_training_set(cfg: Config, s: Setup) -> tuple[torch.Tensor, torch.Tensor]:
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


@dataclass
class Progress:
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
    started: float = field(default_factory=time.perf_counter)
    elapsed_before: float = 0.0  # seconds the run trained before this attempt (resumed)

    @classmethod
    def resumed(cls, r: ckpt.Resumed, main: bool) -> Progress:
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


def show_progress(cfg: Config, s: Setup) -> bool:
    """Progress bars on rank 0, and only on a terminal: redirected to a file, a bar's
    carriage-return updates would fill the log (the log lines say the same there)."""
    return bool(cfg.train.progress and s.accelerator.is_main_process and sys.stderr.isatty())


def train(cfg: Config) -> dict[str, Any]:
    """Run the recipe of ``cfg``: build, resume, train, finish. From the moment the run folder
    is claimed, rank 0 also writes every log line to ``RUN/train.log`` (and, when the run
    stops on an error, the error)."""
    s = setup(cfg)
    run_log = RunLog(s.run_dir, enabled=s.accelerator.is_main_process)
    try:
        return _train(cfg, s)
    except BaseException as e:
        run_log.line(f"clipfnd: error: {e}" if str(e) else f"clipfnd: {type(e).__name__}")
        raise
    finally:
        run_log.close()


def _train(cfg: Config, s: Setup) -> dict[str, Any]:
    resumed = ckpt.resume(cfg, s)
    run = Progress.resumed(resumed, s.accelerator.is_main_process)
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
            seconds = time.perf_counter() - epoch_start
            samples = (it.batches - batches_before) * cfg.data.batch_size
            record["epoch_seconds"] = seconds
            record["epoch_samples_per_sec"] = samples / max(seconds, 1e-9)
            metrics.write(record)
            calibration = s.objective.detector.epoch_report()  # every rank: it resets counts
            if calibration and s.accelerator.is_main_process:
                log.warning("%s", calibration)
            if s.accelerator.is_main_process:
                log.info(
                    "epoch %d done: %d samples in %.1f s (%.1f samples/s), %d skipped as bad; "
                    "step %d of %d",
                    epoch,
                    samples,
                    seconds,
                    record["epoch_samples_per_sec"],
                    record["data/skipped"],
                    run.step,
                    s.total_steps,
                )
            every = cfg.eval.every_epochs
            if every and (epoch + 1) % every == 0 and cfg.data.val and run.last_eval[0] != run.step:
                run.last_eval = (run.step, evaluate(cfg, s, run.step, epoch))
                metrics.write(
                    {
                        "step": run.step,
                        "epoch": epoch,
                        **{f"val/{k}": v for k, v in run.last_eval[1].items()},
                    }
                )
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
        self.handler = logging.FileHandler(run_dir / "train.log", encoding="utf-8")
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


def start_epoch_hooks(cfg: Config, s: Setup, epoch: int, fresh: bool) -> dict[str, float]:
    """The detector's epoch start (IFND clusters the training set here); what it reports
    (e.g. the accepted share) becomes a metrics line of its own."""
    t0 = time.perf_counter()
    out = s.objective.detector.start_epoch(epoch, lambda: embed_training_set(cfg, s), fresh)
    if out:
        out["fnd/epoch_start_seconds"] = time.perf_counter() - t0
    return out


def train_epoch(
    cfg: Config,
    s: Setup,
    run: Progress,
    it: EpochIterator,
    epoch: int,
    metrics: MetricsWriter,
    bar: tqdm,
) -> None:
    """Optimiser steps over whole windows of ``optim.accum_steps`` micro-batches of the epoch."""
    k = cfg.optim.accum_steps
    usable = optimizer_steps_in_epoch(s.stream, epoch, k) * k  # micro-batches this epoch uses
    batches = iter(it)
    s.model.train()
    while it.batches + k <= usable and run.step < s.total_steps:
        logged = (run.step + 1) % cfg.train.log_every == 0 or run.step + 1 == s.total_steps
        r = optimizer_step(cfg, s, batches, epoch, logged)
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
        s.objective.method.clamp_temperature(s.accelerator.unwrap_model(s.model).logit_scale)
        run.step += 1
        run.window.add(r)
        run.duplicates += sum(o.duplicates for o in r.outputs)
        bar.update(1)
        if r.events:  # e.g. the step masking started at: a line of its own, whatever log_every
            metrics.write({"step": run.step, "epoch": epoch, **r.events})
        after_step(cfg, s, run, it, epoch, r, metrics, bar)


def save_checkpoint(
    cfg: Config, s: Setup, run: Progress, epoch: int, it: EpochIterator | None
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
    return ckpt.save(cfg, s, run.step, epoch, state, counters)


def after_step(
    cfg: Config,
    s: Setup,
    run: Progress,
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
            cfg,
            s,
            step,
            epoch,
            run.window,
            r,
            run.faults,
            run.bad_samples + sum(it.bad.values()),
            run.duplicates,
        )
        metrics.write(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}")
        if s.accelerator.is_main_process:
            B = cfg.data.batch_size * cfg.optim.accum_steps
            planned = optimizer_steps_in_epoch(s.stream, epoch, cfg.optim.accum_steps) * B
            seen = it.batches * cfg.data.batch_size
            log.info(
                "epoch %d [%d/%d samples, %.0f%%] step %d/%d: loss %.4f, lr %.3g, %.1f samples/s",
                epoch,
                seen,
                planned,
                100.0 * seen / max(planned, 1),
                step,
                s.total_steps,
                record["loss"],
                record["lr"],
                record["samples_per_sec"],
            )
        run.last_record, run.window = record, LogWindow()
    if (
        cfg.train.checkpoint_every
        and step % cfg.train.checkpoint_every == 0
        and step < s.total_steps
    ):
        save_checkpoint(cfg, s, run, epoch, it)
    if cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and cfg.data.val:
        run.last_eval = (step, evaluate(cfg, s, step, epoch))
        metrics.write(
            {"step": step, "epoch": epoch, **{f"val/{k}": v for k, v in run.last_eval[1].items()}}
        )


def report_bad_samples(s: Setup, run: Progress, it: EpochIterator, epoch: int) -> None:
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
    cfg: Config, s: Setup, run: Progress, it: EpochIterator, epoch: int
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
    s: Setup,
    run: Progress,
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
        results = (
            run.last_eval[1] if run.last_eval[0] == run.step else evaluate(cfg, s, run.step, epoch)
        )
        if run.last_eval[0] != run.step:
            metrics.write(
                {"step": run.step, "epoch": epoch, **{f"val/{k}": v for k, v in results.items()}}
            )
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
        "samples_per_sec": (run.step - run.start_step)
        * B
        * cfg.optim.accum_steps
        / max(train_time, 1e-9),
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
