"""The training recipe: ``setup`` -> ``train`` -> ``evaluate`` -> ``summary``, top to bottom.

Launch it with ``clipfnd train CONFIG.yaml [key=value ...]`` (one process) or
``accelerate launch [flags] -m clipfnd train CONFIG.yaml ...`` (many). On a machine
without CUDA the processes form a real gloo group on the CPU.
"""

from __future__ import annotations

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
from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

from data_pipelines import load_shard_set
from data_pipelines.loader import LoaderState, ShardStream

from .. import distributed
from ..config import Config, ConfigError, to_dict, to_yaml
from ..models import check_model_name, create_clip
from ..state import StateTables
from . import checkpoint as ckpt
from .objective import ClipObjective, clamp_logit_scale

log = logging.getLogger("clipfnd.train")


def param_groups(model: torch.nn.Module, cfg: Config) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices only (not norms, biases, logit_scale); under
    fastclip_v3 the temperature (``logit_scale``) gets its own learning rate."""
    decay, no_decay, temperature = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith("logit_scale"):
            (temperature if cfg.loss.name == "fastclip_v3" else no_decay).append(p)
        elif p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if temperature:
        groups.append({"params": temperature, "weight_decay": 0.0, "lr": cfg.loss.tau_lr})
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


def _check_run_dir(cfg: Config, run_dir: Path, accelerator: Accelerator) -> None:
    existing = ckpt.list_checkpoints(run_dir)
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


def setup(cfg: Config) -> Setup:
    use_cpu = not torch.cuda.is_available()
    if cfg.train.mixed_precision == "fp16" and use_cpu:
        raise ConfigError("train.mixed_precision=fp16 needs CUDA; use bf16 or no on the CPU")
    check_model_name(cfg.model.name)
    accelerator = Accelerator(
        cpu=use_cpu,
        mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_steps=cfg.optim.accum_steps,
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
    run_dir = Path(cfg.output_dir)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    _check_run_dir(cfg, run_dir, accelerator)
    set_seed(cfg.seed)

    shard_set = load_shard_set(cfg.data.train)
    bundle = create_clip(cfg.model.name, pretrained=cfg.model.pretrained, init_logit_scale=cfg.model.init_logit_scale)
    model = bundle.model
    if cfg.loss.name == "sogclr":  # constant temperature: logit_scale carries it, frozen
        with torch.no_grad():
            model.logit_scale.fill_(math.log(1.0 / cfg.loss.tau))
        model.logit_scale.requires_grad_(False)
    elif cfg.loss.name == "fastclip_v3" and cfg.model.init_logit_scale is None:
        with torch.no_grad():
            model.logit_scale.fill_(math.log(1.0 / cfg.loss.tau))

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
    table_device = "cpu" if cfg.fnd.state_on_cpu else accelerator.device
    tables = StateTables(shard_set.num_samples, table_device)
    objective = ClipObjective(cfg, tables, has_labels=shard_set.num_labels > 0)

    optimizer = torch.optim.AdamW(
        param_groups(model, cfg), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps
    )
    steps_all = sum(stream.steps_per_epoch(e) for e in range(cfg.train.epochs)) // cfg.optim.accum_steps
    total_steps = min(steps_all, cfg.train.max_steps or steps_all)
    if total_steps < 1:
        raise ConfigError(
            f"the run has no optimiser step: {steps_all} steps in {cfg.train.epochs} epoch(s) "
            f"with data.batch_size={cfg.data.batch_size} and optim.accum_steps={cfg.optim.accum_steps}"
        )
    make = get_cosine_schedule_with_warmup if cfg.optim.schedule == "cosine" else get_constant_schedule_with_warmup
    kwargs = {"num_training_steps": total_steps} if cfg.optim.schedule == "cosine" else {}
    scheduler = make(optimizer, num_warmup_steps=min(cfg.optim.warmup_steps, total_steps), **kwargs)

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
    if cfg.train.tensorboard:
        accelerator.init_trackers("tensorboard")
    return Setup(accelerator, run_dir, model, bundle, stream, tables, objective, optimizer, scheduler, total_steps)


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
        if loader_state.batches < s.stream.steps_per_epoch(loader_state.epoch):
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


def train(cfg: Config) -> dict[str, Any]:
    s = setup(cfg)
    acc = s.accelerator
    metrics = MetricsWriter(s.run_dir, acc)
    step, start_epoch, loader_state = _resume(cfg, s)
    if step == 0 and acc.is_main_process:  # a fresh start: no lines of an earlier attempt
        metrics.path.write_text("")
    model = s.model
    raw_model = acc.unwrap_model(model)
    B = cfg.data.batch_size
    bar = tqdm(total=s.total_steps, initial=step, desc="train", unit="step",
               disable=not (cfg.train.progress and acc.is_main_process))
    recent: list[torch.Tensor] = []  # losses since the last log line
    detection = None
    window_start, window_steps = time.perf_counter(), 0
    train_start, steps_at_start = time.perf_counter(), step
    last_record: dict[str, Any] = {}
    bad_total = 0
    done = step >= s.total_steps
    epoch = start_epoch
    faults = FaultCounter()
    poisoned = False
    it = None
    last_eval: tuple[int, dict[str, float]] = (-1, {})  # (step, results) of the latest eval
    for epoch in range(start_epoch, cfg.train.epochs if not done else start_epoch):
        it = s.stream.epoch(epoch, loader_state if epoch == start_epoch else None)
        batches = iter(it)
        model.train()
        while True:
            batch = next(batches, None)
            if not distributed.all_true(batch is not None, acc.device):
                break  # some rank ran out of data: every rank ends the epoch together
            with acc.accumulate(model):
                out = model(image=batch["image"].to(acc.device), text=batch["text"].to(acc.device))
                logged = (step + 1) % cfg.train.log_every == 0 or step + 1 == s.total_steps
                res = s.objective(out["image_features"], out["text_features"], out["logit_scale"],
                                  batch["index"].to(acc.device), batch["label"].to(acc.device), epoch,
                                  measure=logged)
                # Every rank takes the same branch: a non-finite loss anywhere skips the step
                # everywhere (no rank waits alone in a backward collective).
                if distributed.all_true(bool(torch.isfinite(res.loss.detach())), acc.device):
                    acc.backward(res.loss)
                    s.objective.commit(res)  # per-sample tables change only for kept steps
                    recent.append(res.loss.detach())
                    if res.detection is not None:
                        detection = res.detection if detection is None else detection + res.detection
                else:
                    poisoned = True
                if acc.sync_gradients:
                    # the gradients are synchronised, so every rank sees the same norm; under
                    # fp16 the gradient scaler handles overflowing gradients by itself
                    norm = acc.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or math.inf)
                    grad_ok = cfg.train.mixed_precision == "fp16" or bool(torch.isfinite(norm))
                    if poisoned or not grad_ok:
                        faults.skip(step, epoch)
                    else:
                        s.optimizer.step()
                        faults.ok()
                    s.optimizer.zero_grad(set_to_none=True)
            if not acc.sync_gradients:
                continue
            poisoned = False
            if faults.in_a_row:  # this optimiser step was skipped
                if faults.in_a_row >= cfg.train.max_nonfinite_steps:
                    stop = faults.give_up(cfg, s, step, epoch, it)
                    raise NonFiniteError(stop)
                continue
            if not acc.optimizer_step_was_skipped:
                s.scheduler.step()
            clamp_logit_scale(raw_model.logit_scale, cfg.loss.name, cfg.loss.tau_min)
            step += 1
            window_steps += 1
            bar.update(1)
            if step % cfg.train.log_every == 0 or step == s.total_steps:
                loss_mean = distributed.all_reduce_sum(torch.stack(recent).mean()).item() / acc.num_processes
                elapsed = time.perf_counter() - window_start
                record = {
                    "step": step, "epoch": epoch, "loss": loss_mean,
                    "lr": s.scheduler.get_last_lr()[0],
                    "logit_scale": raw_model.logit_scale.exp().item(),
                    "samples_per_sec": window_steps * B * cfg.optim.accum_steps / max(elapsed, 1e-9),
                    **res.metrics,
                }
                if detection is not None:
                    record.update(s.objective.summarise(distributed.all_reduce_sum(detection)))
                    detection = None
                record.update(s.objective.threshold_metrics())
                bad = distributed.all_reduce_sum(torch.tensor(bad_total + sum(it.bad.values()))).item()
                if bad:
                    record["data/skipped"] = bad
                if faults.total:
                    record["train/nonfinite_skipped"] = faults.total
                metrics.write(record)
                bar.set_postfix(loss=f"{loss_mean:.4f}")
                last_record = record
                recent.clear()
                window_start, window_steps = time.perf_counter(), 0
            if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0 and step < s.total_steps:
                save(cfg, s, step, epoch, it.state())
            if cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and cfg.data.val:
                val = evaluate(cfg, s, step, epoch)
                last_eval = (step, val)
                metrics.write({"step": step, "epoch": epoch, **{f"val/{k}": v for k, v in val.items()}})
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
        metrics.write({"step": step, "epoch": epoch, **{f"val/{k}": v for k, v in results.items()}})
    summary = {
        "run_dir": str(s.run_dir),
        "checkpoint": str(final) if final else None,
        "steps": step,
        "epochs": epoch + 1,
        "processes": acc.num_processes,
        "global_batch_size": B,
        "samples_per_sec": (step - steps_at_start) * B * cfg.optim.accum_steps / max(train_time, 1e-9),
        "loss": last_record.get("loss"),
        "skipped_samples": int(distributed.all_reduce_sum(torch.tensor(bad_total)).item()),
        "nonfinite_steps_skipped": faults.total,
        "eval": results,
    }
    if acc.is_main_process:
        ckpt.write_json(s.run_dir / "summary.json", summary)
    acc.end_training()
    return summary
