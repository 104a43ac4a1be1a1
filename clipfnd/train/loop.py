"""The training recipe: ``setup`` -> ``train`` -> ``evaluate`` -> ``summary``, top to bottom.

Launch it with ``clipfnd train CONFIG.yaml [key=value ...]`` (one process) or
``accelerate launch [flags] -m clipfnd train CONFIG.yaml ...`` (many). On a machine
without CUDA the processes form a real gloo group on the CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from data_pipelines import load_shard_set
from data_pipelines.loader import LoaderState, ShardStream

from .. import distributed
from ..config import Config, ConfigError, to_dict, to_yaml
from ..methods import Method
from ..models import check_model_name, create_clip
from ..state import StateTables
from . import checkpoint as ckpt
from .objective import ClipObjective, StepOutput
from .schedule import apply_tau_rule, build_scheduler

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


class MetricsWriter:
    """Appends JSON lines to ``RUN/metrics.jsonl`` and mirrors them to the trackers."""

    def __init__(self, run_dir: Path, accelerator: Accelerator):
        self.path = run_dir / "metrics.jsonl"
        self.accelerator = accelerator

    def write(self, record: dict[str, Any]) -> None:
        if not self.accelerator.is_main_process:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        self.accelerator.log(scalars, step=record.get("step"))


class NonFiniteError(RuntimeError):
    """Too many non-finite steps in a row; the message names the checkpoint to go back to."""


class FaultCounter:
    """Counts optimiser steps skipped for a non-finite loss or gradient."""

    def __init__(self) -> None:
        self.total = 0
        self.in_a_row = 0

    def skip(self, step: int, epoch: int) -> None:
        self.total += 1
        self.in_a_row += 1
        log.warning("non-finite loss or gradient after step %d (epoch %d): step skipped "
                    "(%d in a row, %d in all)", step, epoch, self.in_a_row, self.total)

    def ok(self) -> None:
        self.in_a_row = 0

    def give_up(self, cfg: Config, s: Setup, step: int, epoch: int, it) -> str:
        """Make sure a checkpoint from before the fault exists; return the message."""
        latest = ckpt.find_latest(s.run_dir)
        if latest is None:  # the weights are still those of the last good step
            latest = save(cfg, s, step, epoch, it.state())
        return (
            f"{self.in_a_row} optimiser steps in a row had a non-finite loss or gradient "
            f"(train.max_nonfinite_steps={cfg.train.max_nonfinite_steps}) after step {step}; "
            f"stopping. The newest checkpoint from before the fault is {latest}: lower optim.lr "
            "or check the data, then resume with resume=latest"
        )


@dataclass
class Setup:
    accelerator: Accelerator
    run_dir: Path
    model: torch.nn.Module
    bundle: Any
    stream: ShardStream
    tables: StateTables
    objective: ClipObjective
    optimizer: torch.optim.Optimizer
    scheduler: Any
    total_steps: int
    tau_group: int | None = None  # the temperature's own parameter group, if the method has one


def _check_run_dir(cfg: Config, run_dir: Path, accelerator: Accelerator) -> None:
    existing = ckpt.list_checkpoints(run_dir) if run_dir.is_dir() else []
    if not existing or cfg.resume is not None:
        return
    if not cfg.overwrite:
        raise ConfigError(
            f"output_dir={str(run_dir)!r} already holds checkpoints of a run "
            f"({existing[-1].name}); pass resume=latest to continue it, overwrite=true to start "
            "over there, or choose another output_dir"
        )
    if accelerator.is_main_process:
        shutil.rmtree(ckpt.checkpoint_dir(run_dir))
    accelerator.wait_for_everyone()


def optimizer_steps_in_epoch(stream: ShardStream, epoch: int, accum_steps: int) -> int:
    """Optimiser steps of ``epoch``: whole windows of ``accum_steps`` micro-batches. The
    micro-batches left over at the epoch's end are not used (a step never spans two epochs)."""
    return stream.steps_per_epoch(epoch) // accum_steps


def setup(cfg: Config) -> Setup:
    """Build everything a run needs. Whatever can fail on the user's input (model name, data,
    batch size, detector needs) is checked before the output folder is created, so a run that
    cannot start leaves nothing behind."""
    use_cpu = not torch.cuda.is_available()
    if cfg.train.mixed_precision == "fp16" and use_cpu:
        raise ConfigError("train.mixed_precision=fp16 needs CUDA; use bf16 or no on the CPU")
    check_model_name(cfg.model.name)
    accelerator = Accelerator(
        cpu=use_cpu,
        mixed_precision=cfg.train.mixed_precision,
        log_with="tensorboard" if cfg.train.tensorboard else None,
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
            f"data.batch_size={cfg.data.batch_size} (the global batch) does not divide by "
            f"{world} processes"
        )
    set_seed(cfg.seed)

    shard_set = load_shard_set(cfg.data.train)
    bundle = create_clip(cfg.model.name, pretrained=cfg.model.pretrained, init_logit_scale=cfg.model.init_logit_scale)
    model = bundle.model
    table_device = "cpu" if cfg.fnd.state_on_cpu else accelerator.device
    tables = StateTables(shard_set.num_samples, table_device)
    objective = ClipObjective(cfg, tables, has_labels=shard_set.num_labels > 0)
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
    optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    k = cfg.optim.accum_steps
    steps_all = sum(optimizer_steps_in_epoch(stream, e, k) for e in range(cfg.train.epochs))
    total_steps = min(steps_all, cfg.train.max_steps or steps_all)
    if total_steps < 1:
        raise ConfigError(
            f"the run has no optimiser step: {steps_all} steps in {cfg.train.epochs} epoch(s) "
            f"with data.batch_size={cfg.data.batch_size} and optim.accum_steps={k}"
        )
    tau_group = len(groups) - 1 if method.own_temperature_group else None
    scheduler = build_scheduler(optimizer, kind=cfg.optim.schedule, warmup=cfg.optim.warmup_steps,
                                total=total_steps, tau_group=tau_group, tau_schedule=method.temperature_schedule)

    # Everything the user could have got wrong has been checked: now the run folder.
    run_dir = Path(cfg.output_dir)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    _check_run_dir(cfg, run_dir, accelerator)

    model, optimizer = accelerator.prepare(model, optimizer)
    # The scheduler is stepped by hand once per optimiser step (Accelerate would step it once
    # per process), and saved with the tables as registered objects.
    accelerator.register_for_checkpointing(scheduler)
    accelerator.register_for_checkpointing(tables)
    if accelerator.is_main_process:
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
        dropped = stream.dropped_in_epoch(0)
        if dropped:
            log.info("epoch 0 leaves out %d of %d samples (the last partial global batch and "
                     "uneven shards across processes)", dropped, shard_set.num_samples)
        unused = stream.steps_per_epoch(0) % k
        if unused:
            log.info("optim.accum_steps=%d: the last %d micro-batch(es) of epoch 0 fill no "
                     "optimiser step and are not used", k, unused)
    if cfg.train.tensorboard:
        accelerator.init_trackers("tensorboard")
    return Setup(accelerator, run_dir, model, bundle, stream, tables, objective, optimizer, scheduler,
                 total_steps, tau_group)


# Keys a resumed run must share with the checkpoint: they decide what the weights, the
# per-sample tables and the data position mean.
RESUME_KEYS = ("model.name", "data.train", "data.batch_size", "data.num_workers",
               "data.chunk_size", "data.shuffle_buffer", "data.resampled", "seed", "loss.name",
               "fnd.detector")


def _config_differences(saved: dict[str, Any], cfg: Config) -> list[str]:
    now = to_dict(cfg)
    out = []
    for key in RESUME_KEYS:
        a, b = saved, now
        for part in key.split("."):
            a, b = a.get(part) if isinstance(a, dict) else None, b.get(part) if isinstance(b, dict) else None
        if a != b:
            out.append(f"{key}: checkpoint {a!r}, now {b!r}")
    return out


def _resume(cfg: Config, s: Setup) -> tuple[int, int, LoaderState | None]:
    """Load the checkpoint ``cfg.resume`` names; return (step, epoch, this rank's loader state).

    With ``resume=latest`` the newest complete checkpoint is used; one that fails to load
    (corrupt files) is skipped with a warning in favour of the one before it.
    """
    if cfg.resume is None:
        return 0, 0, None
    if cfg.resume == "latest":
        candidates = [p for p in reversed(ckpt.list_checkpoints(s.run_dir)) if ckpt.is_valid(p)]
        if not candidates:
            log.info("resume=latest: no checkpoint in %s, starting from scratch", s.run_dir)
            return 0, 0, None
    else:
        candidates = [Path(cfg.resume)]
        if not ckpt.is_valid(candidates[0]):
            raise ValueError(f"resume={cfg.resume!r}: {candidates[0]} is not a complete checkpoint")
    for i, path in enumerate(candidates):
        state = ckpt.read_trainer_state(path)
        diffs = _config_differences(state.get("config", {}), cfg)
        if diffs:
            raise ConfigError(
                f"resume: {path} belongs to a run with another config ({'; '.join(diffs)}); "
                "resume with the same settings, or start over with overwrite=true"
            )
        try:
            s.accelerator.load_state(str(path))
            loader = json.loads((path / f"loader_rank{s.accelerator.process_index}.json").read_text())
        except Exception as e:
            if i + 1 == len(candidates):
                raise ValueError(f"cannot load checkpoint {path}: {e}") from e
            log.warning("checkpoint %s cannot be loaded (%s: %s); falling back to %s",
                        path, type(e).__name__, e, candidates[i + 1])
            continue
        break
    loader_state = LoaderState.from_dict(loader)
    if state["world_size"] != s.accelerator.num_processes:
        k = cfg.optim.accum_steps
        if loader_state.batches < optimizer_steps_in_epoch(s.stream, loader_state.epoch, k) * k:
            raise ValueError(
                f"{path} was written by {state['world_size']} processes in the middle of epoch "
                f"{loader_state.epoch}; resume it with the same number of processes "
                f"(now {s.accelerator.num_processes})"
            )
        loader_state = None
    log.info("resumed from %s (step %d, epoch %d)", path, state["step"], state["epoch"])
    epoch = state["epoch"] if loader_state is not None else state["epoch"] + 1
    return int(state["step"]), int(epoch), loader_state


def save(cfg: Config, s: Setup, step: int, epoch: int, loader_state: LoaderState) -> Path:
    acc = s.accelerator
    tmp = ckpt.tmp_path(s.run_dir, step)
    acc.save_state(str(tmp), safe_serialization=True)
    ckpt.write_json(tmp / f"loader_rank{acc.process_index}.json", loader_state.to_dict())
    acc.wait_for_everyone()
    final = ckpt.final_path(s.run_dir, step)
    if acc.is_main_process:
        ckpt.publish(
            s.run_dir, step,
            {"step": step, "epoch": epoch, "world_size": acc.num_processes,
             "model_name": cfg.model.name, "config": to_dict(cfg)},
            cfg.train.keep_checkpoints,
        )
    acc.wait_for_everyone()
    return final


def evaluate(cfg: Config, s: Setup, step: int, epoch: int) -> dict[str, float]:
    """``eval.tasks`` on ``data.val`` with the model as it is now, on every process (each
    encodes a slice; the metrics are those of the whole split). Zero-shot keys get a
    ``zeroshot/`` prefix; retrieval keys are bare (``i2t_R@1``, ...)."""
    from eval.processes import Processes
    from eval.run import EvalOptions, run_eval

    from ..export.checkpoint import LoadedCheckpoint

    acc = s.accelerator
    model = acc.unwrap_model(s.model)
    live = LoadedCheckpoint(path=s.run_dir, run_dir=s.run_dir, step=step, epoch=epoch,
                            model_name=cfg.model.name, config=to_dict(cfg),
                            bundle=dataclasses.replace(s.bundle, model=model))
    processes = Processes(acc.process_index, acc.num_processes, acc.device)
    results: dict[str, float] = {}
    for task in cfg.eval.tasks:
        opts = EvalOptions(task=task, data=cfg.data.val, batch_size=cfg.eval.batch_size,
                           num_workers=cfg.eval.num_workers, progress=cfg.train.progress)
        out = run_eval(live, opts, processes)
        prefix = "" if task == "retrieval" else f"{task}/"
        results.update({f"{prefix}{k}": v for k, v in out.get("metrics", {}).items()})
    model.train()
    return distributed.broadcast_object(results)


@dataclass
class StepResult:
    """What one optimiser step did.

    ``status``: ``taken`` (weights and per-sample tables changed), ``skipped`` (a non-finite
    loss or gradient: nothing changed), ``overflow`` (the fp16 gradient scaler skipped the
    update: nothing changed but the scale), ``no_data`` (a rank ran out of data before the
    window was full: the partial window is dropped, nothing changed).
    """

    status: str
    losses: list[torch.Tensor] = dataclasses.field(default_factory=list)  # one per micro-batch
    outputs: list[StepOutput] = dataclasses.field(default_factory=list)
    lrs: list[float] = dataclasses.field(default_factory=list)  # of each parameter group, as used


def optimizer_step(cfg: Config, s: Setup, batches, epoch: int, logged: bool) -> StepResult:
    """One optimiser step over ``optim.accum_steps`` micro-batches of ``batches``.

    Each micro-batch: forward, objective, a finite check agreed by every rank, backward (the
    gradient of the mean over micro-batches; DDP synchronises on the last one only). Then the
    clipped gradient-norm check and the update. The per-sample rows every micro-batch
    computed are held and committed in one write only when the update is really taken: a
    skipped step (non-finite loss in any micro-batch, non-finite gradient, fp16 overflow)
    leaves the weights and every table exactly as they were.
    """
    acc, model, k = s.accelerator, s.model, cfg.optim.accum_steps
    held: list[StepOutput] = []
    poisoned = False
    for micro in range(k):
        batch = next(batches, None)
        if not distributed.all_true(batch is not None, acc.device):
            s.optimizer.zero_grad(set_to_none=True)  # some rank ran out: every rank drops the window
            return StepResult("no_data")
        if poisoned:
            continue  # the step is lost; its micro-batches are still read, so the data position holds
        sync = contextlib.nullcontext() if micro == k - 1 else acc.no_sync(model)
        with sync:
            out = model(image=batch["image"].to(acc.device), text=batch["text"].to(acc.device))
            res = s.objective(out["image_features"], out["text_features"], out["logit_scale"],
                              batch["index"].to(acc.device), batch["label"].to(acc.device), epoch,
                              measure=logged)
            # every rank takes the same branch: no rank waits alone in a backward collective
            if distributed.all_true(bool(torch.isfinite(res.loss.detach())), acc.device):
                acc.backward(res.loss / k)
                held.append(res)
            else:
                poisoned = True
    if poisoned:
        s.optimizer.zero_grad(set_to_none=True)
        return StepResult("skipped")
    # the gradients are synchronised, so every rank sees the same norm; a gradient scaler
    # (fp16) handles overflowing gradients itself and says so through step_was_skipped
    norm = acc.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or math.inf)
    if acc.scaler is None and not bool(torch.isfinite(norm)):
        s.optimizer.zero_grad(set_to_none=True)
        return StepResult("skipped")
    method = s.objective.method
    if s.tau_group is not None and method.temperature_schedule == "fastclip":
        tau = 1.0 / acc.unwrap_model(model).logit_scale.detach().exp().item()
        apply_tau_rule(s.optimizer, s.tau_group, method.temperature_lr, tau)
    s.optimizer.step()
    s.optimizer.zero_grad(set_to_none=True)
    losses, lrs = [r.loss.detach() for r in held], [g["lr"] for g in s.optimizer.param_groups]
    if acc.optimizer_step_was_skipped:
        return StepResult("overflow", losses, held, lrs)
    s.objective.commit(held)  # per-sample tables change only with the weights
    s.scheduler.step()
    return StepResult("taken", losses, held, lrs)


class LogWindow:
    """Losses, detection counts and duplicates since the last log line."""

    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []
        self.detection: torch.Tensor | None = None
        self.steps = 0
        self.start = time.perf_counter()

    def add(self, r: StepResult) -> None:
        self.steps += 1
        self.losses.extend(r.losses)
        for o in r.outputs:
            if o.detection is not None:
                self.detection = o.detection if self.detection is None else self.detection + o.detection


def train(cfg: Config) -> dict[str, Any]:
    s = setup(cfg)
    acc = s.accelerator
    metrics = MetricsWriter(s.run_dir, acc)
    step, start_epoch, loader_state = _resume(cfg, s)
    if step == 0 and acc.is_main_process:  # a fresh start: no lines of an earlier attempt
        metrics.path.write_text("")
    model = s.model
    raw_model = acc.unwrap_model(model)
    B, k = cfg.data.batch_size, cfg.optim.accum_steps
    bar = tqdm(total=s.total_steps, initial=step, desc="train", unit="step",
               disable=not (cfg.train.progress and acc.is_main_process))
    window = LogWindow()
    train_start, steps_at_start = time.perf_counter(), step
    last_record: dict[str, Any] = {}
    bad_total = 0
    duplicates_total = 0
    done = step >= s.total_steps
    epoch = start_epoch
    faults = FaultCounter()
    it = None
    last_eval: tuple[int, dict[str, float]] = (-1, {})  # (step, results) of the latest eval
    for epoch in range(start_epoch, cfg.train.epochs if not done else start_epoch):
        it = s.stream.epoch(epoch, loader_state if epoch == start_epoch else None)
        batches = iter(it)
        usable = optimizer_steps_in_epoch(s.stream, epoch, k) * k  # micro-batches this epoch uses
        model.train()
        while it.state().batches + k <= usable:
            logged = (step + 1) % cfg.train.log_every == 0 or step + 1 == s.total_steps
            r = optimizer_step(cfg, s, batches, epoch, logged)
            if r.status == "no_data":
                break
            if r.status == "skipped":
                faults.skip(step, epoch)
                if faults.in_a_row >= cfg.train.max_nonfinite_steps:
                    raise NonFiniteError(faults.give_up(cfg, s, step, epoch, it))
                continue
            faults.ok()
            s.objective.method.clamp_temperature(raw_model.logit_scale)
            step += 1
            window.add(r)
            duplicates_total += sum(o.duplicates for o in r.outputs)
            bar.update(1)
            if step % cfg.train.log_every == 0 or step == s.total_steps:
                record = log_record(cfg, s, step, epoch, window, r, faults,
                                    bad_total + sum(it.bad.values()), duplicates_total)
                metrics.write(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}")
                last_record = record
                window = LogWindow()
            if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0 and step < s.total_steps:
                save(cfg, s, step, epoch, it.state())
            if cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and cfg.data.val:
                val = evaluate(cfg, s, step, epoch)
                last_eval = (step, val)
                metrics.write({"step": step, "epoch": epoch, **{f"val/{k_}": v for k_, v in val.items()}})
            if step >= s.total_steps:
                done = True
                break
        bad_total += sum(it.bad.values())
        if it.bad:  # each process reports the shards it read
            per_shard = {f"{Path(sh).name}: {why}": n for (sh, why), n in sorted(it.bad.items())}
            log.warning("epoch %d: process %d skipped %d bad samples: %s",
                        epoch, acc.process_index, sum(it.bad.values()), per_shard)
        if done:
            break
    bar.close()
    train_time = time.perf_counter() - train_start
    final_state = it.state() if it is not None else LoaderState(epoch=epoch)
    final = save(cfg, s, step, epoch, final_state) if step > steps_at_start else ckpt.find_latest(s.run_dir)
    results: dict[str, float] = {}
    if cfg.eval.at_end and cfg.data.val:
        results = last_eval[1] if last_eval[0] == step else evaluate(cfg, s, step, epoch)
    if results and last_eval[0] != step:
        metrics.write({"step": step, "epoch": epoch, **{f"val/{k_}": v for k_, v in results.items()}})
    summary = {
        "run_dir": str(s.run_dir),
        "checkpoint": str(final) if final else None,
        "steps": step,
        "epochs": epoch + 1,
        "processes": acc.num_processes,
        "global_batch_size": B,
        "samples_per_sec": (step - steps_at_start) * B * k / max(train_time, 1e-9),
        "loss": last_record.get("loss"),
        "skipped_samples": int(distributed.all_reduce_sum(torch.tensor(bad_total)).item()),
        "nonfinite_steps_skipped": faults.total,
        "duplicate_samples": duplicates_total,
        "eval": results,
    }
    if acc.is_main_process:
        ckpt.write_json(s.run_dir / "summary.json", summary)
    acc.end_training()
    return summary


def log_record(cfg: Config, s: Setup, step: int, epoch: int, window: LogWindow, last: StepResult,
               faults: FaultCounter, bad: int, duplicates: int) -> dict[str, Any]:
    """The metrics line of a logged step (collectives inside: every rank calls it)."""
    acc = s.accelerator
    loss_mean = distributed.all_reduce_sum(torch.stack(window.losses).mean()).item() / acc.num_processes
    elapsed = time.perf_counter() - window.start
    record = {
        "step": step, "epoch": epoch, "loss": loss_mean,
        "lr": last.lrs[0],  # the learning rate this step ran with
        "logit_scale": acc.unwrap_model(s.model).logit_scale.exp().item(),
        "samples_per_sec": window.steps * cfg.data.batch_size * cfg.optim.accum_steps / max(elapsed, 1e-9),
        **last.outputs[-1].metrics,
    }
    if s.tau_group is not None:
        record["tau_lr"] = last.lrs[s.tau_group]
    if window.detection is not None:
        record.update(s.objective.summarise(distributed.all_reduce_sum(window.detection)))
    record.update(s.objective.threshold_metrics())
    bad = distributed.all_reduce_sum(torch.tensor(bad)).item()
    if bad:
        record["data/skipped"] = bad
    if duplicates:
        record["data/duplicates_in_batch"] = duplicates
    if faults.total:
        record["train/nonfinite_skipped"] = faults.total
    return record
